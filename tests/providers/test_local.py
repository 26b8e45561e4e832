"""The local provider reads GeoTIFFs/COGs with rasterio: windows, masks, compressions, band order, units.

Every file is written by the test with rasterio, with pixel values that depend only on the pixel's
position in the MGRS tile, so any window can be checked against a direct evaluation.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace

import numpy as np
import pytest

from rs_embed_assets.composite import S2_BANDS, validate_composite
from rs_embed_assets.grid import mgrs_tile, subtile
from rs_embed_assets.providers import ProviderError, create_provider

rasterio = pytest.importorskip("rasterio")
from affine import Affine  # noqa: E402

TILE = subtile("31UFU", 36, 21, 12)  # 305 × 305 px
FILE_AREA = subtile("31UFU", 18, 10, 6)  # 610 × 610 px around TILE (TILE is its lower-left quarter)
MGRS = mgrs_tile("31UFU")


def s2_values(area, nbands=12):
    """DN at each pixel of ``area``: a function of the band and the pixel's row/col in the MGRS tile."""
    r0 = int(round((MGRS.y0 - area.y0) / 10))
    c0 = int(round((area.x0 - MGRS.x0) / 10))
    rr, cc = np.meshgrid(np.arange(r0, r0 + area.height), np.arange(c0, c0 + area.width), indexing="ij")
    return np.stack([((rr * 7 + cc * 13 + 97 * b) % 9000 + 1) for b in range(nbands)]).astype(np.uint16)


def write(path, data, area=FILE_AREA, *, epsg=32631, descriptions=None, mask=None, tags=None, **profile):
    path.parent.mkdir(parents=True, exist_ok=True)
    prof = dict(driver="GTiff", height=data.shape[1], width=data.shape[2], count=data.shape[0], dtype=data.dtype,
                crs=f"EPSG:{epsg}", transform=Affine(10, 0, area.x0, 0, -10, area.y0))
    prof.update(profile)
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True):
        with rasterio.open(path, "w", **prof) as dst:
            if tags:
                dst.update_tags(**tags)
            dst.write(data)
            if descriptions:
                for i, d in enumerate(descriptions, 1):
                    dst.set_band_description(i, d)
            if mask is not None:
                dst.write_mask(mask.astype(np.uint8) * 255)
    return path


def local(tmp_path, **kw):
    return create_provider("local", root=str(tmp_path), **kw)


def window_of(values, area, tile):
    r = int(round((area.y0 - tile.y0) / 10))
    c = int(round((tile.x0 - area.x0) / 10))
    return values[:, r:r + tile.height, c:c + tile.width]


@pytest.mark.parametrize("profile", [
    {"compress": "deflate", "tiled": True, "blockxsize": 256, "blockysize": 256},
    {"compress": "lzw", "predictor": 2},
    {"compress": "zstd", "tiled": True, "blockxsize": 128, "blockysize": 128},
    {"driver": "COG", "compress": "zstd", "blocksize": 256},
    {"driver": "COG", "compress": "deflate", "blocksize": 128},
], ids=["deflate-tiled", "lzw-strips", "zstd-tiled", "cog-zstd", "cog-deflate"])
def test_compressions_and_cogs_give_the_exact_window(tmp_path, profile):
    vals = s2_values(FILE_AREA)
    write(tmp_path / "s2" / "31UFU" / "2024-05.tif", vals, **profile)
    ds = local(tmp_path).composite("s2", TILE, "2024-05")
    validate_composite(ds, sensor="s2", tile=TILE)
    np.testing.assert_array_equal(ds["data"].values, window_of(vals, FILE_AREA, TILE))
    assert ds.attrs["status"] == "ok" and ds.attrs["valid_fraction"] == 1.0
    assert json.loads(ds.attrs["provider_info"])["window"] == [305, 0]


def test_values_depend_only_on_absolute_position(tmp_path):
    """Row bands and margin-extended windows (the streaming composite step) read the same pixels."""
    vals = s2_values(FILE_AREA)
    write(tmp_path / "s2" / "31UFU" / "2024-05.tif", vals, compress="deflate", tiled=True)
    p = local(tmp_path)
    band = replace(TILE, k=1, row=0, col=0, y0=TILE.y0 - 100 * 10, height=37)  # a row band, key = 31UFU
    margin = replace(TILE, x0=TILE.x0 + 200, y0=TILE.y0 + 400, width=TILE.width + 8, height=TILE.height + 8)
    for w in (band, margin):
        ds = p.composite("s2", w, "2024-05")
        np.testing.assert_array_equal(ds["data"].values, window_of(vals, FILE_AREA, w))


