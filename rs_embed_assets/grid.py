"""The tile grid: Sentinel-2 MGRS tiles in their UTM CRS, optional k×k sub-tiles, AOI → tile keys.

A Sentinel-2 tile (granule) is the MGRS 100 km square extended to 109.8 km (10 980 px at 10 m)
to the east and south, so neighbouring tiles overlap by 9.8 km. Its upper-left corner is the
north-west corner of the 100 km square snapped to the 60 m lattice of the coarsest S2 bands
(easting floored, true northing ceiled). The square follows from the MGRS lettering rules, the
UTM geometry from PROJ; tests check the corners against ESA's published tiling grid.
Sentinel-2 uses the regular 6° UTM zones everywhere (no Norway/Svalbard exceptions), and so do we.

Tile keys are stable strings:

- ``31UFU``                 a whole tile (10 980 × 10 980 px)
- ``31UFU-k30-r04-c12``     sub-tile row 4, column 12 of a 30 × 30 split (366 × 366 px each)
"""

from __future__ import annotations

import gzip
import json
import math
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

TILE_PIXELS = 10980
PIXEL_SIZE_M = 10.0
SQUARE_M = 100_000
SNAP_M = 60  # S2 tiles align with the 60 m lattice
FALSE_NORTHING_SOUTH = 10_000_000

_TILE_RE = re.compile(r"^(?P<zone>\d{2})(?P<band>[C-HJ-NP-X])(?P<sq>[A-HJ-NP-Z]{2})$")
_KEY_RE = re.compile(r"^(?P<mgrs>\d{2}[C-HJ-NP-X][A-HJ-NP-Z]{2})(?:-k(?P<k>\d+)-r(?P<r>\d+)-c(?P<c>\d+))?$")


class TileError(ValueError):
    """A tile key, AOI or sub-tiling that cannot be used; the message says how to fix it."""


@dataclass(frozen=True)
class Tile:
    """A Sentinel-2 tile or one of its sub-tiles, on the tile's UTM grid at 10 m."""

    mgrs: str
    epsg: int
    x0: float  # upper-left corner, metres in the UTM CRS
    y0: float
    width: int  # pixels
    height: int
    k: int = 1  # sub-tiling factor (1 = whole tile)
    row: int = 0
    col: int = 0

    @property
    def key(self) -> str:
        if self.k == 1:
            return self.mgrs
        return f"{self.mgrs}-k{self.k}-r{self.row:02d}-c{self.col:02d}"

    @property
    def crs(self) -> str:
        return f"EPSG:{self.epsg}"

    @property
    def transform(self) -> tuple[float, float, float, float, float, float]:
        """GDAL-order affine (x0, dx, 0, y0, 0, -dy), north-up."""
        return (self.x0, PIXEL_SIZE_M, 0.0, self.y0, 0.0, -PIXEL_SIZE_M)

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """(minx, miny, maxx, maxy) in the UTM CRS."""
        return (self.x0, self.y0 - self.height * PIXEL_SIZE_M, self.x0 + self.width * PIXEL_SIZE_M, self.y0)

    def x_coords(self) -> np.ndarray:
        """Pixel-centre eastings."""
        return self.x0 + (np.arange(self.width) + 0.5) * PIXEL_SIZE_M

    def y_coords(self) -> np.ndarray:
        """Pixel-centre northings (north-up: decreasing)."""
        return self.y0 - (np.arange(self.height) + 0.5) * PIXEL_SIZE_M

    def lonlat_bounds(self) -> tuple[float, float, float, float]:
        """Bounding box in CRS84 of the tile footprint (densified edges)."""
        minx, miny, maxx, maxy = self.bounds
        t = np.linspace(0.0, 1.0, 21)
        xs = np.concatenate([minx + (maxx - minx) * t, np.full_like(t, maxx), maxx - (maxx - minx) * t, np.full_like(t, minx)])
        ys = np.concatenate([np.full_like(t, maxy), maxy - (maxy - miny) * t, np.full_like(t, miny), miny + (maxy - miny) * t])
        lon, lat = utm_to_lonlat(self.epsg, xs, ys)
        return float(lon.min()), float(lat.min()), float(lon.max()), float(lat.max())


# --- projections ----------------------------------------------------------------------------------
@lru_cache(maxsize=256)
def _transformer(src: int, dst: int):
    from pyproj import Transformer

    return Transformer.from_crs(src, dst, always_xy=True)


