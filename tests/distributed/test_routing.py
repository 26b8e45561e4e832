"""Every asset carries the op tags that route its step: embeddings to GPU workers, composites to imagery."""

import json

import dagster as dg
import pytest

from rs_embed_assets import routing
from rs_embed_assets.routing import CELERY_QUEUE_TAG, K8S_CONFIG_TAG, RoutingError


def _shipped_op_tags() -> dict[dg.AssetKey, dict]:
    """Op tags of every asset of the shipped code location, by asset key."""
    from rs_embed_assets.definitions import defs

    out = {}
    for assets_def in defs.assets:
        if not isinstance(assets_def, dg.AssetsDefinition) or not assets_def.is_executable:
            continue  # source assets have no step to route
        for key in assets_def.keys:
            out[key] = dict(assets_def.op.tags)
    return out


def _k8s(tags: dict) -> dict:
    value = tags[K8S_CONFIG_TAG]
    return json.loads(value) if isinstance(value, str) else value


@pytest.fixture
def clean_env(monkeypatch):
    for name in ("GPU_QUEUE", "IMAGERY_QUEUE", "K8S_GPU_RESOURCE", "K8S_GPU_COUNT", "K8S_GPU_NODE_SELECTOR",
                 "K8S_GPU_TOLERATIONS", "K8S_GPU_RESOURCES"):
        monkeypatch.delenv(f"RS_EMBED_ASSETS_{name}", raising=False)
    return monkeypatch


def test_every_embedding_step_goes_to_the_gpu_queue_with_a_gpu_request(clean_env):
    tags = _shipped_op_tags()
    embeddings = [k for k in tags if k.path[0] == "embeddings"]
    assert len(embeddings) >= 6
    for key in embeddings:
        assert tags[key][CELERY_QUEUE_TAG] == "gpu", key
        k8s = _k8s(tags[key])
        assert k8s["container_config"]["resources"]["limits"] == {"nvidia.com/gpu": "1"}
        assert k8s["container_config"]["resources"]["requests"] == {"nvidia.com/gpu": "1"}
        assert k8s["pod_spec_config"]["tolerations"] == routing.DEFAULT_GPU_TOLERATIONS
        assert "node_selector" not in k8s["pod_spec_config"]


def test_every_composite_step_goes_to_the_imagery_queue_and_asks_for_no_gpu(clean_env):
    tags = _shipped_op_tags()
    composites = [k for k in tags if k.path[-1].endswith("_composite")]
    assert {k.to_user_string() for k in composites} == {"s2_composite", "s1_composite"}
    for key in composites:
        assert tags[key][CELERY_QUEUE_TAG] == "imagery"
        assert K8S_CONFIG_TAG not in tags[key]


def test_queue_names_and_gpu_pool_are_deployment_settings(clean_env):
    clean_env.setenv("RS_EMBED_ASSETS_GPU_QUEUE", "a100")
    clean_env.setenv("RS_EMBED_ASSETS_IMAGERY_QUEUE", "cpu-io")
    clean_env.setenv("RS_EMBED_ASSETS_K8S_GPU_COUNT", "2")
    clean_env.setenv("RS_EMBED_ASSETS_K8S_GPU_NODE_SELECTOR", '{"cloud.google.com/gke-accelerator": "nvidia-l4"}')
    clean_env.setenv("RS_EMBED_ASSETS_K8S_GPU_TOLERATIONS", '[{"key": "gpu", "operator": "Equal", "value": "yes"}]')
    clean_env.setenv("RS_EMBED_ASSETS_K8S_GPU_RESOURCES", '{"requests": {"memory": "24Gi"}}')
    from rs_embed_assets.assets.composites import build_composite_asset
    from rs_embed_assets.assets.embeddings import build_embedding_asset

    fomo = dict(build_embedding_asset("fomo").op.tags)
    assert fomo[CELERY_QUEUE_TAG] == "a100"
    k8s = _k8s(fomo)
    assert k8s["container_config"]["resources"] == {"limits": {"nvidia.com/gpu": "2"},
                                                    "requests": {"memory": "24Gi", "nvidia.com/gpu": "2"}}
    assert k8s["pod_spec_config"] == {"node_selector": {"cloud.google.com/gke-accelerator": "nvidia-l4"},
                                      "tolerations": [{"key": "gpu", "operator": "Equal", "value": "yes"}]}
    assert build_composite_asset("s2").op.tags[CELERY_QUEUE_TAG] == "cpu-io"


@pytest.mark.parametrize("name,value,message", [
    ("RS_EMBED_ASSETS_K8S_GPU_NODE_SELECTOR", "{pool: gpu}", "not valid JSON"),
    ("RS_EMBED_ASSETS_K8S_GPU_NODE_SELECTOR", '["gpu"]', "must be a JSON object"),
    ("RS_EMBED_ASSETS_K8S_GPU_TOLERATIONS", '{"key": "gpu"}', "must be a JSON list"),
    ("RS_EMBED_ASSETS_K8S_GPU_COUNT", "half", "whole number of GPUs"),
    ("RS_EMBED_ASSETS_GPU_QUEUE", "gpu queue", "not a usable queue name"),
])
def test_a_bad_setting_names_the_variable_and_the_fix(name, value, message):
    with pytest.raises(RoutingError, match=message) as err:
        routing.Routing.from_env({name: value})
    assert name in str(err.value)


def test_other_steps_use_the_default_queue_and_no_gpu():
    tags = _shipped_op_tags()
    others = [k for k in tags if k.path[0] != "embeddings" and not k.path[-1].endswith("_composite")]
    assert others, "checkpoints and the catalog exist"
    for key in others:
        assert CELERY_QUEUE_TAG not in tags[key] and K8S_CONFIG_TAG not in tags[key], key
