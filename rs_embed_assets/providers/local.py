"""The ``local`` provider: your own composites from a folder.

Naming convention (``root`` = ``RS_EMBED_ASSETS_LOCAL_DIR`` or the resource option ``root``)::

    <root>/<sensor>/<tile>/<YYYY-MM>.tif     GeoTIFF
    <root>/<sensor>/<tile>/<YYYY-MM>.zarr    zarr (xarray dataset with a (band, y, x) variable)

``<sensor>`` is ``s2`` or ``s1``; ``<tile>`` is the tile key (``31UFU`` or a sub-tile key). A
sub-tile falls back to its parent MGRS tile's file and cuts its window from it.

Contents:

- bands in the sensor's order (S2: B1,B2,B3,B4,B5,B6,B7,B8,B8A,B9,B11,B12 as L2A DN 0..10000;
  S1: VV,VH linear power), optionally followed by one extra band holding the per-pixel count of
  valid observations; without it, a pixel is valid when no band equals the nodata value
  (GDAL_NODATA tag / ``nodata`` attribute; default 0 for S2, NaN for S1);
- on the tile's UTM grid at 10 m: GeoTIFF georeferencing (ModelPixelScale, ModelTiepoint and the
  EPSG code in the GeoKey directory) or zarr ``x``/``y`` pixel-centre coordinates plus an ``epsg``
  or ``crs`` attribute. The file may be larger than the tile; the tile window is cut from it.

A missing file is recorded as an empty composite (reason: the path looked for), so a backfill over
months you have not supplied completes with explicit gaps instead of failing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from ..composite import empty_composite, make_composite, parse_month, sensor_spec
from ..grid import PIXEL_SIZE_M, Tile
from .base import Provider, ProviderError

_TAG_PIXEL_SCALE = 33550
_TAG_TIEPOINT = 33922
_TAG_GEOKEYS = 34735
_TAG_NODATA = 42113
_KEY_PROJECTED_CRS = 3072


class LocalProvider(Provider):
    name = "local"

    def __init__(self, root: str = "imagery"):
        self.root = Path(root).expanduser()

    def describe(self) -> dict[str, Any]:
        return {"provider": self.name, "root": str(self.root)}

    def find(self, sensor: str, tile: Tile, month: str) -> Path | None:
        for key in dict.fromkeys([tile.key, tile.mgrs]):
            for ext in (".tif", ".tiff", ".zarr"):
                p = self.root / sensor / key / f"{month}{ext}"
                if p.exists():
                    return p
        return None

    def composite(self, sensor: str, tile: Tile, month: str) -> xr.Dataset:
        month = parse_month(month)
        spec = sensor_spec(sensor)
        path = self.find(sensor, tile, month)
        if path is None:
            expected = self.root / sensor / tile.key / f"{month}.tif"
            return empty_composite(sensor=sensor, tile=tile, month=month, provider=self.name,
                                   reason=f"no file at {expected} (or .zarr, or under {tile.mgrs}/)")
        if path.suffix == ".zarr":
            arr, epsg, x0, y0, res, nodata = _read_zarr(path)
        else:
            arr, epsg, x0, y0, res, nodata = _read_geotiff(path)
        nb = len(spec.bands)
        if arr.shape[0] not in (nb, nb + 1):
            raise ProviderError(f"{path} has {arr.shape[0]} bands; {sensor} needs {nb} ({', '.join(spec.bands)}) "
                                "optionally followed by a valid-count band")
        if epsg != tile.epsg:
            raise ProviderError(f"{path} is in EPSG:{epsg}, tile {tile.key} is EPSG:{tile.epsg}; reproject it to the "
                                "tile's UTM zone at 10 m")
        if abs(res - PIXEL_SIZE_M) > 1e-6:
            raise ProviderError(f"{path} has {res} m pixels; resample it to {PIXEL_SIZE_M:g} m on the tile grid")
        col = (tile.x0 - x0) / PIXEL_SIZE_M
        row = (y0 - tile.y0) / PIXEL_SIZE_M
        if abs(col - round(col)) > 1e-6 or abs(row - round(row)) > 1e-6:
            raise ProviderError(f"{path} is not aligned with the tile's 10 m grid (offset {col:.3f}, {row:.3f} px); "
                                "resample it onto the tile grid")
        r, c = int(round(row)), int(round(col))
        if r < 0 or c < 0 or r + tile.height > arr.shape[1] or c + tile.width > arr.shape[2]:
            raise ProviderError(f"{path} ({arr.shape[1]}×{arr.shape[2]} px) does not cover tile {tile.key} "
                                f"(needs rows {r}..{r + tile.height}, cols {c}..{c + tile.width})")
        win = arr[:, r:r + tile.height, c:c + tile.width]
        data = win[:nb].astype(np.float64)
        if win.shape[0] == nb + 1:
            valid = np.nan_to_num(win[nb], nan=0).astype(np.uint16)
        else:
            nd = spec.nodata if nodata is None else nodata
            bad = np.isnan(data).any(axis=0) if np.isnan(nd) else (data == nd).any(axis=0)
            valid = (~bad & np.isfinite(data).all(axis=0)).astype(np.uint16)
        if sensor == "s2":
            data = np.where(valid[None] > 0, np.clip(np.nan_to_num(data), 0, 65535), 0)
        else:
            data = np.where(valid[None] > 0, data, np.nan)
        status = "ok" if valid.any() else "empty"
        return make_composite(sensor=sensor, tile=tile, month=month, data=data, valid_count=valid,
                              provider=self.name, status=status,
                              provider_info={"file": str(path), "window": [r, c], "nodata": nodata})


def _read_geotiff(path: Path):
    import tifffile

    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        tags = page.tags
        try:
            scale = tags[_TAG_PIXEL_SCALE].value
            tie = tags[_TAG_TIEPOINT].value
            geokeys = tags[_TAG_GEOKEYS].value
        except KeyError:
            raise ProviderError(f"{path} has no GeoTIFF georeferencing (ModelPixelScale/ModelTiepoint/GeoKeys); "
                                "write it with GDAL/rasterio in the tile's UTM CRS") from None
        epsg = None
        for i in range(4, len(geokeys), 4):
            if geokeys[i] == _KEY_PROJECTED_CRS:
                epsg = int(geokeys[i + 3])
        if epsg is None:
            raise ProviderError(f"{path} lacks a ProjectedCSTypeGeoKey (EPSG code); write it in a UTM EPSG CRS")
        nodata = None
        if _TAG_NODATA in tags:
            nodata = float(str(tags[_TAG_NODATA].value).strip("\x00 "))
        arr = page.asarray()
        if arr.ndim == 2:
            arr = arr[None]
        elif page.planarconfig == 2 or arr.shape[0] < arr.shape[-1]:  # separate planes: (C, H, W)
            pass
        else:  # contiguous: (H, W, C)
            arr = np.moveaxis(arr, -1, 0)
    if abs(scale[0] - scale[1]) > 1e-9:
        raise ProviderError(f"{path} has non-square pixels {scale[:2]}; resample to 10 m square pixels")
    x0 = tie[3] - tie[0] * scale[0]
    y0 = tie[4] + tie[1] * scale[1]
    return arr, epsg, float(x0), float(y0), float(scale[0]), nodata


def _read_zarr(path: Path):
    with xr.open_zarr(path, consolidated=None) as ds:
        ds = ds.load()
    var = "data" if "data" in ds else next((v for v in ds.data_vars if ds[v].ndim == 3), None)
    if var is None:
        raise ProviderError(f"{path} has no (band, y, x) variable")
    da = ds[var].transpose("band", "y", "x")
    epsg = ds.attrs.get("epsg") or (ds["spatial_ref"].attrs.get("epsg") if "spatial_ref" in ds else None)
    if epsg is None and str(ds.attrs.get("crs", "")).upper().startswith("EPSG:"):
        epsg = int(str(ds.attrs["crs"]).split(":")[1])
    if epsg is None:
        raise ProviderError(f"{path} does not say its CRS; add an `epsg` attribute (e.g. 32631)")
    x, y = ds["x"].values, ds["y"].values
    res = float(x[1] - x[0]) if x.size > 1 else PIXEL_SIZE_M
    if y.size > 1 and y[1] > y[0]:
        raise ProviderError(f"{path} is south-up (y increasing); flip it to north-up")
    arr = da.values
    if "valid_count" in ds:
        arr = np.concatenate([arr, ds["valid_count"].values[None].astype(arr.dtype)])
    nodata = da.attrs.get("nodata")
    return arr, int(epsg), float(x[0] - res / 2), float(y[0] + res / 2), res, (None if nodata is None else float(nodata))
