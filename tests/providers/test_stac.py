"""The STAC provider against a STAC API on 127.0.0.1 serving small COGs the tests generate.

tests/providers/stac_fixtures.py writes the scenes and serves them; expected composites are computed
from the same per-pixel value functions. An opt-in live test reads Earth Search when RS_EMBED_STAC_LIVE=1.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace

import numpy as np
import pytest

from rs_embed_assets.composite import S2_BANDS, validate_composite
from rs_embed_assets.grid import subtile
from rs_embed_assets.providers import ProviderError, create_provider
from rs_embed_assets.providers import stac as stac_mod

from .stac_fixtures import AREA_PX, AREA_X0, AREA_Y0, S2_ORDER, TILE, StacServer, build_catalog, s1_linear, s2_dn, s2_valid

KEPT_S2 = (0, 1, 2)  # scenes of May 2024 with eo:cloud_cover <= 30


def _serve(tmp_path_factory, conventions, **kw):
    root = tmp_path_factory.mktemp(f"stac-{conventions}")
    server = StacServer(root, **kw)
    server.items = build_catalog(root, server.url, conventions)
    return server


@pytest.fixture(scope="module")
def es(tmp_path_factory):
    with _serve(tmp_path_factory, "earth-search") as server:
        yield server


@pytest.fixture(scope="module")
def pc(tmp_path_factory):
    with _serve(tmp_path_factory, "planetary-computer", require_token=True) as server:
        yield server


@pytest.fixture
def fresh(tmp_path_factory):
    """A server of its own (GDAL caches what it read from the shared one, so faults need new URLs)."""
    with _serve(tmp_path_factory, "earth-search") as server:
        yield server


@pytest.fixture(autouse=True)
def _fresh(es):
    es.faults.clear()
    es.log.clear()
    stac_mod.set_max_concurrent(None)
    yield


def provider(server, **kw):
    kw.setdefault("sleep", lambda s: None)
    return create_provider("stac", url=server.url, **kw)


def inside_area(x, y):
    return (x > AREA_X0) & (x < AREA_X0 + AREA_PX * 10) & (y < AREA_Y0) & (y > AREA_Y0 - AREA_PX * 10)


def expected_s2(win):
    x, y = np.meshgrid(win.x_coords(), win.y_coords())
    stack = np.full((len(KEPT_S2), 12, win.height, win.width), np.nan, np.float32)
    for j, i in enumerate(KEPT_S2):
        ok = s2_valid(i, x, y) & inside_area(x, y)
        for b, band in enumerate(S2_ORDER):
            stack[j, b] = np.where(ok, s2_dn(band, i, x, y), np.nan)
    count = np.isfinite(stack[:, 0]).sum(axis=0)
    with np.errstate(all="ignore"), pytest.warns(RuntimeWarning) if (count == 0).any() else _nullctx():
        med = np.nanmedian(stack, axis=0)
    return np.where(count > 0, np.rint(np.nan_to_num(med)), 0).astype(np.uint16), count


class _nullctx:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def test_s2_median_composite_with_scl_mask_and_harmonisation(es):
    ds = provider(es).composite("s2", TILE, "2024-05")
    validate_composite(ds, sensor="s2", tile=TILE)
    want, count = expected_s2(TILE)
    np.testing.assert_array_equal(ds["valid_count"].values, count)
    np.testing.assert_array_equal(ds["data"].values, want)
    assert set(np.unique(count)) == {1, 2, 3}  # cloud (north) and shadow (west) each remove one scene
    info = json.loads(ds.attrs["provider_info"])
    assert info["scene_counts"] == {"bounds_date": 4, "cloudy_pct": 3}  # far-away and June scenes not returned
    assert info["scenes"] == ["S2A_31UFU_20240503", "S2B_31UFU_20240513", "S2A_31UFU_20240523"]
    assert info["offset_removed"] == {"S2A_31UFU_20240503": 1000}
    assert ds.attrs["scene_count"] == 3 and ds.attrs["status"] == "ok" and ds.attrs["synthetic"] == 0


def test_windows_give_the_pixels_of_their_absolute_position(es):
    """A row band and a margin-extended window (the streaming composite step) read the same pixels."""
    p = provider(es, max_stack_mib=1)  # also forces several row strips per window
    band = replace(TILE, k=1, row=0, col=0, y0=TILE.y0 - 100 * 10, height=23)
    margin = replace(TILE, x0=TILE.x0 - 80, y0=TILE.y0 + 80, width=TILE.width + 16, height=TILE.height + 16)
    for w in (band, margin):
        ds = p.composite("s2", w, "2024-05")
        want, count = expected_s2(w)
        np.testing.assert_array_equal(ds["data"].values, want)
        np.testing.assert_array_equal(ds["valid_count"].values, count)
    assert json.loads(ds.attrs["provider_info"])["strip_rows"] < margin.height


def test_s1_median_of_vv_vh_scenes(es):
    ds = provider(es).composite("s1", TILE, "2024-05")
    validate_composite(ds, sensor="s1", tile=TILE)
    x, y = np.meshgrid(TILE.x_coords(), TILE.y_coords())
    stack = np.stack([np.stack([s1_linear(b, i, x, y) for b in (0, 1)]) for i in (0, 1, 2)])
    stack[0, :, :11] = np.nan  # scene 0 has no data in area rows 0..19 = TILE rows 0..10
    np.testing.assert_allclose(ds["data"].values, np.nanmedian(stack, axis=0), rtol=1e-6)
    assert ds["valid_count"].values[:11].max() == 2 and ds["valid_count"].values[11:].min() == 3
    info = json.loads(ds.attrs["provider_info"])
    assert info["scene_counts"]["vv_vh"] == 3  # the HH/HV scene is left out
    one = provider(es, s1_orbit="descending").composite("s1", TILE, "2024-05")
    np.testing.assert_allclose(one["data"].values, stack[1], rtol=1e-6)


def test_empty_month_and_all_too_cloudy_are_recorded_outcomes(es):
    ds = provider(es).composite("s2", TILE, "2024-07")
    assert ds.attrs["status"] == "empty" and "no sentinel-2-l2a scene" in ds.attrs["provider_info"]
    ds = provider(es, cloudy_pct=5).composite("s2", TILE, "2024-05")
    assert ds.attrs["status"] == "empty" and "eo:cloud_cover > 5" in ds.attrs["provider_info"]


def test_transient_http_errors_are_retried(fresh):
    es = fresh
    es.faults.update({"/search": [503], "/files/s2/S2A_31UFU_20240503/B4.tif": [503, 502]})
    ds = provider(es).composite("s2", TILE, "2024-05")
    want, _ = expected_s2(TILE)
    np.testing.assert_array_equal(ds["data"].values, want)
    assert [s for _, _, s in es.requests("/search")][-2:] == [503, 200]
    statuses = [s for _, _, s in es.requests("/files/s2/S2A_31UFU_20240503/B4.tif")]
    assert 503 in statuses and 502 in statuses and statuses[-1] in (200, 206)


def test_a_scene_that_cannot_be_read_fails_naming_it(fresh):
    es = fresh
    es.faults["/files/s2/S2B_31UFU_20240513/B11.tif"] = [404] * 50
    with pytest.raises(ProviderError, match=r"S2B_31UFU_20240513 \(http://127\.0\.0\.1:\d+/files/s2/S2B_31UFU_20240513"
                                            r"/B11\.tif\) failed after 2 attempt"):
        provider(es, max_retries=1).composite("s2", TILE, "2024-05")


def test_scene_reads_are_bounded_per_process(fresh):
    fresh.file_delay_s = 0.02
    stac_mod.set_max_concurrent(1)
    ds = provider(fresh, max_workers=4).composite("s2", TILE, "2024-05")
    assert ds.attrs["status"] == "ok"
    assert fresh.max_scenes_in_flight == 1  # 4 workers, but one scene read at a time in this process


def test_planetary_computer_assets_are_signed(pc):
    p = provider(pc, conventions="planetary-computer", token_url=pc.url + "/api/sas/v1/token",
                 sign_hosts=["127.0.0.1"])
    ds = p.composite("s2", TILE, "2024-05")
    want, _ = expected_s2(TILE)
    np.testing.assert_array_equal(ds["data"].values, want)
    tokens = pc.requests("/api/sas/v1/token/")
    assert [path for _, path, _ in tokens] == ["/api/sas/v1/token/sentinel2l2a01/sentinel2-l2"]  # cached
    s1 = p.composite("s1", TILE, "2024-05")
    assert s1.attrs["status"] == "ok"
    blob = json.dumps(p.describe()) + ds.attrs["provider_info"] + s1.attrs["provider_info"]
    assert "sig=" not in blob and StacServer.TOKEN not in blob


def test_unsigned_planetary_computer_read_is_refused_without_leaking(pc):
    p = provider(pc, conventions="planetary-computer", sign="none", max_retries=0)
    with pytest.raises(ProviderError, match=r"reading STAC item (S2[AB]_31UFU_\d+) \(http://127.0.0.1:\d+/"
                                            r"sentinel2l2a01/sentinel2-l2/\1/\w+\.tif\) failed.*403") as err:
        p.composite("s2", TILE, "2024-05")
    assert "sig=" not in str(err.value)


def test_missing_asset_is_named(es, tmp_path):
    item = json.loads(json.dumps(next(it for it in es.items if it["id"] == "S2A_31UFU_20240503")))
    del item["assets"]["scl"]
    with StacServer(tmp_path, [item]) as one:
        with pytest.raises(ProviderError, match=r"S2A_31UFU_20240503 has no asset for SCL \(looked for scl, SCL"):
            provider(one).composite("s2", TILE, "2024-05")


def test_options_conventions_and_registry():
    with pytest.raises(ProviderError, match="conventions"):
        create_provider("stac", conventions="copernicus")
    with pytest.raises(ProviderError, match="resampling"):
        create_provider("stac", resampling="lanczos3")
    pcp = create_provider("stac", url="https://planetarycomputer.microsoft.com/api/stac/v1")
    d = pcp.describe()
    assert d["conventions"] == "planetary-computer" and d["sign"] == "planetary-computer"
    assert d["s1"]["collection"] == "sentinel-1-rtc"
    es = create_provider("stac").describe()
    assert es["url"] == "https://earth-search.aws.element84.com/v1" and es["s2"]["collection"] == "sentinel-2-l2a"


@pytest.mark.skipif(os.environ.get("RS_EMBED_STAC_LIVE") != "1", reason="live STAC test: set RS_EMBED_STAC_LIVE=1")
def test_live_earth_search_small_subtile():
    tile = subtile("31UFU", 60, 30, 20)  # 183 × 183 px near Hoorn
    p = create_provider("stac", url=os.environ.get("RS_EMBED_STAC_URL", "https://earth-search.aws.element84.com/v1"))
    ds = p.composite("s2", tile, "2023-07")
    validate_composite(ds, sensor="s2", tile=tile)
    assert ds.attrs["status"] == "ok" and ds.attrs["valid_fraction"] > 0.5
    assert list(ds["band"].values) == list(S2_BANDS)
    ok = ds["valid_count"].values > 0
    assert 0 < np.median(ds["data"].values[3][ok]) < 5000  # red DN of summer land
