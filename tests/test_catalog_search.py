"""Search: the faiss IVF index with exact re-rank agrees with exact SQL, honours filters; int8 storage."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from catalog_data import MODELS, copy_root, shared_materialisation
from rs_embed_assets import search
from rs_embed_assets.catalog import build_catalog, connect_readonly
from rs_embed_assets.embedding import vectors_schema
from rs_embed_assets.storage import Storage


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    return shared_materialisation(tmp_path_factory)


def write_partition(storage: Storage, model: str, tile: str, month: str, vec: np.ndarray,
                    lonlat: np.ndarray) -> None:
    """A committed vectors file (rows + footer manifest), as an embedding partition writes it."""
    n, dim = vec.shape
    schema = vectors_schema(dim)
    cols = {name: pa.nulls(n, schema.field(name).type) for name in schema.names}
    cols.update(chip_id=pa.array([f"{tile}_64px_r{i // 100:03d}_c{i % 100:03d}" for i in range(n)]),
                model=pa.array([model] * n), tile=pa.array([tile] * n),
                month=pa.array([dt.date.fromisoformat(month + "-01")] * n, pa.date32()),
                center_lon=pa.array(lonlat[:, 0]), center_lat=pa.array(lonlat[:, 1]),
                valid_fraction=pa.array(np.ones(n, np.float32)),
                embedding=pa.FixedSizeListArray.from_arrays(pa.array(vec.ravel()), dim))
    table = pa.table(cols, schema=schema).replace_schema_metadata(
        {b"rs_embed_assets": json.dumps({"model": model, "tile": tile, "month": month, "rows": n}).encode()})
    path = storage.vectors_path(model, tile, month)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


@pytest.fixture(scope="module")
def clustered(tmp_path_factory):
    """6,000 clustered 64-d vectors in 3 tiles × 2 months, with chip centres spread over a degree."""
    storage = Storage(tmp_path_factory.mktemp("clustered") / "data")
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((40, 64)).astype(np.float32)
    for t in range(3):
        for month in ("2024-06", "2024-07"):
            vec = centres[rng.integers(0, 40, 1000)] + 0.3 * rng.standard_normal((1000, 64)).astype(np.float32)
            lonlat = np.column_stack([5 + t * 0.3 + rng.random(1000) * 0.3, 52 + rng.random(1000)])
            write_partition(storage, "fomo", f"T{t}", month, vec, lonlat)
    return storage


def exact_topk(storage: Storage, model: str, q: np.ndarray, k: int, mask=None) -> list[str]:
    _, mat = search.read_vectors(search._vectors_files(storage, model))
    rows, _ = search.read_vectors(search._vectors_files(storage, model))
    keys = [f"{c}|{m}" for c, m in zip(rows["chip_id"].to_pylist(), rows["month"].to_pylist())]
    sims = search.normalise(mat) @ (q / np.linalg.norm(q))
    if mask is not None:
        sims[~mask] = -np.inf
    return [keys[i] for i in np.argsort(-sims, kind="stable")[:k]]


def test_index_answers_like_the_exact_sql_macro(made, tmp_path):
    root = copy_root(made, tmp_path / "data")
    storage = Storage(root)
    build_catalog(storage, models=MODELS)
    rec = search.build_index(storage, "fomo")
    assert rec["rebuilt"] and rec["rows"] == 72 and search.build_index(storage, "fomo")["rebuilt"] is False
    with connect_readonly(storage.catalog_path) as con:
        chip = con.execute("SELECT chip_id FROM vectors_fomo ORDER BY chip_id LIMIT 1").fetchall()[0][0]
        sql = con.execute("SELECT chip_id, month, similarity FROM similar_chips('fomo', ?, '2024-06', 10)",
                          [chip]).fetchall()
    hits = search.similar(storage, "fomo", chip, "2024-06-01", 10)
    assert [(h.chip_id, h.month) for h in hits] == [(c, m) for c, m, _ in sql]
    np.testing.assert_allclose([h.similarity for h in hits], [s for *_, s in sql], atol=1e-5)


def test_ivf_recall_against_exact_search_with_filters(clustered):
    rec = search.build_index(clustered, "fomo", ivf_min_rows=1000, nprobe=4)
    assert rec["nlist"] >= 1
    idx = search.open_index(clustered, "fomo")
    assert idx.ivf is not None
    rows, _ = search.read_vectors(search._vectors_files(clustered, "fomo"))
    months = np.array([m.isoformat() for m in rows["month"].to_pylist()])
    lon = rows["center_lon"].to_numpy()
    rng = np.random.default_rng(1)
    recalls = []
    for qi in rng.choice(len(idx), 20, replace=False):
        q = idx.rows_of([qi])[0]
        mask = (months == "2024-07-01") & (lon >= 5.0) & (lon <= 5.6)
        got = idx.search(q, 10, months=["2024-07"], bbox=(5.0, 51.0, 5.6, 54.0))
        assert all(h.month == dt.date(2024, 7, 1) and 5.0 <= h.center_lon <= 5.6 for h in got)
        want = exact_topk(clustered, "fomo", q, 10, mask)
        recalls.append(len({f"{h.chip_id}|{h.month}" for h in got} & set(want)) / 10)
    assert np.mean(recalls) >= 0.95, recalls


def test_int8_storage_keeps_cosines_within_1e_4_and_the_same_answers(made, tmp_path):
    root = copy_root(made, tmp_path / "data")
    storage = Storage(root)
    _, mat = search.read_vectors(search._vectors_files(storage, "fomo"))
    unit = search.normalise(mat.copy())
    deq = search.dequantise_int8(*search.quantise_int8(unit))
    cos = np.sum(unit * deq, axis=1) / np.linalg.norm(deq, axis=1)
    assert float(np.max(1 - cos)) <= 1e-4
    f32 = search.build_index(storage, "fomo")
    i8 = search.build_index(storage, "fomo", storage_type="int8")
    assert i8["rebuilt"] and i8["storage"] == "int8" and f32["version"] != i8["version"]
    assert not (root / f32["version"]).exists()  # the previous version is removed after the commit
    idx = search.open_index(storage, "fomo")
    chip, month = str(idx.chip_id[0]), "2024-06"
    assert [h.chip_id for h in idx.similar(chip, month, 5)] == [h.chip_id for h in idx.similar(chip, month, 5, exact=True)]


def test_unknown_chip_month_or_stale_index_is_a_clear_error(made, tmp_path):
    root = copy_root(made, tmp_path / "data")
    storage = Storage(root)
    with pytest.raises(search.SearchError, match="no search index for model 'fomo'"):
        search.open_index(storage, "fomo")
    search.build_index(storage, "fomo")
    idx = search.open_index(storage, "fomo")
    chip = str(idx.chip_id[0])
    with pytest.raises(search.SearchError, match="unknown chip 'nope'"):
        idx.similar("nope", "2024-06")
    with pytest.raises(search.SearchError, match="has no fomo vector in 2024-09; it has: 2024-06, 2024-07"):
        idx.similar(chip, "2024-09")
    with pytest.raises(search.SearchError, match="k must be at least 1"):
        idx.similar(chip, "2024-06", 0)
    victim = sorted(search._vectors_files(storage, "fomo"))[0]
    victim.touch()
    import os
    os.utime(victim, ns=(victim.stat().st_atime_ns, victim.stat().st_mtime_ns + 10**9))
    with pytest.raises(search.SearchError, match="older than its vectors"):
        search.open_index(storage, "fomo")


def test_similar_cli_uses_the_index_and_honours_month_and_area_filters(made, tmp_path, capsys):
    from rs_embed_assets.cli import main

    root = copy_root(made, tmp_path / "data")
    storage = Storage(root)
    build_catalog(storage, models=MODELS)
    search.build_index(storage, "fomo")
    chip = str(search.open_index(storage, "fomo").chip_id[0])
    base = ["similar", "--data-root", str(root), "--chip", chip, "--month", "2024-06", "-k", "50"]
    assert main(base + ["--months", "2024-07", "--bbox", "5.0,52.0,5.06,53.0"]) == 0
    rows = [line.split("\t") for line in capsys.readouterr().out.strip().splitlines()]
    assert rows and all(r[2] == "2024-07-01" and float(r[3]) <= 5.06 for r in rows)
    assert main(base + ["--exact", "--months", "2024-07"]) == 2
    assert "need the search index" in capsys.readouterr().err
    assert main(base + ["--bbox", "5,52"]) == 2
    assert "min_lon,min_lat,max_lon,max_lat" in capsys.readouterr().err
    # the index and the SQL macro give the same neighbours
    assert main(base[:-1] + ["5"]) == 0
    fast = capsys.readouterr().out.splitlines()
    assert main(base[:-1] + ["5", "--exact"]) == 0
    exact = capsys.readouterr().out.splitlines()
    assert [r.split("\t")[:3] for r in fast] == [r.split("\t")[:3] for r in exact]


def test_the_index_is_reachable_from_sql(made, tmp_path):
    import duckdb

    root = copy_root(made, tmp_path / "data")
    storage = Storage(root)
    build_catalog(storage, models=MODELS)
    search.build_index(storage, "fomo")
    chip = str(search.open_index(storage, "fomo").chip_id[0])
    with connect_readonly(storage.catalog_path, search=True) as con:
        fast = con.execute("SELECT chip_id, month FROM (SELECT unnest(similar_chips_ann('fomo', ?, '2024-06', 5), "
                           "recursive := true))", [chip]).fetchall()
        exact = con.execute("SELECT chip_id, month FROM similar_chips('fomo', ?, '2024-06', 5)", [chip]).fetchall()
        assert fast == exact
        with pytest.raises(duckdb.Error, match="unknown chip 'nope'"):
            con.execute("SELECT similar_chips_ann('fomo', 'nope', '2024-06', 5)").fetchall()
