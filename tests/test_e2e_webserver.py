"""End to end: `dagster dev` (webserver + daemon) on 127.0.0.1, a partition backfill launched through
GraphQL exactly as the UI launches it, then the files and the DuckDB rows it produced."""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from servers import free_port, gql, reset_signals, stop_group

REPO = Path(__file__).resolve().parents[1]
TILE_KEYS = ["31UFU-k36-r21-c12", "31UFU-k36-r21-c13"]
PARTITIONS = [f"2024-06-01|{t}" for t in TILE_KEYS] + [f"2024-07-01|{t}" for t in TILE_KEYS]

LAUNCH = """
mutation($p: LaunchBackfillParams!) { launchPartitionBackfill(backfillParams: $p) {
  __typename ... on LaunchBackfillSuccess { backfillId }
  ... on PythonError { message stack } ... on InvalidSubsetError { message } } }"""
STATUS = """
query($id: String!) { partitionBackfillOrError(backfillId: $id) {
  __typename ... on PartitionBackfill { status runs(limit: 100) { runId status } } } }"""
READY = "{ workspaceOrError { __typename ... on Workspace { locationEntries { name locationOrLoadError { __typename "\
        "... on PythonError { message } } } } } }"


@pytest.fixture
def dagster_dev(tmp_path):
    import dagster as dg

    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    with dg.DagsterInstance.from_config(str(home)) as instance:
        instance.add_dynamic_partitions("tiles", TILE_KEYS)
    port = free_port()
    env = {**os.environ, "DAGSTER_HOME": str(home), "RS_EMBED_ASSETS_DATA_ROOT": str(tmp_path / "data"),
           "RS_EMBED_ASSETS_MODELS": "fomo", "RS_EMBED_FOMO_DEPTH": "2", "RS_EMBED_ALLOW_RANDOM_INIT": "1",
           "RS_EMBED_FOMO_AUTO_DOWNLOAD": "0", "RS_EMBED_ASSETS_AOI_FILE": str(tmp_path / "no_aoi.geojson"),
           "RS_EMBED_DEVICE": "cpu"}
    env.pop("RS_EMBED_FOMO_CKPT", None)
    log = open(tmp_path / "dagster_dev.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "dagster", "dev", "-w", str(REPO / "workspace.yaml"),
                             "-h", "127.0.0.1", "-p", str(port)], cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT, preexec_fn=reset_signals, start_new_session=True)
    url = f"http://127.0.0.1:{port}/graphql"
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, (tmp_path / "dagster_dev.log").read_text()[-3000:]
            try:
                r = requests.post(url, json={"query": READY}, timeout=5).json()
                entries = r["data"]["workspaceOrError"]["locationEntries"]
                kinds = [e["locationOrLoadError"]["__typename"] for e in entries if e["locationOrLoadError"]]
                if kinds and kinds[0] == "RepositoryLocation":
                    break
                assert "PythonError" not in kinds, r
            except (requests.ConnectionError, KeyError, TypeError):
                pass
            assert time.time() < deadline, "dagster dev did not come up in 120 s"
            time.sleep(1)
        yield url, tmp_path
    finally:
        stop_group(proc, log, 30)


GRAPH = "{ assetNodes { assetKey { path } groupName kinds description isPartitioned } }"


@pytest.mark.slow
def test_ui_backfill_materialises_partitions_and_catalog(dagster_dev):
    url, tmp = dagster_dev
    # what the UI's asset graph shows: groups, kinds and descriptions for every asset
    nodes = {"/".join(n["assetKey"]["path"]): n for n in gql(url, GRAPH, {})["assetNodes"]}
    assert set(nodes) == {"checkpoint_file/fomo", "checkpoint/fomo", "s2_composite", "s1_composite", "embeddings/fomo",
                          "catalog"}  # checkpoint_file: the weights file, observed by sha256
    assert nodes["embeddings/fomo"]["groupName"] == "embeddings" and nodes["embeddings/fomo"]["isPartitioned"]
    assert {"pytorch", "parquet", "zarr"} <= set(nodes["embeddings/fomo"]["kinds"])
    assert nodes["s2_composite"]["groupName"] == "composites" and "zarr" in nodes["s2_composite"]["kinds"]
    assert nodes["catalog"]["kinds"] == ["duckdb"]
    assert all(n["description"] for n in nodes.values())

    params = {"partitionNames": PARTITIONS, "fromFailure": False,
              "assetSelection": [{"path": ["checkpoint", "fomo"]}, {"path": ["s2_composite"]},
                                 {"path": ["s1_composite"]}, {"path": ["embeddings", "fomo"]}, {"path": ["catalog"]}]}
    launched = gql(url, LAUNCH, {"p": params})["launchPartitionBackfill"]
    assert launched["__typename"] == "LaunchBackfillSuccess", launched
    backfill_id = launched["backfillId"]

    deadline = time.time() + 540
    while True:
        bf = gql(url, STATUS, {"id": backfill_id})["partitionBackfillOrError"]
        if bf["status"] in {"COMPLETED", "COMPLETED_SUCCESS", "COMPLETED_FAILED", "FAILED", "CANCELED"}:
            break
        assert time.time() < deadline, f"backfill still {bf['status']} after 9 min: {bf['runs']}"
        time.sleep(3)
    assert bf["status"] in {"COMPLETED", "COMPLETED_SUCCESS"}, (bf, (tmp / "dagster_dev.log").read_text()[-4000:])
    assert all(r["status"] == "SUCCESS" for r in bf["runs"]), bf["runs"]

    from rs_embed_assets.storage import Storage

    data = tmp / "data"
    storage, rows = Storage(data), 0
    for p in PARTITIONS:
        month, tile = p[:7], p.split("|")[1]
        for sensor in ("s2", "s1"):  # committed composites whose stores exist
            record = storage.composite_record(sensor, tile, month)
            assert record is not None and storage.resolve(record["store"]).is_dir(), (sensor, p)
        manifest = storage.read_manifest("fomo", tile, month)  # the vectors file is the commit point
        assert manifest is not None and storage.open_grid("fomo", tile, month) is not None, p
        rows += manifest["rows"]
    from rs_embed_assets.catalog import connect_readonly

    with connect_readonly(data / "catalog.duckdb") as con:
        assert con.execute("SELECT count(*), count(DISTINCT tile), count(DISTINCT month) FROM vectors_fomo"
                           ).fetchone() == (rows, 2, 2)
        assert con.execute("SELECT count(*) FROM manifest WHERE checkpoint_random_init").fetchone()[0] == 4