def test_only_the_window_is_read(tmp_path):
    """A file truncated after its first blocks still serves windows there; reaching past says which file."""
    vals = s2_values(FILE_AREA)
    path = write(tmp_path / "s2" / "31UFU" / "2024-05.tif", vals, tiled=True, blockxsize=64, blockysize=64,
                 interleave="band")
    size = path.stat().st_size
    with open(path, "r+b") as fh:
        fh.truncate(int(size * 0.97))  # the last band's south-east blocks are gone
    north = replace(TILE, y0=FILE_AREA.y0, x0=FILE_AREA.x0, height=64, width=64)
    ds = local(tmp_path).composite("s2", north, "2024-05")
    np.testing.assert_array_equal(ds["data"].values, window_of(vals, FILE_AREA, north))
    south_east = replace(TILE, x0=FILE_AREA.x0 + 500 * 10, height=64, width=64, y0=FILE_AREA.y0 - 540 * 10)
    with pytest.raises(ProviderError, match=r"2024-05\.tif: could not read it"):
        local(tmp_path).composite("s2", south_east, "2024-05")


def test_internal_mask_marks_pixels_invalid(tmp_path):
    vals = s2_values(FILE_AREA)
    mask = np.ones(vals.shape[1:], bool)
    mask[400:450] = False  # rows 400..449 of the file = rows 95..144 of TILE
    write(tmp_path / "s2" / "31UFU" / "2024-05.tif", vals, mask=mask, compress="deflate", tiled=True)
    with rasterio.open(tmp_path / "s2" / "31UFU" / "2024-05.tif") as src:
        assert src.mask_flag_enums[0] == [rasterio.enums.MaskFlags.per_dataset]
    ds = local(tmp_path).composite("s2", TILE, "2024-05")
    vc = ds["valid_count"].values
    assert vc[95:145].max() == 0 and vc[:95].min() == 1 and vc[145:].min() == 1
    assert (ds["data"].values[:, 95:145] == 0).all()
    assert ds.attrs["valid_fraction"] == pytest.approx(1 - 50 / 305)


def test_nodata_value_marks_pixels_invalid(tmp_path):
    vals = s2_values(FILE_AREA)
    vals[3, 305:310, :] = 65535  # rows 0..4 of TILE, one band at nodata
    write(tmp_path / "s2" / "31UFU" / "2024-05.tif", vals, nodata=65535)
    ds = local(tmp_path).composite("s2", TILE, "2024-05")
    assert ds["valid_count"].values[:5].max() == 0 and ds["valid_count"].values[5:].min() == 1


def test_pixel_is_point_raster_is_aligned(tmp_path):
    import tifffile

    vals = s2_values(FILE_AREA)
    path = write(tmp_path / "s2" / "31UFU" / "2024-05.tif", vals, tags={"AREA_OR_POINT": "Point"})
    with tifffile.TiffFile(path) as tif:
        keys = tif.pages[0].tags[34735].value
        raster_type = {keys[i]: keys[i + 3] for i in range(4, len(keys), 4)}[1025]
        tie = tif.pages[0].tags[33922].value
    assert raster_type == 2 and tie[3] == FILE_AREA.x0 + 5  # PixelIsPoint: the tiepoint is a pixel centre
    ds = local(tmp_path).composite("s2", TILE, "2024-05")
    np.testing.assert_array_equal(ds["data"].values, window_of(vals, FILE_AREA, TILE))


