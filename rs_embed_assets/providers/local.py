"""The ``local`` provider: your own composites from a folder, read with rasterio.

Naming convention (``root`` = ``RS_EMBED_ASSETS_LOCAL_DIR`` or the resource option ``root``)::

    <root>/<sensor>/<tile>/<YYYY-MM>.tif          one GeoTIFF / COG holding all bands (a stack)
    <root>/<sensor>/<tile>/<YYYY-MM>/<BAND>.tif   or one file per band (B1.tif … B12.tif, or B01.tif …;
                                                  VV.tif, VH.tif), optionally valid_count.tif
    <root>/<sensor>/<tile>/<YYYY-MM>.zarr         zarr (xarray dataset with a (band, y, x) variable)

``<sensor>`` is ``s2`` or ``s1``; ``<tile>`` is the tile key (``31UFU`` or a sub-tile key). The
provider looks under the requested key first, then under the parent MGRS tile, and reads from the
first file that reaches the requested window.

Reading
    Only the requested pixel window is read (rasterio windowed reads; tiled files and COGs decode only
    the blocks it touches). Any compression GDAL reads works (DEFLATE, LZW, ZSTD, JPEG, ...). The
    file must be in the tile's UTM CRS at 10 m, north-up, on the tile's 10 m grid; PixelIsArea and
    PixelIsPoint rasters both work (GDAL reports both as pixel-corner geotransforms). Pixels of the
    window outside the file have no observation (``valid_count`` 0); a window entirely outside it is
    an error.

Bands
    In the sensor's order (S2: B1,B2,B3,B4,B5,B6,B7,B8,B8A,B9,B11,B12; S1: VV,VH), optionally followed
    by a band holding the per-pixel count of valid observations. When the file's band descriptions
    name the bands (``B04``, ``B4``, ``VV``, ``valid_count``, ...) they are matched by name and
    reordered; descriptions that name other bands are refused.

Validity
    A pixel is valid when the file's masks say so (nodata value, internal/external mask band, alpha),
    its values are finite, and the count band (if any) is > 0.

Values
    S2 must be L2A DN (0..10000, uint16 or any integer type in 0..65535). Float reflectance in 0..1 is
    scaled ×10000 to DN with a log line (``reflectance="scale"``, the default) or refused
    (``reflectance="refuse"``); float DN are rounded. Negative or out-of-range values are refused.
    S1 must be float σ0 in linear power; dB (negative values) is converted to linear with a log line
    (``s1_db="convert"``) or refused (``s1_db="refuse"``).

A missing file is recorded as an empty composite (reason: the paths looked for), so a backfill over
months you have not supplied completes with explicit gaps instead of failing. Every error names the
file.
"""

from __future__ import annotations

import logging
import math
import re
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from ..composite import empty_composite, make_composite, parse_month, sensor_spec
from ..grid import PIXEL_SIZE_M, Tile
from .base import Provider, ProviderError

log = logging.getLogger(__name__)

COUNT_NAMES = ("valid_count", "count", "valid", "n_obs", "nobs")
_BAND_RE = re.compile(r"^(?:SENTINEL2?_?)?B0*(\d{1,2}A?)$")
_REFLECTANCE_MAX = 1.5  # floats whose valid maximum is at most this are reflectance 0..1
S2_SCALE = 10000.0


def normalise_band_name(name: str | None) -> str | None:
    """'B04' / 'b4' / 'B8A' / 'vv' / 'valid_count' → 'B4' / 'B4' / 'B8A' / 'VV' / 'valid_count'; None if unknown."""
    if not name:
        return None
    text = str(name).strip()
    if text.lower() in COUNT_NAMES:
        return "valid_count"
    m = _BAND_RE.match(text.upper())
    if m:
        return f"B{m[1]}"
    if text.upper() in ("VV", "VH", "HH", "HV"):
        return text.upper()
    return None


