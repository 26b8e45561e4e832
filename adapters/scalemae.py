"""ScaleMAE ViT-L/16 (HF ``MVRL/scalemae-vitlarge-800``, as loaded by ``rshf.scalemae.ScaleMAE``) on S2 RGB.

Network: a timm-style ViT-L/16 (width 1024, 24 blocks, 16 heads, MLP ×4, qkv bias, LayerNorm eps
1e-6, exact GELU) with a CLS token and **no learned position embedding**. Instead every forward
builds a ground-sample-distance (GSD) scaled 2-D sin-cos embedding:

- patch (row r, column c) sits at position ``(c · res, r · res)`` where ``res`` is the input's
  ground resolution in metres (one value per batch item);
- the first half of the channels encodes the column position, the second half the row position;
  each half is ``[sin(pos · ω), cos(pos · ω)]`` with ``ω_i = 1 / 10000^(i / (D/4))``, i < D/4;
- the CLS slot gets zeros; everything is computed in float32.

Outputs (as rs-embed, which calls ``wrapper.model.forward_features(x, input_res=...)``):
``pooled`` = mean (or max) over the 196 patch tokens, CLS excluded; ``grid`` = the patch tokens
(1024, 14, 14). **No final LayerNorm is applied**: the HF repo has no config.json, so rshf builds
the backbone with ``global_pool=False``, timm's ``fc_norm`` is then an Identity and ``norm`` is
never called. ``model.norm.*`` is still in the published file; the module keeps it (``norm``) so
loading stays strict, but ``forward_tokens`` does not apply it (recorded in ``preprocessing_spec``).

Preprocessing (rs-embed ``scalemae_rgb``): bands B4, B3, B2 raw SR DN; NaN/inf -> 0;
``clip(raw / 10000, 0, 1) × 255`` truncated to uint8 (no contrast stretch); PIL BICUBIC resize to
``RS_EMBED_SCALEMAE_IMG`` (default 224); ``/255``; ImageNet mean/std.

GSD: the network is told the *true* ground resolution of its input,
``input_res_m = pixel_size_m × min(H, W) / image_size`` (``forward_kwargs``); a 224 px chip of the
10 m grid at 224 px -> 10 m. ``forward_embeddings`` defaults to ``10 m × chip_size / image_size``.

Knobs: ``RS_EMBED_SCALEMAE_IMG`` (default 224, multiple of 16), ``RS_EMBED_SCALEMAE_BATCH_SIZE``
(default CPU 8 / CUDA 32), checkpoint knobs with prefix ``RS_EMBED_SCALEMAE`` (``_CKPT`` for a
local file, …; see ``adapters.checkpoints``). ``RS_EMBED_SCALEMAE_ID`` (rs-embed's HF repo switch)
is accepted only with its default value; another repo means other weights — download the file and
point ``RS_EMBED_SCALEMAE_CKPT`` at it.

Published checkpoint: ``pytorch_model.bin`` in ``MVRL/scalemae-vitlarge-800``: the wrapper's state
dict (293 tensors, every key prefixed ``model.``, ≈1.21 GB fp32), loaded strictly.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import partial
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from timm.models.vision_transformer import Block
from torch import nn

from .base import (Adapter, AdapterError, CheckpointError, CheckpointSource, ModelSpec, check_raw_input, env_int,
                   env_str)
from .preprocess import IMAGENET_MEAN, IMAGENET_STD, ImageNetRGBOnDevice, sr_rgb_to_imagenet

from .specs import (SCALEMAE_BANDS as RGB_BANDS, SCALEMAE_CHECKPOINT, SCALEMAE_HF_REPO as HF_REPO,  # noqa: F401
                    SCALEMAE_RGB as _SPEC)
PREFIX = "model."  # the rshf wrapper keeps the backbone at ``.model``


@dataclass(frozen=True)
class ScaleMAEConfig:
    """ScaleMAE ViT-L/16 architecture (fixed by the checkpoint) and the RS_EMBED_SCALEMAE_* knobs."""

    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    patch_size: int = 16
    in_chans: int = 3
    image_size: int = 224
    batch_size: int = 0  # 0: the spec's per-device default

    def __post_init__(self) -> None:
        if self.image_size <= 0 or self.image_size % self.patch_size:
            raise AdapterError(f"RS_EMBED_SCALEMAE_IMG={self.image_size} must be a positive multiple of the "
                               f"patch size {self.patch_size}")
        if self.embed_dim % 4:
            raise AdapterError(f"embed_dim={self.embed_dim} must be divisible by 4 (2-D sin-cos embedding)")
        if self.embed_dim % self.num_heads:
            raise AdapterError(f"embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}")
        if self.batch_size < 0:
            raise AdapterError(f"RS_EMBED_SCALEMAE_BATCH_SIZE={self.batch_size} must be positive (or 0/unset "
                               "for the default: CPU 8, CUDA 32)")

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @classmethod
    def from_env(cls) -> "ScaleMAEConfig":
        repo = env_str("RS_EMBED_SCALEMAE_ID", HF_REPO)
        if repo != HF_REPO:
            raise AdapterError(f"RS_EMBED_SCALEMAE_ID={repo!r} is not supported: this adapter implements "
                               f"{HF_REPO} (ViT-L/16). For a local copy of its pytorch_model.bin set "
                               "RS_EMBED_SCALEMAE_CKPT=/path/to/pytorch_model.bin and unset RS_EMBED_SCALEMAE_ID")
        return cls(image_size=env_int("RS_EMBED_SCALEMAE_IMG", 224),
                   batch_size=env_int("RS_EMBED_SCALEMAE_BATCH_SIZE", 0))


# --- network -----------------------------------------------------------------------------------
def gsd_sincos_pos_embed(dim: int, grid_size: int, res: torch.Tensor) -> torch.Tensor:
    """GSD-scaled 2-D sin-cos position embedding with a zero CLS slot -> (B, 1 + grid², dim), float32.

    ``res`` (B,) is the ground resolution in metres. Patch (row r, col c) has positions
    ``(c·res, r·res)``; channels ``[:dim/2]`` encode the column, ``[dim/2:]`` the row, each as
    ``[sin(pos·ω), cos(pos·ω)]`` with ``ω_i = 10000^(-i/(dim/4))``.
    """
    quarter = dim // 4
    res = res.to(torch.float32)
    omega = torch.arange(quarter, dtype=torch.float32, device=res.device) / float(quarter)
    omega = 1.0 / 10000 ** omega
    idx = torch.arange(grid_size, dtype=torch.float32, device=res.device)
    rows, cols = torch.meshgrid(idx, idx, indexing="ij")  # row-major patch order

    def encode(pos: torch.Tensor) -> torch.Tensor:  # (grid²,) -> (B, grid², dim/2)
        angles = (pos[None, :] * res[:, None])[..., None] * omega
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)

    emb = torch.cat([encode(cols.reshape(-1)), encode(rows.reshape(-1))], dim=-1)
    return torch.cat([torch.zeros(res.shape[0], 1, dim, dtype=torch.float32, device=res.device), emb], dim=1)


class PatchEmbed(nn.Module):
    """16×16 patchify by a strided convolution (key ``patch_embed.proj``); no input-size check."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class ScaleMAEViT(nn.Module):
    """ScaleMAE ViT backbone (the rshf wrapper's ``.model``). ``forward_tokens`` -> (B, 1 + N, D), no final norm."""

    def __init__(self, cfg: ScaleMAEConfig):
        super().__init__()
        self.cfg = cfg
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, cfg.embed_dim)
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.blocks = nn.ModuleList(Block(cfg.embed_dim, cfg.num_heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=True,
                                          norm_layer=norm) for _ in range(cfg.depth))
        # In the published file, never applied: rshf's backbone ends in fc_norm = Identity (global_pool=False).
        self.norm = norm(cfg.embed_dim)
        nn.init.normal_(self.cls_token, std=0.02)

    def forward_tokens(self, x: torch.Tensor, input_res_m: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        p = self.cfg.patch_size
        if h != w or h % p:
            raise AdapterError(f"ScaleMAE needs a square input whose side is a multiple of {p}, got {h}×{w}; "
                               "preprocess() resizes raw chips")
        tokens = self.patch_embed(x)
        pos = gsd_sincos_pos_embed(tokens.shape[-1], h // p, input_res_m.to(x.device))
        tokens = torch.cat([self.cls_token.expand(b, -1, -1), tokens], dim=1) + pos.to(tokens.dtype)
        for blk in self.blocks:
            tokens = blk(tokens)
        return tokens  # deliberately no self.norm (see module docstring)


# --- adapter -----------------------------------------------------------------------------------
class ScaleMAEAdapter(ImageNetRGBOnDevice, Adapter):
    spec = _SPEC
    config_cls = ScaleMAEConfig

    @classmethod
    def build_model(cls, config: ScaleMAEConfig) -> ScaleMAEViT:
        return ScaleMAEViT(config)

    @classmethod
    def checkpoint_filter_fn(cls, checkpoint: Mapping[str, Any], model: nn.Module) -> dict[str, torch.Tensor]:
        """``pytorch_model.bin`` holds the rshf wrapper's state dict: strip the ``model.`` prefix, nothing else.

        ``model.norm.*`` is kept (loaded into the unused ``norm``), so every published key is accounted for.
        """
        unprefixed = sorted(k for k in checkpoint if not k.startswith(PREFIX))
        if unprefixed:
            shown = ", ".join(unprefixed[:5]) + (f" … (+{len(unprefixed) - 5} more)" if len(unprefixed) > 5 else "")
            raise CheckpointError(
                f"ScaleMAE checkpoint keys must all start with {PREFIX!r} (the layout of {HF_REPO}/pytorch_model.bin); "
                f"{len(unprefixed)} do not: [{shown}]. Use the published pytorch_model.bin, not a re-saved backbone")
        return {k[len(PREFIX):]: v for k, v in checkpoint.items()}

    @classmethod
    def published_state_dict(cls, model: nn.Module) -> dict[str, torch.Tensor]:
        return {PREFIX + k: v.detach().clone() for k, v in model.state_dict().items()}

    def default_input_res_m(self) -> float:
        """Ground resolution of a full chip of the 10 m grid after resizing to the network size."""
        return self.spec.source_resolution_m * self.spec.chip_size / self.config.image_size

    def preprocess(self, raw: np.ndarray, *, bands: tuple[str, ...] | None = None,
                   tile_context: dict[str, Any] | None = None,
                   device: str | torch.device | None = None) -> torch.Tensor:
        """Raw S2 SR DN (B, 3, H, W) in B4,B3,B2 order -> ImageNet-normalised (B, 3, img, img)."""
        arr = check_raw_input(raw, self.spec, ndim=4, bands=bands)
        return self.place(sr_rgb_to_imagenet(arr, self.config.image_size), device)

    def forward_kwargs(self, raw_shape: tuple[int, ...], *, pixel_size_m: float) -> dict[str, Any]:
        """input_res_m = pixel_size_m × min(H, W) / image_size: the true GSD of the resized input."""
        if not (isinstance(pixel_size_m, (int, float)) and math.isfinite(pixel_size_m) and pixel_size_m > 0):
            raise AdapterError(f"pixel_size_m={pixel_size_m!r} must be a positive number of metres")
        h, w = int(raw_shape[-2]), int(raw_shape[-1])
        return {"input_res_m": float(pixel_size_m) * min(h, w) / self.config.image_size}

    def _res_tensor(self, input_res_m: float | Sequence[float] | np.ndarray | torch.Tensor | None,
                    batch: int) -> torch.Tensor:
        if input_res_m is None:
            input_res_m = self.default_input_res_m()
        res = torch.as_tensor(input_res_m, dtype=torch.float32).reshape(-1).cpu()
        if res.numel() == 1:
            res = res.expand(batch).clone()
        if res.numel() != batch:
            raise AdapterError(f"input_res_m needs one value or one per batch item ({batch}), got {res.numel()}")
        if not bool(torch.isfinite(res).all()) or bool((res <= 0).any()):
            raise AdapterError(f"input_res_m must be positive metres, got {res.tolist()}")
        return res

    def forward_embeddings(self, x: torch.Tensor, *, pooling: str = "mean",
                           input_res_m: float | Sequence[float] | torch.Tensor | None = None, **_: Any):
        """pooled: mean/max of the patch tokens (CLS excluded); grid: patch tokens (B, D, g, g)."""
        x = self.to_device(x)
        tokens = self.model.forward_tokens(x, self._res_tensor(input_res_m, x.shape[0]))
        patches = tokens[:, 1:]
        g = x.shape[-1] // self.config.patch_size
        grid = patches.reshape(x.shape[0], g, g, -1).permute(0, 3, 1, 2)
        pooled = patches.mean(dim=1) if pooling == "mean" else patches.amax(dim=1)
        return pooled, grid

    def preprocessing_spec(self) -> dict[str, Any]:
        cfg = dataclasses.asdict(self.config)
        cfg.pop("batch_size")  # throughput only
        return {"model": self.spec.model_id, "sensor": self.spec.sensor, "bands": list(self.spec.bands),
                "chip_size": self.spec.chip_size, "frames": self.spec.frames, "config": cfg,
                "nan_fill": 0.0, "to_uint8": "astype(uint8)(clip(raw/10000, 0, 1) * 255) (truncating)",
                "resize": f"PIL BICUBIC to {self.config.image_size}", "norm_mean": list(IMAGENET_MEAN),
                "norm_std": list(IMAGENET_STD),
                "input_res_m": "pixel_size_m * min(H, W) / image_size",
                "final_norm": "not applied (rshf fc_norm=Identity; model.norm loaded but unused)",
                "pooled": {"mean": "mean_patch_tokens_excl_cls", "max": "max_patch_tokens_excl_cls"},
                "grid": "patch_tokens"}
