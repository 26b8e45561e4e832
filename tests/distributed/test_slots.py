"""A run waiting for a pool slot held by a dead run says so in its own log (issue 9, crash hygiene).

Against a real SQLite instance configured by the shipped dagster.yaml: runs are created from small jobs
whose ops are in the `gpu` pool, slots are claimed through the event log storage as a step would claim
them, and a "dead" run worker is a process that has exited.
"""

import json
import os
import subprocess
import sys

import dagster as dg
import pytest
from dagster._core.events import DagsterEvent, DagsterEventType
from dagster._core.remote_origin import RegisteredCodeLocationOrigin, RemoteJobOrigin, RemoteRepositoryOrigin

from rs_embed_assets import cli
from rs_embed_assets.automation import pool_slots_sensor
from rs_embed_assets.slots import find_blocked, free_dead_run_slots, report_blocked_runs

from .conftest import new_home


@dg.op(pool="gpu")
def embed():
    pass


@dg.op
def composite():
    return 1


@dg.op(pool="gpu")
def embed_after(_x):
    pass


@dg.job
def gpu_job():
    embed()


@dg.job
def composite_then_gpu_job():
    embed_after(composite())


@pytest.fixture
def instance(tmp_path):
    with dg.DagsterInstance.from_config(str(new_home(tmp_path))) as inst:
        inst.event_log_storage.set_concurrency_slots("gpu", 1)
        yield inst


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def started(instance, job=gpu_job, worker_pid: int | None = None):
    """A STARTED run whose run worker reported its pid as the default launcher does."""
    run = instance.create_run_for_job(job)
    instance.report_dagster_event(DagsterEvent(DagsterEventType.RUN_START.value, job_name=run.job_name), run.run_id)
    instance.report_engine_event(f"Started process for run (pid: {worker_pid or os.getpid()}).", run)
    return instance.get_run_by_id(run.run_id)


def queued(instance, job=gpu_job):
    """A run in the run queue, as the QueuedRunCoordinator submits it."""
    origin = RemoteJobOrigin(RemoteRepositoryOrigin(RegisteredCodeLocationOrigin("rs_embed_assets"),
                                                    "__repository__"), job.name)
    run = instance.create_run_for_job(job, remote_job_origin=origin)
    instance.report_dagster_event(DagsterEvent(DagsterEventType.RUN_ENQUEUED.value, job_name=run.job_name),
                                  run.run_id)
    return instance.get_run_by_id(run.run_id)


def claim(instance, run, step_key):
    return instance.event_log_storage.claim_concurrency_slot("gpu", run.run_id, step_key).is_claimed


def pool_messages(instance, run_id) -> list[str]:
    records = instance.get_records_for_run(run_id, of_type=DagsterEventType.ENGINE_EVENT).records
    return [r.event_log_entry.dagster_event.message for r in records
            if r.event_log_entry.dagster_event.message.startswith("Pool slot")]


def test_a_waiting_step_is_told_which_dead_run_holds_the_slot_and_what_happens_next(instance):
    holder = started(instance, worker_pid=_dead_pid())
    assert claim(instance, holder, "embed")
    waiting = started(instance, composite_then_gpu_job)
    assert not claim(instance, waiting, "embed_after")  # the step waits for the gpu slot

    report_blocked_runs(instance)

    [message] = pool_messages(instance, waiting.run_id)
    assert "step embed_after waits for a `gpu` slot" in message
    assert f"held by run {holder.run_id} (step embed)" in message
    assert "run worker process" in message and "is gone" in message
    assert "Run monitoring marks that run FAILED within 10 s and frees its slots 5 s later" in message
    assert f"rs-embed-assets slots free {holder.run_id}" in message
    assert pool_messages(instance, holder.run_id) == []  # only waiting runs are told


def test_a_queued_run_held_back_by_the_pool_is_told_too(instance):
    holder = started(instance, worker_pid=_dead_pid())
    assert claim(instance, holder, "embed")
    waiting = queued(instance)

    report_blocked_runs(instance)

    [message] = pool_messages(instance, waiting.run_id)
    assert message.startswith("Pool slot held by a dead run: this run is queued for a `gpu` slot held by run "
                              f"{holder.run_id}")


def test_a_holder_that_ended_without_freeing_its_slot_counts_as_dead(instance):
    holder = started(instance)  # its worker (this process) is alive ...
    assert claim(instance, holder, "embed")
    waiting = queued(instance)
    assert find_blocked(instance) == []  # ... so a live holder is no reason to speak

    instance.report_run_failed(holder)  # ... until the run ends with the slot still claimed
    report_blocked_runs(instance)

    [message] = pool_messages(instance, waiting.run_id)
    assert "which ended FAILURE at " in message
    assert "frees the slots of an ended run 5 s after its end (checked every 10 s)" in message


