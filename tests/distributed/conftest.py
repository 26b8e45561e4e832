"""Helpers for tests that run the real Dagster processes (dagster dev, daemons, Celery workers) on 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest
import requests

from servers import free_port, reset_signals

REPO = Path(__file__).resolve().parents[2]
READY = "{ workspaceOrError { __typename ... on Workspace { locationEntries { name locationOrLoadError { __typename "\
        "... on PythonError { message } } } } } }"
LAUNCH_RUN = """
mutation($p: ExecutionParams!) { launchRun(executionParams: $p) {
  __typename ... on LaunchRunSuccess { run { runId } } ... on PythonError { message stack }
  ... on InvalidSubsetError { message } ... on RunConfigValidationInvalid { errors { message } } } }"""


def small_fomo_env(tmp_path: Path, home: Path) -> dict[str, str]:
    """The code location with one small model on CPU, random demo weights, offline."""
    env = {**os.environ, "DAGSTER_HOME": str(home), "RS_EMBED_ASSETS_DATA_ROOT": str(tmp_path / "data"),
           "RS_EMBED_ASSETS_MODELS": "fomo", "RS_EMBED_FOMO_DEPTH": "2", "RS_EMBED_ALLOW_RANDOM_INIT": "1",
           "RS_EMBED_FOMO_AUTO_DOWNLOAD": "0", "RS_EMBED_ASSETS_AOI_FILE": str(tmp_path / "no_aoi.geojson"),
           "RS_EMBED_DEVICE": "cpu", "PYTHONUNBUFFERED": "1"}
    env.pop("RS_EMBED_FOMO_CKPT", None)
    return env


def new_home(tmp_path: Path, yaml_text: str | None = None) -> Path:
    home = tmp_path / "dagster_home"
    home.mkdir(exist_ok=True)
    if yaml_text is None:
        shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    else:
        (home / "dagster.yaml").write_text(yaml_text)
    return home


class DagsterDev:
    """`dagster dev` (webserver + daemon + code server) in its own process group, restartable."""

    def __init__(self, tmp_path: Path, env: dict[str, str]):
        self.tmp_path, self.env = tmp_path, env
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self, timeout: float = 150) -> str:
        self.starts += 1
        port = free_port()
        self.log_path = self.tmp_path / f"dagster_dev_{self.starts}.log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "dagster", "dev", "-w", str(REPO / "workspace.yaml"),
                                      "-h", "127.0.0.1", "-p", str(port)], cwd=REPO, env=self.env, stdout=self._log,
                                     stderr=subprocess.STDOUT, preexec_fn=reset_signals, start_new_session=True)
        self.url = f"http://127.0.0.1:{port}/graphql"
        deadline = time.time() + timeout
        while True:
            assert self.proc.poll() is None, self.log_path.read_text()[-3000:]
            try:
                r = requests.post(self.url, json={"query": READY}, timeout=5).json()
                entries = r["data"]["workspaceOrError"]["locationEntries"]
                kinds = [e["locationOrLoadError"]["__typename"] for e in entries if e["locationOrLoadError"]]
                if kinds and kinds[0] == "RepositoryLocation":
                    return self.url
                assert "PythonError" not in kinds, r
            except (requests.ConnectionError, requests.ReadTimeout, KeyError, TypeError):
                pass
            assert time.time() < deadline, f"dagster dev did not come up in {timeout} s"
            time.sleep(1)

    def kill9(self) -> None:
        """What a crash does: SIGKILL to every process of the tree (webserver, daemon, code server, run workers)."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
        self._log.close()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)
        if not self._log.closed:
            self._log.close()

    def gql(self, query: str, variables: dict) -> dict:
        r = requests.post(self.url, json={"query": query, "variables": variables}, timeout=60)
        r.raise_for_status()
        body = r.json()
        assert "errors" not in body, body["errors"]
        return body["data"]

    def launch_assets(self, asset_paths: list[list[str]], partition: str) -> str:
        """Launch one run of ``asset_paths`` for a tile×month ``partition`` ("YYYY-MM-01|tile"), as the UI does."""
        month, tile = partition.split("|")
        params = {"selector": {"repositoryLocationName": "rs_embed_assets", "repositoryName": "__repository__",
                               "jobName": "__ASSET_JOB", "assetSelection": [{"path": p} for p in asset_paths]},
                  "executionMetadata": {"tags": [{"key": "dagster/partition", "value": partition},
                                                 {"key": "dagster/partition/month", "value": month},
                                                 {"key": "dagster/partition/tile", "value": tile}]},
                  "mode": "default"}
        out = self.gql(LAUNCH_RUN, {"p": params})["launchRun"]
        assert out["__typename"] == "LaunchRunSuccess", out
        return out["run"]["runId"]


def wait_for(predicate, timeout: float, what: str, poll: float = 0.5):
    deadline = time.time() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.time() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(poll)


def run_status(home: Path, run_id: str) -> dg.DagsterRunStatus:
    with dg.DagsterInstance.from_config(str(home)) as instance:
        return instance.get_run_by_id(run_id).status


@pytest.fixture
def tile_keys():
    return ["31UFU-k9-r04-c04", "31UFU-k9-r04-c05"]
