"""Reduced-precision agreement: each model under ``RS_EMBED_DTYPE=bfloat16`` / ``float16`` against float32.

Full-size networks with deterministic random weights (no published checkpoint can be downloaded here),
run on chips of the sample provider's composites. Per model and dtype: the cosine between the
reduced-precision and the float32 pooled vector of every chip (min and mean), the same for grid cells,
and the seconds per forward. Reduced precision is ``torch.autocast`` around the forward, weights and
outputs stay float32 (``adapters.base.autocast_context``). Also records each model's share of FLOPs in
convolutions (``torch.utils.flop_counter``), the measure behind the channels-last decision.

    .venv/bin/python benchmarks/bench_precision.py                    # CPU, every model
    .venv/bin/python benchmarks/bench_precision.py --device cuda --chips 32

Results: benchmarks/results/precision_<device>.json (machine described inside).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_partition import MODELS, RESULTS, machine  # noqa: E402

TILE = "31UFU-k10-r05-c05"  # a 1098 px sub-tile: 289 FoMo chips, 16 at 224 px, 4 at 512 px
MONTH = "2024-07"


def sample_chips(model_id: str, n: int):
    """Up to ``n`` lattice-aligned chips (raw provider units, float32) of the sample composite(s)."""
    import numpy as np

    import adapters
    from rs_embed_assets.composite import shift_month
    from rs_embed_assets.embedding import to_float32
    from rs_embed_assets.grid import parse_tile_key
    from rs_embed_assets.providers import create_provider

    spec = adapters.get_spec(model_id)
    frames = spec.configured_frames()
    months = [shift_month(MONTH, -k) for k in range(frames - 1, -1, -1)]
    prov = create_provider("sample")
    stacks = []
    for m in months:
        ds = prov.composite(spec.sensor, parse_tile_key(TILE), m)
        stacks.append(ds["data"].sel(band=list(spec.bands)).values)
    cs = spec.chip_size
    h, w = stacks[0].shape[1:]
    pos = [(r, c) for r in range(h // cs) for c in range(w // cs)]
    step = max(1, len(pos) // n)
    chips = []
    for r, c in pos[::step][:n]:
        frames_ = [s[:, r * cs:(r + 1) * cs, c * cs:(c + 1) * cs] for s in stacks]
        chips.append(np.stack(frames_) if spec.frames > 1 else frames_[0])
    return to_float32(np.stack(chips))


def conv_flop_share(ad, x, kwargs) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        ad.embed(x[:1], **kwargs)
    counts = fc.get_flop_counts().get("Global", {})
    total = sum(counts.values())
    conv = sum(v for op, v in counts.items() if "conv" in str(op))
    return {"flops_per_chip": int(total), "conv_flop_share": round(conv / total, 4) if total else None}


def bench_model(model_id: str, n: int, device: str, dtypes: list[str], batch: int, root: Path) -> dict:
    import torch
    import torch.nn.functional as F

    import adapters

    cls = adapters.get_adapter_class(model_id)
    spec = cls.spec
    ckpt = cls.write_random_checkpoint(root / f"{model_id}.pt", seed=0)
    raw = sample_chips(model_id, n)
    ref_ad = cls.from_checkpoint(ckpt, device=device, dtype="float32")
    ctx = ref_ad.tile_context(raw[0], bands=spec.bands) if type(ref_ad).tile_context is not adapters.Adapter.tile_context else {}
    kwargs = ref_ad.forward_kwargs(raw[:1].shape, pixel_size_m=10.0)

    def run(ad):
        pooled, grids, secs = [], [], 0.0
        for i in range(0, len(raw), batch):
            x = ad.preprocess(raw[i:i + batch], bands=spec.bands, tile_context=ctx)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t = time.perf_counter()
            out = ad.embed(x, **kwargs)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            secs += time.perf_counter() - t
            pooled.append(out.pooled.cpu())
            grids.append(out.grid.cpu())
        return torch.cat(pooled), torch.cat(grids), secs

    run(ref_ad) if device.startswith("cuda") else None  # warm-up (CUDA kernels, cuDNN autotune)
    ref_pooled, ref_grid, ref_s = run(ref_ad)
    row = {"model": model_id, "chips": len(raw), "batch_size": batch,
           **conv_flop_share(ref_ad, ref_ad.preprocess(raw[:1], bands=spec.bands, tile_context=ctx), kwargs),
           "float32_s_per_chip": round(ref_s / len(raw), 4), "dtypes": {}}
    del ref_ad
    for dtype in dtypes:
        ad = cls.from_checkpoint(ckpt, device=device, dtype=dtype)
        if device.startswith("cuda"):
            run(ad)
        pooled, grid, secs = run(ad)
        cos = F.cosine_similarity(pooled, ref_pooled, dim=1)
        gcos = F.cosine_similarity(grid.flatten(2), ref_grid.flatten(2), dim=1)  # per grid cell
        rel = (pooled - ref_pooled).norm(dim=1) / ref_pooled.norm(dim=1)
        row["dtypes"][dtype] = {
            "pooled_cosine_min": round(float(cos.min()), 6), "pooled_cosine_mean": round(float(cos.mean()), 6),
            "grid_cell_cosine_min": round(float(gcos.min()), 6), "grid_cell_cosine_mean": round(float(gcos.mean()), 6),
            "pooled_rel_l2_max": round(float(rel.max()), 6), "finite": bool(torch.isfinite(pooled).all()),
            "s_per_chip": round(secs / len(raw), 4)}
        del ad
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtypes", default="bfloat16,float16")
    ap.add_argument("--chips", type=int, default=None, help="chips per model (default: 32 FoMo, 8 at 224 px, 4 "
                                                            "AgriFM / DynamicVis on CPU; 64 / 16 on CUDA)")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--merge", action="store_true", help="replace only these models' rows in the results file")
    args = ap.parse_args()
    import adapters

    cuda = args.device.startswith("cuda")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-precision-") as root:
        for model_id in args.models.split(","):
            spec = adapters.get_spec(model_id)
            small = spec.chip_size <= 64
            heavy = spec.frames > 1 or spec.chip_size >= 512
            n = args.chips or ((64 if small else 16) if cuda else (32 if small else 4 if heavy else 8))
            batch = args.batch or (n if cuda else (8 if small else 2 if heavy else 4))
            t = time.perf_counter()
            row = bench_model(model_id, n, args.device, args.dtypes.split(","), batch, Path(root))
            row["wall_s"] = round(time.perf_counter() - t, 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"precision_{'cuda' if cuda else 'cpu'}.json"
    if args.merge and path.is_file():  # keep the other models' rows of an earlier run
        done = {r["model"] for r in rows}
        rows = [r for r in json.loads(path.read_text())["models"] if r["model"] not in done] + rows
        rows.sort(key=lambda r: MODELS.index(r["model"]) if r["model"] in MODELS else len(MODELS))
    res = {"tile": TILE, "month": MONTH, "device": args.device, "weights": "deterministic random (seed 0), full size",
           "method": "torch.autocast around the forward; weights and outputs float32", "models": rows,
           "machine": machine()}
    path.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
