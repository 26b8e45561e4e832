"""The local provider against a bare rasterio windowed read: wall time and peak memory.

Writes a quarter-tile Sentinel-2 COG (5 490 × 5 490 px, 12 uint16 bands, DEFLATE, 512 px blocks; the
size a user gets from cutting an S2 tile in four) and reads two windows from it:

- ``subtile``: a 305 px sub-tile (``31UFU-k36-r00-c00``),
- ``quarter``: the whole 5 490 px window (``31UFU-k2-r00-c00``).

Each measurement runs in a fresh interpreter (so peak RSS belongs to that read alone): ``bare`` is
``rasterio.open(f).read(window=w)``; ``provider`` is ``LocalProvider.composite("s2", tile, month)``
(the full composite: masks, checks and the xarray dataset). Peak memory is the process's peak RSS minus
its RSS just before the read. Median time and maximum memory over ``--repeat`` runs.

    .venv/bin/python benchmarks/bench_local_provider.py            # writes benchmarks/results/local_provider.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's rs_embed_assets, not an installed one

CASES = {"subtile": ("31UFU", 36, 0, 0), "quarter": ("31UFU", 2, 0, 0)}
MONTH = "2024-05"


def _status_mib(field: str) -> float:
    """VmRSS (resident now) or VmHWM (peak resident since exec) of this process, MiB."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


def make_file(root: Path) -> Path:
    import numpy as np
    import rasterio
    from affine import Affine

    from rs_embed_assets.grid import subtile

    area = subtile(*CASES["quarter"])
    path = root / "s2" / "31UFU" / f"{MONTH}.tif"
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    profile = dict(driver="COG", width=area.width, height=area.height, count=12, dtype="uint16",
                   crs=f"EPSG:{area.epsg}", transform=Affine(10, 0, area.x0, 0, -10, area.y0),
                   compress="deflate", blocksize=512, overviews="none", num_threads=1)
    # a land-like field: smooth structure plus sensor noise, so DEFLATE compresses it like real imagery
    yy, xx = np.mgrid[0:area.height, 0:area.width].astype(np.float32)
    base = 2000 + 800 * np.sin(xx / 97.0) * np.cos(yy / 131.0)
    data = np.empty((12, area.height, area.width), np.uint16)
    for b in range(12):
        data[b] = np.clip(base * (0.6 + 0.08 * b) + rng.normal(0, 40, base.shape), 1, 10000)
    del yy, xx, base
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    return path


def measure(kind: str, case: str, root: str) -> dict:
    """Runs in the child interpreter."""
    import rasterio  # noqa: F401  (imported before the baseline, like the provider's own imports)
    import xarray  # noqa: F401

    from rs_embed_assets.grid import subtile
    from rs_embed_assets.providers.local import LocalProvider

    tile = subtile(*CASES[case])
    path = Path(root) / "s2" / "31UFU" / f"{MONTH}.tif"
    before = _status_mib("VmRSS")
    t0 = time.perf_counter()
    if kind == "bare":
        from rasterio.windows import Window

        area = subtile(*CASES["quarter"])
        col, row = int((tile.x0 - area.x0) / 10), int((area.y0 - tile.y0) / 10)
        with rasterio.open(path) as src:
            arr = src.read(window=Window(col, row, tile.width, tile.height))
        shape = arr.shape
    else:
        ds = LocalProvider(root=root).composite("s2", tile, MONTH)
        shape = ds["data"].shape
    seconds = time.perf_counter() - t0
    peak = _status_mib("VmHWM")
    return {"seconds": seconds, "peak_mib": peak - before, "shape": list(shape)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "local_provider.json"))
    ap.add_argument("--child", nargs=3, metavar=("KIND", "CASE", "ROOT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(*args.child)))
        return
    with tempfile.TemporaryDirectory(prefix="bench-local-") as tmp:
        t0 = time.perf_counter()
        path = make_file(Path(tmp))
        print(f"wrote {path.name}: {path.stat().st_size / 2**20:.0f} MiB in {time.perf_counter() - t0:.0f} s",
              flush=True)
        results = []
        for case in CASES:
            row: dict = {"case": case}
            for kind in ("bare", "provider"):
                runs = []
                for _ in range(args.repeat):
                    out = subprocess.run([sys.executable, __file__, "--child", kind, case, tmp], check=True,
                                         capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
                    runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
                row[kind] = {"seconds_median": round(statistics.median(r["seconds"] for r in runs), 3),
                             "seconds_all": [round(r["seconds"], 3) for r in runs],
                             "peak_mib_max": round(max(r["peak_mib"] for r in runs), 1), "shape": runs[0]["shape"]}
            row["time_ratio"] = round(row["provider"]["seconds_median"] / row["bare"]["seconds_median"], 2)
            row["memory_ratio"] = round(row["provider"]["peak_mib_max"] / max(row["bare"]["peak_mib_max"], 1e-9), 2)
            print(json.dumps(row), flush=True)
            results.append(row)
        file_mib = round(path.stat().st_size / 2**20, 1)
    import rasterio

    doc = {
        "benchmark": "local provider vs bare rasterio windowed read",
        "date": datetime.date.today().isoformat(),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "rasterio": rasterio.__version__,
                    "gdal": rasterio.__gdal_version__},
        "file": {"size_px": 5490, "bands": 12, "dtype": "uint16", "format": "COG DEFLATE 512 px blocks",
                 "mib": file_mib},
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
