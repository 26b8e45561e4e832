"""The vectors folder of a model is one GeoParquet 1.1 dataset for every reader, with month a DATE."""

import datetime as dt
import json

import duckdb
import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from outputs_data import MODEL, MONTHS, TILES, data_root
from rs_embed_assets.storage import Storage

JUNE = dt.date(2024, 6, 1)


@pytest.fixture(scope="module")
def storage(tmp_path_factory):
    return Storage(data_root(tmp_path_factory))


@pytest.fixture(scope="module")
def vdir(storage):
    return storage.vectors_dir(MODEL)


@pytest.fixture(scope="module")
def expected_rows(storage):
    rows = {(t, m): storage.read_manifest(MODEL, t, m)["rows"] for t in TILES for m in MONTHS}
    assert sum(rows.values()) > 0 and all(rows.values()), f"every partition should have chips: {rows}"
    return rows


def _june_rows(expected_rows):
    return sum(n for (_, m), n in expected_rows.items() if m == "2024-06")


def test_geopandas_reads_the_folder_with_crs_and_dates(vdir, expected_rows):
    gpd = pytest.importorskip("geopandas")
    df = gpd.read_parquet(vdir)
    assert len(df) == sum(expected_rows.values())
    assert df.crs is not None and df.crs.equals("OGC:CRS84")
    assert set(df["month"]) == {JUNE, dt.date(2024, 7, 1)}
    assert (df.geometry.geom_type == "Polygon").all()


def test_geopandas_bbox_filter_uses_the_covering_column(vdir):
    gpd = pytest.importorskip("geopandas")
    every = gpd.read_parquet(vdir)
    one_tile = every[every["tile"] == TILES[0]]
    xmin, ymin, xmax, ymax = one_tile.total_bounds
    # a box inside the first sub-tile, clear of the second one (which lies east of it)
    box = (xmin, ymin, xmin + (xmax - xmin) / 3, ymax)
    got = gpd.read_parquet(vdir, bbox=box)
    assert 0 < len(got) < len(every)
    assert set(got["tile"]) == {TILES[0]}
    from shapely.geometry import box as shapely_box

    assert got.geometry.intersects(shapely_box(*box)).all()
    outside = every[~every.geometry.intersects(shapely_box(*box))]
    assert len(outside) and not set(outside["chip_id"] + outside["month"].astype(str)) & set(
        got["chip_id"] + got["month"].astype(str)), "rows outside the box were returned"


def test_bbox_struct_matches_each_footprint_and_is_declared_as_covering(vdir):
    shapely = pytest.importorskip("shapely")
    for path in sorted(vdir.rglob("*.parquet")):
        pf = pq.ParquetFile(path)
        geo = json.loads(pf.metadata.metadata[b"geo"])
        assert geo["version"] == "1.1.0" and geo["primary_column"] == "geometry"
        col = geo["columns"]["geometry"]
        assert col["encoding"] == "WKB" and col["geometry_types"] == ["Polygon"]
        assert col["covering"] == {"bbox": {"xmin": ["bbox", "xmin"], "ymin": ["bbox", "ymin"],
                                            "xmax": ["bbox", "xmax"], "ymax": ["bbox", "ymax"]}}
        t = pf.read(columns=["geometry", "bbox"])
        bounds = np.array([shapely.from_wkb(g).bounds for g in t["geometry"].to_pylist()])
        box = t["bbox"].to_pylist()
        got = np.array([[b["xmin"], b["ymin"], b["xmax"], b["ymax"]] for b in box])
        np.testing.assert_allclose(got, bounds, rtol=0, atol=1e-6)
        if len(bounds):
            np.testing.assert_allclose(col["bbox"], [*bounds[:, :2].min(0), *bounds[:, 2:].max(0)], atol=1e-6)


@pytest.mark.parametrize("partitioning", [None, "hive"])
def test_pyarrow_dataset_reads_month_as_date32(vdir, expected_rows, partitioning):
    ds = pads.dataset(vdir, format="parquet", partitioning=partitioning)
    assert ds.schema.field("month").type == "date32[day]"
    assert ds.count_rows() == sum(expected_rows.values())
    june = ds.to_table(filter=pads.field("month") == JUNE)
    assert june.num_rows == _june_rows(expected_rows)
    assert pq.read_table(vdir).num_rows == sum(expected_rows.values())


def test_pandas_reads_the_folder(vdir, expected_rows):
    pd = pytest.importorskip("pandas")
    df = pd.read_parquet(vdir)
    assert len(df) == sum(expected_rows.values())
    assert set(df["month"]) == {JUNE, dt.date(2024, 7, 1)}
    assert len(df["embedding"].iloc[0]) == 768


def test_duckdb_glob_with_default_hive_detection_keeps_month_a_date(vdir, expected_rows):
    pattern = str(vdir / "**" / "*.parquet").replace("'", "''")
    con = duckdb.connect()
    described = con.execute(f"DESCRIBE SELECT * FROM read_parquet('{pattern}')").fetchall()
    types = {name: typ for name, typ, *_ in described}
    assert types["month"] == "DATE"
    n = con.execute(f"SELECT count(*) FROM read_parquet('{pattern}') WHERE month = DATE '2024-06-01'").fetchone()[0]
    assert n == _june_rows(expected_rows)
    cols = [name for name, *_ in described]
    assert len(cols) == len(set(cols)), f"a folder name duplicated a column: {cols}"


def test_polars_reads_month_as_date(vdir, expected_rows):
    pl = pytest.importorskip("polars")
    df = pl.read_parquet(vdir / "**" / "*.parquet")
    assert df.schema["month"] == pl.Date
    assert df.height == sum(expected_rows.values())
    assert df.filter(pl.col("month") == JUNE).height == _june_rows(expected_rows)
