"""Command line: ``rs-embed-assets demo | dev | tiles ... | similar ... | slots ...``."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
POOL_LIMITS = {"gpu": 1, "imagery": 4, "duckdb_writer": 1}

# Demo AOI: two 305 px (3.05 km) sub-tiles of 31UFU west of Hoorn, NL (k = 36)
DEMO_BBOX = "5.041,52.638,5.087,52.646"
DEMO_MONTHS = ("2024-06", "2024-07")
DEMO_K = 36


def ensure_dagster_home(path: str | None = None) -> Path:
    """Use $DAGSTER_HOME, or ./.dagster_home, seeded with the repo's dagster.yaml."""
    home = Path(path or os.environ.get("DAGSTER_HOME") or ".dagster_home").resolve()
    home.mkdir(parents=True, exist_ok=True)
    cfg = home / "dagster.yaml"
    if not cfg.exists():
        shutil.copy(REPO_ROOT / "dagster.yaml", cfg)
    os.environ["DAGSTER_HOME"] = str(home)
    return home


def get_instance():
    import dagster as dg

    ensure_dagster_home()
    instance = dg.DagsterInstance.get()
    for pool, limit in POOL_LIMITS.items():
        if instance.event_log_storage.get_concurrency_info(pool).slot_count == 0:
            instance.event_log_storage.set_concurrency_slots(pool, limit)
    return instance


def _aoi_from_args(args):
    from .grid import load_aoi

    return load_aoi(bbox=getattr(args, "bbox", None), geojson=getattr(args, "geojson", None),
                    file=getattr(args, "file", None))


def cmd_tiles(args) -> int:
    if args.action == "list":
        keys = _fast_tile_keys()
        if keys is None:
            from .partitions import TILES

            keys = get_instance().get_dynamic_partitions(TILES.name)
        print("\n".join(keys))
        return 0
    from .grid import tiles_for_aoi

    if args.action == "for-aoi":
        print("\n".join(tiles_for_aoi(_aoi_from_args(args), k=args.k)))
        return 0
    if args.action == "add":
        from .partitions import add_tiles

        instance = get_instance()
        keys = list(args.keys or []) + (tiles_for_aoi(_aoi_from_args(args), k=args.k)
                                        if (args.bbox or args.geojson or args.file) else [])
        new = add_tiles(instance, keys)
        print(f"added {len(new)} tile(s), {len(keys) - len(new)} already present: {', '.join(new) or '-'}")
        return 0
    if args.action == "remove":
        return _remove_tiles(list(args.keys or []))
    raise SystemExit(f"unknown tiles action {args.action}")


def _remove_tiles(keys: list[str]) -> int:
    """Delete ``tiles`` partitions. Data files and materialisation history are kept (printed)."""
    from .partitions import TILES

    if not keys:
        raise ValueError("name the tile keys to remove, e.g. `rs-embed-assets tiles remove 31UFU-k36-r21-c12` "
                         "(`rs-embed-assets tiles list` shows them)")
    instance = get_instance()
    existing = set(instance.get_dynamic_partitions(TILES.name))
    unknown = [k for k in keys if k not in existing]
    if unknown:
        raise ValueError(f"not tile partitions: {', '.join(unknown)} (nothing removed); "
                         "`rs-embed-assets tiles list` shows the keys")
    for key in dict.fromkeys(keys):
        instance.delete_dynamic_partition(TILES.name, key)
    print(f"removed {len(set(keys))} tile partition(s): {', '.join(dict.fromkeys(keys))}")
    print("Their files under the data root (composites, vectors, grids) are kept and stay in the catalog; "
          "their materialisation history stays in the instance and shows again if a tile is re-added. "
          "Delete a tile's files by hand, then rebuild the catalog, to drop it from SQL.")
    return 0


