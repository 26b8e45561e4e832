"""open_grids: one lazy (month, feature, y, x) dataset per tile over every committed grid of a model."""

import shutil

import numpy as np
import pytest

import rs_embed_assets
from outputs_data import MODEL, MONTHS, TILES, data_root
from rs_embed_assets.storage import Storage


@pytest.fixture(scope="module")
def storage(tmp_path_factory):
    return Storage(data_root(tmp_path_factory))


def test_one_dataset_per_tile_stacked_over_months(storage):
    grids = rs_embed_assets.open_grids(MODEL, storage.root)
    assert sorted(grids) == sorted(TILES)
    ds = grids[TILES[0]]
    assert ds["embedding"].dims == ("month", "feature", "y", "x")
    assert [str(m)[:10] for m in ds["month"].values] == [f"{m}-01" for m in MONTHS]
    assert "spatial_ref" in ds.coords
    for i, month in enumerate(MONTHS):
        want = storage.open_grid(MODEL, TILES[0], month)["embedding"].values
        np.testing.assert_array_equal(ds["embedding"].isel(month=i).values, want)
    sel = ds["embedding"].sel(month="2024-07-01").isel(feature=[0, 5], y=slice(4, 8), x=3).values
    want = storage.open_grid(MODEL, TILES[0], "2024-07")["embedding"].values[[0, 5], 4:8, 3]
    np.testing.assert_array_equal(sel, want)


def test_building_the_view_reads_no_chunk(storage, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(storage.root, root)
    copy = Storage(root)
    grids = rs_embed_assets.open_grids(MODEL, storage=copy)
    # damage the June grid of the first tile after the view was built: only reading June fails
    june = root / copy.read_manifest(MODEL, TILES[0], "2024-06")["grid_path"] / "embedding"
    for chunk in june.iterdir():
        if not chunk.name.startswith("."):
            chunk.write_bytes(b"garbage")
    ds = grids[TILES[0]]
    assert np.isfinite(ds["embedding"].sel(month="2024-07-01").values).any()
    with pytest.raises(Exception):
        ds["embedding"].sel(month="2024-06-01").values


def test_a_model_without_grids_is_a_clear_error(storage):
    with pytest.raises(LookupError, match="no committed scalemae_rgb grid"):
        rs_embed_assets.open_grids("scalemae_rgb", storage.root)
