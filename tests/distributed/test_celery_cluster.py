"""The distributed profile end to end: `rs-embed-assets cluster` (Postgres storage, Redis broker, the
dagster-celery executor, a `gpu` and an `imagery` worker) runs a UI backfill and survives a dead GPU worker."""

import hashlib
import os
import shutil
import signal
import socket
import tempfile
import time
from pathlib import Path

import dagster as dg
import numpy as np
import pyarrow.parquet as pq
import pytest
import requests

from rs_embed_assets.assets.checkpoints import build_checkpoint_asset
from rs_embed_assets.assets.composites import composite_assets
from rs_embed_assets.assets.embeddings import build_embedding_asset
from rs_embed_assets.cluster import Cluster
from rs_embed_assets.partitions import TILES
from rs_embed_assets.resources import CheckpointPolicyResource, ModelResource, ProviderResource, StorageResource

from servers import gql

from .conftest import free_port, wait_for

TILE_KEYS = ["31UFU-k36-r21-c12", "31UFU-k36-r21-c13"]
MONTHS = ["2024-06-01", "2024-07-01"]
PARTITIONS = [f"{m}|{t}" for m in MONTHS for t in TILE_KEYS]
ASSETS = [["checkpoint", "fomo"], ["s2_composite"], ["s1_composite"], ["embeddings", "fomo"]]
HOST = socket.gethostname()

LAUNCH_BACKFILL = """
mutation($p: LaunchBackfillParams!) { launchPartitionBackfill(backfillParams: $p) {
  __typename ... on LaunchBackfillSuccess { backfillId } ... on PythonError { message } } }"""
BACKFILL_STATUS = """
query($id: String!) { partitionBackfillOrError(backfillId: $id) {
  __typename ... on PartitionBackfill { status runs(limit: 100) { runId status } } } }"""
LAUNCH_RUN = """
mutation($p: ExecutionParams!) { launchRun(executionParams: $p) {
  __typename ... on LaunchRunSuccess { run { runId } } ... on PythonError { message } } }"""
REEXECUTE = """
mutation($p: ReexecutionParams!) { launchRunReexecution(reexecutionParams: $p) {
  __typename ... on LaunchRunSuccess { run { runId } } ... on PythonError { message } } }"""


@pytest.fixture(scope="module")
def cluster():
    if not (shutil.which("redis-server") and (shutil.which("initdb") or list(Path("/usr/lib/postgresql").glob("*/bin/initdb")))):
        pytest.fail("PostgreSQL and redis-server are needed (Debian: apt-get install -y postgresql redis-server; "
                    ".ci/run installs them)")
    root = Path(tempfile.mkdtemp(prefix="rs_cluster_"))
    os.chmod(root, 0o755)  # PostgreSQL runs as its own user when the tests run as root
    saved = dict(os.environ)
    os.environ.update({
        "RS_EMBED_ASSETS_CLUSTER_DIR": str(root), "RS_EMBED_ASSETS_PG_PORT": str(free_port()),
        "RS_EMBED_ASSETS_REDIS_PORT": str(free_port()), "RS_EMBED_ASSETS_WEBSERVER_PORT": str(free_port()),
        "RS_EMBED_ASSETS_DATA_ROOT": str(root / "data"), "RS_EMBED_ASSETS_MODELS": "fomo", "RS_EMBED_FOMO_DEPTH": "2",
        "RS_EMBED_ALLOW_RANDOM_INIT": "1", "RS_EMBED_FOMO_AUTO_DOWNLOAD": "0", "RS_EMBED_DEVICE": "cpu",
        "RS_EMBED_ASSETS_AOI_FILE": str(root / "no_aoi.geojson")})
    os.environ.pop("RS_EMBED_FOMO_CKPT", None)
    c = Cluster.from_env()
    try:
        c.up()
        url = f"http://127.0.0.1:{c.webserver_port}/graphql"
        wait_for(lambda: _location_loaded(url), 180, "the webserver to load the code location", poll=1)
        with dg.DagsterInstance.from_config(str(c.home)) as instance:
            instance.add_dynamic_partitions(TILES.name, TILE_KEYS)
        yield c, url
    finally:
        c.down()
        os.environ.clear()
        os.environ.update(saved)
        shutil.rmtree(root, ignore_errors=True)


def _location_loaded(url) -> bool:
    try:
        r = requests.post(url, json={"query": "{ workspaceOrError { ... on Workspace { locationEntries { "
                                              "locationOrLoadError { __typename } } } } }"}, timeout=5).json()
        entries = r["data"]["workspaceOrError"]["locationEntries"]
        return bool(entries) and entries[0]["locationOrLoadError"]["__typename"] == "RepositoryLocation"
    except (requests.RequestException, KeyError, TypeError, ValueError):
        return False


