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


MAX_SUBDIVISION = TILE_PIXELS // 64  # sub-tiles stay at least 64 px (one FoMo chip) wide


def valid_subdivisions() -> list[int]:
    return list(range(1, MAX_SUBDIVISION + 1))


def subtile_span(k: int, i: int) -> tuple[int, int]:
    """Pixel rows (or cols) [start, end) of sub-tile row (or col) ``i`` of a k×k split.

    Boundaries are ``floor(i * 10980 / k)``: sizes differ by at most one pixel when k does not divide
    10 980, and the k sub-tiles always cover the tile exactly.
    """
    return i * TILE_PIXELS // k, (i + 1) * TILE_PIXELS // k


def subtile(name: str, k: int, row: int, col: int) -> Tile:
    if not 1 <= k <= MAX_SUBDIVISION:
        raise TileError(f"sub-tiling k={k} is out of range; use 1 (whole tiles) to {MAX_SUBDIVISION} "
                        f"(sub-tiles of at least 64 px)")
    if not (0 <= row < k and 0 <= col < k):
        raise TileError(f"sub-tile r{row:02d}-c{col:02d} is outside a {k}×{k} split; rows/cols run 0..{k - 1}")
    base = mgrs_tile(name)
    y0, y1 = subtile_span(k, row)
    x0, x1 = subtile_span(k, col)
    return Tile(mgrs=name, epsg=base.epsg, x0=base.x0 + x0 * PIXEL_SIZE_M,
                y0=base.y0 - y0 * PIXEL_SIZE_M, width=x1 - x0, height=y1 - y0, k=k, row=row, col=col)


def parse_tile_key(key: str) -> Tile:
    """``31UFU`` or ``31UFU-k30-r04-c12`` → Tile; a clear error names the expected forms.

    Only the canonical spelling is a tile key (two-digit-or-more row/col without extra zeros:
    ``r04``, ``c12``); ``31UFU-k36-r21-c012`` is refused with the canonical key, so no tile ever has two
    partitions. ``canonical_tile_key`` normalises a loose spelling instead.
    """
    tile = _parse_loose(key)
    if tile.key != key:
        raise TileError(f"tile key {key!r} is not canonical; the tile's key is {tile.key!r} (use that one, or add "
                        "tiles with `rs-embed-assets tiles add`, which normalises keys)")
    return tile


def canonical_tile_key(key: str) -> str:
    """The canonical spelling of a tile key: ``31ufu-k36-r21-c012`` → ``31UFU-k36-r21-c12``."""
    return _parse_loose(key).key


def _parse_loose(key: str) -> Tile:
    text = str(key or "").strip()
    m = _KEY_RE.match(text) or _KEY_RE.match(text.upper().replace("-K", "-k").replace("-R", "-r").replace("-C", "-c"))
    if not m:
        raise TileError(f"unknown tile key {key!r}; expected an MGRS tile id like '31UFU' or a sub-tile like "
                        "'31UFU-k30-r04-c12' (add tiles with `rs-embed-assets tiles add --bbox ...`)")
    if m["k"] is None:
        return mgrs_tile(m["mgrs"])
    return subtile(m["mgrs"], int(m["k"]), int(m["r"]), int(m["c"]))


# --- areas of interest ---------------------------------------------------------------------------
_VECTOR_SUFFIXES = (".gpkg", ".shp", ".zip", ".fgb", ".parquet", ".geoparquet", ".gml", ".kml", ".sqlite")
_DENSIFY_DEG = 0.01  # AOI edges are straight in lon/lat; densified before projecting to UTM (≤ 1.1 km steps)


