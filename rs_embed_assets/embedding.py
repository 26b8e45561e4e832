"""Embedding a tile-month: chips cut from composites → adapter → pooled vectors and a stitched grid.

Library code, called by the Dagster assets and usable on its own:

    result = embed_tile(adapter, [composite], tile=tile, month="2024-07", provenance={...})
    result.vectors   # pyarrow Table, one row per chip (GeoParquet-ready)
    result.grid      # xarray Dataset (feature, y, x), georeferenced on the tile's UTM grid

Chips are cut on a regular grid from the tile's upper-left corner at the model's chip size
(whole chips only). Chips without a single valid pixel are not embedded (their grid cells stay
NaN); pixels without a valid observation inside an embedded chip enter the model as 0, the fill
value rs-embed uses, and each row records the chip's ``valid_fraction`` so SQL can filter.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import struct
import time
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import xarray as xr

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported only where a model runs
    from adapters.base import Adapter

from .composite import crs_wkt, parse_month
from .grid import PIXEL_SIZE_M, Tile, chip_windows, utm_to_lonlat



def package_version() -> str:
    """The installed distribution's version (pyproject.toml is the one place it is written)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("rs-embed-assets")
    except PackageNotFoundError:  # running from a source tree without installing
        return "0+unknown"


class EmbeddingError(ValueError):
    pass


@dataclass
class TileEmbeddings:
    vectors: pa.Table
    grid: xr.Dataset
    stats: dict[str, Any] = field(default_factory=dict)


@lru_cache(maxsize=32)
def code_version(model_id: str) -> str:
    """Package version + a hash of the code that turns composites into this model's embeddings."""
    import adapters

    h = hashlib.sha256()  # read as text: hashing a model's code must not import it (and torch)
    for text in (adapters.module_source(model_id), adapters.module_source("adapters.base"),
                 adapters.module_source("adapters.specs"), inspect.getsource(inspect.getmodule(embed_tile))):
        h.update(text.encode())
    return f"{package_version()}+{h.hexdigest()[:12]}"


def polygon_wkb(coords: Sequence[tuple[float, float]]) -> bytes:
    """A little-endian WKB Polygon with one closed ring."""
    ring = list(coords)
    if ring[0] != ring[-1]:
        ring.append(ring[0])
    out = struct.pack("<BII", 1, 3, 1) + struct.pack("<I", len(ring))
    return out + b"".join(struct.pack("<dd", float(x), float(y)) for x, y in ring)


