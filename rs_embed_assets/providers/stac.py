"""The ``stac`` provider: Sentinel-2 L2A and Sentinel-1 monthly composites from a STAC API of COGs.

For users without Earth Engine: the scenes of the month are found with pystac-client on a STAC API
(Earth Search, Planetary Computer, or any API following their conventions), and each scene's per-band
COG assets are read with rasterio, warped onto the requested pixel window of the tile's UTM grid at
10 m (nearest neighbour by default; a scene in the tile's own zone at 10 m is an aligned window read).
Only the blocks of each COG that the window touches are fetched.

Sentinel-2 L2A
    Items of ``s2_collection`` intersecting the window's footprint, in the month, with
    ``eo:cloud_cover`` ≤ ``cloudy_pct``. Per pixel, an observation is valid when the scene's SCL class
    is not in ``scl_exclude`` (default: no data, saturated, cloud shadow, cloud medium/high, cirrus)
    and no band is 0 (L2A no-data). Scenes of processing baseline ≥ 04.00 carry a +1000 DN offset;
    with ``harmonize`` (default) it is removed, as in Earth Engine's S2_SR_HARMONIZED, unless the item
    says it already was (``earthsearch:boa_offset_applied``). The composite is the per-band median of
    the valid observations, rounded to uint16 DN; ``valid_count`` is their number.

Sentinel-1
    Items of ``s1_collection`` with VV and VH (``sar:polarizations``), IW mode when the item says
    (``sar:instrument_mode``), optionally one orbit direction (``sat:orbit_state``). Planetary
    Computer's ``sentinel-1-rtc`` (γ0 terrain-flattened, linear power, UTM COGs) is the default there;
    a GRD collection must hold calibrated float σ0 (georeferenced by CRS or GCPs) — integer GRD DN are
    refused because they are uncalibrated amplitudes. Valid = finite and > 0; median per band.

Conventions
    Asset keys are found by band: Earth Search names (``coastal``, ``blue``, …, ``nir08``, ``swir22``,
    ``scl``, ``vv``) or Planetary Computer's (``B01`` … ``B12``, ``B8A``, ``SCL``, ``vv``). Hrefs pass
    through a signing hook before reading: ``sign="planetary-computer"`` appends a SAS token from the
    Planetary Computer token endpoint (cached until it expires; ``PC_SDK_SUBSCRIPTION_KEY`` is sent if
    set), ``sign="none"`` reads hrefs as they are, and ``sign="module:function"`` calls your own
    ``function(href, item, asset_key) -> href``. ``s3://`` hrefs are read through GDAL's /vsis3/ (AWS
    credentials from the environment).

Robustness
    The search has a timeout and retries (429/5xx, connection errors); every COG read has GDAL HTTP
    timeouts and retries, and a scene whose read still fails is retried by this module with backoff
    (``max_retries``). At most ``max_workers`` scenes are read at once per composite, and at most
    ``RS_EMBED_STAC_MAX_CONCURRENT`` (default 8) per process over all composites. A scene that cannot
    be read after the retries fails the composite with the href (credentials and tokens removed).

Memory is bounded: the window is processed in row strips sized so that the stack of scenes of one
strip stays under ``max_stack_mib``.
"""

from __future__ import annotations

import concurrent.futures as cf
import datetime as dt
import importlib
import json
import logging
import os
import threading
import time
import urllib.parse
import urllib.request
from typing import Any, Callable, Sequence

import numpy as np
import xarray as xr

from ..composite import S1_BANDS, S2_BANDS, empty_composite, make_composite, month_start_end, parse_month, sensor_spec
from ..grid import PIXEL_SIZE_M, Tile, utm_to_lonlat
from .base import Provider, ProviderError

log = logging.getLogger(__name__)

