"""A checkpoint overwritten in place after it was recorded is refused, and checkpoint/<id> shows stale.

The issue's reproduction: embeddings used the new weights and recorded the old sha256; nothing
turned stale. Now the load hashes the file against its record, the run fails naming the file and
the fix, the `file_matches_record` check fails, and the observed file version marks the checkpoint
stale in Dagster's own staleness resolver (what the UI shows).
"""

import dagster as dg
import pytest
from dagster._utils.test.data_versions import get_stale_status_resolver

import adapters
from rs_embed_assets import resources as resources_module
from rs_embed_assets.assets.checkpoints import (build_checkpoint_asset, build_checkpoint_check,
                                                build_checkpoint_file_source)
from rs_embed_assets.assets.composites import composite_assets
from rs_embed_assets.assets.embeddings import build_embedding_asset
from rs_embed_assets.partitions import TILES, make_key
from rs_embed_assets.resources import (CheckpointPolicyResource, ModelResource, ProviderResource,
                                       StorageResource)
from rs_embed_assets.storage import Storage

TILE, MONTH = "31UFU-k36-r21-c12", "2024-06"
CKPT, FILE = dg.AssetKey(["checkpoint", "fomo"]), dg.AssetKey(["checkpoint_file", "fomo"])
FOMO = dg.AssetKey(["embeddings", "fomo"])


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("RS_EMBED_FOMO_DEPTH", "1")
    for name in ("RS_EMBED_FOMO_CKPT", "RS_EMBED_FOMO_CKPT_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RS_EMBED_FOMO_AUTO_DOWNLOAD", "0")
    monkeypatch.setenv("RS_EMBED_FOMO_CACHE_DIR", str(tmp_path / "cache"))
    resources_module._MODEL_CACHE.clear()  # a model loaded by an earlier test must not hide this load
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(TILES.name, [TILE])
    assets = [build_checkpoint_file_source("fomo", "fomo"), build_checkpoint_asset("fomo", "fomo"),
              build_checkpoint_check("fomo"), *composite_assets, build_embedding_asset("fomo")]
    res = {"storage": StorageResource(root=str(tmp_path / "data")), "provider": ProviderResource(kind="sample"),
           "checkpoint_policy": CheckpointPolicyResource(allow_random_init=True),
           "model_fomo": ModelResource(model_id="fomo", device="cpu", batch_size=8)}
    yield instance, assets, res, Storage(tmp_path / "data")
    resources_module._MODEL_CACHE.clear()


def _status(instance, assets, key):
    resolver = get_stale_status_resolver(instance, [a for a in assets if not isinstance(a, dg.AssetChecksDefinition)])
    return resolver.get_status(key).value


def test_overwritten_checkpoint_is_refused_and_shows_stale(env):
    instance, assets, res, storage = env
    key = str(make_key(TILE, MONTH))
    # the weights file is observed in the checkpoint's own run, then recorded
    first = dg.materialize(assets, selection=[FILE, CKPT], instance=instance, resources=res)
    assert all(e.passed for e in first.get_asset_check_evaluations())
    assert dg.materialize(assets, selection=[dg.AssetKey("s2_composite")], instance=instance, resources=res,
                          partition_key=key).success
    assert _status(instance, assets, CKPT) == "FRESH"

    record = storage.read_json(storage.checkpoint_record("fomo"))
    adapters.get_adapter_class("fomo").write_random_checkpoint(record["path"], seed=1)  # overwritten in place

    run = dg.materialize(assets, selection=[FOMO], instance=instance, resources=res, partition_key=key,
                         raise_on_error=False)
    assert not run.success
    failure = next(e for e in run.all_events if e.is_step_failure).event_specific_data.error.cause
    assert "changed after it was recorded" in failure.message and "re-materialise checkpoint/fomo" in failure.message
    assert not storage.vectors_path("fomo", TILE, MONTH).exists(), "nothing was embedded from unrecorded weights"
    assert _status(instance, assets, CKPT) == "STALE"

    check = dg.materialize(assets, selection=dg.AssetSelection.checks_for_assets(CKPT), instance=instance,
                           resources=res)
    assert [e.passed for e in check.get_asset_check_evaluations()] == [False]

    # re-materialising records the new file: fresh again, and the embeddings run
    assert dg.materialize(assets, selection=[FILE, CKPT], instance=instance, resources=res).success
    assert _status(instance, assets, CKPT) == "FRESH"
    assert dg.materialize(assets, selection=[FOMO], instance=instance, resources=res, partition_key=key).success
