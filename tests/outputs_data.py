"""A small committed data root for the output tests, made through the library as the assets make it.

Two 305 px sub-tiles of 31UFU × two months: S2 and S1 composites from the offline sample provider,
and FoMo embeddings with random-init weights of a 1-block network (the RS_EMBED_FOMO_DEPTH knob: the
same code paths, seconds on a CPU). Built once per test session; tests must not change it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

TILES = ("31UFU-k36-r21-c12", "31UFU-k36-r21-c13")
MONTHS = ("2024-06", "2024-07")
MODEL = "fomo"

_CACHE: dict[str, Path] = {}


def materialise(root: Path) -> Path:
    import adapters
    from rs_embed_assets.materialize import EmbeddingSettings, materialize_checkpoint, materialize_composite, \
        materialize_embeddings
    from rs_embed_assets.providers import create_provider
    from rs_embed_assets.storage import Storage

    storage = Storage(root)
    provider = create_provider("sample")
    for tile in TILES:
        for month in MONTHS:
            for sensor in ("s2", "s1"):
                materialize_composite(storage, provider, sensor, tile, month)
    record = materialize_checkpoint(storage, MODEL, allow_random_init=True, warn=lambda msg: None)
    adapter = adapters.get_adapter_class(MODEL).from_checkpoint(record["path"])
    for tile in TILES:
        for month in MONTHS:
            materialize_embeddings(storage, adapter, tile, month, record, EmbeddingSettings())
    return root


def data_root(tmp_path_factory) -> Path:
    """The session's committed data root (made on first use)."""
    if "root" not in _CACHE:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("RS_EMBED_FOMO_DEPTH", "1")
            mp.setenv("RS_EMBED_FOMO_AUTO_DOWNLOAD", "0")
            for name in ("RS_EMBED_FOMO_CKPT", "RS_EMBED_FOMO_CKPT_URL"):
                mp.delenv(name, raising=False)
            _CACHE["root"] = materialise(tmp_path_factory.mktemp("outputs") / "data")
    return _CACHE["root"]
