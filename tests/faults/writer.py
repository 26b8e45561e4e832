"""A writer process for the fault-injection suite: ``python -m tests.faults.writer ROOT KIND ...``.

Runs one write of the library (what an asset step does) so the suite can SIGKILL it at a fault
point (``RS_EMBED_ASSETS_FAULT``) and inspect what it left on disk.

    composite SENSOR TILE MONTH       materialize_composite with the sample provider
    embeddings MODEL TILE MONTH       materialize_embeddings with the recorded checkpoint
    checkpoint ID                     materialize_checkpoint (random demo weights allowed)
    catalog                           build_catalog
"""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    root, kind, *args = argv
    from rs_embed_assets.storage import Storage

    storage = Storage(root)
    if kind == "composite":
        from rs_embed_assets.materialize import materialize_composite
        from rs_embed_assets.providers import create_provider

        sensor, tile, month = args
        materialize_composite(storage, create_provider("sample"), sensor, tile, month)
    elif kind == "embeddings":
        import adapters
        from rs_embed_assets.materialize import EmbeddingSettings, materialize_embeddings, read_checkpoint_record

        model, tile, month = args
        record = read_checkpoint_record(storage, adapters.get_spec(model).checkpoint_id)
        adapter = adapters.get_adapter_class(model).from_checkpoint(record["path"], device="cpu")
        materialize_embeddings(storage, adapter, tile, month, record, EmbeddingSettings(batch_size=16))
    elif kind == "checkpoint":
        from rs_embed_assets.materialize import materialize_checkpoint

        materialize_checkpoint(storage, args[0], allow_random_init=True, allow_download=False, warn=lambda m: None)
    elif kind == "catalog":
        from rs_embed_assets.catalog import build_catalog

        build_catalog(storage)
    else:
        raise SystemExit(f"unknown kind {kind}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
