"""Grids and composites open in GDAL (rasterio's own wheel) with their CRS; COG export and change maps."""

import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio
import xarray as xr
from affine import Affine

from outputs_data import MODEL, MONTHS, TILES, data_root
from rs_embed_assets import cli
from rs_embed_assets.export import cosine_distance, export_composite, export_grid, write_cog
from rs_embed_assets.grid import parse_tile_key
from rs_embed_assets.storage import Storage

TILE, MONTH = TILES[0], MONTHS[1]


@pytest.fixture(scope="module")
def storage(tmp_path_factory):
    return Storage(data_root(tmp_path_factory))


def _gdal(store, var):
    return rasterio.open(f'ZARR:"{store}":/{var}')


@pytest.mark.parametrize("sensor, bands", [("s2", 12), ("s1", 2)])
def test_composite_store_opens_in_gdal_with_crs_transform_and_band_names(storage, sensor, bands):
    reader = storage.open_composite(sensor, TILE, MONTH)
    record = reader.record
    with _gdal(reader.path, "data") as src:
        assert src.count == bands
        assert src.crs.to_epsg() == parse_tile_key(TILE).epsg
        assert src.transform == Affine.from_gdal(*record["transform"])
        assert [src.tags(i + 1)["DIM_band_VALUE"] for i in range(bands)] == list(reader.bands)
        np.testing.assert_array_equal(src.read(), reader.rows(0, reader.height)[0])
    with _gdal(reader.path, "valid_count") as src:
        np.testing.assert_array_equal(src.read(1), reader.valid_rows(0, reader.height))


def test_xarray_sees_spatial_ref_as_a_coordinate(storage):
    ds = xr.open_zarr(storage.open_composite("s2", TILE, MONTH).path)
    assert "spatial_ref" in ds.coords and "spatial_ref" not in ds.data_vars
    assert ds["data"].attrs["grid_mapping"] == "spatial_ref"
    assert "crs_wkt" in ds["spatial_ref"].attrs and "GeoTransform" in ds["spatial_ref"].attrs


def test_grid_store_opens_in_gdal_with_the_grid_transform(storage):
    manifest = storage.read_manifest(MODEL, TILE, MONTH)
    grid = storage.open_grid(MODEL, TILE, MONTH)
    gt = [float(v) for v in grid["spatial_ref"].attrs["GeoTransform"].split()]
    with _gdal(storage.resolve(manifest["grid_path"]), "embedding") as src:
        assert src.count == grid.sizes["feature"] == 768
        assert src.crs.to_epsg() == parse_tile_key(TILE).epsg
        assert src.transform == Affine.from_gdal(*gt)
        got = src.read([1, 384, 768]).astype(np.float32)
    want = grid["embedding"].values[[0, 383, 767]].astype(np.float32)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_allclose(got[~np.isnan(got)], want[~np.isnan(want)])


def _is_cog(src):
    return src.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"


def test_composite_cog_export(storage, tmp_path):
    reader = storage.open_composite("s2", TILE, MONTH)
    out = export_composite(storage, "s2", TILE, MONTH, tmp_path / "s2.tif")
    with rasterio.open(out) as src:
        assert _is_cog(src) and src.driver == "GTiff"
        assert src.profile["tiled"] and src.compression.name == "deflate"
        assert src.overviews(1), "a COG carries internal overviews"
        assert src.crs.to_epsg() == parse_tile_key(TILE).epsg
        assert src.transform == Affine.from_gdal(*reader.record["transform"])
        assert list(src.descriptions) == list(reader.bands)
        assert src.nodata == 0 and src.dtypes[0] == "uint16"
        assert src.tags()["product"] == "composites/s2"
        np.testing.assert_array_equal(src.read(), reader.rows(0, reader.height)[0])
    assert [p.name for p in tmp_path.iterdir()] == ["s2.tif"], "no scratch files left behind"