# band → asset keys: Earth Search first, then Planetary Computer (and other common spellings)
ASSET_KEYS: dict[str, tuple[str, ...]] = {
    "B1": ("coastal", "B01", "b01"), "B2": ("blue", "B02", "b02"), "B3": ("green", "B03", "b03"),
    "B4": ("red", "B04", "b04"), "B5": ("rededge1", "B05", "b05"), "B6": ("rededge2", "B06", "b06"),
    "B7": ("rededge3", "B07", "b07"), "B8": ("nir", "B08", "b08"), "B8A": ("nir08", "B8A", "b8a"),
    "B9": ("nir09", "B09", "b09"), "B11": ("swir16", "B11", "b11"), "B12": ("swir22", "B12", "b12"),
    "SCL": ("scl", "SCL"), "VV": ("vv", "VV"), "VH": ("vh", "VH"),
}
CONVENTIONS: dict[str, dict[str, Any]] = {
    "earth-search": {"url": "https://earth-search.aws.element84.com/v1", "s2_collection": "sentinel-2-l2a",
                     "s1_collection": "sentinel-1-grd", "sign": "none"},
    "planetary-computer": {"url": "https://planetarycomputer.microsoft.com/api/stac/v1",
                           "s2_collection": "sentinel-2-l2a", "s1_collection": "sentinel-1-rtc",
                           "sign": "planetary-computer"},
}
PC_TOKEN_URL = "https://planetarycomputer.microsoft.com/api/sas/v1/token"
DEFAULT_SCL_EXCLUDE = (0, 1, 3, 8, 9, 10)
MAX_CONCURRENT_ENV = "RS_EMBED_STAC_MAX_CONCURRENT"
S2_BASELINE_OFFSET_DN = 1000
_RESAMPLING = ("nearest", "bilinear", "cubic", "average")

_SLOTS_LOCK = threading.Lock()
_SLOTS: dict[str, Any] = {"sem": None, "limit": None}


def process_slots() -> threading.BoundedSemaphore:
    """The process-wide bound on scene reads in flight (all composites, all threads)."""
    with _SLOTS_LOCK:
        if _SLOTS["sem"] is None:
            n = int(os.environ.get(MAX_CONCURRENT_ENV) or 8)
            if n < 1:
                raise ProviderError(f"{MAX_CONCURRENT_ENV}={n} must be >= 1")
            _SLOTS.update(sem=threading.BoundedSemaphore(n), limit=n)
        return _SLOTS["sem"]


def set_max_concurrent(limit: int | None) -> None:
    """Resize the process-wide bound (None: from the environment on next use)."""
    with _SLOTS_LOCK:
        _SLOTS.update(sem=None if limit is None else threading.BoundedSemaphore(limit), limit=limit)


def _redact(href: str) -> str:
    """An href without its query string (SAS tokens, signatures) or user info."""
    p = urllib.parse.urlsplit(href)
    netloc = p.hostname or ""
    if p.port:
        netloc += f":{p.port}"
    return urllib.parse.urlunsplit((p.scheme, netloc, p.path, "", ""))


# --- signing ------------------------------------------------------------------------------------------
class PlanetaryComputerSigner:
    """Appends a Planetary Computer SAS token (per storage account/container, cached until expiry)."""

    def __init__(self, token_url: str = PC_TOKEN_URL, timeout_s: float = 30.0,
                 hosts: Sequence[str] = (".blob.core.windows.net",)):
        self.token_url = token_url.rstrip("/")
        self.timeout_s = timeout_s
        self.hosts = tuple(hosts)
        self._lock = threading.Lock()
        self._tokens: dict[str, tuple[str, float]] = {}

    def _token(self, account: str, container: str) -> str:
        key = f"{account}/{container}"
        with self._lock:
            tok = self._tokens.get(key)
            if tok and tok[1] - time.time() > 120:
                return tok[0]
            req = urllib.request.Request(f"{self.token_url}/{account}/{container}")
            sub = os.environ.get("PC_SDK_SUBSCRIPTION_KEY")
            if sub:
                req.add_header("Ocp-Apim-Subscription-Key", sub)
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    body = json.loads(resp.read())
            except Exception as exc:
                raise ProviderError(f"Planetary Computer token request for {key} failed ({type(exc).__name__}: "
                                    f"{str(exc)[:200]}); check network access to {self.token_url}") from None
            token = body["token"]
            expiry = body.get("msft:expiry")
            try:
                exp = dt.datetime.fromisoformat(str(expiry).replace("Z", "+00:00")).timestamp()
            except ValueError:
                exp = time.time() + 600
            self._tokens[key] = (token, exp)
            return token

    def __call__(self, href: str, item: Any = None, asset_key: str | None = None) -> str:
        p = urllib.parse.urlsplit(href)
        host = p.hostname or ""
        if not any(host.endswith(h) for h in self.hosts):
            return href  # not Azure Blob Storage: nothing to sign
        parts = p.path.lstrip("/").split("/")
        if host.endswith(".blob.core.windows.net"):
            account, container = host.split(".")[0], parts[0]
        else:  # a mirror or test server: /<account>/<container>/... on any host
            account, container = parts[0], parts[1]
        token = self._token(account, container)
        return href + ("&" if p.query else "?") + token


