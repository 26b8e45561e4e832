"""The Dagster code location: assets, resources, sensors and jobs of the embedding catalog."""

import dagster as dg

from .assets.catalog import catalog, catalog_current
from .assets.checkpoints import checkpoint_assets, checkpoint_checks
from .assets.composites import composite_assets
from .assets.embeddings import embedding_assets
from .automation import (aoi_tiles_sensor, catalog_automation, monthly_automation, pool_slots_sensor,
                         tile_keys_sensor)
from .resources import default_resources
from . import routing

partitioned_selection = dg.AssetSelection.groups("composites", "embeddings")

embed_job = dg.define_asset_job(
    "embed_tiles",
    selection=partitioned_selection,
    description="Composites and embeddings for a tile×month selection (what a UI backfill runs).",
)

defs = dg.Definitions(
    assets=[*checkpoint_assets, *composite_assets, *embedding_assets, catalog],
    asset_checks=[catalog_current, *checkpoint_checks],
    jobs=[embed_job],
    sensors=[aoi_tiles_sensor, tile_keys_sensor, pool_slots_sensor, monthly_automation, catalog_automation],
    resources=default_resources(),
    executor=routing.executor(),  # RS_EMBED_ASSETS_EXECUTOR: in_process (default), multiprocess, celery
)
