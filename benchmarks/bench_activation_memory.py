"""Activation memory per chip of every model's forward, and the CUDA batch size that fits a 24 GB card.

The peak of live tensor bytes during one inference forward is tracked exactly (a dispatch mode adds
every tensor an op returns and subtracts it when its storage is freed), at batch 1 and batch 2 on the
CPU: the difference is the per-chip activation memory, the rest (batch 1 minus one chip) the fixed
part. Weights are counted separately (float32 parameters and buffers). This is the memory the CUDA
caching allocator must hold for the same forward, save for kernel workspaces, so the arithmetic is

    budget = 0.5 × (card memory − weights − 1 GiB CUDA context)   (half kept free: workspaces, fragmentation)
    batch  = largest power of two ≤ min(budget / per-chip activation bytes,
                                        512 MiB / per-chip host bytes, 512)

The second bound is host memory: a batch is preprocessed on the host at the network's input size
(float32) and its pooled vectors and grid come back to the host (float32); up to four batches are in
flight (prefetch queue, the copy ahead, the forward), so a batch stays under 512 MiB whatever the card.

The measurement is float32; bfloat16 autocast keeps activations in 16 bit, so the float32 figure is
the bound for every ``RS_EMBED_DTYPE``. On CPU AgriFM uses the explicit window attention (its logits
are counted); on CUDA the fused kernel does not store them, another margin.

    .venv/bin/python benchmarks/bench_activation_memory.py

Results: benchmarks/results/activation_memory_cpu.json (machine described inside).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import weakref
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_partition import MODELS, RESULTS, machine  # noqa: E402

GIB = 2**30
CAP = 512
HOST_BATCH_BYTES = 512 * 2**20
RULE = ("batch = largest power of two <= min((0.5 * (card - weights - 1 GiB) - fixed) / per-chip activations, "
        f"512 MiB / per-chip host bytes (input + pooled + grid, float32), {CAP})")


def suggested_batch(card_gib: float, weights_bytes: float, fixed_bytes: float, per_chip_bytes: float,
                    host_bytes: float) -> int:
    budget = 0.5 * (card_gib * GIB - weights_bytes - GIB) - fixed_bytes
    n = max(1, min(int(budget // max(per_chip_bytes, 1)), int(HOST_BATCH_BYTES // max(host_bytes, 1)), CAP))
    return 1 << (n.bit_length() - 1)


def batch_columns(row: dict) -> dict:
    mb = 2**20
    return {f"batch_{card}gb": suggested_batch(card, row["weights_mb"] * mb, row["fixed_activation_mb"] * mb,
                                               row["per_chip_activation_mb"] * mb, row["host_mb_per_chip"] * mb)
            for card in (24, 48, 80, 141)}


def peak_live_bytes(fn) -> int:
    """Peak bytes of tensors alive at once while ``fn()`` runs (inputs and weights excluded)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    state = {"live": 0, "peak": 0}
    seen: set[int] = set()

    def free(key: int, n: int) -> None:
        state["live"] -= n
        seen.discard(key)

    class Track(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    st = t.untyped_storage()
                    key = st.data_ptr()
                    if key in seen or st.nbytes() == 0:
                        continue  # a view of a storage already counted
                    seen.add(key)
                    n = st.nbytes()
                    state["live"] += n
                    state["peak"] = max(state["peak"], state["live"])
                    weakref.finalize(st, free, key, n)
            return out

    with Track():
        fn()
    return state["peak"]


def measure(model_id: str, root: Path) -> dict:
    import numpy as np
    import torch

    import adapters

    cls = adapters.get_adapter_class(model_id)
    spec = cls.spec
    ad = cls.from_checkpoint(cls.write_random_checkpoint(root / f"{model_id}.pt", seed=0))
    weights = sum(t.numel() * t.element_size() for t in list(ad.model.parameters()) + list(ad.model.buffers()))
    frames = spec.configured_frames()
    shape = (*((frames,) if spec.frames > 1 else ()), len(spec.bands), spec.chip_size, spec.chip_size)
    rng = np.random.default_rng(0)
    raw = rng.integers(1, 5000, (2, *shape)).astype(np.float32)
    ctx = ad.tile_context(raw[0], bands=spec.bands) if type(ad).tile_context is not adapters.Adapter.tile_context else {}
    kwargs = ad.forward_kwargs(raw[:1].shape, pixel_size_m=10.0)
    peaks = {}
    for b in (1, 2):
        x = ad.preprocess(raw[:b], bands=spec.bands, tile_context=ctx)
        with torch.inference_mode():
            peaks[b] = peak_live_bytes(lambda: ad.embed(x, **kwargs))
    per_chip = peaks[2] - peaks[1]
    fixed = max(0, peaks[1] - per_chip)
    row = {"model": model_id, "weights_mb": round(weights / 2**20, 1), "per_chip_activation_mb": round(per_chip / 2**20, 2),
           "fixed_activation_mb": round(fixed / 2**20, 2),
           "host_mb_per_chip": round(4 * (int(np.prod(shape)) + spec.embed_dim * (1 + spec.grid_size**2)) / 2**20, 2),
           "spec_default_cuda": spec.default_batch_size.get("cuda")}
    return {**row, **batch_columns(row)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--recompute", action="store_true", help="only re-derive the batch columns of the results file")
    args = ap.parse_args()
    path = RESULTS / "activation_memory_cpu.json"
    if args.recompute:
        import adapters

        res = json.loads(path.read_text())
        for row in res["models"]:
            spec = adapters.get_spec(row["model"])
            frames = spec.configured_frames() if spec.frames > 1 else 1
            inp = frames * len(spec.bands) * spec.chip_size ** 2
            row["host_mb_per_chip"] = round(4 * (inp + spec.embed_dim * (1 + spec.grid_size ** 2)) / 2**20, 2)
            row.pop("input_mb_per_chip", None)
            row["spec_default_cuda"] = spec.default_batch_size.get("cuda")
            for k in [k for k in row if k.startswith("batch_")]:
                row.pop(k)
            row.update(batch_columns(row))
        res["rule"] = RULE
        path.write_text(json.dumps(res, indent=2) + "\n")
        print(json.dumps(res["models"], indent=1))
        return
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-actmem-") as root:
        for model_id in args.models.split(","):
            row = measure(model_id, Path(root))
            rows.append(row)
            print(json.dumps(row), flush=True)
    res = {"rule": RULE, "dtype": "float32 (the bound for bfloat16/float16 autocast too)", "models": rows,
           "machine": machine()}
    RESULTS.mkdir(exist_ok=True)
    path.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
