"""A tiny STAC API on 127.0.0.1 and the small COGs it points at, generated (nothing binary is committed).

``build_catalog(root, base_url, conventions)`` writes Sentinel-2 L2A scenes (12 band COGs at their native
10/20/60 m resolutions on the MGRS tile's grid, plus SCL at 20 m) and Sentinel-1 scenes (VV/VH
float32 linear at 10 m; ``sentinel-1-rtc`` for Planetary Computer, a calibrated ``sentinel-1-grd`` for
Earth Search) around the test tile, and returns their STAC items. Pixel values are a function of
the pixel's position in the MGRS tile, the band and the scene (``s2_dn``, ``s1_linear``), so a test can
compute the expected composite at any 10 m pixel.

``StacServer(root, items)`` serves, with ``http.server``:

- ``GET /`` (landing page with the item-search conformance class), ``GET /collections[/<id>]``;
- ``GET|POST /search`` filtering by collections, datetime interval and ``intersects``/``bbox`` (shapely);
- ``GET|HEAD /<path>.tif`` the COGs, with single byte-range requests (what GDAL's /vsicurl/ sends);
- ``GET /api/sas/v1/token/<account>/<container>``: a Planetary-Computer-like SAS token; with
  ``require_token`` the files answer 403 unless the query string carries it;
- fault injection: ``faults[path_prefix] = [status, ...]`` answers those statuses first;
  ``max_scenes_in_flight`` records the most scenes whose files were being served at once
  (``file_delay_s`` holds each file response).

Run ``python tests/providers/stac_fixtures.py OUT_DIR`` to write the fixture files and items for a look.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import numpy as np

from rs_embed_assets.grid import mgrs_tile, subtile, utm_to_lonlat

TILE = subtile("31UFU", 36, 21, 12)  # 305 × 305 px, the tile the tests composite
MGRS = mgrs_tile("31UFU")
# the scenes' extent: 420 × 420 px at 10 m on the MGRS tile's 60 m lattice, around TILE
AREA_X0 = MGRS.x0 + 36_000.0
AREA_Y0 = MGRS.y0 - 63_960.0
AREA_PX = 420
S2_RES = {"B1": 60, "B2": 10, "B3": 10, "B4": 10, "B5": 20, "B6": 20, "B7": 20, "B8": 10, "B8A": 20, "B9": 60,
          "B11": 20, "B12": 20, "SCL": 20}
S2_ORDER = ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B11", "B12")
EARTH_SEARCH_KEYS = {"B1": "coastal", "B2": "blue", "B3": "green", "B4": "red", "B5": "rededge1", "B6": "rededge2",
                     "B7": "rededge3", "B8": "nir", "B8A": "nir08", "B9": "nir09", "B11": "swir16",
                     "B12": "swir22", "SCL": "scl", "VV": "vv", "VH": "vh"}
PC_KEYS = {b: (b if b in ("B8A", "SCL") else f"B{int(b[1:]):02d}") for b in S2_RES} | {"VV": "vv", "VH": "vh"}

# (id, date, eo:cloud_cover, processing baseline, boa_offset_applied, clouds)
S2_SCENES = [
    ("S2A_31UFU_20240503", "2024-05-03", 10.0, "05.10", False, "north"),   # +1000 DN offset to remove
    ("S2B_31UFU_20240513", "2024-05-13", 20.0, "03.01", False, "west"),    # old baseline: no offset
    ("S2A_31UFU_20240523", "2024-05-23", 25.0, "05.10", True, "none"),     # offset already removed
    ("S2B_31UFU_20240528", "2024-05-28", 80.0, "05.10", False, "none"),    # too cloudy: filtered out
    ("S2A_31UFU_20240602", "2024-06-02", 5.0, "05.10", False, "none"),     # next month
]
S1_SCENES = [  # (id, date, orbit, polarisations, nan rows)
    ("S1A_IW_20240504", "2024-05-04", "ascending", ["VV", "VH"], (0, 20)),
    ("S1A_IW_20240516", "2024-05-16", "descending", ["VV", "VH"], (0, 0)),
    ("S1A_IW_20240528", "2024-05-28", "ascending", ["VV", "VH"], (0, 0)),
    ("S1A_IW_20240510", "2024-05-10", "ascending", ["HH", "HV"], (0, 0)),  # no VV/VH: filtered out
]


def s2_dn(band: str, scene: int, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Harmonised DN (no offset) of ``band`` in scene ``scene`` at world coordinates, at the band's native res."""
    res = S2_RES[band]
    c = np.floor((x - MGRS.x0) / res).astype(np.int64)
    r = np.floor((MGRS.y0 - y) / res).astype(np.int64)
    return ((c * 7 + r * 13 + 97 * S2_ORDER.index(band)) % 3000 + 1000 + 200 * scene).astype(np.float64)


