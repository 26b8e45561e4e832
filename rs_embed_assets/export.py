"""Cloud-Optimized GeoTIFFs of committed partitions, for tools that work in GeoTIFF (QGIS, TorchGeo, TerraTorch).

    export_composite(storage, "s2", tile, "2024-07", "s2.tif")       # 12 bands B1…B12, uint16, nodata 0
    export_grid(storage, "fomo", tile, "2024-07", "fomo.tif")        # D bands f000…, float32, nodata NaN
    export_change(storage, "fomo", tile, "2024-06", "2024-07", "chg.tif")  # 1 band, cosine distance

Every file is written by GDAL's COG driver (through rasterio): tiled, DEFLATE-compressed with a
predictor, internal overviews, the tile's CRS and transform, one description per band (band or
feature name), a nodata value, and tags naming the product and its provenance. Inputs are read
only through the Storage API (``open_composite``, ``open_grid``), so only committed partitions
are exported. Writes go to a temporary name that is renamed into place.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import xarray as xr

from .composite import parse_month


class ExportError(ValueError):
    pass


COG_MAX_BLOCK = 512


def _blocksize(height: int, width: int) -> int:
    """The COG tile size: 512 px, down to 128 (GDAL's minimum) so a small raster still gets an overview."""
    size = COG_MAX_BLOCK
    while size > 128 and size >= max(height, width):
        size //= 2
    return size


RowReader = Callable[[int, int], np.ndarray]


def write_cog(dst: str | os.PathLike, *, shape: tuple[int, int, int], dtype: str, read_rows: RowReader, crs: str,
              transform: Sequence[float], band_names: Sequence[str], nodata: float | int | None,
              tags: dict[str, Any] | None = None, resampling: str = "average", rows_per_read: int = 512) -> Path:
    """Write a (bands, rows, cols) raster as a COG, streaming ``read_rows(y0, y1)`` row bands.

    The rows go to a tiled scratch GeoTIFF first (bounded memory), which GDAL's COG driver then
    copies with overviews; ``transform`` is GDAL-ordered (x0, dx, 0, y0, 0, dy).
    """
    import rasterio
    import rasterio.shutil
    from affine import Affine

    count, height, width = shape
    if len(band_names) != count:
        raise ExportError(f"{len(band_names)} band names for {count} bands")
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex[:8]
    scratch = dst.with_name(f".{dst.name}.{token}.scratch.tif")
    tmp = dst.with_name(f".{dst.name}.{token}.tmp.tif")
    try:
        with rasterio.open(scratch, "w", driver="GTiff", width=width, height=height, count=count, dtype=dtype,
                           crs=crs, transform=Affine.from_gdal(*transform), nodata=nodata, tiled=True,
                           blockxsize=256, blockysize=256, bigtiff="IF_SAFER") as out:
            for y0 in range(0, height, rows_per_read):
                y1 = min(height, y0 + rows_per_read)
                block = np.asarray(read_rows(y0, y1), dtype=dtype)
                out.write(block, window=((y0, y1), (0, width)))
            for i, name in enumerate(band_names, start=1):
                out.set_band_description(i, str(name))
            if tags:
                out.update_tags(**{k: str(v) for k, v in tags.items()})
        block = _blocksize(height, width)
        rasterio.shutil.copy(scratch, tmp, driver="COG", COMPRESS="DEFLATE", PREDICTOR="YES", BLOCKSIZE=block,
                             OVERVIEWS="AUTO", OVERVIEW_RESAMPLING=resampling.upper(), BIGTIFF="IF_SAFER")
        os.replace(tmp, dst)
    finally:
        for p in (scratch, tmp):
            if p.exists():
                p.unlink()
    return dst


def _georef(attrs: dict[str, Any], what: str) -> tuple[str, list[float]]:
    wkt = attrs.get("crs_wkt") or attrs.get("spatial_ref")
    gt = attrs.get("GeoTransform")
    if not wkt or not gt:
        raise ExportError(f"{what} has no CRS/GeoTransform in its spatial_ref; re-materialise the partition")
    return wkt, [float(v) for v in str(gt).split()]


def _provenance_tags(attrs: dict[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    return {k: attrs[k] for k in keys if k in attrs and attrs[k] not in (None, "")}


def export_composite(storage, sensor: str, tile: str, month: str, dst: str | os.PathLike) -> Path:
    """The composite's ``data`` bands as a COG (raw provider values in the stored dtype, verified reads)."""
    import zarr

    from .composite import sensor_spec

    month = parse_month(month)
    spec = sensor_spec(sensor)
    reader = storage.open_composite(sensor, tile, month)  # StorageError names what to materialise
    group = zarr.open_group(str(reader.path), mode="r", zarr_format=2)
    wkt, gt = _georef(dict(group["spatial_ref"].attrs), f"composite store {reader.path}")
    record = reader.record
    tags = {"product": f"composites/{sensor}", "tile": tile, "month": month,
            **_provenance_tags(record, ("provider", "data_version", "status", "valid_fraction", "synthetic"))}
    return write_cog(dst, shape=tuple(reader.shape), dtype=str(reader.dtype), read_rows=lambda y0, y1: reader.rows(y0, y1)[0],
                     crs=wkt, transform=gt, band_names=list(reader.bands), nodata=spec.nodata, tags=tags,
                     rows_per_read=reader.block_rows)


def _open_grid(storage, model: str, tile: str, month: str) -> xr.Dataset:
    ds = storage.open_grid(model, tile, month)  # StorageError when the partition is not materialised
    if ds is None:
        raise ExportError(f"embeddings/{model} {tile} {month} has no grid (no chip of the model on that tile)")
    return ds


def export_grid(storage, model: str, tile: str, month: str, dst: str | os.PathLike) -> Path:
    """The embedding grid as a D-band float32 COG (band i = feature i; cells without a chip are NaN)."""
    month = parse_month(month)
    ds = _open_grid(storage, model, tile, month)
    wkt, gt = _georef(ds["spatial_ref"].attrs, f"{model} grid {tile} {month}")
    emb = ds["embedding"]
    manifest = storage.read_manifest(model, tile, month) or {}
    tags = {"product": f"embeddings/{model}", "tile": tile, "month": month,
            **_provenance_tags({**ds.attrs, **manifest}, ("checkpoint_sha256", "composite_version",
                                                           "preprocessing_hash", "code_version", "grid_cell_m"))}
    return write_cog(dst, shape=emb.shape, dtype="float32", read_rows=lambda y0, y1: emb[:, y0:y1].values,
                     crs=wkt, transform=gt, band_names=feature_names(emb.shape[0]), nodata=float("nan"),
                     tags=tags)


def feature_names(dim: int) -> list[str]:
    width = max(3, len(str(dim - 1)))
    return [f"f{i:0{width}d}" for i in range(dim)]


def cosine_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-cell cosine distance 1 − a·b/(|a||b|) of two (D, y, x) grids; NaN where either cell is empty."""
    a = a.astype(np.float64, copy=False)
    b = b.astype(np.float64, copy=False)
    dot = np.einsum("dyx,dyx->yx", a, b)
    norm = np.sqrt(np.einsum("dyx,dyx->yx", a, a) * np.einsum("dyx,dyx->yx", b, b))
    with np.errstate(invalid="ignore", divide="ignore"):
        dist = 1.0 - dot / norm
    dist[~np.isfinite(dist)] = np.nan
    return dist.astype(np.float32)


def change_map(storage, model: str, tile: str, month_a: str, month_b: str) -> xr.DataArray:
    """Cosine distance between two months' grids of one tile, on the grid's cells (y, x)."""
    month_a, month_b = parse_month(month_a), parse_month(month_b)
    a, b = _open_grid(storage, model, tile, month_a), _open_grid(storage, model, tile, month_b)
    ga = _georef(a["spatial_ref"].attrs, f"{model} grid {tile} {month_a}")
    gb = _georef(b["spatial_ref"].attrs, f"{model} grid {tile} {month_b}")
    if a["embedding"].shape != b["embedding"].shape or ga != gb:
        raise ExportError(f"{model} grids of {tile} for {month_a} and {month_b} are not on the same cells "
                          f"({a['embedding'].shape} vs {b['embedding'].shape}); re-materialise both months")
    ea, eb = a["embedding"], b["embedding"]
    dist = np.empty(ea.shape[1:], np.float32)
    for y0 in range(0, dist.shape[0], 64):  # row bands: a whole-tile grid never sits in memory twice
        dist[y0:y0 + 64] = cosine_distance(ea[:, y0:y0 + 64].values, eb[:, y0:y0 + 64].values)
    return xr.DataArray(dist, dims=("y", "x"), coords={"y": a["y"].values, "x": a["x"].values},
                        name="cosine_distance",
                        attrs={"model": model, "tile": tile, "month_a": month_a, "month_b": month_b,
                               "crs_wkt": ga[0], "GeoTransform": " ".join(repr(v) for v in ga[1])})


def export_change(storage, model: str, tile: str, month_a: str, month_b: str, dst: str | os.PathLike) -> Path:
    """A one-band COG of the per-cell cosine distance between ``month_a`` and ``month_b``."""
    da = change_map(storage, model, tile, month_a, month_b)
    wkt, gt = _georef(da.attrs, "change map")
    ma, mb = da.attrs["month_a"], da.attrs["month_b"]
    tags = {"product": f"embeddings/{model}/change", "tile": tile, "month_a": ma, "month_b": mb,
            "measure": "cosine distance 1 - a.b/(|a||b|)"}
    data = da.values[None]
    return write_cog(dst, shape=data.shape, dtype="float32", read_rows=lambda y0, y1: data[:, y0:y1], crs=wkt,
                     transform=gt, band_names=[f"cosine_distance {ma} to {mb}"], nodata=float("nan"), tags=tags)
