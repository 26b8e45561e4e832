"""The adapter API shared by every model.

An adapter is a pretrained network plus everything needed to feed it raw provider values:

    adapter = adapters.create_adapter("fomo", checkpoint="fomo_single_embedding_layer_weights.pt")
    x = adapter.preprocess(raw)          # raw provider units, (B, C, H, W) or (B, T, C, H, W)
    out = adapter.embed(x)               # out.pooled (B, D), out.grid (B, D, h, w)

Adapters know nothing of Dagster, storage or imagery providers. Each model module defines a
``ModelSpec`` (the pretrained config, as data), a config dataclass for its knobs (read from the
``RS_EMBED_<MODEL>_*`` environment variables where rs-embed has them), the network, a
``checkpoint_filter_fn`` (the one place that maps published keys to model keys) and an
``Adapter`` subclass.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Mapping

import numpy as np
import torch
from torch import nn

# torch-free parts (re-exported here: ``from adapters.base import ModelSpec`` keeps working)
from .specs import (AdapterError, CheckpointError, CheckpointSource, ModelSpec, env_bool, env_float,  # noqa: F401
                    env_int, env_int_tuple, env_str, stable_hash)


@dataclass
class Embeddings:
    """Output of one forward pass: pooled vectors (B, D) and spatial grids (B, D, h, w)."""

    pooled: torch.Tensor
    grid: torch.Tensor

    def numpy(self) -> tuple[np.ndarray, np.ndarray]:
        return (
            self.pooled.detach().float().cpu().numpy(),
            self.grid.detach().float().cpu().numpy(),
        )


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise AdapterError(f"device {str(device)!r} requested but CUDA is not available; use device='cpu' or 'auto'")
    return dev


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise AdapterError(f"unknown dtype {dtype!r}; use one of {sorted(set(_DTYPES))}") from None


def autocast_context(device: torch.device, dtype: torch.dtype):
    """Mixed precision for one forward: ``torch.autocast`` in ``dtype`` (weights stay float32), or nothing.

    float32 runs without autocast, so float32 outputs are exactly those of the plain network.
    """
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


_log = logging.getLogger(__name__)


def compile_requested() -> bool:
    """``RS_EMBED_COMPILE=1``: run the forward through ``torch.compile`` (default off)."""
    return env_bool("RS_EMBED_COMPILE", False)


class DeviceFeeder:
    """Moves preprocessed host batches to the adapter's device so that copy and compute overlap.

    On CUDA: the prefetch thread pins each batch (``pin``); the main thread starts its copy on a side
    stream with ``non_blocking=True`` one batch ahead (``submit``) and, just before the forward, makes
    the compute stream wait for that copy's event (``ready``). Elsewhere all three are plain moves.
    ``cuda`` is the ``torch.cuda`` module (a stand-in with the same methods in CPU tests).
    """

    def __init__(self, device: torch.device | str, *, cuda: Any = None, overlap: bool | None = None,
                 pin_memory: Any = None):
        self.device = torch.device(device)
        self.cuda = cuda if cuda is not None else torch.cuda
        self.overlap = (self.device.type == "cuda") if overlap is None else overlap
        self.stream = self.cuda.Stream(device=self.device) if self.overlap else None
        self._pin_memory = pin_memory or (lambda t: t.pin_memory())

    @property
    def host_device(self) -> torch.device | None:
        """Where ``preprocess`` should leave batches: the host when copies overlap, else the adapter's device."""
        return torch.device("cpu") if self.overlap else None

    def pin(self, x: torch.Tensor) -> torch.Tensor:
        """Host batch -> page-locked host memory (the prefetch thread calls this); a no-op without overlap."""
        return self._pin_memory(x) if self.overlap and x.device.type == "cpu" else x

    def submit(self, x: torch.Tensor) -> tuple[torch.Tensor, Any, torch.Tensor]:
        """Start the host-to-device copy of ``x``; returns a handle for ``ready``."""
        if not self.overlap:  # the forward's ``to_device`` moves it, as without the engine
            return x, None, x
        with self.cuda.stream(self.stream):
            y = x.to(self.device, non_blocking=True)
            event = self.cuda.Event()
            event.record(self.stream)
        return y, event, x  # the host tensor is kept alive until the copy is waited on

    def ready(self, handle: tuple[torch.Tensor, Any, torch.Tensor]) -> torch.Tensor:
        """The device tensor, usable on the current (compute) stream once its copy has finished."""
        y, event, _host = handle
        if event is not None:
            compute = self.cuda.current_stream(self.device)
            compute.wait_event(event)
            if y.is_cuda:  # the allocator must not reuse y's memory before compute is done with it
                y.record_stream(compute)
        return y

    def iter_on_device(self, items):
        """``(key, host batch)`` pairs -> ``(key, device batch)``, the next batch's copy started before
        the current batch is handed to the model (so it runs while the model computes). Without
        overlap the batches pass straight through."""
        if not self.overlap:
            yield from items
            return
        prev = None
        for key, x in items:
            handle = self.submit(x)
            if prev is not None:
                yield prev[0], self.ready(prev[1])
            prev = (key, handle)
        if prev is not None:
            yield prev[0], self.ready(prev[1])


