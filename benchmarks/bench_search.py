"""Similarity search at scale: index build time, warm query latency and recall@10 against exact search.

Vectors: ``adapter`` — FoMo (the project's adapter, deterministic random-init weights: the published
file is not available offline) embeds synthetic Sentinel-2 sample composites of several sub-tiles and
months; those base vectors are expanded to N by interpolating each with one of its 8 nearest base
neighbours (random weight) plus noise of a quarter of the median
nearest-neighbour distance, so the set keeps the shape of real embeddings rather
than of random points. ``random`` — N Gaussian vectors (no structure; the hard case for any IVF).

The vectors are written as committed partitions (Parquet with footer manifests, 2,401 rows a file),
then ``rs_embed_assets.search.build_index`` (what the catalog asset runs) builds the index, float32
and int8, and ``VectorIndex.similar`` answers top-10 queries: no filter, one month, one month and a
lon/lat box. Ground truth: exact cosine over all (filtered) vectors with numpy.

    .venv/bin/python benchmarks/bench_search.py --n 1000000          # ~3 GB of Parquet in a temp dir
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package, not another install
from rs_embed_assets import search  # noqa: E402
from rs_embed_assets.embedding import vectors_schema  # noqa: E402
from rs_embed_assets.storage import Storage  # noqa: E402

ROWS_PER_FILE = 2401  # a whole S2 tile at 224 px chips
MONTHS = [f"2024-{m:02d}" for m in range(1, 13)]


def adapter_vectors(workdir: Path, depth: int, tiles: int, months: int) -> np.ndarray:
    """FoMo pooled vectors of sample composites (sub-tiles of 31UFU, k = 20), made by the library."""
    os.environ.update(RS_EMBED_FOMO_DEPTH=str(depth), RS_EMBED_FOMO_AUTO_DOWNLOAD="0", RS_EMBED_ASSETS_MODELS="fomo")
    import adapters
    from rs_embed_assets.materialize import (EmbeddingSettings, materialize_checkpoint, materialize_composite,
                                             materialize_embeddings)
    from rs_embed_assets.providers import create_provider

    storage = Storage(workdir)
    provider = create_provider("sample")
    record = materialize_checkpoint(storage, "fomo", allow_random_init=True, warn=lambda m: None)
    adapter = adapters.get_adapter_class("fomo").from_checkpoint(record["path"], device="cpu")
    keys = [f"31UFU-k20-r{r:02d}-c{c:02d}" for r in (9, 10) for c in range(8, 8 + (tiles + 1) // 2)][:tiles]
    for tile in keys:
        for month in MONTHS[:months]:
            materialize_composite(storage, provider, "s2", tile, month)
            materialize_embeddings(storage, adapter, tile, month, record, EmbeddingSettings(batch_size=32))
    _, mat = search.read_vectors(search._vectors_files(storage, "fomo"))
    return np.array(mat, dtype=np.float32)


def expand(base: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """n vectors on the base set's manifold: base_i + t (base_j - base_i) + noise, j among i's 8 nearest."""
    b = search.normalise(base.copy())
    sims = b @ b.T
    np.fill_diagonal(sims, -np.inf)
    nn = np.argsort(-sims, axis=1)[:, :8]
    nn_dist = np.sqrt(np.maximum(0, 2 - 2 * np.take_along_axis(sims, nn[:, :1], 1)))[:, 0]
    sigma = 0.25 * float(np.median(nn_dist)) / np.sqrt(base.shape[1])
    out = np.empty((n, base.shape[1]), np.float32)
    for s in range(0, n, 100_000):
        m = min(100_000, n - s)
        i = rng.integers(0, len(b), m)
        j = nn[i, rng.integers(0, 8, m)]
        t = rng.random((m, 1), dtype=np.float32)
        out[s:s + m] = b[i] + t * (b[j] - b[i]) + sigma * rng.standard_normal((m, base.shape[1]), dtype=np.float32)
    return out


def write_partitions(storage: Storage, vec: np.ndarray, rng: np.random.Generator) -> None:
    n, dim = vec.shape
    schema = vectors_schema(dim)
    for f, s in enumerate(range(0, n, ROWS_PER_FILE)):
        k = min(ROWS_PER_FILE, n - s)
        tile, month = f"T{f // len(MONTHS):05d}", MONTHS[f % len(MONTHS)]
        lon0, lat0 = -10 + (f // len(MONTHS)) % 40 * 1.0, 40 + (f // len(MONTHS)) // 40 * 0.5
        cols = {name: pa.nulls(k, schema.field(name).type) for name in schema.names}
        cols.update(chip_id=pa.array([f"{tile}_224px_r{i // 49:03d}_c{i % 49:03d}" for i in range(k)]),
                    model=pa.array(["fomo"] * k), tile=pa.array([tile] * k),
                    month=pa.array([dt.date.fromisoformat(month + "-01")] * k, pa.date32()),
                    center_lon=pa.array(lon0 + rng.random(k)), center_lat=pa.array(lat0 + rng.random(k) * 0.5),
                    valid_fraction=pa.array(np.ones(k, np.float32)),
                    embedding=pa.FixedSizeListArray.from_arrays(pa.array(vec[s:s + k].ravel()), dim))
        table = pa.table(cols, schema=schema).replace_schema_metadata({b"rs_embed_assets": json.dumps(
            {"model": "fomo", "tile": tile, "month": month, "rows": k}).encode()})
        path = storage.vectors_path("fomo", tile, month)
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path, compression="zstd")


def exact_top(unit: np.ndarray, q: np.ndarray, k: int, mask: np.ndarray) -> tuple[set[int], np.ndarray, float]:
    sims = unit @ q
    sims[~mask] = -np.inf
    top = np.argpartition(-sims, k)[:k]
    return set(top.tolist()), sims, float(sims[top].min())


def run_dataset(name: str, vec: np.ndarray, args, rng: np.random.Generator, tmp: Path) -> dict:
    storage = Storage(tmp / name)
    t = time.perf_counter()
    write_partitions(storage, vec, rng)
    write_s = time.perf_counter() - t
    del vec
    result: dict = {"dataset": name, "vectors": args.n, "dim": 768, "write_parquet_s": round(write_s, 1)}
    rows, unit = search.read_vectors(search._vectors_files(storage, "fomo"), unit=True)
    months = rows["month"].cast(pa.int32()).to_numpy()
    lon, lat = rows["center_lon"].to_numpy(), rows["center_lat"].to_numpy()
    del rows
    queries = rng.choice(len(unit), args.queries, replace=False)
    for kind in ("float32", "int8"):
        rec = search.build_index(storage, "fomo", storage_type=kind, force=True, nprobe=args.nprobe)
        idx = search.open_index(storage, "fomo")
        r = {"build_s": rec["seconds"], "read_parquet_s": rec["read_seconds"], "ivf_train_add_s": rec["ivf_seconds"],
             "nlist": rec["nlist"], "nprobe": args.nprobe,
             "index_bytes_per_vector": round(sum(p.stat().st_size for p in (storage.root / rec["version"]).iterdir())
                                             / args.n, 1)}
        for label, months_f, bbox in (("all", None, None), ("one_month", ["2024-07"], None),
                                      ("month_and_area", ["2024-07"], (-10.0, 40.0, 10.0, 45.0))):
            lat_ms, recalls, tol = [], [], []
            for qi in queries:
                chip, month = str(idx.chip_id[qi]), dt.date(1970, 1, 1) + dt.timedelta(days=int(idx.month[qi]))
                idx.similar(chip, month, 10, months=months_f, bbox=bbox)  # warm
                t = time.perf_counter()
                hits = idx.similar(chip, month, 10, months=months_f, bbox=bbox)
                lat_ms.append(1000 * (time.perf_counter() - t))
                mask = np.ones(len(unit), bool)
                if months_f:
                    mask &= months == (dt.date(2024, 7, 1) - dt.date(1970, 1, 1)).days
                if bbox:
                    mask &= (lon >= bbox[0]) & (lon <= bbox[2]) & (lat >= bbox[1]) & (lat <= bbox[3])
                mask[qi] = False
                truth, sims, tenth = exact_top(unit, unit[qi], 10, mask)
                got = {idx._key[(h.chip_id, (h.month - dt.date(1970, 1, 1)).days)] for h in hits}
                recalls.append(len(got & truth) / 10)
                # hits as similar as the exact 10th within 1e-4 (near-ties the int8 error may reorder)
                tol.append(sum(sims[i] >= tenth - 1e-4 for i in got) / 10)
            r[label] = {"median_ms": round(statistics.median(lat_ms), 2),
                        "p95_ms": round(float(np.percentile(lat_ms, 95)), 2),
                        "recall_at_10": round(float(np.mean(recalls)), 4),
                        "recall_at_10_within_1e-4": round(float(np.mean(tol)), 4),
                        "selected_rows": int(idx.mask(months=months_f, bbox=bbox).sum()) if months_f else len(unit)}
        if kind == "int8":
            err = []
            for s in range(0, len(unit), 200_000):
                u = unit[s:s + 200_000]
                d = search.dequantise_int8(*search.quantise_int8(u))
                err.append(float(np.max(1 - np.sum(u * d, 1) / np.linalg.norm(d, axis=1))))
            r["max_cosine_error"] = float(f"{max(err):.3g}")
        result[kind] = r
        print(json.dumps({name: {kind: r}}), flush=True)
    return result


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--datasets", default="adapter,random")
    p.add_argument("--queries", type=int, default=100)
    p.add_argument("--nprobe", type=int, default=16)
    p.add_argument("--fomo-depth", type=int, default=4, help="FoMo blocks (12 = published size; fewer = faster)")
    p.add_argument("--tiles", type=int, default=4)
    p.add_argument("--months", type=int, default=4)
    p.add_argument("--base-cache", help="keep the adapter base vectors in this .npy file between runs")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "search_cpu.json"))
    a = p.parse_args()
    import faiss

    rng = np.random.default_rng(0)
    out = {"benchmark": "bench_search", "machine": f"{os.cpu_count()} vCPU {platform.machine()}, no GPU",
           "load_average_at_start": [round(x, 1) for x in os.getloadavg()], "faiss": faiss.__version__,
           "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "results": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in a.datasets.split(","):
            if name == "adapter":
                t = time.perf_counter()
                cache = Path(a.base_cache) if a.base_cache else None
                if cache is not None and cache.exists():
                    base = np.load(cache)
                else:
                    base = adapter_vectors(tmp / "embed", a.fomo_depth, a.tiles, a.months)
                    if cache is not None:
                        np.save(cache, base)
                out["adapter_base"] = {"model": "fomo", "fomo_depth": a.fomo_depth, "weights": "random-init (seed 0)",
                                       "base_vectors": len(base), "seconds": round(time.perf_counter() - t, 1)}
                vec = expand(base, a.n, rng)
            else:
                vec = rng.standard_normal((a.n, 768), dtype=np.float32)
            out["results"].append(run_dataset(name, vec, a, rng, tmp))
            del vec
    out["load_average_at_end"] = [round(x, 1) for x in os.getloadavg()]
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
