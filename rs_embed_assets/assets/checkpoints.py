"""checkpoint/<id>: the published weights of each model, resolved, verified and fingerprinted."""

import dagster as dg

import adapters

from ..materialize import checkpoint_ids, materialize_checkpoint
from ..resources import CheckpointPolicyResource, StorageResource


def build_checkpoint_asset(checkpoint_id: str, model_id: str) -> dg.AssetsDefinition:
    spec = adapters.get_spec(model_id)
    src = spec.checkpoint
    where = f"Hugging Face `{src.hf_repo}`" if src.hf_repo else f"URL (`{src.env_prefix}_CKPT_URL`)"

    @dg.asset(
        key=["checkpoint", checkpoint_id],
        group_name="checkpoints",
        kinds={"pytorch"},
        owners=["team:ml"],
        tags={"model": checkpoint_id},
        description=(f"Published weights `{src.filename}` for {checkpoint_id}. Resolved from `{src.env_prefix}_CKPT`, "
                     f"the cache, or {where}; verified by a strict load. Data version = sha256 of the file."),
    )
    def _checkpoint(context: dg.AssetExecutionContext, storage: StorageResource,
                    checkpoint_policy: CheckpointPolicyResource) -> dg.MaterializeResult:
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