def test_each_waiting_run_is_told_once_and_told_again_when_the_slot_is_freed(instance):
    holder = started(instance, worker_pid=_dead_pid())
    assert claim(instance, holder, "embed")
    waiting = queued(instance)

    state = report_blocked_runs(instance)
    for _ in range(3):  # sensor ticks while the slot stays held
        state = report_blocked_runs(instance, state)
    assert len(pool_messages(instance, waiting.run_id)) == 1

    instance.report_run_failed(holder)  # run monitoring's two moves: fail the run, free its slots
    state = report_blocked_runs(instance, state)
    assert len(pool_messages(instance, waiting.run_id)) == 1  # same holder, nothing new to say
    instance.event_log_storage.free_concurrency_slots_for_run(holder.run_id)
    state = report_blocked_runs(instance, state)
    report_blocked_runs(instance, state)

    messages = pool_messages(instance, waiting.run_id)
    assert len(messages) == 2 and state == {}
    assert messages[1] == (f"Pool slot freed: the `gpu` slot held by dead run {holder.run_id} (step embed) is "
                           "free; this run can take it now.")


def test_nothing_is_said_while_the_pool_has_a_free_slot_or_nobody_waits(instance):
    holder = started(instance, worker_pid=_dead_pid())
    assert claim(instance, holder, "embed")
    assert find_blocked(instance) == []  # a dead holder, but nobody waits
    instance.event_log_storage.set_concurrency_slots("gpu", 2)
    queued(instance)
    assert find_blocked(instance) == []  # a second slot is free: the queued run gets it


def test_a_slot_claimed_by_a_run_the_instance_does_not_know_is_named_with_the_manual_fix(instance):
    # e.g. the run storage was wiped but the slots table was not: nothing will ever free that slot
    orphan = "0" * 8 + "-0000-0000-0000-" + "0" * 12
    assert instance.event_log_storage.claim_concurrency_slot("gpu", orphan, "embed").is_claimed
    waiting = queued(instance)

    report_blocked_runs(instance)

    [message] = pool_messages(instance, waiting.run_id)
    assert f"held by run {orphan} (step embed), which no longer exists in this instance" in message
    assert ("Nothing frees the slots of a run that no longer exists: free them with "
            f"`rs-embed-assets slots free {orphan}`") in message
    assert free_dead_run_slots(instance, orphan)[0] == 1


def test_without_free_slots_after_run_end_the_message_says_nothing_frees_it(tmp_path):
    yaml_text = (new_home(tmp_path) / "dagster.yaml").read_text().replace("free_slots_after_run_end_seconds: 5", "")
    (tmp_path / "dagster_home" / "dagster.yaml").write_text(yaml_text)
    with dg.DagsterInstance.from_config(str(tmp_path / "dagster_home")) as instance:
        instance.event_log_storage.set_concurrency_slots("gpu", 1)
        holder = started(instance)
        assert claim(instance, holder, "embed")
        instance.report_run_failed(holder)
        waiting = queued(instance)
        report_blocked_runs(instance)
        [message] = pool_messages(instance, waiting.run_id)
    assert "run_monitoring.free_slots_after_run_end_seconds is not set in dagster.yaml, so nothing frees this slot" \
        in message


def test_the_sensor_reports_once_across_ticks_through_its_cursor(instance):
    holder = started(instance, worker_pid=_dead_pid())
    assert claim(instance, holder, "embed")
    waiting = queued(instance)

    context = dg.build_sensor_context(instance=instance)
    first = pool_slots_sensor(context)
    cursor = context.cursor
    pool_slots_sensor(dg.build_sensor_context(instance=instance, cursor=cursor))

    assert len(pool_messages(instance, waiting.run_id)) == 1
    assert json.loads(cursor) == {waiting.run_id: {f"gpu|{holder.run_id}": "embed"}}
    assert "1 run(s) wait for a pool slot held by a dead run" in first.skip_message
    assert pool_slots_sensor.default_status == dg.DefaultSensorStatus.RUNNING


def test_slots_free_frees_a_dead_runs_slots_and_refuses_a_live_one(instance, tmp_path, monkeypatch, capsys):
    live = started(instance)
    assert claim(instance, live, "embed")
    with pytest.raises(ValueError, match="its slots are in use"):
        free_dead_run_slots(instance, live.run_id)
    instance.report_run_failed(live)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))  # the CLI opens the same instance

    assert cli.main(["slots"]) == 0
    assert f"held by run {live.run_id} step embed (DEAD: ended FAILURE at" in capsys.readouterr().out
    assert cli.main(["slots", "free", live.run_id]) == 0

    assert "freed 1 pool slot(s)" in capsys.readouterr().out
    assert instance.event_log_storage.get_concurrency_info("gpu").claimed_slots == []
