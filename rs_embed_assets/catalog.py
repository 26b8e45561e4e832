"""The DuckDB catalog over the committed Parquet vectors and composite records.

``build_catalog`` (run by the single-writer ``catalog`` asset) creates in ``catalog.duckdb``:

- ``vectors_<model>`` views (one per enabled model, typed and empty until the model has rows) and a
  ``vectors`` view over all models: one row per chip, ``embedding FLOAT[D]``, ``geometry GEOMETRY``;
- ``manifest`` table: per-partition provenance read from each vectors file's footer (so it
  describes exactly the committed partitions the views read), ``month`` a DATE;
- ``composites`` table: per tile-month composite status, valid fraction, provider and version;
- ``models`` table: the models of this deployment with their dimension and row counts;
- ``catalog_info``: when and from which files it was built, and where the data root lies;
- macros ``similar_chips(model, chip_id, month, k)``, ``nearest_to_vector(model, vec, k)``,
  ``chip_timeseries(model, chip_id)``, ``chip_change(model, month_a, month_b)``; months are written
  ``'2024-06'`` or ``'2024-06-01'`` (or a DATE); an unknown model, chip or month is an error.

Portable: the views name files relative to the data root, and readers resolve them there
(``connect_readonly`` sets DuckDB's ``file_search_path`` to the root the catalog file belongs
to), so a copied or moved root keeps working and glob characters in the root's name are never
globbed.

Crash-safe: one builder at a time per catalog (a lock file), each in a uniquely named temporary
file; the file is checkpointed explicitly (a full disk fails here, not silently in ``close``),
reopened read-only and verified against what was meant to be written, and only then renamed over
the old catalog. Any failure raises and leaves the previous catalog untouched.
"""

from __future__ import annotations

import datetime as dt
import errno
import fcntl
import json
import os
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from .faults import fault_point
from .storage import Storage, StorageError, read_footer_manifest

CATALOG_FORMAT = 2


class CatalogError(RuntimeError):
    """The catalog could not be built, verified or opened; the message names the fix."""


# --- the storage layout, as the catalog sees it ----------------------------------------------------
def vectors_files(storage: Storage, model: str) -> list[Path]:
    """Committed vectors files of ``model`` (each the commit point of one partition), sorted.

    Writes are staged under ``.staging/`` and renamed into place, so every file here is committed.
    """
    base = storage.vectors_dir(model)
    return sorted(p for p in base.glob("*/*.parquet") if not p.name.startswith(".") and p.is_file())


def composite_records(storage: Storage) -> list[dict[str, Any]]:
    """Committed composite records (``composites/<sensor>/<tile>/<YYYY-MM>.json``)."""
    out = []
    for rec in storage.iter_composite_records():
        rec = dict(rec)
        rec["path"] = rec.get("store") or rec.get("path")
        out.append(rec)
    return out


# --- months ---------------------------------------------------------------------------------------
def parse_month(value: str | dt.date) -> dt.date:
    """'2024-06', '2024-06-01' or a date → the first day of that month; anything else is an error."""
    if isinstance(value, dt.date):
        if value.day != 1:
            raise ValueError(f"month {value} is not the first day of a month; write {value:%Y-%m}")
        return dt.date(value.year, value.month, 1)
    s = str(value).strip()
    try:
        if len(s) == 7:
            return dt.datetime.strptime(s, "%Y-%m").date()
        if len(s) == 10 and s.endswith("-01"):
            return dt.datetime.strptime(s, "%Y-%m-%d").date()
    except ValueError:
        pass
    raise ValueError(f"invalid month {value!r}: write YYYY-MM (e.g. 2024-06) or YYYY-MM-01")


def _month_date(value: Any) -> dt.date | None:
    if value in (None, ""):
        return None
    try:
        return parse_month(str(value)[:7])
    except ValueError:
        return None


