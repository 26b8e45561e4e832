"""The Earth Engine provider against a fake earthengine-api (tests/providers/fake_ee.py); no network.

An opt-in live test at the end runs against the real service when RS_EMBED_GEE_LIVE=1 and
credentials are configured (see docs/earth-engine.md).
"""

from __future__ import annotations

import json
import logging
import os
import socket

import numpy as np
import pytest

from rs_embed_assets.composite import S1_BANDS, S2_BANDS, validate_composite
from rs_embed_assets.grid import subtile
from rs_embed_assets.providers import ProviderError, create_provider
from rs_embed_assets.providers import gee as gee_mod
from rs_embed_assets.providers.gee import GEEProvider, plan_blocks

from .fake_ee import EEException, FakeEE, HttpError, s1_value, s2_value

TILE = subtile("31UFU", 30, 4, 12)  # 366 × 366 px
S2_BPP = 12 * 2 + 2
S1_BPP = 2 * 4 + 2


def s2_scenes(month="2024-03", clouds=(5, 12, 28, 45, 80)):
    return [{"date": f"{month}-{3 + 5 * i:02d}", "CLOUDY_PIXEL_PERCENTAGE": c, "MGRS_TILE": "31UFU" if i % 2 == 0 else "31UFV"}
            for i, c in enumerate(clouds)]


def s1_scene(date, mode="IW", pols=("VV", "VH"), orbit="ASCENDING"):
    return {"date": date, "instrumentMode": mode, "transmitterReceiverPolarisation": list(pols),
            "orbitProperties_pass": orbit}


CATALOG = {
    "COPERNICUS/S2_SR_HARMONIZED": s2_scenes(),
    "GOOGLE/CLOUD_SCORE_PLUS/V1/S2_HARMONIZED": [{"date": "2024-03-03"}],
    "COPERNICUS/S1_GRD_FLOAT": [s1_scene("2024-03-02"), s1_scene("2024-03-08", orbit="DESCENDING"),
                                s1_scene("2024-03-14", pols=("HH", "HV")), s1_scene("2024-04-02")],
    "COPERNICUS/S1_GRD": [s1_scene("2024-03-02")],
}


