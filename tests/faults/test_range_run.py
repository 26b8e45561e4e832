"""A range run that fails on its second partition: disk and Dagster agree afterwards.

The issue's reproduction: the first partition was committed on disk but recorded as not
materialised. The failure here is a full disk (ENOSPC) at the second partition's write, injected
through the fault hook; nothing of ours is faked.
"""

import dagster as dg
import pytest

from rs_embed_assets import faults
from rs_embed_assets.assets.composites import composite_assets
from rs_embed_assets.doctor import diagnose
from rs_embed_assets.partitions import TILES, make_key
from rs_embed_assets.resources import ProviderResource, StorageResource
from rs_embed_assets.storage import Storage

TILES_ = ["31UFU-k36-r21-c12", "31UFU-k36-r21-c13"]
MONTH = "2024-06"
S2 = dg.AssetKey("s2_composite")


@pytest.fixture
def disk_full_on_second_write(monkeypatch):
    faults.reset()
    monkeypatch.setenv(faults.ENV, "composite")
    monkeypatch.setenv(faults.MODE_ENV, "enospc")
    monkeypatch.setenv(faults.SKIP_ENV, "1")
    yield
    faults.reset()


def test_range_run_failing_on_its_second_partition_records_the_first(tmp_path, disk_full_on_second_write):
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(TILES.name, TILES_)
    storage = Storage(tmp_path / "data")
    res = {"storage": StorageResource(root=str(storage.root)), "provider": ProviderResource(kind="sample")}
    result = dg.materialize(composite_assets, selection=[S2], instance=instance, resources=res, raise_on_error=False,
                            tags={"dagster/asset_partition_range_start": str(make_key(TILES_[0], MONTH)),
                                  "dagster/asset_partition_range_end": str(make_key(TILES_[1], MONTH))})
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure).event_specific_data.error
    assert "No space left on device" in str(failure.cause.message if failure.cause else failure.message)

    on_disk = {t for t in TILES_ if storage.composite_record("s2", t, MONTH) is not None}
    recorded = {str(k) for k in instance.get_materialized_partitions(S2)}
    assert on_disk == {TILES_[0]}, "the first partition was committed, the second was not"
    assert recorded == {str(make_key(TILES_[0], MONTH))}, "Dagster records exactly what is on disk"
    event = instance.get_latest_materialization_event(S2).asset_materialization
    assert event.metadata["recorded"].value == "committed before the run failed"
    assert diagnose(storage.root) == [], "the failed write left nothing behind"