class LocalProvider(Provider):
    name = "local"

    def __init__(self, root: str = "imagery", reflectance: str = "scale", s1_db: str = "convert"):
        if reflectance not in ("scale", "refuse"):
            raise ProviderError(f"reflectance={reflectance!r}; use scale (×10000 to DN, logged) or refuse")
        if s1_db not in ("convert", "refuse"):
            raise ProviderError(f"s1_db={s1_db!r}; use convert (10^(dB/10), logged) or refuse")
        self.root = Path(root).expanduser()
        self.reflectance = reflectance
        self.s1_db = s1_db

    def describe(self) -> dict[str, Any]:
        return {"provider": self.name, "root": str(self.root), "reflectance": self.reflectance, "s1_db": self.s1_db}

    # --- finding files ------------------------------------------------------------------------------
    def candidates(self, sensor: str, tile: Tile, month: str) -> list[Path]:
        """Existing files or per-band folders for the tile (its own key first, then its MGRS tile)."""
        out = []
        for key in dict.fromkeys([tile.key, tile.mgrs]):
            base = self.root / sensor / key
            for ext in (".tif", ".tiff", ".zarr"):
                if (base / f"{month}{ext}").exists():
                    out.append(base / f"{month}{ext}")
            if (base / month).is_dir():
                out.append(base / month)
        return out

    def find(self, sensor: str, tile: Tile, month: str) -> Path | None:
        c = self.candidates(sensor, tile, month)
        return c[0] if c else None

    # --- composite ----------------------------------------------------------------------------------
    def composite(self, sensor: str, tile: Tile, month: str) -> xr.Dataset:
        month = parse_month(month)
        spec = sensor_spec(sensor)
        paths = self.candidates(sensor, tile, month)
        if not paths:
            expected = self.root / sensor / tile.key / f"{month}.tif"
            return empty_composite(sensor=sensor, tile=tile, month=month, provider=self.name,
                                   reason=f"no file at {expected} (or .zarr, a {month}/ folder of per-band files, "
                                          f"or the same under {tile.mgrs}/)")
        # the first file that covers the whole window; else the first that covers part of it (a window
        # with a margin may reach past a sub-tile's own file but not past its MGRS tile's)
        first_error: ProviderError | None = None
        chosen = None
        for path in paths:
            try:
                read = _read_zarr if path.suffix == ".zarr" else _read_rasterio
                result = read(path, sensor, tile)
            except _NotCovering as exc:
                first_error = first_error or ProviderError(str(exc))
                continue
            if chosen is None or ("outside_file_px" in chosen[1][2] and "outside_file_px" not in result[2]):
                chosen = (path, result)
            if "outside_file_px" not in result[2]:
                break
        if chosen is None:
            raise first_error  # type: ignore[misc]
        path, (data, valid, info) = chosen
        data, notes = self._check_values(path, sensor, data, valid)
        info.update(notes)
        fill = 0 if spec.dtype == "uint16" else np.nan
        invalid = valid == 0
        if invalid.any():
            data[:, invalid] = fill
        status = "ok" if valid.any() else "empty"
        return make_composite(sensor=sensor, tile=tile, month=month, data=data, valid_count=valid,
                              provider=self.name, status=status, provider_info=info)

    def _check_values(self, path: Path, sensor: str, data: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, dict]:
        """Provider units in the composite dtype: S2 DN as uint16, S1 linear σ0 as float32."""
        ok = valid > 0
        notes: dict[str, Any] = {"source_dtype": str(data.dtype)}
        if sensor == "s2":
            if data.dtype == np.uint16:
                return data, notes
            if data.dtype.kind in "iu":
                if data.dtype.itemsize == 1:
                    raise ProviderError(f"{path} holds 8-bit values ({data.dtype}); S2 composites need L2A surface "
                                        "reflectance DN (0..10000, uint16), not a rendered 8-bit image")
                lo, hi = _valid_range(data, ok)
                if lo < 0 or hi > 65535:
                    raise ProviderError(f"{path} has S2 values {lo}..{hi} outside 0..65535; S2 L2A DN are 0..10000 "
                                        "(remove the BOA offset / write uint16)")
                return data.astype(np.uint16), notes
            if data.dtype.kind != "f":
                raise ProviderError(f"{path} has dtype {data.dtype}; S2 needs integer DN or float reflectance")
            lo, hi = _valid_range(data, ok)
            if not ok.any():
                return np.zeros(data.shape, np.uint16), notes
            if hi <= _REFLECTANCE_MAX:
                if self.reflectance == "refuse":
                    raise ProviderError(f"{path} holds float reflectance ({lo:.3g}..{hi:.3g}); this deployment needs "
                                        "L2A DN (reflectance × 10000, uint16): convert the file, or set the local "
                                        "provider option reflectance=scale")
                log.info("%s: float reflectance %.3g..%.3g scaled ×%g to L2A DN", path, lo, hi, S2_SCALE)
                notes["scaled_reflectance_by"] = S2_SCALE
                data = data * np.float32(S2_SCALE)
                lo, hi = lo * S2_SCALE, hi * S2_SCALE
            if lo < -0.5 or hi > 65535.5:
                raise ProviderError(f"{path} has S2 values {lo:.6g}..{hi:.6g}; expected L2A DN 0..10000 or "
                                    "reflectance 0..1 (remove the BOA offset first)")
            out = np.empty(data.shape, np.uint16)
            np.rint(np.nan_to_num(data, nan=0.0, posinf=0.0, neginf=0.0), out=out, casting="unsafe")
            return out, notes
        # s1
        if data.dtype.kind != "f":
            raise ProviderError(f"{path} has integer dtype {data.dtype}; S1 needs float σ0 in linear power "
                                "(or dB, which is converted)")
        lo, hi = _valid_range(data, ok)
        if ok.any() and lo < 0:
            if self.s1_db == "refuse":
                raise ProviderError(f"{path} holds negative S1 values ({lo:.3g}..{hi:.3g}): that is dB; convert to "
                                    "linear power (10^(dB/10)) or set the local provider option s1_db=convert")
            if hi > 60:
                raise ProviderError(f"{path} has S1 values {lo:.3g}..{hi:.3g}: neither linear power nor dB")
            log.info("%s: S1 values %.3g..%.3g are dB; converted to linear power", path, lo, hi)
            notes["converted_from_db"] = True
            data = np.power(np.float32(10.0), data.astype(np.float32) / np.float32(10.0))
        return data.astype(np.float32, copy=False), notes


