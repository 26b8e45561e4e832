"""Model adapters for remote-sensing foundation models, usable without Dagster.

    import adapters
    adapters.list_models()                      # ['agrifm', 'dynamicvis', 'fomo', ...]
    spec = adapters.get_spec("fomo")            # bands, chip size, embedding dim, checkpoint source
    ad = adapters.create_adapter("fomo", checkpoint="/path/fomo_single_embedding_layer_weights.pt")
    out = ad.embed(ad.preprocess(raw))          # out.pooled (B, D), out.grid (B, D, h, w)

Modules are imported on first use, so asking for one model never imports the others.
"""

from __future__ import annotations

import importlib
from typing import Any

from .base import (Adapter, AdapterError, CheckpointError, CheckpointSource, Embeddings, ModelSpec)
from .checkpoints import ResolvedCheckpoint, resolve_checkpoint, sha256_file

# model id -> "module:AdapterClass". The module defines the network, its spec and its loading rules.
_REGISTRY: dict[str, str] = {
    "fomo": "adapters.fomo:FomoAdapter",
    "terrafm_b": "adapters.terrafm:TerraFMS2Adapter",
    "terrafm_b_s1": "adapters.terrafm:TerraFMS1Adapter",
    "scalemae_rgb": "adapters.scalemae:ScaleMAEAdapter",
    "agrifm": "adapters.agrifm:AgriFMAdapter",
    "dynamicvis": "adapters.dynamicvis:DynamicVisAdapter",
}


def register_model(model_id: str, target: str) -> None:
    """Register an adapter class given as ``"module:Class"`` (for plugins and tests)."""
    _REGISTRY[model_id] = target


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def get_adapter_class(model_id: str) -> type[Adapter]:
    try:
        target = _REGISTRY[model_id]
    except KeyError:
        raise AdapterError(f"unknown model {model_id!r}; available: {', '.join(list_models())}") from None
    module_name, cls_name = target.split(":")
    return getattr(importlib.import_module(module_name), cls_name)


def get_spec(model_id: str) -> ModelSpec:
    return get_adapter_class(model_id).spec


def create_adapter(model_id: str, *, checkpoint: str | None = None, config: Any = None,
                   device: str = "cpu", dtype: str = "float32", allow_download: bool | None = None) -> Adapter:
    """Build an adapter and load its checkpoint strictly.

    ``checkpoint`` is a local file; when omitted the file is resolved from the model's
    environment variables, its cache, or downloaded (see ``adapters.checkpoints``).
    """
    cls = get_adapter_class(model_id)
    if checkpoint is None:
        checkpoint = str(resolve_checkpoint(cls.spec.checkpoint, model_key=cls.spec.checkpoint_id,
                                            allow_download=allow_download).path)
    return cls.from_checkpoint(checkpoint, config=config, device=device, dtype=dtype)


__all__ = ["Adapter", "AdapterError", "CheckpointError", "CheckpointSource", "Embeddings", "ModelSpec",
           "ResolvedCheckpoint", "create_adapter", "get_adapter_class", "get_spec", "list_models",
           "register_model", "resolve_checkpoint", "sha256_file"]