def _fast_tile_keys() -> list[str] | None:
    """The ``tiles`` partitions read straight from the default SQLite instance, without importing Dagster.

    ``import dagster`` alone takes seconds; for the default local instance (``storage`` not
    configured in dagster.yaml) the keys live in ``history/runs/index.db``, table
    ``dynamic_partitions`` (Dagster 1.13's schema), ordered by insertion like the Dagster API. Any
    other setup (Postgres, a custom storage, a missing table) returns None: the caller asks Dagster.
    """
    import sqlite3

    home = ensure_dagster_home()
    cfg = (home / "dagster.yaml").read_text()
    if any(line.split(":")[0].strip() in ("storage", "event_log_storage")
           for line in cfg.splitlines() if line[:1].isalpha()):
        return None
    db = home / "history" / "runs" / "index.db"
    if not db.exists():
        return []
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
            rows = con.execute("SELECT partition FROM dynamic_partitions WHERE partitions_def_name = 'tiles' "
                               "ORDER BY id").fetchall()
    except sqlite3.Error:
        return None
    return [r[0] for r in rows]


def parse_months(text: str) -> tuple[str, ...]:
    """``2024-06,2024-07-01`` → ('2024-06', '2024-07'); each must be a month partition (clear error otherwise)."""
    from .partitions import month_partition

    months = [m.strip() for m in str(text).split(",") if m.strip()]
    if not months:
        raise ValueError("--months needs at least one month, e.g. --months 2024-06,2024-07")
    return tuple(sorted({month_partition(m) for m in months}))


def run_demo(*, data_root: str, bbox: str = DEMO_BBOX, months=DEMO_MONTHS, k: int = DEMO_K,
             model: str = "fomo", allow_random_init: bool = True, top: int = 5) -> list[tuple]:
    """Materialise composites, the checkpoint and one model's embeddings for a small AOI, then query."""
    months = parse_months(months if isinstance(months, str) else ",".join(months))  # before any work starts
    os.environ["RS_EMBED_ASSETS_DATA_ROOT"] = str(Path(data_root).resolve())
    os.environ.setdefault("RS_EMBED_ASSETS_MODELS", model)
    if allow_random_init:
        os.environ.setdefault("RS_EMBED_ALLOW_RANDOM_INIT", "1")
    import dagster as dg

    import adapters

    from .catalog import connect_readonly
    from .grid import parse_bbox, tiles_for_aoi
    from .materialize import read_checkpoint_record
    from .partitions import add_tiles, make_key
    from .storage import Storage

    instance = get_instance()
    from .definitions import defs

    tiles = tiles_for_aoi(parse_bbox(bbox), k=k)
    add_tiles(instance, tiles)
    print(f"tiles: {', '.join(tiles)}; months: {', '.join(months)}")
    assets = list(defs.assets)
    resources = defs.resources
    quiet = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}
    ckpt = dg.AssetKey(["checkpoint", model])
    dg.materialize(assets, selection=[ckpt], instance=instance, resources=resources, run_config=quiet)
    storage = Storage(os.environ["RS_EMBED_ASSETS_DATA_ROOT"])
    if read_checkpoint_record(storage, model)["random_init"]:
        src = adapters.get_spec(model).checkpoint
        print(f"!! checkpoint/{model}: RANDOM-INIT demo weights (the published file is not available offline). "
              f"Point {src.env_prefix}_CKPT at {src.filename} for real embeddings.")
    selection = [dg.AssetKey("s2_composite"), dg.AssetKey("s1_composite"), dg.AssetKey(["embeddings", model])]
    ordered = sorted(tiles)
    start, end = make_key(ordered[0], months[0]), make_key(ordered[-1], months[-1])
    dg.materialize(assets, selection=selection, instance=instance, resources=resources, run_config=quiet,
                   tags={"dagster/asset_partition_range_start": str(start),
                         "dagster/asset_partition_range_end": str(end)})
    dg.materialize(assets, selection=[dg.AssetKey("catalog")], instance=instance, resources=resources,
                   run_config=quiet)
    db = storage.catalog_path
    with connect_readonly(db) as con:
        summary = con.execute("SELECT model, count(*) AS chips, count(DISTINCT tile) AS tiles, "
                              "count(DISTINCT month) AS months FROM vectors GROUP BY model").fetchall()
        query_chip, query_month = con.execute(
            "SELECT chip_id, month FROM vectors WHERE model = ? ORDER BY tile, month, chip_row, chip_col LIMIT 1",
            [model]).fetchone()
        sql = "SELECT chip_id, month, round(similarity::DOUBLE, 4) AS sim FROM similar_chips(?, ?, ?, ?)"
        rows = con.execute(sql, [model, query_chip, str(query_month), top]).fetchall()
    print(f"catalog: {db}")
    for m, chips, nt, nm in summary:
        print(f"  {m}: {chips} chips over {nt} tiles × {nm} months")
    print(f"\nSQL> SELECT * FROM similar_chips('{model}', '{query_chip}', '{query_month}', {top});")
    print(f"{'chip_id':<36} {'month':<10} similarity")
    for chip, month, sim in rows:
        print(f"{chip:<36} {str(month):<10} {sim}")
    return rows


