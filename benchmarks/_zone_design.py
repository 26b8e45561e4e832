"""The global partition design of docs/scale.md, as a code location for bench_backfill.py (simulation).

Same graph shape as rs_embed_assets (s2/s1 composites, one embedding asset per model, AgriFM reading
8 months of composites, the same backfill policy) but the spatial dimension holds MGRS grid-zone
squares ("31U"): one partition = every land tile of a grid-zone square for one month, with per-tile
manifests inside. Every asset carries the same partitioned check as in the real graph (their planned
rows are a large part of run creation). Bodies are no-ops: only planning is measured with it.
"""

import warnings

import dagster as dg

import adapters
from rs_embed_assets.assets.composites import BACKFILL
from rs_embed_assets.assets.lineage import partition_check_spec
from rs_embed_assets.partitions import MONTHS

warnings.filterwarnings("ignore", category=dg.BetaWarning)

ZONES = dg.DynamicPartitionsDefinition(name="zones")
ZONE_MONTH = dg.MultiPartitionsDefinition({"month": MONTHS, "zone": ZONES})


def _composite(sensor: str) -> dg.AssetsDefinition:
    key = dg.AssetKey(f"{sensor}_composite")

    @dg.asset(name=f"{sensor}_composite", partitions_def=ZONE_MONTH, backfill_policy=BACKFILL,
              check_specs=[partition_check_spec("values_plausible", key, ZONE_MONTH, "as in the real graph")])
    def _a(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        return dg.MaterializeResult()

    return _a


def _embedding(model_id: str) -> dg.AssetsDefinition:
    spec = adapters.get_spec(model_id)
    upstream = dg.AssetKey(f"{spec.sensor}_composite")
    frames = spec.configured_frames()
    dep = dg.AssetDep(upstream) if frames == 1 else dg.AssetDep(upstream, partition_mapping=dg.MultiPartitionMapping({
        "month": dg.DimensionPartitionMapping("month", dg.TimeWindowPartitionMapping(
            start_offset=-(frames - 1), end_offset=0, allow_nonexistent_upstream_partitions=True)),
        "zone": dg.DimensionPartitionMapping("zone", dg.IdentityPartitionMapping())}))

    key = dg.AssetKey(["embeddings", model_id])

    @dg.asset(key=key, partitions_def=ZONE_MONTH, deps=[dep], backfill_policy=BACKFILL,
              check_specs=[partition_check_spec("vectors_complete_and_finite", key, ZONE_MONTH, "as in the real graph")])
    def _a(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        return dg.MaterializeResult()

    return _a


defs = dg.Definitions(assets=[_composite("s2"), _composite("s1"), *[_embedding(m) for m in adapters.list_models()]])
