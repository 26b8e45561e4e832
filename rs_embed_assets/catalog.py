"""The DuckDB catalog over the Parquet vectors and JSON manifests.

``build_catalog`` (run by the single-writer ``catalog`` asset) creates in ``catalog.duckdb``:

- ``vectors_<model>`` views and a ``vectors`` view over all models: one row per chip, with
  ``embedding FLOAT[D]`` (cast from the Parquet fixed-size list) and ``geometry`` as GEOMETRY;
- ``manifest`` table: per-partition provenance (checkpoint sha256, composite version,
  preprocessing hash, code version, counts, timings), also for partitions with zero rows;
- ``composites`` table: per tile-month composite status, valid fraction, provider and version;
- macros ``similar_chips(model, chip_id, month, k)``, ``nearest_to_vector(model, vec, k)``
  and ``chip_timeseries(model, chip_id)``.

Readers open the file read-only (``connect_readonly``) so they never block the writer.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import duckdb

import adapters

from .embedding import vectors_schema
from .storage import Storage


def _files(root: Path, pattern: str) -> str | None:
    """``root/pattern`` as a quoted SQL glob when it matches at least one file, else None."""
    return str(root / pattern).replace("'", "''") if any(root.glob(pattern)) else None


def build_catalog(storage: Storage, db_path: Path | None = None) -> dict[str, Any]:
    """(Re)create views, tables and macros in a new file that replaces ``db_path`` atomically."""
    t0 = time.perf_counter()
    db_path = Path(db_path) if db_path else storage.catalog_path
    db_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = db_path.with_name(f".{db_path.name}.tmp")
    if tmp.exists():
        tmp.unlink()
    con = duckdb.connect(str(tmp))
    try:
        counts: dict[str, int] = {}
        views = []
        for model in adapters.list_models():
            vectors = _files(storage.root / "embeddings" / model / "vectors", "*/*.parquet")
            if vectors is None:
                continue
            dim = adapters.get_spec(model).embed_dim
            con.execute(f"""
                CREATE VIEW vectors_{model} AS
                SELECT * REPLACE (embedding::FLOAT[{dim}] AS embedding, geometry::GEOMETRY AS geometry)
                FROM read_parquet('{vectors}', hive_partitioning=false)""")
            counts[model] = con.execute(f"SELECT count(*) FROM vectors_{model}").fetchone()[0]
            views.append(model)
        union = " UNION ALL BY NAME ".join(
            f"SELECT * REPLACE (embedding::FLOAT[] AS embedding) FROM vectors_{m}" for m in views)
        if union:
            con.execute(f"CREATE VIEW vectors AS {union}")
        else:  # before the first embeddings: an empty table with the vectors schema keeps views and macros valid
            con.register("_no_vectors", vectors_schema(1).empty_table())
            con.execute("CREATE TABLE vectors AS SELECT * REPLACE (embedding::FLOAT[] AS embedding, "
                        "geometry::GEOMETRY AS geometry) FROM _no_vectors")
            con.unregister("_no_vectors")

        manifests = _files(storage.root / "embeddings", "*/vectors/*/*.parquet")
        if manifests:  # the manifest of each committed partition lives in its vectors file's footer
            con.execute(f"""
                CREATE TABLE manifest AS
                WITH kv AS (SELECT decode(value) AS j FROM parquet_kv_metadata('{manifests}')
                            WHERE decode(key) = 'rs_embed_assets')
                SELECT j->>'model' AS model, j->>'tile' AS tile, j->>'month' AS month, (j->>'rows')::BIGINT AS rows,
                       j->>'checkpoint_sha256' AS checkpoint_sha256,
                       (j->>'checkpoint_random_init')::BOOLEAN AS checkpoint_random_init,
                       j->>'checkpoint_source' AS checkpoint_source, j->>'composite_version' AS composite_version,
                       j->>'preprocessing_hash' AS preprocessing_hash, j->>'code_version' AS code_version,
                       j->>'provider' AS provider, (j->>'synthetic')::BOOLEAN AS synthetic, j->>'device' AS device,
                       j->>'dtype' AS dtype, (j->>'chips_total')::BIGINT AS chips_total,
                       (j->>'chips_embedded')::BIGINT AS chips_embedded, (j->>'chips_skipped')::BIGINT AS chips_skipped,
                       (j->>'seconds')::DOUBLE AS seconds, (j->>'chips_per_s')::DOUBLE AS chips_per_s,
                       (j->'frame_months')::VARCHAR[] AS frame_months, (j->>'distinct_frames')::INTEGER AS distinct_frames,
                       j->>'vectors_path' AS vectors_path, j->>'grid_path' AS grid_path
                FROM kv""")
        else:
            con.execute("CREATE TABLE manifest (model VARCHAR, tile VARCHAR, month VARCHAR, rows BIGINT)")
        composites = _files(storage.root / "composites", "*/*/*.json")
        if composites:
            con.execute(f"""
                CREATE TABLE composites AS
                SELECT sensor, tile, month::VARCHAR AS month, status, valid_fraction, scene_count, provider,
                       synthetic, data_version, store AS path
                FROM read_json_auto('{composites}', union_by_name=true)""")
        else:
            con.execute("CREATE TABLE composites (sensor VARCHAR, tile VARCHAR, month VARCHAR, status VARCHAR)")

        con.execute("""
            CREATE MACRO similar_chips(m, query_chip, query_month, k) AS TABLE
            WITH q AS (SELECT embedding FROM vectors
                       WHERE model = m AND chip_id = query_chip AND month = query_month::DATE LIMIT 1)
            SELECT v.chip_id, v.tile, v.month, v.center_lon, v.center_lat, v.valid_fraction,
                   list_cosine_similarity(v.embedding, q.embedding) AS similarity
            FROM vectors v, q
            WHERE v.model = m AND NOT (v.chip_id = query_chip AND v.month = query_month::DATE)
            ORDER BY similarity DESC LIMIT k""")
        con.execute("""
            CREATE MACRO nearest_to_vector(m, vec, k) AS TABLE
            SELECT v.chip_id, v.tile, v.month, v.center_lon, v.center_lat,
                   list_cosine_similarity(v.embedding, vec::FLOAT[]) AS similarity
            FROM vectors v WHERE v.model = m ORDER BY similarity DESC LIMIT k""")
        con.execute("""
            CREATE MACRO chip_timeseries(m, query_chip) AS TABLE
            SELECT month, valid_fraction, embedding FROM vectors
            WHERE model = m AND chip_id = query_chip ORDER BY month""")
        n_manifest = con.execute("SELECT count(*) FROM manifest").fetchone()[0]
        n_composites = con.execute("SELECT count(*) FROM composites").fetchone()[0]
    finally:
        con.close()
    # the catalog only holds views/macros/small tables: rebuilding and swapping it is atomic and cheap
    tmp.replace(db_path)
    wal = tmp.with_name(tmp.name + ".wal")
    if wal.exists():
        wal.unlink()
    return {"rows_per_model": counts, "models": views, "manifest_rows": n_manifest,
            "composite_rows": n_composites, "seconds": round(time.perf_counter() - t0, 3),
            "path": str(db_path)}


def connect_readonly(path: str | Path) -> duckdb.DuckDBPyConnection:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; materialise the `catalog` asset first")
    return duckdb.connect(str(path), read_only=True)


def similar_chips(path: str | Path, model: str, chip_id: str, month: str, k: int = 5) -> list[tuple]:
    with connect_readonly(path) as con:
        return con.execute("SELECT * FROM similar_chips(?, ?, ?, ?)", [model, chip_id, f"{month}-01", k]).fetchall()