def cmd_demo(args) -> int:
    run_demo(data_root=args.data_root, bbox=args.bbox, months=parse_months(args.months), k=args.k,
             model=args.model, allow_random_init=not args.no_random_init, top=args.top)
    return 0


def cmd_dev(args) -> int:
    get_instance()
    # one "materialization planned" event per asset and run instead of per partition: the planning
    # cost the backfill benchmark measures (README "Backfills at scale"; docs/deployment.md)
    os.environ.setdefault("DAGSTER_EMIT_PARTITION_SUBSET_IN_PLANNED_EVENTS", "1")
    cmd = [sys.executable, "-m", "dagster", "dev", "-w", str(REPO_ROOT / "workspace.yaml"),
           "-h", args.host, "-p", str(args.port)]
    os.execvp(cmd[0], cmd)
    return 0


def cmd_models(args) -> int:
    import adapters

    print(f"{'model':<14} {'sensor':<6} {'chip':>5} {'frames':>6} {'dim':>5} {'cell m':>6}  checkpoint")
    for m in adapters.list_models():
        s = adapters.get_spec(m)
        src = s.checkpoint
        where = f"hf://{src.hf_repo}/{src.filename}" if src.hf_repo else src.filename
        print(f"{m:<14} {s.sensor:<6} {s.chip_size:>5} {s.frames:>6} {s.embed_dim:>5} {s.grid_resolution_m:>6g}  "
              f"{where}  [{src.env_prefix}_CKPT]")
        print(f"{'':<14} bands {','.join(s.bands)}")
    return 0


def cmd_similar(args) -> int:
    """Top-k chips by cosine: the model's search index when it is current (fast), else the SQL macro."""
    from . import search
    from .catalog import CatalogError, parse_month, similar_chips
    from .storage import Storage

    storage = Storage(args.data_root)
    if args.k < 1:
        raise ValueError(f"-k must be at least 1, got {args.k}")
    month = parse_month(args.month)
    months = [parse_month(m) for m in args.months.split(",")] if args.months else None
    bbox = None
    if args.bbox:
        try:
            bbox = tuple(float(v) for v in args.bbox.split(","))
        except ValueError:
            bbox = ()
        if len(bbox) != 4:
            raise ValueError(f"--bbox {args.bbox!r} must be min_lon,min_lat,max_lon,max_lat")
    index = None
    if not args.exact:
        try:
            index = search.open_index(storage, args.model)
        except search.SearchError:
            index = None  # no (current) index: the exact SQL macro answers, and names unknown models
    if index is not None:
        rows = [h.as_tuple() for h in index.similar(args.chip, month, args.k, months=months, bbox=bbox)]
    elif months or bbox:
        raise ValueError(f"--months/--bbox need the search index of {args.model}; materialise the `catalog` asset")
    else:
        try:
            rows = similar_chips(storage.catalog_path, args.model, args.chip, month.isoformat(), args.k)
        except CatalogError as exc:
            raise ValueError(str(exc)) from None
    for row in rows:
        print(*row, sep="\t")
    return 0


