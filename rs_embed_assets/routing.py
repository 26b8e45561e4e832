"""Where each step runs: the op tags that route steps to workers, from deployment settings.

One place decides routing for every executor Dagster ships:

- ``dagster-celery/queue`` — the dagster-celery executors send the step to that Celery queue
  (embedding steps -> ``gpu`` workers, composite steps -> ``imagery`` workers);
- ``dagster-k8s/config`` — the ``k8s_job_executor`` / ``celery_k8s_job_executor`` put the step in a
  pod with a GPU request, the GPU node pool's node selector and its tolerations.

Executors that do not know a tag ignore it (the in-process and multiprocess executors run every
step locally), so the tags are always present. Queue names and GPU resources are deployment
settings, read from the environment when the code location loads:

- ``RS_EMBED_ASSETS_GPU_QUEUE``: Celery queue of embedding steps (default ``gpu``);
- ``RS_EMBED_ASSETS_IMAGERY_QUEUE``: Celery queue of composite steps (default ``imagery``);
- ``RS_EMBED_ASSETS_K8S_GPU_RESOURCE``: extended resource name of a GPU (default ``nvidia.com/gpu``);
- ``RS_EMBED_ASSETS_K8S_GPU_COUNT``: GPUs requested per embedding step pod (default 1);
- ``RS_EMBED_ASSETS_K8S_GPU_NODE_SELECTOR``: JSON object, node selector of the GPU node pool (default none);
- ``RS_EMBED_ASSETS_K8S_GPU_TOLERATIONS``: JSON list, tolerations of the GPU node pool (default: tolerate the
  ``nvidia.com/gpu`` NoSchedule taint);
- ``RS_EMBED_ASSETS_K8S_GPU_RESOURCES``: JSON object merged into the container's ``resources`` (CPU/memory
  requests; default none).

Other steps (checkpoints, catalog) carry no queue tag and go to the executor's default queue
(``dagster`` for Celery).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any

CELERY_QUEUE_TAG = "dagster-celery/queue"
K8S_CONFIG_TAG = "dagster-k8s/config"

_QUEUE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,199}$")
DEFAULT_GPU_TOLERATIONS = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


class RoutingError(ValueError):
    """A routing setting that cannot be used; the message names the variable and the fix."""


@dataclass(frozen=True)
class Routing:
    gpu_queue: str = "gpu"
    imagery_queue: str = "imagery"
    gpu_resource: str = "nvidia.com/gpu"
    gpu_count: int = 1
    gpu_node_selector: dict[str, str] = field(default_factory=dict)
    gpu_tolerations: list[dict[str, Any]] = field(default_factory=lambda: list(DEFAULT_GPU_TOLERATIONS))
    gpu_extra_resources: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> "Routing":
        env = os.environ if environ is None else environ
        return cls(
            gpu_queue=_queue(env, "RS_EMBED_ASSETS_GPU_QUEUE", "gpu"),
            imagery_queue=_queue(env, "RS_EMBED_ASSETS_IMAGERY_QUEUE", "imagery"),
            gpu_resource=env.get("RS_EMBED_ASSETS_K8S_GPU_RESOURCE", "").strip() or "nvidia.com/gpu",
            gpu_count=_count(env, "RS_EMBED_ASSETS_K8S_GPU_COUNT", 1),
            gpu_node_selector=_json(env, "RS_EMBED_ASSETS_K8S_GPU_NODE_SELECTOR", dict, {},
                                    'e.g. {"cloud.google.com/gke-accelerator": "nvidia-l4"}'),
            gpu_tolerations=_json(env, "RS_EMBED_ASSETS_K8S_GPU_TOLERATIONS", list, list(DEFAULT_GPU_TOLERATIONS),
                                  'e.g. [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]'),
            gpu_extra_resources=_json(env, "RS_EMBED_ASSETS_K8S_GPU_RESOURCES", dict, {},
                                      'e.g. {"requests": {"cpu": "4", "memory": "24Gi"}}'),
        )

    def embedding_tags(self) -> dict[str, Any]:
        resources: dict[str, Any] = {k: dict(v) if isinstance(v, dict) else v
                                     for k, v in self.gpu_extra_resources.items()}
        gpu = {self.gpu_resource: str(self.gpu_count)}
        resources["limits"] = {**resources.get("limits", {}), **gpu}
        resources["requests"] = {**resources.get("requests", {}), **gpu}
        pod_spec: dict[str, Any] = {"tolerations": list(self.gpu_tolerations)}
        if self.gpu_node_selector:
            pod_spec["node_selector"] = dict(self.gpu_node_selector)
        return {
            CELERY_QUEUE_TAG: self.gpu_queue,
            K8S_CONFIG_TAG: {"container_config": {"resources": resources}, "pod_spec_config": pod_spec},
        }

    def composite_tags(self) -> dict[str, Any]:
        return {CELERY_QUEUE_TAG: self.imagery_queue}


def embedding_op_tags() -> dict[str, Any]:
    """Op tags of every embedding step: the GPU queue and the Kubernetes GPU request."""
    return Routing.from_env().embedding_tags()


def composite_op_tags() -> dict[str, Any]:
    """Op tags of every composite step: the imagery queue."""
    return Routing.from_env().composite_tags()


def _queue(env, name: str, default: str) -> str:
    value = env.get(name, "").strip() or default
    if not _QUEUE_NAME.match(value):
        raise RoutingError(f"{name}={value!r} is not a usable queue name: use letters, digits and . _ : - "
                           f"(default {default!r})")
    return value


def _count(env, name: str, default: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 1:
        raise RoutingError(f"{name}={raw!r} must be a whole number of GPUs >= 1 (default {default})")
    return value


def _json(env, name: str, kind: type, default: Any, example: str) -> Any:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise RoutingError(f"{name} is not valid JSON ({exc.msg} at char {exc.pos}); {example}") from None
    if not isinstance(value, kind):
        raise RoutingError(f"{name} must be a JSON {'object' if kind is dict else 'list'}, got "
                           f"{type(value).__name__}; {example}")
    return value


EXECUTORS = ("in_process", "multiprocess", "celery")


def executor():
    """The executor of every job, chosen by RS_EMBED_ASSETS_EXECUTOR (a deployment setting).

    - ``in_process`` (default): every step of a run in the run worker. The code location is imported
      once per run (without torch; a model loads when its step runs and stays loaded for the run), so a
      batch run adds one process start, not one per step.
    - ``multiprocess``: one process per step (Dagster's default), steps of a run in parallel.
    - ``celery``: steps go to Celery workers by their ``dagster-celery/queue`` tag (``gpu``, ``imagery``,
      ``dagster``); broker and result backend from RS_EMBED_ASSETS_CELERY_BROKER / _BACKEND
      (default ``redis://127.0.0.1:16379/0``, what ``rs-embed-assets cluster up`` starts).
    """
    import dagster as dg

    kind = os.environ.get("RS_EMBED_ASSETS_EXECUTOR", "").strip() or "in_process"
    if kind == "in_process":
        return dg.in_process_executor
    if kind == "multiprocess":
        return dg.multiprocess_executor
    if kind == "celery":
        from dagster_celery import celery_executor

        # by variable name, so a broker password never enters the job's config snapshot
        config = {name: ({"env": var} if os.environ.get(var, "").strip() else DEFAULT_BROKER)
                  for name, var in (("broker", "RS_EMBED_ASSETS_CELERY_BROKER"),
                                    ("backend", "RS_EMBED_ASSETS_CELERY_BACKEND"))}
        return celery_executor.configured(config, name="celery_executor")
    raise RoutingError(f"RS_EMBED_ASSETS_EXECUTOR={kind!r} is not one of {', '.join(EXECUTORS)}")


DEFAULT_BROKER = "redis://127.0.0.1:16379/0"
