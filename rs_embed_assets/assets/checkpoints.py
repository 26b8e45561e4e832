"""checkpoint/<id>: the published weights of each model, resolved, verified and fingerprinted."""

from pathlib import Path

import dagster as dg

import adapters

from adapters import CheckpointError

from ..resources import CheckpointPolicyResource, StorageResource
from ..settings import checkpoint_ids


def checkpoint_file_key(checkpoint_id: str) -> dg.AssetKey:
    return dg.AssetKey(["checkpoint_file", checkpoint_id])


def checkpoint_file_observation(checkpoint_id: str, exc) -> dg.AssetObservation:
    """What a reader found on disk when the recorded weights changed: makes checkpoint/<id> show stale."""
    return dg.AssetObservation(
        asset_key=checkpoint_file_key(checkpoint_id),
        tags={"dagster/data_version": exc.observed_sha256 or "absent"},
        metadata={"path": str(exc.path), "recorded_sha256": exc.recorded_sha256,
                  "observed_sha256": exc.observed_sha256 or "absent"})


def build_checkpoint_file_source(checkpoint_id: str, model_id: str) -> dg.SourceAsset:
    """checkpoint_file/<id>: the weights file on disk, observed by its sha256.

    Observing it (UI: "Observe", or automatically when an embedding run finds the file changed)
    after the file changed in place makes checkpoint/<id> — and so its embeddings — show stale.
    """
    source = adapters.get_spec(model_id).checkpoint

    @dg.observable_source_asset(
        key=checkpoint_file_key(checkpoint_id), group_name="checkpoints", required_resource_keys={"storage"},
        description=(f"The weights file checkpoint/{checkpoint_id} loads (the recorded one, else what "
                     f"`{source.env_prefix}_CKPT` or the cache resolve to offline); data version = its sha256."))
    def _file(context) -> dg.DataVersion:
        from adapters.checkpoints import resolve_checkpoint, sha256_file

        storage = context.resources.storage.get()
        record_path = storage.checkpoint_record(checkpoint_id)
        path = None
        if record_path.exists():
            path = Path(storage.read_json(record_path)["path"])
        else:
            try:
                path = resolve_checkpoint(source, model_key=checkpoint_id, allow_download=False).path
            except CheckpointError:
                pass
        if path is None or not path.is_file():
            return dg.DataVersion("absent")
        return dg.DataVersion(sha256_file(path))

    return _file


def build_checkpoint_check(checkpoint_id: str) -> dg.AssetChecksDefinition:
    @dg.asset_check(asset=dg.AssetKey(["checkpoint", checkpoint_id]), name="file_matches_record",
                    required_resource_keys={"storage"},
                    description="The weights file still has the sha256 recorded when the checkpoint was materialised.")
    def _check(context) -> dg.AssetCheckResult:
        from adapters.checkpoints import CheckpointChangedError, verify_sha256

        storage = context.resources.storage.get()
        record_path = storage.checkpoint_record(checkpoint_id)
        if not record_path.exists():
            return dg.AssetCheckResult(passed=False, metadata={"problem": "no record; materialise the checkpoint"})
        record = storage.read_json(record_path)
        try:
            verify_sha256(record["path"], record["sha256"], what=f"checkpoint/{checkpoint_id}",
                          fix=f"re-materialise checkpoint/{checkpoint_id}")
        except CheckpointChangedError as exc:
            context.op_execution_context.log_event(checkpoint_file_observation(checkpoint_id, exc))
            return dg.AssetCheckResult(passed=False, metadata={"problem": str(exc)})
        return dg.AssetCheckResult(passed=True, metadata={"sha256": record["sha256"]})

    return _check


def build_checkpoint_asset(checkpoint_id: str, model_id: str) -> dg.AssetsDefinition:
    spec = adapters.get_spec(model_id)
    src = spec.checkpoint
    where = f"Hugging Face `{src.hf_repo}`" if src.hf_repo else f"URL (`{src.env_prefix}_CKPT_URL`)"

    @dg.asset(
        key=["checkpoint", checkpoint_id],
        deps=[checkpoint_file_key(checkpoint_id)],
        group_name="checkpoints",
        kinds={"pytorch"},
        owners=["team:ml"],
        tags={"model": checkpoint_id},
        description=(f"Published weights `{src.filename}` for {checkpoint_id}. Resolved from `{src.env_prefix}_CKPT`, "
                     f"the cache, or {where}; verified by a strict load. Data version = sha256 of the file."),
    )
    def _checkpoint(context: dg.AssetExecutionContext, storage: StorageResource,
                    checkpoint_policy: CheckpointPolicyResource) -> dg.MaterializeResult:
        from ..materialize import materialize_checkpoint

        record = materialize_checkpoint(
            storage.get(), checkpoint_id, allow_random_init=checkpoint_policy.allow_random_init,
            allow_download=checkpoint_policy.allow_download, verify=checkpoint_policy.verify_strict_load,
            warn=context.log.warning)
        metadata = {k: v for k, v in record.items() if v is not None and k != "path"}
        metadata["path"] = dg.MetadataValue.path(record["path"])
        if record["random_init"]:
            metadata["WARNING"] = "RANDOM WEIGHTS (demo/test only): embeddings are not meaningful"
        return dg.MaterializeResult(metadata=metadata, data_version=dg.DataVersion(record["sha256"]))

    return _checkpoint


checkpoint_assets = [build_checkpoint_asset(cid, mid) for cid, mid in checkpoint_ids().items()]
# the weights files on disk (observed by sha256) and the check that the recorded file is unchanged
checkpoint_assets += [build_checkpoint_file_source(cid, mid) for cid, mid in checkpoint_ids().items()]
checkpoint_checks = [build_checkpoint_check(cid) for cid in checkpoint_ids()]
