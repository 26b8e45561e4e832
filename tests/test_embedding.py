"""The streaming tile engine: rows, footprints, validity, the stitched grid, and equality with chip-by-chip embedding."""

import struct

import numpy as np
import pyarrow.parquet as pq
import pytest

from adapters.fomo import FomoAdapter, FomoConfig
from rs_embed_assets.grid import lonlat_to_utm, mgrs_tile, parse_tile_key
from rs_embed_assets.lattice import chip_lattice
from rs_embed_assets.materialize import EmbeddingSettings, materialize_composite, materialize_embeddings
from rs_embed_assets.providers import create_provider
from rs_embed_assets.providers.sample import SampleProvider
from rs_embed_assets.storage import Storage

KEY = "31UFU-k36-r21-c12"  # 305 px → owns 4 × 4 FoMo chips of the 31UFU lattice
TILE = parse_tile_key(KEY)
CKPT = {"sha256": "c" * 64, "random_init": True, "source_uri": "test"}


class HolesProvider(SampleProvider):
    """The sample provider with observations removed from two chips of the lattice (test data)."""

    def composite(self, sensor, tile, month):
        ds = super().composite(sensor, tile, month)
        base = mgrs_tile(tile.mgrs)
        oy, ox = round((base.y0 - tile.y0) / 10), round((tile.x0 - base.x0) / 10)  # window offset in the tile
        lat = chip_lattice(TILE, 64)
        for (r, c), rows in [((lat.row0, lat.col0), 64), ((lat.row0 + 1, lat.col0 + 1), 32)]:
            y, x = r * 64 - oy, c * 64 - ox
            y0, y1 = max(0, y), min(ds.sizes["y"], y + rows)
            x0, x1 = max(0, x), min(ds.sizes["x"], x + 64)
            if y1 > y0 and x1 > x0:
                ds["valid_count"].values[y0:y1, x0:x1] = 0
        return ds


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    cfg = FomoConfig(depth=1)
    path = FomoAdapter.write_random_checkpoint(tmp_path_factory.mktemp("f") / "f.pt", config=cfg)
    return FomoAdapter.from_checkpoint(path, config=cfg)


@pytest.fixture(scope="module")
def storage(tmp_path_factory):
    st = Storage(tmp_path_factory.mktemp("data"))
    materialize_composite(st, HolesProvider(cloud_cover=0.0), "s2", KEY, "2024-07")
    return st


def _ring(wkb: bytes) -> np.ndarray:
    order, gtype, nrings, npts = struct.unpack("<BIII", wkb[:13])
    assert (order, gtype, nrings, npts) == (1, 3, 1, 5)
    return np.frombuffer(wkb[13:], dtype="<f8").reshape(5, 2)


def _embed(storage, adapter, **kw):
    man = materialize_embeddings(storage, adapter, KEY, "2024-07", CKPT, EmbeddingSettings(**kw))
    return man, pq.read_table(storage.vectors_path("fomo", KEY, "2024-07"))


def test_rows_footprints_and_validity(storage, adapter):
    man, t = _embed(storage, adapter)
    lat = chip_lattice(TILE, 64)
    assert t.num_rows == 15 and man["chips_skipped"] == 1  # the chip without observations is not embedded
    by_rc = {(r["chip_row"], r["chip_col"]): r for r in t.to_pylist()}
    assert (lat.row0, lat.col0) not in by_rc and by_rc[(lat.row0 + 1, lat.col0 + 1)]["valid_fraction"] == pytest.approx(0.5)
    r0, c0 = lat.row0 + 2, lat.col0 + 3
    r = by_rc[(r0, c0)]
    assert r["chip_id"] == f"31UFU_64px_r{r0:03d}_c{c0:03d}"  # lattice indices of the MGRS tile, no k in the id
    base = mgrs_tile("31UFU")
    assert (r["utm_minx"], r["utm_maxy"]) == (base.x0 + c0 * 640, base.y0 - r0 * 640)
    ring = _ring(r["geometry"])
    x, y = lonlat_to_utm(TILE.epsg, ring[:, 0], ring[:, 1])
    np.testing.assert_allclose(x[:4], [r["utm_minx"], r["utm_maxx"], r["utm_maxx"], r["utm_minx"]], atol=1e-4)
    np.testing.assert_allclose(y[:4], [r["utm_miny"], r["utm_miny"], r["utm_maxy"], r["utm_maxy"]], atol=1e-4)
    assert r["bbox"]["xmin"] == pytest.approx(ring[:, 0].min()) and r["bbox"]["ymax"] == pytest.approx(ring[:, 1].max())
    assert r["checkpoint_sha256"] == "c" * 64 and r["month"].isoformat() == "2024-07-01"