@pytest.fixture(autouse=True)
def _env(monkeypatch, tmp_path):
    for var in ("EE_PROJECT", "GOOGLE_CLOUD_PROJECT", "GOOGLE_APPLICATION_CREDENTIALS", "RS_EMBED_GEE_LIVE_SKIP"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("EE_CONFIG_DIR", str(tmp_path / "no-ee-config"))
    monkeypatch.setenv("EE_PROJECT", "my-ee-project")
    monkeypatch.delenv(gee_mod.MAX_CONCURRENT_ENV, raising=False)
    gee_mod.reset_initialization()
    gee_mod.set_max_concurrent(None)
    yield
    gee_mod.reset_initialization()
    gee_mod.set_max_concurrent(None)


@pytest.fixture
def adc(monkeypatch):
    """Application-default credentials present (google.auth.default answers)."""
    import google.auth

    monkeypatch.setattr(google.auth, "default", lambda scopes=None, **kw: (object(), None))


@pytest.fixture
def fake(monkeypatch, adc):
    return FakeEE({k: list(v) for k, v in CATALOG.items()}).install(monkeypatch)


class Sleeps(list):
    def __call__(self, s):
        self.append(s)


def provider(**kw):
    kw.setdefault("sleep", Sleeps())
    kw.setdefault("seed", 0)
    kw.setdefault("max_request_bytes", S2_BPP * 100 * 100)  # 100 px blocks on the 366 px sub-tile
    kw.setdefault("max_workers", 4)
    return GEEProvider(**kw)


def expected_grid(tile, fn, n):
    x, y = np.meshgrid(tile.x_coords(), tile.y_coords())
    return np.stack([fn(i, x, y) for i in range(n)]), x, y


def assert_blocks_cover(requests, tile):
    """Every pixel of the tile is requested exactly once, on the tile's CRS and 10 m lattice."""
    hits = np.zeros((tile.height, tile.width), np.int32)
    for req in requests:
        g = req["grid"]
        a = g["affineTransform"]
        assert g["crsCode"] == tile.crs
        assert (a["scaleX"], a["scaleY"], a["shearX"], a["shearY"]) == (10.0, -10.0, 0.0, 0.0)
        c0 = (a["translateX"] - tile.x0) / 10.0
        r0 = (tile.y0 - a["translateY"]) / 10.0
        assert c0 == int(c0) and r0 == int(r0)
        hits[int(r0):int(r0) + g["dimensions"]["height"], int(c0):int(c0) + g["dimensions"]["width"]] += 1
    assert hits.min() == 1 and hits.max() == 1


# --- block layout ----------------------------------------------------------------------------------
def test_block_plan_full_tile():
    s2 = plan_blocks(10980, 10980, S2_BPP, 32 * 1024 * 1024)
    assert len(s2) == 100 and {(b.height, b.width) for b in s2} == {(1098, 1098)}
    assert 1098 * 1098 * S2_BPP == 31_345_704 <= 32 * 1024 * 1024
    s1 = plan_blocks(10980, 10980, S1_BPP, 32 * 1024 * 1024)
    assert len(s1) == 36 and {(b.height, b.width) for b in s1} == {(1830, 1830)}
    p = GEEProvider(sleep=lambda s: None)
    assert len(p.plan("s2", subtile("31UFU", 1, 0, 0))) == 100


@pytest.mark.parametrize("h,w,bpp,max_bytes,side", [(366, 366, 26, 26 * 100 * 100, 32768), (1001, 37, 10, 10_000, 32768),
                                                     (5, 70000, 2, 48 * 2**20, 32768), (64, 64, 26, 26, 32768)])
def test_block_plan_covers_exactly(h, w, bpp, max_bytes, side):
    blocks = plan_blocks(h, w, bpp, max_bytes, side)
    hits = np.zeros((h, w), np.int32)
    for b in blocks:
        assert b.height * b.width * bpp <= max_bytes and max(b.height, b.width) <= 32768
        hits[b.row:b.row + b.height, b.col:b.col + b.width] += 1
    assert hits.min() == 1 and hits.max() == 1


def test_options_are_validated():
    with pytest.raises(ProviderError, match="48 MiB"):
        GEEProvider(max_request_bytes=64 * 2**20)
    with pytest.raises(ProviderError, match="cloud_mask"):
        GEEProvider(cloud_mask="qa60")
    with pytest.raises(ProviderError, match="s1_orbit"):
        GEEProvider(s1_orbit="sideways")


# --- Sentinel-2 ------------------------------------------------------------------------------------
def test_s2_request_and_stitched_composite(fake):
    p = provider()
    ds = p.composite("s2", TILE, "2024-03")
    validate_composite(ds, sensor="s2", tile=TILE)
    assert ds.attrs["status"] == "ok" and ds.attrs["synthetic"] == 0 and ds.attrs["provider"] == "gee"
    assert ds.attrs["scene_count"] == 3  # cloudy 5, 12, 28 <= 30; 45 and 80 dropped

    # the expression: collection, bounds, month, scene filter, Cloud Score+ mask, median, count
    expr = str(fake.requests[0]["expression"])
    minx, miny, maxx, maxy = TILE.bounds
    assert expr.startswith("ImageCollection('COPERNICUS/S2_SR_HARMONIZED').filterBounds(Geometry.Rectangle("
                           f"[{minx!r}, {miny!r}, {maxx!r}, {maxy!r}], 'EPSG:32631', False))"
                           ".filterDate('2024-03-01', '2024-04-01').filter(Filter.lte('CLOUDY_PIXEL_PERCENTAGE', 30.0))")
    assert (".linkCollection(ImageCollection('GOOGLE/CLOUD_SCORE_PLUS/V1/S2_HARMONIZED'), ['cs_cdf'])"
            ".map(<img>.updateMask(<img>.select('cs_cdf').gte(0.6)))") in expr
    assert f".select({list(S2_BANDS)!r}).median().round().toUint16().unmask(0).addBands(" in expr
    assert ".count().reduce(Reducer.min()).unmask(0).toUint16().rename('valid_count')" in expr
    assert "reproject" not in expr and "sampleRectangle" not in expr

    # the requests: 4 × 4 blocks of <= 100 px, bands + count, NUMPY_NDARRAY, covering the tile exactly
    assert len(fake.requests) == 16 and fake.compute_calls == 16
    for req in fake.requests:
        assert req["fileFormat"] == "NUMPY_NDARRAY"
        assert req["bandIds"] == list(S2_BANDS) + ["valid_count"]
        d = req["grid"]["dimensions"]
        assert d["width"] <= 100 and d["height"] <= 100 and d["width"] * d["height"] * S2_BPP <= p.max_request_bytes
    assert_blocks_cover(fake.requests, TILE)
    assert len(fake.threads) > 1  # fetched in parallel

    # the pixels: stitched exactly where the fake computed them, invalid pixels marked, not zero-filled data
    want, x, y = expected_grid(TILE, s2_value, 12)
    count = fake.valid(x, y)
    assert np.array_equal(ds["valid_count"].values, count)
    ok = count > 0
    assert np.array_equal(ds["data"].values[:, ok], want[:, ok])
    assert (ds["data"].values[:, ~ok] == 0).all() and (~ok).any()
    assert ds["data"].dtype == np.uint16
    assert ds.attrs["valid_fraction"] == pytest.approx(ok.mean())

    info = json.loads(ds.attrs["provider_info"])
    assert info["collection"] == "COPERNICUS/S2_SR_HARMONIZED" and info["cloud_mask"] == "cloud_score_plus"
    assert info["cs_threshold"] == 0.6 and info["cs_band"] == "cs_cdf" and info["composite"] == "median"
    assert info["scene_counts"] == {"bounds_date": 5, "cloudy_pct": 3}
    assert info["blocks"] == 16 and info["requests"] == 16 and info["retries"] == 0
    assert info["crs"] == "EPSG:32631" and info["transform"] == list(TILE.transform)
    assert len(fake.getinfo_calls) == 1  # all scene counts in one round trip


def test_s2_scl_mask_mosaic_and_mgrs_filter(fake):
    p = provider(cloud_mask="scl", composite="mosaic", filter_mgrs_tile=True, cloudy_pct=50,
                 scl_exclude=(3, 8, 9, 10))
    ds = p.composite("s2", TILE, "2024-03-01")
    expr = str(fake.requests[0]["expression"])
    assert ".filter(Filter.eq('MGRS_TILE', '31UFU')).filter(Filter.lte('CLOUDY_PIXEL_PERCENTAGE', 50.0))" in expr
    assert ".map(<img>.updateMask(<img>.select('SCL').remap([3, 8, 9, 10], [0, 0, 0, 0], 1).eq(1)))" in expr
    assert ".sort('system:time_start').mosaic()" in expr and "median" not in expr and "CLOUD_SCORE" not in expr
    info = json.loads(ds.attrs["provider_info"])
    assert info["scene_counts"] == {"bounds_date_mgrs": 3, "cloudy_pct": 2}
    assert info["scl_exclude"] == [3, 8, 9, 10] and "mgrs_tile" in info["filters"]
    assert ds.attrs["scene_count"] == 2


def test_s2_empty_collection_is_a_recorded_outcome(fake):
    fake.catalog["COPERNICUS/S2_SR_HARMONIZED"] = []
    ds = provider().composite("s2", TILE, "2024-03")
    assert ds.attrs["status"] == "empty" and int(ds["valid_count"].max()) == 0
    info = json.loads(ds.attrs["provider_info"])
    assert "no COPERNICUS/S2_SR_HARMONIZED scene" in info["empty_reason"]
    assert info["scene_counts"] == {"bounds_date": 0, "cloudy_pct": 0}
    assert fake.compute_calls == 0

    fake.catalog["COPERNICUS/S2_SR_HARMONIZED"] = s2_scenes(clouds=(60, 90))
    ds = provider().composite("s2", TILE, "2024-03")
    info = json.loads(ds.attrs["provider_info"])
    assert ds.attrs["status"] == "empty" and "CLOUDY_PIXEL_PERCENTAGE > 30" in info["empty_reason"]
    assert info["scene_counts"] == {"bounds_date": 2, "cloudy_pct": 0}


def test_s2_all_pixels_masked_is_empty(monkeypatch, adc):
    fake = FakeEE({k: list(v) for k, v in CATALOG.items()}, valid=lambda x, y: np.zeros(x.shape, np.uint16))
    fake.install(monkeypatch)
    ds = provider().composite("s2", TILE, "2024-03")
    assert ds.attrs["status"] == "empty"
    assert "every pixel" in json.loads(ds.attrs["provider_info"])["empty_reason"]


# --- faults ----------------------------------------------------------------------------------------
def test_quota_429_is_retried_with_backoff(fake):
    fake.compute_faults = [HttpError(429, "Too many requests"), EEException("Quota exceeded: too many requests")]
    sleeps = Sleeps()
    ds = provider(sleep=sleeps, max_workers=1, backoff_s=1.0).composite("s2", TILE, "2024-03")
    assert ds.attrs["status"] == "ok"
    assert fake.compute_calls == 18 and len(fake.requests) == 16
    assert len(sleeps) == 2 and 0.5 <= sleeps[0] <= 1.0 and 1.0 <= sleeps[1] <= 2.0  # exponential, jittered
    assert json.loads(ds.attrs["provider_info"])["retries"] == 2


def test_persistent_500_gives_up_with_clear_error(fake):
    fake.compute_faults = [HttpError(500, "Internal error")] * 100
    sleeps = Sleeps()
    with pytest.raises(ProviderError, match=r"still failing after 4 attempts.*Internal error"):
        provider(sleep=sleeps, max_workers=1, max_retries=3).composite("s2", TILE, "2024-03")
    assert len(sleeps) == 3 and fake.compute_calls == 4


def test_timeouts_and_concurrent_aggregations_are_retried(fake):
    fake.getinfo_faults = [EEException("Too many concurrent aggregations.")]
    fake.compute_faults = [socket.timeout("The read operation timed out"), EEException("Computation timed out."),
                           HttpError(503, "Service unavailable")]
    sleeps = Sleeps()
    ds = provider(sleep=sleeps, max_workers=1).composite("s2", TILE, "2024-03")
    assert ds.attrs["status"] == "ok" and len(sleeps) == 4
    assert_blocks_cover(fake.requests, TILE)


def test_non_retryable_error_fails_fast(fake):
    fake.compute_faults = [EEException("Image.select: Pattern 'B13' did not match any bands.")]
    sleeps = Sleeps()
    with pytest.raises(ProviderError, match=r"refused computePixels block .*did not match any bands.*not retryable"):
        provider(sleep=sleeps, max_workers=1).composite("s2", TILE, "2024-03")
    assert sleeps == [] and fake.compute_calls == 1


def test_too_large_request_is_split(monkeypatch, adc):
    fake = FakeEE({k: list(v) for k, v in CATALOG.items()}, max_bytes=S2_BPP * 60 * 60).install(monkeypatch)
    ds = provider().composite("s2", TILE, "2024-03")
    info = json.loads(ds.attrs["provider_info"])
    assert info["splits"] == 16 and len(fake.requests) == 64
    assert_blocks_cover(fake.requests, TILE)
    want, x, y = expected_grid(TILE, s2_value, 12)
    ok = fake.valid(x, y) > 0
    assert np.array_equal(ds["data"].values[:, ok], want[:, ok])


# --- Sentinel-1 ------------------------------------------------------------------------------------
def test_s1_linear_iw_median(fake):
    p = provider(max_request_bytes=S1_BPP * 200 * 200)
    ds = p.composite("s1", TILE, "2024-03")
    validate_composite(ds, sensor="s1", tile=TILE)
    expr = str(fake.requests[0]["expression"])
    assert expr.startswith("ImageCollection('COPERNICUS/S1_GRD_FLOAT').filterBounds(")
    assert (".filter(Filter.eq('instrumentMode', 'IW')).filter(Filter.listContains('transmitterReceiverPolarisation', "
            "'VV')).filter(Filter.listContains('transmitterReceiverPolarisation', 'VH')).select(['VV', 'VH'])"
            ".median().toFloat()") in expr
    assert len(fake.requests) == 4 and fake.requests[0]["bandIds"] == ["VV", "VH", "valid_count"]
    assert_blocks_cover(fake.requests, TILE)
    want, x, y = expected_grid(TILE, s1_value, 2)
    ok = fake.valid(x, y) > 0
    assert ds["data"].dtype == np.float32
    assert np.array_equal(ds["data"].values[:, ok], want[:, ok]) and np.isnan(ds["data"].values[:, ~ok]).all()
    info = json.loads(ds.attrs["provider_info"])
    assert info["s1_iw_applied"] is True and info["s1_iw_relaxed_on_empty"] is False
    assert info["scene_counts"] == {"bounds_date": 3, "iw": 3, "iw_vv_vh": 2, "vv_vh_any_mode": 2}
    assert ds.attrs["scene_count"] == 2 and info["units"] == "linear"


def test_s1_relaxes_iw_when_empty(fake):
    fake.catalog["COPERNICUS/S1_GRD_FLOAT"] = [s1_scene("2024-03-02", mode="EW"), s1_scene("2024-03-09", mode="EW")]
    ds = provider().composite("s1", TILE, "2024-03")
    info = json.loads(ds.attrs["provider_info"])
    assert ds.attrs["status"] == "ok" and ds.attrs["scene_count"] == 2
    assert info["s1_iw_requested"] is True and info["s1_iw_applied"] is False
    assert info["s1_iw_relaxed_on_empty"] is True and info["relaxed_filters"] == ["instrument_mode_iw"]
    assert "instrument_mode_iw" not in info["filters"]
    assert "instrumentMode" not in str(fake.requests[0]["expression"])

    fake.requests.clear()
    ds = provider(s1_relax_iw_on_empty=False).composite("s1", TILE, "2024-03")
    info = json.loads(ds.attrs["provider_info"])
    assert ds.attrs["status"] == "empty" and "iw_vv_vh=0" in info["empty_reason"] and not fake.requests


def test_s1_db_collection_and_orbit_filter(fake):
    ds = provider(s1_units="db", s1_orbit="descending").composite("s1", TILE, "2024-03")
    info = json.loads(ds.attrs["provider_info"])
    assert info["collection"] == "COPERNICUS/S1_GRD" and info["units"] == "db"
    assert "dB" in ds["data"].attrs["units"]
    assert ds.attrs["status"] == "empty"  # the only S1_GRD scene is ascending
    assert info["scene_counts"]["bounds_date"] == 1 and info["scene_counts"]["orbit"] == 0
    assert info["s1_orbit_applied"] == "DESCENDING"


def test_s1_empty_collection_reports_per_filter_counts(fake):
    fake.catalog["COPERNICUS/S1_GRD_FLOAT"] = []
    ds = provider().composite("s1", TILE, "2024-03")
    reason = json.loads(ds.attrs["provider_info"])["empty_reason"]
    assert ds.attrs["status"] == "empty" and "bounds_date=0" in reason and np.isnan(ds["data"].values).all()


# --- auth & initialisation ------------------------------------------------------------------------
def test_missing_project_names_ee_project(fake, monkeypatch):
    monkeypatch.delenv("EE_PROJECT")
    with pytest.raises(ProviderError, match="EE_PROJECT"):
        provider().composite("s2", TILE, "2024-03")
    assert fake.init_calls == []


def test_no_credentials_is_a_clear_error(monkeypatch):
    import google.auth
    from google.auth.exceptions import DefaultCredentialsError

    def no_adc(*a, **kw):
        raise DefaultCredentialsError("none")

    monkeypatch.setattr(google.auth, "default", no_adc)
    FakeEE(dict(CATALOG)).install(monkeypatch)
    with pytest.raises(ProviderError, match="GOOGLE_APPLICATION_CREDENTIALS.*earthengine authenticate"):
        provider().composite("s2", TILE, "2024-03")


def test_service_account_key_initialises_once_and_never_leaks(fake, monkeypatch, tmp_path, caplog):
    secret = "-----BEGIN PRIVATE KEY-----\nSUPERSECRETKEYMATERIAL\n-----END PRIVATE KEY-----\n"
    key = tmp_path / "sa.json"
    key.write_text(json.dumps({"type": "service_account", "project_id": "sa-project", "private_key": secret,
                               "client_email": "bot@sa-project.iam.gserviceaccount.com"}))
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(key))
    monkeypatch.delenv("EE_PROJECT")
    caplog.set_level(logging.DEBUG)
    p = provider(request_timeout_s=120)
    ds = p.composite("s2", TILE, "2024-03")
    p.composite("s1", TILE, "2024-03")
    provider().composite("s2", TILE, "2024-04")  # a second instance, same configuration
    assert len(fake.init_calls) == 1
    call = fake.init_calls[0]
    assert call["project"] == "sa-project" and call["url"] == "https://earthengine-highvolume.googleapis.com"
    assert fake.credentials_calls == [{"email": None, "key_file": str(key)}] and fake.deadline_ms == 120_000
    d = p.describe()
    assert d["auth"] == "service_account"
    blob = json.dumps(d) + ds.attrs["provider_info"] + caplog.text
    assert "SUPERSECRET" not in blob and "private_key" not in blob and str(key) not in blob


