"""Automation launches only what can succeed, and says why it holds back (reported: DynamicVis was
launched on 305 px sub-tiles and failed; models without a built checkpoint were skipped silently;
`not-a-tile` typed in the UI failed only at run time)."""

import datetime as dt

import dagster as dg
import pytest

from rs_embed_assets.automation import (catalog_automation, monthly_automation, tile_keys_sensor, tile_owns_chips,
                                        aoi_tiles_sensor)
from rs_embed_assets.definitions import defs
from rs_embed_assets.partitions import make_key

SUBTILES = ["31UFU-k36-r21-c12", "31UFU-k36-r21-c13"]
BAD = "not-a-tile"
BEFORE_CRON = dt.datetime(2024, 9, 3, 3, 0, tzinfo=dt.timezone.utc)  # composites' cron: 04:00 on the 3rd


# sub-tile r21 of a 36 × 36 split spans rows 6405..6709; c12 spans columns 3660..3964, c13 3965..4269
@pytest.mark.parametrize("tile, model, owns", [
    ("31UFU", "dynamicvis", True),               # a whole tile holds 21 × 21 chips of 512 px
    ("31UFU-k36-r21-c12", "dynamicvis", False),  # no multiple of 512 among columns 3660..3964
    ("31UFU-k36-r21-c13", "dynamicvis", True),   # column 4096 = 8 × 512 and row 6656 = 13 × 512
    ("31UFU-k36-r21-c12", "fomo", True),         # 64 px chips: several
    ("31UFU-k36-r00-c35", "dynamicvis", False),  # holds origin 10752 = 21 × 512, but that chip is not whole
])
def test_a_tile_owns_the_chips_whose_upper_left_pixel_it_holds(tile, model, owns):
    assert tile_owns_chips(tile, model) is owns


def _labels(condition) -> set[str]:
    out = {condition.get_label()} - {None}
    for child in condition.children:
        out |= _labels(child)
    return out


def test_conditions_carry_the_reasons_the_ui_shows():
    graph = defs.resolve_asset_graph()
    dyn = graph.get(dg.AssetKey(["embeddings", "dynamicvis"])).automation_condition
    assert {"checkpoint/dynamicvis is materialised", "tile holds a 512 px chip of dynamicvis"} <= _labels(dyn)
    s2 = graph.get(dg.AssetKey("s2_composite")).automation_condition
    assert "tile key is a valid tile" in _labels(s2)


def test_new_month_skips_bad_tiles_missing_checkpoints_and_tiles_without_chips():
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("tiles", [*SUBTILES, BAD])
        first = dg.evaluate_automation_conditions(defs=defs, instance=instance, evaluation_time=BEFORE_CRON)
        after = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=first.cursor,
                                                  evaluation_time=BEFORE_CRON + dt.timedelta(hours=2))
        expected = {str(make_key(t, "2024-08")) for t in SUBTILES}
        assert after.get_requested_partitions(dg.AssetKey("s2_composite")) == expected, "no run for not-a-tile"

        # the composites land; of the checkpoints only fomo's and dynamicvis's are built
        for pk in expected:
            for key in ("s2_composite", "s1_composite"):
                instance.report_runless_asset_event(dg.AssetMaterialization(key, partition=pk))
        for cid in ("fomo", "dynamicvis"):
            instance.report_runless_asset_event(dg.AssetMaterialization(["checkpoint", cid]))
        third = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=after.cursor,
                                                  evaluation_time=BEFORE_CRON + dt.timedelta(hours=3))
        requested = {m: third.get_requested_partitions(dg.AssetKey(["embeddings", m]))
                     for m in ("fomo", "dynamicvis", "scalemae_rgb", "terrafm_b")}
        assert requested["fomo"] == expected
        assert requested["dynamicvis"] == {str(make_key(SUBTILES[1], "2024-08"))}, "only c13 holds a 512 px chip"
        assert not requested["scalemae_rgb"] and not requested["terrafm_b"], "their checkpoints are not built"

        # once a held-back model's checkpoint is built, its embeddings follow on the next evaluation
        instance.report_runless_asset_event(dg.AssetMaterialization(["checkpoint", "scalemae_rgb"]))
        fourth = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=third.cursor,
                                                   evaluation_time=BEFORE_CRON + dt.timedelta(hours=4))
        assert fourth.get_requested_partitions(dg.AssetKey(["embeddings", "scalemae_rgb"])) == expected
        assert not fourth.get_requested_partitions(dg.AssetKey(["embeddings", "fomo"])), "requested once only"


def test_tile_keys_sensor_flags_bad_keys_with_the_fix():
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("tiles", [SUBTILES[0], BAD])
        result = tile_keys_sensor(dg.build_sensor_context(instance=instance))
        assert isinstance(result, dg.SkipReason)
        assert BAD in result.skip_message and "unknown tile key" in result.skip_message
        assert f"rs-embed-assets tiles remove {BAD}" in result.skip_message
        instance.delete_dynamic_partition("tiles", BAD)
        ok = tile_keys_sensor(dg.build_sensor_context(instance=instance))
        assert "all 1 tile keys are valid" in ok.skip_message


def test_sensor_default_states_are_deliberate():
    assert monthly_automation.default_status == dg.DefaultSensorStatus.STOPPED  # spends quota and GPU time
    assert catalog_automation.default_status == dg.DefaultSensorStatus.RUNNING  # cheap, keeps SQL current
    assert tile_keys_sensor.default_status == dg.DefaultSensorStatus.RUNNING  # read-only
    assert aoi_tiles_sensor.default_status == dg.DefaultSensorStatus.STOPPED  # needs an AOI file
