"""Composite structure, month parsing, the sample provider and the local provider."""

import numpy as np
import pytest
import xarray as xr

from rs_embed_assets.composite import (S1_BANDS, S2_BANDS, CompositeError, month_start_end, parse_month,
                                       shift_month, validate_composite)
from rs_embed_assets.grid import parse_tile_key, subtile
from rs_embed_assets.providers import ProviderError, create_provider
from rs_embed_assets.providers.sample import CLASSES

TILE = parse_tile_key("31UFU-k36-r21-c12")


@pytest.mark.parametrize("value, expected", [("2024-03", "2024-03"), ("2024-03-01", "2024-03"), (" 2023-12 ", "2023-12")])
def test_month_forms(value, expected):
    assert parse_month(value) == expected


@pytest.mark.parametrize("value", ["2024-13", "2024-3", "24-03", "2024/03", "march", "2024-03-15"])
def test_malformed_month_is_refused(value):
    with pytest.raises(CompositeError, match="malformed month"):
        parse_month(value)


def test_month_arithmetic():
    assert month_start_end("2024-12") == ("2024-12-01", "2025-01-01")
    assert shift_month("2024-02", -7) == "2023-07"


def test_sample_s2_has_the_agreed_structure():
    ds = create_provider("sample").composite("s2", TILE, "2024-07")
    validate_composite(ds, sensor="s2", tile=TILE)
    assert tuple(ds["band"].values) == S2_BANDS and "B10" not in S2_BANDS
    assert ds["data"].dtype == np.uint16 and int(ds["data"].max()) <= 10000
    assert ds.attrs["synthetic"] == 1 and "SYNTHETIC" in ds.attrs["provider_info"]
    assert ds.attrs["crs"] == "EPSG:32631" and ds.attrs["transform"][0] == TILE.x0
    assert float(ds.x[0]) == TILE.x0 + 5.0 and float(ds.y[0]) == TILE.y0 - 5.0
    valid = ds["valid_count"].values
    assert valid.max() == 6 and (valid < 6).any(), "clouds must thin out some pixels"
    assert (ds["data"].values[:, valid == 0] == 0).all()


def test_sample_is_deterministic_and_changes_with_month():
    p = create_provider("sample")
    a = p.composite("s2", TILE, "2024-07")["data"].values
    b = p.composite("s2", TILE, "2024-07")["data"].values
    c = p.composite("s2", TILE, "2024-01")["data"].values
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_sample_vegetation_greens_up_in_summer():
    p = create_provider("sample")
    lc = p.land_cover(TILE)
    veg = lc == CLASSES.index("vegetation")
    assert veg.mean() > 0.1
    def ndvi(month):
        d = p.composite("s2", TILE, month)["data"].values.astype(float)
        red, nir = d[S2_BANDS.index("B4")], d[S2_BANDS.index("B8")]
        return ((nir - red) / (nir + red + 1e-6))[veg].mean()
    assert ndvi("2024-07") > ndvi("2024-01") + 0.2


def test_sample_land_cover_continuous_across_subtiles():
    p = create_provider("sample")
    small = subtile("31UFU", 36, 21, 12)   # 305 px
    big = subtile("31UFU", 18, 10, 6)      # 610 px containing it
    r0 = int(round((big.y0 - small.y0) / 10)); c0 = int(round((small.x0 - big.x0) / 10))
    assert np.array_equal(p.land_cover(big)[r0:r0 + 305, c0:c0 + 305], p.land_cover(small))


def test_sample_s1_is_linear_backscatter():
    ds = create_provider("sample").composite("s1", TILE, "2024-07")
    assert tuple(ds["band"].values) == S1_BANDS and ds["data"].dtype == np.float32
    vv, vh = ds["data"].values
    assert (vv > 0).all() and vv.max() < 5 and np.median(vv) > np.median(vh)


def test_unknown_provider_and_sensor():
    with pytest.raises(ProviderError, match="unknown provider"):
        create_provider("sentinelhub")
    with pytest.raises(CompositeError, match="unknown sensor"):
        create_provider("sample").composite("s3", TILE, "2024-07")


