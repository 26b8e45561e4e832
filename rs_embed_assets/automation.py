"""Sensors and automation: new tiles from an AOI file, each new month as one backfill."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import dagster as dg

from .grid import AOI, TileError, tiles_for_aoi
from .partitions import TILES

AOI_FILE_ENV = "RS_EMBED_ASSETS_AOI_FILE"


def aoi_file_tiles(path: str | Path, default_k: int = 1) -> list[str]:
    """Tile keys for an AOI file; a GeoJSON top-level or feature property ``subtile_k`` sets k.

    GeoJSON (``.geojson``/``.json``) or any vector file GeoPandas reads (GeoPackage, Shapefile, GeoParquet).
    Bad content raises TileError with the reason.
    """
    path = Path(path)
    if path.suffix.lower() not in (".json", ".geojson"):
        return tiles_for_aoi(AOI.from_file(path), k=default_k)
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TileError(f"AOI file {path} is not valid GeoJSON ({exc})") from None
    if not isinstance(obj, dict):
        raise TileError(f"AOI file {path} holds a JSON {type(obj).__name__}, not a GeoJSON object; give a "
                        "FeatureCollection, Feature, Polygon or MultiPolygon")
    features = obj.get("features", []) if obj.get("type") == "FeatureCollection" else [obj]
    ks = [obj.get("subtile_k")] + [(f.get("properties") or {}).get("subtile_k") for f in features
                                   if isinstance(f, dict)]
    try:
        k = int(next((v for v in ks if v), default_k))
    except (TypeError, ValueError):
        raise TileError(f"AOI file {path}: subtile_k must be an integer") from None
    return tiles_for_aoi(AOI.from_geojson(obj), k=k)


@dg.sensor(
    name="aoi_tiles_sensor",
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description=(f"Watches the GeoJSON file named by {AOI_FILE_ENV} (default ./aoi.geojson) and adds the "
                 "Sentinel-2 tiles (or k×k sub-tiles, property `subtile_k`) that cover it as `tiles` partitions."),
)
def aoi_tiles_sensor(context: dg.SensorEvaluationContext):
    path = Path(os.environ.get(AOI_FILE_ENV, "aoi.geojson"))
    if not path.is_file():
        return dg.SkipReason(f"no AOI file at {path}; set {AOI_FILE_ENV} or add tiles with `rs-embed-assets tiles add`")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if context.cursor == digest:
        return dg.SkipReason("AOI file unchanged")
    try:
        keys = aoi_file_tiles(path, default_k=int(os.environ.get("RS_EMBED_ASSETS_SUBTILE_K", "1")))
    except Exception as exc:  # a bad AOI file is a skipped tick with the reason, never a failing sensor
        context.log.warning(f"AOI file {path} is not usable: {exc}")
        return dg.SkipReason(f"AOI file {path} is not usable: {exc}")
    existing = set(context.instance.get_dynamic_partitions(TILES.name))
    new = [k for k in keys if k not in existing]
    context.update_cursor(digest)
    if not new:
        return dg.SkipReason(f"all {len(keys)} tiles of the AOI are already partitions")
    context.log.info(f"adding {len(new)} tiles: {new[:10]}{'…' if len(new) > 10 else ''}")
    return dg.SensorResult(dynamic_partitions_requests=[TILES.build_add_request(new)])


# Composites carry AutomationCondition.on_cron (the latest month, once it is complete); embeddings
# and the catalog are eager. With emit_backfills the new month of every tile becomes ONE backfill,
# which the backfill policy then splits into runs, instead of one run per tile.
monthly_automation = dg.AutomationConditionSensorDefinition(
    name="monthly_automation",
    target=dg.AssetSelection.all(),
    emit_backfills=True,
    minimum_interval_seconds=300,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Each new month: composites for every tile, then all embeddings and the catalog, as one backfill.",
)
