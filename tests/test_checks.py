"""Checks catch wrong data, not only NaN: each check fails on a planted fault and passes on good data."""

import numpy as np
import pytest

from rs_embed_assets.checks import (chip_valid_fractions, composite_block_stats, composite_problems,
                                    count_problems, valid_fraction_problems, vector_problems)

rng = np.random.default_rng(0)


def test_good_vectors_pass():
    assert vector_problems(rng.normal(size=(16, 8)).astype(np.float32), 8) == []


@pytest.mark.parametrize("plant, fragment", [
    (lambda v: v.__setitem__(slice(None), 0.0), "16 of 16 vectors are all zeros"),
    (lambda v: v.__setitem__(3, 0.0), "1 of 16 vectors are all zeros"),
    (lambda v: v.__setitem__(5, 0.25), "1 of 16 vectors are constant"),
    (lambda v: v.__setitem__((2, 1), np.nan), "1 of 16 vectors hold NaN/inf"),
])
def test_planted_vector_faults_are_named(plant, fragment):
    v = rng.normal(size=(16, 8)).astype(np.float32)
    plant(v)
    problems = vector_problems(v, 8, label="31UFU/2024-06")
    assert any(fragment in p for p in problems), problems
    assert all(p.startswith("31UFU/2024-06: ") for p in problems)


def test_wrong_dimension():
    assert "expected (N, 8)" in vector_problems(np.ones((2, 4)), 8)[0]


def test_counts_agree_or_say_which_disagree():
    m = {"rows": 16, "chips_embedded": 16, "chips_skipped": 0, "chips_total": 16}
    assert count_problems(rows_in_file=16, manifest=m, chips_expected=16) == []
    assert "manifest says 16" in count_problems(rows_in_file=0, manifest=m)[0]
    assert "lattice has 25" in count_problems(rows_in_file=16, manifest=m, chips_expected=25)[0]
    bad = dict(m, chips_skipped=3)
    assert "!= 16 chips" in count_problems(rows_in_file=16, manifest=bad)[0]


def test_valid_fraction_against_the_composite():
    valid = np.ones((1, 8, 8), bool)
    valid[0, :4, :4] = False  # the upper-left 4×4 chip has no observation
    # 4 px chips of 10 m on a grid anchored at (1000, 2000)
    minx = [1000.0, 1040.0, 1000.0, 1040.0]
    maxy = [2000.0, 2000.0, 1960.0, 1960.0]
    exp = chip_valid_fractions(valid, x0=1000.0, y0=2000.0, pixel_m=10.0, minx=minx, maxy=maxy, size_px=[4] * 4)
    np.testing.assert_allclose(exp, [0.0, 1.0, 1.0, 1.0])
    assert valid_fraction_problems([0.0, 1.0, 1.0, 1.0], exp) == []
    # the fault: a lost valid_count/data chunk and chips "valid" that were embedded from nothing
    problems = valid_fraction_problems([1.0, 1.0, 1.0, 1.0], exp, chip_ids=["a", "b", "c", "d"])
    assert "1 of 4 chips" in problems[0] and "a: recorded 1.0000, composite says 0.0000" in problems[0]
    # a chip reaching outside the composite is not checkable, not a failure
    out = chip_valid_fractions(valid, x0=1000.0, y0=2000.0, pixel_m=10.0, minx=[1060.0], maxy=[2000.0], size_px=[4])
    assert np.isnan(out[0]) and valid_fraction_problems([0.3], out) == []


def _s2(h=20, w=20):
    data = rng.integers(100, 5000, size=(12, h, w)).astype(np.uint16)
    vc = np.full((h, w), 3, np.uint16)
    vc[0, :5] = 0
    data[:, 0, :5] = 0
    return data, vc


def test_plausible_s2_composite_passes():
    data, vc = _s2()
    stats = composite_block_stats(data, vc, sensor="s2")
    assert composite_problems(stats, sensor="s2", recorded_valid_fraction=(vc > 0).mean()) == []


def test_lost_data_chunk_reads_as_zero_pixels_that_claim_observations():
    data, vc = _s2()
    data[:, 10:, :] = 0  # what zarr returns for a deleted chunk: the fill value
    problems = composite_problems(composite_block_stats(data, vc, sensor="s2"), sensor="s2")
    assert any("have all bands 0" in p for p in problems), problems


def test_s2_out_of_range_nodata_and_valid_fraction_mismatch():
    data, vc = _s2()
    data[:, 5:10] = 40000  # reflectance scaled twice
    data[:, 0, 0] = 7  # a pixel without observations holding data
    problems = composite_problems(composite_block_stats(data, vc, sensor="s2"), sensor="s2",
                                  recorded_valid_fraction=1.0)
    text = " | ".join(problems)
    assert "exceed 20000 DN" in text and "without observations hold data" in text and "valid_fraction attribute" in text


def test_s1_in_db_is_out_of_range_and_nan_chunk_is_empty():
    vc = np.ones((10, 10), np.uint16)
    good = rng.uniform(0.001, 0.5, size=(2, 10, 10)).astype(np.float32)
    assert composite_problems(composite_block_stats(good, vc, sensor="s1"), sensor="s1") == []
    db = 10 * np.log10(good)  # negative dB values instead of linear power
    assert "outside linear power" in composite_problems(composite_block_stats(db, vc, sensor="s1"), sensor="s1")[0]
    lost = good.copy()
    lost[:, :5] = np.nan
    assert "NaN in every band" in composite_problems(composite_block_stats(lost, vc, sensor="s1"), sensor="s1")[0]


def test_composite_asset_checks_each_partition_it_wrote(tmp_path):
    import dagster as dg

    from rs_embed_assets.assets.composites import composite_assets
    from rs_embed_assets.partitions import TILES, make_key
    from rs_embed_assets.resources import ProviderResource, StorageResource

    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(TILES.name, ["31UFU-k36-r21-c12"])
    res = dg.materialize(composite_assets, selection=[dg.AssetKey("s2_composite"), dg.AssetKey("s1_composite")],
                         instance=instance, partition_key=str(make_key("31UFU-k36-r21-c12", "2024-06")),
                         resources={"storage": StorageResource(root=str(tmp_path)),
                                    "provider": ProviderResource(kind="sample")})
    evals = res.get_asset_check_evaluations()
    assert sorted(e.asset_key.to_user_string() for e in evals) == ["s1_composite", "s2_composite"]
    assert all(e.passed and e.check_name == "values_plausible" for e in evals), [e.metadata for e in evals]
