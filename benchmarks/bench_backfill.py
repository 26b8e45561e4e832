"""Backfill planning and per-run orchestration overhead, measured with Dagster's own daemon code.

What it measures (writes benchmarks/results/backfill_<label>.json):

1. **Planning**: a UI-style backfill (``PartitionBackfill.from_asset_partitions``, what the webserver's
   ``launchPartitionBackfill`` builds) over the partitioned graph (both composites and every embedding
   asset) for N tiles × M months, then the backfill daemon's own iteration
   (``execute_backfill_iteration``) until it has nothing more to submit. The instance is a real
   SQLite DAGSTER_HOME with ``max_concurrent_runs: 0``, so runs are created and queued exactly as in
   production but never launched. AgriFM reads 8 months of composites (a time-window mapping), so the
   daemon submits it only once those composites exist; its wave is planned as a second backfill and
   both are reported.
2. **Per-run overhead**: one batch run of the real code location launched the way the run launcher
   launches it (``dagster api execute_run`` in a fresh process), executor as configured; the time from
   process start to RUN_START and to the first STEP_START event. The run materialises composites of
   the offline sample provider: no model runs (torch is imported only inside embedding steps), so
   nothing but Dagster's own start-up and the code location's import precede the step. Launched
   ``--repeat`` times (default 3); the median run is reported, every run with the load average.
3. **Global design simulation** (``--design zone``): the same planning for the partition design of
   docs/scale.md — spatial keys are MGRS grid-zone squares ("31U", ~1,200 of them cover all land tiles),
   each partition a square × month with the tiles inside as rows of a manifest.

    python benchmarks/bench_backfill.py --tiles 1500 --months 12 --label 1500x12
    python benchmarks/bench_backfill.py --design zone --tiles 20460 --months 12 --label global_zone
    python benchmarks/bench_backfill.py --skip-plan        # run overhead only (RS_EMBED_ASSETS_EXECUTOR=multiprocess)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"

INSTANCE_YAML = """
run_coordinator:
  module: dagster.core.run_coordinator
  class: QueuedRunCoordinator
  config: {max_concurrent_runs: 0}