class _NotCovering(ProviderError):
    """The file does not reach the requested window (another candidate may)."""


def _valid_range(data: np.ndarray, ok: np.ndarray) -> tuple[float, float]:
    if not ok.any():
        return 0.0, 0.0
    lo, hi = math.inf, -math.inf
    for band in data:  # band by band: no full-size temporary
        v = band[ok]
        if v.dtype.kind == "f":
            v = v[np.isfinite(v)]
        if v.size:
            lo, hi = min(lo, float(v.min())), max(hi, float(v.max()))
    return (lo, hi) if lo <= hi else (0.0, 0.0)


# --- rasterio -----------------------------------------------------------------------------------------
def _rio_error(path: Path, exc: BaseException, what: str = "read") -> ProviderError:
    return ProviderError(f"{path}: could not {what} it ({type(exc).__name__}: {str(exc)[:300]}); check the file "
                         "(truncated or not a GeoTIFF?)")


def _band_plan(path: Path, names: list[str | None], nb: int, spec_bands: tuple[str, ...],
               sensor: str) -> tuple[list[int], int | None, str]:
    """(0-based indexes of the sensor bands in the file, index of the count band or None, how matched)."""
    n = len(names)
    if n not in (nb, nb + 1):
        raise ProviderError(f"{path} has {n} bands; {sensor} needs {nb} ({', '.join(spec_bands)}) optionally "
                            "followed by a valid-count band")
    norm = [normalise_band_name(d) for d in names]
    described = [d for d in names if d]
    if not described or all(x is None for x in norm):
        return list(range(nb)), (nb if n == nb + 1 else None), "file order"
    unknown = [d for d, x in zip(names, norm) if d and x is None]
    if unknown or any(d is None for d in names):
        raise ProviderError(f"{path}: band descriptions {names} are not all {sensor} band names; name every band "
                            f"({', '.join(spec_bands)}, optional valid_count) or clear the descriptions to use file "
                            "order")
    if len(set(norm)) != len(norm) or not set(spec_bands) <= set(norm) or not set(norm) <= set(spec_bands) | {"valid_count"}:
        problems = []
        if missing := [b for b in spec_bands if b not in norm]:
            problems.append(f"missing {missing}")
        if extra := [d for d, x in zip(names, norm) if x not in spec_bands and x != "valid_count"]:
            problems.append(f"unexpected {extra}")
        if dups := sorted({x for x in norm if norm.count(x) > 1}):
            problems.append(f"duplicated {dups}")
        raise ProviderError(f"{path}: band descriptions {names} do not name the {sensor} bands "
                            f"({', '.join(problems)}); {sensor} needs {', '.join(spec_bands)}")
    order = [norm.index(b) for b in spec_bands]
    count = norm.index("valid_count") if "valid_count" in norm else None
    return order, count, ("by name" if order != list(range(nb)) else "by name (file order)")


