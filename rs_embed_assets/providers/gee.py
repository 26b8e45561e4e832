"""The ``gee`` provider: real Sentinel-2 L2A and Sentinel-1 GRD monthly composites from Earth Engine.

Every composite is computed server-side and pulled with ``ee.data.computePixels`` directly on the
tile's own UTM grid at 10 m (the request grid is the tile's CRS and affine transform; there is no
Web-Mercator step and no ``sampleRectangle``). The tile is cut into blocks that respect the
computePixels limits (≤ ``max_request_bytes`` of uncompressed pixels, ≤ 32 768 px per side),
fetched in parallel by a bounded thread pool and stitched into the tile array.

Sentinel-2 (``COPERNICUS/S2_SR_HARMONIZED``)
    filterBounds(tile footprint) · filterDate(month) · [MGRS_TILE == tile] ·
    CLOUDY_PIXEL_PERCENTAGE <= cloudy_pct · per-pixel cloud mask (Cloud Score+ ``cs_cdf >=
    cs_threshold`` linked by ``system:index``, or SCL classes, or none) · median (or mosaic) of the
    12 bands, rounded to uint16 DN · ``valid_count`` = unmasked observations per pixel (the minimum
    over the 12 bands). Pixels without a valid observation get ``valid_count`` 0 and data 0.

Sentinel-1 (``COPERNICUS/S1_GRD_FLOAT``, linear σ0; or ``COPERNICUS/S1_GRD`` in dB)
    filterBounds · filterDate · [orbit pass] · instrumentMode == IW (relaxed when it empties the
    collection) · VV and VH present · median (or mosaic) · ``valid_count``; invalid pixels are NaN.

An empty collection is not an exception: the composite is ``empty_composite`` with the reason and
the per-filter scene counts in ``provider_info``.

Robustness: this module is the only retry layer (earthengine-api's own retries are set to 0 with
``ee.data.setMaxRetries`` at initialisation, so attempts never multiply). Transient failures are
retried with exponential backoff and jitter: HTTP 429/500/502/503/504 (by status code), dropped or
failed connections (DNS failure, connection reset/refused, ``ssl.SSLEOFError``,
``http.client.IncompleteRead``, google-auth ``TransportError``, request timeouts), and the few Earth
Engine messages that mean "try again" (matched at the start of the message: "Too many concurrent
aggregations", "Computation timed out", "Quota exceeded", ...). Everything else is permanent and fails
at once — a number or "timed out" elsewhere in an error's text does not make it transient. Every
request has a deadline (``request_timeout_s``, default 300 s, ``ee.data.setDeadline``). The number of
requests in flight is bounded per process (``RS_EMBED_GEE_MAX_CONCURRENT``, default 8) however many
composites run at once, and a tile fails as soon as one of its blocks failed for good: its other blocks
stop (queued, waiting or backing off) and the composite raises without waiting for them.

Authentication follows Earth Engine conventions: a service-account key file (``service_account_key``
or ``GOOGLE_APPLICATION_CREDENTIALS``), otherwise application-default credentials, otherwise the
credentials stored by ``earthengine authenticate``; the Cloud project comes from ``project``,
``EE_PROJECT`` or ``GOOGLE_CLOUD_PROJECT``. Earth Engine is initialised once per process, lazily and
under a lock. Credentials and key contents are never logged nor recorded.
"""

from __future__ import annotations

import concurrent.futures as cf
import http.client
import importlib
import json
import logging
import math
import os
import random
import re
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import xarray as xr

from ..composite import (S1_BANDS, S2_BANDS, empty_composite, make_composite, month_start_end, parse_month,
                         sensor_spec)
from ..grid import PIXEL_SIZE_M, Tile
from .base import Provider, ProviderError

log = logging.getLogger(__name__)

# --- Earth Engine facts ------------------------------------------------------------------------------
S2_COLLECTION = "COPERNICUS/S2_SR_HARMONIZED"
CS_PLUS_COLLECTION = "GOOGLE/CLOUD_SCORE_PLUS/V1/S2_HARMONIZED"
S1_COLLECTION_LINEAR = "COPERNICUS/S1_GRD_FLOAT"
S1_COLLECTION_DB = "COPERNICUS/S1_GRD"
COMPUTE_PIXELS_MAX_BYTES = 48 * 1024 * 1024  # server limit on one request's uncompressed pixels
COMPUTE_PIXELS_MAX_SIDE = 32768  # server limit on grid width / height
COUNT_BAND = "valid_count"
# SCL: 0 no data, 1 saturated/defective, 2 dark area/topographic shadow, 3 cloud shadow, 4 vegetation,
# 5 not vegetated, 6 water, 7 unclassified, 8 cloud medium prob., 9 cloud high prob., 10 thin cirrus,
# 11 snow/ice.
DEFAULT_SCL_EXCLUDE = (0, 1, 3, 8, 9, 10)
_DTYPE_BYTES = {"uint16": 2, "float32": 4}

