"""embeddings/<model>: one asset per model over tile × month, from one factory.

Each run batches all its partitions on one loaded model (``context.partition_keys``), writes
Parquet vectors + a zarr grid + a manifest per partition, and takes a slot of the ``gpu`` pool.
"""

import dagster as dg

import adapters

from .. import routing
from ..automation import embedding_condition
from ..embedding import code_version
from ..partitions import BATCH_POLICY, TILE_MONTH, split_key
from .lineage import embedding_partition_metadata, partition_check_events, partition_check_spec, vectors_column_schema
from ..resources import model_resource_key
from ..settings import enabled_models
from .checkpoints import checkpoint_file_observation
from .ranges import completed_partitions

BACKFILL = BATCH_POLICY  # one policy for composites and embeddings, so they share runs (partitions.py)


def _frames(model_id: str) -> int:
    """Frames per sample as configured (e.g. RS_EMBED_AGRIFM_FRAMES), 1 for single-date models."""
    return adapters.get_spec(model_id).configured_frames()


def _composite_dep(model_id: str) -> dg.AssetDep:
    spec = adapters.get_spec(model_id)
    upstream = dg.AssetKey(f"{spec.sensor}_composite")
    frames = _frames(model_id)
    if frames == 1:
        return dg.AssetDep(upstream)
    # temporal models read months M-(frames-1) … M of the same tile
    return dg.AssetDep(upstream, partition_mapping=dg.MultiPartitionMapping({
        "month": dg.DimensionPartitionMapping("month", dg.TimeWindowPartitionMapping(
            start_offset=-(frames - 1), end_offset=0, allow_nonexistent_upstream_partitions=True)),
        "tile": dg.DimensionPartitionMapping("tile", dg.IdentityPartitionMapping()),
    }))


def build_embedding_asset(model_id: str) -> dg.AssetsDefinition:
    spec = adapters.get_spec(model_id)
    key = dg.AssetKey(["embeddings", model_id])
    ckpt_key = dg.AssetKey(["checkpoint", spec.checkpoint_id])
    check = partition_check_spec("vectors_complete_and_finite", key, TILE_MONTH,
                                 "Every chip of the lattice is counted; every embedded chip has one finite, non-zero, "
                                 "non-constant vector of the model's dimension and the valid fraction its composite "
                                 "says. Evaluated per partition.")
    frames = _frames(model_id)
    frames_note = (f" Each partition uses the {frames} monthly composites M-{frames - 1} … M of its tile; a missing "
                   "or empty month is replaced by the nearest month of the window that has data."
                   if frames > 1 else "")

    @dg.asset(
        key=key,
        partitions_def=TILE_MONTH,
        deps=[dg.AssetDep(ckpt_key), _composite_dep(model_id)],
        backfill_policy=BACKFILL,
        pool="gpu",
        op_tags=routing.embedding_op_tags(),
        group_name="embeddings",
        kinds={"pytorch", "parquet", "zarr"},
        owners=["team:ml"],
        tags={"model": model_id, "sensor": spec.sensor},
        code_version=code_version(model_id),
        check_specs=[check],
        required_resource_keys={"storage", model_resource_key(model_id)},
        automation_condition=embedding_condition(model_id, ckpt_key, spec.chip_size),
        description=(f"{spec.description} Chips of {spec.chip_size} px from {spec.sensor}_composite "
                     f"({', '.join(spec.bands)}); pooled {spec.embed_dim}-d vectors per chip in Parquet, grids "
                     f"({spec.embed_dim}, {spec.grid_size}×{spec.grid_size} per chip, {spec.grid_resolution_m:g} m cells) "
                     f"stitched per tile in zarr.{frames_note}"),
        metadata={"dagster/column_schema": vectors_column_schema(spec.embed_dim), "embed_dim": spec.embed_dim,
                  "chip_size_px": spec.chip_size, "bands": list(spec.bands), "grid_cell_m": spec.grid_resolution_m,
                  "checkpoint_file": spec.checkpoint.filename},
    )
    def _embeddings(context: dg.AssetExecutionContext):
        from ..materialize import materialize_embeddings  # xarray/zarr: imported by the step, not the code location

        storage = context.resources.storage.get()
        model_res = getattr(context.resources, model_resource_key(model_id))
        try:
            adapter, checkpoint = model_res.load(storage)
        except Exception as exc:
            from adapters.checkpoints import CheckpointChangedError

            if isinstance(exc, CheckpointChangedError):  # the weights changed on disk: checkpoint/<id> shows stale
                context.log_event(checkpoint_file_observation(spec.checkpoint_id, exc))
            raise
        if checkpoint["random_init"]:
            context.log.warning(f"{model_id}: checkpoint is RANDOM-INIT demo weights; embeddings are not meaningful")
        manifests = {}
        with completed_partitions(context) as done:  # a failure part-way records the partitions committed before it
            for pkey in context.partition_keys:
                tile, month = split_key(pkey)
                m = materialize_embeddings(storage, adapter, tile, month, checkpoint, model_res.settings(),
                                           log_fn=context.log.debug)
                manifests[pkey] = m
                context.log.info(f"{model_id} {tile} {month}: {m['rows']} chips in {m['seconds']} s "
                                 f"({m['chips_per_s']} chips/s) frames={m['frame_months']}")
                done[pkey] = embedding_partition_metadata(storage, m, log=context.log)
                context.add_asset_metadata(done[pkey], partition_key=pkey)
        # only what every partition of the run shares goes to the run-wide part
        yield dg.MaterializeResult(metadata={"checkpoint_source": str(checkpoint["source_uri"])})
        yield from partition_check_events(context, key, {
            pkey: [_check(storage, model_id, m, spec.embed_dim)] for pkey, m in manifests.items()})

    return _embeddings


def _check(storage, model_id: str, manifest: dict, dim: int) -> dg.AssetCheckResult:
    """One partition's check (finite, non-zero, non-constant vectors; counts; valid fractions)."""
    from ..checks import partition_problems

    problems = partition_problems(storage, model_id, manifest, dim)
    return dg.AssetCheckResult(check_name="vectors_complete_and_finite", passed=not problems,
                               metadata={"rows": int(manifest.get("rows", 0)),
                                         "problems": "; ".join(problems) or "none"})


embedding_assets = [build_embedding_asset(m) for m in enabled_models()]
