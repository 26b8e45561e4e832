"""A stand-in for the earthengine-api package (``import ee``), for tests without network.

It implements the small part of the public ``ee`` API the gee provider uses — ``ee.Initialize``,
``ee.ServiceAccountCredentials``, ``ee.ImageCollection`` with its filter/map/link/reduce chain,
``ee.Image`` methods, ``ee.Filter``, ``ee.Geometry.Rectangle``, ``ee.Dictionary``, ``ee.Reducer``,
``ee.data.computePixels`` / ``setDeadline`` / ``setMaxRetries`` — and nothing of the provider itself:

- collections hold scene property dicts; ``filterDate`` / ``filter`` are evaluated on them so
  ``size().getInfo()`` answers like the server would;
- every object records the expression chain, rendered by ``str()`` (e.g.
  ``ImageCollection('X').filterDate('2024-03-01', '2024-04-01').median()``), so tests can check
  the collection, filters, masks and reducers the provider built;
- ``computePixels`` validates the request like the server (NUMPY_NDARRAY, grid with dimensions,
  affineTransform and crsCode, ≤ 32768 px per side, ≤ ``max_bytes`` uncompressed), records it, and
  returns deterministic pixels that depend only on the world coordinates of each pixel centre, so a
  stitched tile can be compared with a direct evaluation on the tile grid;
- faults are injected per call (``compute_faults`` / ``getinfo_faults``: exceptions raised in order);
  ``compute_gate(params)`` (optional) runs inside each computePixels call before it answers — a test
  can stall a request there; ``max_in_flight`` records the most concurrent computePixels calls seen.
"""

from __future__ import annotations

import json
import sys
import threading
import types
from typing import Any, Callable

import numpy as np

MAX_BYTES = 48 * 1024 * 1024
MAX_SIDE = 32768


class EEException(Exception):
    """Like ee.ee_exception.EEException."""


class HttpError(Exception):
    """Shaped like googleapiclient.errors.HttpError: ``resp.status``."""

    def __init__(self, status: int, reason: str):
        super().__init__(f"<HttpError {status}: {reason}>")
        self.resp = types.SimpleNamespace(status=status)


def _r(v: Any) -> str:
    if isinstance(v, Expr):
        return str(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_r(x) for x in v) + "]"
    return repr(v)


class Expr:
    """A recorded ee object: ``parent.op(args)``."""

    def __init__(self, text: str):
        self._text = text

    def __str__(self) -> str:
        return self._text

    __repr__ = __str__

    def _call(self, cls, op: str, *args: Any, **kw: Any):
        inner = ", ".join([_r(a) for a in args] + [f"{k}={_r(v)}" for k, v in kw.items()])
        return cls(f"{self._text}.{op}({inner})")


class Geometry(Expr):
    @staticmethod
    def Rectangle(coords, proj=None, geodesic=None, *a, **kw):  # noqa: N802 - ee naming
        g = Geometry(f"Geometry.Rectangle({_r(list(coords))}, {_r(proj)}, {_r(geodesic)})")
        g.coords, g.proj, g.geodesic = list(coords), proj, geodesic
        return g


class Filter(Expr):
    def __init__(self, text: str, test: Callable[[dict], bool]):
        super().__init__(text)
        self.test = test

    @staticmethod
    def lte(name, value):
        return Filter(f"Filter.lte({name!r}, {value!r})", lambda p: p.get(name) is not None and p[name] <= value)

    @staticmethod
    def eq(name, value):
        return Filter(f"Filter.eq({name!r}, {value!r})", lambda p: p.get(name) == value)

    @staticmethod
    def listContains(name, value):  # noqa: N802
        return Filter(f"Filter.listContains({name!r}, {value!r})", lambda p: value in (p.get(name) or []))


class Reducer(Expr):
    @staticmethod
    def min():
        return Reducer("Reducer.min()")

    @staticmethod
    def median():
        return Reducer("Reducer.median()")


class Number(Expr):
    def __init__(self, text: str, value: Any, owner: "FakeEE"):
        super().__init__(text)
        self.value, self.owner = value, owner

    def getInfo(self):  # noqa: N802
        self.owner._getinfo_hook(self)
        return self.value


class Image(Expr):
    _METHODS = ("select", "updateMask", "gte", "lt", "eq", "neq", "remap", "round", "toUint16", "toFloat",
                "unmask", "addBands", "rename", "reduce", "And", "Or", "Not", "multiply")

    def __getattr__(self, op: str):
        if op not in Image._METHODS:
            raise AttributeError(f"fake ee.Image has no method {op!r}")
        return lambda *a, **kw: self._call(Image, op, *a, **kw)


