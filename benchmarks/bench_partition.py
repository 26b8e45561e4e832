"""Partition-level benchmarks of the streaming tile engine (issue: chip lattice / streaming).

Three measurements, each in a fresh subprocess so peak memory is the step's own:

- ``memory``: peak RSS above the process baseline (interpreter + imports + loaded model) for the
  composite step and each model's embedding step on one partition (``--tile``, default a whole
  MGRS tile), with a zero network so only the data path is measured;
- ``host``: host-side chips/s with a zero network: transfer-ready raw batches (read, verify, cut),
  the same with CPU preprocessing, and the whole partition step;
- ``pipeline``: per model, in one run on the same chips, bare forward chips/s (preprocessed batches
  straight into the network) against end-to-end partition chips/s, with FLOPs per chip counted by
  ``torch.utils.flop_counter`` (and so MFU when a peak FLOP/s is given).

    .venv/bin/python benchmarks/bench_partition.py memory --tile 31UFU
    .venv/bin/python benchmarks/bench_partition.py host --tile 31UFU-k2-r00-c00
    .venv/bin/python benchmarks/bench_partition.py pipeline --tile 31UFU-k20-r11-c07

Results go to benchmarks/results/partition_<what>_<device>.json with the machine description.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's code, not another installed copy
RESULTS = Path(os.environ.get("RS_EMBED_BENCH_RESULTS") or Path(__file__).resolve().parent / "results")
MODELS = ["fomo", "terrafm_b", "terrafm_b_s1", "scalemae_rgb", "dynamicvis", "agrifm"]


def machine() -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def peak_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def zero_network(model_id: str, device: str = "cpu"):
    """The model's real adapter (spec, preprocessing) whose forward returns zeros: only the data path runs."""
    import torch

    import adapters

    cls = adapters.get_adapter_class(model_id)
    spec = cls.spec

    class Zero(cls):
        def forward_embeddings(self, x, **_):
            b = x.shape[0]
            return (torch.zeros(b, spec.embed_dim, device=x.device),
                    torch.zeros(b, spec.embed_dim, spec.grid_size, spec.grid_size, device=x.device))

    Zero.spec = spec
    cfg = cls.default_config()
    return Zero(cls.build_model(cfg), cfg, device=device)  # the real module (some adapters inspect it), never run


def _months(model_id: str, month: str) -> list[str]:
    import adapters
    from rs_embed_assets.composite import shift_month

    ad_frames = zero_network(model_id).frames if adapters.get_spec(model_id).frames > 1 else 1
    return [shift_month(month, -k) for k in range(ad_frames - 1, -1, -1)]


class _Composites:
    """Materialises each (sensor, month) composite of one tile once, for every model that needs it."""

    def __init__(self, storage, tile: str):
        from rs_embed_assets.providers import create_provider

        self.storage, self.tile, self.provider, self.done = storage, tile, create_provider("sample"), set()

    def for_model(self, model_id: str, month: str) -> list[str]:
        import adapters
        from rs_embed_assets.materialize import materialize_composite

        sensor, months = adapters.get_spec(model_id).sensor, _months(model_id, month)
        for m in months:
            if (sensor, m) not in self.done:
                materialize_composite(self.storage, self.provider, sensor, self.tile, m)
                self.done.add((sensor, m))
        return months


# --- workers (run in their own process) ---------------------------------------------------------
def worker_composite(root: str, tile: str, month: str, sensor: str) -> dict:
    from rs_embed_assets.materialize import materialize_composite
    from rs_embed_assets.providers import create_provider
    from rs_embed_assets.storage import Storage

    base = rss_mb()
    t = time.perf_counter()
    rec = materialize_composite(Storage(root), create_provider("sample"), sensor, tile, month)
    return {"step": f"{sensor}_composite", "tile": tile, "seconds": round(time.perf_counter() - t, 2),
            "baseline_mb": round(base, 1), "peak_mb": round(peak_mb(), 1),
            "peak_above_baseline_mb": round(peak_mb() - base, 1), "shape": rec["shape"]}