def test_per_band_files_and_count_file(tmp_path):
    vals = s2_values(FILE_AREA)
    folder = tmp_path / "s2" / "31UFU" / "2024-05"
    for b, name in enumerate(S2_BANDS):
        write(folder / f"{name[0]}{name[1:].zfill(2)}.tif", vals[b:b + 1], compress="zstd")  # B01.tif … B8A.tif
    count = np.full((1, *vals.shape[1:]), 4, np.uint16)
    count[0, 305:315] = 0
    write(folder / "valid_count.tif", count, compress="zstd")
    ds = local(tmp_path).composite("s2", TILE, "2024-05")
    np.testing.assert_array_equal(ds["data"].values[:, 10:], window_of(vals, FILE_AREA, TILE)[:, 10:])
    assert ds["valid_count"].values[:10].max() == 0 and ds["valid_count"].values[10:].min() == 4
    assert json.loads(ds.attrs["provider_info"])["bands"] == "per-band files"


def test_missing_per_band_file_is_named(tmp_path):
    vals = s2_values(FILE_AREA)
    folder = tmp_path / "s2" / "31UFU" / "2024-05"
    for b, name in enumerate(S2_BANDS[:-1]):
        write(folder / f"{name}.tif", vals[b:b + 1])
    with pytest.raises(ProviderError, match=r"2024-05 lacks per-band files for \['B12'\]"):
        local(tmp_path).composite("s2", TILE, "2024-05")


def test_bands_described_in_another_order_are_reordered_by_name(tmp_path):
    vals = s2_values(FILE_AREA)
    names = [f"B{b[1:].zfill(2)}" for b in S2_BANDS][::-1]  # B12 … B01
    write(tmp_path / "s2" / "31UFU" / "2024-05.tif", vals[::-1].copy(), descriptions=names)
    ds = local(tmp_path).composite("s2", TILE, "2024-05")
    np.testing.assert_array_equal(ds["data"].values, window_of(vals, FILE_AREA, TILE))
    assert json.loads(ds.attrs["provider_info"])["bands"] == "by name"


def test_band_descriptions_of_other_bands_are_refused(tmp_path):
    vals = s2_values(FILE_AREA)
    names = [f"B{b[1:].zfill(2)}" for b in S2_BANDS[:-1]] + ["B10"]
    write(tmp_path / "s2" / "31UFU" / "2024-05.tif", vals, descriptions=names)
    with pytest.raises(ProviderError, match=r"2024-05\.tif: band descriptions .*\(missing \['B12'\], unexpected \['B10'\]"):
        local(tmp_path).composite("s2", TILE, "2024-05")


def test_float_reflectance_is_scaled_to_dn_with_a_log_line(tmp_path, caplog):
    vals = s2_values(FILE_AREA)
    write(tmp_path / "s2" / "31UFU" / "2024-05.tif", (vals / 10000.0).astype(np.float32), compress="deflate")
    with caplog.at_level(logging.INFO, logger="rs_embed_assets.providers.local"):
        ds = local(tmp_path).composite("s2", TILE, "2024-05")
    np.testing.assert_array_equal(ds["data"].values, window_of(vals, FILE_AREA, TILE))
    assert ds["data"].dtype == np.uint16 and ds["data"].values.max() > 0
    assert any("scaled ×10000" in r.getMessage() and "2024-05.tif" in r.getMessage() for r in caplog.records)
    assert json.loads(ds.attrs["provider_info"])["scaled_reflectance_by"] == 10000


def test_float_reflectance_can_be_refused(tmp_path):
    write(tmp_path / "s2" / "31UFU" / "2024-05.tif", (s2_values(FILE_AREA) / 1e4).astype(np.float32))
    with pytest.raises(ProviderError, match=r"2024-05\.tif holds float reflectance"):
        local(tmp_path, reflectance="refuse").composite("s2", TILE, "2024-05")


@pytest.mark.parametrize("data, fragment", [
    (np.full((12, 610, 610), 7, np.uint8), "8-bit"),
    (np.full((12, 610, 610), -5, np.int16), "outside 0..65535"),
    (np.full((12, 610, 610), 70000.0, np.float32), "expected L2A DN"),
], ids=["uint8", "negative-int16", "float-too-large"])
def test_s2_values_out_of_range_are_refused_naming_the_file(tmp_path, data, fragment):
    write(tmp_path / "s2" / "31UFU" / "2024-05.tif", data)
    with pytest.raises(ProviderError, match=rf"2024-05\.tif.*{fragment}"):
        local(tmp_path).composite("s2", TILE, "2024-05")


