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
    reader._read = lambda what, i: reads.append(("data", "valid_count")[what]) or original(what, i)
    height = reader.height
    for y in range(0, height, 64):
        reader.valid_rows(y, min(y + 64, height))
    for y in range(0, height, 64):
        reader.rows(y, min(y + 64, height))
    blocks = -(-height // reader.block_rows)
    assert reads.count("data") == blocks, reads


# --- the fast read path: chunk files decoded on a thread pool -----------------------------------
@pytest.mark.parametrize("sensor", ["s2", "s1"])
def test_direct_chunk_reads_equal_zarr_reads_including_edge_chunks(tmp_path, sensor):
    """Blocks read straight from the chunk files are exactly what zarr-python reads (uint16 and NaN float32)."""
    import zarr

    st = Storage(tmp_path)
    materialize_composite(st, create_provider("sample"), sensor, KEY, "2024-07", block_rows=128)
    reader = st.open_composite(sensor, KEY, "2024-07")
    assert all(f is not None for f in reader._fast), "composites must take the fast path"
    assert reader.width % 128 and reader.height % 128  # partial chunks at the right and bottom edges
    group = zarr.open_group(str(reader.path), mode="r", zarr_format=2)
    for i in range(len(reader.hashes)):
        y0, y1 = i * 128, min(reader.height, (i + 1) * 128)
        np.testing.assert_array_equal(reader._read(0, i), group["data"][:, y0:y1, :])
        np.testing.assert_array_equal(reader._read(1, i), group["valid_count"][y0:y1, :])
    data, valid = reader.rows(0, reader.height)
    np.testing.assert_array_equal(data, group["data"][...])
    np.testing.assert_array_equal(valid, group["valid_count"][...])


def test_composites_use_the_fast_codec_and_grids_stay_compact(committed):
    st, rec = committed
    meta = json.loads((st.resolve(rec["store"]) / "data" / ".zarray").read_text())
    assert meta["compressor"]["id"] == "blosc" and meta["compressor"]["cname"] == "lz4"


def test_a_deleted_chunk_is_refused_on_the_fast_path(committed):
    st, rec = committed
    reader = st.open_composite("s2", KEY, "2024-07")
    (st.resolve(rec["store"]) / "data" / "0.1.0").unlink()
    reader.rows(0, 64)  # block 0 is intact
    with pytest.raises(StorageError, match=r"is damaged: data rows 128–256"):
        reader.rows(130, 140)


def test_read_ahead_of_a_damaged_block_fails_only_when_that_block_is_read(committed):
    st, rec = committed
    (st.resolve(rec["store"]) / "data" / "0.1.0").unlink()
    reader = st.open_composite("s2", KEY, "2024-07")
    data, _ = reader.rows(0, 100)  # reads block 0 and decodes block 1 ahead
    assert reader._ahead is not None and reader._ahead[0] == 1
    assert data.shape[1] == 100
    with pytest.raises(StorageError, match="is damaged"):
        reader.rows(120, 140)


def test_the_read_thread_count_is_validated(monkeypatch, committed):
    from rs_embed_assets.storage import read_threads

    monkeypatch.setenv("RS_EMBED_ASSETS_READ_THREADS", "0")
    with pytest.raises(ValueError, match=r"RS_EMBED_ASSETS_READ_THREADS='0' is not a thread count"):
        read_threads()
    monkeypatch.setenv("RS_EMBED_ASSETS_READ_THREADS", "1")
    st, _ = committed
    reader = st.open_composite("s2", KEY, "2024-07")
    reader.verify()  # one decode thread reads the same verified blocks


# --- uncached readers (temporal models: one reader per frame, cache_blocks = 0) -------------------
def _counting(reader):
    reads = []
    original = reader._read
    reader._read = lambda what, i: reads.append((("data", "valid_count")[what], i)) or original(what, i)
    return reads


@pytest.mark.parametrize("band_index", [None, [8, 2, 0, 5]])
def test_uncached_chip_rows_equal_full_reads_and_decode_each_block_once(committed, band_index):
    """Chip rows of 48 (so some straddle two 128-row blocks) from a lattice offset of 5 rows, as a
    temporal model reads them: the planning pass over valid counts, then the data pass. Every value
    equals a full read, each block is decoded once per pass, and between calls the reader holds only
    the rest of the current block below the rows it served, never a whole block."""
    st, _ = committed
    cached = st.open_composite("s2", KEY, "2024-07")
    full_data, full_valid = cached.rows(0, cached.height)  # the cached path, the whole window
    want = full_data if band_index is None else full_data[band_index]
    reader = st.open_composite("s2", KEY, "2024-07")
    reader.cache_blocks = 0
    reads = _counting(reader)
    br, height, chip = reader.block_rows, reader.height, 48
    spans = [(y, y + chip) for y in range(5, height - chip + 1, chip)]
    assert any(y0 // br != (y1 - 1) // br for y0, y1 in spans), "some chip rows must straddle two blocks"
    for y0, y1 in spans:
        np.testing.assert_array_equal(reader.valid_rows(y0, y1), full_valid[y0:y1])
    for y0, y1 in spans:
        data, valid = reader.rows(y0, y1, band_index)
        np.testing.assert_array_equal(data, want[:, y0:y1])
        np.testing.assert_array_equal(valid, full_valid[y0:y1])
        data[...] = 0  # what a caller does with its rows cannot reach the reader's tail
        block_end = min(height, (y1 // br + 1) * br)
        tail = reader._tail
        if y1 % br == 0:
            assert tail is None
        else:  # the tail: exactly the selected bands of rows y1 … block end, nothing else is kept
            assert (tail.y0, tail.data.shape) == (y1, (want.shape[0], block_end - y1, reader.width))
            assert block_end - y1 < br
        assert not reader._cache and reader._ahead is None and reader._vtail is None
    touched = sorted({i for y0, y1 in spans for i in range(y0 // br, (y1 - 1) // br + 1)})
    assert [i for what, i in reads if what == "data"] == touched
    assert [i for what, i in reads if what == "valid_count"] == touched * 2  # once per pass
    for y0, y1 in [(100, 300), (0, 40), (250, 260), (0, height)]:  # out of order: still exact
        np.testing.assert_array_equal(reader.rows(y0, y1, band_index)[0], want[:, y0:y1])


def test_uncached_reads_refuse_a_damaged_block_with_the_same_error(committed):
    st, rec = committed
    (st.resolve(rec["store"]) / "data" / "0.1.0").unlink()
    reader = st.open_composite("s2", KEY, "2024-07")
    reader.cache_blocks = 0
    reader.rows(5, 53, [0, 1])
    reader.rows(53, 101, [0, 1])  # block 0 is intact; its tail serves these rows
    with pytest.raises(StorageError, match=r"is damaged: data rows 128–256 do not match .*Re-materialise s2_composite"):
        reader.rows(101, 149, [0, 1])  # the rows of block 0 come from its tail, block 1 is checked first
    os.remove(st.resolve(rec["store"]) / "valid_count" / "0.0")
    planner = st.open_composite("s2", KEY, "2024-07")
    planner.cache_blocks = 0
    with pytest.raises(StorageError, match="damaged: valid_count rows 0–128"):
        planner.valid_rows(5, 53)


def test_a_tail_over_its_byte_budget_is_dropped_and_its_block_decoded_again(committed):
    """``tail_bytes`` bounds what an uncached reader holds: rests longer than the budget are not kept
    (their block is decoded and verified again when asked), the values stay exact."""
    st, _ = committed
    cached = st.open_composite("s2", KEY, "2024-07")
    want = cached.rows(0, cached.height, [8, 2])[0]
    reader = st.open_composite("s2", KEY, "2024-07")
    reader.cache_blocks = 0
    row_bytes = reader.width * (2 * 2 + 2)  # two uint16 bands + uint16 valid_count
    reader.tail_bytes = 60 * row_bytes  # at most 60 rows
    reads = _counting(reader)
    br, spans = reader.block_rows, [(y, y + 48) for y in range(5, reader.height - 48 + 1, 48)]
    kept = 0
    for y0, y1 in spans:
        np.testing.assert_array_equal(reader.rows(y0, y1, [8, 2])[0], want[:, y0:y1])
        tail = reader._tail
        if tail is not None:
            kept += 1
            assert tail.data.nbytes + tail.valid.nbytes <= reader.tail_bytes
        else:  # dropped: the rest of the block was over the budget (or there was none)
            rest = 0 if y1 % br == 0 else min(reader.height, (y1 // br + 1) * br) - y1
            assert rest == 0 or rest * row_bytes > reader.tail_bytes
    decodes = len([1 for what, _ in reads if what == "data"])
    touched = {i for y0, y1 in spans for i in range(y0 // br, (y1 - 1) // br + 1)}
    per_span = sum((y1 - 1) // br - y0 // br + 1 for y0, y1 in spans)
    assert kept and len(touched) < decodes < per_span
