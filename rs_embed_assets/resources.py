"""Dagster resources: storage root, imagery provider, model adapters and the DuckDB catalog.

Defaults work offline on a fresh machine (``./data``, the sample provider, CPU); production sets
environment variables or resource config (Earth Engine, GPU workers) — see README.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, Optional

import dagster as dg

import adapters
from adapters.specs import env_bool, env_int, env_str

from .settings import enabled_models

# The code location (and so every run worker, before its first step) imports this module: the data
# libraries behind storage, providers, the catalog and the embedding loop (xarray, pandas, duckdb, zarr…)
# are imported where a resource is used, not here (tests/distributed/test_lazy_imports.py).
if TYPE_CHECKING:
    from .materialize import EmbeddingSettings
    from .providers import Provider
    from .storage import Storage

_FROM_MATERIALIZE = ("EmbeddingSettings", "KnobError", "read_checkpoint_record", "validate_model_knobs")


def __getattr__(name: str):
    """``from rs_embed_assets.resources import KnobError`` etc. still work: re-exported on first use."""
    if name in _FROM_MATERIALIZE:
        from . import materialize

        return getattr(materialize, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class StorageResource(dg.ConfigurableResource):
    """Root directory of the catalog (composites, embeddings, checkpoints, catalog.duckdb)."""

    root: str = env_str("RS_EMBED_ASSETS_DATA_ROOT", "data")

    def get(self) -> Storage:
        from .storage import Storage

        return Storage(self.root)


class ProviderResource(dg.ConfigurableResource):
    """Which imagery provider makes composites: ``sample`` (offline), ``local``, ``gee`` or ``stac``."""

    kind: str = env_str("RS_EMBED_ASSETS_PROVIDER", "sample")
    options: dict[str, Any] = {}

    def get(self) -> Provider:
        from .providers import create_provider

        opts = dict(self.options)
        if self.kind == "local" and "root" not in opts:
            opts["root"] = env_str("RS_EMBED_ASSETS_LOCAL_DIR", "imagery")
        return create_provider(self.kind, **opts)


class CheckpointPolicyResource(dg.ConfigurableResource):
    """How checkpoint assets may obtain weights.

    ``allow_random_init`` writes deterministic random weights in the published format when the
    real file is unavailable — for demos and tests only; it is flagged in logs and metadata.
    """

    allow_random_init: bool = env_bool("RS_EMBED_ALLOW_RANDOM_INIT", False)
    allow_download: Optional[bool] = None  # None: per-model RS_EMBED_<MODEL>_AUTO_DOWNLOAD (default on)
    verify_strict_load: bool = True


# one loaded model per (process, model, checkpoint, device, dtype): backfill runs reuse it
_MODEL_CACHE: dict[tuple, "adapters.Adapter"] = {}
_MODEL_LOCK = threading.Lock()


class ModelResource(dg.ConfigurableResource):
    """A model adapter on a device, loaded once per process from the materialised checkpoint.

    ``device``: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``.
    ``batch_size``: chips per forward; 0 = the model's default for the device.
    """

    model_id: str
    device: str = env_str("RS_EMBED_DEVICE", "auto")
    dtype: str = env_str("RS_EMBED_DTYPE", "float32")
    batch_size: int = env_int("RS_EMBED_BATCH_SIZE", 0)
    pooling: str = "mean"
    min_valid_fraction: float = 0.0
    grid_dtype: str = ""  # float16 | float32 | none; default RS_EMBED_<MODEL>_GRID_DTYPE, RS_EMBED_GRID_DTYPE, float16

    def setup_for_execution(self, context) -> None:
        self.validate()  # a bad knob fails the run before any work, naming the knob and the fix

    def validate(self) -> None:
        from .materialize import validate_model_knobs

        validate_model_knobs(batch_size=self.batch_size, min_valid_fraction=self.min_valid_fraction,
                             pooling=self.pooling, dtype=self.dtype, device=self.device)

    def load(self, storage: Storage) -> tuple["adapters.Adapter", dict[str, Any]]:
        from .materialize import read_checkpoint_record

        self.validate()
        spec = adapters.get_spec(self.model_id)
        record = read_checkpoint_record(storage, spec.checkpoint_id)
        key = (self.model_id, record["sha256"], self.device, self.dtype)
        with _MODEL_LOCK:
            adapter = _MODEL_CACHE.get(key)
            if adapter is None:
                from adapters.checkpoints import verify_sha256

                # the weights must be the ones recorded (and shown as the data version of checkpoint/<id>)
                verify_sha256(record["path"], record["sha256"], what=f"checkpoint/{spec.checkpoint_id}",
                              fix=f"re-materialise checkpoint/{spec.checkpoint_id} to record the new file (then the "
                                  f"embeddings made from the old one show as stale), or restore the original file")
                cls = adapters.get_adapter_class(self.model_id)
                adapter = cls.from_checkpoint(record["path"], device=self.device, dtype=self.dtype)
                _MODEL_CACHE.clear()  # keep one model resident: GPU memory is the scarce resource
                _MODEL_CACHE[key] = adapter
        return adapter, record

    def settings(self) -> EmbeddingSettings:
        from .materialize import EmbeddingSettings

        self.validate()
        grid_dtype = (self.grid_dtype or env_str(f"RS_EMBED_{self.model_id.upper()}_GRID_DTYPE", "")
                      or env_str("RS_EMBED_GRID_DTYPE", "float16")).lower()
        return EmbeddingSettings(pooling=self.pooling, batch_size=self.batch_size or None,
                                 min_valid_fraction=self.min_valid_fraction, grid_dtype=grid_dtype)


class CatalogResource(dg.ConfigurableResource):
    """The DuckDB catalog file: written only by the ``catalog`` asset, opened read-only by everyone else.

    ``path`` defaults to ``<storage root>/catalog.duckdb``.
    """

    path: str = env_str("RS_EMBED_ASSETS_CATALOG", "")

    def db_path(self, storage: Storage):
        from pathlib import Path

        return Path(self.path).expanduser().resolve() if self.path else storage.catalog_path

    def connect(self, storage: Storage):
        from .catalog import connect_readonly

        return connect_readonly(self.db_path(storage))


def model_resource_key(model_id: str) -> str:
    return f"model_{model_id}"


def default_resources() -> dict[str, Any]:
    res: dict[str, Any] = {
        "storage": StorageResource(),
        "provider": ProviderResource(),
        "checkpoint_policy": CheckpointPolicyResource(),
        "catalog_db": CatalogResource(),
    }
    for model_id in enabled_models():
        res[model_resource_key(model_id)] = ModelResource(model_id=model_id)
    return res