def test_explicit_project_and_missing_key_file(fake, tmp_path):
    with pytest.raises(ProviderError, match="does not exist"):
        provider(service_account_key=str(tmp_path / "nope.json")).composite("s2", TILE, "2024-03")
    gee_mod.reset_initialization()
    provider(project="explicit-proj", high_volume=False).composite("s2", TILE, "2024-03")
    assert fake.init_calls[-1]["project"] == "explicit-proj" and fake.init_calls[-1]["url"] is None


def test_conflicting_configuration_in_one_process(fake):
    provider(project="a").composite("s2", TILE, "2024-03")
    with pytest.raises(ProviderError, match="already initialised"):
        provider(project="b").composite("s2", TILE, "2024-03")


def test_initialise_once_across_threads(fake):
    import concurrent.futures as cf

    p = provider(max_workers=2)
    with cf.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda m: p.composite("s2", TILE, m), ["2024-03"] * 4))
    assert all(r.attrs["status"] == "ok" for r in results) and len(fake.init_calls) == 1


def test_initialise_failure_is_a_provider_error(fake, monkeypatch):
    def boom(**kw):
        raise EEException("Earth Engine API has not been used in project my-ee-project before or it is disabled.")

    monkeypatch.setattr(fake.module, "Initialize", boom)
    with pytest.raises(ProviderError, match="initialisation failed for project 'my-ee-project'.*registered"):
        provider().composite("s2", TILE, "2024-03")