def lonlat_to_utm(epsg: int, lon, lat) -> tuple[np.ndarray, np.ndarray]:
    x, y = _transformer(4326, epsg).transform(np.asarray(lon, dtype=float), np.asarray(lat, dtype=float))
    return np.asarray(x), np.asarray(y)


def utm_to_lonlat(epsg: int, x, y) -> tuple[np.ndarray, np.ndarray]:
    lon, lat = _transformer(epsg, 4326).transform(np.asarray(x, dtype=float), np.asarray(y, dtype=float))
    return np.asarray(lon), np.asarray(lat)


# --- tiles -----------------------------------------------------------------------------------------
_COL_LETTERS = "ABCDEFGHJKLMNPQRSTUVWXYZ"  # 24 letters, no I/O: three sets of 8 by zone
_ROW_LETTERS = "ABCDEFGHJKLMNPQRSTUV"  # 20 letters, repeating every 2 000 km
_BAND_LETTERS = "CDEFGHJKLMNPQRSTUVWX"  # 8° bands from 80°S; X spans 72..84°N


def _band_range(band: str) -> tuple[float, float]:
    i = _BAND_LETTERS.index(band)
    lo = -80.0 + 8.0 * i
    return lo, (84.0 if band == "X" else lo + 8.0)


@lru_cache(maxsize=1)
def s2_tile_names() -> frozenset[str]:
    """The MGRS squares that are Sentinel-2 tiles (ESA's tiling grid, packaged with this library).

    Partial squares at UTM zone edges are not tiles: the neighbouring zone's tiles cover them.
    """
    from importlib.resources import files

    text = gzip.decompress(files("rs_embed_assets").joinpath("data/s2_tiles.txt.gz").read_bytes()).decode()
    names = set()
    for line in text.splitlines():
        if line and not line.startswith("#"):
            head, *squares = line.split()
            names.update(head + sq for sq in squares)
    return frozenset(names)


def lonlat_to_square(lon: np.ndarray, lat: np.ndarray, zone_offset: int = 0) -> list[str]:
    """MGRS 100 km square ids (``31UFU``) of points, in the plain UTM zones that Sentinel-2 uses.

    Unlike MGRS proper, the Norway/Svalbard zone exceptions are not applied: Sentinel-2 names its
    tiles in the regular 6° zones (there is a 31VED tile, no 32VJM). ``zone_offset`` ±1 names the
    square of the neighbouring zone's grid that the point falls in.
    """
    lon = np.asarray(lon, dtype=float)
    lat = np.asarray(lat, dtype=float)
    zone = (np.floor((lon + 180.0) / 6.0).astype(int) + zone_offset) % 60 + 1
    band = np.clip(np.floor((lat + 80.0) / 8.0).astype(int), 0, len(_BAND_LETTERS) - 1)
    out = [""] * lon.size
    for z in np.unique(zone):
        for north in (True, False):
            sel = np.nonzero((zone == z) & ((lat >= 0) == north))[0]
            if sel.size == 0:
                continue
            e, n = lonlat_to_utm((32600 if north else 32700) + int(z), lon[sel], lat[sel])
            col = np.clip(np.floor(e / SQUARE_M).astype(int) - 1, 0, 7) + 8 * ((int(z) - 1) % 3)
            row = (np.floor(np.mod(n, 2_000_000) / SQUARE_M).astype(int) + (5 if z % 2 == 0 else 0)) % 20
            for j, i in enumerate(sel):
                out[i] = f"{int(z):02d}{_BAND_LETTERS[band[i]]}{_COL_LETTERS[col[j]]}{_ROW_LETTERS[row[j]]}"
    return out


