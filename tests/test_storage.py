"""Atomic writes: readers see the old or the new partition, never a half-written one."""

import numpy as np
import pyarrow as pa
import pytest
import xarray as xr

from rs_embed_assets.storage import Storage


def _ds(v):
    return xr.Dataset({"a": (("y", "x"), np.full((4, 4), v, np.float32))})


def test_rewrite_replaces_zarr(tmp_path):
    st = Storage(tmp_path)
    p = st.composite_path("s2", "31UFU", "2024-01")
    st.write_zarr(_ds(1), p)
    st.write_zarr(_ds(2), p)
    assert float(st.read_zarr(p)["a"].max()) == 2
    assert [q.name for q in p.parent.iterdir()] == [p.name], "no temporary or backup leftovers"


def test_failed_write_keeps_previous_version(tmp_path):
    st = Storage(tmp_path)
    p = st.vectors_path("fomo", "31UFU", "2024-01")
    st.write_parquet(pa.table({"a": [1]}), p)
    with pytest.raises(RuntimeError):
        with st.atomic_path(p) as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("crash mid-write")
    assert pa.parquet.read_table(p).column("a").to_pylist() == [1]
    assert [q.name for q in p.parent.iterdir()] == [p.name]
