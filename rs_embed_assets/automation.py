"""Sensors and automation that explain themselves.

- ``aoi_tiles_sensor``     adds the tiles covering an AOI file as ``tiles`` partitions (default: stopped)
- ``tile_keys_sensor``     flags tile partitions whose key is not a tile, with the fix (default: running)
- ``monthly_automation``   declarative automation of composites and embeddings (default: stopped:
                           starting it is a decision to spend imagery quota and GPU time)
- ``catalog_automation``   rebuilds the catalog after embeddings change (default: running, CPU, seconds)
- ``pool_slots_sensor``    tells a run that waits for a pool slot held by a dead run so, in its own log
                           (default: running, read-only apart from those log lines; ``slots.py``)

Automation launches only what can succeed. Every asset's condition is ANDed with labelled
conditions that the UI shows in each evaluation (Automation tab → the asset → a tick):
"tile key is a valid tile", "checkpoint/<id> is materialised", "tile holds a <n> px chip of <model>".
A partition for which one of them is false is not requested, and the label says why.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from functools import lru_cache
from pathlib import Path

import dagster as dg

from .grid import AOI, TileError, canonical_tile_key, parse_tile_key, tiles_for_aoi
from .partitions import TILES, split_key
from .slots import report_blocked_runs

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
    default_status=dg.DefaultSensorStatus.STOPPED,
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


@dg.sensor(
    name="tile_keys_sensor",
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Checks every `tiles` partition key (e.g. one typed in the UI) and flags keys that are not tiles, "
                "with the command that removes them. It changes nothing itself.",
)
def tile_keys_sensor(context: dg.SensorEvaluationContext):
    keys = context.instance.get_dynamic_partitions(TILES.name)
    bad = {k: tile_key_problem(k) for k in keys}
    bad = {k: why for k, why in bad.items() if why}
    if not bad:
        return dg.SkipReason(f"all {len(keys)} tile keys are valid tiles")
    for key, why in bad.items():
        context.log.error(f"tile partition {key!r} is not a tile: {why}")
    listed = "; ".join(f"{k!r}: {why}" for k, why in list(bad.items())[:5])
    return dg.SkipReason(
        f"{len(bad)} of {len(keys)} tile partitions are not valid tiles and will never be materialised by "
        f"automation: {listed}{' …' if len(bad) > 5 else ''}. Remove them with "
        f"`rs-embed-assets tiles remove {' '.join(list(bad)[:5])}`.")


@dg.sensor(
    name="pool_slots_sensor",
    minimum_interval_seconds=5,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Finds runs waiting for a `gpu`, `imagery` or `duckdb_writer` slot held by a dead run (ended, or "
                "its process gone) and writes once into each waiting run's log who holds the slot, why that run "
                "is dead and when run monitoring frees the slot (and a line when it is free). It changes no run "
                "and no slot.",
)
def pool_slots_sensor(context: dg.SensorEvaluationContext):
    # runs in the code location, so `dagster dev` / `rs-embed-assets dev` run it with the daemon, no extra process;
    # the cursor remembers which (waiting run, holder) pairs were told, so nothing is repeated every tick
    try:
        reported = json.loads(context.cursor) if context.cursor else {}
    except json.JSONDecodeError:
        reported = {}
    state = report_blocked_runs(context.instance, reported if isinstance(reported, dict) else {})
    context.update_cursor(json.dumps(state, sort_keys=True))
    if not state:
        return dg.SkipReason("no run waits for a pool slot held by a dead run")
    return dg.SkipReason(f"{len(state)} run(s) wait for a pool slot held by a dead run; each run's log says which "
                         "and when it is freed")


@lru_cache(maxsize=4096)
def tile_key_problem(key: str) -> str | None:
    """Why ``key`` is not a usable tile key, or None when it is one."""
    try:
        parse_tile_key(key)
    except TileError as exc:
        try:  # a key Dagster holds in another spelling would split one tile's data in two
            canonical = canonical_tile_key(key)
        except TileError:
            return str(exc)
        return f"not the canonical spelling of tile {canonical!r}; remove it and add {canonical!r}"
    return None


@lru_cache(maxsize=65536)
def tile_owns_chips(tile_key: str, model_id: str) -> bool:
    """Whether the tile (or sub-tile) owns at least one chip of the model (see ``lattice``)."""
    import adapters

    from .lattice import owns_chips

    return owns_chips(parse_tile_key(tile_key), adapters.get_spec(model_id).chip_size)


class _PartitionFilter(dg.AutomationCondition):
    """True for the candidate partitions whose (tile, month) passes ``accept``; evaluated per tile."""

    def __init__(self, label: str):
        self._label = label

    @property
    def requires_cursor(self) -> bool:
        return False

    @property
    def description(self) -> str:
        return self._label

    @property
    def name(self) -> str:
        return self._label

    def get_label(self) -> str | None:
        return self._label

    def accept(self, tile: str) -> bool:
        raise NotImplementedError

    def evaluate(self, context):  # noqa: ANN001 - dagster's AutomationContext
        candidates = context.candidate_subset
        if candidates.is_empty:
            return dg.AutomationResult(context, candidates)
        keep = set()
        for pk in candidates.expensively_compute_partition_keys():
            if self.accept(split_key(pk)[0]):
                keep.add(pk)
        return dg.AutomationResult(context, candidates.compute_intersection_with_partition_keys(keep))


class ValidTile(_PartitionFilter):
    def __init__(self):
        super().__init__("tile key is a valid tile")

    def accept(self, tile: str) -> bool:
        return tile_key_problem(tile) is None


class TileHasChips(_PartitionFilter):
    def __init__(self, model_id: str, chip_size: int):
        super().__init__(f"tile holds a {chip_size} px chip of {model_id}")
        self.model_id = model_id

    def accept(self, tile: str) -> bool:
        return tile_key_problem(tile) is None and tile_owns_chips(tile, self.model_id)


def composite_condition(cron: str) -> dg.AutomationCondition:
    """The completed month of every valid tile, once, after the monthly cron tick."""
    return (dg.AutomationCondition.on_cron(cron) & ValidTile()).with_label("monthly, valid tiles only")


def embedding_condition(model_id: str, checkpoint_key: dg.AssetKey, chip_size: int) -> dg.AutomationCondition:
    """Eager, but only where the run can succeed: checkpoint built, tile valid and holding a chip."""
    checkpoint_ready = (~dg.AutomationCondition.any_deps_match(dg.AutomationCondition.missing())
                        .allow(dg.AssetSelection.assets(checkpoint_key))
                        ).with_label(f"{checkpoint_key.to_user_string()} is materialised")
    # the checkpoint first (cheap, and the UI then shows it false on every partition when it is missing),
    # the tile test last (it runs per partition, only on those eager would request)
    return (checkpoint_ready & dg.AutomationCondition.eager() & TileHasChips(model_id, chip_size)
            ).with_label(f"eager where {model_id} can run")


# Composites run on the monthly cron, embeddings eagerly after them. With emit_backfills the new
# month of every tile becomes ONE backfill, which the backfill policy then splits into runs.
# Custom conditions (ValidTile, TileHasChips) need the code server to evaluate them.
with warnings.catch_warnings():  # use_user_code_server is beta in 1.13: needed for the custom conditions
    warnings.simplefilter("ignore", dg.BetaWarning)
    monthly_automation = dg.AutomationConditionSensorDefinition(
        name="monthly_automation",
        target=dg.AssetSelection.groups("composites", "embeddings"),
        emit_backfills=True,
        use_user_code_server=True,
        minimum_interval_seconds=300,
        default_status=dg.DefaultSensorStatus.STOPPED,
        description=("Each completed month: composites for every valid tile, then the embeddings of every model whose "
                     "checkpoint is built and that has chips in the tile, as one backfill. Stopped by default: "
                     "starting it commits imagery quota and GPU time."),
    )

    catalog_automation = dg.AutomationConditionSensorDefinition(
        name="catalog_automation",
        target=dg.AssetSelection.groups("catalog"),
        emit_backfills=False,
        use_user_code_server=True,
        minimum_interval_seconds=60,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Rebuilds the DuckDB catalog after embeddings change (a CPU job of seconds), also after manual "
                    "backfills while monthly_automation is stopped.",
    )