def load_strict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, source: str) -> None:
    """``load_state_dict(strict=True)`` with an error that lists what differs and how to fix it."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    mismatched = sorted(
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state_dict)
        if tuple(state_dict[k].shape) != tuple(own[k].shape)
    )
    if missing or unexpected or mismatched:
        def head(items: list[str]) -> str:
            return ", ".join(items[:8]) + (f" … (+{len(items) - 8} more)" if len(items) > 8 else "")

        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys [{head(missing)}]")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys [{head(unexpected)}]")
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatches [{head(mismatched)}]")
        raise CheckpointError(
            f"checkpoint {source} does not match the {type(model).__name__} architecture: "
            + "; ".join(parts)
            + ". Check that the file is the published checkpoint for this model and that the model "
            "config knobs (RS_EMBED_*_DIM/DEPTH/IMG/…) match it."
        )
    model.load_state_dict(state_dict, strict=True)


class _InertObject:
    """Stand-in for a pickled class that is not weights: keeps its state, runs none of its code."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._args = args

    def __setstate__(self, state: Any) -> None:
        self._state = state


_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)\.(\w+)")


def _load_with_inert_stubs(path: Path, first_error: Exception, max_stubs: int = 64) -> Any:
    """``torch.load(weights_only=True)``, allowlisting inert stubs for the globals it refuses.

    Training checkpoints (mmengine) also pickle bookkeeping objects (message hub, history buffers,
    numpy scalars). torch's restricted unpickler still decides everything else; the refused
    globals only ever become ``_InertObject`` subclasses, so no code from the file can run.
    """
    stubs: list[type] = []
    error: Exception = first_error
    for _ in range(max_stubs):
        m = _UNSUPPORTED_GLOBAL.search(str(error))
        if not m:
            detail = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
            raise CheckpointError(f"checkpoint file {path} holds pickled objects that torch refuses to load safely "
                                  f"({detail}); it was not loaded. Use the published file, or re-save its "
                                  "state dict with torch.save(sd) from a trusted environment") from error
        stubs.append(type(m.group(2), (_InertObject,), {"__module__": m.group(1)}))
        try:
            with torch.serialization.safe_globals(stubs):
                return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            error = exc
    raise CheckpointError(f"checkpoint file {path} needs more than {max_stubs} unknown classes; it is not a "
                          "model checkpoint this library understands") from error