def _routing_from_event_log(instance, run_id) -> dict[str, tuple[str, str]]:
    """step key -> (Celery queue it was submitted to, worker that executed it), from the run's engine events."""
    queues, workers = {}, {}
    for rec in instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.ENGINE_EVENT, limit=10000).records:
        ev = rec.event_log_entry.dagster_event
        msg = ev.message or ""
        if msg.startswith("Submitting celery task for step"):
            queues[ev.step_key] = msg.split('to queue "')[1].rstrip('".')
        elif msg.endswith("in celery worker"):
            workers[ev.step_key] = ev.engine_event_data.metadata["Celery worker"].value
    return {k: (queues.get(k), workers.get(k)) for k in set(queues) | set(workers)}


def _vector_hashes(data_root: Path) -> dict[str, str]:
    """Per vectors file: sha256 of the embedding values ordered by chip id (file metadata such as run ids and
    timestamps is not part of the comparison)."""
    out = {}
    for path in sorted((data_root / "embeddings" / "fomo" / "vectors").rglob("*.parquet")):
        table = pq.read_table(path).sort_by("chip_id")
        vec = np.asarray(table.column("embedding").combine_chunks().flatten(), dtype=np.float32)
        ids = "\n".join(table.column("chip_id").to_pylist()).encode()
        out[str(path.relative_to(data_root))] = hashlib.sha256(ids + vec.tobytes()).hexdigest()
    return out


def _in_process_vectors(tmp: Path) -> dict[str, str]:
    """The same partitions materialised in one process (in-process executor, ephemeral instance)."""
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(TILES.name, TILE_KEYS)
    data = tmp / "inproc"
    resources = {"storage": StorageResource(root=str(data)), "provider": ProviderResource(kind="sample"),
                 "checkpoint_policy": CheckpointPolicyResource(allow_random_init=True),
                 "model_fomo": ModelResource(model_id="fomo", device="cpu")}
    assets = [build_checkpoint_asset("fomo", "fomo"), *composite_assets, build_embedding_asset("fomo")]
    assert dg.materialize(assets, selection=[dg.AssetKey(["checkpoint", "fomo"])], instance=instance,
                          resources=resources).success
    tags = {"dagster/asset_partition_range_start": PARTITIONS[0], "dagster/asset_partition_range_end": PARTITIONS[-1]}
    assert dg.materialize(assets, selection=[dg.AssetKey("s2_composite"), dg.AssetKey("s1_composite"),
                                             dg.AssetKey(["embeddings", "fomo"])],
                          instance=instance, resources=resources, tags=tags).success
    return _vector_hashes(data)


@pytest.mark.slow
def test_backfill_runs_each_step_on_its_queue_and_worker_with_identical_vectors(cluster, tmp_path):
    c, url = cluster
    params = {"partitionNames": PARTITIONS, "fromFailure": False, "assetSelection": [{"path": p} for p in ASSETS]}
    launched = gql(url, LAUNCH_BACKFILL, {"p": params})["launchPartitionBackfill"]
    assert launched["__typename"] == "LaunchBackfillSuccess", launched

    def finished():
        bf = gql(url, BACKFILL_STATUS, {"id": launched["backfillId"]})["partitionBackfillOrError"]
        return bf if bf["status"] in {"COMPLETED", "COMPLETED_SUCCESS", "COMPLETED_FAILED", "FAILED", "CANCELED"} \
            else None

    bf = wait_for(finished, 600, "the backfill to finish", poll=3)
    assert bf["status"] in {"COMPLETED", "COMPLETED_SUCCESS"}, bf
    assert bf["runs"] and all(r["status"] == "SUCCESS" for r in bf["runs"]), bf["runs"]

    expected = {"embeddings__fomo": ("gpu", f"gpu@{HOST}"), "s2_composite": ("imagery", f"imagery@{HOST}"),
                "s1_composite": ("imagery", f"imagery@{HOST}"), "checkpoint__fomo": ("dagster", f"imagery@{HOST}")}
    seen = {}
    with dg.DagsterInstance.from_config(str(c.home)) as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        for run in bf["runs"]:
            for step, route in _routing_from_event_log(instance, run["runId"]).items():
                # other steps (asset checks of their own) carry no queue tag: default queue, CPU worker
                assert route == expected.get(step, ("dagster", f"imagery@{HOST}")), (step, route)
                seen[step] = route
    assert set(expected) <= set(seen), seen

    distributed = _vector_hashes(c.root / "data")
    assert len(distributed) == len(PARTITIONS)
    assert distributed == _in_process_vectors(tmp_path)


