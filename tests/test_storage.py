"""The commit protocol and verified reads of the storage layer."""

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from rs_embed_assets.materialize import materialize_composite
from rs_embed_assets.providers import create_provider
from rs_embed_assets.storage import StaleReadError, Storage, StorageError

KEY = "31UFU-k36-r21-c12"


@pytest.fixture
def committed(tmp_path):
    st = Storage(tmp_path)
    rec = materialize_composite(st, create_provider("sample"), "s2", KEY, "2024-07", block_rows=128)
    return st, rec


def test_rewrite_commits_a_new_version_and_removes_the_old(committed):
    st, first = committed
    second = materialize_composite(st, create_provider("sample"), "s2", KEY, "2024-07", block_rows=128)
    assert second["store"] != first["store"] and not st.resolve(first["store"]).exists()
    assert [p.name for p in st.composite_versions_dir("s2", KEY, "2024-07").iterdir()] == [second["store"].split("/")[-1]]
    assert second["data_version"] == first["data_version"]  # same pixels, same data version
    assert not any(st.staging_dir.iterdir())


def test_records_hold_paths_relative_to_the_root(committed):
    st, rec = committed
    assert not os.path.isabs(rec["store"])
    moved = st.root.parent / "moved"
    st.root.rename(moved)
    reader = Storage(moved).open_composite("s2", KEY, "2024-07")
    reader.verify()


def test_a_deleted_data_chunk_is_refused_with_path_and_fix(committed):
    st, rec = committed
    store = st.resolve(rec["store"])
    os.remove(store / "data" / "0.1.0")
    reader = st.open_composite("s2", KEY, "2024-07")
    with pytest.raises(StorageError, match=r"damaged: data rows 128–256 .*Re-materialise s2_composite"):
        reader.verify()


def test_a_deleted_valid_count_chunk_is_refused(committed):
    st, rec = committed
    os.remove(st.resolve(rec["store"]) / "valid_count" / "0.0")
    with pytest.raises(StorageError, match="damaged: valid_count rows 0–128"):
        st.open_composite("s2", KEY, "2024-07").valid_rows(0, 10)


def test_a_store_replaced_while_read_is_a_stale_read_not_a_mix(committed):
    st, rec = committed
    reader = st.open_composite("s2", KEY, "2024-07")
    reader.rows(0, 64)
    materialize_composite(st, create_provider("sample", seed=1), "s2", KEY, "2024-07", block_rows=128)
    with pytest.raises(StaleReadError):
        reader.rows(200, 300)


def test_a_broken_record_names_the_file(committed):
    st, _ = committed
    st.composite_record_path("s2", KEY, "2024-07").write_text("{not json")
    with pytest.raises(StorageError, match=r"2024-07.json is not valid JSON"):
        st.open_composite("s2", KEY, "2024-07")


def test_composite_is_georeferenced_and_covers_the_read_window(committed):
    st, rec = committed
    ds = st.open_composite("s2", KEY, "2024-07").to_dataset()
    assert "spatial_ref" in ds.coords and ds["spatial_ref"].attrs["crs_wkt"].startswith("PROJCRS")
    assert ds["data"].shape == tuple(rec["shape"]) and rec["window"]["height"] >= 305
    assert float(ds.x[0]) == rec["transform"][0] + 5.0


def test_sequential_chip_rows_decode_each_block_once(committed):
    """A pass over valid counts then chip rows must not evict the block it just read (it re-read per row)."""
    st, rec = committed
    reader = st.open_composite("s2", KEY, "2024-07")
    reads = []
    original = reader._read
    reader._read = lambda arr, region: reads.append(arr.basename) or original(arr, region)
    height = reader.height
    for y in range(0, height, 64):
        reader.valid_rows(y, min(y + 64, height))
    for y in range(0, height, 64):
        reader.rows(y, min(y + 64, height))
    blocks = -(-height // reader.block_rows)
    assert reads.count("data") == blocks, reads
