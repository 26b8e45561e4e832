"""A run launcher whose run workers can be health-checked, so run monitoring catches dead runs.

Dagster's ``DefaultRunLauncher`` starts each run worker as a subprocess of the code server but
cannot tell the run-monitoring daemon whether that process is still alive. When the whole
process tree dies (``kill -9``, OOM killer, a reboot) nobody marks the run failed: it stays
STARTED for ever and keeps its ``gpu`` / ``duckdb_writer`` pool slots, so every later run
waits on those pools indefinitely.

``LocalRunLauncher`` launches exactly like the default one and adds the health check: the run
worker's pid (Dagster records it in the run's ``Started process for run (pid: N)`` event) must
still be a live process that started no later than that event (so a recycled pid does not count).
With ``run_monitoring`` enabled in ``dagster.yaml`` (as shipped), the daemon then marks a dead
run FAILED within ``poll_interval_seconds`` and frees its pool slots after
``free_slots_after_run_end_seconds``.

The check is only meaningful where the run workers live on the daemon's machine (``dagster
dev``, ``rs-embed-assets cluster``): the launcher records the host name in a run tag and never
reports a run started on another host (or one that has not reported its pid yet) as dead. Kubernetes deployments use the
``K8sRunLauncher``, which has its own health check.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Any

from dagster._core.events import DagsterEventType
from dagster._core.launcher.base import CheckRunHealthResult, LaunchRunContext, WorkerStatus
from dagster._core.launcher.default_run_launcher import DefaultRunLauncher
from dagster._core.storage.dagster_run import DagsterRun

HOST_TAG = "rs_embed_assets/run_worker_host"
_PID_EVENT_PREFIX = "Started process for run (pid: "
_CLOCK_SLACK_S = 2.0


class LocalRunLauncher(DefaultRunLauncher):
    """``DefaultRunLauncher`` + a run-worker health check for run monitoring (same host only)."""

    def launch_run(self, context: LaunchRunContext) -> None:
        self._instance.add_run_tags(context.dagster_run.run_id, {HOST_TAG: socket.gethostname()})
        super().launch_run(context)

    @property
    def supports_check_run_worker_health(self) -> bool:
        return True

    def check_run_worker_health(self, run: DagsterRun) -> CheckRunHealthResult:
        health = worker_health(self._instance, run)
        if health.dead_step is not None and health.run_worker_pid is not None:
            # a step executor (e.g. a Celery worker) died mid-step: its result will never come and the run
            # worker would wait for ever. Interrupt the run worker (the executor then revokes what it
            # submitted and the run ends FAILED), and report the run failed.
            _terminate(health.run_worker_pid)
        return CheckRunHealthResult(health.status, health.reason)


@dataclass(frozen=True)
class WorkerHealth:
    """What the health check found: ``status`` FAILED means the run's process (or a step's) is gone."""

    status: WorkerStatus
    reason: str = ""
    run_worker_pid: int | None = None
    dead_step: tuple[str, int] | None = None  # (step key, pid) of a gone step process in a live run worker


def worker_health(instance: Any, run: DagsterRun) -> WorkerHealth:
    """Whether the processes of a STARTED run are alive, without side effects (the one health check).

    Used by ``LocalRunLauncher`` for run monitoring and by :mod:`rs_embed_assets.slots` to explain
    why a pool slot is held by a dead run. "Cannot tell" answers RUNNING: run monitoring fails any
    status but RUNNING/SUCCESS.
    """
    fresh = instance.get_run_by_id(run.run_id) or run
    host = fresh.tags.get(HOST_TAG)
    if host is not None and host != socket.gethostname():
        return WorkerHealth(WorkerStatus.RUNNING, f"run worker runs on {host}, not checkable here")
    found = run_worker_pid(instance, run.run_id)
    if found is None:
        return WorkerHealth(WorkerStatus.RUNNING, "run worker has not reported its pid yet")
    pid, started_at = found
    if not process_alive_since(pid, started_at):
        return WorkerHealth(WorkerStatus.FAILED, f"run worker process {pid} is gone (killed or crashed)", pid)
    dead = dead_step_workers(instance, run.run_id)
    if dead:
        step_key, step_pid = dead[0]
        return WorkerHealth(WorkerStatus.FAILED, f"the process {step_pid} executing step {step_key} is gone "
                                                 "(killed or crashed)", pid, dead[0])
    return WorkerHealth(WorkerStatus.RUNNING, "", pid)


def run_worker_pid(instance: Any, run_id: str) -> tuple[int, float] | None:
    """(pid, event timestamp) of the run's worker process, from its event log."""
    records = instance.get_records_for_run(run_id, of_type=DagsterEventType.ENGINE_EVENT, limit=200).records
    for record in records:
        entry = record.event_log_entry
        message = (entry.dagster_event.message if entry.dagster_event else None) or entry.user_message or ""
        if message.startswith(_PID_EVENT_PREFIX):
            pid_text = message[len(_PID_EVENT_PREFIX):].split(")")[0]
            if pid_text.isdigit():
                return int(pid_text), entry.timestamp
    return None


_STEP_DONE = (DagsterEventType.STEP_SUCCESS, DagsterEventType.STEP_FAILURE, DagsterEventType.STEP_SKIPPED,
              DagsterEventType.STEP_UP_FOR_RETRY)


def dead_step_workers(instance: Any, run_id: str) -> list[tuple[str, int]]:
    """Steps of the run that started in another process (Celery worker, step subprocess) that is now gone."""
    started: dict[str, tuple[int, float]] = {}
    done: set[str] = set()
    for record in instance.get_records_for_run(run_id, limit=5000).records:
        entry = record.event_log_entry
        event = entry.dagster_event
        if event is None or not event.step_key:
            continue
        if event.event_type in _STEP_DONE:
            done.add(event.step_key)
        elif event.event_type in (DagsterEventType.STEP_START, DagsterEventType.ENGINE_EVENT) and event.pid:
            if event.event_type == DagsterEventType.STEP_START or "in celery worker" in (event.message or ""):
                started[event.step_key] = (event.pid, entry.timestamp)
    return [(key, pid) for key, (pid, at) in started.items()
            if key not in done and not process_alive_since(pid, at)]


def _terminate(pid: int) -> None:
    import os
    import signal

    try:
        os.kill(pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        pass


def process_alive_since(pid: int, started_before: float) -> bool:
    """Whether ``pid`` is a live (not zombie) process created no later than ``started_before``."""
    import psutil

    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return proc.create_time() <= started_before + _CLOCK_SLACK_S
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False