def _launch_embedding(url, partition) -> str:
    month, tile = partition.split("|")
    params = {"selector": {"repositoryLocationName": "rs_embed_assets", "repositoryName": "__repository__",
                           "jobName": "__ASSET_JOB", "assetSelection": [{"path": ["embeddings", "fomo"]}]},
              "executionMetadata": {"tags": [{"key": "dagster/partition", "value": partition},
                                             {"key": "dagster/partition/month", "value": month},
                                             {"key": "dagster/partition/tile", "value": tile}]}}
    out = gql(url, LAUNCH_RUN, {"p": params})["launchRun"]
    assert out["__typename"] == "LaunchRunSuccess", out
    return out["run"]["runId"]


@pytest.mark.slow
def test_killing_the_gpu_worker_mid_step_fails_the_run_frees_slots_and_reexecution_completes(cluster):
    c, url = cluster
    home = str(c.home)
    partition = PARTITIONS[0]  # composites and checkpoint exist from the backfill test; else materialise them
    with dg.DagsterInstance.from_config(home) as instance:
        if not instance.get_materialized_partitions(dg.AssetKey("s2_composite")):
            pytest.skip("needs the backfill test's upstream partitions")
    run_id = _launch_embedding(url, partition)

    def on_gpu_worker():
        with dg.DagsterInstance.from_config(home) as instance:
            return _routing_from_event_log(instance, run_id).get("embeddings__fomo", (None, None))[1]

    assert wait_for(on_gpu_worker, 240, "the embedding step to reach the gpu worker", poll=0.3) == f"gpu@{HOST}"
    gpu_pid = int((c.root / "pids" / "worker-gpu.pid").read_text())
    os.killpg(gpu_pid, signal.SIGKILL)  # the worker and its pool process, mid-step

    def status():
        with dg.DagsterInstance.from_config(home) as instance:
            return instance.get_run_by_id(run_id).status

    try:
        wait_for(lambda: status() in (dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED), 240,
                 "the run to end after its GPU worker died")
    except AssertionError as exc:  # say why: what run monitoring and the run itself logged
        with dg.DagsterInstance.from_config(home) as instance:
            events = [f"{r.event_log_entry.dagster_event_type}: {r.event_log_entry.message[:160]}"
                      for r in instance.get_records_for_run(run_id, limit=10000).records[-15:]]
        daemon = (c.root / "logs" / "daemon.log")
        tail = daemon.read_text(errors="replace")[-4000:] if daemon.exists() else "(no daemon log)"
        raise AssertionError(f"{exc}\n--- last run events ---\n" + "\n".join(events)
                             + f"\n--- daemon log tail ---\n{tail}") from None
    assert status() == dg.DagsterRunStatus.FAILURE

    def gpu_slots_of_run():
        with dg.DagsterInstance.from_config(home) as instance:
            return [s for s in instance.event_log_storage.get_concurrency_info("gpu").claimed_slots
                    if s.run_id == run_id]

    wait_for(lambda: not gpu_slots_of_run(), 60, "the dead run's gpu slot to be freed")

    c.up()  # a fresh gpu worker joins; nothing of the failed run may run on it
    time.sleep(10)
    with dg.DagsterInstance.from_config(home) as instance:
        ends = instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.RUN_FAILURE).records
        after = [r for r in instance.get_records_for_run(run_id, limit=10000).records
                 if r.storage_id > ends[-1].storage_id and r.event_log_entry.dagster_event
                 and r.event_log_entry.dagster_event.event_type in (dg.DagsterEventType.STEP_START,
                                                                    dg.DagsterEventType.ASSET_MATERIALIZATION)]
    assert not after, "a revoked step of the failed run ran later"

    out = gql(url, REEXECUTE, {"p": {"parentRunId": run_id, "strategy": "FROM_FAILURE"}})["launchRunReexecution"]
    assert out["__typename"] == "LaunchRunSuccess", out
    retry = out["run"]["runId"]
    with dg.DagsterInstance.from_config(home) as instance:
        wait_for(lambda: instance.get_run_by_id(retry).status in (dg.DagsterRunStatus.SUCCESS,
                                                                 dg.DagsterRunStatus.FAILURE), 300,
                 "the re-execution to finish")
        assert instance.get_run_by_id(retry).status == dg.DagsterRunStatus.SUCCESS