def test_describe_and_registry(fake):
    p = create_provider("gee", cloudy_pct=20, cs_threshold=0.65, max_workers=3, sleep=lambda s: None)
    assert isinstance(p, GEEProvider)
    d = p.describe()
    assert d["provider"] == "gee" and d["s2"]["collection"] == "COPERNICUS/S2_SR_HARMONIZED"
    assert d["s2"]["cloudy_pct"] == 20 and d["s2"]["cs_threshold"] == 0.65 and d["composite"] == "median"
    assert d["s1"]["collection"] == "COPERNICUS/S1_GRD_FLOAT" and d["max_workers"] == 3
    assert d["block_px"] == {"s2": 1136, "s1": 1831} and d["max_request_bytes"] == 32 * 2**20
    json.dumps(d)


# --- live (opt-in) ---------------------------------------------------------------------------------
def _live_credentials() -> bool:
    return bool(os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")) or os.path.isfile(
        os.path.expanduser("~/.config/gcloud/application_default_credentials.json")) or os.path.isfile(
        os.path.expanduser("~/.config/earthengine/credentials"))


@pytest.mark.skipif(os.environ.get("RS_EMBED_GEE_LIVE") != "1", reason="live Earth Engine test: set RS_EMBED_GEE_LIVE=1")
def test_live_small_subtile(monkeypatch):
    monkeypatch.undo()  # use the real environment: credentials, EE_PROJECT, EE_CONFIG_DIR
    gee_mod.reset_initialization()
    if not _live_credentials():
        pytest.skip("no Earth Engine credentials configured")
    tile = subtile("31UFU", 60, 30, 30)  # 183 × 183 px near the tile centre
    p = GEEProvider(max_workers=2)
    s2 = p.composite("s2", tile, "2023-07")
    validate_composite(s2, sensor="s2", tile=tile)
    assert s2.attrs["status"] in ("ok", "empty")
    if s2.attrs["status"] == "ok":
        vals = s2["data"].values[:, s2["valid_count"].values > 0]
        assert 0 < np.median(vals) < 10000
    s1 = p.composite("s1", tile, "2023-07")
    validate_composite(s1, sensor="s1", tile=tile)
    assert s1.attrs["status"] == "ok"
    assert 0 < np.nanmedian(s1["data"].values) < 5  # linear σ0