DEFAULT_REQUEST_TIMEOUT_S = 300.0  # Earth Engine's own limit on an interactive computation is ~5 min
DEFAULT_MAX_CONCURRENT = 8  # computePixels requests in flight per process
MAX_CONCURRENT_ENV = "RS_EMBED_GEE_MAX_CONCURRENT"
_RETRY_STATUS = {429, 500, 502, 503, 504}
# Earth Engine messages (EEException carries the server's message, not its status) that mean "try again";
# matched at the START of the message only, so an asset id or a number elsewhere in the text never counts.
_RETRYABLE_MESSAGE = re.compile(
    r"^\s*(?:too many concurrent aggregations|computation timed out|too many requests|quota exceeded|"
    r"rate limit exceeded|resource[_ ]exhausted|earth engine (?:memory )?capacity exceeded|"
    r"an internal error has occurred|internal error\.?$|the service is currently unavailable|backend error|"
    r"deadline exceeded|(?:internal server error|bad gateway|service unavailable|gateway timeout)\s*$)",
    re.IGNORECASE)
# transient transport failures, by type (checked along the exception's cause/context chain)
_TRANSIENT_TYPES: tuple[type[BaseException], ...] = (
    TimeoutError, socket.timeout, ConnectionError, socket.gaierror, ssl.SSLEOFError, ssl.SSLZeroReturnError,
    http.client.IncompleteRead, http.client.RemoteDisconnected, http.client.BadStatusLine)
_TRANSIENT_TYPE_NAMES = {  # third-party classes, by name so no import is needed
    "TransportError",  # google.auth.exceptions.TransportError (token refresh over the network)
    "ServerNotFoundError",  # httplib2: DNS failure
    "ProtocolError", "ReadTimeoutError", "ConnectTimeoutError", "NewConnectionError",  # urllib3
    "ReadTimeout", "ConnectTimeout", "ChunkedEncodingError",  # requests
}
_TOO_LARGE = re.compile(r"total request size|user memory limit exceeded|response size exceeds|too many pixels",
                        re.IGNORECASE)

# --- process-wide initialisation and concurrency ------------------------------------------------------
_INIT_LOCK = threading.Lock()
_INIT_STATE: dict[str, Any] = {"key": None}
_SLOTS_LOCK = threading.Lock()
_SLOTS: dict[str, Any] = {"limit": None, "sem": None}


def process_slots(limit: int | None = None) -> threading.BoundedSemaphore:
    """The process-wide bound on Earth Engine requests in flight (all composites, all threads).

    Sized once from ``limit``, else ``RS_EMBED_GEE_MAX_CONCURRENT``, else 8; ``set_max_concurrent``
    resizes it (tests, or before the first composite).
    """
    with _SLOTS_LOCK:
        if _SLOTS["sem"] is None:
            n = limit or int(os.environ.get(MAX_CONCURRENT_ENV) or DEFAULT_MAX_CONCURRENT)
            if n < 1:
                raise ProviderError(f"{MAX_CONCURRENT_ENV}={n} must be >= 1")
            _SLOTS.update(limit=n, sem=threading.BoundedSemaphore(n))
        return _SLOTS["sem"]


def set_max_concurrent(limit: int | None) -> None:
    """Resize the process-wide request bound (None: from the environment on next use)."""
    with _SLOTS_LOCK:
        _SLOTS.update(limit=None, sem=None)
    if limit is not None:
        process_slots(limit)


def max_concurrent() -> int:
    process_slots()
    return int(_SLOTS["limit"])


def reset_initialization() -> None:
    """Forget that Earth Engine was initialised in this process (tests, or switching accounts)."""
    with _INIT_LOCK:
        _INIT_STATE["key"] = None


def _import_ee():
    try:
        return importlib.import_module("ee")
    except ImportError as exc:  # pragma: no cover - earthengine-api is a dependency
        raise ProviderError("the gee provider needs earthengine-api: pip install earthengine-api") from exc


# --- block layout -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Block:
    row: int  # pixel offsets in the tile
    col: int
    height: int
    width: int


