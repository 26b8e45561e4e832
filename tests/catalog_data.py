"""A small real materialisation for catalog tests: 2 sub-tiles × 2 months of FoMo (2-layer network,
deterministic random weights) on the sample provider, made by the library functions the assets call."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

TILES = ("31UFU-k36-r21-c12", "31UFU-k36-r21-c13")
MONTHS = ("2024-06", "2024-07")
# on the 31UFU lattice sub-tile c12 owns 4 × 4 FoMo chips and c13 owns 4 × 5
ROWS_PER_TILE = {TILES[0]: 16, TILES[1]: 20}
FOMO_ROWS = sum(ROWS_PER_TILE.values()) * len(MONTHS)  # 72
MODELS = ["fomo", "terrafm_b"]  # terrafm_b is enabled but never materialised: its view must still exist

ENV = {"RS_EMBED_FOMO_DEPTH": "2", "RS_EMBED_FOMO_AUTO_DOWNLOAD": "0", "RS_EMBED_ASSETS_MODELS": ",".join(MODELS)}


def materialise(root: Path) -> Path:
    import adapters
    from rs_embed_assets.materialize import (EmbeddingSettings, materialize_checkpoint, materialize_composite,
                                             materialize_embeddings)
    from rs_embed_assets.providers import create_provider
    from rs_embed_assets.storage import Storage

    saved = {k: os.environ.get(k) for k in ENV}
    os.environ.update(ENV)
    try:
        storage = Storage(root)
        provider = create_provider("sample")
        record = materialize_checkpoint(storage, "fomo", allow_random_init=True, warn=lambda m: None)
        adapter = adapters.get_adapter_class("fomo").from_checkpoint(record["path"], device="cpu")
        for tile in TILES:
            for month in MONTHS:
                materialize_composite(storage, provider, "s2", tile, month)
                materialize_embeddings(storage, adapter, tile, month, record, EmbeddingSettings(batch_size=16))
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return root


def copy_root(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def rewrite_vectors(path: Path, *, rows: int | None = None, manifest: dict | None = None) -> None:
    """Rewrite a committed vectors file in place (as a re-materialisation would): fewer rows and/or
    changed manifest fields, the footer otherwise kept."""
    import json

    import pyarrow.parquet as pq

    meta = dict(pq.read_metadata(path).metadata)
    table = pq.read_table(path)
    if rows is not None:
        table = table.slice(0, rows)
    if manifest:
        meta[b"rs_embed_assets"] = json.dumps({**json.loads(meta[b"rs_embed_assets"]), **manifest}).encode()
    pq.write_table(table.replace_schema_metadata(meta), path)


def shared_materialisation(tmp_path_factory) -> Path:
    """One materialisation per test session, shared by the catalog test modules (read-only: copy it)."""
    base = tmp_path_factory.getbasetemp() / "catalog-made"
    root = base / "data"
    if not (base / "done").exists():
        if base.exists():
            shutil.rmtree(base)
        materialise(root)
        (base / "done").touch()
    return root