@dataclass(frozen=True)
class AOI:
    """An area of interest in CRS84: a list of polygons, each a list of rings [(lon, lat), ...]."""

    polygons: tuple[tuple[tuple[tuple[float, float], ...], ...], ...]

    @classmethod
    def from_bbox(cls, minlon: float, minlat: float, maxlon: float, maxlat: float) -> "AOI":
        vals = (minlon, minlat, maxlon, maxlat)
        if not all(math.isfinite(v) for v in vals):
            raise TileError(f"bbox {vals} has a non-finite number; give minlon,minlat,maxlon,maxlat in degrees")
        lat_bad = not (-90 <= minlat <= 90 and -90 <= maxlat <= 90)
        if lat_bad and -90 <= minlon <= 90 and -90 <= maxlon <= 90:
            raise TileError(f"bbox ({minlon}, {minlat}, {maxlon}, {maxlat}) has latitudes outside ±90 but its "
                            "longitudes would be valid latitudes: it looks like lat/lon are swapped; give "
                            f"minlon,minlat,maxlon,maxlat (e.g. {minlat},{minlon},{maxlat},{maxlon})")
        if not (-180 <= minlon < maxlon <= 180 and -90 <= minlat < maxlat <= 90):
            raise TileError(f"bbox ({minlon}, {minlat}, {maxlon}, {maxlat}) is invalid; give "
                            "minlon,minlat,maxlon,maxlat in degrees with min < max (lon -180..180, lat -90..90)")
        if minlat < -80 or maxlat > 84:
            hint = ""
            if -80 <= minlon and maxlon <= 84 and -180 <= minlat and maxlat <= 180:
                hint = (f" (if you meant lon {minlat}..{maxlat}, lat {minlon}..{maxlon}, the bbox is swapped: give "
                        "minlon,minlat,maxlon,maxlat)")
            raise TileError("the AOI reaches beyond 80°S..84°N, where Sentinel-2 uses no UTM/MGRS tiles; "
                            f"clip it to that latitude range{hint}")
        ring = ((minlon, minlat), (maxlon, minlat), (maxlon, maxlat), (minlon, maxlat), (minlon, minlat))
        return cls(polygons=((ring,),))

    @classmethod
    def from_geojson(cls, obj: dict | str | Path) -> "AOI":
        """A GeoJSON FeatureCollection / Feature / (Multi)Polygon / GeometryCollection in lon/lat."""
        source = "the GeoJSON AOI"
        if isinstance(obj, (str, Path)):
            is_text = isinstance(obj, str) and obj.lstrip()[:1] in ("{", "[")
            if not is_text and not Path(obj).is_file():
                raise TileError(f"AOI file {obj} does not exist; give a GeoJSON file path or GeoJSON text")
            if not is_text:
                source = f"AOI file {obj}"
            text = str(obj) if is_text else Path(obj).read_text()
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                raise TileError(f"{source} is not valid GeoJSON ({exc}); give a FeatureCollection, Feature, "
                                "Polygon or MultiPolygon in lon/lat") from None
        polys: list = []

        def visit(g: object, where: str) -> None:
            if not isinstance(g, dict):
                raise TileError(f"{source}: {where} is {type(g).__name__} {str(g)[:60]!r}, not a GeoJSON object; "
                                "give a FeatureCollection, Feature, Polygon or MultiPolygon")
            t = g.get("type")
            if t == "FeatureCollection":
                feats = g.get("features")
                if not isinstance(feats, list):
                    raise TileError(f"{source}: {where} has no 'features' list")
                for i, f in enumerate(feats):
                    visit(f, f"feature {i}")
            elif t == "Feature":
                if g.get("geometry") is not None:
                    visit(g["geometry"], f"{where} geometry")
            elif t == "Polygon":
                polys.append((_check_polygon(g.get("coordinates"), f"{source}: {where} Polygon"), where))
            elif t == "MultiPolygon":
                coords = g.get("coordinates")
                if not isinstance(coords, list) or not coords:
                    raise TileError(f"{source}: {where} MultiPolygon has no coordinates; give a list of polygons")
                for j, poly in enumerate(coords):
                    polys.append((_check_polygon(poly, f"{source}: {where} MultiPolygon part {j}"), where))
            elif t == "GeometryCollection":
                for j, gg in enumerate(g.get("geometries") or []):
                    visit(gg, f"{where} geometry {j}")
            else:
                raise TileError(f"{source}: GeoJSON type {t!r} ({where}) cannot describe an area; use Polygon or "
                                "MultiPolygon features")

        visit(obj, "the top-level object")
        if not polys:
            raise TileError(f"{source} contains no polygons; add a Polygon or MultiPolygon geometry")
        return cls(polygons=tuple(p for p, _ in polys))

    @classmethod
    def from_shapely(cls, geom, source: str = "the AOI") -> "AOI":
        """A shapely (Multi)Polygon / GeometryCollection in lon/lat (CRS84)."""
        import shapely

        geom = shapely.force_2d(geom)
        if not geom.is_valid:
            geom = shapely.make_valid(geom)
        parts = [g for g in getattr(geom, "geoms", [geom]) if g.geom_type in ("Polygon", "MultiPolygon")]
        polys = []
        for part in parts:
            for poly in getattr(part, "geoms", [part]):
                if poly.is_empty:
                    continue
                rings = [poly.exterior, *poly.interiors]
                polys.append(tuple(tuple((float(x), float(y)) for x, y in r.coords) for r in rings))
        if not polys:
            raise TileError(f"{source} contains no polygon with an area; give Polygon or MultiPolygon geometries")
        aoi = cls(polygons=tuple(polys))
        for poly in aoi.polygons:
            for ring in poly:
                _check_lonlat(ring, source)
        return aoi

    @classmethod
    def from_file(cls, path: str | Path) -> "AOI":
        """Any vector file GeoPandas reads (GeoPackage, Shapefile, GeoParquet, FlatGeobuf, GeoJSON, ...).

        Geometries are reprojected to lon/lat from the file's CRS; a file without a CRS must already be
        in lon/lat. All polygon features together form the AOI.
        """
        p = Path(path).expanduser()
        if not p.exists():
            raise TileError(f"AOI file {p} does not exist")
        if p.suffix.lower() in (".json", ".geojson") and p.is_file():
            try:
                return cls.from_geojson(p)
            except TileError:
                raise
        try:
            import geopandas as gpd

            if p.suffix.lower() in (".parquet", ".geoparquet"):
                gdf = gpd.read_parquet(p)
            else:
                gdf = gpd.read_file(p)
        except Exception as exc:  # pyogrio / pyarrow errors: say which file and what GeoPandas said
            raise TileError(f"AOI file {p} could not be read as a vector file ({type(exc).__name__}: "
                            f"{str(exc)[:200]}); give a GeoPackage, Shapefile, GeoParquet or GeoJSON file") from None
        if len(gdf) == 0:
            raise TileError(f"AOI file {p} has no features")
        if gdf.crs is not None and not gdf.crs.equals("EPSG:4326") and not gdf.crs.equals("OGC:CRS84"):
            gdf = gdf.to_crs("EPSG:4326")
        import shapely

        geom = shapely.union_all(gdf.geometry.dropna().values)
        return cls.from_shapely(geom, source=f"AOI file {p}")

    @property
    def geometry(self):
        """The AOI as one valid shapely geometry in lon/lat."""
        import shapely

        polys = [shapely.Polygon(poly[0], poly[1:]) for poly in self.polygons]
        geom = shapely.MultiPolygon(polys) if len(polys) > 1 else polys[0]
        if not geom.is_valid:
            geom = shapely.make_valid(geom)
        return shapely.union_all([geom])

    def bbox(self) -> tuple[float, float, float, float]:
        pts = np.array([p for poly in self.polygons for ring in poly for p in ring])
        return float(pts[:, 0].min()), float(pts[:, 1].min()), float(pts[:, 0].max()), float(pts[:, 1].max())

    def contains(self, lon: np.ndarray, lat: np.ndarray) -> np.ndarray:
        """Whether points lie inside the AOI (holes excluded)."""
        import shapely

        return shapely.contains_xy(self.geometry, np.asarray(lon, float), np.asarray(lat, float))


