"""One chip lattice per MGRS tile: every pixel embedded once at any sub-tiling, ids and vectors independent of k."""

import numpy as np
import pyarrow.parquet as pq
import pytest

from rs_embed_assets.grid import TILE_PIXELS, mgrs_tile, subtile
from rs_embed_assets.lattice import chip_lattice, owns_chips, read_window, tile_window
from rs_embed_assets.materialize import EmbeddingSettings, materialize_composite, materialize_embeddings
from rs_embed_assets.providers import create_provider
from rs_embed_assets.storage import Storage
from standin import preprocessing_only, standin_adapter

CHIPS = (64, 224, 512)  # fomo; terrafm_b, scalemae_rgb, agrifm; dynamicvis
KS = (1, 2, 7, 20, 36)
CKPT = {"sha256": "c" * 64, "random_init": True, "source_uri": "test"}


def _ids(tile, chip):
    lat = chip_lattice(tile, chip)
    return [lat.chip_id(r, c) for r, c in lat.positions()]


@pytest.mark.parametrize("chip", CHIPS)
@pytest.mark.parametrize("k", KS)
def test_subtiles_partition_the_whole_tile_lattice(chip, k):
    whole = _ids(mgrs_tile("31UFU"), chip)
    assert len(whole) == (TILE_PIXELS // chip) ** 2
    parts = [i for r in range(k) for c in range(k) for i in _ids(subtile("31UFU", k, r, c), chip)]
    assert len(parts) == len(set(parts)), "a chip is owned by two sub-tiles"
    assert set(parts) == set(whole), "a chip of the tile is owned by no sub-tile"


@pytest.mark.parametrize("chip", CHIPS)
@pytest.mark.parametrize("k", KS)
def test_a_subtile_reads_every_pixel_its_chips_need(chip, k):
    for r, c in [(0, 0), (k // 2, k - 1), (k - 1, k - 1)]:
        t = subtile("31UFU", k, r, c)
        lat, win, own = chip_lattice(t, chip), read_window(t, CHIPS), tile_window(t)
        assert (win.y0, win.x0) == (own.y0, own.x0) and win.y1 >= own.y1 and win.x1 >= own.x1
        assert win.y1 <= TILE_PIXELS and win.x1 <= TILE_PIXELS
        if lat.count:
            assert lat.window.y0 >= win.y0 and lat.window.y1 <= win.y1
            assert lat.window.x0 >= win.x0 and lat.window.x1 <= win.x1
            # the chip's upper-left pixel lies in the sub-tile
            assert own.y0 <= lat.window.y0 < own.y1 and own.x0 <= lat.window.x0 < own.x1


def test_small_subtiles_may_own_no_chip_of_a_large_model():
    # 305 px sub-tiles: the 512 px lattice puts a chip corner in only some of them
    owners = [owns_chips(subtile("31UFU", 36, 0, c), 512) for c in range(36)]
    assert any(owners) and not all(owners)
    assert sum(owners) == TILE_PIXELS // 512


def _embed(storage, provider, tile_key, chip, month="2024-07", **settings):
    materialize_composite(storage, provider, "s2", tile_key, month)
    adapter = standin_adapter(chip)
    return materialize_embeddings(storage, adapter, tile_key, month, CKPT,
                                  EmbeddingSettings(grid_dtype="float32", **settings))


@pytest.mark.parametrize("chip", [64, 224])
def test_a_chips_id_vector_and_grid_cells_do_not_depend_on_k(tmp_path, chip):
    """The same chips embedded through a k=36 split and a k=20 split give identical rows and grid cells."""
    provider = create_provider("sample")
    st = Storage(tmp_path)
    found = {}
    for key in ["31UFU-k36-r21-c12", "31UFU-k36-r21-c13", "31UFU-k20-r11-c07"]:
        man = _embed(st, provider, key, chip)
        t = pq.read_table(st.vectors_path(f"standin{chip}", key, "2024-07")).to_pylist()
        grid = st.open_grid(f"standin{chip}", key, "2024-07")
        tf = man["chip_rows"][0], man["chip_cols"][0]
        for row in t:
            g = grid["embedding"].values[:, (row["chip_row"] - tf[0]) * 4:(row["chip_row"] - tf[0] + 1) * 4,
                                         (row["chip_col"] - tf[1]) * 4:(row["chip_col"] - tf[1] + 1) * 4]
            x = float(grid.x[(row["chip_col"] - tf[1]) * 4])
            found.setdefault(row["chip_id"], []).append((key, np.asarray(row["embedding"]), g, x, row["utm_minx"]))
    shared = {cid: v for cid, v in found.items() if len({k for k, *_ in v}) > 1}
    assert shared, "the k=36 and k=20 sub-tiles must share chips for this test to mean anything"
    for cid, versions in shared.items():
        (_, v0, g0, x0, m0), *rest = versions
        for _, v, g, x, m in rest:
            np.testing.assert_array_equal(v, v0, err_msg=cid)
            np.testing.assert_array_equal(g, g0, err_msg=cid)
            assert x == x0 and m == m0


def test_subtile_without_chips_records_an_empty_outcome(tmp_path):
    st = Storage(tmp_path)
    key = next(subtile("31UFU", 36, 21, c).key for c in range(36) if not owns_chips(subtile("31UFU", 36, 21, c), 512))
    logs = []
    materialize_composite(st, create_provider("sample"), "s2", key, "2024-07")
    man = materialize_embeddings(st, standin_adapter(512), key, "2024-07", CKPT, EmbeddingSettings(),
                                 log_fn=logs.append)
    assert man["status"] == "no_chips" and man["rows"] == 0 and man["grid_path"] is None
    assert any("owns no 512 px chip" in line for line in logs)
    assert pq.read_table(st.vectors_path("standin512", key, "2024-07")).num_rows == 0


def _shared_chip(chip: int) -> tuple[str, str, tuple[int, int]]:
    """A k=20 and a k=36 sub-tile key that both hold lattice chip (row, col) of size ``chip``."""
    from rs_embed_assets.grid import subtile_span

    lat = chip_lattice(subtile("31UFU", 20, 11, 7), chip)
    row, col = lat.row0, lat.col0
    r36 = next(i for i in range(36) if subtile_span(36, i)[0] <= row * chip < subtile_span(36, i)[1])
    c36 = next(i for i in range(36) if subtile_span(36, i)[0] <= col * chip < subtile_span(36, i)[1])
    return "31UFU-k20-r11-c07", f"31UFU-k36-r{r36:02d}-c{c36:02d}", (row, col)


@pytest.mark.parametrize("model_id", ["fomo", "terrafm_b", "terrafm_b_s1", "scalemae_rgb", "agrifm", "dynamicvis"])
def test_what_reaches_each_model_for_a_chip_does_not_depend_on_k(tmp_path, model_id):
    """Each model's own preprocessing, with the partition's tile statistics and default knobs, turns a chip
    into the same network input whichever sub-tiling embeds it (the stand-in network cannot show this)."""
    import torch

    from rs_embed_assets.embedding import _batches, plan_chips, tile_context_of, to_float32
    from rs_embed_assets.grid import parse_tile_key
    from rs_embed_assets.materialize import shift_month

    ad = preprocessing_only(model_id)
    spec = ad.spec
    months = [shift_month("2024-07", -i) for i in range(ad.frames - 1, -1, -1)]
    st, provider = Storage(tmp_path), create_provider("sample")
    *keys, want = _shared_chip(spec.chip_size)
    inputs = []
    for key in keys:
        for m in months:
            materialize_composite(st, provider, spec.sensor, key, m)
        readers = [st.open_composite(spec.sensor, key, m) for m in months]
        bidx = [[r.bands.index(b) for b in spec.bands] for r in readers]
        lat = chip_lattice(parse_tile_key(key), spec.chip_size)
        ctx = tile_context_of(ad, readers, lat, bidx)
        plan = plan_chips(readers, lat)
        plan.positions[:] = [p for p in plan.positions if p == want]
        assert plan.positions, f"chip {want} must be owned by {key}"
        (pos, raw), = list(_batches(plan, readers, bidx, 1, lambda raw: raw))
        inputs.append(ad.preprocess(to_float32(raw), bands=spec.bands, tile_context=ctx))
    assert torch.equal(inputs[0], inputs[1])
