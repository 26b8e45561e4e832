"""DuckDB catalog query latency: `similar_chips` (brute-force cosine) over N pooled vectors in Parquet.

Writes N random 768-d vectors as the embedding asset would (one Parquet file per tile-month),
builds catalog.duckdb with rs_embed_assets.catalog.build_catalog and times the macros.

    .venv/bin/python benchmarks/bench_catalog.py --sizes 10000,100000
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rs_embed_assets.catalog import build_catalog, connect_readonly
from rs_embed_assets.embedding import vectors_schema
from rs_embed_assets.storage import Storage

DIM = 768
ROWS_PER_FILE = 2401  # a whole S2 tile at 224 px chips


def write_vectors(storage: Storage, n: int, rng: np.random.Generator) -> None:
    schema = vectors_schema(DIM)
    written, f = 0, 0
    while written < n:
        k = min(ROWS_PER_FILE, n - written)
        vec = rng.standard_normal((k, DIM)).astype(np.float32)
        cols = {name: pa.nulls(k, schema.field(name).type) for name in schema.names}
        cols.update(chip_id=pa.array([f"T{f:04d}_224px_r{i // 49:03d}_c{i % 49:03d}" for i in range(k)]),
                    model=pa.array(["fomo"] * k), tile=pa.array([f"T{f:04d}"] * k),
                    month=pa.array([datetime.date(2024, 7, 1)] * k, pa.date32()),
                    embedding=pa.FixedSizeListArray.from_arrays(pa.array(vec.ravel()), DIM),
                    valid_fraction=pa.array(np.ones(k, np.float32)))
        manifest = {"model": "fomo", "tile": f"T{f:04d}", "month": "2024-07", "rows": k}  # the committed footer
        table = pa.table(cols, schema=schema).replace_schema_metadata({b"rs_embed_assets": json.dumps(manifest).encode()})
        path = storage.vectors_path("fomo", f"T{f:04d}", "2024-07")
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path, compression="zstd")
        written += k
        f += 1


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="10000,100000")
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    results = []
    for n in (int(s) for s in a.sizes.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            storage = Storage(tmp)
            write_vectors(storage, n, np.random.default_rng(0))
            t = time.perf_counter()
            build_catalog(storage, models=["fomo"])
            build_s = time.perf_counter() - t
            con = connect_readonly(storage.catalog_path)
            times = []
            for _ in range(a.repeats):
                t = time.perf_counter()
                rows = con.execute("SELECT * FROM similar_chips('fomo', 'T0000_224px_r000_c000', '2024-07-01', 10)"
                                   ).fetchall()
                times.append(time.perf_counter() - t)
            assert len(rows) == 10
            con.close()
        results.append({"vectors": n, "build_catalog_s": round(build_s, 3), "similar_chips_s_best": round(min(times), 3),
                        "similar_chips_s_all": [round(x, 3) for x in times]})
        print(results[-1], flush=True)
    out = Path(__file__).parent / "results" / "catalog_cpu.json"
    out.write_text(json.dumps({"machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                                           "duckdb": duckdb.__version__}, "dim": DIM, "results": results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