# --- robustness (issue 11) ---------------------------------------------------------------------------
def test_one_retry_layer_and_a_default_request_deadline(fake):
    fake.compute_faults = [HttpError(503, "Service unavailable")]
    sleeps = Sleeps()
    provider(sleep=sleeps, max_workers=1).composite("s2", TILE, "2024-03")
    assert fake.max_retries == 0  # earthengine-api's own retries are off: attempts never multiply
    assert fake.deadline_ms == 300_000  # no request may hold a tile forever
    assert len(sleeps) == 1 and fake.compute_calls == 17


def _transient_errors():
    import http.client
    import ssl

    import google.auth.exceptions
    import httplib2

    wrapped = EEException("computePixels failed")
    wrapped.__cause__ = ConnectionResetError(104, "Connection reset by peer")
    return [
        socket.gaierror(-3, "Temporary failure in name resolution"),
        httplib2.ServerNotFoundError("Unable to find the server at earthengine-highvolume.googleapis.com"),
        ssl.SSLEOFError(8, "EOF occurred in violation of protocol (_ssl.c:2427)"),
        http.client.IncompleteRead(b"partial", 1024),
        google.auth.exceptions.TransportError("Failed to retrieve http://metadata/token"),
        ConnectionRefusedError(111, "Connection refused"),
        wrapped,
    ]