@lru_cache(maxsize=65536)
def mgrs_tile(name: str) -> Tile:
    """The whole Sentinel-2 tile for an MGRS 100 km square id such as ``31UFU``.

    The square's easting follows from the column letter and the zone's letter set; its northing
    from the row letter modulo 2 000 km, resolved to the cycle whose centre falls in the
    latitude band. Sentinel-2 uses the plain UTM zones (no Norway/Svalbard exceptions), so this
    is computed directly rather than with an MGRS library that enforces them.
    """
    m = _TILE_RE.match(name or "")
    if not m:
        raise TileError(f"{name!r} is not a Sentinel-2 MGRS tile id; expected zone (2 digits), latitude band "
                        "and 100 km square letters, e.g. '31UFU' (zero-pad the zone: '04QFJ')")
    zone, band, col_l, row_l = int(m["zone"]), m["band"], m["sq"][0], m["sq"][1]
    if not 1 <= zone <= 60:
        raise TileError(f"{name!r} has UTM zone {zone}; zones run 01..60")
    col_set = (zone - 1) % 3
    ci = _COL_LETTERS.index(col_l) - 8 * col_set
    if not 0 <= ci < 8:
        raise TileError(f"{name!r}: column letter {col_l!r} is not used in zone {zone:02d} (its letters are "
                        f"{_COL_LETTERS[8 * col_set:8 * col_set + 8]})")
    if row_l not in _ROW_LETTERS:
        raise TileError(f"{name!r}: row letter {row_l!r} is not an MGRS row letter")
    if name not in s2_tile_names():
        raise TileError(f"{name!r} is not a Sentinel-2 tile: ESA's tiling grid has no tile for that MGRS square "
                        "(partial squares at UTM zone edges belong to the neighbouring zone's tiles); find the "
                        "tiles of an area with `rs-embed-assets tiles for-aoi --bbox ...`")
    e0 = (ci + 1) * SQUARE_M
    row_offset = 5 if zone % 2 == 0 else 0
    n_cycle = ((_ROW_LETTERS.index(row_l) - row_offset) % 20) * SQUARE_M
    north = band >= "N"
    epsg = (32600 if north else 32700) + zone
    fn = 0 if north else FALSE_NORTHING_SOUTH
    lo, hi = _band_range(band)
    best, best_dist = None, float("inf")
    for cycle in range(0, 6):
        n0 = n_cycle + cycle * 2_000_000
        if n0 >= 10_000_000:
            break
        _, lat = utm_to_lonlat(epsg, e0 + SQUARE_M / 2, n0 + SQUARE_M / 2)
        lat = float(lat)
        dist = 0.0 if lo <= lat <= hi else min(abs(lat - lo), abs(lat - hi))
        if dist < best_dist:
            best, best_dist = n0, dist
    if best is None or best_dist > 8.0:
        raise TileError(f"{name!r}: square {m['sq']} does not occur in latitude band {band} of zone {zone:02d}; "
                        "check the tile id")
    x0 = math.floor(e0 / SNAP_M) * SNAP_M
    y0 = math.ceil((best + SQUARE_M - fn) / SNAP_M) * SNAP_M + fn
    return Tile(mgrs=name, epsg=epsg, x0=float(x0), y0=float(y0), width=TILE_PIXELS, height=TILE_PIXELS)


