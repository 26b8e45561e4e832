"""Outputs: COG export of a large composite and grid, a change map, the STAC catalog, the lazy grid view.

    .venv/bin/python benchmarks/bench_outputs.py [--k 4] [--out benchmarks/results/outputs_cpu.json]

Materialises one S2 composite of a k×k sub-tile (k=4: 2 745 px, 12 bands) with the offline sample
provider and FoMo embeddings (random-init weights of the RS_EMBED_FOMO_DEPTH-block network, default 1:
the export cost does not depend on the weights) for two months, then times each output.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's packages, not an installed copy


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "outputs_cpu.json"))
    args = p.parse_args()
    os.environ.setdefault("RS_EMBED_FOMO_DEPTH", "1")
    os.environ["RS_EMBED_FOMO_AUTO_DOWNLOAD"] = "0"

    import adapters
    import rs_embed_assets
    from rs_embed_assets.export import export_change, export_composite, export_grid
    from rs_embed_assets.materialize import (EmbeddingSettings, materialize_checkpoint, materialize_composite,
                                             materialize_embeddings)
    from rs_embed_assets.providers import create_provider
    from rs_embed_assets.stac_catalog import write_stac
    from rs_embed_assets.storage import Storage

    tile = f"31UFU-k{args.k}-r01-c01"
    months = ["2024-06", "2024-07"]
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    res: dict = {"machine": f"{os.cpu_count()} vCPU, {mem_gb:.0f} GB, {platform.machine()}, no GPU", "tile": tile}
    with tempfile.TemporaryDirectory() as tmp:
        storage = Storage(Path(tmp) / "data")
        provider = create_provider("sample")
        t0 = time.perf_counter()
        for m in months:
            materialize_composite(storage, provider, "s2", tile, m)
        res["composites_s"] = round(time.perf_counter() - t0, 2)
        record = materialize_checkpoint(storage, "fomo", allow_random_init=True, warn=lambda s: None)
        adapter = adapters.get_adapter_class("fomo").from_checkpoint(record["path"])
        t0 = time.perf_counter()
        for m in months:
            materialize_embeddings(storage, adapter, tile, m, record, EmbeddingSettings())
        res["embeddings_s"] = round(time.perf_counter() - t0, 2)
        shape = storage.composite_record("s2", tile, months[1])["shape"]
        res["composite_shape"] = shape
        t0 = time.perf_counter()
        out = export_composite(storage, "s2", tile, months[1], Path(tmp) / "s2.tif")
        res["cog_composite_s"] = round(time.perf_counter() - t0, 2)
        res["cog_composite_mb"] = round(out.stat().st_size / 1e6, 1)
        res["composite_raw_mb"] = round(shape[0] * shape[1] * shape[2] * 2 / 1e6, 1)
        grid = storage.open_grid("fomo", tile, months[1])
        res["grid_shape"] = list(grid["embedding"].shape)
        t0 = time.perf_counter()
        out = export_grid(storage, "fomo", tile, months[1], Path(tmp) / "grid.tif")
        res["cog_grid_s"] = round(time.perf_counter() - t0, 2)
        res["cog_grid_mb"] = round(out.stat().st_size / 1e6, 1)
        t0 = time.perf_counter()
        export_change(storage, "fomo", tile, months[0], months[1], Path(tmp) / "change.tif")
        res["change_map_s"] = round(time.perf_counter() - t0, 2)
        t0 = time.perf_counter()
        grids = rs_embed_assets.open_grids("fomo", storage=storage)
        res["open_grids_s"] = round(time.perf_counter() - t0, 3)
        t0 = time.perf_counter()
        grids[tile]["embedding"].isel(month=1, y=slice(0, 4), x=slice(0, 4)).values
        res["open_grids_one_chip_read_s"] = round(time.perf_counter() - t0, 3)
        t0 = time.perf_counter()
        summary = write_stac(storage)
        res["write_stac_s"] = round(time.perf_counter() - t0, 2)
        res["stac_items"] = summary["items"]
    print(json.dumps(res, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