@pytest.mark.parametrize("exc", _transient_errors(), ids=["dns", "httplib2-dns", "ssl-eof", "incomplete-read",
                                                          "auth-transport", "refused", "wrapped-reset"])
def test_transient_network_errors_are_retried(fake, exc):
    fake.compute_faults = [exc]
    sleeps = Sleeps()
    ds = provider(sleep=sleeps, max_workers=1).composite("s2", TILE, "2024-03")
    assert ds.attrs["status"] == "ok" and len(sleeps) == 1
    assert json.loads(ds.attrs["provider_info"])["retries"] == 1


@pytest.mark.parametrize("exc", [
    EEException("Image.load: Image asset 'projects/p/assets/tile_500' not found (does not exist or caller does "
                "not have access)."),
    EEException("Collection.loadTable: Table asset 'users/me/runs_timed out' not found."),
    EEException("Image.rename: The number of names (3) must match the number of bands (503)."),
    HttpError(400, "Invalid argument: grid dimension 503 exceeds limits"),
    HttpError(403, "Permission denied: Earth Engine API has not been used in project 502"),
], ids=["asset-500", "asset-timed-out", "numbers-in-text", "http-400", "http-403"])
def test_permanent_errors_fail_at_once_whatever_their_text(fake, exc):
    sleeps = Sleeps()
    fake.compute_faults = [exc]
    with pytest.raises(ProviderError, match="not retryable"):
        provider(sleep=sleeps, max_workers=1).composite("s2", TILE, "2024-03")
    assert sleeps == [] and fake.compute_calls == 1