def cmd_export(args) -> int:
    """COG of a composite (--sensor), an embedding grid (--model) or a change map (--model --change A B)."""
    from .composite import parse_month
    from .export import export_change, export_composite, export_grid
    from .storage import Storage, StorageError

    storage = Storage(args.data_root)
    if bool(args.sensor) == bool(args.model):
        raise ValueError("give exactly one of --sensor (a composite) or --model (an embedding grid)")
    if bool(args.month) == bool(args.change):
        raise ValueError("give --month YYYY-MM, or --change MONTH_A MONTH_B (with --model)")
    try:
        if args.change:
            if not args.model:
                raise ValueError("--change compares two months of an embedding grid: give --model")
            a, b = (parse_month(m) for m in args.change)
            out = export_change(storage, args.model, args.tile, a, b,
                                args.output or f"{args.model}_{args.tile}_{a}_{b}_change.tif")
        elif args.model:
            month = parse_month(args.month)
            out = export_grid(storage, args.model, args.tile, month,
                              args.output or f"{args.model}_{args.tile}_{month}.tif")
        else:
            month = parse_month(args.month)
            out = export_composite(storage, args.sensor, args.tile, month,
                                   args.output or f"{args.sensor}_{args.tile}_{month}.tif")
    except StorageError as exc:
        raise ValueError(str(exc)) from None
    print(out)
    return 0


def cmd_doctor(args) -> int:
    from .doctor import run

    return run(args.data_root, clean=args.clean, verify=not args.no_verify, min_age_s=args.min_age * 60,
               as_json=args.json)


def add_doctor_parser(sub, data_root_default: str) -> None:
    d = sub.add_parser("doctor", help="report (and --clean) leftovers of killed writes and damaged partitions")
    d.add_argument("--data-root", default=data_root_default)
    d.add_argument("--clean", action="store_true", help="remove the leftovers (never committed data)")
    d.add_argument("--min-age", type=float, default=15.0,
                   help="minutes: leftovers younger than this may be a write in progress and are kept (default 15)")
    d.add_argument("--no-verify", action="store_true", help="skip hashing committed stores and checkpoints")
    d.add_argument("--json", action="store_true", help="findings as JSON")
    d.set_defaults(func=cmd_doctor)


def cmd_slots(args) -> int:
    from .slots import free_dead_run_slots, slot_report

    instance = get_instance()
    if args.action == "free":
        if not args.run_id:
            raise ValueError("give the run id whose slots to free: rs-embed-assets slots free RUN_ID")
        freed, why = free_dead_run_slots(instance, args.run_id)
        print(f"freed {freed} pool slot(s) of run {args.run_id}, which {why}")
        return 0
    for pool in slot_report(instance):
        print(f"{pool['pool']}: {len(pool['holders'])}/{pool['limit']} slots held, {len(pool['waiting'])} waiting")
        for h in pool["holders"]:
            state = f"DEAD: {h['dead']}; free with `rs-embed-assets slots free {h['run_id']}`" if h["dead"] else "alive"
            print(f"  held by run {h['run_id']} step {h['step_key']} ({state})")
        for w in pool["waiting"]:
            print(f"  waiting: run {w['run_id']}" + (f" step {w['step_key']}" if w["step_key"] else " (queued)"))
    return 0


def cmd_cluster(args) -> int:
    from .cluster import main as cluster_main

    return cluster_main(args.action)


