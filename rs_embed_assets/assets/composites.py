"""s2_composite / s1_composite: one monthly composite per tile, written as zarr."""

import dagster as dg

from .. import routing
from ..composite import SENSORS
from ..materialize import materialize_composite
from ..partitions import TILE_MONTH, split_key
from ..resources import ProviderResource, StorageResource

BACKFILL = dg.BackfillPolicy.multi_run(max_partitions_per_run=16)
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
        automation_condition=dg.AutomationCondition.on_cron(MONTHLY_CRON),
        description=(f"Monthly {sensor.upper()} composite per tile on the tile's UTM grid at 10 m: "
                     f"{', '.join(spec.bands)} ({spec.units}) and a per-pixel valid-observation count. "
                     "Stored at composites/{sensor}/<tile>/<YYYY-MM>.zarr."),
        metadata={"bands": list(spec.bands), "units": spec.units},
    )
    def _composite(context: dg.AssetExecutionContext, storage: StorageResource,
                   provider: ProviderResource) -> dg.MaterializeResult:
        st, prov = storage.get(), provider.get()
        summaries = []
        for key in context.partition_keys:
            tile, month = split_key(key)
            s = materialize_composite(st, prov, sensor, tile, month)
            context.log.info(f"{sensor} {tile} {month}: status={s['status']} valid={s['valid_fraction']} "
                             f"version={s['data_version']} ({s['fetch_seconds']} s)")
            summaries.append(s)
        return dg.MaterializeResult(metadata=_summary_metadata(summaries, prov.describe()))

    return _composite


def _summary_metadata(summaries: list[dict], provider_info: dict) -> dict:
    md: dict = {
        "partitions": len(summaries),
        "provider": provider_info.get("provider", ""),
        "provider_config": dg.MetadataValue.json(provider_info),
        "synthetic": any(s["synthetic"] for s in summaries),
        "empty_partitions": sum(s["status"] == "empty" for s in summaries),
        "mean_valid_fraction": round(sum(s["valid_fraction"] for s in summaries) / max(1, len(summaries)), 4),
        "fetch_seconds": round(sum(s["fetch_seconds"] for s in summaries), 3),
    }
    if len(summaries) == 1:
        s = summaries[0]
        md.update({"data_version": s["data_version"], "path": dg.MetadataValue.path(s["path"]),
                   "status": s["status"], "valid_fraction": s["valid_fraction"], "shape": str(s["shape"]),
                   "crs": s["crs"]})
    else:
        md["per_partition"] = dg.MetadataValue.md(
            "| tile | month | status | valid | version |\n|---|---|---|---|---|\n" + "\n".join(
                f"| {s['tile']} | {s['month']} | {s['status']} | {s['valid_fraction']} | {s['data_version']} |"
                for s in summaries))
    return md


composite_assets = [build_composite_asset(s) for s in SENSORS]