def test_stream_equals_chip_by_chip_embedding(storage, adapter):
    """Pooled rows and grid cells equal embedding each chip on its own from the whole composite (float32)."""
    man, t = _embed(storage, adapter, grid_dtype="float32")
    comp = storage.open_composite("s2", KEY, "2024-07")
    ds = comp.to_dataset()
    w = comp.record["window"]
    grid = storage.open_grid("fomo", KEY, "2024-07")["embedding"].values
    assert grid.shape == (768, 16, 16)
    lat = chip_lattice(TILE, 64)
    assert np.isnan(grid[:, :4, :4]).all() and np.isfinite(grid[:, 4:, :]).all()
    for row in t.to_pylist():
        y, x = row["chip_row"] * 64 - w["y0"], row["chip_col"] * 64 - w["x0"]
        raw = ds["data"].values[:, y:y + 64, x:x + 64][None].astype(np.float32)
        own = adapter.embed_raw(raw)
        np.testing.assert_allclose(row["embedding"], own.pooled[0].numpy(), atol=1e-6, rtol=0)
        gy, gx = (row["chip_row"] - lat.row0) * 4, (row["chip_col"] - lat.col0) * 4
        np.testing.assert_allclose(grid[:, gy:gy + 4, gx:gx + 4], own.grid[0].numpy(), atol=1e-6, rtol=0)


def test_batch_size_and_prefetch_change_no_value(storage, adapter):
    _, a = _embed(storage, adapter, batch_size=1, prefetch=1)
    ga = storage.open_grid("fomo", KEY, "2024-07")["embedding"].values
    _, b = _embed(storage, adapter, batch_size=7, prefetch=4)
    gb = storage.open_grid("fomo", KEY, "2024-07")["embedding"].values
    assert a.equals(b)
    np.testing.assert_array_equal(ga, gb)


def test_float16_grids_state_their_error(storage, adapter):
    _embed(storage, adapter, grid_dtype="float32")
    g32 = storage.open_grid("fomo", KEY, "2024-07")["embedding"].values
    man, _ = _embed(storage, adapter, grid_dtype="float16")
    g16 = storage.open_grid("fomo", KEY, "2024-07")["embedding"]
    assert g16.dtype == np.float16 and man["grid_dtype"] == "float16"
    ok = np.isfinite(g32)
    rel = np.abs(g16.values.astype(np.float32)[ok] - g32[ok]) / np.maximum(np.abs(g32[ok]), 1e-3)
    assert rel.max() <= 2 ** -11 + 1e-7  # float16 rounding: half an ulp of an 11-bit significand


def test_bad_batch_size_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="RS_EMBED_BATCH_SIZE"):
        EmbeddingSettings(batch_size=-1)


def test_progress_is_logged_by_time_not_per_batch(storage, adapter):
    logs = []
    materialize_embeddings(storage, adapter, KEY, "2024-07", CKPT, EmbeddingSettings(batch_size=1), log_fn=logs.append)
    progress = [line for line in logs if "chips (" in line]
    assert len(progress) <= 1, f"15 batches must not log 15 progress lines: {progress}"


def test_grid_values_beyond_float16_are_refused_with_the_fix(storage):
    from standin import standin_adapter

    big = standin_adapter(64)
    with __import__("torch").no_grad():
        big.model.bias.fill_(1e6)
    with pytest.raises(Exception, match="float16 range.*RS_EMBED_GRID_DTYPE=float32"):
        materialize_embeddings(storage, big, KEY, "2024-07", CKPT, EmbeddingSettings(grid_dtype="float16"))
    assert storage.read_manifest("standin64", KEY, "2024-07") is None  # nothing committed
    assert not any(storage.staging_dir.iterdir())  # nothing left behind