def read_checkpoint_file(path: str | Path) -> dict[str, Any]:
    """Read a torch checkpoint, turning truncated / non-checkpoint files into a clear error."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} does not exist; point the *_CKPT variable at the file "
                              "or let the checkpoint asset download it")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" not in str(exc):
            raise CheckpointError(f"checkpoint file {path} cannot be read ({exc}); it is probably truncated or "
                                  "not a PyTorch checkpoint — delete it and download it again") from exc
        obj = _load_with_inert_stubs(path, exc)
    except Exception as exc:  # torch raises several types for corrupt zips / pickles
        raise CheckpointError(
            f"checkpoint file {path} ({path.stat().st_size} bytes) cannot be read ({type(exc).__name__}: {exc}); "
            "it is probably truncated or not a PyTorch checkpoint — delete it and download it again"
        ) from exc
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint file {path} holds a {type(obj).__name__}, expected a state dict")
    return obj


class Adapter:
    """Base class: a loaded network plus its preprocessing and output extraction.

    Subclasses set ``spec`` and ``config_cls`` and implement ``build_model``,
    ``checkpoint_filter_fn``, ``preprocess`` and ``forward_embeddings``.
    """

    spec: ClassVar[ModelSpec]
    config_cls: ClassVar[type]

    def __init__(self, model: nn.Module, config: Any, *, device: str | torch.device = "cpu",
                 dtype: str | torch.dtype = "float32", checkpoint_path: str | None = None,
                 compile: bool | None = None):
        self.config = config
        self.device = resolve_device(device)
        # ``dtype`` is the compute precision: float32, or bfloat16/float16 under autocast around the
        # forward. Weights stay float32 (autocast keeps norms, softmax and reductions in float32) and
        # outputs are returned as float32.
        self.dtype = resolve_dtype(dtype)
        self.model = model.to(self.device).eval()
        self.checkpoint_path = checkpoint_path
        self.compile = compile_requested() if compile is None else bool(compile)
        self._compiled: Any = None

    # --- construction -------------------------------------------------------------------
    @classmethod
    def default_config(cls) -> Any:
        """Config from the RS_EMBED_<MODEL>_* environment variables (or defaults)."""
        return cls.config_cls.from_env()

    @classmethod
    def build_model(cls, config: Any) -> nn.Module:
        raise NotImplementedError

    @classmethod
    def checkpoint_filter_fn(cls, checkpoint: Mapping[str, Any], model: nn.Module) -> dict[str, torch.Tensor]:
        """Turn the published file's contents into the model's state dict (explicit, testable rules)."""
        raise NotImplementedError

    @classmethod
    def published_state_dict(cls, model: nn.Module) -> dict[str, Any]:
        """The inverse of ``checkpoint_filter_fn``: the model's weights laid out as in the published file.

        Used to write demo/test checkpoints in the exact published format.
        """
        raise NotImplementedError

    @classmethod
    def write_random_checkpoint(cls, path: str | Path, *, config: Any = None, seed: int = 0) -> Path:
        """Write deterministic non-trivial weights in the published file format (demos and tests only)."""
        from .checkpoints import randomize_parameters, save_atomic

        config = config if config is not None else cls.default_config()
        torch.manual_seed(seed)
        model = randomize_parameters(cls.build_model(config), seed=seed)
        return save_atomic(cls.published_state_dict(model), path)

    @classmethod
    def from_checkpoint(cls, path: str | Path, *, config: Any = None, device: str = "cpu",
                        dtype: str = "float32") -> "Adapter":
        config = config if config is not None else cls.default_config()
        model = cls.build_model(config)
        raw = read_checkpoint_file(path)
        state_dict = cls.checkpoint_filter_fn(raw, model)
        load_strict(model, state_dict, source=str(path))
        return cls(model, config, device=device, dtype=dtype, checkpoint_path=str(path))

    # --- inference ----------------------------------------------------------------------
    def preprocess(self, raw: np.ndarray, *, bands: tuple[str, ...] | None = None,
                   tile_context: dict[str, Any] | None = None,
                   device: str | torch.device | None = None) -> torch.Tensor:
        """Raw provider units -> float32 network input on the adapter's device (or ``device``).

        ``bands`` names the channels of ``raw`` (checked against ``spec.bands`` when given);
        ``tile_context`` is what ``tile_context()`` computed for the chip's tile. ``device="cpu"``
        keeps the batch in host memory (the engine pins it and copies it while the model runs).
        """
        raise NotImplementedError

    def device_preprocessing(self) -> bool:
        """Whether ``preprocess_tensor`` gives ``preprocess``'s values for this configuration.

        GPU workers then copy the raw batch (stored dtype) and preprocess it on the device, so the host
        only reads, verifies and cuts chips. Adapters whose preprocessing has no exact tensor version
        (PIL resizes, per-chip percentiles) return False and are preprocessed on the host.
        """
        return False

    def preprocess_tensor(self, raw: torch.Tensor, *, bands: tuple[str, ...] | None = None,
                          tile_context: dict[str, Any] | None = None) -> torch.Tensor:
        """``preprocess`` of a raw batch that is already a tensor, where it lives (the GPU on workers).

        The same values as ``preprocess`` (tested on CPU, element for element); only called when
        ``device_preprocessing()`` is true.
        """
        raise AdapterError(f"{self.spec.model_id} has no tensor preprocessing for this configuration; "
                           "use preprocess()")

    def place(self, x: torch.Tensor, device: str | torch.device | None = None) -> torch.Tensor:
        """A preprocessed float32 batch on ``device`` (default: the adapter's); the end of every ``preprocess``."""
        return x.to(self.device if device is None else torch.device(device), dtype=torch.float32)

    def device_feeder(self) -> DeviceFeeder:
        """How the tile engine moves preprocessed batches to this adapter's device (see ``DeviceFeeder``)."""
        return DeviceFeeder(self.device)

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        """Network input on the adapter's device as float32 (autocast picks the compute precision)."""
        return x.to(self.device, dtype=torch.float32)

    def forward_embeddings(self, x: torch.Tensor, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward pass -> (pooled_mean (B, D), grid (B, D, h, w)); subclasses override."""
        raise NotImplementedError

    def embed(self, x: torch.Tensor, *, pooling: str = "mean", **kwargs: Any) -> Embeddings:
        if pooling not in {"mean", "max"}:
            raise AdapterError(f"pooling={pooling!r} is not supported; use 'mean' or 'max'")
        with torch.inference_mode(), autocast_context(self.device, self.dtype):
            pooled, grid = self._forward()(x, pooling=pooling, **kwargs)
        return Embeddings(pooled=pooled.float(), grid=grid.float())

    def _forward(self):
        """``forward_embeddings``, through ``torch.compile`` when requested (RS_EMBED_COMPILE=1)."""
        if not self.compile:
            return self.forward_embeddings
        if self._compiled is None:
            self._compiled = _CompiledForward(self)
        return self._compiled

    def tile_context(self, raw_tile: np.ndarray, *, bands: tuple[str, ...] | None = None) -> dict[str, Any]:
        """Statistics over a whole tile-month that preprocessing may use (e.g. per-tile S1 scaling).

        ``raw_tile`` is the full composite in raw units, (C, H, W) or (T, C, H, W). The result is
        passed to ``preprocess(..., tile_context=...)`` for every chip of that tile and recorded
        in the lineage. Default: no tile-level statistics.
        """
        return {}

    def tile_context_blocks(self, blocks, *, bands: tuple[str, ...] | None = None) -> dict[str, Any]:
        """``tile_context`` over a tile given as row blocks: ``blocks()`` yields (C, h, W) or (T, C, h, W)
        arrays (invalid pixels NaN) and may be called more than once. Adapters whose statistic can be
        computed in bounded memory override this; the default joins the blocks and calls ``tile_context``.
        """
        return self.tile_context(np.concatenate(list(blocks()), axis=-2), bands=bands)

    def forward_kwargs(self, raw_shape: tuple[int, ...], *, pixel_size_m: float) -> dict[str, Any]:
        """Extra forward arguments derived from the raw chips (e.g. ScaleMAE's ground resolution)."""
        return {}

    def embed_raw(self, raw: np.ndarray, *, bands: tuple[str, ...] | None = None, pixel_size_m: float = 10.0,
                  tile_context: dict[str, Any] | None = None, pooling: str = "mean") -> Embeddings:
        """Raw provider chips -> embeddings: ``preprocess`` then ``embed`` with the derived kwargs."""
        x = self.preprocess(raw, bands=bands, tile_context=tile_context or {})
        return self.embed(x, pooling=pooling, **self.forward_kwargs(np.shape(raw), pixel_size_m=pixel_size_m))

    @property
    def frames(self) -> int:
        """Temporal frames per sample (the config's ``frames`` knob where the model has one)."""
        return int(getattr(self.config, "frames", self.spec.frames))

    def batch_size(self) -> int:
        """The config's ``batch_size`` knob (RS_EMBED_<MODEL>_BATCH_SIZE) if set, else the device default."""
        return int(getattr(self.config, "batch_size", 0) or self.spec.default_batch_size.get(self.device.type, 8))

    # --- provenance ---------------------------------------------------------------------
    def preprocessing_spec(self) -> dict[str, Any]:
        """Everything that changes what the network sees; hashed into the lineage."""
        cfg = dataclasses.asdict(self.config) if dataclasses.is_dataclass(self.config) else dict(self.config)
        return {"model": self.spec.model_id, "sensor": self.spec.sensor, "bands": list(self.spec.bands),
                "chip_size": self.spec.chip_size, "frames": self.spec.frames, "config": cfg}

    def preprocessing_hash(self) -> str:
        return stable_hash(self.preprocessing_spec())[:16]


class _CompiledForward:
    """``torch.compile(adapter.forward_embeddings)``; if compiling fails, logs why and runs eager from then on.

    A failure is only blamed on the compiler when the eager forward then succeeds on the same batch;
    errors of the input itself are raised as they would be without compilation.
    """

    def __init__(self, adapter: "Adapter"):
        self.adapter = adapter
        self.fn: Any = torch.compile(adapter.forward_embeddings)
        self.failed: str | None = None

    def __call__(self, x: torch.Tensor, **kwargs: Any):
        if self.failed is None:
            try:
                return self.fn(x, **kwargs)
            except AdapterError:
                raise
            except Exception as exc:  # noqa: BLE001 - compiler/backend failures of any type
                out = self.adapter.forward_embeddings(x, **kwargs)  # raises if the input is at fault
                self.failed = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
                _log.warning("RS_EMBED_COMPILE=1: torch.compile of %s failed (%s); running eager instead",
                             self.adapter.spec.model_id, self.failed)
                return out
        return self.adapter.forward_embeddings(x, **kwargs)


def check_raw_input(raw: np.ndarray | torch.Tensor, spec: ModelSpec, *, ndim: int, channels: int | None = None,
                    bands: tuple[str, ...] | list[str] | None = None,
                    expected_bands: tuple[str, ...] | None = None) -> np.ndarray:
    """Validate a raw batch against a spec; the error names the expected layout and band order.

    ``bands`` (optional) names the channels of ``raw``; when given it must equal the model's band
    order, so a stack in the wrong order fails instead of producing silently wrong embeddings.
    """
    arr = raw if isinstance(raw, torch.Tensor) else np.asarray(raw)  # only the shape is checked
    expected_bands = tuple(spec.bands if expected_bands is None else expected_bands)
    channels = len(expected_bands) if channels is None else channels
    if bands is not None and tuple(bands) != expected_bands:
        raise AdapterError(f"{spec.model_id} needs bands in the order {', '.join(expected_bands)}, "
                           f"got {', '.join(bands)}; reorder the channels (e.g. composite.sel(band=[...]))")
    layout = "(B, C, H, W)" if ndim == 4 else "(B, T, C, H, W)"
    if arr.ndim != ndim:
        raise AdapterError(f"{spec.model_id} expects raw input shaped {layout}, got shape {arr.shape}; "
                           f"add the batch axis with arr[None] for a single chip")
    c_axis = 1 if ndim == 4 else 2
    if arr.shape[c_axis] != channels:
        raise AdapterError(f"{spec.model_id} expects {channels} channels in the order {', '.join(expected_bands)}, "
                           f"got {arr.shape[c_axis]} (shape {arr.shape}); select the bands in that order")
    return arr