def valid_subdivisions() -> list[int]:
    return [k for k in range(1, TILE_PIXELS + 1) if TILE_PIXELS % k == 0 and TILE_PIXELS // k >= 64]


def subtile(name: str, k: int, row: int, col: int) -> Tile:
    if k < 1 or TILE_PIXELS % k:
        raise TileError(f"sub-tiling k={k} does not divide the {TILE_PIXELS} px tile evenly; use one of "
                        f"{', '.join(map(str, valid_subdivisions()[:16]))}, …")
    if not (0 <= row < k and 0 <= col < k):
        raise TileError(f"sub-tile r{row:02d}-c{col:02d} is outside a {k}×{k} split; rows/cols run 0..{k - 1}")
    base = mgrs_tile(name)
    size = TILE_PIXELS // k
    return Tile(mgrs=name, epsg=base.epsg, x0=base.x0 + col * size * PIXEL_SIZE_M,
                y0=base.y0 - row * size * PIXEL_SIZE_M, width=size, height=size, k=k, row=row, col=col)


def parse_tile_key(key: str) -> Tile:
    """``31UFU`` or ``31UFU-k30-r04-c12`` → Tile; a clear error names the expected forms."""
    m = _KEY_RE.match(key or "")
    if not m:
        raise TileError(f"unknown tile key {key!r}; expected an MGRS tile id like '31UFU' or a sub-tile like "
                        "'31UFU-k30-r04-c12' (add tiles with `rs-embed-assets tiles add --bbox ...`)")
    if m["k"] is None:
        return mgrs_tile(m["mgrs"])
    return subtile(m["mgrs"], int(m["k"]), int(m["r"]), int(m["c"]))


# --- areas of interest ---------------------------------------------------------------------------
@dataclass(frozen=True)
class AOI:
    """An area of interest in CRS84: a list of polygons, each a list of rings [(lon, lat), ...]."""

    polygons: tuple[tuple[tuple[tuple[float, float], ...], ...], ...]

    @classmethod
    def from_bbox(cls, minlon: float, minlat: float, maxlon: float, maxlat: float) -> "AOI":
        if not (-180 <= minlon < maxlon <= 180 and -90 <= minlat < maxlat <= 90):
            raise TileError(f"bbox ({minlon}, {minlat}, {maxlon}, {maxlat}) is invalid; give "
                            "minlon,minlat,maxlon,maxlat in degrees with min < max (lon -180..180, lat -90..90)")
        if minlat < -80 or maxlat > 84:
            raise TileError("the AOI reaches beyond 80°S..84°N, where Sentinel-2 uses no UTM/MGRS tiles; "
                            "clip it to that latitude range")
        ring = ((minlon, minlat), (maxlon, minlat), (maxlon, maxlat), (minlon, maxlat), (minlon, minlat))
        return cls(polygons=((ring,),))

    @classmethod
    def from_geojson(cls, obj: dict | str | Path) -> "AOI":
        if isinstance(obj, (str, Path)):
            is_text = isinstance(obj, str) and obj.lstrip().startswith("{")
            if not is_text and not Path(obj).is_file():
                raise TileError(f"AOI file {obj} does not exist; give a GeoJSON file path or GeoJSON text")
            text = str(obj) if is_text else Path(obj).read_text()
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                raise TileError(f"AOI is not valid GeoJSON ({exc}); give a FeatureCollection, Feature, "
                                "Polygon or MultiPolygon in lon/lat") from None
        polys: list = []

        def visit(g: dict) -> None:
            t = g.get("type")
            if t == "FeatureCollection":
                for f in g.get("features", []):
                    visit(f)
            elif t == "Feature":
                visit(g.get("geometry") or {})
            elif t == "Polygon":
                polys.append(g["coordinates"])
            elif t == "MultiPolygon":
                polys.extend(g["coordinates"])
            elif t == "GeometryCollection":
                for gg in g.get("geometries", []):
                    visit(gg)
            else:
                raise TileError(f"GeoJSON type {t!r} cannot describe an area; use Polygon or MultiPolygon features")

        visit(obj)
        if not polys:
            raise TileError("the GeoJSON AOI contains no polygons; add a Polygon or MultiPolygon geometry")
        out = []
        for poly in polys:
            rings = tuple(tuple((float(p[0]), float(p[1])) for p in ring) for ring in poly)
            for ring in rings:
                for lon, lat in ring:
                    if not (-180 <= lon <= 180 and -90 <= lat <= 90):
                        raise TileError(f"AOI coordinate ({lon}, {lat}) is not lon/lat in degrees (CRS84); "
                                        "reproject the GeoJSON to EPSG:4326")
            out.append(rings)
        return cls(polygons=tuple(out))

    def bbox(self) -> tuple[float, float, float, float]:
        pts = np.array([p for poly in self.polygons for ring in poly for p in ring])
        return float(pts[:, 0].min()), float(pts[:, 1].min()), float(pts[:, 0].max()), float(pts[:, 1].max())

    def contains(self, lon: np.ndarray, lat: np.ndarray) -> np.ndarray:
        """Even-odd point-in-polygon over all rings (holes excluded), vectorised."""
        inside = np.zeros(lon.shape, dtype=bool)
        for poly in self.polygons:
            in_poly = np.zeros(lon.shape, dtype=bool)
            for ring in poly:
                r = np.asarray(ring)
                x1, y1 = r[:-1, 0], r[:-1, 1]
                x2, y2 = r[1:, 0], r[1:, 1]
                for a, b, c, d in zip(x1, y1, x2, y2):
                    cond = (b > lat) != (d > lat)
                    with np.errstate(divide="ignore", invalid="ignore"):
                        xint = a + (lat - b) * (c - a) / (d - b)
                    in_poly ^= cond & (lon < xint)
            inside |= in_poly
        return inside

    def sample_points(self, step_deg: float) -> tuple[np.ndarray, np.ndarray]:
        """Grid points inside the AOI plus all its vertices (so thin AOIs are never missed)."""
        minlon, minlat, maxlon, maxlat = self.bbox()
        lons = np.arange(minlon, maxlon + step_deg, step_deg)
        lats = np.arange(minlat, maxlat + step_deg, step_deg)
        glon, glat = np.meshgrid(np.clip(lons, minlon, maxlon), np.clip(lats, minlat, maxlat))
        glon, glat = glon.ravel(), glat.ravel()
        keep = self.contains(glon, glat)
        verts = np.array([p for poly in self.polygons for ring in poly for p in ring])
        return np.concatenate([glon[keep], verts[:, 0]]), np.concatenate([glat[keep], verts[:, 1]])


def tiles_for_aoi(aoi: AOI, *, k: int = 1, max_points: int = 400_000) -> list[str]:
    """Tile keys (whole tiles, or k×k sub-tiles) that together cover the AOI.

    Each AOI point belongs to exactly one MGRS 100 km square, whose tile covers it; with k > 1 the
    point's sub-tile is found on that tile's pixel grid. Sampling is dense enough (≤ 1 km, and
    finer than a sub-tile) to catch the narrow squares at UTM zone edges.
    """
    if k < 1 or TILE_PIXELS % k:
        raise TileError(f"sub-tiling k={k} does not divide {TILE_PIXELS}; use one of "
                        f"{', '.join(map(str, valid_subdivisions()[:16]))}, …")
    minlon, minlat, maxlon, maxlat = aoi.bbox()
    if minlat < -80 or maxlat > 84:
        raise TileError("the AOI reaches beyond 80°S..84°N, where Sentinel-2 has no MGRS tiles; clip it")
    sub_m = TILE_PIXELS * PIXEL_SIZE_M / k
    step = min(0.01, sub_m / 3 / 111_000.0)
    area_pts = ((maxlon - minlon) / step + 1) * ((maxlat - minlat) / step + 1)
    if area_pts > max_points:
        step *= math.sqrt(area_pts / max_points)
    lon, lat = aoi.sample_points(step)
    if lon.size == 0:
        raise TileError("no point of the AOI could be sampled; check that the polygon is not degenerate")
    squares: dict[str, list[int]] = {}
    valid = s2_tile_names()
    todo = np.arange(lon.size)
    for offset in (0, -1, 1):  # own zone first; partial squares at zone edges → the neighbour's tiles
        if todo.size == 0:
            break
        names = lonlat_to_square(lon[todo], lat[todo], zone_offset=offset)
        left = []
        for i, name in zip(todo, names):
            if name in valid and (offset == 0 or _tile_contains(mgrs_tile(name), lon[i], lat[i])):
                squares.setdefault(name, []).append(int(i))
            else:
                left.append(i)
        todo = np.asarray(left, dtype=int)
    if not squares:
        raise TileError("the AOI lies outside every Sentinel-2 tile (the S2 grid does not cover the open ocean); "
                        "check the coordinates (lon, lat order)")
    keys: set[str] = set()
    for name, idx in squares.items():
        tile = mgrs_tile(name)
        if k == 1:
            keys.add(name)
            continue
        x, y = lonlat_to_utm(tile.epsg, lon[idx], lat[idx])
        size = TILE_PIXELS // k
        cols = np.floor((x - tile.x0) / PIXEL_SIZE_M / size).astype(int)
        rows = np.floor((tile.y0 - y) / PIXEL_SIZE_M / size).astype(int)
        ok = (rows >= 0) & (rows < k) & (cols >= 0) & (cols < k)
        for r, c in set(zip(rows[ok].tolist(), cols[ok].tolist())):
            keys.add(subtile(name, k, r, c).key)
    return sorted(keys)


def _tile_contains(tile: Tile, lon: float, lat: float) -> bool:
    x, y = lonlat_to_utm(tile.epsg, lon, lat)
    minx, miny, maxx, maxy = tile.bounds
    return bool(minx <= float(x) < maxx and miny < float(y) <= maxy)


def parse_bbox(text: str) -> AOI:
    try:
        parts = [float(v) for v in text.split(",")]
    except ValueError:
        raise TileError(f"bbox {text!r} must be four comma-separated numbers: minlon,minlat,maxlon,maxlat") from None
    if len(parts) != 4:
        raise TileError(f"bbox {text!r} must have 4 numbers (minlon,minlat,maxlon,maxlat), got {len(parts)}")
    return AOI.from_bbox(*parts)


def chip_windows(height: int, width: int, chip: int) -> list[tuple[int, int, int, int]]:
    """Chips of ``chip`` px on a regular grid from the upper-left corner: (row, col, y_off, x_off).

    Only whole chips are cut. The remainder at the east/south edge (< one chip) is not embedded:
    for whole tiles it lies in the 9.8 km overlap that the neighbouring tile covers.
    """
    return [(r, c, r * chip, c * chip) for r in range(height // chip) for c in range(width // chip)]

