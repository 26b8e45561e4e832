"""The DuckDB catalog: portable, crash-safe, one month format, clear errors (issues 10.4, 12.1, 13.3, 13.5)."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest

from catalog_data import (FOMO_ROWS, MODELS, MONTHS, ROWS_PER_TILE, TILES, copy_root, rewrite_vectors,
                          shared_materialisation)
from rs_embed_assets.catalog import CatalogError, build_catalog, catalog_status, connect_readonly, similar_chips
from rs_embed_assets.storage import Storage

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    return shared_materialisation(tmp_path_factory)


@pytest.fixture
def root(made, tmp_path) -> Path:
    return copy_root(made, tmp_path / "data")


def build(root: Path, **kw):
    return build_catalog(Storage(root), models=MODELS, **kw)


def first_chip(con) -> str:
    return con.execute("SELECT chip_id FROM vectors_fomo ORDER BY chip_id LIMIT 1").fetchall()[0][0]


# --- portability (issue 10.4) ------------------------------------------------------------------------
def test_a_moved_data_root_keeps_answering(root, tmp_path):
    build(root)
    moved = tmp_path / "elsewhere" / "moved-root"
    moved.parent.mkdir()
    shutil.move(root, moved)
    with connect_readonly(moved / "catalog.duckdb") as con:
        assert con.execute("SELECT count(*) FROM vectors_fomo").fetchall() == [(FOMO_ROWS,)]
        assert con.execute("SELECT count(*) FROM similar_chips('fomo', ?, '2024-06', 3)",
                           [first_chip(con)]).fetchall() == [(3,)]


def test_the_catalog_stores_no_absolute_path(root):
    build(root)
    raw = (root / "catalog.duckdb").read_bytes()
    assert str(root).encode() not in raw


@pytest.mark.parametrize("name", ["data[x]", "data*", "data[!x]{a,b}"[:8]])
def test_glob_characters_in_the_root_name_are_taken_literally(made, tmp_path, name):
    # a sibling root that a glob `data*` or `da?a` would also match holds more partitions
    decoy = copy_root(made, tmp_path / "dataY")
    (decoy / "embeddings" / "fomo" / "vectors" / "extra").mkdir()
    shutil.copy(next((decoy / "embeddings" / "fomo" / "vectors").glob("*/*.parquet")),
                decoy / "embeddings" / "fomo" / "vectors" / "extra" / "copy.parquet")
    root = copy_root(made, tmp_path / name)
    build(root)
    with connect_readonly(root / "catalog.duckdb") as con:
        assert con.execute("SELECT count(*), count(DISTINCT tile) FROM vectors").fetchall() == [(FOMO_ROWS, 2)]


@pytest.mark.parametrize("name", ["da?a", "data,x"])
def test_a_root_name_duckdb_cannot_hold_is_refused_clearly(made, tmp_path, name):
    root = copy_root(made, tmp_path / name)
    with pytest.raises(CatalogError, match="rename the directory"):
        build(root)


def test_a_catalog_outside_the_root_records_where_the_root_is(root, tmp_path):
    db = tmp_path / "elsewhere" / "cat.duckdb"
    build(root, db_path=db)
    with connect_readonly(db) as con:
        assert con.execute("SELECT count(*) FROM vectors_fomo").fetchall() == [(FOMO_ROWS,)]


# --- contents, months and errors (issues 13.3, 13.5) -------------------------------------------------
def test_every_enabled_model_has_a_typed_view_even_without_rows(root):
    build(root)
    with connect_readonly(root / "catalog.duckdb") as con:
        assert con.execute("SELECT count(*) FROM vectors_terrafm_b").fetchall() == [(0,)]
        types = dict(con.execute("SELECT column_name, column_type FROM (DESCRIBE vectors_terrafm_b)").fetchall())
        assert types["embedding"] == "FLOAT[768]" and types["month"] == "DATE"
        assert con.execute("SELECT model, rows, partitions FROM models ORDER BY model").fetchall() == [
            ("fomo", FOMO_ROWS, 4), ("terrafm_b", 0, 0)]


def test_manifest_comes_from_committed_vectors_with_months_as_dates(root):
    build(root)
    with connect_readonly(root / "catalog.duckdb") as con:
        rows = con.execute("SELECT tile, month, rows, file_rows, vectors_path FROM manifest ORDER BY ALL").fetchall()
        assert [(t, m) for t, m, *_ in rows] == [(t, dt.date.fromisoformat(m + "-01")) for t in TILES
                                                 for m in MONTHS]
        assert all(r == f == ROWS_PER_TILE[t] and not Path(p).is_absolute() for t, _, r, f, p in rows)
        assert con.execute("SELECT DISTINCT typeof(month) FROM composites").fetchall() == [("DATE",)]


@pytest.mark.parametrize("month", ["2024-06", "2024-06-01", dt.date(2024, 6, 1)])
def test_macros_accept_both_month_spellings_and_dates(root, month):
    build(root)
    with connect_readonly(root / "catalog.duckdb") as con:
        chip = first_chip(con)
        got = con.execute("SELECT chip_id, month FROM similar_chips('fomo', ?, ?, 5)", [chip, month]).fetchall()
        ref = con.execute("SELECT chip_id, month FROM similar_chips('fomo', ?, DATE '2024-06-01', 5)", [chip]).fetchall()
        assert got == ref and len(got) == 5


@pytest.mark.parametrize("sql, message", [
    ("SELECT * FROM similar_chips('fomo', $chip, '2024-13', 3)", "invalid month '2024-13'"),
    ("SELECT * FROM similar_chips('fomo', $chip, '2024-06-15', 3)", "invalid month '2024-06-15'"),
    ("SELECT * FROM similar_chips('agrifm', $chip, '2024-06', 3)", "unknown model 'agrifm'"),
    ("SELECT * FROM similar_chips('fomo', 'no-such-chip', '2024-06', 3)", "unknown chip 'no-such-chip'"),
    ("SELECT * FROM similar_chips('fomo', $chip, '2024-08', 3)", "has no fomo vector in 2024-08; it has: 2024-06, 2024-07"),
    ("SELECT * FROM similar_chips('fomo', $chip, '2024-06', 0)", "k must be at least 1"),
    ("SELECT * FROM chip_timeseries('fomo', 'no-such-chip')", "unknown chip 'no-such-chip'"),
    ("SELECT * FROM chip_timeseries('agrifm', $chip)", "unknown model 'agrifm'"),
    ("SELECT * FROM chip_change('fomo', '2024-06', '2024-09')", "fomo has no vectors in 2024-09"),
    ("SELECT * FROM nearest_to_vector('fomo', [1.0, 2.0], 3)", "the query vector has 2 values; fomo vectors have 768"),
])
def test_unknown_model_chip_or_month_is_an_error_in_sql(root, sql, message):
    build(root)
    with connect_readonly(root / "catalog.duckdb") as con:
        params = {"chip": first_chip(con)} if "$chip" in sql else None
        with pytest.raises(duckdb.InvalidInputException, match=message.replace("(", r"\(").replace("?", r"\?")):
            con.execute(sql, params).fetchall()


def test_chip_change_is_one_minus_the_cosine_of_the_two_months(root):
    build(root)
    tile = TILES[0]
    a = pq.read_table(next(p for p in (root / "embeddings/fomo/vectors").glob("*/*.parquet")
                           if "2024-06" in str(p) and tile in p.name))
    b = pq.read_table(next(p for p in (root / "embeddings/fomo/vectors").glob("*/*.parquet")
                           if "2024-07" in str(p) and tile in p.name))
    va = dict(zip(a["chip_id"].to_pylist(), np.asarray(a["embedding"].combine_chunks().flatten()).reshape(a.num_rows, -1)))
    vb = dict(zip(b["chip_id"].to_pylist(), np.asarray(b["embedding"].combine_chunks().flatten()).reshape(b.num_rows, -1)))
    with connect_readonly(root / "catalog.duckdb") as con:
        rows = con.execute("SELECT chip_id, change FROM chip_change('fomo', '2024-06', '2024-07-01') WHERE tile = ?",
                           [tile]).fetchall()
    assert len(rows) == ROWS_PER_TILE[tile] and [c for _, c in rows] == sorted((c for _, c in rows), reverse=True)
    for chip, change in rows:
        x, y = va[chip].astype(np.float64), vb[chip].astype(np.float64)
        assert change == pytest.approx(1 - x @ y / np.linalg.norm(x) / np.linalg.norm(y), abs=1e-5)


def test_library_similar_chips_refuses_bad_input_with_value_errors(root):
    build(root)
    db = root / "catalog.duckdb"
    with connect_readonly(db) as con:
        chip = first_chip(con)
    assert len(similar_chips(db, "fomo", chip, "2024-06-01", 2)) == 2
    for args, msg in [(("fomo", chip, "2024-13", 2), "invalid month"), (("fomo", chip, "2024-06", -1), "k must be"),
                      (("agrifm", chip, "2024-06", 2), "unknown model"), (("fomo", "zz", "2024-06", 2), "unknown chip")]:
        with pytest.raises(ValueError, match=msg):
            similar_chips(db, *args)


def test_status_is_stale_after_a_partition_changes_and_current_after_a_rebuild(root):
    storage = Storage(root)
    build(root)
    assert catalog_status(storage, models=MODELS)["current"]
    victim = next((root / "embeddings/fomo/vectors").glob("*/*.parquet"))
    rewrite_vectors(victim, rows=8)  # the partition was re-materialised with fewer rows
    status = catalog_status(storage, models=MODELS)
    assert not status["current"] and "changed" in status["reason"]
    build(root)
    assert catalog_status(storage, models=MODELS)["current"]


# --- crash safety (issue 12.1) -------------------------------------------------------------------------
def _answers(db: Path) -> list[tuple]:
    with connect_readonly(db) as con:
        return con.execute("SELECT model, count(*) FROM vectors GROUP BY model ORDER BY model").fetchall()


def _run_builder(root: Path, preamble: str = "") -> subprocess.CompletedProcess:
    code = textwrap.dedent(f"""
        import os, sys
        os.environ["RS_EMBED_ASSETS_MODELS"] = {",".join(MODELS)!r}
        from rs_embed_assets.catalog import build_catalog, CatalogError
        from rs_embed_assets.storage import Storage
        import rs_embed_assets.embedding, adapters
        {preamble}
        try:
            build_catalog(Storage({str(root)!r}))
        except CatalogError as exc:
            print(exc, file=sys.stderr)
            sys.exit(3)
    """)
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_a_full_disk_fails_the_rebuild_and_keeps_the_old_catalog(root):
    build(root)
    before_bytes = (root / "catalog.duckdb").read_bytes()
    before = _answers(root / "catalog.duckdb")
    # the process may write at most 100 KB per file: the catalog's checkpoint cannot complete, as on a full disk
    limit = "import resource, signal; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); " \
            "resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))"
    proc = _run_builder(root, limit)
    assert proc.returncode == 3, proc.stderr
    assert "previous catalog is unchanged" in proc.stderr and "File too large" in proc.stderr
    assert (root / "catalog.duckdb").read_bytes() == before_bytes
    assert _answers(root / "catalog.duckdb") == before
    assert list((root / ".staging").iterdir()) == []


def test_an_unreadable_vectors_file_fails_the_rebuild_naming_it(root):
    build(root)
    before = (root / "catalog.duckdb").read_bytes()
    victim = sorted((root / "embeddings/fomo/vectors").glob("*/*.parquet"))[-1]
    victim.write_bytes(victim.read_bytes()[:200])  # e.g. a file truncated by hand or by a broken copy
    with pytest.raises(CatalogError, match=victim.name):
        build(root)
    assert (root / "catalog.duckdb").read_bytes() == before


def test_concurrent_builders_and_readers_never_see_a_broken_catalog(root):
    build(root)
    reader = textwrap.dedent(f"""
        import time
        from rs_embed_assets.catalog import connect_readonly
        errors, reads, t = 0, 0, time.time()
        while time.time() - t < 6:
            try:
                with connect_readonly({str(root / "catalog.duckdb")!r}) as con:
                    assert con.execute("SELECT count(*) FROM vectors").fetchall() == [({FOMO_ROWS},)]
                reads += 1
            except Exception as exc:
                errors += 1
                print(type(exc).__name__, exc)
        print("reads", reads, "errors", errors)
    """)
    builder = textwrap.dedent(f"""
        import os
        os.environ["RS_EMBED_ASSETS_MODELS"] = {",".join(MODELS)!r}
        from rs_embed_assets.catalog import build_catalog
        from rs_embed_assets.storage import Storage
        for _ in range(4):
            build_catalog(Storage({str(root)!r}))
    """)
    procs = [subprocess.Popen([sys.executable, "-c", builder], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    rd = subprocess.run([sys.executable, "-c", reader], cwd=REPO, capture_output=True, text=True, timeout=120)
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    assert rd.returncode == 0 and rd.stdout.strip().endswith("errors 0"), rd.stdout + rd.stderr
    assert _answers(root / "catalog.duckdb") == [("fomo", FOMO_ROWS)]
    assert list((root / ".staging").iterdir()) == []


# --- the `similar` command (issues 12.7, 13.5) --------------------------------------------------------
def test_similar_cli_prints_neighbours_for_either_month_spelling(root, capsys):
    from rs_embed_assets.cli import main

    build(root)
    with connect_readonly(root / "catalog.duckdb") as con:
        chip = first_chip(con)
    outs = []
    for month in ("2024-06", "2024-06-01"):
        assert main(["similar", "--data-root", str(root), "--chip", chip, "--month", month, "-k", "3"]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and len(outs[0].strip().splitlines()) == 3


@pytest.mark.parametrize("args, message", [
    (["--month", "2024-13"], "invalid month '2024-13'"),
    (["--month", "2024-06", "-k", "-1"], "k must be at least 1"),
    (["--month", "2024-06", "--model", "agrifm"], "unknown model 'agrifm'"),
    (["--month", "2024-08"], "has no fomo vector in 2024-08"),
    (["--month", "2024-06", "--chip", "nope"], "unknown chip 'nope'"),
])
def test_similar_cli_bad_input_exits_non_zero_with_a_message(root, capsys, args, message):
    from rs_embed_assets.cli import main

    build(root)
    with connect_readonly(root / "catalog.duckdb") as con:
        chip = first_chip(con)
    argv = ["similar", "--data-root", str(root), "--chip", chip, *args]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert message in captured.err and "Traceback" not in captured.err and captured.out == ""


def test_a_builder_killed_before_the_swap_leaves_the_old_catalog_and_the_next_build_cleans_up(root):
    build(root)
    before = (root / "catalog.duckdb").read_bytes()
    env = {**os.environ, "RS_EMBED_ASSETS_FAULT": "catalog:before"}
    code = (f"import os; os.environ['RS_EMBED_ASSETS_MODELS'] = {','.join(MODELS)!r}\n"
            "from rs_embed_assets.catalog import build_catalog\nfrom rs_embed_assets.storage import Storage\n"
            f"build_catalog(Storage({str(root)!r}))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, timeout=300)
    assert proc.returncode == -9
    assert (root / "catalog.duckdb").read_bytes() == before
    assert list((root / ".staging").glob("catalog.duckdb.*.tmp"))  # the killed builder's verified file
    build(root)
    assert list((root / ".staging").iterdir()) == []


def test_verification_refuses_a_catalog_that_does_not_hold_what_was_planned(root):
    from rs_embed_assets.catalog import plan_catalog, verify_catalog

    build(root)
    plan = plan_catalog(Storage(root), MODELS)
    plan.rows["fomo"] += 1  # e.g. a file that changed between planning and the verifying reopen
    with connect_readonly(root / "catalog.duckdb") as con:
        with pytest.raises(CatalogError, match=f"vectors_fomo has {FOMO_ROWS} rows, its files hold {FOMO_ROWS + 1}"):
            verify_catalog(con, plan)