def _grid_window(path: Path, src, tile: Tile) -> tuple[int, int]:
    """(row, col) of the tile's upper-left pixel in the file; checks CRS, resolution and alignment."""
    epsg = src.crs.to_epsg() if src.crs else None
    if epsg is None:
        raise ProviderError(f"{path} has no EPSG-coded CRS ({src.crs}); write it in the tile's UTM CRS "
                            f"EPSG:{tile.epsg}")
    if epsg != tile.epsg:
        raise ProviderError(f"{path} is in EPSG:{epsg}, tile {tile.key} is EPSG:{tile.epsg}; reproject it to the "
                            "tile's UTM zone at 10 m")
    t = src.transform
    if abs(t.b) > 1e-9 or abs(t.d) > 1e-9 or t.e > 0:
        raise ProviderError(f"{path} is rotated or south-up (transform {tuple(t)[:6]}); warp it north-up onto the tile grid")
    if abs(t.a - PIXEL_SIZE_M) > 1e-6 or abs(-t.e - PIXEL_SIZE_M) > 1e-6:
        res = t.a if abs(t.a + t.e) < 1e-9 else (t.a, -t.e)
        raise ProviderError(f"{path} has {res} m pixels; resample it to {PIXEL_SIZE_M:g} m on the tile grid")
    col = (tile.x0 - t.c) / PIXEL_SIZE_M
    row = (t.f - tile.y0) / PIXEL_SIZE_M
    if abs(col - round(col)) > 1e-6 or abs(row - round(row)) > 1e-6:
        raise ProviderError(f"{path} is not aligned with the tile's 10 m grid (offset {col:.3f}, {row:.3f} px); "
                            "resample it onto the tile grid")
    return int(round(row)), int(round(col))


def _overlap(r: int, c: int, tile: Tile, height: int, width: int, path: Path):
    """Destination and source slices of the window ∩ file, or _NotCovering."""
    r0, c0 = max(r, 0), max(c, 0)
    r1, c1 = min(r + tile.height, height), min(c + tile.width, width)
    if r1 <= r0 or c1 <= c0:
        raise _NotCovering(f"{path} ({height}×{width} px) does not reach tile window {tile.key} (rows {r}..{r + tile.height}, "
                           f"cols {c}..{c + tile.width} of the file)")
    return (slice(r0 - r, r1 - r), slice(c0 - c, c1 - c)), (r0, r1, c0, c1)


def _band_files(folder: Path, spec_bands: tuple[str, ...]) -> tuple[list[Path], Path | None]:
    files = {}
    for p in sorted(folder.iterdir()):
        if p.suffix.lower() in (".tif", ".tiff") and (name := normalise_band_name(p.stem)):
            if name in files:
                raise ProviderError(f"{folder} has two files for band {name}: {files[name].name}, {p.name}")
            files[name] = p
    missing = [b for b in spec_bands if b not in files]
    if missing:
        raise ProviderError(f"{folder} lacks per-band files for {missing} (have {sorted(files)}); name them "
                            f"{', '.join(f'{b}.tif' for b in spec_bands)}")
    return [files[b] for b in spec_bands], files.get("valid_count")


