"""What one partition of each asset does, as plain functions (the Dagster assets are thin over these).

- ``materialize_checkpoint``  resolve the published file (or write demo weights when explicitly
                              allowed), verify it loads strictly, record path + sha256
- ``materialize_composite``   provider → composite store streamed band by band, committed by its record
                              (content hash of the verified blocks as data version)
- ``materialize_embeddings``  committed composite(s) → adapter → grid version + vectors Parquet with the
                              manifest in its footer, committed by one rename
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import xarray as xr

import adapters
from adapters import CheckpointError
from adapters.specs import stable_hash

from .composite import crs_wkt, parse_month, sensor_spec, shift_month, validate_composite
from .embedding import EmbedOptions, GridSink, bound_heap_growth, code_version_of, embed_partition, grid_attrs, grid_coords
from .faults import fault_point
from .grid import parse_tile_key
from .lattice import Window, chip_lattice, read_window, window_tile
from .providers.base import Provider
from .settings import checkpoint_ids  # noqa: F401  (also re-exported: its home is settings.py)
from .storage import StaleReadError, Storage, StorageError, ZarrStoreWriter, block_hash

log = logging.getLogger(__name__)

RANDOM_INIT_SEED = 0


class MissingUpstreamError(RuntimeError):
    """An input partition or checkpoint has not been materialised yet."""


# --- checkpoints --------------------------------------------------------------------------------
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
    fault_point("checkpoint")
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
COMPOSITE_BLOCK_ROWS = 512  # rows per provider request, zarr chunk height and hash block


def all_chip_sizes() -> list[int]:
    """Every registered model's chip size: a composite holds what all of them need."""
    return sorted({adapters.get_spec(m).chip_size for m in adapters.list_models()})


