"""What each model consumes and produces, as data: importable without torch.

The pretrained config of every model (timm's ``pretrained_cfg`` idea): bands, chip size, embedding
dimension, grid, checkpoint source. The Dagster code location, the CLI and the catalog read these
without importing torch or any network; a model module is imported only where that model runs.
Each model module uses its spec from here (``FomoAdapter.spec is SPECS["fomo"]``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Mapping


class AdapterError(ValueError):
    """Bad input or configuration for an adapter; the message names the problem and the fix."""


class CheckpointError(AdapterError):
    """A checkpoint that cannot be found, downloaded or loaded strictly."""


@dataclass(frozen=True)
class CheckpointSource:
    """Where the published weights live and how to recognise a complete file."""

    filename: str
    url: str | None = None  # plain HTTP(S) download
    hf_repo: str | None = None  # Hugging Face hub repo id (file = ``filename``)
    min_bytes: int = 0  # a download smaller than this is treated as truncated
    file_format: str = "state_dict"  # "state_dict" | "mmengine" (weights under "state_dict")
    env_prefix: str = ""  # e.g. "RS_EMBED_FOMO" -> RS_EMBED_FOMO_CKPT, ..._CACHE_DIR, ...


@dataclass(frozen=True)
class ModelSpec:
    """What a model consumes and produces: the pretrained config, as data (timm style)."""

    model_id: str
    checkpoint_id: str  # checkpoint asset this model loads (terrafm_b and terrafm_b_s1 share one)
    description: str
    sensor: str  # "s2" | "s1": which composite feeds the model
    bands: tuple[str, ...]  # provider band names, in the order the network consumes them
    chip_size: int  # pixels cut from the 10 m tile per chip
    image_size: int  # network input size
    embed_dim: int
    grid_size: int  # output grid cells per chip side
    checkpoint: CheckpointSource
    frames: int = 1  # temporal frames per sample (AgriFM)
    source_resolution_m: float = 10.0
    licence: str = ""
    paper: str = ""
    # CUDA defaults fit a 24 GB card: the largest power of two <= min(0.5 × (24 GiB − weights − 1 GiB) /
    # measured activations per chip, 512 MiB / host bytes per chip, 512); the arithmetic and the
    # measurements are in benchmarks/bench_activation_memory.py and the README ("GPU and precision").
    default_batch_size: Mapping[str, int] = field(default_factory=lambda: {"cpu": 8, "cuda": 64})

    @property
    def input_channels(self) -> int:
        return len(self.bands)

    def configured_frames(self) -> int:
        """Frames per sample as deployed: ``<env_prefix>_FRAMES`` (e.g. RS_EMBED_AGRIFM_FRAMES) for temporal
        models, 1 for single-date models."""
        if self.frames <= 1:
            return 1
        return env_int(f"{self.checkpoint.env_prefix}_FRAMES", self.frames)

    @property
    def grid_resolution_m(self) -> float:
        """Ground size of one output grid cell, in metres."""
        return self.chip_size * self.source_resolution_m / self.grid_size


def env_str(name: str, default: str) -> str:
    value = os.environ.get(name)
    return default if value is None or value.strip() == "" else value.strip()


def env_int(name: str, default: int) -> int:
    raw = env_str(name, str(default))
    try:
        return int(raw)
    except ValueError:
        raise AdapterError(f"{name}={raw!r} is not an integer; set it to a whole number or unset it") from None


def env_float(name: str, default: float) -> float:
    raw = env_str(name, str(default))
    try:
        return float(raw)
    except ValueError:
        raise AdapterError(f"{name}={raw!r} is not a number; set it to a number or unset it") from None


def env_bool(name: str, default: bool) -> bool:
    raw = env_str(name, "1" if default else "0").lower()
    if raw in {"1", "true", "yes", "on"}:
        return True
    if raw in {"0", "false", "no", "off"}:
        return False
    raise AdapterError(f"{name}={raw!r} is not a boolean; use 1/0, true/false or yes/no")


def env_int_tuple(name: str, default: tuple[int, ...], length: int | None = None) -> tuple[int, ...]:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        values = tuple(int(v) for v in raw.replace(" ", "").split(",") if v != "")
    except ValueError:
        raise AdapterError(f"{name}={raw!r} must be comma-separated integers") from None
    if length is not None and len(values) != length:
        raise AdapterError(f"{name} must list exactly {length} integers, got {len(values)}: {raw!r}")
    return values


def stable_hash(obj: Any) -> str:
    """sha256 of a JSON-serialisable object with sorted keys (for preprocessing specs)."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()


