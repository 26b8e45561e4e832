"""Monthly automation: after the cron tick, every tile's newly completed month is requested together."""

import datetime as dt

import dagster as dg

from rs_embed_assets.automation import monthly_automation
from rs_embed_assets.definitions import defs

TILES = ["31UFU-k36-r21-c12", "31UFU-k36-r21-c13"]


def test_new_month_requests_composites_for_all_tiles_after_the_cron_tick():
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("tiles", TILES)
        before = dt.datetime(2024, 9, 3, 3, 0, tzinfo=dt.timezone.utc)  # cron is 04:00 on the 3rd
        first = dg.evaluate_automation_conditions(defs=defs, instance=instance, evaluation_time=before)
        assert first.total_requested == 0
        after = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=first.cursor,
                                                  evaluation_time=before + dt.timedelta(hours=2))
        expected = {f"2024-08-01|{t}" for t in TILES}  # the month that just completed, every tile
        assert after.get_requested_partitions(dg.AssetKey("s2_composite")) == expected
        assert after.get_requested_partitions(dg.AssetKey("s1_composite")) == expected
        # embeddings wait for their composites (eager: nothing is requested while inputs are missing)
        assert after.total_requested == 4


def test_automation_emits_one_backfill_not_one_run_per_tile():
    assert monthly_automation.emit_backfills
