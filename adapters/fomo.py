"""FoMo-Net_1 (FoMo-Bench ``MultiSpectralViT``, single embedding layer) for Sentinel-2.

Each band is its own spectral modality: the 64×64 chip of every band is cut into 16×16 patches,
embedded by one shared patch embedding, tagged with that band's spectral embedding and the
patch position, and all bands' tokens are concatenated band-major (token = c·16 + h·4 + w).
No CLS token is used. The transformer is pre-norm with a final LayerNorm.

Outputs (as rs-embed): pooled = mean (or max) over all C·16 tokens -> (768,);
grid = tokens reshaped (C, 4, 4, D) and averaged over bands -> (768, 4, 4).

Published checkpoint: ``fomo_single_embedding_layer_weights.pt``, a raw state dict with no prefix
(145 tensors incl. the unused ``mlp_head``/``cls_token``), loaded strictly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .base import (Adapter, AdapterError, CheckpointError, CheckpointSource, ModelSpec, check_raw_input, env_int,
                   env_int_tuple, env_str)
from .preprocess import finite_or_zero_tensor, host_tensor, resize_bilinear

from .specs import FOMO as _SPEC, FOMO_BANDS as S2_BANDS, FOMO_URL  # noqa: F401 (spec data: torch-free)

# FoMo-Bench modality table (configs/datasets/fomo_pretraining_datasets.json): 37 entries.
# 0-3 planet RGBN; 4,5 S1 VV,VH; 6-18 S2 B1..B12 incl. B8A (16 = B10); 19-27 landsat;
# 28-31 aerial RGBN; 32 dem; 33-36 gaofen2 RGBN.
NUM_MODALITIES = 37
DEFAULT_S2_KEYS = (6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 17, 18)


NORM_MODES = ("unit_scale", "per_tile_minmax", "none")


@dataclass(frozen=True)
class FomoConfig:
    """Knobs of the rs-embed FoMo adapter (RS_EMBED_FOMO_*)."""

    image_size: int = 64
    patch_size: int = 16
    dim: int = 768
    depth: int = 12
    heads: int = 12
    dim_head: int = 64
    mlp_dim: int = 2048
    num_classes: int = 1000
    norm: str = "unit_scale"
    s2_keys: tuple[int, ...] = DEFAULT_S2_KEYS

    def __post_init__(self) -> None:
        if self.norm not in NORM_MODES:
            raise AdapterError(f"RS_EMBED_FOMO_NORM={self.norm!r} is not supported; use one of {', '.join(NORM_MODES)}")
        if len(self.s2_keys) != len(S2_BANDS):
            raise AdapterError(f"RS_EMBED_FOMO_S2_KEYS needs exactly {len(S2_BANDS)} keys (one per band "
                               f"{','.join(S2_BANDS)}), got {len(self.s2_keys)}")
        if any(not 0 <= k < NUM_MODALITIES for k in self.s2_keys):
            raise AdapterError(f"RS_EMBED_FOMO_S2_KEYS values must lie in 0..{NUM_MODALITIES - 1}, got {self.s2_keys}")
        if self.image_size % self.patch_size:
            raise AdapterError(f"RS_EMBED_FOMO_IMG={self.image_size} must be a multiple of "
                               f"RS_EMBED_FOMO_PATCH={self.patch_size}")

    @classmethod
    def from_env(cls) -> "FomoConfig":
        return cls(
            image_size=env_int("RS_EMBED_FOMO_IMG", 64),
            patch_size=env_int("RS_EMBED_FOMO_PATCH", 16),
            dim=env_int("RS_EMBED_FOMO_DIM", 768),
            depth=env_int("RS_EMBED_FOMO_DEPTH", 12),
            heads=env_int("RS_EMBED_FOMO_HEADS", 12),
            mlp_dim=env_int("RS_EMBED_FOMO_MLP_DIM", 2048),
            num_classes=env_int("RS_EMBED_FOMO_NUM_CLASSES", 1000),
            norm=env_str("RS_EMBED_FOMO_NORM", "unit_scale").lower(),
            s2_keys=env_int_tuple("RS_EMBED_FOMO_S2_KEYS", DEFAULT_S2_KEYS, length=len(S2_BANDS)),
        )


# --- network -----------------------------------------------------------------------------------
class PatchEmbed(nn.Module):
    """Single-channel patchify -> LN(p²) -> Linear(p²→D) -> LN(D).

    Submodule names ``1``/``2``/``3`` match the published ``to_patch_embedding.{1,2,3}`` keys
    (index 0 is the parameter-free Rearrange of the original).
    """

    def __init__(self, patch_size: int, dim: int):
        super().__init__()
        self.patch_size = patch_size
        patch_dim = patch_size * patch_size
        self.add_module("1", nn.LayerNorm(patch_dim))
        self.add_module("2", nn.Linear(patch_dim, dim))
        self.add_module("3", nn.LayerNorm(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (N, H, W) single band
        n, h, w = x.shape
        p = self.patch_size
        x = x.reshape(n, h // p, p, w // p, p).permute(0, 1, 3, 2, 4).reshape(n, (h // p) * (w // p), p * p)
        return getattr(self, "3")(getattr(self, "2")(getattr(self, "1")(x)))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.scale = dim_head ** -0.5
        self.norm = nn.LayerNorm(dim)
        self.to_qkv = nn.Linear(dim, inner * 3, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.to_qkv(self.norm(x)).reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        # softmax(q·kᵀ·scale)·v as one fused kernel (flash / memory-efficient on CUDA): no (N, N) matrix
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        # indices match the published keys net.0 (LN), net.1 (Linear), net.4 (Linear)
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Identity(),
                                 nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Transformer(nn.Module):
    def __init__(self, dim: int, depth: int, heads: int, dim_head: int, mlp_dim: int):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleList([Attention(dim, heads, dim_head), FeedForward(dim, mlp_dim)]) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for attn, ff in self.layers:
            x = attn(x) + x
            x = ff(x) + x
        return self.norm(x)


class MultiSpectralViT(nn.Module):
    """FoMo-Net_1 encoder. ``forward_features(x, keys)`` -> band-major tokens (B, C·n, D)."""

    def __init__(self, cfg: FomoConfig):
        super().__init__()
        self.cfg = cfg
        self.grid = cfg.image_size // cfg.patch_size
        num_patches = self.grid * self.grid
        self.to_patch_embedding = PatchEmbed(cfg.patch_size, cfg.dim)
        self.pos_embedding = nn.Parameter(torch.zeros(1, num_patches + 1, cfg.dim))
        self.spectral_embedding = nn.Parameter(torch.zeros(1, NUM_MODALITIES + 1, cfg.dim))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))  # in the checkpoint; unused for embeddings
        self.transformer = Transformer(cfg.dim, cfg.depth, cfg.heads, cfg.dim_head, cfg.mlp_dim)
        self.mlp_head = nn.Linear(cfg.dim, cfg.num_classes)  # in the checkpoint; unused for embeddings
        for p in (self.pos_embedding, self.spectral_embedding, self.cls_token):
            nn.init.normal_(p, std=0.02)

    def forward_features(self, x: torch.Tensor, keys: torch.Tensor | tuple[int, ...]) -> torch.Tensor:
        b, c, h, w = x.shape
        if h != self.cfg.image_size or w != self.cfg.image_size:
            # positions are sliced, not interpolated: any other size would silently misplace tokens
            raise AdapterError(f"FoMo input must be {self.cfg.image_size}×{self.cfg.image_size}, got {h}×{w}; "
                               "preprocess() resizes raw chips")
        keys = torch.as_tensor(keys, device=x.device, dtype=torch.long)
        if keys.numel() != c:
            raise AdapterError(f"FoMo needs one spectral key per channel: {c} channels, {keys.numel()} keys")
        tokens = self.to_patch_embedding(x.reshape(b * c, h, w)).reshape(b, c, self.grid * self.grid, -1)
        tokens = tokens + self.spectral_embedding[0, keys][None, :, None, :]
        tokens = tokens + self.pos_embedding[:, 1:self.grid * self.grid + 1][:, None]
        return self.transformer(tokens.reshape(b, c * self.grid * self.grid, -1))


# --- adapter -----------------------------------------------------------------------------------
class FomoAdapter(Adapter):
    spec = _SPEC
    config_cls = FomoConfig

    @classmethod
    def build_model(cls, config: FomoConfig) -> MultiSpectralViT:
        return MultiSpectralViT(config)

    @classmethod
    def checkpoint_filter_fn(cls, checkpoint: Mapping[str, Any], model: nn.Module) -> dict[str, torch.Tensor]:
        """The published file is the raw state dict: no prefix, no renames; nothing dropped."""
        if "state_dict" in checkpoint and isinstance(checkpoint["state_dict"], Mapping):
            raise CheckpointError("this FoMo file wraps its weights in 'state_dict'; the published "
                                  "fomo_single_embedding_layer_weights.pt is a raw state dict — use that file")
        return {k: v for k, v in checkpoint.items()}

    @classmethod
    def published_state_dict(cls, model: nn.Module) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    def preprocess(self, raw: np.ndarray, *, bands: tuple[str, ...] | None = None,
                   tile_context: dict[str, Any] | None = None,
                   device: str | torch.device | None = None) -> torch.Tensor:
        """Raw S2 L2A DN (B, 12, H, W) -> normalised (B, 12, img, img) as rs-embed's FoMo adapter.

        nan→0, clip [0, 10000], then ``unit_scale`` (/10000), ``per_tile_minmax`` (per-chip, per-band
        min-max after /10000) or ``none``; non-square chips are reflect-padded to a square, then
        bilinearly resized (align_corners=False, no antialias) to RS_EMBED_FOMO_IMG.
        """
        arr = check_raw_input(raw, self.spec, ndim=4, bands=bands)
        return self.place(self.preprocess_tensor(host_tensor(arr, square=True), bands=bands), device)

    def device_preprocessing(self) -> bool:
        return True  # the engine's chips are square (no padding) and the resize is torch's in both paths

    def preprocess_tensor(self, raw: torch.Tensor, *, bands: tuple[str, ...] | None = None,
                          tile_context: dict[str, Any] | None = None) -> torch.Tensor:
        """``preprocess``'s steps on a tensor of square chips, wherever it lives (the host path pads, then calls this)."""
        x = check_raw_input(raw, self.spec, ndim=4, bands=bands)
        if x.shape[-1] != x.shape[-2]:
            raise AdapterError(f"fomo tensor preprocessing takes square chips, got {tuple(x.shape[-2:])}; "
                               "preprocess() pads non-square chips")
        x = torch.clamp(finite_or_zero_tensor(x), 0.0, 10000.0)
        if self.config.norm in ("unit_scale", "per_tile_minmax"):
            x = x / 10000.0
        if self.config.norm == "per_tile_minmax":
            lo = x.amin(dim=(2, 3), keepdim=True)
            hi = x.amax(dim=(2, 3), keepdim=True)
            x = (x - lo) / torch.clamp_min(hi - lo, 1e-6)
        return resize_bilinear(x.contiguous(), self.config.image_size)

    def forward_embeddings(self, x: torch.Tensor, *, pooling: str = "mean", **_: Any):
        tokens = self.model.forward_features(self.to_device(x), self.config.s2_keys)
        pooled = tokens.mean(dim=1) if pooling == "mean" else tokens.amax(dim=1)
        b, _, d = tokens.shape
        g = self.model.grid
        grid = tokens.reshape(b, x.shape[1], g, g, d).mean(dim=1).permute(0, 3, 1, 2)
        return pooled, grid

    def preprocessing_spec(self) -> dict[str, Any]:
        spec = super().preprocessing_spec()
        spec.update(resize="reflect_pad_square+bilinear(align_corners=False)", clip=[0, 10000],
                    token_layout="band_major", pooled="token_" + "mean/max", grid="spectral_mean_patch_tokens")
        return spec

