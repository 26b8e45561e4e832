"""Damaged files on disk are refused with a message naming the file and the fix, and doctor lists them."""

import json
import shutil

import pytest

from rs_embed_assets.doctor import diagnose
from rs_embed_assets.storage import Storage, StorageError
from tests.faults.test_kill import MODEL, MONTH, TILE, root, template  # noqa: F401 (fixtures)


def _damage_json(path):
    path.write_text(path.read_text()[: len(path.read_text()) // 2])  # truncated mid-object


def test_broken_composite_metadata_names_the_store_and_the_fix(root):  # noqa: F811
    st = Storage(root)
    store = root / st.composite_record("s2", TILE, MONTH)["store"]
    _damage_json(store / ".zmetadata")
    _damage_json(store / "data" / ".zarray")
    with pytest.raises(StorageError) as info:
        st.open_composite("s2", TILE, MONTH)
    assert str(store) in str(info.value) and "re-materialise s2_composite" in str(info.value)
    assert [(f.kind, f.path) for f in diagnose(root)] == [("damaged", st.rel(store))]


@pytest.mark.parametrize("variable", ["data", "valid_count"])
def test_deleted_composite_chunk_is_refused_not_read_as_zeros(root, variable):  # noqa: F811
    """The issue: a deleted data chunk embedded zeros as valid pixels; a deleted valid_count chunk gave 0 chips."""
    st = Storage(root)
    store = root / st.composite_record("s2", TILE, MONTH)["store"]
    chunk = sorted((store / variable).glob("0.*"))[0]
    chunk.unlink()
    with pytest.raises(StorageError, match="is damaged.*Re-materialise s2_composite"):
        st.open_composite("s2", TILE, MONTH).verify()
    assert [f.kind for f in diagnose(root)] == ["damaged"]


def test_broken_grid_metadata_names_the_grid(root):  # noqa: F811
    st = Storage(root)
    grid = root / st.read_manifest(MODEL, TILE, MONTH)["grid_path"]
    _damage_json(grid / ".zmetadata")
    with pytest.raises(Exception) as info:
        st.open_grid(MODEL, TILE, MONTH)
    assert str(grid) in str(info.value), f"the error does not name the grid: {info.value!r}"
    assert [f.kind for f in diagnose(root)] == ["damaged"]


def test_truncated_vectors_file_names_the_file(root):  # noqa: F811
    st = Storage(root)
    vec = st.vectors_path(MODEL, TILE, MONTH)
    vec.write_bytes(vec.read_bytes()[:100])
    with pytest.raises(StorageError) as info:
        st.read_manifest(MODEL, TILE, MONTH)
    assert str(vec) in str(info.value) and "re-materialise" in str(info.value)
    assert [(f.kind, f.path) for f in diagnose(root)] == [("damaged", st.rel(vec))]