# --- building -------------------------------------------------------------------------------------
MANIFEST_SCHEMA = pa.schema([
    ("model", pa.string()), ("tile", pa.string()), ("month", pa.date32()), ("rows", pa.int64()),
    ("file_rows", pa.int64()), ("checkpoint_sha256", pa.string()), ("checkpoint_random_init", pa.bool_()),
    ("checkpoint_source", pa.string()), ("composite_version", pa.string()), ("preprocessing_hash", pa.string()),
    ("code_version", pa.string()), ("provider", pa.string()), ("synthetic", pa.bool_()), ("device", pa.string()),
    ("dtype", pa.string()), ("chips_total", pa.int64()), ("chips_embedded", pa.int64()),
    ("chips_skipped", pa.int64()), ("seconds", pa.float64()), ("chips_per_s", pa.float64()),
    ("frame_months", pa.list_(pa.date32())), ("distinct_frames", pa.int64()), ("vectors_path", pa.string()),
    ("grid_path", pa.string()), ("manifest", pa.string()),
])

COMPOSITES_SCHEMA = pa.schema([
    ("sensor", pa.string()), ("tile", pa.string()), ("month", pa.date32()), ("status", pa.string()),
    ("valid_fraction", pa.float64()), ("scene_count", pa.int64()), ("provider", pa.string()),
    ("synthetic", pa.bool_()), ("data_version", pa.string()), ("path", pa.string()),
])


def _rel(storage: Storage, p: str | Path | None) -> str | None:
    """A path as stored in the catalog: relative to the data root when it lies inside it."""
    if p in (None, ""):
        return None
    path = Path(p)
    if not path.is_absolute():
        return path.as_posix()
    try:
        return path.relative_to(storage.root).as_posix()
    except ValueError:
        return str(path)


def _coerce(value: Any, typ: pa.DataType) -> Any:
    if value is None:
        return None
    try:
        if pa.types.is_date32(typ):
            return _month_date(value)
        if pa.types.is_list(typ):
            return [_month_date(v) for v in value] if isinstance(value, (list, tuple)) else None
        if pa.types.is_boolean(typ):
            return bool(value)
        if pa.types.is_integer(typ):
            return int(value)
        if pa.types.is_floating(typ):
            return float(value)
        return value if isinstance(value, str) else json.dumps(value, default=str)
    except (TypeError, ValueError):
        return None


