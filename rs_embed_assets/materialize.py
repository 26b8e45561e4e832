"""What one partition of each asset does, as plain functions (the Dagster assets are thin over these).

- ``materialize_checkpoint``  resolve the published file (or write demo weights when explicitly
                              allowed), verify it loads strictly, record path + sha256
- ``materialize_composite``   provider → composite zarr + manifest, content hash as data version
- ``materialize_embeddings``  composite(s) → adapter → Parquet vectors + zarr grid + manifest
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import xarray as xr

import adapters
from adapters import CheckpointError
from adapters.specs import stable_hash

from .composite import parse_month, shift_month, validate_composite
from .embedding import code_version, embed_tile
from .grid import parse_tile_key
from .providers.base import Provider
from .storage import Storage

log = logging.getLogger(__name__)

RANDOM_INIT_SEED = 0


class MissingUpstreamError(RuntimeError):
    """An input partition or checkpoint has not been materialised yet."""


# --- checkpoints --------------------------------------------------------------------------------
def checkpoint_ids() -> dict[str, str]:
    """checkpoint id → the first model id that loads it (terrafm_b and terrafm_b_s1 share one)."""
    from .settings import enabled_models

    out: dict[str, str] = {}
    for model_id in enabled_models():
        out.setdefault(adapters.get_spec(model_id).checkpoint_id, model_id)
    return out


def materialize_checkpoint(storage: Storage, checkpoint_id: str, *, allow_random_init: bool = False,
                           allow_download: bool | None = None, verify: bool = True,
                           warn: Callable[[str], None] = log.warning) -> dict[str, Any]:
    from adapters.checkpoints import resolve_checkpoint, sha256_file  # torch: only where a checkpoint is made

    model_id = checkpoint_ids()[checkpoint_id]
    cls = adapters.get_adapter_class(model_id)
    try:
        resolved = resolve_checkpoint(cls.spec.checkpoint, model_key=checkpoint_id, allow_download=allow_download)
        path, origin, uri, random_init = resolved.path, resolved.origin, resolved.uri, False
    except CheckpointError as exc:
        if not allow_random_init:
            raise
        # the architecture knobs (RS_EMBED_<MODEL>_DEPTH, ...) shape the weights: one file per config
        cfg_hash = stable_hash(dataclasses.asdict(cls.default_config()))[:10]
        path = storage.checkpoint_dir(checkpoint_id) / f"random-init-seed{RANDOM_INIT_SEED}-{cfg_hash}.pt"
        if not path.exists():
            cls.write_random_checkpoint(path, seed=RANDOM_INIT_SEED)
        origin, uri, random_init = "random_init", str(path), True
        warn(f"RANDOM WEIGHTS for {checkpoint_id}: the published checkpoint is unavailable ({exc}). "
             f"Embeddings made with these weights are meaningless outside demos and tests. Set "
             f"{cls.spec.checkpoint.env_prefix}_CKPT or allow the download to use the real weights.")
    if verify:
        t0 = time.perf_counter()
        cls.from_checkpoint(path, device="cpu")  # strict load: wrong/truncated files fail here, clearly
        verify_s = time.perf_counter() - t0
    else:
        verify_s = None
    record = {
        "checkpoint_id": checkpoint_id, "path": str(path), "sha256": sha256_file(path),
        "size_bytes": path.stat().st_size, "origin": origin, "source_uri": uri, "random_init": random_init,
        "published_filename": cls.spec.checkpoint.filename, "hf_repo": cls.spec.checkpoint.hf_repo,
        "verified_strict_load": bool(verify), "verify_seconds": round(verify_s, 3) if verify_s else None,
    }
    storage.write_json(storage.checkpoint_record(checkpoint_id), record)
    return record


def read_checkpoint_record(storage: Storage, checkpoint_id: str) -> dict[str, Any]:
    path = storage.checkpoint_record(checkpoint_id)
    if not path.exists():
        raise MissingUpstreamError(f"checkpoint/{checkpoint_id} has not been materialised under {storage.root}; "
                                   f"materialise the asset checkpoint/{checkpoint_id} first")
    record = storage.read_json(path)
    if not Path(record["path"]).exists():
        raise MissingUpstreamError(f"checkpoint file {record['path']} recorded for {checkpoint_id} is gone; "
                                   f"re-materialise checkpoint/{checkpoint_id}")
    return record


# --- composites ---------------------------------------------------------------------------------
def content_hash(ds: xr.Dataset) -> str:
    h = hashlib.sha256()
    for name in ("data", "valid_count"):
        arr = np.ascontiguousarray(ds[name].values)
        h.update(name.encode() + str(arr.dtype).encode() + str(arr.shape).encode())
        h.update(arr.tobytes())
    h.update(str(ds.attrs.get("tile")).encode() + str(ds.attrs.get("month")).encode())
    return h.hexdigest()[:16]


def materialize_composite(storage: Storage, provider: Provider, sensor: str, tile_key: str, month: str) -> dict[str, Any]:
    tile = parse_tile_key(tile_key)
    month = parse_month(month)
    t0 = time.perf_counter()
    ds = provider.composite(sensor, tile, month)
    validate_composite(ds, sensor=sensor, tile=tile)
    version = content_hash(ds)
    ds.attrs["content_hash"] = version
    fetch_s = time.perf_counter() - t0
    path = storage.composite_path(sensor, tile.key, month)
    storage.write_zarr(ds, path, chunks={"band": ds.sizes["band"], "y": 1024, "x": 1024})
    summary = {
        "sensor": sensor, "tile": tile.key, "month": month, "path": str(path), "data_version": version,
        "status": ds.attrs["status"], "valid_fraction": round(float(ds.attrs["valid_fraction"]), 4),
        "scene_count": int(ds.attrs["scene_count"]), "provider": ds.attrs["provider"],
        "synthetic": bool(ds.attrs["synthetic"]), "shape": list(ds["data"].shape), "crs": tile.crs,
        "fetch_seconds": round(fetch_s, 3), "provider_info": ds.attrs["provider_info"],
    }
    storage.write_json(storage.composite_manifest_path(sensor, tile.key, month), summary)
    return summary


def read_composite(storage: Storage, sensor: str, tile_key: str, month: str) -> xr.Dataset:
    path = storage.composite_path(sensor, tile_key, month)
    if not path.exists():
        raise MissingUpstreamError(f"{sensor}_composite {tile_key} {month} is not materialised ({path}); "
                                   f"materialise {sensor}_composite for that partition first")
    return storage.read_zarr(path)


def agrifm_frame_months(storage: Storage, sensor: str, tile_key: str, month: str, frames: int) -> tuple[list[str], list[str]]:
    """The months feeding a temporal model for ``month``: M-(frames-1) … M of the same tile.

    Rule for gaps: a month whose composite is missing or empty (no valid pixel) is replaced by the
    nearest month of the window that has data (ties → the later month, closer to M). Returns
    (window months, months actually used per frame). When every materialised month of the window is
    empty, all frames use the latest of them, which yields zero chips; when none is materialised,
    MissingUpstreamError names what to materialise.
    """
    window = [shift_month(month, -k) for k in range(frames - 1, -1, -1)]
    materialised, available = [], []
    for m in window:
        path = storage.composite_manifest_path(sensor, tile_key, m)
        if path.exists():
            materialised.append(m)
            rec = storage.read_json(path)
            if rec.get("status") == "ok" and rec.get("valid_fraction", 0) > 0:
                available.append(m)
    if not materialised:
        raise MissingUpstreamError(f"no {sensor}_composite of {tile_key} is materialised in {window[0]}…{window[-1]}; "
                                   f"materialise {sensor}_composite for those months first")
    if not available:  # every month of the window is empty: a recorded, empty outcome (0 chips)
        return window, [materialised[-1]] * frames
    idx = {m: i for i, m in enumerate(window)}
    used = []
    for m in window:
        if m in available:
            used.append(m)
        else:
            used.append(min(available, key=lambda a: (abs(idx[a] - idx[m]), -idx[a])))
    return window, used


# --- embeddings ---------------------------------------------------------------------------------
@dataclass
class EmbeddingSettings:
    pooling: str = "mean"
    batch_size: int | None = None
    min_valid_fraction: float = 0.0


def materialize_embeddings(storage: Storage, adapter, tile_key: str, month: str, checkpoint: dict[str, Any],
                           settings: EmbeddingSettings, *, log_fn: Callable[[str], None] | None = None) -> dict[str, Any]:
    spec = adapter.spec
    tile = parse_tile_key(tile_key)
    month = parse_month(month)
    if spec.frames > 1:
        window, used = agrifm_frame_months(storage, spec.sensor, tile.key, month, adapter.frames)
    else:
        window, used = [month], [month]
    loaded = {m: read_composite(storage, spec.sensor, tile.key, m) for m in dict.fromkeys(used)}
    frames = [loaded[m] for m in used]
    composite_versions = [str(ds.attrs.get("content_hash", "")) for ds in frames]
    provenance = {
        "checkpoint_sha256": checkpoint["sha256"], "checkpoint_random_init": bool(checkpoint["random_init"]),
        "checkpoint_source": checkpoint["source_uri"],
        "composite_version": ",".join(dict.fromkeys(composite_versions)),
        "preprocessing_hash": adapter.preprocessing_hash(), "code_version": code_version(spec.model_id),
        "provider": str(frames[0].attrs.get("provider", "")), "synthetic": bool(frames[0].attrs.get("synthetic", 0)),
        "device": str(adapter.device), "dtype": str(adapter.dtype).replace("torch.", ""),
    }
    if log_fn is not None and spec.frames == 1 and frames[0].attrs.get("status") == "empty":
        log_fn(f"{spec.model_id} {tile.key} {month}: composite is empty, writing 0 rows")
    result = embed_tile(adapter, frames, tile=tile, month=month, provenance=provenance, pooling=settings.pooling,
                        batch_size=settings.batch_size, min_valid_fraction=settings.min_valid_fraction, log=log_fn)
    vpath = storage.vectors_path(spec.model_id, tile.key, month)
    gpath = storage.grid_path(spec.model_id, tile.key, month)
    # each file is swapped in atomically; the grid goes first, the SQL-visible vectors next and the
    # manifest (what the catalog's provenance table reads) last, so it never describes files not yet there
    storage.write_zarr(result.grid, gpath, chunks={"feature": spec.embed_dim, "y": 64, "x": 64})
    storage.write_parquet(result.vectors, vpath)
    manifest = {
        "model": spec.model_id, "tile": tile.key, "month": month, "rows": result.vectors.num_rows,
        "vectors_path": str(vpath), "grid_path": str(gpath), "grid_shape": list(result.grid["embedding"].shape),
        "grid_cell_m": spec.grid_resolution_m, "frame_months": used, "window_months": window,
        "distinct_frames": len(set(used)), "composite_versions": composite_versions,
        "preprocessing": adapter.preprocessing_spec(), **provenance, **result.stats,
    }
    storage.write_json(storage.manifest_path(spec.model_id, tile.key, month), manifest)
    return manifest