def _read_rasterio(path: Path, sensor: str, tile: Tile) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    import rasterio
    from rasterio.enums import MaskFlags
    from rasterio.windows import Window

    spec = sensor_spec(sensor)
    nb = len(spec.bands)
    if path.is_dir():
        band_paths, count_path = _band_files(path, spec.bands)
        sources = [(p, [1]) for p in band_paths]
        how = "per-band files"
    else:
        sources, count_path, how = None, None, ""
    with ExitStack() as stack:
        def open_(p: Path):
            try:
                return stack.enter_context(rasterio.open(p))
            except Exception as exc:
                raise _rio_error(p, exc, "open") from None

        if sources is None:
            src = open_(path)
            order, count_idx, how = _band_plan(path, list(src.descriptions), nb, spec.bands, sensor)
            plan = [(path, src, i + 1) for i in order]
            count_plan = (path, src, count_idx + 1) if count_idx is not None else None
        else:
            plan = []
            for p, _ in sources:
                s = open_(p)
                if s.count != 1:
                    raise ProviderError(f"{p} has {s.count} bands; a per-band file holds one band")
                plan.append((p, s, 1))
            count_plan = (count_path, open_(count_path), 1) if count_path else None
        first_src = plan[0][1]
        r, c = _grid_window(plan[0][0], first_src, tile)
        dst, (r0, r1, c0, c1) = _overlap(r, c, tile, first_src.height, first_src.width, plan[0][0])
        for p, s, _ in plan[1:] + ([count_plan] if count_plan else []):
            if (s.transform, s.crs, s.width, s.height) != (first_src.transform, first_src.crs, first_src.width,
                                                             first_src.height):
                raise ProviderError(f"{p} is not on the same grid as {plan[0][0]} (transform, CRS and size must match)")
        window = Window(c0, r0, c1 - c0, r1 - r0)
        dtypes = {s.dtypes[i - 1] for _, s, i in plan}
        if len(dtypes) != 1:
            raise ProviderError(f"{path}: bands have different dtypes {sorted(dtypes)}; write one dtype")
        dtype = np.dtype(dtypes.pop())
        full = (r0, r1, c0, c1) == (r, r + tile.height, c, c + tile.width)
        data = (np.empty if full else np.zeros)((nb, tile.height, tile.width), dtype)
        ok = np.zeros((tile.height, tile.width), bool)
        ok[dst] = True
        okw = ok[dst]
        try:
            if sources is None and [i for _, _, i in plan] == list(range(1, nb + 1)) and full:
                first_src.read(list(range(1, nb + 1)), window=window, out=data)  # one call, straight into place
            else:
                for b, (p, s, i) in enumerate(plan):
                    data[b][dst] = s.read(i, window=window)
            masked_per_dataset = False
            unmasked = True
            for b, (p, s, i) in enumerate(plan):
                flags = s.mask_flag_enums[i - 1]
                if MaskFlags.all_valid in flags:
                    continue
                unmasked = False
                if MaskFlags.per_dataset in flags:
                    if masked_per_dataset and sources is None:
                        continue  # one mask for all bands of this file: read once
                    masked_per_dataset = True
                    okw &= s.read_masks(i, window=window) > 0
                elif MaskFlags.nodata in flags:
                    nd = s.nodatavals[i - 1]
                    band = data[b][dst]
                    okw &= ~np.isnan(band) if (nd is not None and math.isnan(nd)) else band != nd
                else:  # alpha or other mask band
                    okw &= s.read_masks(i, window=window) > 0
            if dtype.kind == "f":
                for b in range(nb):
                    okw &= np.isfinite(data[b][dst])
            if unmasked and sensor == "s2":  # no nodata/mask declared: L2A's no-data value is 0 in every band
                nonzero = np.zeros(okw.shape, bool)
                for b in range(nb):
                    nonzero |= data[b][dst] != 0
                okw &= nonzero
            if count_plan:
                cnt = count_plan[1].read(count_plan[2], window=window)
                cnt = np.nan_to_num(cnt, nan=0) if cnt.dtype.kind == "f" else cnt
                if (cnt < 0).any() or (cnt > 65535).any():
                    raise ProviderError(f"{count_plan[0]}: the valid-count band holds values outside 0..65535")
                valid = np.zeros((tile.height, tile.width), np.uint16)
                valid[dst] = np.where(okw, cnt, 0)
            else:
                valid = np.zeros((tile.height, tile.width), np.uint16)
                valid[dst] = okw
        except ProviderError:
            raise
        except Exception as exc:  # truncated / corrupt blocks: name the file
            raise _rio_error(path, exc) from None
        info = {"file": str(path), "window": [r, c], "bands": how, "compression": str(first_src.compression.value
                                                                                        if first_src.compression else None),
                "nodata": first_src.nodata}
        if not full:
            info["outside_file_px"] = int(tile.height * tile.width - (r1 - r0) * (c1 - c0))
        return data, valid, info


