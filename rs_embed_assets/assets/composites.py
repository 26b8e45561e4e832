"""s2_composite / s1_composite: one monthly composite per tile, written as zarr."""

import dagster as dg

from .. import routing
from ..automation import composite_condition
from ..composite import SENSORS
from ..partitions import BATCH_POLICY, TILE_MONTH, split_key
from ..resources import ProviderResource, StorageResource
from .lineage import compact, composite_partition_metadata, partition_check_events, partition_check_spec
from .ranges import completed_partitions

BACKFILL = BATCH_POLICY  # one policy for composites and embeddings, so they share runs (partitions.py)
MONTHLY_CRON = "0 4 3 * *"  # 04:00 on the 3rd: the previous month is complete


def build_composite_asset(sensor: str) -> dg.AssetsDefinition:
    spec = SENSORS[sensor]

    @dg.asset(
        name=f"{sensor}_composite",
        partitions_def=TILE_MONTH,
        backfill_policy=BACKFILL,
        group_name="composites",
        kinds={"zarr", "xarray"},
        owners=["team:data"],
        pool="imagery",
        op_tags=routing.composite_op_tags(),
        automation_condition=composite_condition(MONTHLY_CRON),
        description=(f"Monthly {sensor.upper()} composite per tile on the tile's UTM grid at 10 m: "
                     f"{', '.join(spec.bands)} ({spec.units}) and a per-pixel valid-observation count. "
                     "Stored at composites/{sensor}/<tile>/<YYYY-MM>.zarr."),
        metadata={"bands": list(spec.bands), "units": spec.units},
        check_specs=[partition_check_spec(
            "values_plausible", dg.AssetKey(f"{sensor}_composite"), TILE_MONTH,
            "Read back verified: values in the sensor's physical range, data wherever there are observations "
            "(a lost chunk reads as fill values), nodata elsewhere, valid_fraction as the counts say.")],
    )
    def _composite(context: dg.AssetExecutionContext, storage: StorageResource, provider: ProviderResource):
        from ..materialize import materialize_composite  # numpy/xarray/zarr: imported by the step, not the code location

        st, prov = storage.get(), provider.get()
        with completed_partitions(context) as done:  # a failure part-way records the partitions committed before it
            for key in context.partition_keys:
                tile, month = split_key(key)
                s = materialize_composite(st, prov, sensor, tile, month)
                context.log.info(f"{sensor} {tile} {month}: status={s['status']} valid={s['valid_fraction']} "
                                 f"version={s['data_version']} ({s['fetch_seconds']} s)")
                done[key] = composite_partition_metadata(st, s, log=context.log)
                context.add_asset_metadata(done[key], partition_key=key)
        info = prov.describe()
        # what every partition of the run shares; the per-partition part is attached above
        yield dg.MaterializeResult(metadata={"provider": info.get("provider", ""), "provider_config": compact(info),
                                             "synthetic": bool(info.get("synthetic", False))})
        yield from partition_check_events(context, context.asset_key, {
            key: [_values_check(st, sensor, *split_key(key))] for key in done})

    return _composite


def _values_check(storage, sensor: str, tile: str, month: str) -> dg.AssetCheckResult:
    from ..checks import composite_partition_problems

    problems = composite_partition_problems(storage, sensor, tile, month)
    return dg.AssetCheckResult(check_name="values_plausible", passed=not problems,
                               metadata={"problems": "; ".join(problems) or "none"})


composite_assets = [build_composite_asset(s) for s in SENSORS]