def main(argv: list[str] | None = None) -> int:
    data_root_default = os.environ.get("RS_EMBED_ASSETS_DATA_ROOT", "data")
    p = argparse.ArgumentParser(prog="rs-embed-assets", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("demo", help="materialise a small AOI offline and print a DuckDB similarity query")
    d.add_argument("--data-root", default=data_root_default)
    d.add_argument("--bbox", default=DEMO_BBOX)
    d.add_argument("--months", default=",".join(DEMO_MONTHS),
                   help="comma-separated months, YYYY-MM or YYYY-MM-01 (each a month partition: from "
                        "RS_EMBED_ASSETS_START_MONTH to the latest completed month)")
    d.add_argument("--k", type=int, default=DEMO_K, help="k×k sub-tiling of each S2 tile")
    d.add_argument("--model", default="fomo")
    d.add_argument("--top", type=int, default=5)
    d.add_argument("--no-random-init", action="store_true",
                   help="fail instead of using random demo weights when the checkpoint is unavailable")
    d.set_defaults(func=cmd_demo)

    t = sub.add_parser("tiles", help="tile partitions: add from an AOI, list, remove, or just compute")
    t.add_argument("action", choices=["add", "list", "remove", "for-aoi"])
    t.add_argument("keys", nargs="*", help="explicit tile keys (add, remove)")
    t.add_argument("--bbox")
    t.add_argument("--geojson", help="GeoJSON file (lon/lat)")
    t.add_argument("--file", help="any vector file GeoPandas reads: GeoPackage, Shapefile, GeoParquet, FlatGeobuf, ...")
    t.add_argument("--k", type=int, default=1, help="k×k sub-tiling (1 = whole 110 km tiles)")
    t.set_defaults(func=cmd_tiles)

    v = sub.add_parser("dev", help="start the Dagster UI and daemon with the local instance")
    v.add_argument("--host", default="127.0.0.1")
    v.add_argument("--port", type=int, default=3000)
    v.set_defaults(func=cmd_dev)

    m = sub.add_parser("models", help="the registered models: inputs, outputs, checkpoints")
    m.set_defaults(func=cmd_models)

    s = sub.add_parser("similar", help="nearest chips to a chip (search index, or catalog.duckdb SQL)")
    s.add_argument("--data-root", default=data_root_default)
    s.add_argument("--model", default="fomo")
    s.add_argument("--chip", required=True)
    s.add_argument("--month", required=True, help="YYYY-MM or YYYY-MM-01")
    s.add_argument("-k", type=int, default=10)
    s.add_argument("--months", help="only neighbours in these months (comma-separated; needs the search index)")
    s.add_argument("--bbox", help="only neighbours whose chip centre lies in min_lon,min_lat,max_lon,max_lat")
    s.add_argument("--exact", action="store_true", help="exact SQL scan instead of the search index")
    s.set_defaults(func=cmd_similar)

    e = sub.add_parser("export", help="Cloud-Optimized GeoTIFF of a composite, an embedding grid or a change map")
    e.add_argument("--data-root", default=data_root_default)
    e.add_argument("--sensor", choices=["s2", "s1"], help="export this sensor's composite")
    e.add_argument("--model", help="export this model's embedding grid (one band per feature)")
    e.add_argument("--tile", required=True)
    e.add_argument("--month", help="YYYY-MM or YYYY-MM-01")
    e.add_argument("--change", nargs=2, metavar=("MONTH_A", "MONTH_B"),
                   help="with --model: per-cell cosine distance between two months' grids")
    e.add_argument("-o", "--output", help="output .tif (default: <product>_<tile>_<month>.tif here)")
    e.set_defaults(func=cmd_export)

    add_doctor_parser(sub, data_root_default)

    sl = sub.add_parser("slots", help="pool slots (gpu, imagery, duckdb_writer): who holds them, who waits, and "
                                      "free the slots of a dead run")
    sl.add_argument("action", nargs="?", choices=["status", "free"], default="status")
    sl.add_argument("run_id", nargs="?", help="free: the dead run whose slots to free (refused for a live run)")
    sl.set_defaults(func=cmd_slots)

    c = sub.add_parser("cluster", help="the distributed profile on 127.0.0.1: Postgres, Redis, Celery gpu/imagery "
                                       "workers, daemon and webserver (docs/deployment.md)")
    c.add_argument("action", choices=["up", "down", "status"])
    c.set_defaults(func=cmd_cluster)

    args = p.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # a run that failed on bad data, a full disk, ...: the reason, not a traceback
        reason = user_error(exc)
        if reason is None:
            raise
        print(f"error: {reason}", file=sys.stderr)
        return 1


def user_error(exc: BaseException) -> str | None:
    """The message of the first error in ``exc``'s chain that explains itself (ours, or an OSError with its path).

    Dagster wraps a failing step's exception (``DagsterExecutionStepExecutionError.user_exception``);
    the wrapped one is what the user needs to read.
    """
    from adapters.redact import redact_text

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        mod = type(exc).__module__ or ""
        if mod.startswith(("rs_embed_assets", "adapters")) or isinstance(exc, ValueError):
            return redact_text(str(exc))
        if isinstance(exc, OSError):
            where = f": {exc.filename}" if exc.filename else ""
            return redact_text(f"{exc.strerror or exc}{where}" if exc.strerror else str(exc))
        exc = getattr(exc, "user_exception", None) or exc.__cause__ or exc.__context__
    return None


if __name__ == "__main__":
    sys.exit(main())
