"""The composite: one sensor's monthly composite of one tile, as a labelled, georeferenced dataset.

Every provider returns the same structure (an ``xarray.Dataset``):

- ``data``        (band, y, x)  raw provider values: S2 L2A surface reflectance DN (uint16, 0..10000,
                                the 12 bands B1…B12 without B10); S1 VV/VH backscatter (float32,
                                linear power). Pixels without a valid observation hold 0 (S2) or NaN (S1).
- ``valid_count`` (y, x)        number of valid (cloud-free) observations behind each pixel (uint16)
- ``spatial_ref`` ()            CF grid mapping: ``crs_wkt``, ``spatial_ref`` and ``GeoTransform``
- coordinates ``band`` (names), ``x``/``y`` pixel centres in metres of the tile's UTM CRS
- attributes: sensor, tile, month, provider, status ("ok" | "empty"), synthetic, valid_fraction,
  scene_count, units, and a JSON ``provider_info`` with the filters the provider applied.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .grid import Tile

if TYPE_CHECKING:  # numpy/xarray are imported where a composite is built: the code location loads without them
    import numpy as np
    import xarray as xr


class CompositeError(ValueError):
    """A composite that does not have the agreed structure, or a bad sensor/month argument."""


@dataclass(frozen=True)
class SensorSpec:
    name: str
    bands: tuple[str, ...]
    dtype: str
    units: str
    nodata: float


S2_BANDS = ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B11", "B12")
S1_BANDS = ("VV", "VH")

SENSORS: dict[str, SensorSpec] = {
    "s2": SensorSpec("s2", S2_BANDS, "uint16", "Sentinel-2 L2A surface reflectance × 10000 (DN)", 0),
    "s1": SensorSpec("s1", S1_BANDS, "float32", "Sentinel-1 GRD backscatter σ0, linear power", float("nan")),
}

_MONTH_RE = re.compile(r"^(?P<y>\d{4})-(?P<m>\d{2})(?:-01)?$")


def sensor_spec(sensor: str) -> SensorSpec:
    try:
        return SENSORS[sensor]
    except KeyError:
        raise CompositeError(f"unknown sensor {sensor!r}; use one of {', '.join(SENSORS)}") from None


def parse_month(value: str) -> str:
    """'2024-03' or '2024-03-01' (a monthly partition key) → '2024-03'; anything else is an error."""
    m = _MONTH_RE.match(str(value).strip())
    if not m or not 1 <= int(m["m"]) <= 12 or int(m["y"]) < 1970:
        raise CompositeError(f"malformed month {value!r}; use YYYY-MM (e.g. 2024-03) or the partition key "
                             "form YYYY-MM-01")
    return f"{m['y']}-{m['m']}"


def month_start_end(month: str) -> tuple[str, str]:
    """ISO dates [start, end) of a month."""
    y, m = map(int, parse_month(month).split("-"))
    ny, nm = (y + 1, 1) if m == 12 else (y, m + 1)
    return f"{y:04d}-{m:02d}-01", f"{ny:04d}-{nm:02d}-01"


def shift_month(month: str, delta: int) -> str:
    y, m = map(int, parse_month(month).split("-"))
    idx = y * 12 + (m - 1) + delta
    return f"{idx // 12:04d}-{idx % 12 + 1:02d}"


def crs_wkt(epsg: int) -> str:
    from pyproj import CRS

    return CRS.from_epsg(epsg).to_wkt()


def make_composite(*, sensor: str, tile: Tile, month: str, data: np.ndarray, valid_count: np.ndarray,
                   provider: str, synthetic: bool = False, scene_count: int = 0, status: str = "ok",
                   provider_info: dict[str, Any] | None = None) -> xr.Dataset:
    import numpy as np
    import xarray as xr

    spec = sensor_spec(sensor)
    month = parse_month(month)
    data = np.asarray(data)
    if data.shape != (len(spec.bands), tile.height, tile.width):
        raise CompositeError(f"{provider} returned {sensor} data shaped {data.shape}; expected "
                             f"{(len(spec.bands), tile.height, tile.width)} for tile {tile.key}")
    valid_count = np.asarray(valid_count, dtype=np.uint16)
    if valid_count.shape != (tile.height, tile.width):
        raise CompositeError(f"valid_count shaped {valid_count.shape}; expected {(tile.height, tile.width)}")
    data = data.astype(spec.dtype, copy=False)
    valid = valid_count > 0
    ds = xr.Dataset(
        data_vars={
            "data": (("band", "y", "x"), data, {"units": spec.units, "grid_mapping": "spatial_ref",
                                                "nodata": spec.nodata}),
            "valid_count": (("y", "x"), valid_count, {"grid_mapping": "spatial_ref",
                                                      "long_name": "valid observations per pixel"}),
            "spatial_ref": ((), np.int32(0), {"crs_wkt": crs_wkt(tile.epsg), "spatial_ref": crs_wkt(tile.epsg),
                                              "GeoTransform": " ".join(repr(v) for v in tile.transform),
                                              "epsg": tile.epsg}),
        },
        coords={"band": np.array(spec.bands, dtype=object), "y": tile.y_coords(), "x": tile.x_coords()},
        attrs={
            "sensor": sensor, "tile": tile.key, "month": month, "provider": provider, "status": status,
            "synthetic": int(bool(synthetic)), "valid_fraction": float(valid.mean()) if valid.size else 0.0,
            "scene_count": int(scene_count), "crs": tile.crs, "transform": list(tile.transform),
            "provider_info": json.dumps(provider_info or {}, sort_keys=True, default=str),
        },
    )
    ds["x"].attrs.update(units="m", standard_name="projection_x_coordinate")
    ds["y"].attrs.update(units="m", standard_name="projection_y_coordinate")
    return ds


def empty_composite(*, sensor: str, tile: Tile, month: str, provider: str, reason: str,
                    provider_info: dict[str, Any] | None = None, synthetic: bool = False) -> xr.Dataset:
    """A composite with no valid pixel: the recorded outcome of an empty collection."""
    import numpy as np

    spec = sensor_spec(sensor)
    fill = 0 if spec.dtype == "uint16" else np.nan
    data = np.full((len(spec.bands), tile.height, tile.width), fill, dtype=spec.dtype)
    info = dict(provider_info or {})
    info["empty_reason"] = reason
    return make_composite(sensor=sensor, tile=tile, month=month, data=data,
                          valid_count=np.zeros((tile.height, tile.width), np.uint16), provider=provider,
                          synthetic=synthetic, status="empty", provider_info=info)


def validate_composite(ds: xr.Dataset, *, sensor: str, tile: Tile) -> None:
    spec = sensor_spec(sensor)
    if "data" not in ds or "valid_count" not in ds:
        raise CompositeError("composite lacks the 'data' or 'valid_count' variable")
    if tuple(ds["band"].values.tolist()) != spec.bands:
        raise CompositeError(f"composite bands {list(ds['band'].values)} differ from the {sensor} order "
                             f"{list(spec.bands)}")
    if ds["data"].shape[1:] != (tile.height, tile.width):
        raise CompositeError(f"composite is {ds['data'].shape[1:]} px, tile {tile.key} is {(tile.height, tile.width)}")
    if ds.attrs.get("tile") != tile.key:
        raise CompositeError(f"composite belongs to tile {ds.attrs.get('tile')!r}, not {tile.key!r}")
