"""rs-embed-assets: monthly composites → remote-sensing foundation-model embeddings → Parquet/zarr/DuckDB/STAC.

``rs_embed_assets.open_grids(model)`` is the lazy xarray view over a model's grids (see ``grids.py``);
it is imported on first use, so ``import rs_embed_assets`` stays cheap.
"""


def __getattr__(name: str):
    if name == "open_grids":
        from .grids import open_grids

        return open_grids
    raise AttributeError(f"module 'rs_embed_assets' has no attribute {name!r}")