def _check_polygon(coords: object, where: str) -> tuple:
    if not isinstance(coords, list) or not coords:
        raise TileError(f"{where} has empty coordinates; a Polygon is a list of rings, each a closed list of "
                        "at least 4 [lon, lat] positions")
    rings = []
    for i, ring in enumerate(coords):
        if not isinstance(ring, list) or len(ring) < 4:
            raise TileError(f"{where}: ring {i} has {len(ring) if isinstance(ring, list) else 0} positions; a ring "
                            "needs at least 4 [lon, lat] positions, the last equal to the first")
        pts = []
        for pos in ring:
            if (not isinstance(pos, (list, tuple)) or len(pos) < 2
                    or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in pos[:2])):
                raise TileError(f"{where}: ring {i} has the position {str(pos)[:40]}; positions are [lon, lat] numbers")
            pts.append((float(pos[0]), float(pos[1])))
        if pts[0] != pts[-1]:
            pts.append(pts[0])
        _check_lonlat(pts, where)
        rings.append(tuple(pts))
    return tuple(rings)


def _check_lonlat(ring, where: str) -> None:
    for lon, lat in ring:
        if not (-180 <= lon <= 180 and -90 <= lat <= 90):
            swapped = -90 <= lon <= 90 and -180 <= lat <= 180
            raise TileError(f"{where}: coordinate ({lon}, {lat}) is not lon/lat in degrees (CRS84)"
                            + ("; it looks like [lat, lon] order — GeoJSON positions are [lon, lat]" if swapped else
                               "; reproject the AOI to EPSG:4326"))