def plan_blocks(height: int, width: int, bytes_per_pixel: int, max_bytes: int,
                max_side: int = COMPUTE_PIXELS_MAX_SIDE) -> list[Block]:
    """Cut a height × width grid into near-equal blocks of ≤ max_bytes and ≤ max_side px per side.

    Square blocks of the largest side allowed by the byte budget are counted per axis, then the
    axis is divided evenly among them (10 980 px with a 26 B/px, 32 MiB budget → 10 × 1 098 px).
    Blocks cover the grid exactly, row-major from the north-west corner.
    """
    if bytes_per_pixel <= 0 or max_bytes < bytes_per_pixel:
        raise ProviderError(f"max_request_bytes={max_bytes} cannot hold one pixel of {bytes_per_pixel} bytes")
    side = max(1, min(max_side, COMPUTE_PIXELS_MAX_SIDE, math.isqrt(max_bytes // bytes_per_pixel)))
    ny, nx = math.ceil(height / side), math.ceil(width / side)
    bh, bw = math.ceil(height / ny), math.ceil(width / nx)
    blocks = []
    for r in range(0, height, bh):
        for c in range(0, width, bw):
            blocks.append(Block(r, c, min(bh, height - r), min(bw, width - c)))
    return blocks


def _split(block: Block) -> list[Block]:
    """Four quarters of a block (for a request the server found too large)."""
    h1, w1 = max(1, block.height // 2), max(1, block.width // 2)
    parts = []
    for r, h in ((block.row, h1), (block.row + h1, block.height - h1)):
        for c, w in ((block.col, w1), (block.col + w1, block.width - w1)):
            if h > 0 and w > 0:
                parts.append(Block(r, c, h, w))
    return parts


# --- errors -------------------------------------------------------------------------------------------
def _status_code(exc: BaseException) -> int | None:
    """The HTTP status an exception carries (HttpError.resp.status, .status_code, .code), if any."""
    resp = getattr(exc, "resp", None)  # googleapiclient.errors.HttpError
    candidates = [getattr(resp, "status", None)] + [getattr(exc, a, None) for a in ("status_code", "status", "code")]
    for v in candidates:
        if isinstance(v, bool):
            continue
        try:
            code = int(v) if isinstance(v, (int, str)) else None
        except ValueError:
            code = None
        if code is not None and 100 <= code <= 599:
            return code
    return None


def _chain(exc: BaseException):
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def is_retryable(exc: BaseException) -> bool:
    """Transient: HTTP 429/5xx by status, a transport failure by type, or an Earth Engine "try again" message.

    Decided by status code and exception type first; the message is consulted only for an Earth Engine
    error that carries no status, and only its start is matched.
    """
    for e in _chain(exc):
        code = _status_code(e)
        if code is not None:
            return code in _RETRY_STATUS
        if isinstance(e, _TRANSIENT_TYPES) or any(c.__name__ in _TRANSIENT_TYPE_NAMES for c in type(e).__mro__):
            return True
        if isinstance(e, ssl.SSLError) and "EOF" in str(e):  # e.g. "UNEXPECTED_EOF_WHILE_READING"
            return True
    return bool(_RETRYABLE_MESSAGE.match(str(exc)))


def _is_too_large(exc: BaseException) -> bool:
    return bool(_TOO_LARGE.search(str(exc)))


class _Aborted(Exception):
    """Another block of the same tile failed; this one stops without retrying."""


class _Stats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests = 0
        self.retries = 0
        self.splits = 0
        self.abort = threading.Event()  # set when one block failed: the others stop early

    def add(self, **kw: int) -> None:
        with self.lock:
            for k, v in kw.items():
                setattr(self, k, getattr(self, k) + v)


# --- the provider -------------------------------------------------------------------------------------
class GEEProvider(Provider):
    """Sentinel-2 / Sentinel-1 monthly composites from Earth Engine on the tile's UTM grid at 10 m."""

    name = "gee"
    synthetic = False

    def __init__(
        self,
        *,
        project: str | None = None,
        service_account_key: str | None = None,
        credentials: str = "auto",
        high_volume: bool = True,
        s2_collection: str = S2_COLLECTION,
        cloudy_pct: float = 30.0,
        cloud_mask: str = "cloud_score_plus",
        cs_collection: str = CS_PLUS_COLLECTION,
        cs_band: str = "cs_cdf",
        cs_threshold: float = 0.6,
        scl_exclude: Sequence[int] = DEFAULT_SCL_EXCLUDE,
        filter_mgrs_tile: bool = False,
        composite: str = "median",
        s1_units: str = "linear",
        s1_require_iw: bool = True,
        s1_relax_iw_on_empty: bool = True,
        s1_orbit: str | None = None,
        max_request_bytes: int = 32 * 1024 * 1024,
        max_block_px: int = COMPUTE_PIXELS_MAX_SIDE,
        max_workers: int = 8,
        max_retries: int = 6,
        backoff_s: float = 2.0,
        backoff_max_s: float = 120.0,
        request_timeout_s: float | None = DEFAULT_REQUEST_TIMEOUT_S,
        workload_tag: str | None = None,
        sleep: Callable[[float], None] | None = None,
        seed: int | None = None,
    ) -> None:
        if credentials not in ("auto", "service_account", "adc", "persistent"):
            raise ProviderError(f"credentials={credentials!r}; use auto, service_account, adc or persistent")
        if cloud_mask not in ("cloud_score_plus", "scl", "none"):
            raise ProviderError(f"cloud_mask={cloud_mask!r}; use cloud_score_plus (default), scl or none")
        if cs_band not in ("cs", "cs_cdf"):
            raise ProviderError(f"cs_band={cs_band!r}; Cloud Score+ bands are cs and cs_cdf")
        if not 0.0 <= float(cs_threshold) <= 1.0:
            raise ProviderError(f"cs_threshold={cs_threshold} must be in [0, 1] (0.5–0.65 are typical)")
        if not 0.0 <= float(cloudy_pct) <= 100.0:
            raise ProviderError(f"cloudy_pct={cloudy_pct} must be a percentage in [0, 100]")
        if composite not in ("median", "mosaic"):
            raise ProviderError(f"composite={composite!r}; use median or mosaic")
        if s1_units not in ("linear", "db"):
            raise ProviderError(f"s1_units={s1_units!r}; use linear (COPERNICUS/S1_GRD_FLOAT) or db (COPERNICUS/S1_GRD)")
        orbit = s1_orbit.upper() if s1_orbit else None
        if orbit not in (None, "ASCENDING", "DESCENDING"):
            raise ProviderError(f"s1_orbit={s1_orbit!r}; use ASCENDING, DESCENDING or leave it unset for both")
        bad = [c for c in scl_exclude if int(c) not in range(12)]
        if bad:
            raise ProviderError(f"scl_exclude has {bad}; SCL classes are 0..11")
        if not 0 < int(max_request_bytes) <= COMPUTE_PIXELS_MAX_BYTES:
            raise ProviderError(f"max_request_bytes={max_request_bytes} must be in 1..{COMPUTE_PIXELS_MAX_BYTES} "
                                "(computePixels refuses requests above 48 MiB)")
        if not 1 <= int(max_block_px) <= COMPUTE_PIXELS_MAX_SIDE:
            raise ProviderError(f"max_block_px={max_block_px} must be in 1..{COMPUTE_PIXELS_MAX_SIDE}")
        if int(max_workers) < 1:
            raise ProviderError(f"max_workers={max_workers} must be >= 1")
        if int(max_retries) < 0:
            raise ProviderError(f"max_retries={max_retries} must be >= 0")
        if request_timeout_s is not None and not 0 < float(request_timeout_s) <= 3600:
            raise ProviderError(f"request_timeout_s={request_timeout_s} must be in (0, 3600] seconds (default "
                                f"{DEFAULT_REQUEST_TIMEOUT_S:g}); a request without a deadline can hold a tile forever")
        self.project = project
        self.service_account_key = service_account_key
        self.credentials_mode = credentials
        self.high_volume = bool(high_volume)
        self.s2_collection = s2_collection
        self.cloudy_pct = float(cloudy_pct)
        self.cloud_mask = cloud_mask
        self.cs_collection = cs_collection
        self.cs_band = cs_band
        self.cs_threshold = float(cs_threshold)
        self.scl_exclude = tuple(sorted({int(c) for c in scl_exclude}))
        self.filter_mgrs_tile = bool(filter_mgrs_tile)
        self.composite_method = composite
        self.s1_units = s1_units
        self.s1_collection = S1_COLLECTION_LINEAR if s1_units == "linear" else S1_COLLECTION_DB
        self.s1_require_iw = bool(s1_require_iw)
        self.s1_relax_iw_on_empty = bool(s1_relax_iw_on_empty)
        self.s1_orbit = orbit
        self.max_request_bytes = int(max_request_bytes)
        self.max_block_px = int(max_block_px)
        self.max_workers = int(max_workers)
        self.max_retries = int(max_retries)
        self.backoff_s = float(backoff_s)
        self.backoff_max_s = float(backoff_max_s)
        self.request_timeout_s = DEFAULT_REQUEST_TIMEOUT_S if request_timeout_s is None else float(request_timeout_s)
        self.workload_tag = workload_tag
        self._sleep = sleep  # None: an interruptible wait (a failed tile stops its other blocks' backoff)
        self._rng = random.Random(seed)
        self._rng_lock = threading.Lock()
        self._auth_source: str | None = None
        self._project_source: str | None = None
        self._resolved_project: str | None = None

    # --- lineage ------------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "provider": self.name,
            "project": self.project or os.environ.get("EE_PROJECT") or os.environ.get("GOOGLE_CLOUD_PROJECT"),
            "auth": self._auth_source or self.credentials_mode,
            "endpoint": "high-volume" if self.high_volume else "standard",
            "grid": "tile UTM CRS at 10 m (computePixels)",
            "s2": {
                "collection": self.s2_collection, "cloudy_pct": self.cloudy_pct, "cloud_mask": self.cloud_mask,
                "filter_mgrs_tile": self.filter_mgrs_tile, "bands": list(S2_BANDS),
            },
            "s1": {
                "collection": self.s1_collection, "units": self.s1_units, "require_iw": self.s1_require_iw,
                "relax_iw_on_empty": self.s1_relax_iw_on_empty, "orbit": self.s1_orbit, "bands": list(S1_BANDS),
            },
            "composite": self.composite_method,
            "max_request_bytes": self.max_request_bytes,
            "max_block_px": self.max_block_px,
            "block_px": {s: self._block_side(s) for s in ("s2", "s1")},
            "max_workers": self.max_workers,
            "max_concurrent_per_process": max_concurrent(),
            "max_retries": self.max_retries,
            "ee_max_retries": 0,
            "backoff_s": self.backoff_s,
            "request_timeout_s": self.request_timeout_s,
        }
        if self.cloud_mask == "cloud_score_plus":
            d["s2"].update(cs_collection=self.cs_collection, cs_band=self.cs_band, cs_threshold=self.cs_threshold)
        elif self.cloud_mask == "scl":
            d["s2"]["scl_exclude"] = list(self.scl_exclude)
        return d

    def _bytes_per_pixel(self, sensor: str) -> int:
        spec = sensor_spec(sensor)
        return len(spec.bands) * _DTYPE_BYTES[spec.dtype] + 2  # + uint16 valid_count

    def _block_side(self, sensor: str) -> int:
        return max(1, min(self.max_block_px, math.isqrt(self.max_request_bytes // self._bytes_per_pixel(sensor))))

    def plan(self, sensor: str, tile: Tile) -> list[Block]:
        """The computePixels blocks for one tile."""
        return plan_blocks(tile.height, tile.width, self._bytes_per_pixel(sensor), self.max_request_bytes,
                           self.max_block_px)

    # --- auth ---------------------------------------------------------------------------------------
    def _resolve_credentials(self, ee) -> tuple[Any, str, str | None]:
        """(credentials object or 'persistent', source, project found with the credentials)."""
        key = self.service_account_key
        if key is None and self.credentials_mode in ("auto", "service_account"):
            env_key = os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
            if env_key and _is_service_account_file(env_key):
                key = env_key
        if self.credentials_mode == "service_account" and not key:
            raise ProviderError("credentials=service_account but no key file: set service_account_key or "
                                "GOOGLE_APPLICATION_CREDENTIALS to a service-account JSON key")
        if key and self.credentials_mode in ("auto", "service_account"):
            path = Path(key).expanduser()
            if not path.is_file():
                raise ProviderError(f"service-account key file {str(path)!r} does not exist; set service_account_key "
                                    "or GOOGLE_APPLICATION_CREDENTIALS to the JSON key of an account registered "
                                    "for Earth Engine")
            key_project = None
            try:
                key_project = json.loads(path.read_text()).get("project_id")
            except Exception:  # PEM keys or unreadable JSON: let earthengine-api report it
                pass
            try:
                creds = ee.ServiceAccountCredentials(None, key_file=str(path))
            except Exception as exc:
                # never include the key contents: only the exception type
                raise ProviderError(f"could not load the service-account key {str(path)!r} "
                                    f"({type(exc).__name__}); check that it is a valid JSON key") from None
            return creds, "service_account", key_project
        if self.credentials_mode in ("auto", "adc"):
            try:
                import google.auth
                from google.auth.exceptions import DefaultCredentialsError
            except ImportError:  # pragma: no cover - google-auth ships with earthengine-api
                google = None
            if google is not None:
                try:
                    creds, adc_project = google.auth.default(scopes=_ee_scopes(ee))
                    return creds, "application_default", adc_project
                except DefaultCredentialsError:
                    if self.credentials_mode == "adc":
                        raise ProviderError("no application-default credentials: run `gcloud auth "
                                            "application-default login` or set GOOGLE_APPLICATION_CREDENTIALS") from None
        if _persistent_credentials_exist():
            return "persistent", "earthengine_authenticate", None
        raise ProviderError("no Earth Engine credentials found: set GOOGLE_APPLICATION_CREDENTIALS (or the "
                            "service_account_key option) to a service-account JSON key, run `gcloud auth "
                            "application-default login`, or run `earthengine authenticate`; see docs/earth-engine.md")

    def _ensure_initialized(self):
        ee = _import_ee()
        with _INIT_LOCK:
            if _INIT_STATE["key"] is not None:
                if _INIT_STATE["key"] != self._init_key():
                    raise ProviderError(
                        f"Earth Engine is already initialised in this process for project "
                        f"{_INIT_STATE['project']!r} ({_INIT_STATE['auth']}); one process serves one Earth Engine "
                        "configuration — run this provider configuration in a separate process")
                self._auth_source, self._resolved_project = _INIT_STATE["auth"], _INIT_STATE["project"]
                return ee
            creds, source, cred_project = self._resolve_credentials(ee)
            project, psource = self.project, "option"
            if not project:
                for var in ("EE_PROJECT", "GOOGLE_CLOUD_PROJECT"):
                    if os.environ.get(var):
                        project, psource = os.environ[var], var
                        break
            if not project and cred_project:
                project, psource = cred_project, f"{source} credentials"
            if not project:
                raise ProviderError("no Google Cloud project for Earth Engine: set EE_PROJECT (or GOOGLE_CLOUD_PROJECT, "
                                    "or the provider option project) to a Cloud project registered for Earth Engine")
            kwargs: dict[str, Any] = {"credentials": creds, "project": project}
            if self.high_volume:
                kwargs["url"] = getattr(ee.data, "HIGH_VOLUME_API_BASE_URL",
                                        "https://earthengine-highvolume.googleapis.com")
            try:
                ee.Initialize(**kwargs)
                ee.data.setMaxRetries(0)  # one retry layer: ours (status, type and abort aware)
                ee.data.setDeadline(int(self.request_timeout_s * 1000))
            except ProviderError:
                raise
            except Exception as exc:
                raise ProviderError(f"Earth Engine initialisation failed for project {project!r} with {source} "
                                    f"credentials: {_short(exc)}; check that the project is registered for Earth "
                                    "Engine and the account has the Earth Engine Resource Viewer role") from None
            _INIT_STATE.update(key=self._init_key(), project=project, auth=source)
            self._auth_source, self._project_source, self._resolved_project = source, psource, project
            log.info("Earth Engine initialised: project=%s auth=%s endpoint=%s", project, source,
                     "high-volume" if self.high_volume else "standard")
            return ee

    def _init_key(self) -> tuple:
        return (self.project or os.environ.get("EE_PROJECT") or os.environ.get("GOOGLE_CLOUD_PROJECT"),
                self.service_account_key, self.credentials_mode, self.high_volume)

    # --- retries ------------------------------------------------------------------------------------
    def _backoff(self, attempt: int) -> float:
        with self._rng_lock:
            jitter = self._rng.uniform(0.5, 1.0)
        return min(self.backoff_max_s, self.backoff_s * (2 ** attempt)) * jitter

    def _with_retries(self, what: str, fn: Callable[[], Any], stats: _Stats | None = None,
                      split_ok: bool = False) -> Any:
        attempt = 0
        while True:
            try:
                return fn()
            except (ProviderError, _Aborted):
                raise
            except Exception as exc:
                if split_ok and _is_too_large(exc):
                    raise
                if not is_retryable(exc):
                    raise ProviderError(f"Earth Engine refused {what}: {_short(exc)} (not retryable)") from None
                if attempt >= self.max_retries:
                    raise ProviderError(f"Earth Engine {what} still failing after {attempt + 1} attempts: {_short(exc)}; "
                                        "quota or service trouble — lower max_workers, raise max_retries/backoff_s, "
                                        "or retry the run later") from None
                delay = self._backoff(attempt)
                if stats is not None:
                    if stats.abort.is_set():
                        raise _Aborted() from None
                    stats.add(retries=1)
                log.warning("Earth Engine %s failed (%s); retry %d/%d in %.1fs", what, _short(exc), attempt + 1,
                            self.max_retries, delay)
                self._wait(delay, stats)
                attempt += 1

    def _wait(self, delay: float, stats: _Stats | None) -> None:
        """Back off; a block stops waiting as soon as another block of its tile failed for good."""
        if self._sleep is not None:
            self._sleep(delay)
        elif stats is not None:
            stats.abort.wait(delay)
        else:
            time.sleep(delay)
        if stats is not None and stats.abort.is_set():
            raise _Aborted()

    # --- public entry -------------------------------------------------------------------------------
    def composite(self, sensor: str, tile: Tile, month: str) -> xr.Dataset:
        sensor_spec(sensor)
        month = parse_month(month)
        ee = self._ensure_initialized()
        if sensor == "s2":
            return self._s2(ee, tile, month)
        return self._s1(ee, tile, month)

    # --- Sentinel-2 ---------------------------------------------------------------------------------
    def _region(self, ee, tile: Tile):
        minx, miny, maxx, maxy = tile.bounds
        return ee.Geometry.Rectangle([minx, miny, maxx, maxy], tile.crs, False)

    def _s2(self, ee, tile: Tile, month: str) -> xr.Dataset:
        start, end = month_start_end(month)
        region = self._region(ee, tile)
        base = ee.ImageCollection(self.s2_collection).filterBounds(region).filterDate(start, end)
        filters = ["bounds", "date"]
        if self.filter_mgrs_tile:
            base = base.filter(ee.Filter.eq("MGRS_TILE", tile.mgrs))
            filters.append("mgrs_tile")
        cloudy = base.filter(ee.Filter.lte("CLOUDY_PIXEL_PERCENTAGE", self.cloudy_pct))
        filters.append("cloudy_pixel_percentage")
        base_key = "bounds_date_mgrs" if self.filter_mgrs_tile else "bounds_date"
        counts = self._with_retries("scene count", lambda: ee.Dictionary(
            {base_key: base.size(), "cloudy_pct": cloudy.size()}).getInfo())
        counts = {k: int(v) for k, v in counts.items()}
        info: dict[str, Any] = {
            "collection": self.s2_collection, "start": start, "end": end, "filters": filters,
            "cloudy_pct": self.cloudy_pct, "scene_counts": counts, "cloud_mask": self.cloud_mask,
            "composite": self.composite_method, **self._grid_info(tile),
        }
        if self.cloud_mask == "cloud_score_plus":
            info.update(cs_collection=self.cs_collection, cs_band=self.cs_band, cs_threshold=self.cs_threshold)
        elif self.cloud_mask == "scl":
            info["scl_exclude"] = list(self.scl_exclude)
        n = counts["cloudy_pct"]
        if n == 0:
            if counts[base_key] == 0:
                reason = f"no {self.s2_collection} scene intersects tile {tile.key} in {month}"
            else:
                reason = (f"all {counts[base_key]} {self.s2_collection} scenes of tile {tile.key} in {month} "
                          f"have CLOUDY_PIXEL_PERCENTAGE > {self.cloudy_pct:g}")
            return self._empty("s2", tile, month, reason, info)

        col = cloudy
        if self.cloud_mask == "cloud_score_plus":
            cs_band, thr = self.cs_band, self.cs_threshold
            col = col.linkCollection(ee.ImageCollection(self.cs_collection), [cs_band])
            col = col.map(lambda img: img.updateMask(img.select(cs_band).gte(thr)))
        elif self.cloud_mask == "scl":
            exclude = list(self.scl_exclude)
            if exclude:
                col = col.map(lambda img: img.updateMask(
                    img.select("SCL").remap(exclude, [0] * len(exclude), 1).eq(1)))
        col = col.select(list(S2_BANDS))
        data = self._reduce(col).round().toUint16()
        count = col.count().reduce(ee.Reducer.min()).unmask(0).toUint16().rename(COUNT_BAND)
        image = data.unmask(0).addBands(count)
        return self._fetch_and_build(ee, "s2", tile, month, image, n, info)

    # --- Sentinel-1 ---------------------------------------------------------------------------------
    def _s1(self, ee, tile: Tile, month: str) -> xr.Dataset:
        start, end = month_start_end(month)
        region = self._region(ee, tile)
        base = ee.ImageCollection(self.s1_collection).filterBounds(region).filterDate(start, end)
        stages: dict[str, Any] = {"bounds_date": base}
        if self.s1_orbit:
            base = base.filter(ee.Filter.eq("orbitProperties_pass", self.s1_orbit))
            stages["orbit"] = base
        pol = (base.filter(ee.Filter.listContains("transmitterReceiverPolarisation", "VV"))
               .filter(ee.Filter.listContains("transmitterReceiverPolarisation", "VH")))
        if self.s1_require_iw:
            iw = base.filter(ee.Filter.eq("instrumentMode", "IW"))
            stages["iw"] = iw
            stages["iw_vv_vh"] = (iw.filter(ee.Filter.listContains("transmitterReceiverPolarisation", "VV"))
                                  .filter(ee.Filter.listContains("transmitterReceiverPolarisation", "VH")))
            if self.s1_relax_iw_on_empty:
                stages["vv_vh_any_mode"] = pol
        else:
            stages["vv_vh"] = pol
        counts = self._with_retries("scene count", lambda: ee.Dictionary(
            {k: v.size() for k, v in stages.items()}).getInfo())
        counts = {k: int(v) for k, v in counts.items()}
        iw_applied, relaxed = self.s1_require_iw, False
        if self.s1_require_iw:
            col, n = stages["iw_vv_vh"], counts["iw_vv_vh"]
            if n == 0 and self.s1_relax_iw_on_empty and counts.get("vv_vh_any_mode", 0) > 0:
                col, n, iw_applied, relaxed = pol, counts["vv_vh_any_mode"], False, True
        else:
            col, n = pol, counts["vv_vh"]
        filters = (["bounds", "date"] + (["orbit_pass"] if self.s1_orbit else [])
                   + (["instrument_mode_iw"] if iw_applied else []) + ["polarisation_vv_vh"])
        info: dict[str, Any] = {
            "collection": self.s1_collection, "units": self.s1_units, "start": start, "end": end,
            "filters": filters, "scene_counts": counts, "composite": self.composite_method,
            "s1_orbit_requested": self.s1_orbit, "s1_orbit_applied": self.s1_orbit,
            "s1_iw_requested": self.s1_require_iw, "s1_iw_applied": iw_applied,
            "s1_relax_iw_on_empty": self.s1_relax_iw_on_empty, "s1_iw_relaxed_on_empty": relaxed,
            **self._grid_info(tile),
        }
        if relaxed:
            info["relaxed_filters"] = ["instrument_mode_iw"]
            log.warning("S1 %s %s: no IW scene with VV+VH; relaxed the IW filter (%d scenes of other modes)",
                        tile.key, month, n)
        if n == 0:
            parts = ", ".join(f"{k}={v}" for k, v in counts.items())
            reason = f"no {self.s1_collection} scene with VV and VH for tile {tile.key} in {month} ({parts})"
            return self._empty("s1", tile, month, reason, info)
        col = col.select(list(S1_BANDS))
        data = self._reduce(col).toFloat()
        count = col.count().reduce(ee.Reducer.min()).unmask(0).toUint16().rename(COUNT_BAND)
        image = data.unmask(0).addBands(count)
        return self._fetch_and_build(ee, "s1", tile, month, image, n, info)

    def _reduce(self, col):
        if self.composite_method == "mosaic":
            return col.sort("system:time_start").mosaic()  # the most recent valid observation on top
        return col.median()

    # --- pixels -------------------------------------------------------------------------------------
    def _grid_info(self, tile: Tile) -> dict[str, Any]:
        return {"crs": tile.crs, "transform": list(tile.transform), "scale_m": PIXEL_SIZE_M}

    def _request(self, image, tile: Tile, block: Block, band_ids: list[str]) -> dict[str, Any]:
        req: dict[str, Any] = {
            "expression": image,
            "fileFormat": "NUMPY_NDARRAY",
            "bandIds": band_ids,
            "grid": {
                "dimensions": {"width": block.width, "height": block.height},
                "affineTransform": {
                    "scaleX": PIXEL_SIZE_M, "shearX": 0.0, "translateX": tile.x0 + block.col * PIXEL_SIZE_M,
                    "shearY": 0.0, "scaleY": -PIXEL_SIZE_M, "translateY": tile.y0 - block.row * PIXEL_SIZE_M,
                },
                "crsCode": tile.crs,
            },
        }
        if self.workload_tag:
            req["workloadTag"] = self.workload_tag
        return req

    def _fetch_block(self, ee, image, tile: Tile, block: Block, band_ids: list[str], stats: _Stats,
                     depth: int = 0) -> list[tuple[Block, np.ndarray]]:
        req = self._request(image, tile, block, band_ids)
        where = f"computePixels block r{block.row} c{block.col} ({block.height}×{block.width} px) of {tile.key}"

        def call():
            slots = process_slots()
            while not slots.acquire(timeout=0.05):  # the process-wide bound on requests in flight
                if stats.abort.is_set():
                    raise _Aborted()
            try:
                if stats.abort.is_set():
                    raise _Aborted()
                stats.add(requests=1)
                return ee.data.computePixels(req)
            finally:
                slots.release()

        try:
            arr = self._with_retries(where, call, stats, split_ok=True)
        except _Aborted:
            raise
        except ProviderError:
            stats.abort.set()
            raise
        except Exception as exc:  # too large for the server: split into quarters
            if depth >= 4 or (block.height <= 1 and block.width <= 1):
                stats.abort.set()
                raise ProviderError(f"Earth Engine refused {where}: {_short(exc)}; lower max_request_bytes") from None
            log.warning("%s too large (%s); splitting into quarters", where, _short(exc))
            stats.add(splits=1)
            out = []
            for part in _split(block):
                out.extend(self._fetch_block(ee, image, tile, part, band_ids, stats, depth + 1))
            return out
        return [(block, _as_band_stack(arr, band_ids, block, where))]

    def _fetch_and_build(self, ee, sensor: str, tile: Tile, month: str, image, scene_count: int,
                         info: dict[str, Any]) -> xr.Dataset:
        spec = sensor_spec(sensor)
        band_ids = list(spec.bands) + [COUNT_BAND]
        blocks = self.plan(sensor, tile)
        data = np.zeros((len(spec.bands), tile.height, tile.width), dtype=spec.dtype)
        count = np.zeros((tile.height, tile.width), dtype=np.uint16)
        stats = _Stats()
        t0 = time.monotonic()
        workers = min(self.max_workers, len(blocks))
        pool = cf.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="gee-pixels")
        futures = [pool.submit(self._fetch_block, ee, image, tile, b, band_ids, stats) for b in blocks]
        try:
            for fut in cf.as_completed(futures):
                try:
                    parts = fut.result()
                except _Aborted:
                    continue  # the block whose failure stopped this one raises its own error
                for b, stack in parts:
                    sl = (slice(b.row, b.row + b.height), slice(b.col, b.col + b.width))
                    data[(slice(None),) + sl] = stack[:-1].astype(spec.dtype, copy=False)
                    count[sl] = stack[-1]
            if stats.abort.is_set():  # pragma: no cover - a failure always surfaces above
                raise ProviderError(f"fetching {sensor} {tile.key} {month} was aborted")
        except BaseException:
            # fail fast: the other blocks stop (queued ones are cancelled, waiting/backing-off ones see the
            # abort) and the tile raises now, without waiting for requests still in flight
            stats.abort.set()
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
        invalid = count == 0
        data[:, invalid] = 0 if spec.dtype == "uint16" else np.nan
        side = self._block_side(sensor)
        info.update(
            blocks=len(blocks), block_px=side, requests=stats.requests, retries=stats.retries, splits=stats.splits,
            request_bytes_max=max(b.height * b.width for b in blocks) * self._bytes_per_pixel(sensor),
            workers=workers, fetch_seconds=round(time.monotonic() - t0, 3),
            count_definition="unmasked observations per pixel, minimum over bands",
        )
        if not (~invalid).any():
            reason = (f"{scene_count} scene(s) matched but every pixel of tile {tile.key} in {month} is masked "
                      f"({self.cloud_mask if sensor == 's2' else 'no data'})")
            return self._empty(sensor, tile, month, reason, info)
        ds = make_composite(sensor=sensor, tile=tile, month=month, data=data, valid_count=count,
                            provider=self.name, synthetic=False, scene_count=scene_count, provider_info=info)
        if sensor == "s1" and self.s1_units == "db":
            ds["data"].attrs["units"] = "Sentinel-1 GRD backscatter σ0, dB (COPERNICUS/S1_GRD)"
        log.info("%s %s %s: %d scenes, %d blocks, %d requests, %d retries, valid %.1f%%", sensor, tile.key, month,
                 scene_count, len(blocks), stats.requests, stats.retries, 100 * ds.attrs["valid_fraction"])
        return ds

    def _empty(self, sensor: str, tile: Tile, month: str, reason: str, info: dict[str, Any]) -> xr.Dataset:
        log.info("%s %s %s: empty composite: %s", sensor, tile.key, month, reason)
        ds = empty_composite(sensor=sensor, tile=tile, month=month, provider=self.name, reason=reason,
                             provider_info=info)
        if sensor == "s1" and self.s1_units == "db":
            ds["data"].attrs["units"] = "Sentinel-1 GRD backscatter σ0, dB (COPERNICUS/S1_GRD)"
        return ds


# --- helpers ------------------------------------------------------------------------------------------
def _as_band_stack(arr: Any, band_ids: list[str], block: Block, where: str) -> np.ndarray:
    """computePixels NUMPY_NDARRAY result (structured (h, w) array, one field per band) → (bands, h, w)."""
    arr = np.asarray(arr)
    if arr.dtype.names:
        missing = [b for b in band_ids if b not in arr.dtype.names]
        if missing:
            raise ProviderError(f"{where}: response lacks bands {missing} (got {list(arr.dtype.names)})")
        stack = np.stack([arr[b] for b in band_ids])
    elif arr.ndim == 3 and arr.shape[-1] == len(band_ids):
        stack = np.moveaxis(arr, -1, 0)
    else:
        raise ProviderError(f"{where}: unexpected response shaped {arr.shape} ({arr.dtype})")
    if stack.shape[1:] != (block.height, block.width):
        raise ProviderError(f"{where}: response is {stack.shape[1:]} px, requested {(block.height, block.width)}")
    return stack


def _is_service_account_file(path: str) -> bool:
    try:
        with open(os.path.expanduser(path)) as fh:
            return json.load(fh).get("type") == "service_account"
    except Exception:
        return os.path.expanduser(path).endswith(".pem")


def _persistent_credentials_exist() -> bool:
    base = os.environ.get("EE_CONFIG_DIR") or os.path.expanduser("~/.config/earthengine")
    return os.path.isfile(os.path.join(base, "credentials"))


def _ee_scopes(ee) -> list[str]:
    try:
        return list(ee.oauth.SCOPES)
    except AttributeError:
        return ["https://www.googleapis.com/auth/earthengine", "https://www.googleapis.com/auth/cloud-platform"]


def _short(exc: BaseException, limit: int = 300) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= limit else text[:limit] + "…"