def _frames_array(frames: Sequence[xr.Dataset], bands: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(T, C, H, W) raw values of the model's bands in the composite's dtype, and (T, H, W) validity.

    Kept in the stored dtype (uint16 for S2: half the memory of float32 for a whole tile); chips
    are converted to float32 batch by batch.
    """
    data, valid = [], []
    for ds in frames:
        missing = [b for b in bands if b not in ds["band"].values.tolist()]
        if missing:
            raise EmbeddingError(f"composite {ds.attrs.get('tile')}/{ds.attrs.get('month')} lacks bands {missing}; "
                                 f"it has {ds['band'].values.tolist()}")
        arr = ds["data"].sel(band=list(bands)).values
        if np.issubdtype(arr.dtype, np.floating):  # S1: pixels without observations are NaN → fill 0
            arr = np.nan_to_num(arr.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
        data.append(arr)
        valid.append(ds["valid_count"].values > 0)
    return np.stack(data), np.stack(valid)


def embed_tile(adapter, frames: Sequence[xr.Dataset], *, tile: Tile, month: str, provenance: dict[str, Any],
               pooling: str = "mean", batch_size: int | None = None, min_valid_fraction: float = 0.0,
               log=None) -> TileEmbeddings:
    """Embed every chip of one tile-month with ``adapter``.

    ``frames`` holds one composite for single-frame models and ``spec.frames`` composites (oldest
    first) for temporal models such as AgriFM.
    """
    spec = adapter.spec
    month = parse_month(month)
    n_frames = adapter.frames
    if len(frames) != n_frames:
        raise EmbeddingError(f"{spec.model_id} needs {n_frames} composite frame(s), got {len(frames)}")
    raw, valid = _frames_array(frames, spec.bands)  # (T, C, H, W), (T, H, W)
    T, C, H, W = raw.shape
    if (H, W) != (tile.height, tile.width):
        raise EmbeddingError(f"composite is {H}×{W} px but tile {tile.key} is {tile.height}×{tile.width}")
    cs = spec.chip_size
    windows = chip_windows(H, W, cs)
    if not windows:
        raise EmbeddingError(f"tile {tile.key} ({H}×{W} px) is smaller than one {spec.model_id} chip ({cs} px); "
                             "use a coarser sub-tiling (smaller k) for this model")
    rows, cols = H // cs, W // cs
    temporal = spec.frames > 1
    tile_ctx: dict[str, Any] = {}
    from adapters.base import Adapter

    if type(adapter).tile_context is not Adapter.tile_context:  # only then pay for a masked copy of the tile
        # tile-level statistics see invalid pixels as NaN, so they can leave them out
        masked = np.where(valid[:, None], raw.astype(np.float32), np.float32(np.nan))
        tile_ctx = adapter.tile_context(masked if temporal else masked[0], bands=spec.bands)
        del masked
    vf = np.array([valid[:, y:y + cs, x:x + cs].mean() for _, _, y, x in windows], dtype=np.float32)
    keep = [i for i, f in enumerate(vf) if f > 0 and f >= min_valid_fraction]
    bs = batch_size or adapter.batch_size()

    g = spec.grid_size
    grid = np.full((spec.embed_dim, rows * g, cols * g), np.nan, dtype=np.float32)
    pooled = np.zeros((len(keep), spec.embed_dim), dtype=np.float32)
    src = raw if temporal else raw[0]
    # every chip has the same shape, so the derived forward arguments are the same for all batches
    fwd_kwargs = adapter.forward_kwargs((1, *src.shape[:-2], cs, cs), pixel_size_m=PIXEL_SIZE_M)
    t0 = time.perf_counter()
    for start in range(0, len(keep), bs):
        idx = keep[start:start + bs]
        # (B, T, C, cs, cs) for temporal models, (B, C, cs, cs) otherwise
        batch = np.stack([src[..., y:y + cs, x:x + cs] for _, _, y, x in (windows[i] for i in idx)]).astype(np.float32)
        out = adapter.embed_raw(batch, bands=spec.bands, pixel_size_m=PIXEL_SIZE_M, tile_context=tile_ctx,
                                pooling=pooling)
        p, gr = out.numpy()
        if gr.shape[1:] != (spec.embed_dim, g, g):
            raise EmbeddingError(f"{spec.model_id} returned grids shaped {gr.shape[1:]}, spec says "
                                 f"{(spec.embed_dim, g, g)}")
        pooled[start:start + len(idx)] = p
        for j, i in enumerate(idx):
            r, c, _, _ = windows[i]
            grid[:, r * g:(r + 1) * g, c * g:(c + 1) * g] = gr[j]
        if log is not None:
            log(f"{spec.model_id} {tile.key} {month}: {min(start + bs, len(keep))}/{len(keep)} chips")
    seconds = time.perf_counter() - t0
    if not np.isfinite(pooled).all():
        raise EmbeddingError(f"{spec.model_id} produced non-finite vectors for {tile.key} {month}; "
                             "check the checkpoint and the input composite")

    vectors = _vectors_table(adapter, tile, month, windows, keep, vf, pooled, provenance, pooling)
    grid_ds = _grid_dataset(adapter, tile, month, grid, provenance, rows, cols)
    stats = {"chips_total": len(windows), "chips_embedded": len(keep), "chips_skipped": len(windows) - len(keep),
             "seconds": round(seconds, 3), "chips_per_s": round(len(keep) / seconds, 3) if seconds > 0 else None,
             "batch_size": bs, "tile_context": tile_ctx, "forward_kwargs": fwd_kwargs,
             "mean_valid_fraction": float(vf.mean())}
    return TileEmbeddings(vectors=vectors, grid=grid_ds, stats=stats)


def vectors_schema(dim: int) -> pa.Schema:
    return pa.schema([
        ("chip_id", pa.string()), ("model", pa.string()), ("tile", pa.string()), ("mgrs_tile", pa.string()),
        ("month", pa.date32()), ("chip_row", pa.int32()), ("chip_col", pa.int32()), ("chip_size_px", pa.int32()),
        ("utm_epsg", pa.int32()), ("utm_minx", pa.float64()), ("utm_miny", pa.float64()),
        ("utm_maxx", pa.float64()), ("utm_maxy", pa.float64()), ("center_lon", pa.float64()),
        ("center_lat", pa.float64()), ("geometry", pa.binary()), ("valid_fraction", pa.float32()),
        ("embedding", pa.list_(pa.float32(), dim)), ("pooling", pa.string()),
        ("checkpoint_sha256", pa.string()), ("checkpoint_random_init", pa.bool_()),
        ("composite_version", pa.string()), ("preprocessing_hash", pa.string()), ("code_version", pa.string()),
        ("provider", pa.string()), ("synthetic", pa.bool_()),
    ])


def _vectors_table(adapter, tile, month, windows, keep, vf, pooled, prov, pooling) -> pa.Table:
    import datetime as dt

    spec = adapter.spec
    cs = spec.chip_size
    n = len(keep)
    minx = np.array([tile.x0 + windows[i][3] * PIXEL_SIZE_M for i in keep])
    maxy = np.array([tile.y0 - windows[i][2] * PIXEL_SIZE_M for i in keep])
    maxx, miny = minx + cs * PIXEL_SIZE_M, maxy - cs * PIXEL_SIZE_M
    cx, cy = (minx + maxx) / 2, (miny + maxy) / 2
    clon, clat = utm_to_lonlat(tile.epsg, cx, cy) if n else (np.zeros(0), np.zeros(0))
    # chip footprints in CRS84: all corners projected in one call, rings closed (SW, SE, NE, NW, SW)
    xs = np.stack([minx, maxx, maxx, minx, minx], axis=1)
    ys = np.stack([miny, miny, maxy, maxy, miny], axis=1)
    lon, lat = utm_to_lonlat(tile.epsg, xs.ravel(), ys.ravel()) if n else (np.zeros(0), np.zeros(0))
    lon, lat = lon.reshape(n, 5), lat.reshape(n, 5)
    geoms = [polygon_wkb(list(zip(lon[k].tolist(), lat[k].tolist()))) for k in range(n)]
    bbox = [lon.min(), lat.min(), lon.max(), lat.max()] if n else []
    y, m = map(int, month.split("-"))
    mdate = dt.date(y, m, 1)
    schema = vectors_schema(spec.embed_dim)
    cols = {
        "chip_id": [f"{tile.key}_{cs}px_r{windows[i][0]:03d}_c{windows[i][1]:03d}" for i in keep],
        "model": [spec.model_id] * n, "tile": [tile.key] * n, "mgrs_tile": [tile.mgrs] * n,
        "month": [mdate] * n, "chip_row": [windows[i][0] for i in keep], "chip_col": [windows[i][1] for i in keep],
        "chip_size_px": [cs] * n, "utm_epsg": [tile.epsg] * n, "utm_minx": minx, "utm_miny": miny,
        "utm_maxx": maxx, "utm_maxy": maxy, "center_lon": clon, "center_lat": clat, "geometry": geoms,
        "valid_fraction": vf[keep] if n else np.zeros(0, np.float32),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(pooled.reshape(-1), pa.float32()), spec.embed_dim),
        "pooling": [pooling] * n,
        "checkpoint_sha256": [prov["checkpoint_sha256"]] * n,
        "checkpoint_random_init": [bool(prov.get("checkpoint_random_init", False))] * n,
        "composite_version": [prov["composite_version"]] * n,
        "preprocessing_hash": [prov["preprocessing_hash"]] * n, "code_version": [prov["code_version"]] * n,
        "provider": [prov.get("provider", "")] * n, "synthetic": [bool(prov.get("synthetic", False))] * n,
    }
    table = pa.table({name: pa.array(cols[name], type=schema.field(name).type)
                      if not isinstance(cols[name], pa.Array) else cols[name] for name in schema.names}, schema=schema)
    geo = {"version": "1.1.0", "primary_column": "geometry",
           "columns": {"geometry": {"encoding": "WKB", "geometry_types": ["Polygon"],
                                    **({"bbox": [float(v) for v in bbox]} if n else {})}}}
    meta = {b"geo": json.dumps(geo).encode(),
            b"rs_embed_assets": json.dumps({"model": spec.model_id, "tile": tile.key, "month": month,
                                            **{k: v for k, v in prov.items() if isinstance(v, (str, int, float, bool))}},
                                           sort_keys=True).encode()}
    return table.replace_schema_metadata(meta)


def _grid_dataset(adapter, tile, month, grid, prov, rows, cols) -> xr.Dataset:
    spec = adapter.spec
    cell = spec.grid_resolution_m
    ny, nx = grid.shape[1:]
    x = tile.x0 + (np.arange(nx) + 0.5) * cell
    y = tile.y0 - (np.arange(ny) + 0.5) * cell
    transform = (tile.x0, cell, 0.0, tile.y0, 0.0, -cell)
    ds = xr.Dataset(
        {"embedding": (("feature", "y", "x"), grid, {"grid_mapping": "spatial_ref",
                                                    "long_name": f"{spec.model_id} embedding grid"}),
         "spatial_ref": ((), np.int32(0), {"crs_wkt": crs_wkt(tile.epsg), "spatial_ref": crs_wkt(tile.epsg),
                                          "GeoTransform": " ".join(repr(v) for v in transform), "epsg": tile.epsg})},
        coords={"feature": np.arange(grid.shape[0], dtype=np.int32), "y": y, "x": x},
        attrs={"model": spec.model_id, "tile": tile.key, "month": month, "crs": tile.crs,
               "transform": list(transform), "cell_size_m": cell, "chip_size_px": spec.chip_size,
               "chips_rows": rows, "chips_cols": cols,
               "proj:code": tile.crs, "spatial:transform": [cell, 0.0, tile.x0, 0.0, -cell, tile.y0],
               "spatial:dimensions": ["y", "x"],
               **{k: v for k, v in prov.items() if isinstance(v, (str, int, float, bool))}},
    )
    ds["x"].attrs.update(units="m", standard_name="projection_x_coordinate")
    ds["y"].attrs.update(units="m", standard_name="projection_y_coordinate")
    return ds