def s2_valid(scene: int, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Whether the scene's SCL keeps the pixel (its cloud / shadow pattern, on the 20 m SCL grid)."""
    clouds = S2_SCENES[scene][5]
    c = np.floor((x - AREA_X0) / 20).astype(np.int64)
    r = np.floor((AREA_Y0 - y) / 20).astype(np.int64)
    if clouds == "north":
        return r >= 50  # rows 0..49 at 20 m: cloud (class 9)
    if clouds == "west":
        return c >= 50  # cols 0..49 at 20 m: cloud shadow (class 3)
    return np.ones(np.broadcast(x, y).shape, bool)


def s1_linear(band: int, scene: int, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    c = np.floor((x - MGRS.x0) / 10).astype(np.int64)
    r = np.floor((MGRS.y0 - y) / 10).astype(np.int64)
    return (((c * 3 + r * 5) % 1000) / 20000.0 + 0.01 * (band + 1) + 0.005 * scene).astype(np.float32)


def _write_cog(path: Path, data: np.ndarray, res: float, *, nodata, epsg: int = 32631) -> None:
    import rasterio
    from affine import Affine

    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", driver="COG", width=data.shape[1], height=data.shape[0], count=1, dtype=data.dtype,
                       crs=f"EPSG:{epsg}", transform=Affine(res, 0, AREA_X0, 0, -res, AREA_Y0), nodata=nodata,
                       compress="deflate", blocksize=128, overviews="none") as dst:
        dst.write(data, 1)


def _grid(res: float):
    n = int(AREA_PX * 10 / res)
    x = AREA_X0 + (np.arange(n) + 0.5) * res
    y = AREA_Y0 - (np.arange(n) + 0.5) * res
    return np.meshgrid(x, y)


def _footprint():
    xs = [AREA_X0, AREA_X0 + AREA_PX * 10, AREA_X0 + AREA_PX * 10, AREA_X0, AREA_X0]
    ys = [AREA_Y0, AREA_Y0, AREA_Y0 - AREA_PX * 10, AREA_Y0 - AREA_PX * 10, AREA_Y0]
    lon, lat = utm_to_lonlat(32631, xs, ys)
    ring = [[float(a), float(b)] for a, b in zip(lon, lat)]
    return {"type": "Polygon", "coordinates": [ring]}, [min(lon), min(lat), max(lon), max(lat)]


def build_catalog(root: Path, base_url: str, conventions: str = "earth-search") -> list[dict]:
    """Write the COGs under ``root/files`` and return the STAC items (hrefs on ``base_url``)."""
    keys = EARTH_SEARCH_KEYS if conventions == "earth-search" else PC_KEYS
    # Planetary Computer hrefs are /<storage account>/<container>/... (what its SAS tokens are issued for)
    prefix = "sentinel2l2a01/sentinel2-l2" if conventions == "planetary-computer" else "files/s2"
    geom, bbox = _footprint()
    items = []
    for i, (sid, date, cc, baseline, applied, _clouds) in enumerate(S2_SCENES):
        assets = {}
        for band in list(S2_ORDER) + ["SCL"]:
            res = S2_RES[band]
            x, y = _grid(res)
            if band == "SCL":
                scl = np.where(s2_valid(i, x, y), 4, 9 if S2_SCENES[i][5] == "north" else 3).astype(np.uint8)
                data = scl
            else:
                removed = applied and conventions == "earth-search"  # Planetary Computer never harmonises
                offset = 1000 if float(baseline) >= 4 and not removed else 0
                data = (s2_dn(band, i, x, y) + offset).astype(np.uint16)
            rel = f"{prefix}/{sid}/{band}.tif"
            _write_cog(root / rel, data, res, nodata=0)
            assets[keys[band]] = {"href": f"{base_url}/{rel}", "type": "image/tiff; application=geotiff; "
                                  "profile=cloud-optimized", "roles": ["data"]}
        props = {"datetime": f"{date}T10:30:00Z", "eo:cloud_cover": cc, "s2:processing_baseline": baseline,
                 "proj:epsg": 32631, "s2:mgrs_tile": "31UFU"}
        if conventions == "earth-search":
            props["earthsearch:boa_offset_applied"] = applied
        items.append(_item(sid, "sentinel-2-l2a", geom, bbox, props, assets))
    # a scene far away: the search must not return it
    far = {"type": "Polygon", "coordinates": [[[20, 40], [21, 40], [21, 41], [20, 41], [20, 40]]]}
    items.append(_item("S2A_34TDL_20240510", "sentinel-2-l2a", far, [20, 40, 21, 41],
                       {"datetime": "2024-05-10T10:30:00Z", "eo:cloud_cover": 1.0, "s2:processing_baseline": "05.10"},
                       {k: {"href": f"{base_url}/files/missing.tif"} for k in keys.values()}))
    s1_prefix = "sentinel1euwestrtc/rtc" if conventions == "planetary-computer" else "files/s1"
    x, y = _grid(10)
    for i, (sid, date, orbit, pols, nan_rows) in enumerate(S1_SCENES):
        assets = {}
        for b, band in enumerate(("VV", "VH")):
            data = s1_linear(b, i, x, y)
            data[nan_rows[0]:nan_rows[1]] = np.nan
            rel = f"{s1_prefix}/{sid}/{band.lower()}.tif"
            _write_cog(root / rel, data, 10, nodata=np.nan)
            assets[keys[band]] = {"href": f"{base_url}/{rel}", "type": "image/tiff", "roles": ["data"]}
        props = {"datetime": f"{date}T06:00:00Z", "sar:instrument_mode": "IW", "sar:polarizations": pols,
                 "sat:orbit_state": orbit, "sar:product_type": "RTC"}
        s1_collection = "sentinel-1-rtc" if conventions == "planetary-computer" else "sentinel-1-grd"
        items.append(_item(sid, s1_collection, geom, bbox, props, assets))
    return items


def _item(iid, collection, geom, bbox, props, assets) -> dict:
    return {"type": "Feature", "stac_version": "1.0.0", "id": iid, "collection": collection, "geometry": geom,
            "bbox": [float(v) for v in bbox], "properties": props, "assets": assets, "links": []}


# --- the server ---------------------------------------------------------------------------------------
class StacServer:
    TOKEN = "st=2024-05-01&se=2099-01-01&sp=rl&sig=FAKE-SIGNATURE-0000"

    def __init__(self, root: Path, items: list[dict] | None = None, *, require_token: bool = False):
        self.root = Path(root)
        self.items = items or []
        self.require_token = require_token
        self.faults: dict[str, list[int]] = {}
        self.log: list[tuple[str, str, int]] = []
        self.scenes_in_flight: dict[str, int] = {}  # scene folder → file requests being served
        self.max_scenes_in_flight = 0
        self.file_delay_s = 0.0  # hold each file response this long (to make overlapping reads visible)
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):  # quiet
                pass

            def do_HEAD(self):  # noqa: N802
                server._handle(self, head=True)

            def do_GET(self):  # noqa: N802
                server._handle(self)

            def do_POST(self):  # noqa: N802
                n = int(self.headers.get("Content-Length") or 0)
                server._handle(self, body=json.loads(self.rfile.read(n) or b"{}"))

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "StacServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def requests(self, prefix: str) -> list[tuple[str, str, int]]:
        return [r for r in self.log if r[1].startswith(prefix)]

    # --- routing ----------------------------------------------------------------------------------
    def _send(self, h, status: int, body: bytes = b"", ctype: str = "application/json", headers=None, head=False):
        h.send_response(status)
        h.send_header("Content-Type", ctype)
        h.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        if not head:
            h.wfile.write(body)

    def _json(self, h, obj, status=200):
        self._send(h, status, json.dumps(obj).encode())

    def _handle(self, h, body=None, head=False):
        parts = urlsplit(h.path)
        path = parts.path
        with self.lock:
            fault = None
            for prefix, codes in self.faults.items():
                if path.startswith(prefix) and codes:
                    fault = codes.pop(0)
                    break
        status = fault or 200
        try:
            if fault:
                self._send(h, fault, b'{"code": "fault"}', head=head)
            elif path in ("", "/"):
                self._json(h, self._landing())
            elif path == "/collections":
                self._json(h, {"collections": [self._collection(c) for c in self._collection_ids()], "links": []})
            elif path.startswith("/collections/"):
                self._json(h, self._collection(path.split("/")[2]))
            elif path == "/search":
                params = body if body is not None else {k: v[0] for k, v in parse_qs(parts.query).items()}
                self._json(h, self._search(params))
            elif path.startswith("/api/sas/v1/token/"):
                self._json(h, {"msft:expiry": (dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1))
                               .isoformat().replace("+00:00", "Z"), "token": self.TOKEN})
            elif path.endswith(".tif"):
                scene = path.rsplit("/", 2)[-2]
                with self.lock:
                    self.scenes_in_flight[scene] = self.scenes_in_flight.get(scene, 0) + 1
                    self.max_scenes_in_flight = max(self.max_scenes_in_flight, len(self.scenes_in_flight))
                try:
                    if self.file_delay_s:
                        threading.Event().wait(self.file_delay_s)
                    status = self._file(h, path, parts.query, head)
                finally:
                    with self.lock:
                        self.scenes_in_flight[scene] -= 1
                        if not self.scenes_in_flight[scene]:
                            del self.scenes_in_flight[scene]
            else:
                status = 404
                self._json(h, {"code": "NotFound"}, 404)
        finally:
            with self.lock:
                self.log.append((h.command, path, status))

    def _landing(self):
        return {"type": "Catalog", "id": "fake", "stac_version": "1.0.0", "description": "test STAC API",
                "conformsTo": ["https://api.stacspec.org/v1.0.0/core", "https://api.stacspec.org/v1.0.0/item-search",
                               "https://api.stacspec.org/v1.0.0/collections"],
                "links": [{"rel": "self", "href": self.url + "/", "type": "application/json"},
                          {"rel": "root", "href": self.url + "/", "type": "application/json"},
                          {"rel": "search", "href": self.url + "/search", "type": "application/geo+json",
                           "method": "POST"},
                          {"rel": "search", "href": self.url + "/search", "type": "application/geo+json",
                           "method": "GET"},
                          {"rel": "data", "href": self.url + "/collections", "type": "application/json"}]}

    def _collection_ids(self):
        return sorted({it["collection"] for it in self.items})

    def _collection(self, cid):
        return {"type": "Collection", "id": cid, "stac_version": "1.0.0", "description": cid, "license": "proprietary",
                "extent": {"spatial": {"bbox": [[-180, -90, 180, 90]]}, "temporal": {"interval": [[None, None]]}},
                "links": [{"rel": "self", "href": f"{self.url}/collections/{cid}"}]}

    def _search(self, params):
        import shapely

        cols = params.get("collections")
        if isinstance(cols, str):
            cols = cols.split(",")
        geom = params.get("intersects")
        if isinstance(geom, str):
            geom = json.loads(geom)
        if geom is None and params.get("bbox"):
            b = params["bbox"]
            b = [float(v) for v in (b.split(",") if isinstance(b, str) else b)]
            geom = shapely.geometry.mapping(shapely.box(*b))
        start, end = None, None
        if params.get("datetime"):
            a, _, b = str(params["datetime"]).partition("/")
            start = None if a in ("", "..") else a
            end = None if b in ("", "..") else b
        out = []
        for it in self.items:
            if cols and it["collection"] not in cols:
                continue
            t = it["properties"]["datetime"]
            if (start and _ts(t) < _ts(start)) or (end and _ts(t) > _ts(end)):
                continue
            if geom and not shapely.intersects(shapely.geometry.shape(geom), shapely.geometry.shape(it["geometry"])):
                continue
            out.append(it)
        limit = int(params.get("limit") or 1000)
        return {"type": "FeatureCollection", "features": out[:limit], "links": [],
                "numberReturned": len(out[:limit])}

    def _file(self, h, path, query, head):
        if self.require_token and self.TOKEN not in query:
            self._send(h, 403, b"AuthenticationFailed: no SAS token", ctype="text/plain", head=head)
            return 403
        f = (self.root / path.lstrip("/")).resolve()
        if not str(f).startswith(str(self.root.resolve())) or not f.is_file():
            self._send(h, 404, b"not found", ctype="text/plain", head=head)
            return 404
        data = f.read_bytes()
        rng = h.headers.get("Range")
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng or "")
        if m:
            a = int(m[1])
            b = min(int(m[2]) if m[2] else len(data) - 1, len(data) - 1)
            self._send(h, 206, data[a:b + 1], ctype="image/tiff", head=head,
                       headers={"Content-Range": f"bytes {a}-{b}/{len(data)}", "Accept-Ranges": "bytes"})
            return 206
        self._send(h, 200, data, ctype="image/tiff", head=head, headers={"Accept-Ranges": "bytes"})
        return 200


def _ts(text: str) -> float:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "stac-fixtures")
    items = build_catalog(out, "http://127.0.0.1:PORT")
    (out / "items.json").write_text(json.dumps({"type": "FeatureCollection", "features": items}, indent=1))
    print(f"wrote {len(items)} items and their COGs under {out}")
