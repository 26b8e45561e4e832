"""Library: chips cut from a composite, pooled rows with footprints, the stitched georeferenced grid."""

import struct

import numpy as np
import pytest

from adapters.fomo import FomoAdapter, FomoConfig
from rs_embed_assets.embedding import EmbeddingError, embed_tile
from rs_embed_assets.grid import lonlat_to_utm, parse_tile_key
from rs_embed_assets.providers import create_provider

TILE = parse_tile_key("31UFU-k36-r21-c12")  # 305 px → 4 × 4 FoMo chips
PROV = {"checkpoint_sha256": "c" * 64, "composite_version": "v", "preprocessing_hash": "p", "code_version": "x"}


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    cfg = FomoConfig(depth=1)
    path = FomoAdapter.write_random_checkpoint(tmp_path_factory.mktemp("f") / "f.pt", config=cfg)
    return FomoAdapter.from_checkpoint(path, config=cfg)


@pytest.fixture(scope="module")
def composite():
    ds = create_provider("sample", cloud_cover=0.0).composite("s2", TILE, "2024-07")
    ds["valid_count"][:64, :64] = 0  # chip (0, 0) has no observation at all
    ds["valid_count"][64:96, 64:128] = 0  # chip (1, 1) is half valid
    return ds


def _ring(wkb: bytes) -> np.ndarray:
    order, gtype, nrings, npts = struct.unpack("<BIII", wkb[:13])
    assert (order, gtype, nrings, npts) == (1, 3, 1, 5)
    return np.frombuffer(wkb[13:], dtype="<f8").reshape(5, 2)


def test_rows_footprints_and_validity(adapter, composite):
    res = embed_tile(adapter, [composite], tile=TILE, month="2024-07", provenance=PROV)
    t = res.vectors
    assert t.num_rows == 15 and res.stats["chips_skipped"] == 1  # the empty chip is not embedded
    rows = t.to_pylist()
    by_rc = {(r["chip_row"], r["chip_col"]): r for r in rows}
    assert (0, 0) not in by_rc and by_rc[(1, 1)]["valid_fraction"] == pytest.approx(0.5)
    r = by_rc[(2, 3)]
    assert r["chip_id"] == "31UFU-k36-r21-c12_64px_r002_c003"
    assert (r["utm_minx"], r["utm_maxy"]) == (TILE.x0 + 3 * 640, TILE.y0 - 2 * 640)
    ring = _ring(r["geometry"])
    x, y = lonlat_to_utm(TILE.epsg, ring[:, 0], ring[:, 1])
    np.testing.assert_allclose(x[:4], [r["utm_minx"], r["utm_maxx"], r["utm_maxx"], r["utm_minx"]], atol=1e-4)
    np.testing.assert_allclose(y[:4], [r["utm_miny"], r["utm_miny"], r["utm_maxy"], r["utm_maxy"]], atol=1e-4)
    assert r["checkpoint_sha256"] == "c" * 64 and r["month"].isoformat() == "2024-07-01"


def test_grid_is_stitched_where_the_chips_are(adapter, composite):
    res = embed_tile(adapter, [composite], tile=TILE, month="2024-07", provenance=PROV)
    g = res.grid["embedding"].values
    assert g.shape == (768, 16, 16)
    assert np.isnan(g[:, :4, :4]).all() and np.isfinite(g[:, 4:, :]).all()
    # the grid cell transform: 160 m cells starting at the tile corner
    assert res.grid.attrs["transform"] == [TILE.x0, 160.0, 0.0, TILE.y0, 0.0, -160.0]
    assert float(res.grid.x[0]) == TILE.x0 + 80.0
    # chip (2, 3)'s own grid lands in cells rows 8..11, cols 12..15
    raw = composite["data"].values[:, 128:192, 192:256][None].astype(np.float32)
    own = adapter.embed_raw(raw).grid[0].numpy()
    np.testing.assert_allclose(g[:, 8:12, 12:16], own, atol=1e-5)
    # and pooled rows equal single-chip embeddings (batching changes nothing)
    row = [r for r in res.vectors.to_pylist() if (r["chip_row"], r["chip_col"]) == (2, 3)][0]
    np.testing.assert_allclose(row["embedding"], adapter.embed_raw(raw).pooled[0].numpy(), atol=1e-5)


def test_min_valid_fraction_and_chip_larger_than_tile(adapter, composite):
    res = embed_tile(adapter, [composite], tile=TILE, month="2024-07", provenance=PROV, min_valid_fraction=0.9)
    assert res.vectors.num_rows == 14
    small = parse_tile_key("31UFU-k180-r00-c00")  # 61 px: smaller than a 64 px chip
    ds = create_provider("sample").composite("s2", small, "2024-07")
    with pytest.raises(EmbeddingError, match="smaller than one fomo chip"):
        embed_tile(adapter, [ds], tile=small, month="2024-07", provenance=PROV)
