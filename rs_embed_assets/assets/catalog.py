"""catalog: the DuckDB file with views, provenance tables and SQL macros over all embeddings."""

import dagster as dg

from ..resources import CatalogResource, StorageResource
from ..settings import enabled_models

# duckdb, faiss and the STAC writer are imported inside the asset: the code location loads without them

# Rebuild whenever any partition of any upstream asset is newly materialised, even while other
# partitions are missing (eager() also requires `~any_deps_missing`, which a partitioned upstream
# almost never satisfies, so the catalog never rebuilt on its own); wait while upstream runs are in
# flight, so a backfill ends with one rebuild rather than one per run.
CATALOG_AUTOMATION = (
    dg.AutomationCondition.any_deps_match(dg.AutomationCondition.newly_updated()).since_last_handled()
    & ~dg.AutomationCondition.any_deps_in_progress()
    & ~dg.AutomationCondition.in_progress()
).with_label("rebuild after any upstream partition changes")

CATALOG_KEY = dg.AssetKey("catalog")
UPSTREAM = [dg.AssetKey(["embeddings", m]) for m in enabled_models()] + [dg.AssetKey("s2_composite"),
                                                                          dg.AssetKey("s1_composite")]


@dg.asset(
    key=CATALOG_KEY,
    deps=UPSTREAM,
    group_name="catalog",
    kinds={"duckdb"},
    owners=["team:data"],
    pool="duckdb_writer",
    automation_condition=CATALOG_AUTOMATION,
    check_specs=[dg.AssetCheckSpec("rows_match_manifests", asset=CATALOG_KEY,
                                   description="every committed partition's vector rows equal its manifest's rows, "
                                               "and every enabled model has a vectors view")],
    description=("catalog.duckdb: `vectors` / `vectors_<model>` views (embedding FLOAT[D], geometry; one per "
                 "enabled model, empty until it has rows), `manifest` (per-partition provenance from the "
                 "vectors files' footers), `composites` and `models` tables, and the macros "
                 "similar_chips(model, chip_id, month, k), nearest_to_vector(model, vec, k), "
                 "chip_timeseries(model, chip_id), chip_change(model, month_a, month_b). Paths are relative "
                 "to the data root; rebuilt atomically and verified before the swap; open it with "
                 "rs_embed_assets.catalog.connect_readonly. Also (re)builds the per-model search indexes "
                 "(index/<model>, faiss IVF + exact re-rank; `rs-embed-assets similar`) and the STAC catalog (stac/)."),
)
def catalog(context: dg.AssetExecutionContext, storage: StorageResource,
            catalog_db: CatalogResource) -> dg.MaterializeResult:
    from ..catalog import build_catalog, connect_readonly
    from ..search import build_indexes
    from ..stac_catalog import write_stac

    st = storage.get()
    db_path = catalog_db.db_path(st)
    models = enabled_models()
    summary = build_catalog(st, db_path, models=models)  # raises (and the old catalog stays) when anything fails
    context.log.info(f"catalog rebuilt: {summary['rows_per_model']} in {summary['seconds']} s")
    with connect_readonly(db_path) as con:
        check = rows_match_manifests(con, models)
    indexes = build_indexes(st, [m for m in summary["models"]], log=context.log.info)
    stac = write_stac(st)
    context.log.info(f"STAC: {stac['items']} items in {stac['seconds']} s")
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(summary["path"]),
            "rows_per_model": dg.MetadataValue.json(summary["rows_per_model"]),
            "partitions_per_model": dg.MetadataValue.json(summary["partitions"]),
            "dagster/row_count": sum(summary["rows_per_model"].values()),
            "manifest_rows": summary["manifest_rows"], "composite_rows": summary["composite_rows"],
            "fingerprint": summary["fingerprint"], "seconds": summary["seconds"],
            "search_indexes": dg.MetadataValue.json(
                {m: {k: r[k] for k in ("rows", "storage", "nlist", "rebuilt", "seconds")} for m, r in indexes.items()}),
            "stac": dg.MetadataValue.path(stac["path"]), "stac_items": stac["items"],
        },
        data_version=dg.DataVersion(summary["fingerprint"]),
        check_results=[check],
    )


def rows_match_manifests(con, models: list[str]) -> dg.AssetCheckResult:
    """Per partition: rows in the vectors file == rows its manifest records; a view per enabled model."""
    bad = con.execute("""
        SELECT model, tile, strftime(month, '%Y-%m') AS month, rows, file_rows FROM manifest
        WHERE rows IS DISTINCT FROM file_rows ORDER BY ALL""").fetchall()
    views = {r[0] for r in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()}
    missing = [m for m in models if f"vectors_{m}" not in views]
    partitions = con.execute("SELECT count(*) FROM manifest").fetchall()[0][0]
    return dg.AssetCheckResult(
        check_name="rows_match_manifests", asset_key=CATALOG_KEY, passed=not bad and not missing,
        metadata={"partitions_checked": partitions,
                  "mismatched_partitions": dg.MetadataValue.json(
                      [dict(zip(("model", "tile", "month", "manifest_rows", "file_rows"), r)) for r in bad[:50]]),
                  "models_without_view": dg.MetadataValue.json(missing)},
    )


@dg.asset_check(asset=CATALOG_KEY, name="current", additional_deps=UPSTREAM,
                description="The catalog describes the committed partitions as they are now; fails (warn) "
                            "while partitions changed since the last rebuild.",
                # evaluated whenever an upstream partition lands, so a catalog that lags shows it at once
                automation_condition=dg.AutomationCondition.any_deps_match(dg.AutomationCondition.newly_updated()))
def catalog_current(storage: StorageResource, catalog_db: CatalogResource) -> dg.AssetCheckResult:
    from ..catalog import catalog_status

    st = storage.get()
    status = catalog_status(st, catalog_db.db_path(st), enabled_models())
    return dg.AssetCheckResult(passed=status["current"], severity=dg.AssetCheckSeverity.WARN,
                               description=f"catalog is {'current' if status['current'] else 'stale'}: "
                                           f"{status['reason']}",
                               metadata={"files_fingerprint": status["fingerprint"],
                                         "catalog_fingerprint": status.get("built_fingerprint") or ""})