def worker_embed(root: str, tile: str, month: str, model_id: str) -> dict:
    from rs_embed_assets.materialize import EmbeddingSettings, materialize_embeddings
    from rs_embed_assets.storage import Storage

    ad = zero_network(model_id)
    base = rss_mb()
    t = time.perf_counter()
    man = materialize_embeddings(Storage(root), ad, tile, month, {"sha256": "0" * 64, "random_init": True,
                                                                 "source_uri": "bench"}, EmbeddingSettings())
    secs = time.perf_counter() - t
    return {"step": f"embeddings/{model_id}", "tile": tile, "seconds": round(secs, 2),
            "baseline_mb": round(base, 1), "peak_mb": round(peak_mb(), 1),
            "peak_above_baseline_mb": round(peak_mb() - base, 1), "chips": man["chips_embedded"],
            "host_chips_per_s": round(man["chips_embedded"] / secs, 1) if secs else None,
            "batch_size": man["batch_size"], "grid_dtype": man["grid_dtype"],
            "load_average": [round(v, 2) for v in os.getloadavg()]}


def _run_worker(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "_worker", *args], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_steps(tile: str, month: str, models: list[str]) -> dict:
    import adapters

    with tempfile.TemporaryDirectory(prefix="bench-partition-") as root:
        steps = []
        months = sorted({m for mid in models for m in _months(mid, month)})
        sensors = sorted({adapters.get_spec(m).sensor for m in models})
        for sensor in sensors:
            for m in months if sensor == "s2" else [month]:
                r = _run_worker("composite", root, tile, m, sensor)
                if m == month:
                    steps.append(r)
                print(json.dumps(r), flush=True)
        for model_id in models:
            r = _run_worker("embed", root, tile, month, model_id)
            steps.append(r)
            print(json.dumps(r), flush=True)
    return {"tile": tile, "month": month, "network": "zero (data path only)", "steps": steps}


def bench_host(tile: str, month: str, models: list[str], repeats: int) -> dict:
    """Host-side chips/s with a zero network, per model, in one process on the same composite:

    - ``transfer_ready``: read + verify + cut into contiguous raw batches (what a GPU worker copies to
      the device when preprocessing runs there);
    - ``transfer_ready_via_zarr_python``: the same through zarr-python's general read path instead of the
      chunk files (the ratio is what the engine's own reads gain);
    - ``host_preprocessed``: the same plus the adapter's CPU preprocessing (what the CPU path feeds);
    - each also as CPU seconds (all threads) per 1,000 chips: on a shared machine the wall-clock rate
      follows the load, the CPU cost does not (``transfer_ready_two_core_capacity``: 2 cores / cost);
    - ``partition``: the whole embedding step (plan, prefetch thread, zero forward, grid and vectors
      written, committed).
    """
    import numpy as np

    import adapters
    from rs_embed_assets.embedding import _batches, plan_chips, tile_context_of, to_float32
    from rs_embed_assets.grid import parse_tile_key
    from rs_embed_assets.lattice import chip_lattice
    from rs_embed_assets.materialize import EmbeddingSettings, materialize_embeddings
    from rs_embed_assets.storage import Storage

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-host-") as root:
        st = Storage(root)
        composites = _Composites(st, tile)
        for model_id in models:
            spec = adapters.get_spec(model_id)
            months = composites.for_model(model_id, month)
            ad = zero_network(model_id)
            bs = 512 if spec.chip_size <= 64 else 64
            lat = chip_lattice(parse_tile_key(tile), spec.chip_size)
            row = {"model": model_id, "chip_size": spec.chip_size, "batch": bs}
            readers = [st.open_composite(spec.sensor, tile, m) for m in months]
            bidx = [[r.bands.index(b) for b in spec.bands] for r in readers]
            ctx = tile_context_of(ad, readers, lat, bidx)  # once per partition, outside the timed loop
            for name, prep, zarr_path in [
                    ("transfer_ready", np.ascontiguousarray, False),
                    ("transfer_ready_via_zarr_python", np.ascontiguousarray, True),
                    ("host_preprocessed",
                     lambda raw: ad.preprocess(to_float32(raw), bands=spec.bands, tile_context=ctx), False)]:
                best = best_cpu = None
                for _ in range(repeats):
                    readers = [st.open_composite(spec.sensor, tile, m) for m in months]
                    for r in readers:
                        if len(readers) > 1:
                            r.cache_blocks = 0
                        if zarr_path:  # the general zarr-python read path instead of the chunk files
                            r._fast = [None, None]
                    t0, c0 = time.perf_counter(), time.process_time()
                    plan = plan_chips(readers, lat)
                    bidx = [[r.bands.index(b) for b in spec.bands] for r in readers]
                    n = sum(len(p) for p, _ in _batches(plan, readers, bidx, bs, prep))
                    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
                    best = dt if best is None else min(best, dt)
                    best_cpu = cpu if best_cpu is None else min(best_cpu, cpu)
                row[f"{name}_chips_per_s"] = round(n / best, 1)
                # CPU seconds of all the process's threads: what the work costs whatever else runs on the
                # machine; two_core_capacity = the rate two otherwise idle cores could sustain
                row[f"{name}_cpu_s_per_1000_chips"] = round(best_cpu / n * 1000, 3)
                if name == "transfer_ready":
                    row["transfer_ready_two_core_capacity_chips_per_s"] = round(2 * n / best_cpu, 1)
            ck = {"sha256": "0" * 64, "random_init": True, "source_uri": "bench"}
            best = None
            for _ in range(repeats):
                t0 = time.perf_counter()
                man = materialize_embeddings(st, ad, tile, month, ck, EmbeddingSettings(batch_size=bs))
                dt = time.perf_counter() - t0
                best = dt if best is None else min(best, dt)
            row["partition_chips_per_s"] = round(man["chips_embedded"] / best, 1)
            row["chips"] = man["chips_embedded"]
            row["read_path_speedup"] = round(row["transfer_ready_chips_per_s"]
                                             / row["transfer_ready_via_zarr_python_chips_per_s"], 2)
            row["load_average"] = [round(v, 2) for v in os.getloadavg()]  # 1/5/15 min, at the row's end
            rows.append(row)
            print(json.dumps(row), flush=True)
        codecs = bench_codecs(st, tile, month)
    return {"tile": tile, "month": month, "network": "zero (data path only)", "models": rows, "codecs": codecs}