def test_grid_cog_export_lines_up_with_the_chip_footprints(storage, tmp_path):
    out = export_grid(storage, MODEL, TILE, MONTH, tmp_path / "grid.tif")
    grid = storage.open_grid(MODEL, TILE, MONTH)
    manifest = storage.read_manifest(MODEL, TILE, MONTH)
    with rasterio.open(out) as src:
        assert _is_cog(src) and max(src.shape) <= 128  # 16 × 16 cells: smaller than one COG tile, no overview
        assert src.count == 768 and src.dtypes[0] == "float32" and np.isnan(src.nodata)
        assert src.descriptions[:2] == ("f000", "f001") and src.descriptions[-1] == "f767"
        assert src.tags()["checkpoint_sha256"] == manifest["checkpoint_sha256"]
        data = src.read()
        transform = src.transform
    want = grid["embedding"].values.astype(np.float32)
    np.testing.assert_array_equal(np.isnan(data), np.isnan(want))
    np.testing.assert_allclose(data[~np.isnan(data)], want[~np.isnan(want)])
    # every chip's UTM footprint covers exactly its grid_size × grid_size cells, which hold values;
    # cells under no chip of this partition are NaN
    rows = pq.read_table(storage.vectors_path(MODEL, TILE, MONTH),
                         columns=["utm_minx", "utm_miny", "utm_maxx", "utm_maxy"]).to_pylist()
    assert len(rows) == manifest["rows"] > 0
    covered = np.zeros(data.shape[1:], bool)
    inv = ~transform
    for r in rows:
        c0, r0 = inv @ (r["utm_minx"], r["utm_maxy"])
        c1, r1 = inv @ (r["utm_maxx"], r["utm_miny"])
        assert np.allclose([c0, r0, c1, r1], np.round([c0, r0, c1, r1]), atol=1e-6), "chip edges fall on cell edges"
        r0, r1, c0, c1 = (int(round(v)) for v in (r0, r1, c0, c1))
        assert (r1 - r0, c1 - c0) == (4, 4)  # FoMo: 64 px chips → 4 × 4 cells of 160 m
        assert np.isfinite(data[:, r0:r1, c0:c1]).all()
        covered[r0:r1, c0:c1] = True
    assert np.isnan(data[:, ~covered]).all()


def test_change_map_from_the_cli_is_the_cosine_distance_of_two_months(storage, tmp_path, capsys):
    out = tmp_path / "change.tif"
    code = cli.main(["export", "--data-root", str(storage.root), "--model", MODEL, "--tile", TILE,
                     "--change", MONTHS[0], MONTHS[1], "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    a = storage.open_grid(MODEL, TILE, MONTHS[0])["embedding"].values.astype(np.float64)
    b = storage.open_grid(MODEL, TILE, MONTHS[1])["embedding"].values.astype(np.float64)
    cos = (a * b).sum(0) / np.sqrt((a * a).sum(0) * (b * b).sum(0))
    with rasterio.open(out) as src:
        assert _is_cog(src) and src.count == 1
        assert src.transform == Affine.from_gdal(*[float(v) for v in storage.open_grid(MODEL, TILE, MONTHS[0])
                                                   ["spatial_ref"].attrs["GeoTransform"].split()])
        got = src.read(1)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(cos))
    np.testing.assert_allclose(got[~np.isnan(got)], 1 - cos[~np.isnan(cos)], atol=1e-5)
    assert np.nanmax(got) > 0, "two months of synthetic imagery differ"


def test_cog_overviews_skip_nodata(tmp_path):
    data = np.arange(2 * 300 * 300, dtype=np.float32).reshape(2, 300, 300)
    data[:, :150] = np.nan
    out = write_cog(tmp_path / "x.tif", shape=data.shape, dtype="float32", read_rows=lambda y0, y1: data[:, y0:y1],
                    crs="EPSG:32631", transform=(600000.0, 160.0, 0.0, 5800000.0, 0.0, -160.0),
                    band_names=["a", "b"], nodata=float("nan"), rows_per_read=64)
    with rasterio.open(out) as src:
        assert _is_cog(src) and src.overviews(1) == [2] and src.block_shapes[0] == (256, 256)
        np.testing.assert_array_equal(src.read(), data)
        half = src.read(out_shape=(2, 150, 150))
        assert np.isnan(half[:, :75]).all() and np.isfinite(half[:, 75:]).all()


def test_cosine_distance_of_identical_and_opposite_cells():
    a = np.zeros((3, 1, 3), np.float32)
    a[:, 0, 0] = [1, 0, 0]
    a[:, 0, 1] = [0, 2, 0]
    a[:, 0, 2] = np.nan
    b = a.copy()
    b[:, 0, 1] = [0, -1, 0]
    np.testing.assert_allclose(cosine_distance(a, b)[0, :2], [0.0, 2.0])
    assert np.isnan(cosine_distance(a, b)[0, 2])


@pytest.mark.parametrize("args", [["--sensor", "s2"], ["--model", MODEL]])
def test_cli_exports_composites_and_grids(storage, tmp_path, args):
    out = tmp_path / "x.tif"
    assert cli.main(["export", "--data-root", str(storage.root), *args, "--tile", TILE, "--month",
                     f"{MONTH}-01", "-o", str(out)]) == 0
    with rasterio.open(out) as src:
        assert _is_cog(src) and src.crs is not None


def test_export_of_a_partition_never_materialised_is_a_clear_error(storage, tmp_path, capsys):
    code = cli.main(["export", "--data-root", str(storage.root), "--model", MODEL, "--tile", TILE,
                     "--month", "2023-01", "-o", str(tmp_path / "x.tif")])
    err = capsys.readouterr().err
    assert code == 2 and "not materialised" in err and "Traceback" not in err
    assert not (tmp_path / "x.tif").exists()
