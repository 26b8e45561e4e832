"""Model adapters for remote-sensing foundation models, usable without Dagster.

    import adapters
    adapters.list_models()                      # ['agrifm', 'dynamicvis', 'fomo', ...]
    spec = adapters.get_spec("fomo")            # bands, chip size, embedding dim, checkpoint source
    ad = adapters.create_adapter("fomo", checkpoint="/path/fomo_single_embedding_layer_weights.pt")
    out = ad.embed(ad.preprocess(raw))          # out.pooled (B, D), out.grid (B, D, h, w)

Importing this package, listing models and reading specs needs no torch (``adapters.specs`` is plain
data); a model's module (and torch) is imported only when that model's adapter class is asked for,
so asking for one model never imports the others.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

from .specs import SPECS, AdapterError, CheckpointError, CheckpointSource, ModelSpec

# names that need torch, imported from their module on first access (PEP 562)
_LAZY = {"Adapter": "adapters.base", "Embeddings": "adapters.base", "ResolvedCheckpoint": "adapters.checkpoints",
         "resolve_checkpoint": "adapters.checkpoints", "sha256_file": "adapters.checkpoints"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'adapters' has no attribute {name!r}")

# model id -> "module:AdapterClass". The module defines the network, its spec and its loading rules.
_REGISTRY: dict[str, str] = {
    "fomo": "adapters.fomo:FomoAdapter",
    "terrafm_b": "adapters.terrafm:TerraFMS2Adapter",
    "terrafm_b_s1": "adapters.terrafm:TerraFMS1Adapter",
    "scalemae_rgb": "adapters.scalemae:ScaleMAEAdapter",
    "agrifm": "adapters.agrifm:AgriFMAdapter",
    "dynamicvis": "adapters.dynamicvis:DynamicVisAdapter",
}


# model id -> spec of a plugin registered with an explicit spec (built-in specs live in adapters.specs)
_PLUGIN_SPECS: dict[str, ModelSpec] = {}


def register_model(model_id: str, target: str, spec: ModelSpec | None = None) -> None:
    """Register an adapter class given as ``"module:Class"`` (for plugins and tests).

    Pass its ``spec`` to keep ``get_spec`` free of imports; without it the module is imported to read it.
    """
    _REGISTRY[model_id] = target
    _PLUGIN_SPECS.pop(model_id, None)
    if spec is not None:
        _PLUGIN_SPECS[model_id] = spec


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def get_adapter_class(model_id: str) -> type[Adapter]:
    try:
        target = _REGISTRY[model_id]
    except KeyError:
        raise AdapterError(f"unknown model {model_id!r}; available: {', '.join(list_models())}") from None
    module_name, cls_name = target.split(":")
    return getattr(importlib.import_module(module_name), cls_name)


def module_source(name: str) -> str:
    """Source text of a model's module (by model id) or of a module of this package, without importing it."""
    module = _REGISTRY[name].split(":")[0] if name in _REGISTRY else name
    found = importlib.util.find_spec(module)
    if found is None or not found.origin:
        raise AdapterError(f"cannot find the source of {module!r}")
    with open(found.origin, encoding="utf-8") as f:
        return f.read()


def get_spec(model_id: str) -> ModelSpec:
    """What the model consumes and produces, without importing the model (or torch)."""
    if model_id in _PLUGIN_SPECS:
        return _PLUGIN_SPECS[model_id]
    if model_id in SPECS and _REGISTRY.get(model_id, "").startswith("adapters."):
        return SPECS[model_id]
    return get_adapter_class(model_id).spec


def create_adapter(model_id: str, *, checkpoint: str | None = None, config: Any = None,
                   device: str = "cpu", dtype: str = "float32", allow_download: bool | None = None) -> Adapter:
    """Build an adapter and load its checkpoint strictly.

    ``checkpoint`` is a local file; when omitted the file is resolved from the model's
    environment variables, its cache, or downloaded (see ``adapters.checkpoints``).
    """
    from .checkpoints import resolve_checkpoint

    cls = get_adapter_class(model_id)
    if checkpoint is None:
        checkpoint = str(resolve_checkpoint(cls.spec.checkpoint, model_key=cls.spec.checkpoint_id,
                                            allow_download=allow_download).path)
    return cls.from_checkpoint(checkpoint, config=config, device=device, dtype=dtype)


__all__ = ["Adapter", "AdapterError", "CheckpointError", "CheckpointSource", "Embeddings", "ModelSpec",
           "ResolvedCheckpoint", "SPECS", "create_adapter", "module_source", "get_adapter_class", "get_spec", "list_models",
           "register_model", "resolve_checkpoint", "sha256_file"]