def _table(records: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    cols = {f.name: [_coerce(r.get(f.name), f.type) for r in records] for f in schema}
    return pa.table(cols, schema=schema)


@dataclass
class CatalogPlan:
    """What a build will write, gathered from the committed files before DuckDB is touched."""

    models: dict[str, int]                                # model → embedding dimension
    files: dict[str, list[str]] = field(default_factory=dict)   # model → vectors files relative to the root
    rows: dict[str, int] = field(default_factory=dict)          # model → rows in its files (Parquet footers)
    manifest: list[dict[str, Any]] = field(default_factory=list)
    composites: list[dict[str, Any]] = field(default_factory=list)


def plan_catalog(storage: Storage, models: list[str] | None = None) -> CatalogPlan:
    import adapters

    from .settings import enabled_models

    wanted = list(models) if models is not None else enabled_models()
    # models that are no longer enabled but still have data stay queryable
    present = [m for m in adapters.list_models() if m not in wanted and vectors_files(storage, m)]
    plan = CatalogPlan(models={m: adapters.get_spec(m).embed_dim for m in wanted + present})
    for model in plan.models:
        files = vectors_files(storage, model)
        plan.files[model] = [f.relative_to(storage.root).as_posix() for f in files]
        total = 0
        for f in files:
            try:
                n = pq.ParquetFile(f).metadata.num_rows
                rec = dict(read_footer_manifest(f))
            except (pa.ArrowException, OSError, ValueError, StorageError) as exc:
                raise CatalogError(f"{f} is not a readable vectors file ({exc}); re-materialise that partition "
                                   "(or remove it) and rebuild the catalog; the previous catalog is unchanged") from exc
            total += n
            rec.setdefault("model", model)
            rec.setdefault("tile", f.stem)
            rec.setdefault("month", f.parent.name)
            rec["file_rows"] = n
            rec["manifest"] = json.dumps(rec, sort_keys=True, default=str)
            rec["vectors_path"] = f.relative_to(storage.root).as_posix()
            rec["grid_path"] = _rel(storage, rec.get("grid_path"))
            plan.manifest.append(rec)
        plan.rows[model] = total
    for rec in composite_records(storage):
        rec = dict(rec)
        rec["path"] = _rel(storage, rec.get("path"))
        plan.composites.append(rec)
    return plan


def _sql_str(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def _vectors_view_sql(model: str, dim: int, files: list[str]) -> str:
    cast = f"embedding::FLOAT[{dim}] AS embedding, geometry::GEOMETRY AS geometry"
    if files:
        listing = ", ".join(_sql_str(f) for f in files)
        src = f"read_parquet([{listing}], hive_partitioning=false)"
    else:  # typed and empty: the view exists (and README queries bind) before the model has rows
        src = f"_empty_vectors_{dim}"
    return f"CREATE VIEW vectors_{model} AS SELECT * REPLACE ({cast}) FROM {src}"


MACROS = [
    # months: '2024-06', '2024-06-01' or a DATE; anything else is an error that says how to write it
    r"""CREATE MACRO rs_month(x) AS (CASE
        WHEN regexp_full_match(x::VARCHAR, '\d{4}-(0[1-9]|1[0-2])') THEN (x::VARCHAR || '-01')::DATE
        WHEN regexp_full_match(x::VARCHAR, '\d{4}-(0[1-9]|1[0-2])-01') THEN x::VARCHAR::DATE
        ELSE error('invalid month ''' || coalesce(x::VARCHAR, 'NULL')
                   || ''': write YYYY-MM (e.g. 2024-06) or YYYY-MM-01') END)""",
    """CREATE MACRO rs_model(m) AS (CASE WHEN m IN (SELECT model FROM models) THEN true
        ELSE error('unknown model ''' || coalesce(m::VARCHAR, 'NULL') || '''; this catalog has: '
                   || (SELECT string_agg(model, ', ' ORDER BY model) FROM models)) END)""",
    """CREATE MACRO similar_chips(m, query_chip, query_month, k) AS TABLE
        WITH q AS (SELECT month, embedding FROM vectors WHERE model = m AND chip_id = query_chip),
        qv AS (SELECT CASE
            WHEN NOT rs_model(m) THEN NULL
            WHEN k < 1 THEN error('k must be at least 1, got ' || k)
            WHEN count(*) = 0 THEN error('unknown chip ''' || query_chip || ''' for model ' || m
                                         || ': it has no vectors in any month')
            WHEN count(*) FILTER (month = rs_month(query_month)) = 0 THEN error(
                'chip ''' || query_chip || ''' has no ' || m || ' vector in ' || strftime(rs_month(query_month), '%Y-%m')
                || '; it has: ' || string_agg(strftime(month, '%Y-%m'), ', ' ORDER BY month))
            ELSE first(embedding) FILTER (month = rs_month(query_month)) END AS embedding FROM q)
        SELECT v.chip_id, v.tile, v.month, v.center_lon, v.center_lat, v.valid_fraction,
               list_cosine_similarity(v.embedding, qv.embedding) AS similarity
        FROM vectors v, qv
        WHERE v.model = m AND NOT (v.chip_id = query_chip AND v.month = rs_month(query_month))
        ORDER BY similarity DESC, v.chip_id, v.month LIMIT greatest(k, 1)""",
    """CREATE MACRO nearest_to_vector(m, vec, k) AS TABLE
        WITH qv AS (SELECT CASE
            WHEN NOT rs_model(m) THEN NULL
            WHEN len(vec) != (SELECT embed_dim FROM models WHERE model = m) THEN error(
                'the query vector has ' || len(vec) || ' values; ' || m || ' vectors have '
                || (SELECT embed_dim FROM models WHERE model = m))
            WHEN k < 1 THEN error('k must be at least 1, got ' || k)
            ELSE vec::FLOAT[] END AS embedding)
        SELECT v.chip_id, v.tile, v.month, v.center_lon, v.center_lat,
               list_cosine_similarity(v.embedding, qv.embedding) AS similarity
        FROM vectors v, qv WHERE v.model = m ORDER BY similarity DESC, v.chip_id, v.month LIMIT greatest(k, 1)""",
    """CREATE MACRO chip_timeseries(m, query_chip) AS TABLE
        WITH s AS (SELECT month, valid_fraction, embedding FROM vectors
                   WHERE model = m AND chip_id = query_chip),
        ok AS (SELECT CASE WHEN NOT rs_model(m) THEN NULL WHEN count(*) = 0 THEN error('unknown chip ''' || query_chip || ''' for model ' || m
                                                        || ': it has no vectors in any month')
                           ELSE true END AS ok FROM s)
        SELECT s.month, s.valid_fraction, s.embedding FROM s, ok WHERE ok.ok ORDER BY s.month""",
    # month-over-month change per chip: 1 - cosine similarity of the chip's two vectors
    """CREATE MACRO chip_change(m, month_a, month_b) AS TABLE
        WITH a AS (SELECT * FROM vectors WHERE model = m AND month = rs_month(month_a)),
        b AS (SELECT chip_id, valid_fraction, embedding FROM vectors WHERE model = m AND month = rs_month(month_b)),
        ok AS (SELECT CASE
            WHEN NOT rs_model(m) THEN NULL
            WHEN (SELECT count(*) FROM a) = 0 THEN error(m || ' has no vectors in ' || strftime(rs_month(month_a), '%Y-%m'))
            WHEN (SELECT count(*) FROM b) = 0 THEN error(m || ' has no vectors in ' || strftime(rs_month(month_b), '%Y-%m'))
            ELSE true END AS ok)
        SELECT a.chip_id, a.tile, a.chip_row, a.chip_col, a.center_lon, a.center_lat, a.geometry,
               a.valid_fraction AS valid_fraction_a, b.valid_fraction AS valid_fraction_b,
               list_cosine_similarity(a.embedding, b.embedding) AS similarity,
               1 - list_cosine_similarity(a.embedding, b.embedding) AS change
        FROM a JOIN b USING (chip_id), ok WHERE ok.ok
        ORDER BY change DESC, a.chip_id""",
]


def _populate(con: duckdb.DuckDBPyConnection, storage: Storage, plan: CatalogPlan, db_path: Path) -> None:
    from .embedding import vectors_schema

    for dim in sorted(set(plan.models.values())):
        con.register("_schema", vectors_schema(dim).empty_table())
        con.execute(f"CREATE TABLE _empty_vectors_{dim} AS SELECT * FROM _schema")
        con.unregister("_schema")
    for model, dim in plan.models.items():
        con.execute(_vectors_view_sql(model, dim, plan.files[model]))
    con.execute("CREATE VIEW vectors AS " + " UNION ALL BY NAME ".join(
        f"SELECT * REPLACE (embedding::FLOAT[] AS embedding) FROM vectors_{m}" for m in plan.models))

    for name, rows, schema in (("manifest", plan.manifest, MANIFEST_SCHEMA),
                               ("composites", plan.composites, COMPOSITES_SCHEMA)):
        con.register("_t", _table(rows, schema))
        con.execute(f"CREATE TABLE {name} AS SELECT * REPLACE (manifest::JSON AS manifest) FROM _t"
                    if name == "manifest" else f"CREATE TABLE {name} AS SELECT * FROM _t")
        con.unregister("_t")
    models = pa.table({
        "model": list(plan.models), "embed_dim": [plan.models[m] for m in plan.models],
        "rows": [plan.rows[m] for m in plan.models], "partitions": [len(plan.files[m]) for m in plan.models],
    })
    con.register("_t", models)
    con.execute("CREATE TABLE models AS SELECT * FROM _t")
    con.unregister("_t")
    root_rel = os.path.relpath(storage.root, db_path.parent)
    con.execute("CREATE TABLE catalog_info AS SELECT ? AS format, ? AS data_root, now() AS built_at, ? AS fingerprint",
                [CATALOG_FORMAT, Path(root_rel).as_posix(), fingerprint(storage, plan)])
    for sql in MACROS:
        con.execute(sql)


def fingerprint(storage: Storage, plan: CatalogPlan) -> str:
    """A digest of the committed files the catalog describes (path, size, mtime): changes when any partition does."""
    import hashlib

    h = hashlib.sha256()
    for model in sorted(plan.files):
        for rel in plan.files[model]:
            st = (storage.root / rel).stat()
            h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    for rec in plan.composites:
        h.update(json.dumps([rec.get("sensor"), rec.get("tile"), str(rec.get("month")), rec.get("data_version")]).encode())
    return h.hexdigest()[:16]


def verify_catalog(con: duckdb.DuckDBPyConnection, plan: CatalogPlan) -> dict[str, int]:
    """Check a freshly written catalog answers what it was built to hold; raises CatalogError otherwise."""
    problems = []
    counts: dict[str, int] = {}
    for model in plan.models:
        try:
            counts[model] = con.execute(f"SELECT count(*) FROM vectors_{model}").fetchone()[0]
        except duckdb.Error as exc:
            problems.append(f"view vectors_{model} does not answer: {exc}")
            continue
        if counts[model] != plan.rows[model]:
            problems.append(f"vectors_{model} has {counts[model]} rows, its files hold {plan.rows[model]}")
    checks = {"manifest": len(plan.manifest), "composites": len(plan.composites), "models": len(plan.models)}
    for table, expected in checks.items():
        try:
            got = con.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
        except duckdb.Error as exc:
            problems.append(f"table {table} is missing: {exc}")
            continue
        if got != expected:
            problems.append(f"table {table} has {got} rows, expected {expected}")
    macros = {r[0] for r in con.execute("SELECT DISTINCT function_name FROM duckdb_functions() "
                                        "WHERE database_name = current_database() AND NOT internal").fetchall()}
    missing = {"similar_chips", "nearest_to_vector", "chip_timeseries", "chip_change", "rs_month",
               "rs_model"} - macros
    if missing:
        problems.append(f"macros missing: {sorted(missing)}")
    if problems:
        raise CatalogError("the new catalog failed verification: " + "; ".join(problems))
    return counts


@contextmanager
def builder_lock(db_path: Path, timeout_s: float = 600.0) -> Iterator[None]:
    """One builder per catalog file at a time (an advisory lock beside it); others wait their turn."""
    lock = db_path.with_name(f".{db_path.name}.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as fh:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise CatalogError(f"another process has been building {db_path} for over {timeout_s:.0f} s "
                                       f"(lock {lock}); wait for it or end it") from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _staging_dir(storage: Storage, db_path: Path) -> Path:
    # same filesystem as the target, so the final rename is atomic
    return storage.staging_dir if db_path.parent == storage.root else db_path.parent


def _remove(path: Path) -> None:
    for p in (path, path.with_name(path.name + ".wal")):
        try:
            p.unlink()
        except FileNotFoundError:
            pass


def build_catalog(storage: Storage, db_path: Path | None = None, *, models: list[str] | None = None,
                  lock_timeout_s: float = 600.0) -> dict[str, Any]:
    """(Re)create the catalog in a new file, verify it, then atomically replace ``db_path``.

    Raises CatalogError (the old catalog stays as it was) when anything fails, a full disk included.
    """
    t0 = time.perf_counter()
    db_path = Path(db_path).expanduser().resolve() if db_path else storage.catalog_path
    db_path.parent.mkdir(parents=True, exist_ok=True)
    _check_root_name(storage.root)
    with builder_lock(db_path, lock_timeout_s):
        plan = plan_catalog(storage, models)
        staging = _staging_dir(storage, db_path)
        staging.mkdir(parents=True, exist_ok=True)
        for stale in staging.glob(f"{db_path.name}.*.tmp*"):  # left by a killed builder (we hold the lock)
            stale.unlink(missing_ok=True)
        tmp = staging / f"{db_path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
        try:
            con = duckdb.connect(str(tmp))
            try:
                con.execute(f"SET file_search_path = {_sql_str(str(storage.root))}")
                _populate(con, storage, plan, db_path)
                con.execute("CHECKPOINT")  # a full disk fails here, loudly, instead of inside close()
            finally:
                con.close()
            with _open_readonly(tmp, storage.root) as check:
                counts = verify_catalog(check, plan)
            _fsync(tmp)
            fault_point("catalog:before")
            os.replace(tmp, db_path)
            _fsync(db_path.parent)
            fault_point("catalog:after")
        except (duckdb.Error, OSError, CatalogError) as exc:
            _remove(tmp)
            if isinstance(exc, CatalogError):
                raise
            hint = (" (the disk is full: free space on that filesystem)"
                    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC or "space" in str(exc).lower() else "")
            raise CatalogError(f"rebuilding {db_path} failed{hint}: {exc}; the previous catalog is unchanged") from exc
        except BaseException:
            _remove(tmp)
            raise
    return {"rows_per_model": counts, "models": list(plan.models), "manifest_rows": len(plan.manifest),
            "composite_rows": len(plan.composites), "partitions": {m: len(f) for m, f in plan.files.items()},
            "fingerprint": fingerprint(storage, plan), "seconds": round(time.perf_counter() - t0, 3),
            "path": str(db_path)}


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_root_name(root: Path) -> None:
    # DuckDB's file_search_path is a comma-separated list, and DuckDB reads '?' in a database path as
    # the start of URL parameters (it then writes the WAL elsewhere); '[', '*' and the like are fine
    bad = sorted({c for c in ",?" if c in str(root)})
    if bad:
        raise CatalogError(f"the data root {root} contains {' and '.join(repr(c) for c in bad)}, which DuckDB cannot "
                           "use in a database or search path; rename the directory")


# --- reading --------------------------------------------------------------------------------------
def _open_readonly(path: Path, root: Path) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect(str(path), read_only=True)
    con.execute(f"SET file_search_path = {_sql_str(str(root))}")
    return con


def catalog_root(con: duckdb.DuckDBPyConnection, db_path: Path) -> Path:
    """The data root of an open catalog: recorded relative to the catalog file's directory."""
    try:
        rel = con.execute("SELECT data_root FROM catalog_info").fetchone()[0]
    except duckdb.Error as exc:
        raise CatalogError(f"{db_path} is not a catalog of this version (no catalog_info); rebuild it by "
                           "materialising the `catalog` asset") from exc
    return (db_path.parent / rel).resolve()


def connect_readonly(path: str | Path, *, search: bool = False) -> duckdb.DuckDBPyConnection:
    """Open a catalog read-only, its relative file paths resolved against the data root it belongs to.

    ``search=True`` also registers ``similar_chips_ann(model, chip_id, month, k)``, the search index
    from SQL (see rs_embed_assets.search.register_sql); close such a connection when done.
    """
    path = Path(path).expanduser().resolve()
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; materialise the `catalog` asset first")
    con = duckdb.connect(str(path), read_only=True)
    try:
        root = catalog_root(con, path)
        _check_root_name(root)
        con.execute(f"SET file_search_path = {_sql_str(str(root))}")
        if search:
            from .search import register_sql

            register_sql(con, Storage(root))
    except BaseException:
        con.close()
        raise
    return con


def similar_chips(path: str | Path, model: str, chip_id: str, month: str, k: int = 5) -> list[tuple]:
    """Exact top-k by cosine similarity through the SQL macro; unknown model, chip or month raise ValueError."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    month_s = parse_month(month).isoformat()
    with connect_readonly(path) as con:
        try:
            return con.execute("SELECT * FROM similar_chips(?, ?, ?, ?)", [model, chip_id, month_s, k]).fetchall()
        except duckdb.InvalidInputException as exc:
            raise ValueError(str(exc).removeprefix("Invalid Input Error: ")) from None


def catalog_status(storage: Storage, db_path: Path | None = None, models: list[str] | None = None) -> dict[str, Any]:
    """Whether the catalog describes the committed files as they are now (``current``) or lags (``stale``)."""
    db_path = Path(db_path) if db_path else storage.catalog_path
    plan = plan_catalog(storage, models)
    now = fingerprint(storage, plan)
    if not db_path.exists():
        return {"current": False, "reason": "no catalog yet", "fingerprint": now}
    with connect_readonly(db_path) as con:
        built = con.execute("SELECT fingerprint FROM catalog_info").fetchone()[0]
        views = {r[0] for r in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()}
    missing = [m for m in plan.models if f"vectors_{m}" not in views]
    current = built == now and not missing
    reason = ("up to date" if current else
              f"models without a view: {missing}" if missing else "partitions changed since the catalog was built")
    return {"current": current, "reason": reason, "fingerprint": now, "built_fingerprint": built}