# --- zarr ---------------------------------------------------------------------------------------------
def _read_zarr(path: Path, sensor: str, tile: Tile) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    spec = sensor_spec(sensor)
    nb = len(spec.bands)
    try:
        ds = xr.open_zarr(path, consolidated=None)
    except Exception as exc:
        raise _rio_error(path, exc, "open") from None
    with ds:
        var = "data" if "data" in ds else next((v for v in ds.data_vars if ds[v].ndim == 3), None)
        if var is None:
            raise ProviderError(f"{path} has no (band, y, x) variable")
        da = ds[var].transpose("band", "y", "x")
        epsg = ds.attrs.get("epsg") or (ds["spatial_ref"].attrs.get("epsg") if "spatial_ref" in ds else None)
        if epsg is None and str(ds.attrs.get("crs", "")).upper().startswith("EPSG:"):
            epsg = int(str(ds.attrs["crs"]).split(":")[1])
        if epsg is None:
            raise ProviderError(f"{path} does not say its CRS; add an `epsg` attribute (e.g. 32631)")
        if int(epsg) != tile.epsg:
            raise ProviderError(f"{path} is in EPSG:{epsg}, tile {tile.key} is EPSG:{tile.epsg}; reproject it to the "
                                "tile's UTM zone at 10 m")
        x, y = ds["x"].values, ds["y"].values
        res = float(x[1] - x[0]) if x.size > 1 else PIXEL_SIZE_M
        if y.size > 1 and y[1] > y[0]:
            raise ProviderError(f"{path} is south-up (y increasing); flip it to north-up")
        if abs(res - PIXEL_SIZE_M) > 1e-6:
            raise ProviderError(f"{path} has {res} m pixels; resample it to {PIXEL_SIZE_M:g} m on the tile grid")
        x0, y0 = float(x[0] - res / 2), float(y[0] + res / 2)
        col, row = (tile.x0 - x0) / PIXEL_SIZE_M, (y0 - tile.y0) / PIXEL_SIZE_M
        if abs(col - round(col)) > 1e-6 or abs(row - round(row)) > 1e-6:
            raise ProviderError(f"{path} is not aligned with the tile's 10 m grid (offset {col:.3f}, {row:.3f} px)")
        r, c = int(round(row)), int(round(col))
        dst, (r0, r1, c0, c1) = _overlap(r, c, tile, y.size, x.size, path)
        names = [str(b) for b in da["band"].values] if "band" in da.coords else [None] * da.shape[0]
        order, count_idx, how = _band_plan(path, names, nb, spec.bands, sensor)
        win = da.isel(y=slice(r0, r1), x=slice(c0, c1)).values
        data = np.zeros((nb, tile.height, tile.width), win.dtype)
        for b, i in enumerate(order):
            data[b][dst] = win[i]
        nd = da.attrs.get("nodata", da.attrs.get("_FillValue"))
        okw = np.ones((r1 - r0, c1 - c0), bool)
        if win.dtype.kind == "f":
            okw &= np.isfinite(win[order]).all(axis=0)
        if nd is not None and not (isinstance(nd, float) and math.isnan(nd)):
            okw &= (win[order] != nd).all(axis=0)
        elif nd is None and sensor == "s2":
            okw &= (win[order] != 0).any(axis=0)  # L2A's no-data value is 0 in every band
        valid = np.zeros((tile.height, tile.width), np.uint16)
        if "valid_count" in ds:
            cnt = ds["valid_count"].isel(y=slice(r0, r1), x=slice(c0, c1)).values
            valid[dst] = np.where(okw, np.nan_to_num(cnt, nan=0), 0)
        elif count_idx is not None:
            valid[dst] = np.where(okw, np.nan_to_num(win[count_idx], nan=0), 0)
        else:
            valid[dst] = okw
    info = {"file": str(path), "window": [r, c], "bands": how, "nodata": nd}
    if (r0, r1, c0, c1) != (r, r + tile.height, c, c + tile.width):
        info["outside_file_px"] = int(tile.height * tile.width - (r1 - r0) * (c1 - c0))
    return data, valid, info