# --- fomo
FOMO_BANDS = ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B11", "B12")
FOMO_URL = ("https://www.dropbox.com/scl/fi/4ckmxlcbc0tcod8hknp7c/fomo_single_embedding_layer_weights.pt"
            "?rlkey=26tlf3yaz93vvcosr0qrvklub&dl=1")
FOMO = ModelSpec(
    model_id="fomo",
    checkpoint_id="fomo",
    description="FoMo-Net_1 (FoMo-Bench MultiSpectralViT): every Sentinel-2 band is a spectral token set; "
                "pooled = token mean, grid = band-averaged 16 px patch tokens (160 m cells).",
    sensor="s2",
    bands=FOMO_BANDS,
    chip_size=64,
    image_size=64,
    embed_dim=768,
    grid_size=4,
    checkpoint=CheckpointSource(filename="fomo_single_embedding_layer_weights.pt", url=FOMO_URL,
                                min_bytes=50 * 1024 * 1024, env_prefix="RS_EMBED_FOMO"),
    licence="MIT (FoMo-Bench)",
    paper="Bountos et al., FoMo-Bench (2024)",
    default_batch_size={"cpu": 8, "cuda": 512},  # 4.3 MB activations, 0.24 MB host per chip: the 512 cap
)


# --- scalemae_rgb
SCALEMAE_BANDS = ("B4", "B3", "B2")
SCALEMAE_HF_REPO = "MVRL/scalemae-vitlarge-800"

SCALEMAE_CHECKPOINT = CheckpointSource(
    filename="pytorch_model.bin",
    hf_repo=SCALEMAE_HF_REPO,
    min_bytes=1100 * 1024 * 1024,  # the fp32 file is ≈1.21 GB (303.1 M parameters)
    env_prefix="RS_EMBED_SCALEMAE",
)

SCALEMAE_RGB = ModelSpec(
    model_id="scalemae_rgb",
    checkpoint_id="scalemae_rgb",
    description="ScaleMAE ViT-L/16 on Sentinel-2 RGB (B4,B3,B2) with GSD-scaled sin-cos positions: pooled = "
                "mean of the patch tokens (CLS excluded, no final norm), grid = 16 px patch tokens (160 m cells).",
    sensor="s2",
    bands=SCALEMAE_BANDS,
    chip_size=224,
    image_size=224,
    embed_dim=1024,
    grid_size=14,
    checkpoint=SCALEMAE_CHECKPOINT,
    licence="see the MVRL/scalemae-vitlarge-800 model card (not verified offline)",
    paper="Reed et al., Scale-MAE: A Scale-Aware Masked Autoencoder for Multiscale Geospatial "
          "Representation Learning (ICCV 2023)",
    default_batch_size={"cpu": 8, "cuda": 256},  # 9.8 MB activations, 1.34 MB host per chip (host-bound)
)


# --- agrifm
AGRIFM_BANDS = ("B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B11", "B12")
AGRIFM_URL = "https://glass.hku.hk/casual/AgriFM/AgriFM.pth"
AGRIFM = ModelSpec(
    model_id="agrifm",
    checkpoint_id="agrifm",
    description="AgriFM Video-Swin encoder (S2 branch) on an 8-frame Sentinel-2 stack; pooled = spatial mean of "
                "the final normalised map, grid = encoder_features (1024×14×14, 160 m cells).",
    sensor="s2",
    bands=AGRIFM_BANDS,
    chip_size=224,
    image_size=224,
    embed_dim=1024,
    grid_size=14,
    frames=8,
    # rs-embed's own threshold: a fp32 S2 backbone alone is ~350 MB, so 100 MiB only rejects error
    # pages and cut-off downloads without betting on how the file stores its extras.
    checkpoint=CheckpointSource(filename="AgriFM.pth", url=AGRIFM_URL, min_bytes=100 * 1024 * 1024,
                                file_format="mmengine", env_prefix="RS_EMBED_AGRIFM"),
    licence="Apache-2.0 (flyakon/AgriFM)",
    paper="Li et al., AgriFM: A Multi-source Temporal Remote Sensing Foundation Model for Crop Mapping (2025)",
    # ~136 GFLOPs per 8×224² sample; measured float32 activations 214 MB per sample (stage 0: 25k tokens,
    # the 4×128 MLP and 256 windows × 4 heads × 98² logits), so 32 would fit 24 GB; the 16 MB input per
    # sample (8 frames × 10 bands × 224²) makes the host bound (512 MiB a batch) the tighter one.
    default_batch_size={"cpu": 8, "cuda": 16},
)