def bench_codecs(st, tile: str, month: str) -> list[dict]:
    """Decode speed and ratio of candidate codecs on one 512-row block of the S2 composite, 1 and 2 threads."""
    from concurrent.futures import ThreadPoolExecutor

    import numcodecs
    import numpy as np

    reader = st.open_composite("s2", tile, month)
    block = reader._read(0, min(2, len(reader.hashes) - 1))
    cw = reader.block_rows
    chunks = [np.ascontiguousarray(block[:, :, x:x + cw]) for x in range(0, block.shape[2] - cw + 1, cw)]
    raw = sum(c.nbytes for c in chunks)
    out = []
    for name, codec in [("zstd level 1 (grids; composites before)", numcodecs.Zstd(level=1)),
                        ("blosc lz4 + shuffle (composites)", numcodecs.Blosc(cname="lz4", clevel=5, shuffle=1)),
                        ("blosc zstd 1 + shuffle", numcodecs.Blosc(cname="zstd", clevel=1, shuffle=1))]:
        enc = [codec.encode(c) for c in chunks]
        row = {"codec": name, "ratio": round(raw / sum(len(e) for e in enc), 3)}
        for threads in (1, 2):
            with ThreadPoolExecutor(threads) as pool:
                best = None
                for _ in range(3):
                    t0 = time.perf_counter()
                    list(pool.map(codec.decode, enc))
                    dt = time.perf_counter() - t0
                    best = dt if best is None else min(best, dt)
            row[f"decode_gb_s_{threads}_threads"] = round(raw / best / 1e9, 2)
        out.append(row)
        print(json.dumps(row), flush=True)
    return out