telemetry: {enabled: false}
"""


def tile_keys(n: int) -> list[str]:
    """n real MGRS tile ids from the packaged S2 tile list, in sorted (spatially grouped) order."""
    from rs_embed_assets.grid import s2_tile_names

    ids = sorted(s2_tile_names())
    if n > len(ids):
        raise SystemExit(f"only {len(ids)} tiles in the packaged list, asked for {n}")
    step = len(ids) / n
    return [ids[int(i * step)] for i in range(n)]


def zone_keys(tiles: list[str]) -> list[str]:
    """MGRS grid-zone squares (zone number + latitude band, e.g. '31U') holding these tiles."""
    return sorted({t[:3] for t in tiles})


def _months(n: int) -> list[str]:
    start = int(os.environ.get("RS_EMBED_ASSETS_START_MONTH", "2024-01")[:4])
    return [f"{start + i // 12}-{i % 12 + 1:02d}-01" for i in range(n)]


def plan(tiles: list[str], months: list[str], design: str, log: logging.Logger) -> dict:
    import dagster as dg
    from dagster._core.execution.backfill import BulkActionStatus, PartitionBackfill
    from dagster._core.test_utils import create_test_daemon_workspace_context
    from dagster._core.workspace.load_target import ModuleTarget
    from dagster._daemon.backfill import execute_backfill_iteration

    from rs_embed_assets.partitions import TILES

    home = Path(tempfile.mkdtemp(prefix="bench_backfill_"))
    (home / "dagster.yaml").write_text(INSTANCE_YAML)
    instance = dg.DagsterInstance.from_config(str(home))
    space = tiles if design == "tile" else zone_keys(tiles)
    if design == "tile":
        instance.add_dynamic_partitions(TILES.name, space)
        target = ModuleTarget("rs_embed_assets.definitions", "defs", str(REPO), "rs_embed_assets")
    else:
        instance.add_dynamic_partitions("zones", space)
        target = ModuleTarget("benchmarks._zone_design", "defs", str(REPO), "zone_design")
    out: dict = {"design": design, "spatial_keys": len(space), "months": len(months)}
    with create_test_daemon_workspace_context(target, instance) as ctx:
        graph = ctx.create_request_context().asset_graph
        partitioned = [k for k in graph.get_all_asset_keys() if graph.get(k).is_partitioned]
        temporal = [k for k in partitioned if k.path[-1] == "agrifm"]
        waves = [("main", [k for k in partitioned if k not in temporal])] + ([("agrifm", temporal)] if temporal else [])
        names = [str(dg.MultiPartitionKey({"month": m, "tile" if design == "tile" else "zone": s}))
                 for m in months for s in space]
        out["partitions_per_asset"] = len(names)
        out["assets"] = len(partitioned)
        out["waves"] = []
        for label, keys in waves:
            t0 = time.perf_counter()
            bf = PartitionBackfill.from_asset_partitions(
                backfill_id=f"bench{label}", asset_graph=graph, partition_names=names, asset_selection=keys,
                backfill_timestamp=time.time(), tags={}, dynamic_partitions_store=instance, all_partitions=False,
                title=None, description=None, run_config=None)
            instance.add_backfill(bf)
            created = time.perf_counter() - t0
            iterations = 0
            while iterations < 50:  # until every partition of every asset of this wave is in a submitted run
                iterations += 1
                list(execute_backfill_iteration(ctx, log))
                b = instance.get_backfill(bf.backfill_id)
                requested = b.asset_backfill_data.requested_subset
                print(f"{label}: iteration {iterations} done at {time.perf_counter() - t0:.1f} s, "
                      f"{instance.get_runs_count()} runs", file=sys.stderr, flush=True)
                if b.status != BulkActionStatus.REQUESTED or all(
                        len(requested.get_partitions_subset(k)) >= len(names) for k in keys):
                    break
            elapsed = time.perf_counter() - t0
            runs = instance.get_runs(filters=dg.RunsFilter(tags={"dagster/backfill": bf.backfill_id}))
            sizes = []
            spans = []
            for r in runs:
                start, end = r.tags.get("dagster/asset_partition_range_start"), r.tags.get(
                    "dagster/asset_partition_range_end")
                if start and end:
                    (m0, s0), (m1, s1) = start.split("|"), end.split("|")
                    n_s = space.index(s1) - space.index(s0) + 1
                    n_m = months.index(m1) - months.index(m0) + 1
                    sizes.append(n_s * n_m)
                    spans.append((n_s, n_m))
                else:
                    sizes.append(1)
                    spans.append((1, 1))
            out["waves"].append({
                "wave": label, "assets": [k.to_user_string() for k in keys],
                "create_backfill_s": round(created, 2), "plan_s": round(elapsed, 2), "iterations": iterations,
                "runs": len(runs), "partitions_per_run_min": min(sizes, default=0),
                "partitions_per_run_max": max(sizes, default=0),
                "max_spatial_keys_per_run": max((s for s, _ in spans), default=0),
                "max_months_per_run": max((m for _, m in spans), default=0),
                "steps_per_run": len(runs[0].step_keys_to_execute or []) if runs else 0,
            })
            print(f"{label}: {len(runs)} runs in {elapsed:.1f} s", file=sys.stderr, flush=True)
    out["plan_s_total"] = round(sum(w["plan_s"] for w in out["waves"]), 2)
    out["runs_total"] = sum(w["runs"] for w in out["waves"])
    instance.dispose()
    return out


RUN_SCRIPT = r"""
import json, os, sys, time
import dagster as dg
from dagster._core.origin import JobPythonOrigin, RepositoryPythonOrigin
from dagster._core.code_pointer import ModuleCodePointer
from dagster._grpc.types import ExecuteRunArgs
from dagster._serdes import serialize_value
from rs_embed_assets.definitions import defs
from rs_embed_assets.partitions import TILES, make_key

home, tiles, months = sys.argv[1], sys.argv[2].split(","), sys.argv[3].split(",")
instance = dg.DagsterInstance.from_config(home)
instance.add_dynamic_partitions(TILES.name, tiles)
job = defs.resolve_implicit_global_asset_job_def()
sel = [dg.AssetKey("s2_composite")]
job = job.get_subset(asset_selection=set(sel))
tags = {"dagster/asset_partition_range_start": str(make_key(tiles[0], months[0])),
        "dagster/asset_partition_range_end": str(make_key(tiles[-1], months[-1]))}
from dagster._core.execution.api import create_execution_plan
plan = create_execution_plan(job, tags=tags, instance_ref=instance.get_ref())
origin = JobPythonOrigin(job.name, RepositoryPythonOrigin(sys.executable, ModuleCodePointer(
    "rs_embed_assets.definitions", "defs", os.getcwd()), ), )
run = instance.create_run_for_job(job_def=job, execution_plan=plan, tags=tags, asset_selection=frozenset(sel),
                                  job_code_origin=origin)