def test_s1_db_is_converted_to_linear_power(tmp_path, caplog):
    db = np.full((2, 610, 610), -12.0, np.float32)
    db[1] = -20.0
    db[:, 305, :] = np.nan  # the first row of TILE has no observation
    write(tmp_path / "s1" / "31UFU" / "2024-05.tif", db, descriptions=["VV", "VH"])
    with caplog.at_level(logging.INFO, logger="rs_embed_assets.providers.local"):
        ds = local(tmp_path).composite("s1", TILE, "2024-05")
    v = ds["data"].values
    assert np.isnan(v[:, 0]).all() and ds["valid_count"].values[0].max() == 0
    np.testing.assert_allclose(v[:, 1:, :].reshape(2, -1)[:, 0], [10 ** -1.2, 10 ** -2.0], rtol=1e-5)
    assert any("dB" in r.getMessage() for r in caplog.records)
    with pytest.raises(ProviderError, match=r"2024-05\.tif holds negative S1 values"):
        local(tmp_path, s1_db="refuse").composite("s1", TILE, "2024-05")


def test_window_partly_outside_the_file_has_no_observations_there(tmp_path):
    vals = s2_values(TILE)
    write(tmp_path / "s2" / "31UFU" / "2024-05.tif", vals, area=TILE)
    shifted = replace(TILE, x0=TILE.x0 + 100 * 10)  # 100 px inside, 205 px east of the file
    ds = local(tmp_path).composite("s2", shifted, "2024-05")
    assert ds["valid_count"].values[:, :205].min() == 1 and ds["valid_count"].values[:, 205:].max() == 0
    np.testing.assert_array_equal(ds["data"].values[:, :, :205], vals[:, :, 100:])
    away = replace(TILE, x0=TILE.x0 + 1000 * 10)
    with pytest.raises(ProviderError, match=r"2024-05\.tif .* does not reach tile window"):
        local(tmp_path).composite("s2", away, "2024-05")


@pytest.mark.parametrize("kw, fragment", [
    ({"epsg": 32632}, "is in EPSG:32632"),
    ({"area": replace(FILE_AREA, x0=FILE_AREA.x0 + 5)}, "not aligned"),
    ({"transform": Affine(20, 0, FILE_AREA.x0, 0, -20, FILE_AREA.y0)}, r"\b20.0 m pixels"),
])
def test_grid_mismatches_are_refused_naming_the_file(tmp_path, kw, fragment):
    write(tmp_path / "s2" / "31UFU" / "2024-05.tif", s2_values(FILE_AREA), **kw)
    with pytest.raises(ProviderError, match=rf"2024-05\.tif.*{fragment}"):
        local(tmp_path).composite("s2", TILE, "2024-05")


def test_not_a_geotiff_names_the_file(tmp_path):
    p = tmp_path / "s2" / "31UFU" / "2024-05.tif"
    p.parent.mkdir(parents=True)
    p.write_bytes(b"II*\x00garbage")
    with pytest.raises(ProviderError, match=r"2024-05\.tif: could not open it"):
        local(tmp_path).composite("s2", TILE, "2024-05")


def test_a_margin_window_prefers_the_file_that_covers_it(tmp_path):
    """The sub-tile's own file does not reach the margin; its MGRS tile's file does and is used."""
    vals = s2_values(FILE_AREA)
    write(tmp_path / "s2" / "31UFU" / "2024-05.tif", vals)
    write(tmp_path / "s2" / TILE.key / "2024-05.tif", window_of(vals, FILE_AREA, TILE).copy(), area=TILE)
    ds = local(tmp_path).composite("s2", TILE, "2024-05")
    assert json.loads(ds.attrs["provider_info"])["file"].endswith(f"{TILE.key}/2024-05.tif")
    margin = replace(TILE, x0=TILE.x0 + 80, y0=TILE.y0 + 160, width=TILE.width + 16, height=TILE.height + 16)
    ds = local(tmp_path).composite("s2", margin, "2024-05")
    assert json.loads(ds.attrs["provider_info"])["file"].endswith("31UFU/2024-05.tif")
    np.testing.assert_array_equal(ds["data"].values, window_of(vals, FILE_AREA, margin))
    assert ds.attrs["valid_fraction"] == 1.0
