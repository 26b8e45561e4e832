"""catalog: the DuckDB file with views, provenance tables and SQL macros over all embeddings."""

import dagster as dg

from ..settings import enabled_models

from ..catalog import build_catalog
from ..resources import CatalogResource, StorageResource


@dg.asset(
    key="catalog",
    deps=[dg.AssetKey(["embeddings", m]) for m in enabled_models()]
    + [dg.AssetKey("s2_composite"), dg.AssetKey("s1_composite")],
    group_name="catalog",
    kinds={"duckdb"},
    owners=["team:data"],
    pool="duckdb_writer",
    automation_condition=dg.AutomationCondition.eager(),
    description=("catalog.duckdb: `vectors` / `vectors_<model>` views (embedding FLOAT[D], geometry), "
                 "`manifest` (per-partition provenance) and `composites` tables, and the macros "
                 "similar_chips(model, chip_id, month, k), nearest_to_vector(model, vec, k), "
                 "chip_timeseries(model, chip_id). Rebuilt atomically; open it read-only."),
)
def catalog(context: dg.AssetExecutionContext, storage: StorageResource,
            catalog_db: CatalogResource) -> dg.MaterializeResult:
    st = storage.get()
    summary = build_catalog(st, catalog_db.db_path(st))
    context.log.info(f"catalog rebuilt: {summary}")
    return dg.MaterializeResult(metadata={
        "path": dg.MetadataValue.path(summary["path"]),
        "rows_per_model": dg.MetadataValue.json(summary["rows_per_model"]),
        "dagster/row_count": sum(summary["rows_per_model"].values()),
        "manifest_rows": summary["manifest_rows"], "composite_rows": summary["composite_rows"],
        "seconds": summary["seconds"],
    })