def test_classification_uses_status_before_text():
    assert gee_mod.is_retryable(HttpError(503, "Backend Error"))
    assert not gee_mod.is_retryable(HttpError(404, "Service unavailable"))
    assert gee_mod.is_retryable(EEException("Too many concurrent aggregations."))
    assert not gee_mod.is_retryable(EEException("Asset 'x' not found. Too many concurrent aggregations."))


def test_concurrency_is_bounded_per_process_across_composites(fake):
    import threading

    gee_mod.set_max_concurrent(3)
    three_in = threading.Event()

    def gate(params):  # hold each request until three are in flight (or 2 s), so overlap is maximal
        if fake.in_flight >= 3:
            three_in.set()
        three_in.wait(2)

    fake.compute_gate = gate
    p = provider(max_workers=8)
    errors = []

    def run(month):
        try:
            p.composite("s2", TILE, month)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(m,)) for m in ("2024-03", "2024-03", "2024-03")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and fake.compute_calls == 3 * 16
    assert fake.max_in_flight == 3  # 3 composites × 8 workers, never more than the process bound
    assert p.describe()["max_concurrent_per_process"] == 3


def _block_of(params):
    a = params["grid"]["affineTransform"]
    return int((TILE.y0 - a["translateY"]) / 10), int((a["translateX"] - TILE.x0) / 10)


