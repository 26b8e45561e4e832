"""Throughput of each adapter (full-size published architectures, deterministic random weights).

Measures preprocess + forward for batches of raw chips on the chosen device and writes
benchmarks/results/embed_<device>.json with the machine description. Example:

    .venv/bin/python benchmarks/bench_embed.py --device cpu --batches 1,8 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import adapters


def machine(device: str) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": device}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def bench_model(model_id: str, device: str, batches: list[int], repeats: int, tmp: Path, dtype: str) -> dict:
    cls = adapters.get_adapter_class(model_id)
    spec = cls.spec
    ckpt = cls.write_random_checkpoint(tmp / f"{model_id}.pt", seed=0)
    t0 = time.perf_counter()
    ad = cls.from_checkpoint(ckpt, device=device, dtype=dtype)
    load_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    out = {"model": model_id, "load_seconds": round(load_s, 3), "chip_size": spec.chip_size, "embed_dim": spec.embed_dim,
           "frames": spec.frames, "results": []}
    for b in batches:
        shape = (b, spec.frames, spec.input_channels, spec.chip_size, spec.chip_size) if spec.frames > 1 else \
                (b, spec.input_channels, spec.chip_size, spec.chip_size)
        raw = rng.uniform(0, 0.3 if spec.sensor == "s1" else 6000, shape).astype(np.float32)
        ctx = ad.tile_context(raw[0], bands=spec.bands)
        ad.embed_raw(raw, bands=spec.bands, tile_context=ctx)  # warm-up
        times = []
        for _ in range(repeats):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t = time.perf_counter()
            ad.embed_raw(raw, bands=spec.bands, tile_context=ctx)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        best = min(times)
        out["results"].append({"batch": b, "seconds_best": round(best, 4), "seconds_all": [round(t, 4) for t in times],
                               "chips_per_s": round(b / best, 3)})
        print(f"{model_id:14s} batch {b:3d}: {b / best:8.2f} chips/s ({best:.3f} s)", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--models", default=",".join(adapters.list_models()))
    p.add_argument("--batches", default="1,8")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    batches = [int(b) for b in a.batches.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        rows = [bench_model(m, a.device, batches, a.repeats, Path(tmp), a.dtype) for m in a.models.split(",")]
    dev = a.device.split(":")[0]
    out = Path(a.out or Path(__file__).parent / "results" / f"embed_{dev}.json")
    out.write_text(json.dumps({"machine": machine(a.device), "dtype": a.dtype, "models": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