class ImageCollection(Expr):
    def __init__(self, collection_id: str | None = None, *, _text: str | None = None, _scenes=None,
                 _owner: "FakeEE | None" = None):
        owner = _owner or FakeEE.current
        super().__init__(_text or f"ImageCollection({collection_id!r})")
        self.owner = owner
        if _scenes is None:
            if collection_id not in owner.catalog:
                raise EEException(f"ImageCollection.load: ImageCollection asset '{collection_id}' not found.")
            _scenes = list(owner.catalog[collection_id])
        self.scenes = _scenes

    def _derive(self, op: str, scenes, *args, **kw) -> "ImageCollection":
        inner = ", ".join([_r(a) for a in args] + [f"{k}={_r(v)}" for k, v in kw.items()])
        return ImageCollection(_text=f"{self._text}.{op}({inner})", _scenes=scenes, _owner=self.owner)

    def filterBounds(self, geometry):  # noqa: N802
        if not isinstance(geometry, Geometry):
            raise EEException("filterBounds needs a Geometry")
        return self._derive("filterBounds", [s for s in self.scenes if s.get("intersects", True)], geometry)

    def filterDate(self, start, end):  # noqa: N802
        return self._derive("filterDate", [s for s in self.scenes if start <= s["date"] < end], start, end)

    def filter(self, flt: Filter):
        return self._derive("filter", [s for s in self.scenes if flt.test(s)], flt)

    def linkCollection(self, other, linkedBands=None, *a, **kw):  # noqa: N802
        if not isinstance(other, ImageCollection):
            raise EEException("linkCollection needs an ImageCollection")
        return self._derive("linkCollection", self.scenes, other, linkedBands)

    def map(self, fn):
        body = fn(Image("<img>"))
        if not isinstance(body, Image):
            raise EEException("map() function must return an Image")
        return self._derive("map", self.scenes, body)

    def select(self, bands):
        return self._derive("select", self.scenes, bands)

    def sort(self, prop, ascending=True):
        return self._derive("sort", sorted(self.scenes, key=lambda s: s["date"]), prop)

    def size(self):
        return Number(f"{self._text}.size()", len(self.scenes), self.owner)

    def median(self):
        return self._call(Image, "median")

    def mosaic(self):
        return self._call(Image, "mosaic")

    def count(self):
        return self._call(Image, "count")


class Dictionary(Expr):
    def __init__(self, d: dict):
        super().__init__("Dictionary({" + ", ".join(f"{k!r}: {_r(v)}" for k, v in d.items()) + "})")
        self.d = d

    def getInfo(self):  # noqa: N802
        FakeEE.current._getinfo_hook(self)
        return {k: (v.value if isinstance(v, Number) else v) for k, v in self.d.items()}