def test_a_tile_fails_fast_while_its_other_blocks_are_in_flight(fake):
    import threading

    release = threading.Event()

    def gate(params):
        if _block_of(params) == (0, 0):
            while fake.in_flight < 4:  # the other three workers are stalled in their requests
                threading.Event().wait(0.01)
            raise EEException("Image.select: Pattern 'B13' did not match any bands.")
        release.wait(30)

    fake.compute_gate = gate
    try:
        with pytest.raises(ProviderError, match="did not match any bands"):
            provider(max_workers=4).composite("s2", TILE, "2024-03")
        assert fake.in_flight == 3  # the composite raised without waiting for them
    finally:
        release.set()
    for _ in range(500):
        if fake.in_flight == 0:
            break
        threading.Event().wait(0.01)
    assert fake.compute_calls == 4  # no queued block started after the failure


def test_a_tile_fails_fast_while_another_block_backs_off(fake):
    import threading

    backing_off = threading.Event()

    def gate(params):
        if _block_of(params) == (0, 0):
            backing_off.wait(10)
            raise EEException("Image.select: Pattern 'B13' did not match any bands.")
        if not backing_off.is_set():
            backing_off.set()
            raise HttpError(429, "Too many requests")  # this block now backs off for ≥ 30 minutes

    fake.compute_gate = gate
    outcome = []
    p = provider(max_workers=2, sleep=None, backoff_s=3600, backoff_max_s=3600)
    t = threading.Thread(target=lambda: outcome.append(_raises(lambda: p.composite("s2", TILE, "2024-03"))))
    t.start()
    t.join(20)
    assert not t.is_alive(), "the tile waited out another block's backoff"
    assert isinstance(outcome[0], ProviderError) and "did not match any bands" in str(outcome[0])
    assert fake.compute_calls == 2  # the backing-off block never tried again


def _raises(fn):
    try:
        fn()
    except Exception as exc:
        return exc
    return None