def parse_bbox(text: str) -> AOI:
    try:
        parts = [float(v) for v in text.split(",")]
    except ValueError:
        raise TileError(f"bbox {text!r} must be four comma-separated numbers: minlon,minlat,maxlon,maxlat") from None
    if len(parts) != 4:
        raise TileError(f"bbox {text!r} must have 4 numbers (minlon,minlat,maxlon,maxlat), got {len(parts)}")
    return AOI.from_bbox(*parts)


def load_aoi(*, bbox: str | None = None, geojson: str | Path | None = None, file: str | Path | None = None) -> AOI:
    """The AOI from exactly one of a bbox string, a GeoJSON file/text or any vector file."""
    given = [v for v in (bbox, geojson, file) if v]
    if len(given) != 1:
        raise TileError("give exactly one AOI: --bbox minlon,minlat,maxlon,maxlat, --geojson FILE or --file "
                        "VECTOR_FILE (GeoPackage, Shapefile, GeoParquet, ...)")
    if bbox:
        return parse_bbox(bbox)
    if geojson:
        return AOI.from_geojson(geojson)
    return AOI.from_file(file)


# --- AOI → tiles -------------------------------------------------------------------------------------
@lru_cache(maxsize=128)
def _zone_squares(epsg: int) -> dict[tuple[int, int], str]:
    """Sentinel-2 tiles of one UTM zone and hemisphere, by their 100 km square (easting/1e5, northing/1e5).

    Keyed by geometry, not by name: a square that straddles a latitude-band edge is one tile, named
    with whichever band letter ESA's list uses (30UVU, not 30TVU).
    """
    zone, north = epsg % 100, epsg < 32700
    out: dict[tuple[int, int], str] = {}
    prefix = f"{zone:02d}"
    for name in s2_tile_names():
        if name.startswith(prefix) and (name[2] >= "N") == north:
            t = mgrs_tile(name)
            out[(int(t.x0 // SQUARE_M) + (1 if t.x0 % SQUARE_M else 0), int(round(t.y0 / SQUARE_M)) - 1)] = name
    return out


def _project(geom, src: int, dst: int):
    import shapely

    tr = _transformer(src, dst)
    return shapely.transform(geom, lambda xy: np.column_stack(tr.transform(xy[:, 0], xy[:, 1])))


def _tile_box(tile: Tile):
    import shapely

    return shapely.box(*tile.bounds)


def _interior_hits(boxes, geom) -> np.ndarray:
    """Boxes whose interiors meet the geometry's interior (touching along an edge does not count)."""
    import shapely

    return shapely.intersects(boxes, geom) & ~shapely.touches(boxes, geom)


def aoi_tile_pieces(aoi: AOI) -> list[tuple[str, object]]:
    """(MGRS tile, the part of the AOI that tile serves, in the tile's UTM CRS), covering the AOI exactly.

    The AOI is cut by UTM zone and hemisphere, projected, and intersected with the 100 km MGRS squares
    of the zone: each square's part goes to its Sentinel-2 tile. What no square tile covers (partial
    squares at zone edges) goes to the tiles of the neighbouring zones that reach over the edge.
    """
    import shapely

    minlon, minlat, maxlon, maxlat = aoi.bbox()
    if minlat < -80 or maxlat > 84:
        raise TileError("the AOI reaches beyond 80°S..84°N, where Sentinel-2 has no MGRS tiles; clip it")
    geom = aoi.geometry
    if geom.is_empty or geom.area == 0:
        raise TileError("the AOI has no area (a degenerate polygon); give a polygon with distinct corners")
    pieces: list[tuple[str, object]] = []
    zones = range(int(math.floor((minlon + 180) / 6)), int(math.floor((min(maxlon, 179.999999) + 180) / 6)) + 1)
    for zi in zones:
        lon0 = -180.0 + 6 * zi
        for north, (la0, la1) in ((True, (0.0, 84.0)), (False, (-80.0, 0.0))):
            part = shapely.intersection(geom, shapely.box(lon0, la0, lon0 + 6, la1))
            if part.is_empty or part.area == 0:
                continue
            epsg = (32600 if north else 32700) + zi + 1
            part_utm = _project(shapely.segmentize(part, _DENSIFY_DEG), 4326, epsg)
            squares = _zone_squares(epsg)
            bx0, by0, bx1, by1 = part_utm.bounds
            keys = [(ix, iy) for ix in range(int(bx0 // SQUARE_M), int(bx1 // SQUARE_M) + 1)
                    for iy in range(int(by0 // SQUARE_M), int(by1 // SQUARE_M) + 1) if (ix, iy) in squares]
            covered = []
            if keys:
                arr = np.array(keys, dtype=float) * SQUARE_M
                boxes = shapely.box(arr[:, 0], arr[:, 1], arr[:, 0] + SQUARE_M, arr[:, 1] + SQUARE_M)
                hit = _interior_hits(boxes, part_utm)
                for key, box in zip(np.array(keys)[hit], boxes[hit]):
                    pieces.append((squares[tuple(key)], shapely.intersection(box, part_utm)))
                    covered.append(box)
            left = shapely.difference(part_utm, shapely.union_all(covered)) if covered else part_utm
            if left.area > 1.0:  # m²: partial squares at the zone edge → the neighbouring zones' tiles
                pieces.extend(_neighbour_pieces(_project(left, epsg, 4326), epsg))
    if not pieces:
        raise TileError("the AOI lies outside every Sentinel-2 tile (the S2 grid does not cover the open ocean); "
                        "check the coordinates (lon, lat order)")
    return pieces


def _neighbour_pieces(left_lonlat, epsg: int) -> list[tuple[str, object]]:
    import shapely

    out = []
    zone = epsg % 100
    for dz in (-1, 1):
        nz = (zone - 1 + dz) % 60 + 1
        nepsg = epsg - zone + nz
        left = _project(left_lonlat, 4326, nepsg)
        if left.is_empty or left.area <= 1.0:
            continue
        bx0, by0, bx1, by1 = left.bounds
        cands = []
        for name in _zone_squares(nepsg).values():
            t = mgrs_tile(name)
            tx0, ty0, tx1, ty1 = t.bounds
            if tx0 < bx1 and bx0 < tx1 and ty0 < by1 and by0 < ty1:
                box = _tile_box(t)
                area = shapely.intersection(box, left).area
                if area > 0:
                    cands.append((area, name, box))
        for _, name, box in sorted(cands, key=lambda c: (-c[0], c[1])):  # greedy: largest share first
            piece = shapely.intersection(box, left)
            if piece.area > 1.0:
                out.append((name, piece))
                left = shapely.difference(left, box)
            if left.area <= 1.0:
                return out
        left_lonlat = _project(left, nepsg, 4326)
    return out


def tiles_for_aoi(aoi: AOI, *, k: int = 1) -> list[str]:
    """Tile keys (whole tiles, or k×k sub-tiles) whose footprints together cover the AOI exactly.

    Every part of the AOI is served by one tile (the tile of its MGRS square, or at zone edges a
    neighbouring zone's tile reaching over); with k > 1, the sub-tiles of that tile whose squares meet
    that part. Touching along an edge does not count as covering.
    """
    import shapely

    if not 1 <= k <= MAX_SUBDIVISION:
        raise TileError(f"sub-tiling k={k} is out of range; use 1 (whole tiles) to {MAX_SUBDIVISION}")
    keys: set[str] = set()
    edges = np.array([subtile_span(k, i)[0] for i in range(k)] + [TILE_PIXELS]) * PIXEL_SIZE_M
    for name, piece in aoi_tile_pieces(aoi):
        if k == 1:
            keys.add(name)
            continue
        tile = mgrs_tile(name)
        bx0, by0, bx1, by1 = piece.bounds
        def idx(v: float) -> int:
            return int(np.searchsorted(edges, v, side="right")) - 1

        c0, c1 = max(0, idx(bx0 - tile.x0)), min(k - 1, idx(bx1 - tile.x0))
        r0, r1 = max(0, idx(tile.y0 - by1)), min(k - 1, idx(tile.y0 - by0))
        rr, cc = np.meshgrid(np.arange(r0, r1 + 1), np.arange(c0, c1 + 1), indexing="ij")
        rr, cc = rr.ravel(), cc.ravel()
        boxes = shapely.box(tile.x0 + edges[cc], tile.y0 - edges[rr + 1], tile.x0 + edges[cc + 1], tile.y0 - edges[rr])
        shapely.prepare(piece)
        hit = _interior_hits(boxes, piece)
        keys.update(subtile(name, k, int(r), int(c)).key for r, c in zip(rr[hit], cc[hit]))
    return sorted(keys)


def tile_footprint_lonlat(tile: Tile, step_m: float = 1000.0):
    """The tile's footprint as a lon/lat polygon (edges densified)."""
    import shapely

    return _project(shapely.segmentize(_tile_box(tile), step_m), tile.epsg, 4326)
