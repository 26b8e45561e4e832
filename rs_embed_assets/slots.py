"""Why a run waits for a pool slot: slots held by dead runs, told in the waiting run's own log.

Steps of the ``gpu``, ``imagery`` and ``duckdb_writer`` pools claim a slot before they start
(``granularity: op``). A run whose process tree died (``kill -9``, OOM killer, reboot) keeps its slots
until run monitoring marks it FAILED and frees them (``dagster.yaml``: ``poll_interval_seconds`` +
``free_slots_after_run_end_seconds``). Meanwhile Dagster tells the waiting run nothing: a QUEUED run
shows no event at all, a started one "waiting for a slot" at best, neither says who holds the slot.

:func:`report_blocked_runs` writes ONE engine event into each waiting run's log per dead holder
(pool, holder run and step, why it is considered dead, what happens next and how to free it by hand)
and one "slot freed" line once the holder's slot is free. The ``pool_slots_sensor``
(``rs_embed_assets.automation``) calls it every few seconds; ``rs-embed-assets slots`` shows the same
findings and frees a dead run's slots on request.

A holder is dead when its run has ended (SUCCESS, FAILURE, CANCELED) or no longer exists but the slot
is still claimed, or when the launcher's health check (:func:`rs_embed_assets.launcher.worker_health`,
the same one run monitoring uses) finds its run worker or step process gone. A holder that cannot be
checked (a run worker on another host) is never called dead.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from dagster._core.definitions.metadata import MetadataValue
from dagster._core.events import EngineEventData
from dagster._core.launcher.base import WorkerStatus
from dagster._core.storage.dagster_run import FINISHED_STATUSES, DagsterRunStatus, RunsFilter

from .launcher import worker_health

# A run's state, as the sensor's cursor keeps it: {waiting run id: {"<pool>|<holder run id>": holder step}}
Reported = dict[str, dict[str, str]]
_CHECKED_STATUSES = (DagsterRunStatus.STARTED, DagsterRunStatus.STARTING, DagsterRunStatus.CANCELING)
_MAX_QUEUED_RUNS = 1000


@dataclass(frozen=True)
class DeadHolder:
    """A claimed pool slot whose run will never release it by itself."""

    pool: str
    run_id: str
    step_key: str
    reason: str           # "ended FAILURE at 2026-12-01 09:12:03 UTC", "is STARTED but run worker process 123 is gone ..."
    status: str | None    # the holder run's status (None: the run no longer exists)

    @property
    def ended(self) -> bool:
        return self.status in {s.value for s in FINISHED_STATUSES}


@dataclass(frozen=True)
class Waiter:
    """A run that waits for a slot of ``pool``: one of its steps (``step_key``) or, queued, the whole run."""

    run_id: str
    pool: str
    step_key: str | None = None


@dataclass(frozen=True)
class Blocked:
    waiter: Waiter
    holder: DeadHolder


def holder_death(instance: Any, run_id: str) -> tuple[str, str | None] | None:
    """(why the run is dead, its status) when ``run_id`` can never release a slot; None while it may."""
    record = instance.get_run_record_by_id(run_id)
    if record is None:  # deleting a run frees its slots; a wiped run storage does not
        return "no longer exists in this instance", None
    run = record.dagster_run
    if run.status in FINISHED_STATUSES:
        ended = datetime.fromtimestamp(record.end_time, timezone.utc).strftime(" at %Y-%m-%d %H:%M:%S UTC") \
            if record.end_time else ""
        return f"ended {run.status.value}{ended}", run.status.value
    if run.status in _CHECKED_STATUSES:
        health = worker_health(instance, run)
        if health.status == WorkerStatus.FAILED:
            return f"is {run.status.value} but {health.reason}", run.status.value
    return None


def find_blocked(instance: Any) -> list[Blocked]:
    """Every (waiting run, dead holder) pair over the instance's pools; a pool counts only when it is full.

    Cheap when nothing is wrong: holders are checked only in full pools, queued runs are read only when
    a full pool has a dead holder.
    """
    storage = instance.event_log_storage
    pools = sorted(storage.get_concurrency_keys())
    infos = storage.get_concurrency_infos(pools) if pools else {}
    # a pool with a free slot serves its waiters in priority order: nobody is stuck there
    full = {pool: info for pool, info in infos.items()
            if info.claimed_slots and len(info.claimed_slots) >= info.slot_count}
    deaths: dict[str, tuple[str, str | None] | None] = {}
    holders: dict[str, list[DeadHolder]] = {}
    for pool, info in full.items():
        for slot in info.claimed_slots:
            if slot.run_id not in deaths:
                deaths[slot.run_id] = holder_death(instance, slot.run_id)
            death = deaths[slot.run_id]
            if death is not None:
                holders.setdefault(pool, []).append(DeadHolder(pool, slot.run_id, slot.step_key, *death))
    if not holders:
        return []
    stuck = {pool: full[pool] for pool in holders}
    waiters = _waiting_steps(stuck)
    for waiter in _queued_waiters(instance, stuck):
        waiters.setdefault(waiter.pool, []).append(waiter)
    ended: dict[str, bool] = {}
    blocked = []
    for pool, pool_waiters in waiters.items():
        holder_runs = {h.run_id for h in holders[pool]}
        for waiter in pool_waiters:
            if waiter.run_id in holder_runs or _ended(instance, waiter.run_id, ended):
                continue
            blocked.extend(Blocked(waiter, holder) for holder in holders[pool])
    return blocked


def _waiting_steps(infos: Mapping[str, Any]) -> dict[str, list[Waiter]]:
    """Steps of started runs queued for a slot (pending, not holding one), by pool; one per run and pool."""
    out: dict[str, list[Waiter]] = {}
    for pool, info in infos.items():
        holding = {(s.run_id, s.step_key) for s in info.claimed_slots}
        seen = set()
        for step in sorted(info.pending_steps, key=lambda p: p.enqueued_timestamp):
            if (step.run_id, step.step_key) in holding or step.run_id in seen:
                continue
            seen.add(step.run_id)
            out.setdefault(pool, []).append(Waiter(step.run_id, pool, step.step_key))
    return out


def _queued_waiters(instance: Any, infos: Mapping[str, Any]) -> Iterable[Waiter]:
    """QUEUED runs the run queue holds back for a full pool (all of their first steps need one)."""
    from dagster._core.instance.config import PoolGranularity

    granularity = instance.get_concurrency_config().pool_config.pool_granularity or PoolGranularity.OP
    runs = instance.get_runs(filters=RunsFilter(statuses=[DagsterRunStatus.QUEUED]), limit=_MAX_QUEUED_RUNS)
    for run in runs:
        needs = run.run_op_concurrency
        if needs is None:
            continue
        if granularity == PoolGranularity.OP:
            if needs.has_unconstrained_root_nodes:
                continue  # the queue launches it; its pool steps then show up as pending steps
            pools = needs.root_key_counts.keys()
        else:
            pools = needs.all_pools or ()
        for pool in sorted(pools):
            if pool in infos:
                yield Waiter(run.run_id, pool)


def _ended(instance: Any, run_id: str, cache: dict[str, bool]) -> bool:
    if run_id not in cache:
        run = instance.get_run_by_id(run_id)
        cache[run_id] = run is None or run.status in FINISHED_STATUSES
    return cache[run_id]


def blocked_message(instance: Any, blocked: Blocked) -> str:
    """The engine event text: the pool, the holder, why it is dead, what happens next, the manual fix."""
    waiter, holder = blocked.waiter, blocked.holder
    who = f"step {waiter.step_key} waits" if waiter.step_key else "this run is queued"
    head = (f"Pool slot held by a dead run: {who} for a `{holder.pool}` slot held by run {holder.run_id} "
            f"(step {holder.step_key}), which {holder.reason}. ")
    return head + next_steps(instance, holder)


def next_steps(instance: Any, holder: DeadHolder) -> str:
    """What frees the slot (run monitoring, with its bound in seconds) and how to free it by hand."""
    poll = instance.run_monitoring_poll_interval_seconds
    free_after = (instance.run_monitoring_settings or {}).get("free_slots_after_run_end_seconds")
    manual = (f"`rs-embed-assets slots free {holder.run_id}` (or the holder's run page in the UI → ⋯ → "
              "\"Free concurrency slots\", offered once it has ended)")
    if holder.status is None:
        return f"Nothing frees the slots of a run that no longer exists: free them with {manual}."
    if not instance.run_monitoring_enabled or not free_after:
        missing = "run_monitoring is off" if not instance.run_monitoring_enabled else \
            "run_monitoring.free_slots_after_run_end_seconds is not set"
        return f"{missing} in dagster.yaml, so nothing frees this slot: free it with {manual}."
    if holder.ended:
        return (f"Run monitoring frees the slots of an ended run {free_after} s after its end (checked every "
                f"{poll} s): this run continues within about {poll + free_after} s. If it does not, the "
                f"daemon is not running (`rs-embed-assets dev` starts it); free it with {manual}.")
    return (f"Run monitoring marks that run FAILED within {poll} s and frees its slots {free_after} s later: "
            f"this run continues within about {2 * poll + free_after} s. If it does not, the daemon is not "
            f"running (`rs-embed-assets dev` starts it); free it with {manual}.")


def report_blocked_runs(instance: Any, reported: Mapping[str, Mapping[str, str]] | None = None) -> Reported:
    """Write what :func:`find_blocked` finds into the waiting runs' logs, each (waiter, holder) once.

    ``reported`` is what earlier calls wrote (their return value); a pair already in it is not written
    again. A reported holder whose slot is free now gets a "slot freed" line in the waiter's log (if the
    waiter still runs). Returns the new state: the pairs that are still blocked.
    """
    previous = {run: dict(pairs) for run, pairs in (reported or {}).items()}
    state: Reported = {}
    for item in find_blocked(instance):
        waiter, holder = item.waiter, item.holder
        pair = f"{holder.pool}|{holder.run_id}"
        if pair in state.get(waiter.run_id, {}):
            continue
        state.setdefault(waiter.run_id, {})[pair] = holder.step_key
        if pair in previous.get(waiter.run_id, {}):
            continue
        _engine_event(instance, waiter.run_id, blocked_message(instance, item), waiter.step_key, {
            "pool": holder.pool, "holder run": MetadataValue.dagster_run(holder.run_id),
            "holder step": holder.step_key, "why dead": holder.reason,
            "free it by hand": MetadataValue.text(f"rs-embed-assets slots free {holder.run_id}")})
    gone = [(run, pair, step) for run, pairs in previous.items() for pair, step in pairs.items()
            if pair not in state.get(run, {})]
    if gone:
        infos = instance.event_log_storage.get_concurrency_infos(sorted({p.split("|")[0] for _, p, _ in gone}))
        for waiter_run, pair, step in gone:
            pool, holder_run = pair.split("|", 1)
            still_held = any(s.run_id == holder_run for s in infos[pool].claimed_slots)
            run = instance.get_run_by_id(waiter_run)
            if still_held or run is None or run.status in FINISHED_STATUSES:
                continue
            _engine_event(instance, waiter_run, f"Pool slot freed: the `{pool}` slot held by dead run {holder_run} "
                                                f"(step {step}) is free; this run can take it now.", None,
                          {"pool": pool, "holder run": MetadataValue.dagster_run(holder_run)})
    return state


def _engine_event(instance: Any, run_id: str, message: str, step_key: str | None, metadata: dict) -> None:
    run = instance.get_run_by_id(run_id)
    if run is None:
        return
    instance.report_engine_event(message, run, EngineEventData(metadata), step_key=step_key)


def free_dead_run_slots(instance: Any, run_id: str) -> tuple[int, str]:
    """Free the pool slots of ``run_id`` if it is dead (ended, deleted or its process gone); else refuse.

    Returns (number of slots freed, why the run counts as dead). Freeing a live run's slots would let
    more steps run than the pool allows, so a live (or uncheckable) run raises ValueError with the reason.
    """
    death = holder_death(instance, run_id)
    if death is None:
        record = instance.get_run_record_by_id(run_id)
        status = record.dagster_run.status.value if record else "unknown"
        raise ValueError(f"run {run_id} is {status} and its processes are alive (or run on another host): "
                         "its slots are in use. Terminate the run first (UI: the run page → Terminate).")
    storage = instance.event_log_storage
    held = [p for p, info in storage.get_concurrency_infos(sorted(storage.get_concurrency_keys())).items()
            for slot in info.claimed_slots if slot.run_id == run_id]
    storage.free_concurrency_slots_for_run(run_id)
    return len(held), death[0]


def slot_report(instance: Any) -> list[dict]:
    """Per pool: limit, holders (with why dead, if so) and waiters, for ``rs-embed-assets slots``."""
    storage = instance.event_log_storage
    pools = sorted(storage.get_concurrency_keys())
    infos = storage.get_concurrency_infos(pools) if pools else {}
    waiting = _waiting_steps(infos)
    for waiter in _queued_waiters(instance, infos):
        waiting.setdefault(waiter.pool, []).append(waiter)
    out = []
    for pool in pools:
        info = infos[pool]
        holders = []
        for slot in info.claimed_slots:
            death = holder_death(instance, slot.run_id)
            holders.append({"run_id": slot.run_id, "step_key": slot.step_key,
                            "dead": death[0] if death else None})
        out.append({"pool": pool, "limit": info.slot_count, "holders": holders,
                    "waiting": [{"run_id": w.run_id, "step_key": w.step_key} for w in waiting.get(pool, [])]})
    return out