args = ExecuteRunArgs(job_origin=origin, run_id=run.run_id, instance_ref=instance.get_ref(), set_exit_code_on_failure=True)
print(json.dumps({"run_id": run.run_id, "args": serialize_value(args)}))
"""


def run_overhead(n_tiles: int, n_months: int, log: logging.Logger, instance_yaml: str = "minimal") -> dict:
    """Launch one batch run in a fresh process like the run launcher does; time to its first step.

    ``instance_yaml``: ``minimal`` (SQLite, telemetry off) or ``shipped`` (the repository's dagster.yaml:
    run monitoring, pools with op-granularity slots, …).
    """
    import dagster as dg

    home = Path(tempfile.mkdtemp(prefix="bench_run_"))
    (home / "dagster.yaml").write_text((REPO / "dagster.yaml").read_text() if instance_yaml == "shipped"
                                       else "telemetry: {enabled: false}\n")
    data = home / "data"
    tiles = [f"31UFU-k36-r21-c{c:02d}" for c in range(10, 10 + n_tiles)]
    months = [m[:7] for m in _months(n_months)]
    env = {**os.environ, "DAGSTER_HOME": str(home), "RS_EMBED_ASSETS_DATA_ROOT": str(data),
           "PYTHONPATH": str(REPO)}
    made = subprocess.run([sys.executable, "-c", RUN_SCRIPT, str(home), ",".join(tiles),
                           ",".join(months)], env=env, cwd=REPO, capture_output=True, text=True)
    if made.returncode:
        raise SystemExit(made.stderr[-3000:])
    spec = json.loads(made.stdout.strip().splitlines()[-1])
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "dagster", "api", "execute_run", spec["args"]], env=env, cwd=REPO,
                          capture_output=True, text=True)
    wall = time.time() - t0
    instance = dg.DagsterInstance.from_config(str(home))
    recs = instance.all_logs(spec["run_id"])
    first = {}
    for e in recs:
        t = e.dagster_event_type
        if t is not None and t.name not in first:  # by name: RUN_START's stored value is PIPELINE_START
            first[t.name] = e.timestamp
    run = instance.get_run_by_id(spec["run_id"])
    out = {
        "partitions": n_tiles * n_months, "tiles": n_tiles, "months": n_months,
        "executor": os.environ.get("RS_EMBED_ASSETS_EXECUTOR", "in_process"), "instance": instance_yaml,
        "status": run.status.value, "run_wall_s": round(wall, 2),
        "launch_to_run_start_s": round(first.get("RUN_START", t0) - t0, 2),
        "launch_to_first_step_start_s": round(first.get("STEP_START", t0) - t0, 2),
        "steps": len([e for e in recs if e.dagster_event_type == dg.DagsterEventType.STEP_START]),
    }
    if run.status.value != "SUCCESS":
        out["stderr_tail"] = proc.stderr[-2000:]
    instance.dispose()
    return out


def run_overhead_repeated(repeat: int, log: logging.Logger, instance_yaml: str) -> dict:
    """``run_overhead`` ``repeat`` times (a fresh instance and process each): the median run (by time to the
    first step) as ``run_overhead``, and every run with the 1-minute load average when it started."""
    runs = []
    for _ in range(repeat):
        load = os.getloadavg()[0]
        runs.append({**run_overhead(4, 2, log, instance_yaml), "load_average_1min": round(load, 2)})
    firsts = sorted(r["launch_to_first_step_start_s"] for r in runs)
    out = {"run_overhead": next(r for r in runs if r["launch_to_first_step_start_s"] == firsts[len(runs) // 2])}
    if repeat > 1:
        out["run_overhead_repeats"] = [{k: r[k] for k in ("launch_to_run_start_s", "launch_to_first_step_start_s",
                                                          "run_wall_s", "status", "load_average_1min")}
                                       for r in runs]
        out["launch_to_first_step_start_s"] = {"median": firsts[len(runs) // 2], "min": firsts[0], "max": firsts[-1]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiles", type=int, default=1500)
    ap.add_argument("--months", type=int, default=12)
    ap.add_argument("--design", choices=["tile", "zone"], default="tile")
    ap.add_argument("--skip-run", action="store_true", help="planning only")
    ap.add_argument("--skip-plan", action="store_true", help="run overhead only")
    ap.add_argument("--label", default=None)
    ap.add_argument("--repeat", type=int, default=3, help="run-overhead launches (the median run is reported)")
    ap.add_argument("--instance", choices=["minimal", "shipped"], default="minimal",
                    help="run overhead: a minimal SQLite instance or the repository's dagster.yaml")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    log = logging.getLogger("bench_backfill")  # the daemon's own logger: its per-iteration INFO is huge
    log.setLevel(logging.WARNING)
    sys.path.insert(0, str(REPO))
    result = {"machine": os.environ.get("BENCH_MACHINE", "2 vCPU, 24 GB, no GPU"), "python": platform.python_version(),
              "tiles": args.tiles, "months": args.months}
    import dagster

    result["dagster"] = dagster.__version__
    result["load_average_start"] = [round(x, 2) for x in os.getloadavg()]
    months = _months(args.months)
    if not args.skip_plan:
        result["planning"] = plan(tile_keys(args.tiles), months, args.design, log)
    if not args.skip_run:
        result.update(run_overhead_repeated(args.repeat, log, args.instance))
    label = args.label or (f"run_overhead_{os.environ.get('RS_EMBED_ASSETS_EXECUTOR', 'in_process')}"
                           + ("_shipped" if args.instance == "shipped" else "")
                           if args.skip_plan else f"{args.design}_{args.tiles}x{args.months}")
    result["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"backfill_{label}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"wrote {path.relative_to(REPO)}")


if __name__ == "__main__":
    main()