# --- deterministic pixels --------------------------------------------------------------------------
def s2_value(band_index: int, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """DN of band ``band_index`` at pixel-centre world coordinates (x, y)."""
    c, r = np.floor(x / 10).astype(np.int64), np.floor(y / 10).astype(np.int64)
    return ((c * 7 + r * 13 + 97 * band_index) % 9000 + 1).astype(np.uint16)


def s1_value(band_index: int, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    c, r = np.floor(x / 10).astype(np.int64), np.floor(y / 10).astype(np.int64)
    return (((c * 3 + r * 5) % 1000) / 10000.0 + 0.01 * (band_index + 1)).astype(np.float32)


def default_valid(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """3 observations, except a diagonal pattern of pixels without any (cloud everywhere)."""
    c, r = np.floor(x / 10).astype(np.int64), np.floor(y / 10).astype(np.int64)
    return np.where((c + r) % 11 == 0, 0, 3).astype(np.uint16)


_DTYPES = {"VV": np.float32, "VH": np.float32}


class FakeEE:
    """The fake earthengine-api; ``.module`` is what ``import ee`` returns while installed."""

    current: "FakeEE"

    def __init__(self, catalog: dict[str, list[dict]] | None = None, *,
                 valid: Callable[[np.ndarray, np.ndarray], np.ndarray] = default_valid,
                 max_bytes: int = MAX_BYTES):
        self.catalog = catalog or {}
        self.valid = valid
        self.max_bytes = max_bytes
        self.lock = threading.Lock()
        self.requests: list[dict] = []
        self.getinfo_calls: list[str] = []
        self.init_calls: list[dict] = []
        self.credentials_calls: list[dict] = []
        self.deadline_ms: int | None = None
        self.max_retries: int | None = None  # earthengine-api's own retry count (5 until set)
        self.compute_gate: Callable[[dict], None] | None = None
        self.in_flight = 0
        self.max_in_flight = 0
        self.compute_faults: list[BaseException] = []
        self.getinfo_faults: list[BaseException] = []
        self.compute_calls = 0
        self.threads: set[str] = set()
        self.module = self._build_module()

    # --- module -----------------------------------------------------------------------------------
    def _build_module(self) -> types.ModuleType:
        ee = types.ModuleType("ee")
        ee.__version__ = "0.0-fake"
        ee.Initialize = self.Initialize
        ee.ServiceAccountCredentials = self.ServiceAccountCredentials
        ee.ImageCollection = ImageCollection
        ee.Image = Image
        ee.Filter = Filter
        ee.Geometry = Geometry
        ee.Dictionary = Dictionary
        ee.Reducer = Reducer
        ee.EEException = EEException
        ee.ee_exception = types.SimpleNamespace(EEException=EEException)
        ee.oauth = types.SimpleNamespace(SCOPES=["https://www.googleapis.com/auth/earthengine",
                                                 "https://www.googleapis.com/auth/cloud-platform"])
        ee.data = types.SimpleNamespace(
            computePixels=self.computePixels, setDeadline=self.setDeadline, setMaxRetries=self.setMaxRetries,
            HIGH_VOLUME_API_BASE_URL="https://earthengine-highvolume.googleapis.com")
        return ee

    def install(self, monkeypatch) -> "FakeEE":
        FakeEE.current = self
        monkeypatch.setitem(sys.modules, "ee", self.module)
        return self

    # --- auth -------------------------------------------------------------------------------------
    def Initialize(self, credentials="persistent", url=None, cloud_api_key=None, http_transport=None,  # noqa: N802
                   project=None):
        with self.lock:
            self.init_calls.append({"credentials": credentials, "url": url, "project": project})

    def ServiceAccountCredentials(self, email=None, key_file=None, key_data=None):  # noqa: N802
        with open(key_file) as fh:
            info = json.load(fh)  # raises on a non-JSON key, like google-auth does
        if info.get("type") != "service_account" or "private_key" not in info:
            raise ValueError("Service account info was not in the expected format")
        self.credentials_calls.append({"email": email, "key_file": key_file})
        return types.SimpleNamespace(service_account_email=info.get("client_email"), kind="service_account")

    def setDeadline(self, ms):  # noqa: N802
        self.deadline_ms = ms

    def setMaxRetries(self, n):  # noqa: N802
        if not 0 <= n < 100:
            raise ValueError("max_retries must be in 0..99")
        self.max_retries = n

    # --- calls ------------------------------------------------------------------------------------
    def _getinfo_hook(self, obj) -> None:
        with self.lock:
            self.getinfo_calls.append(str(obj))
            fault = self.getinfo_faults.pop(0) if self.getinfo_faults else None
        if fault is not None:
            raise fault

    def computePixels(self, params: dict) -> np.ndarray:  # noqa: N802
        with self.lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return self._compute_pixels(params)
        finally:
            with self.lock:
                self.in_flight -= 1

    def _compute_pixels(self, params: dict) -> np.ndarray:
        with self.lock:
            self.compute_calls += 1
            self.threads.add(threading.current_thread().name)
            fault = self.compute_faults.pop(0) if self.compute_faults else None
        if self.compute_gate is not None:
            self.compute_gate(params)
        if fault is not None:
            raise fault
        expr = params.get("expression")
        if not isinstance(expr, Image):
            raise EEException("computePixels: expression must be an ee.Image")
        if params.get("fileFormat") != "NUMPY_NDARRAY":
            raise EEException(f"unsupported fileFormat {params.get('fileFormat')!r} in this fake")
        grid = params["grid"]
        dims, aff, crs = grid["dimensions"], grid["affineTransform"], grid["crsCode"]
        w, h = int(dims["width"]), int(dims["height"])
        if not (0 < w <= MAX_SIDE and 0 < h <= MAX_SIDE):
            raise EEException(f"Grid dimensions must be in 1..{MAX_SIDE}; got {w}x{h}")
        if set(aff) != {"scaleX", "shearX", "translateX", "shearY", "scaleY", "translateY"}:
            raise EEException(f"bad affineTransform {aff}")
        if not str(crs).startswith("EPSG:"):
            raise EEException(f"bad crsCode {crs!r}")
        bands = list(params["bandIds"])
        dtypes = [(b, _DTYPES.get(b, np.uint16)) for b in bands]
        nbytes = w * h * sum(np.dtype(t).itemsize for _, t in dtypes)
        if nbytes > self.max_bytes:
            raise EEException(f"Total request size ({nbytes} bytes) must be less than or equal to "
                              f"{self.max_bytes} bytes.")
        with self.lock:
            self.requests.append({k: v for k, v in params.items()})
        x = aff["translateX"] + (np.arange(w) + 0.5) * aff["scaleX"]
        y = aff["translateY"] + (np.arange(h) + 0.5) * aff["scaleY"]
        xx, yy = np.meshgrid(x, y)
        out = np.zeros((h, w), dtype=dtypes)
        valid = self.valid(xx, yy)
        data_bands = [b for b in bands if b != "valid_count"]
        for i, b in enumerate(data_bands):
            v = s1_value(i, xx, yy) if b in _DTYPES else s2_value(i, xx, yy)
            out[b] = np.where(valid > 0, v, 0)  # masked pixels come back as the unmask value
        if "valid_count" in bands:
            out["valid_count"] = valid
        return out
