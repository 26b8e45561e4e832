"""Crash hygiene: a run killed with `kill -9` while embeddings run never blocks the next embedding run.

Reproduces the reported defect: with the previous dagster.yaml (no run monitoring, launcher without a
health check) the killed run stayed STARTED for ever, kept its `gpu` pool slot, and the next embedding
run waited on the pool indefinitely, its log silent about why (now `pool_slots_sensor` says so in it).
"""

import time

import dagster as dg
import pytest

from rs_embed_assets.assets.checkpoints import build_checkpoint_asset
from rs_embed_assets.assets.composites import composite_assets
from rs_embed_assets.partitions import TILES
from rs_embed_assets.resources import CheckpointPolicyResource, ProviderResource, StorageResource

from .conftest import REPO, DagsterDev, new_home, run_status, small_fomo_env, wait_for

MONTH = "2024-06-01"
EMBED = ["embeddings", "fomo"]


def _prepare_upstream(home, data, tiles, env, monkeypatch):
    """Checkpoint and composites of both partitions, materialised in process (the test is about the GPU step)."""
    for name in ("RS_EMBED_FOMO_DEPTH", "RS_EMBED_FOMO_AUTO_DOWNLOAD"):
        monkeypatch.setenv(name, env[name])
    monkeypatch.delenv("RS_EMBED_FOMO_CKPT", raising=False)
    with dg.DagsterInstance.from_config(str(home)) as instance:
        instance.add_dynamic_partitions(TILES.name, tiles)
        for pool, limit in (("gpu", 1), ("imagery", 4), ("duckdb_writer", 1)):
            instance.event_log_storage.set_concurrency_slots(pool, limit)
        resources = {"storage": StorageResource(root=str(data)), "provider": ProviderResource(kind="sample"),
                     "checkpoint_policy": CheckpointPolicyResource(allow_random_init=True)}
        assets = [build_checkpoint_asset("fomo", "fomo"), *composite_assets]
        assert dg.materialize(assets[:1], instance=instance, resources=resources).success
        for tile in tiles:
            key = dg.MultiPartitionKey({"month": MONTH, "tile": tile})
            assert dg.materialize(assets, selection=[dg.AssetKey("s2_composite")], instance=instance,
                                  resources=resources, partition_key=key).success


def _step_started(home, run_id):
    with dg.DagsterInstance.from_config(str(home)) as instance:
        return bool(instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.STEP_START).records)


def _pool_messages(home, run_id) -> list[tuple[float, str]]:
    with dg.DagsterInstance.from_config(str(home)) as instance:
        records = instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.ENGINE_EVENT).records
    return [(r.event_log_entry.timestamp, r.event_log_entry.dagster_event.message) for r in records
            if r.event_log_entry.dagster_event.message.startswith("Pool slot held by a dead run")]


def _first_step_start(home, run_id) -> float:
    with dg.DagsterInstance.from_config(str(home)) as instance:
        return instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.STEP_START).records[0] \
            .event_log_entry.timestamp


def _gpu_slot_holders(home) -> set[str]:
    with dg.DagsterInstance.from_config(str(home)) as instance:
        info = instance.event_log_storage.get_concurrency_info("gpu")
        return {s.run_id for s in info.claimed_slots}


SHIPPED = (REPO / "dagster.yaml").read_text()
# The shipped config frees an ended run's slots 5 s after its end (within ~15 s); the waiting run's message is
# written by a sensor ticking every 5 s, which may miss so short a window. 30 s makes the test deterministic.
SLOW_FREE = SHIPPED.replace("free_slots_after_run_end_seconds: 5", "free_slots_after_run_end_seconds: 30")


@pytest.mark.slow
def test_kill_9_during_embeddings_then_next_embedding_run_completes(tmp_path, tile_keys, monkeypatch):
    assert SLOW_FREE != SHIPPED
    home = new_home(tmp_path, SLOW_FREE)
    env = small_fomo_env(tmp_path, home)
    _prepare_upstream(home, tmp_path / "data", tile_keys, env, monkeypatch)
    dev = DagsterDev(tmp_path, env)
    try:
        dev.start()
        killed = dev.launch_assets([EMBED], f"{MONTH}|{tile_keys[0]}")
        wait_for(lambda: _step_started(home, killed), 180, "the embedding step to start", poll=0.2)
        dev.kill9()
        # the state the defect left behind: a STARTED run holding the gpu slot, nobody alive to finish it
        assert run_status(home, killed) == dg.DagsterRunStatus.STARTED
        assert _gpu_slot_holders(home) == {killed}

        t0 = time.time()
        dev.start()
        after = dev.launch_assets([EMBED], f"{MONTH}|{tile_keys[1]}")
        wait_for(lambda: run_status(home, killed) == dg.DagsterRunStatus.FAILURE, 120,
                 "run monitoring to mark the killed run failed")
        detected_s = time.time() - t0
        wait_for(lambda: run_status(home, after) in (dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE),
                 300, "the next embedding run to finish")
        assert run_status(home, after) == dg.DagsterRunStatus.SUCCESS, dev.log_path.read_text()[-4000:]
        assert killed not in _gpu_slot_holders(home)
        # the waiting run's own log said who held the slot and why it waited, before its step started
        told = _pool_messages(home, after)
        assert len(told) == 1, told
        at, message = told[0]
        assert f"for a `gpu` slot held by run {killed} (step embeddings__fomo)" in message, message
        assert "run worker process" in message or "ended FAILURE" in message, message
        assert at < _first_step_start(home, after)
        with dg.DagsterInstance.from_config(str(home)) as instance:
            failure = [r.event_log_entry.dagster_event.message for r in instance.get_records_for_run(
                killed, of_type=dg.DagsterEventType.RUN_FAILURE).records]
        assert failure, "the killed run ends FAILED"
        assert "is gone" in failure[0], failure  # the reason is in the killed run's own log
        print(f"killed run detected and failed {detected_s:.0f} s after restart")
    finally:
        dev.stop()