def materialize_composite(storage: Storage, provider: Provider, sensor: str, tile_key: str, month: str, *,
                          block_rows: int = COMPOSITE_BLOCK_ROWS) -> dict[str, Any]:
    """Provider → composite store, streamed row band by row band, then committed.

    The store covers the partition's read window (its pixels plus the margin its last chips reach
    into, for every model); each band of ``block_rows`` rows is requested from the provider, checked,
    hashed and written, so memory holds one band whatever the tile size.
    """
    bound_heap_growth()
    tile = parse_tile_key(tile_key)
    month = parse_month(month)
    spec = sensor_spec(sensor)
    window = read_window(tile, all_chip_sizes())
    wtile = window_tile(tile, window)
    epsg_wkt = crs_wkt(tile.epsg)
    t0 = time.perf_counter()
    storage.clean_staging(suffix=f"-{sensor}-{tile.key}-{month}.zarr")  # leftovers of a killed write
    writer = ZarrStoreWriter(
        storage, f"{sensor}-{tile.key}-{month}.zarr",
        variables={
            "data": (("band", "y", "x"), (len(spec.bands), window.height, window.width),
                     (len(spec.bands), block_rows, block_rows), spec.dtype,
                     0 if spec.dtype == "uint16" else float("nan"),
                     {"units": spec.units, "nodata": spec.nodata, "long_name": f"{sensor.upper()} composite"}),
            "valid_count": (("y", "x"), (window.height, window.width), (block_rows, block_rows), "uint16", 0,
                            {"long_name": "valid observations per pixel"}),
        },
        coords={"band": (("band",), np.array(spec.bands), {"long_name": "band name"}),
                "y": (("y",), wtile.y_coords(), {"units": "m", "standard_name": "projection_y_coordinate"}),
                "x": (("x",), wtile.x_coords(), {"units": "m", "standard_name": "projection_x_coordinate"})},
        attrs={}, crs_wkt=epsg_wkt, transform=wtile.transform, codec="fast")
    hashes, statuses, reasons, scenes, valid_px = [], set(), [], 0, 0
    first: xr.Dataset | None = None
    try:
        for y0 in range(0, window.height, block_rows):
            rows = min(block_rows, window.height - y0)
            band = window_tile(tile, Window(window.y0 + y0, window.x0, rows, window.width))
            ds = provider.composite(sensor, band, month)
            validate_composite(ds, sensor=sensor, tile=band)
            data = np.asarray(ds["data"].values, dtype=spec.dtype)
            valid = np.asarray(ds["valid_count"].values, dtype=np.uint16)
            writer.write("data", (slice(None), slice(y0, y0 + rows), slice(None)), data)
            writer.write("valid_count", (slice(y0, y0 + rows), slice(None)), valid)
            hashes.append([block_hash(data), block_hash(valid)])
            statuses.add(ds.attrs["status"])
            reason = json.loads(ds.attrs.get("provider_info") or "{}").get("empty_reason")
            if reason:
                reasons.append(reason)
            scenes = max(scenes, int(ds.attrs.get("scene_count", 0)))
            valid_px += int(np.count_nonzero(valid))
            if first is None:
                first = ds
            del ds, data, valid
        assert first is not None
        h = hashlib.sha256("|".join(a + b for a, b in hashes).encode() + f"{tile.key}|{month}".encode())
        version = h.hexdigest()[:16]
        status = "ok" if "ok" in statuses else "empty"
        info = json.loads(first.attrs.get("provider_info") or "{}")
        if status == "empty" and reasons:
            info["empty_reason"] = reasons[0]
        attrs = {"sensor": sensor, "tile": tile.key, "month": month, "provider": first.attrs["provider"],
                 "status": status, "synthetic": int(bool(first.attrs.get("synthetic"))),
                 "valid_fraction": valid_px / float(window.height * window.width), "scene_count": scenes,
                 "crs": tile.crs, "transform": list(wtile.transform), "content_hash": version,
                 "provider_info": json.dumps(info, sort_keys=True, default=str)}
        writer.set_attrs(attrs)
        fault_point("composite")
        store = writer.publish(storage.composite_versions_dir(sensor, tile.key, month))
    except BaseException:
        writer.abort()
        raise
    fetch_s = time.perf_counter() - t0
    record = {
        **{k: v for k, v in attrs.items() if k != "provider_info"}, "provider_info": info,
        "data_version": version, "bands": list(spec.bands), "dtype": spec.dtype, "units": spec.units,
        "shape": [len(spec.bands), window.height, window.width],
        "window": {"y0": window.y0, "x0": window.x0, "height": window.height, "width": window.width},
        "block_rows": block_rows, "block_hashes": hashes, "epsg": tile.epsg,
        "fetch_seconds": round(fetch_s, 3), "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    record["valid_fraction"] = round(float(record["valid_fraction"]), 6)
    fault_point("composite_commit")
    record = storage.commit_composite(sensor, tile.key, month, store, record)
    return {**record, "path": record["store"]}


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
        rec = storage.composite_record(sensor, tile_key, m)
        if rec is not None:
            materialised.append(m)
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


def open_composite(storage: Storage, sensor: str, tile_key: str, month: str):
    try:
        return storage.open_composite(sensor, tile_key, month)
    except StorageError as exc:
        if storage.composite_record(sensor, tile_key, month) is None:
            raise MissingUpstreamError(str(exc)) from None
        raise


# --- embeddings ---------------------------------------------------------------------------------
class KnobError(ValueError):
    """A configuration value outside its valid range."""


def validate_model_knobs(*, batch_size: int, min_valid_fraction: float, pooling: str = "mean",
                         dtype: str = "float32", device: str = "auto") -> None:
    """Refuse out-of-range embedding knobs with a message naming the knob, its value and the fix."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 0:
        raise KnobError(f"batch size {batch_size!r} (RS_EMBED_BATCH_SIZE or the model resource's batch_size) must "
                        "be a whole number >= 1, or 0 for the model's default for the device")
    if not isinstance(min_valid_fraction, (int, float)) or not 0.0 <= float(min_valid_fraction) <= 1.0:
        raise KnobError(f"min_valid_fraction={min_valid_fraction!r} must lie in [0, 1] (the share of valid pixels "
                        "a chip needs to be embedded; 0 embeds every chip with at least one valid pixel)")
    if pooling not in ("mean", "max"):
        raise KnobError(f"pooling={pooling!r} is not supported; use 'mean' or 'max'")
    if str(dtype).lower() not in ("float32", "fp32", "float16", "fp16", "bfloat16", "bf16"):
        raise KnobError(f"dtype {dtype!r} (RS_EMBED_DTYPE) is not supported; use float32, float16 or bfloat16")
    dev = str(device).strip().lower()
    if not (dev in ("auto", "cpu", "cuda", "mps") or (dev.startswith("cuda:") and dev[5:].isdigit())):
        raise KnobError(f"device {device!r} (RS_EMBED_DEVICE) is not understood; use auto, cpu, cuda or cuda:N")


@dataclass
class EmbeddingSettings:
    pooling: str = "mean"
    batch_size: int | None = None
    min_valid_fraction: float = 0.0
    grid_dtype: str = "float16"
    prefetch: int = 2

    def __post_init__(self) -> None:
        if self.batch_size is not None and self.batch_size < 1:  # None is the model's default here
            raise KnobError(f"batch_size={self.batch_size} must be at least 1 (RS_EMBED_BATCH_SIZE; 0 = the "
                            "model's default)")
        validate_model_knobs(batch_size=self.batch_size or 0, min_valid_fraction=self.min_valid_fraction,
                             pooling=self.pooling)
        if self.grid_dtype not in ("float16", "float32", "none"):
            raise KnobError(f"grid dtype {self.grid_dtype!r} is not supported; use float16, float32 or none "
                            "(RS_EMBED_GRID_DTYPE / RS_EMBED_<MODEL>_GRID_DTYPE)")


def materialize_embeddings(storage: Storage, adapter, tile_key: str, month: str, checkpoint: dict[str, Any],
                           settings: EmbeddingSettings, *, log_fn: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Committed composite(s) → adapter → grid version + vectors file with its manifest, committed at once."""
    for attempt in range(2):
        try:
            return _materialize_embeddings(storage, adapter, tile_key, month, checkpoint, settings, log_fn)
        except StaleReadError:
            if attempt:
                raise
            if log_fn is not None:
                log_fn(f"{adapter.spec.model_id} {tile_key} {month}: a composite was replaced while reading; "
                       "reading the new version")
    raise AssertionError("unreachable")


def _materialize_embeddings(storage, adapter, tile_key, month, checkpoint, settings, log_fn) -> dict[str, Any]:
    spec = adapter.spec
    tile = parse_tile_key(tile_key)
    month = parse_month(month)
    if spec.frames > 1:
        window, used = agrifm_frame_months(storage, spec.sensor, tile.key, month, adapter.frames)
    else:
        window, used = [month], [month]
    opened = {m: open_composite(storage, spec.sensor, tile.key, m) for m in dict.fromkeys(used)}
    readers = [opened[m] for m in used]
    composite_versions = [str(r.record.get("data_version", "")) for r in readers]
    provenance = {
        "checkpoint_sha256": checkpoint["sha256"], "checkpoint_random_init": bool(checkpoint["random_init"]),
        "checkpoint_source": checkpoint["source_uri"],
        "composite_version": ",".join(dict.fromkeys(composite_versions)),
        "preprocessing_hash": adapter.preprocessing_hash(), "code_version": code_version_of(adapter),
        "provider": str(readers[0].record.get("provider", "")),
        "synthetic": bool(readers[0].record.get("synthetic", 0)),
        "device": str(adapter.device), "dtype": str(adapter.dtype).replace("torch.", ""),
    }
    lattice = chip_lattice(tile, spec.chip_size)
    if log_fn is not None:
        if not lattice.count:
            log_fn(f"{spec.model_id} {tile.key} {month}: this sub-tile owns no {spec.chip_size} px chip of the "
                   f"{tile.mgrs} lattice (its chips belong to neighbouring sub-tiles); recording an empty outcome")
        elif spec.frames == 1 and readers[0].record.get("status") == "empty":
            log_fn(f"{spec.model_id} {tile.key} {month}: composite is empty, writing 0 rows")
    grid_dtype = settings.grid_dtype
    grid_versions = storage.grid_versions_dir(spec.model_id, tile.key, month)
    hint = f"{spec.model_id}-{tile.key}-{month}"

    def grid_writer(lat):
        if grid_dtype == "none":
            return None
        coords, transform = grid_coords(spec, lat)
        return ZarrStoreWriter(
            storage, f"{hint}-grid.zarr",
            variables={"embedding": (("feature", "y", "x"), (spec.embed_dim, lat.rows * spec.grid_size,
                                                              lat.cols * spec.grid_size),
                                     GridSink.chunks(spec.grid_size, spec.embed_dim), grid_dtype, float("nan"),
                                     {"long_name": f"{spec.model_id} embedding grid"})},
            coords=coords, attrs=grid_attrs(spec, tile, month, lat, provenance), crs_wkt=crs_wkt(tile.epsg),
            transform=transform)

    storage.clean_staging(suffix=f"-{hint}.parquet")  # leftovers of a killed write of this partition
    storage.clean_staging(suffix=f"-{hint}-grid.zarr")
    staged_vectors = storage.staging_path(f"{hint}.parquet")
    result = None
    store = None
    try:
        result = embed_partition(adapter, readers, tile=tile, month=month, provenance=provenance,
                                 vectors_path=staged_vectors, grid_writer_factory=grid_writer,
                                 grid_dtype="float32" if grid_dtype == "none" else grid_dtype,
                                 options=EmbedOptions(pooling=settings.pooling, batch_size=settings.batch_size,
                                                      min_valid_fraction=settings.min_valid_fraction,
                                                      prefetch=settings.prefetch),
                                 log=log_fn)
        fault_point("grid")
        writer = result["grid_writer"]
        store = writer.publish(grid_versions) if writer is not None else None
        stats = result["stats"]
        vpath = storage.vectors_path(spec.model_id, tile.key, month)
        lat = result["lattice"]
        manifest = {
            "model": spec.model_id, "tile": tile.key, "month": month, "rows": result["sink"].rows,
            "status": "ok" if lat.count else "no_chips",
            "vectors_path": storage.rel(vpath) if vpath.is_relative_to(storage.root) else str(vpath),
            "grid_path": storage.rel(store) if store is not None else None,
            "grid_shape": [spec.embed_dim, lat.rows * spec.grid_size, lat.cols * spec.grid_size] if store else None,
            "grid_dtype": grid_dtype if store else None, "grid_cell_m": spec.grid_resolution_m,
            "chip_size_px": spec.chip_size, "chip_rows": [lat.row0, lat.row1], "chip_cols": [lat.col0, lat.col1],
            "frame_months": used, "window_months": window, "distinct_frames": len(set(used)),
            "composite_versions": composite_versions, "preprocessing": adapter.preprocessing_spec(),
            "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **provenance, **stats,
        }
        result["sink"].close(manifest)
        fault_point("vectors")
        storage.commit_vectors(staged_vectors, spec.model_id, tile.key, month)
    except BaseException:
        if result is not None:
            result["sink"].abort()
        if store is not None:  # published but never committed: nothing points to it
            shutil.rmtree(store, ignore_errors=True)
        staged_vectors.unlink(missing_ok=True)
        raise
    storage.prune_versions(grid_versions, keep=store)
    return manifest