def make_signer(sign: str | Callable | None, token_url: str = PC_TOKEN_URL,
                sign_hosts: Sequence[str] = (".blob.core.windows.net",)) -> Callable[[str, Any, str], str]:
    if callable(sign):
        return sign
    if sign in (None, "", "none"):
        return lambda href, item=None, key=None: href
    if sign == "planetary-computer":
        return PlanetaryComputerSigner(token_url, hosts=sign_hosts)
    if isinstance(sign, str) and ":" in sign:
        mod, fn = sign.split(":", 1)
        try:
            return getattr(importlib.import_module(mod), fn)
        except (ImportError, AttributeError) as exc:
            raise ProviderError(f"sign={sign!r} cannot be imported ({exc}); give module:function") from None
    raise ProviderError(f"sign={sign!r}; use none, planetary-computer or module:function")


# --- the provider -------------------------------------------------------------------------------------
class STACProvider(Provider):
    """Monthly median composites from a STAC API of per-band COGs, on the tile's UTM grid at 10 m."""

    name = "stac"
    synthetic = False

    def __init__(
        self,
        *,
        url: str | None = None,
        conventions: str | None = None,
        s2_collection: str | None = None,
        s1_collection: str | None = None,
        sign: str | Callable | None = None,
        token_url: str = PC_TOKEN_URL,
        sign_hosts: Sequence[str] = (".blob.core.windows.net",),
        headers: dict[str, str] | None = None,
        cloudy_pct: float = 30.0,
        scl_exclude: Sequence[int] = DEFAULT_SCL_EXCLUDE,
        harmonize: bool = True,
        s1_orbit: str | None = None,
        s1_require_iw: bool = True,
        resampling: str = "nearest",
        max_items: int = 200,
        max_workers: int = 4,
        max_retries: int = 3,
        backoff_s: float = 1.0,
        timeout_s: float = 60.0,
        max_stack_mib: int = 512,
        sleep: Callable[[float], None] | None = None,
    ) -> None:
        conv = conventions or ("planetary-computer" if url and "planetarycomputer" in url else "earth-search")
        if conv not in CONVENTIONS:
            raise ProviderError(f"conventions={conv!r}; use earth-search or planetary-computer")
        defaults = CONVENTIONS[conv]
        if resampling not in _RESAMPLING:
            raise ProviderError(f"resampling={resampling!r}; use one of {', '.join(_RESAMPLING)}")
        if not 0 <= float(cloudy_pct) <= 100:
            raise ProviderError(f"cloudy_pct={cloudy_pct} must be a percentage in [0, 100]")
        bad = [c for c in scl_exclude if int(c) not in range(12)]
        if bad:
            raise ProviderError(f"scl_exclude has {bad}; SCL classes are 0..11")
        orbit = s1_orbit.lower() if s1_orbit else None
        if orbit not in (None, "ascending", "descending"):
            raise ProviderError(f"s1_orbit={s1_orbit!r}; use ascending, descending or leave it unset")
        for name, v in (("max_workers", max_workers), ("max_items", max_items)):
            if int(v) < 1:
                raise ProviderError(f"{name}={v} must be >= 1")
        if int(max_retries) < 0 or float(timeout_s) <= 0:
            raise ProviderError("max_retries must be >= 0 and timeout_s > 0")
        self.url = (url or os.environ.get("RS_EMBED_STAC_URL") or defaults["url"]).rstrip("/")
        self.conventions = conv
        self.s2_collection = s2_collection or defaults["s2_collection"]
        self.s1_collection = s1_collection or defaults["s1_collection"]
        self.sign_mode = sign if isinstance(sign, str) or sign is None else f"{sign.__module__}:{sign.__name__}"
        self._sign = make_signer(defaults["sign"] if sign is None else sign, token_url, sign_hosts)
        self.headers = dict(headers or {})
        self.cloudy_pct = float(cloudy_pct)
        self.scl_exclude = tuple(sorted({int(c) for c in scl_exclude}))
        self.harmonize = bool(harmonize)
        self.s1_orbit = orbit
        self.s1_require_iw = bool(s1_require_iw)
        self.resampling = resampling
        self.max_items = int(max_items)
        self.max_workers = int(max_workers)
        self.max_retries = int(max_retries)
        self.backoff_s = float(backoff_s)
        self.timeout_s = float(timeout_s)
        self.max_stack_mib = int(max_stack_mib)
        self._sleep = time.sleep if sleep is None else sleep
        self._client = None
        self._client_lock = threading.Lock()

    def describe(self) -> dict[str, Any]:
        return {
            "provider": self.name, "url": _redact(self.url), "conventions": self.conventions,
            "sign": self.sign_mode or CONVENTIONS[self.conventions]["sign"],
            "s2": {"collection": self.s2_collection, "cloudy_pct": self.cloudy_pct, "cloud_mask": "scl",
                   "scl_exclude": list(self.scl_exclude), "harmonize": self.harmonize, "bands": list(S2_BANDS)},
            "s1": {"collection": self.s1_collection, "orbit": self.s1_orbit, "require_iw": self.s1_require_iw,
                   "bands": list(S1_BANDS)},
            "composite": "median", "resampling": self.resampling, "grid": "tile UTM CRS at 10 m (rasterio warp)",
            "max_workers": self.max_workers, "max_retries": self.max_retries, "timeout_s": self.timeout_s,
        }

    # --- search ---------------------------------------------------------------------------------------
    def _open(self):
        with self._client_lock:
            if self._client is None:
                from pystac_client import Client
                from pystac_client.stac_api_io import StacApiIO
                from urllib3 import Retry

                retry = Retry(total=self.max_retries, backoff_factor=self.backoff_s,
                              status_forcelist=[429, 500, 502, 503, 504], allowed_methods=None)
                io = StacApiIO(headers=self.headers, timeout=self.timeout_s, max_retries=retry)
                try:
                    self._client = Client.open(self.url, stac_io=io)
                except Exception as exc:
                    raise ProviderError(f"cannot open the STAC API at {_redact(self.url)} ({type(exc).__name__}: "
                                        f"{str(exc)[:200]}); check the url option / RS_EMBED_STAC_URL") from None
            return self._client

    def search(self, collection: str, tile: Tile, month: str) -> list:
        start, end = month_start_end(month)
        end_incl = (dt.date.fromisoformat(end) - dt.timedelta(days=1)).isoformat()
        client = self._open()
        try:
            search = client.search(collections=[collection], intersects=_footprint_geojson(tile),
                                   datetime=f"{start}T00:00:00Z/{end_incl}T23:59:59Z", max_items=self.max_items)
            items = list(search.items())
        except Exception as exc:
            raise ProviderError(f"STAC search of {collection} at {_redact(self.url)} failed for {tile.key} {month} "
                                f"({type(exc).__name__}: {str(exc)[:200]})") from None
        return sorted(items, key=lambda it: (str(it.datetime), it.id))

    # --- composite ------------------------------------------------------------------------------------
    def composite(self, sensor: str, tile: Tile, month: str) -> xr.Dataset:
        sensor_spec(sensor)
        month = parse_month(month)
        if sensor == "s2":
            return self._s2(tile, month)
        return self._s1(tile, month)

    def _s2(self, tile: Tile, month: str) -> xr.Dataset:
        items = self.search(self.s2_collection, tile, month)
        counts = {"bounds_date": len(items)}
        kept = [it for it in items if float(it.properties.get("eo:cloud_cover", 0.0)) <= self.cloudy_pct]
        counts["cloudy_pct"] = len(kept)
        info: dict[str, Any] = {"url": _redact(self.url), "collection": self.s2_collection, "month": month,
                                "cloudy_pct": self.cloudy_pct, "scene_counts": counts, "cloud_mask": "scl",
                                "scl_exclude": list(self.scl_exclude), "harmonize": self.harmonize,
                                "composite": "median", "resampling": self.resampling}
        if not kept:
            reason = (f"no {self.s2_collection} scene intersects {tile.key} in {month}" if not items else
                      f"all {len(items)} {self.s2_collection} scenes of {tile.key} in {month} have eo:cloud_cover > "
                      f"{self.cloudy_pct:g}")
            return self._empty("s2", tile, month, reason, info)
        plans = [self._s2_plan(it) for it in kept]
        info["scenes"] = [p["id"] for p in plans]
        info["offset_removed"] = {p["id"]: p["offset"] for p in plans if p["offset"]}
        return self._build("s2", tile, month, plans, info)

    def _s1(self, tile: Tile, month: str) -> xr.Dataset:
        items = self.search(self.s1_collection, tile, month)
        counts = {"bounds_date": len(items)}
        kept = items
        if self.s1_orbit:
            kept = [it for it in kept if str(it.properties.get("sat:orbit_state", "")).lower() == self.s1_orbit]
            counts["orbit"] = len(kept)
        if self.s1_require_iw:
            kept = [it for it in kept if it.properties.get("sar:instrument_mode", "IW") == "IW"]
            counts["iw"] = len(kept)
        kept = [it for it in kept if {"VV", "VH"} <= set(it.properties.get("sar:polarizations", ["VV", "VH"]))]
        counts["vv_vh"] = len(kept)
        info: dict[str, Any] = {"url": _redact(self.url), "collection": self.s1_collection, "month": month,
                                "scene_counts": counts, "composite": "median", "resampling": self.resampling,
                                "s1_orbit": self.s1_orbit, "s1_require_iw": self.s1_require_iw}
        if not kept:
            parts = ", ".join(f"{k}={v}" for k, v in counts.items())
            return self._empty("s1", tile, month, f"no {self.s1_collection} scene with VV and VH for {tile.key} in "
                                                  f"{month} ({parts})", info)
        plans = [self._s1_plan(it) for it in kept]
        info["scenes"] = [p["id"] for p in plans]
        return self._build("s1", tile, month, plans, info)

    def _asset(self, item, band: str) -> tuple[str, str]:
        for key in ASSET_KEYS[band]:
            if key in item.assets:
                return key, item.assets[key].href
        raise ProviderError(f"STAC item {item.id} has no asset for {band} (looked for {', '.join(ASSET_KEYS[band])}; "
                            f"it has {', '.join(sorted(item.assets))}); set conventions to match the catalogue")

    def _s2_plan(self, item) -> dict[str, Any]:
        assets = [self._asset(item, b) for b in S2_BANDS] + [self._asset(item, "SCL")]
        offset = 0
        if self.harmonize:
            baseline = str(item.properties.get("s2:processing_baseline", item.properties.get(
                "sentinel:processing_baseline", "00.00")))
            applied = bool(item.properties.get("earthsearch:boa_offset_applied", False))
            try:
                newer = float(baseline) >= 4.0
            except ValueError:
                newer = False
            offset = S2_BASELINE_OFFSET_DN if newer and not applied else 0
        return {"id": item.id, "item": item, "assets": assets, "offset": offset}

    def _s1_plan(self, item) -> dict[str, Any]:
        return {"id": item.id, "item": item, "assets": [self._asset(item, b) for b in S1_BANDS], "offset": 0}

    # --- pixels ---------------------------------------------------------------------------------------
    def _build(self, sensor: str, tile: Tile, month: str, plans: list[dict], info: dict) -> xr.Dataset:
        spec = sensor_spec(sensor)
        nb = len(spec.bands)
        data = np.zeros((nb, tile.height, tile.width), spec.dtype)
        count = np.zeros((tile.height, tile.width), np.uint16)
        per_row = len(plans) * (nb + 1) * tile.width * 4
        strip = max(1, min(tile.height, (self.max_stack_mib * 2**20) // max(per_row, 1)))
        t0 = time.monotonic()
        stats = _Counts()
        abort = threading.Event()
        pool = cf.ThreadPoolExecutor(max_workers=min(self.max_workers, len(plans)), thread_name_prefix="stac-read")
        try:
            for r0 in range(0, tile.height, strip):
                h = min(strip, tile.height - r0)
                win = Tile(mgrs=tile.mgrs, epsg=tile.epsg, x0=tile.x0, y0=tile.y0 - r0 * PIXEL_SIZE_M,
                           width=tile.width, height=h)
                stack = np.full((len(plans), nb, h, tile.width), np.nan, np.float32)
                futures = {pool.submit(self._read_scene, sensor, p, win, stats, abort): i for i, p in enumerate(plans)}
                for fut in cf.as_completed(futures):
                    stack[futures[fut]] = fut.result()
                n = np.isfinite(stack[:, 0]).sum(axis=0).astype(np.uint16)
                med = np.full((nb, h, tile.width), np.nan, np.float32)
                any_valid = n > 0
                if any_valid.any():
                    med[:, any_valid] = np.nanmedian(stack[:, :, any_valid], axis=0)
                if sensor == "s2":
                    data[:, r0:r0 + h] = np.where(any_valid, np.rint(np.nan_to_num(med, nan=0.0)), 0).astype(np.uint16)
                else:
                    data[:, r0:r0 + h] = med
                count[r0:r0 + h] = n
                del stack
        except BaseException:
            abort.set()
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
        info.update(reads=stats.reads, retries=stats.retries, strip_rows=strip,
                    fetch_seconds=round(time.monotonic() - t0, 3),
                    count_definition="valid observations per pixel (SCL-masked for S2)")
        if not count.any():
            return self._empty(sensor, tile, month, f"{len(plans)} scene(s) matched but every pixel of {tile.key} in "
                                                    f"{month} is masked or outside them", info)
        log.info("%s %s %s: %d scenes, %d reads, %d retries", sensor, tile.key, month, len(plans), stats.reads,
                 stats.retries)
        return make_composite(sensor=sensor, tile=tile, month=month, data=data, valid_count=count,
                              provider=self.name, scene_count=len(plans), provider_info=info)

    def _empty(self, sensor: str, tile: Tile, month: str, reason: str, info: dict[str, Any]) -> xr.Dataset:
        log.info("%s %s %s: empty composite: %s", sensor, tile.key, month, reason)
        return empty_composite(sensor=sensor, tile=tile, month=month, provider=self.name, reason=reason,
                               provider_info=info)

    def _read_scene(self, sensor: str, plan: dict, win: Tile, stats: "_Counts", abort: threading.Event) -> np.ndarray:
        """(bands, h, w) float32 of one scene on the window, NaN where the observation is not valid."""
        slots = process_slots()
        while not slots.acquire(timeout=0.05):
            if abort.is_set():
                raise ProviderError("aborted")
        try:
            attempt = 0
            while True:
                try:
                    stats.add("reads")
                    return self._read_scene_once(sensor, plan, win)
                except ProviderError:
                    raise
                except Exception as exc:
                    if attempt >= self.max_retries or abort.is_set():
                        href = _redact(getattr(exc, "href", "") or plan["assets"][0][1])
                        raise ProviderError(f"reading STAC item {plan['id']} ({href}) failed after {attempt + 1} "
                                            f"attempt(s): {type(exc).__name__}: {str(exc)[:300]}") from None
                    stats.add("retries")
                    delay = self.backoff_s * (2 ** attempt)
                    log.warning("STAC item %s read failed (%s: %s); retry %d/%d in %.1fs", plan["id"],
                                type(exc).__name__, str(exc)[:200], attempt + 1, self.max_retries, delay)
                    self._sleep(delay)
                    attempt += 1
        finally:
            slots.release()

    def _read_scene_once(self, sensor: str, plan: dict, win: Tile) -> np.ndarray:
        import rasterio

        spec = sensor_spec(sensor)
        nb = len(spec.bands)
        out = np.full((nb, win.height, win.width), np.nan, np.float32)
        with rasterio.Env(**_gdal_env(self.timeout_s)):
            if sensor == "s2":
                scl = self._warp(plan["item"], *plan["assets"][-1], win, "nearest")
                ok = np.isin(scl, self.scl_exclude, invert=True) & (scl != 0)
                for b, (key, href) in enumerate(plan["assets"][:-1]):
                    if not ok.any():
                        break
                    v = self._warp(plan["item"], key, href, win, self.resampling)
                    if v.dtype.kind not in "iu":
                        raise ProviderError(f"STAC item {plan['id']} asset {key} ({_redact(href)}) is {v.dtype}; "
                                            "Sentinel-2 L2A COGs hold integer DN")
                    ok &= v > 0
                    out[b] = np.maximum(v.astype(np.float32) - plan["offset"], 0)
                out[:, ~ok] = np.nan
            else:
                ok = np.ones((win.height, win.width), bool)
                for b, (key, href) in enumerate(plan["assets"]):
                    v = self._warp(plan["item"], key, href, win, self.resampling, nodata=np.nan)
                    if v.dtype.kind != "f":
                        raise ProviderError(f"STAC item {plan['id']} asset {key} ({_redact(href)}) holds integer "
                                            f"{v.dtype} values: uncalibrated GRD amplitude. Use a calibrated "
                                            "collection (Planetary Computer sentinel-1-rtc, linear γ0)")
                    ok &= np.isfinite(v) & (v > 0)
                    out[b] = v
                out[:, ~ok] = np.nan
        return out

    def _warp(self, item, key: str, href: str, win: Tile, resampling: str, nodata: float | None = 0) -> np.ndarray:
        """One asset on the window's grid (EPSG of the tile, 10 m, the window's origin and size)."""
        import rasterio
        from affine import Affine
        from rasterio.enums import Resampling
        from rasterio.vrt import WarpedVRT

        url = self._sign(href, item, key)
        path = _gdal_path(url)
        transform = Affine(PIXEL_SIZE_M, 0, win.x0, 0, -PIXEL_SIZE_M, win.y0)
        try:
            with rasterio.open(path) as src:
                src_nodata = src.nodata if src.nodata is not None else nodata
                kw: dict[str, Any] = {}
                if src.crs is None and src.gcps[0]:
                    kw["src_crs"] = src.gcps[1]
                with WarpedVRT(src, crs=f"EPSG:{win.epsg}", transform=transform, width=win.width, height=win.height,
                               resampling=getattr(Resampling, resampling), src_nodata=src_nodata,
                               nodata=src_nodata, **kw) as vrt:
                    return vrt.read(1)
        except Exception as exc:
            exc.href = href  # type: ignore[attr-defined]
            raise


class _Counts:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.reads = 0
        self.retries = 0

    def add(self, name: str) -> None:
        with self.lock:
            setattr(self, name, getattr(self, name) + 1)


def _gdal_path(url: str) -> str:
    if url.startswith("s3://"):
        return "/vsis3/" + url[5:]
    return url


def _gdal_env(timeout_s: float) -> dict[str, Any]:
    return {
        "GDAL_HTTP_TIMEOUT": int(timeout_s), "GDAL_HTTP_CONNECTTIMEOUT": min(30, int(timeout_s)),
        "GDAL_HTTP_MAX_RETRY": 3, "GDAL_HTTP_RETRY_DELAY": 1,
        "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR", "CPL_VSIL_CURL_ALLOWED_EXTENSIONS": ".tif,.tiff,.TIF",
        "GDAL_HTTP_MERGE_CONSECUTIVE_RANGES": "YES", "GDAL_HTTP_MULTIPLEX": "YES", "VSI_CACHE": "TRUE",
        "AWS_REQUEST_PAYER": os.environ.get("AWS_REQUEST_PAYER", "requester"),
    }


def _footprint_geojson(tile: Tile) -> dict[str, Any]:
    minx, miny, maxx, maxy = tile.bounds
    t = np.linspace(0.0, 1.0, 5)
    xs = np.concatenate([minx + (maxx - minx) * t, np.full(5, maxx), maxx - (maxx - minx) * t, np.full(5, minx)])
    ys = np.concatenate([np.full(5, maxy), maxy - (maxy - miny) * t, np.full(5, miny), miny + (maxy - miny) * t])
    lon, lat = utm_to_lonlat(tile.epsg, xs, ys)
    ring = [[float(a), float(b)] for a, b in zip(lon, lat)]
    ring.append(ring[0])
    return {"type": "Polygon", "coordinates": [ring]}