def bench_pipeline(tile: str, month: str, models: list[str], device: str, peak_tflops: float | None,
                   repeats: int) -> dict:
    """Bare forward against the whole partition, on the same chips, for full-size random-weight models."""
    import numpy as np
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    import adapters
    from rs_embed_assets.embedding import to_float32
    from rs_embed_assets.grid import parse_tile_key
    from rs_embed_assets.lattice import chip_lattice
    from rs_embed_assets.materialize import EmbeddingSettings, materialize_embeddings
    from rs_embed_assets.storage import Storage

    out = []
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as root:
        st = Storage(root)
        composites = _Composites(st, tile)
        for model_id in models:
            cls = adapters.get_adapter_class(model_id)
            spec = cls.spec
            ckpt = cls.write_random_checkpoint(Path(root) / f"{model_id}.pt", seed=0)
            ad = cls.from_checkpoint(ckpt, device=device, dtype=os.environ.get("RS_EMBED_DTYPE", "float32"))
            months = composites.for_model(model_id, month)
            ckrec = {"sha256": "0" * 64, "random_init": True, "source_uri": "bench"}
            settings = EmbeddingSettings()
            materialize_embeddings(st, ad, tile, month, ckrec, settings)  # warm-up (and the chips)
            # the same chips as preprocessed batches, for the bare forward
            t = parse_tile_key(tile)
            lat = chip_lattice(t, spec.chip_size)
            readers = [st.open_composite(spec.sensor, tile, m) for m in months]
            w = readers[0].record["window"]
            bidx = [readers[0].bands.index(b) for b in spec.bands]
            chips = []
            for r, c in lat.positions():
                y, x = r * spec.chip_size - w["y0"], c * spec.chip_size - w["x0"]
                frames = [rd.rows(y, y + spec.chip_size, bidx)[0][:, :, x:x + spec.chip_size] for rd in readers]
                chips.append(np.stack(frames) if spec.frames > 1 else frames[0])
            raw = to_float32(np.stack(chips))
            ctx = ad.tile_context(raw[0] if spec.frames > 1 else raw[0], bands=spec.bands) \
                if type(ad).tile_context is not adapters.Adapter.tile_context else {}
            bs = ad.batch_size()
            kwargs = ad.forward_kwargs(raw[:1].shape, pixel_size_m=10.0)
            batches = [ad.preprocess(raw[i:i + bs], bands=spec.bands, tile_context=ctx) for i in range(0, len(raw), bs)]
            with FlopCounterMode(display=False) as fc:
                ad.embed(batches[0][:1], **kwargs)
            flops_per_chip = fc.get_total_flops()

            def sync():
                if device.startswith("cuda"):
                    torch.cuda.synchronize()

            bare, pipe = [], []
            for _ in range(repeats):  # interleaved, so machine noise hits both alike
                sync()
                t0 = time.perf_counter()
                for x in batches:
                    ad.embed(x, **kwargs)
                sync()
                bare.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                materialize_embeddings(st, ad, tile, month, ckrec, settings)
                sync()
                pipe.append(time.perf_counter() - t0)
            n = len(raw)
            bare_cps, pipe_cps = n / min(bare), n / min(pipe)
            row = {"model": model_id, "chips": n, "batch_size": bs, "flops_per_chip": flops_per_chip,
                   "bare_chips_per_s": round(bare_cps, 2), "pipeline_chips_per_s": round(pipe_cps, 2),
                   "pipeline_over_bare": round(pipe_cps / bare_cps, 3),
                   "bare_seconds_all": [round(v, 3) for v in bare], "pipeline_seconds_all": [round(v, 3) for v in pipe]}
            if peak_tflops:
                row["mfu_bare"] = round(bare_cps * flops_per_chip / (peak_tflops * 1e12), 4)
            out.append(row)
            print(json.dumps(row), flush=True)
            del ad, batches
    return {"tile": tile, "month": month, "device": device, "dtype": os.environ.get("RS_EMBED_DTYPE", "float32"),
            "peak_tflops": peak_tflops, "models": out}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_worker":
        kind, root, tile, month, what = sys.argv[2:7]
        res = worker_composite(root, tile, month, what) if kind == "composite" else worker_embed(root, tile, month, what)
        print(json.dumps(res))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["memory", "host", "pipeline"])
    ap.add_argument("--tile", default=None)
    ap.add_argument("--month", default="2024-07")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (e.g. 989 for H100 bf16)")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    models = args.models.split(",")
    load_start = [round(x, 2) for x in os.getloadavg()]
    if args.what == "memory":
        res = bench_steps(args.tile or "31UFU", args.month, models)
    elif args.what == "host":
        res = bench_host(args.tile or "31UFU-k2-r00-c00", args.month, models, args.repeats)
    else:
        res = bench_pipeline(args.tile or "31UFU-k20-r11-c07", args.month, models, args.device, args.peak_tflops,
                             args.repeats)
    res["machine"] = machine()
    res["load_average_start"], res["load_average_end"] = load_start, [round(x, 2) for x in os.getloadavg()]
    RESULTS.mkdir(exist_ok=True)
    dev = "cuda" if args.device.startswith("cuda") else "cpu"
    path = RESULTS / f"partition_{args.what}_{dev}.json"
    path.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