# --- local provider ---------------------------------------------------------------------------------
def _write_geotiff(path, data, *, epsg, x0, y0, res=10.0, nodata=None):
    import tifffile

    path.parent.mkdir(parents=True, exist_ok=True)
    geokeys = (1, 1, 0, 3, 1024, 0, 1, 1, 1025, 0, 1, 1, 3072, 0, 1, epsg)
    extratags = [(33550, "d", 3, (res, res, 0.0)), (33922, "d", 6, (0.0, 0.0, 0.0, x0, y0, 0.0)),
                 (34735, "H", len(geokeys), geokeys)]
    if nodata is not None:
        extratags.append((42113, "s", 0, str(nodata)))
    tifffile.imwrite(path, data, planarconfig="separate", extratags=extratags)


def test_local_geotiff_is_cut_to_the_subtile(tmp_path):
    parent = subtile("31UFU", 18, 10, 6)  # the file covers a larger window than the tile
    rng = np.random.default_rng(0)
    data = rng.integers(1, 10000, (12, parent.height, parent.width)).astype(np.uint16)
    data[:, 0, 0] = 0  # one nodata pixel
    _write_geotiff(tmp_path / "s2" / TILE.mgrs / "2024-05.tif", data, epsg=32631, x0=parent.x0, y0=parent.y0, nodata=0)
    ds = create_provider("local", root=str(tmp_path)).composite("s2", TILE, "2024-05")
    r0 = int(round((parent.y0 - TILE.y0) / 10)); c0 = int(round((TILE.x0 - parent.x0) / 10))
    assert np.array_equal(ds["data"].values, data[:, r0:r0 + TILE.height, c0:c0 + TILE.width])
    assert ds.attrs["provider"] == "local" and ds.attrs["status"] == "ok"


def test_local_valid_count_band_and_nodata(tmp_path):
    data = np.full((13, TILE.height, TILE.width), 500, np.uint16)
    data[12] = 3
    data[12, :10] = 0
    _write_geotiff(tmp_path / "s2" / TILE.key / "2024-05.tif", data, epsg=32631, x0=TILE.x0, y0=TILE.y0)
    ds = create_provider("local", root=str(tmp_path)).composite("s2", TILE, "2024-05")
    assert ds["valid_count"].values[:10].max() == 0 and ds["valid_count"].values[10:].min() == 3
    assert (ds["data"].values[:, :10] == 0).all()


def test_local_missing_file_is_an_empty_composite(tmp_path):
    ds = create_provider("local", root=str(tmp_path)).composite("s2", TILE, "2024-05")
    assert ds.attrs["status"] == "empty" and ds.attrs["valid_fraction"] == 0.0
    assert "no file at" in ds.attrs["provider_info"]


@pytest.mark.parametrize("kw, fragment", [
    ({"epsg": 32632}, "EPSG:32632"),
    ({"x0_shift": 5.0}, "not aligned"),
    ({"res": 20.0}, "20.0 m pixels"),
    ({"bands": 3}, "has 3 bands"),
])
def test_local_bad_files_are_refused(tmp_path, kw, fragment):
    data = np.ones((kw.get("bands", 12), TILE.height, TILE.width), np.uint16)
    _write_geotiff(tmp_path / "s2" / TILE.key / "2024-05.tif", data, epsg=kw.get("epsg", 32631),
                   x0=TILE.x0 + kw.get("x0_shift", 0.0), y0=TILE.y0, res=kw.get("res", 10.0))
    with pytest.raises(ProviderError, match=fragment):
        create_provider("local", root=str(tmp_path)).composite("s2", TILE, "2024-05")


def test_local_zarr(tmp_path):
    src = create_provider("sample").composite("s1", TILE, "2024-02")
    out = xr.Dataset({"data": src["data"], "valid_count": src["valid_count"]}, attrs={"epsg": 32631})
    out.to_zarr(tmp_path / "s1" / TILE.key / "2024-02.zarr", zarr_format=3, consolidated=False)
    ds = create_provider("local", root=str(tmp_path)).composite("s1", TILE, "2024-02")
    np.testing.assert_array_equal(ds["data"].values, src["data"].values)