# --- dynamicvis
DYNAMICVIS_ENV = "RS_EMBED_DYNAMICVIS"
DYNAMICVIS_BANDS = ("B4", "B3", "B2")
DYNAMICVIS_HF_REPO = "KyanChen/DynamicVis"
DYNAMICVIS_CKPT_FILE = "pretrain_dynamicvis_b_bf16_mamba_best_single-label_f1-score_epoch_170.pth"
DYNAMICVIS = ModelSpec(
    model_id="dynamicvis",
    checkpoint_id="dynamicvis",
    description="DynamicVis-B (routed sparse bidirectional Mamba backbone) on Sentinel-2 RGB B4,B3,B2; "
                "pooled = spatial mean of the stage-4 map, grid = stage-4 map (768, 16, 16) at 512 px.",
    sensor="s2",
    bands=DYNAMICVIS_BANDS,
    chip_size=512,
    image_size=512,
    embed_dim=768,
    grid_size=16,
    checkpoint=CheckpointSource(filename=DYNAMICVIS_CKPT_FILE, hf_repo=DYNAMICVIS_HF_REPO, min_bytes=50 * 1024 * 1024,
                                file_format="mmengine", env_prefix=DYNAMICVIS_ENV),
    licence="see KyanChen/DynamicVis",
    paper="Chen et al., DynamicVis: an efficient and general visual foundation model for remote sensing "
          "image understanding (2025)",
    # CPU (2 cores, measured): B=1 takes ~2.5 s warm and +0.12 GB peak, B=4 ~1.5 s/image and +0.36 GB (the
    # chunked scan processes channel blocks of ~4 MB, so memory grows only with activations); larger CPU
    # batches add latency without throughput. CUDA: measured activations 45 MB per 512 px image (torch
    # scan; mamba_ssm never materialises the state), host 3.75 MB per image: 128 on a 24 GB card.
    default_batch_size={"cpu": 4, "cuda": 128},
)


# --- terrafm_b, terrafm_b_s1 (one network, one checkpoint)
TERRAFM_S2_BANDS = ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B11", "B12")
TERRAFM_S1_BANDS = ("VV", "VH")
TERRAFM_CHECKPOINT = CheckpointSource(
    filename="TerraFM-B.pth",
    hf_repo="MBZUAI/TerraFM",
    min_bytes=400 * 1024 * 1024,  # the fp32 file is ≈452 MB (112.95 M parameters)
    env_prefix="RS_EMBED_TERRAFM",
)

# fields shared by the S2 and S1 models (one network, one checkpoint)
_TERRAFM_SPEC = ModelSpec(
model_id="terrafm_b", checkpoint_id="terrafm_b", description="", sensor="s2", bands=TERRAFM_S2_BANDS,
chip_size=224, image_size=224, embed_dim=768, grid_size=14, checkpoint=TERRAFM_CHECKPOINT,
licence="see the MBZUAI/TerraFM model card (not verified offline)",
paper="Danish et al., TerraFM: A Scalable Foundation Model for Unified Multisensor Earth Observation (2025)",
default_batch_size={"cpu": 8, "cuda": 128},  # 8.7 MB activations, 2.9 MB host per chip (host-bound)
)

TERRAFM_B = dataclasses.replace(
_TERRAFM_SPEC, model_id="terrafm_b", sensor="s2", bands=TERRAFM_S2_BANDS,
description="TerraFM-B on the 12-band Sentinel-2 L2A composite: pooled = CLS token after the final norm, "
            "grid = final-normed 16 px patch tokens (160 m cells). Stem: RS_EMBED_TERRAFM_S2_STEM.")

TERRAFM_B_S1 = dataclasses.replace(
_TERRAFM_SPEC, model_id="terrafm_b_s1", sensor="s1", bands=TERRAFM_S1_BANDS,
default_batch_size={"cpu": 8, "cuda": 512},  # 2 input bands: 6.7 MB activations, 0.96 MB host per chip
description="TerraFM-B on the Sentinel-1 VV/VH (linear) composite: log1p + 99th-percentile scaling "
            "(RS_EMBED_TERRAFM_S1_SCALING), pooled = CLS after the final norm, grid = normed patch tokens.")


SPECS: dict[str, ModelSpec] = {s.model_id: s for s in (FOMO, TERRAFM_B, TERRAFM_B_S1, SCALEMAE_RGB, AGRIFM, DYNAMICVIS)}
