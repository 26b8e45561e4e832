"""TerraFM-B (MBZUAI, HF ``MBZUAI/TerraFM``) for Sentinel-2 (12 bands) and Sentinel-1 (VV, VH).

One checkpoint, two models: ``terrafm_b`` feeds the S2 composite and ``terrafm_b_s1`` the S1
composite through the same network; only the patch-embedding stem differs.

Network (TerraFM-B = DINO ViT-B/16 with a Panopticon-style patch embedding):

- three patch-embedding stems, ``Conv2d(C -> 3·768, k=16, s=16)``: ``conv2d_s2_l2a`` and
  ``conv2d_s2_l1c`` (12 channels) and ``conv2d_s1`` (2 channels), each followed by the addition
  of its learned modality embedding (``s2_l2a_embed`` / ``s2_l1c_embed`` / ``s1_embed``);
- ``TokenProjection``: proj1 (no bias) -> LayerNorm(2304, eps 1e-5) -> proj2 -> proj3 (2304 -> 768);
- CLS token + learned position embedding (1, 197, 768), resized DINO-style (bicubic with the
  ``+0.1`` scale factor) only when the patch count or the aspect differs from the 14×14 grid;
- 12 pre-norm blocks (LayerNorm eps 1e-6, exact GELU, qkv bias) and a final LayerNorm (eps 1e-6).

Outputs, from ONE forward pass (rs-embed runs the network twice, once for the CLS vector and
once more through ``extract_feature`` for the grid; both read the same final-normed tokens):

- ``pooled`` with ``pooling="mean"`` (the default): the CLS token after the final norm, as
  rs-embed's pooled output (TerraFM's own ``forward``).
- ``pooled`` with ``pooling="max"``: the element-wise max over the 196 final-normed patch tokens
  (= max over the grid). rs-embed silently returns the CLS token for ``pooled("max")``, which
  would make the "max" asset a byte-for-byte copy of the "mean" one; we return what was asked for
  and record the rule in ``preprocessing_spec``.
- ``grid``: the final-normed patch tokens, (768, 14, 14) (rs-embed ``extract_feature(out_indices=[11])``).

Preprocessing:

- S2: raw L2A surface reflectance DN, bands B1,B2,B3,B4,B5,B6,B7,B8,B8A,B9,B11,B12; NaN/inf -> 0
  (the provider's fill value), ``clip(raw / 10000, 0, 1)``, bilinear resize (align_corners=False,
  no antialias) to 224 only when the chip differs — exactly rs-embed.
- S1: raw *linear* VV, VH backscatter; NaN/inf -> 0; inputs where more than half of the finite
  non-zero values are negative are rejected as dB; ``x = log1p(max(raw, 0))``;
  ``clip(x / p99, 0, 1)`` where p99 is the 99th percentile of x taken jointly over both channels
  (1.0 when it is not positive); then the same resize.

Two knobs change what the network sees and are recorded in ``preprocessing_spec`` (so in lineage):

``RS_EMBED_TERRAFM_S2_STEM`` = ``l2a`` (default) | ``l1c``
    Which 12-channel stem the S2 composite goes through. Upstream's ``prepare_tokens`` never
    passes ``is_l2a``, so rs-embed sends its L2A (surface reflectance) data through the L1C
    (top-of-atmosphere) stem. **Default ``l2a``**: the catalog's S2 composite *is* L2A surface
    reflectance, and TerraFM was pre-trained with a separate stem and modality embedding for
    exactly that product; routing BOA data into the TOA stem is a call-site omission upstream,
    not a modelling decision (TOA reflectance differs systematically from BOA, most in B1/B2).
    ``l1c`` reproduces rs-embed bit for bit.

``RS_EMBED_TERRAFM_S1_SCALING`` = ``chip`` (default) | ``tile``
    Where the 99th percentile of the S1 scaling is taken. **Default ``chip``**, rs-embed's: one
    percentile per 224 px input, so a chip's vector depends only on its own pixels and is the same
    whatever the partition it was embedded in (whole tile or any sub-tiling). ``tile``: the
    percentile is computed once over the partition's composite in ``Adapter.tile_context()`` and
    every chip is divided by it. Per-chip scaling gives neighbouring chips of one scene different
    gains (a chip over calm water is stretched until its noise reaches 1.0); one gain per
    tile-month keeps relative backscatter within a tile comparable, but the gain is taken over the
    partition's window, so with sub-tiled partitions (k > 1) a chip's vector depends on k. Use it
    for whole-tile catalogs (the value is recorded with the tile's lineage).

Other knobs: ``RS_EMBED_TERRAFM_IMG`` (network input size, default 224, multiple of 16; other
sizes interpolate the position embedding), ``RS_EMBED_TERRAFM_BATCH_SIZE`` (default CPU 8 / CUDA 64),
and the checkpoint knobs of ``adapters.checkpoints`` with prefix ``RS_EMBED_TERRAFM``.

Published checkpoint: ``TerraFM-B.pth`` in ``MBZUAI/TerraFM``, a raw state dict with no prefix
(164 tensors, ≈452 MB fp32), loaded strictly.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .base import (Adapter, AdapterError, CheckpointError, CheckpointSource, ModelSpec, check_raw_input, env_int,
                   env_str)
from .preprocess import finite_or_zero, finite_or_zero_tensor, host_tensor, resize_bilinear

from .specs import (TERRAFM_B as _S2_SPEC, TERRAFM_B_S1 as _S1_SPEC, TERRAFM_CHECKPOINT,  # noqa: F401
                    TERRAFM_S1_BANDS as S1_BANDS, TERRAFM_S2_BANDS as S2_BANDS)

S2_STEMS = ("l2a", "l1c")
S1_SCALINGS = ("tile", "chip")

@dataclass(frozen=True)
class TerraFMConfig:
    """TerraFM-B architecture (fixed by the checkpoint) and the RS_EMBED_TERRAFM_* knobs."""

    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    patch_size: int = 16
    s2_channels: int = 12
    s1_channels: int = 2
    pretrain_image_size: int = 224  # fixes pos_embed (1, (224/16)²+1, D) in the checkpoint
    image_size: int = 224  # network input; other sizes interpolate the position embedding
    s2_stem: str = "l2a"
    s1_scaling: str = "chip"
    batch_size: int = 0  # 0: the spec's per-device default

    def __post_init__(self) -> None:
        if self.s2_stem not in S2_STEMS:
            raise AdapterError(f"RS_EMBED_TERRAFM_S2_STEM={self.s2_stem!r} is not supported; use one of "
                               f"{', '.join(S2_STEMS)} (l2a: the surface-reflectance stem; l1c: rs-embed's routing)")
        if self.s1_scaling not in S1_SCALINGS:
            raise AdapterError(f"RS_EMBED_TERRAFM_S1_SCALING={self.s1_scaling!r} is not supported; use one of "
                               f"{', '.join(S1_SCALINGS)} (chip: rs-embed, the default; tile: one percentile per partition)")
        if self.image_size <= 0 or self.image_size % self.patch_size:
            raise AdapterError(f"RS_EMBED_TERRAFM_IMG={self.image_size} must be a positive multiple of the "
                               f"patch size {self.patch_size}")
        if self.pretrain_image_size % self.patch_size:
            raise AdapterError(f"pretrain_image_size={self.pretrain_image_size} must be a multiple of "
                               f"patch_size={self.patch_size}")
        if self.embed_dim % self.num_heads:
            raise AdapterError(f"embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}")
        if self.batch_size < 0:
            raise AdapterError(f"RS_EMBED_TERRAFM_BATCH_SIZE={self.batch_size} must be positive (or 0/unset "
                               "for the default: CPU 8, CUDA 64)")

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @classmethod
    def from_env(cls) -> "TerraFMConfig":
        return cls(
            image_size=env_int("RS_EMBED_TERRAFM_IMG", 224),
            s2_stem=env_str("RS_EMBED_TERRAFM_S2_STEM", "l2a").lower(),
            s1_scaling=env_str("RS_EMBED_TERRAFM_S1_SCALING", "chip").lower(),
            batch_size=env_int("RS_EMBED_TERRAFM_BATCH_SIZE", 0),
        )


# --- network -----------------------------------------------------------------------------------
class TokenProjection(nn.Module):
    """proj1 (no bias) -> LayerNorm (eps 1e-5, PyTorch default as upstream) -> proj2 -> proj3."""

    def __init__(self, embed_dim: int, attn_dim: int):
        super().__init__()
        self.proj1 = nn.Linear(attn_dim, attn_dim, bias=False)
        self.norm_input = nn.LayerNorm(attn_dim, eps=1e-5)
        self.proj2 = nn.Linear(attn_dim, attn_dim)
        self.proj3 = nn.Linear(attn_dim, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj3(self.proj2(self.norm_input(self.proj1(x))))


class MultiStemPatchEmbed(nn.Module):
    """Three modality stems sharing one TokenProjection; the caller names the stem explicitly."""

    STEMS = {"l2a": ("conv2d_s2_l2a", "s2_l2a_embed"),
             "l1c": ("conv2d_s2_l1c", "s2_l1c_embed"),
             "s1": ("conv2d_s1", "s1_embed")}

    def __init__(self, cfg: TerraFMConfig):
        super().__init__()
        attn_dim = 3 * cfg.embed_dim
        p = cfg.patch_size
        self.patch_size = p
        self.conv2d_s2_l2a = nn.Conv2d(cfg.s2_channels, attn_dim, kernel_size=p, stride=p)
        self.conv2d_s2_l1c = nn.Conv2d(cfg.s2_channels, attn_dim, kernel_size=p, stride=p)
        self.conv2d_s1 = nn.Conv2d(cfg.s1_channels, attn_dim, kernel_size=p, stride=p)
        self.projection = TokenProjection(cfg.embed_dim, attn_dim)
        self.s2_l2a_embed = nn.Parameter(torch.zeros(1, attn_dim))
        self.s2_l1c_embed = nn.Parameter(torch.zeros(1, attn_dim))
        self.s1_embed = nn.Parameter(torch.zeros(1, attn_dim))

    def forward(self, x: torch.Tensor, stem: str) -> torch.Tensor:
        conv_name, embed_name = self.STEMS[stem]
        conv: nn.Conv2d = getattr(self, conv_name)
        if x.shape[1] != conv.in_channels:
            raise AdapterError(f"the TerraFM {stem} stem takes {conv.in_channels} channels, got {x.shape[1]} "
                               f"(input shape {tuple(x.shape)})")
        tokens = conv(x).flatten(2).transpose(1, 2) + getattr(self, embed_name)
        return self.projection(tokens)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q·kᵀ/√head_dim)·v
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()  # exact (erf) GELU
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TerraFMEncoder(nn.Module):
    """TerraFM-B backbone. ``forward_tokens(x, stem)`` -> final-normed tokens (B, 1 + h·w, D), CLS first."""

    def __init__(self, cfg: TerraFMConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = MultiStemPatchEmbed(cfg)
        n = (cfg.pretrain_image_size // cfg.patch_size) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, cfg.embed_dim))
        self.blocks = nn.ModuleList(Block(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def position_embedding(self, rows: int, cols: int) -> torch.Tensor:
        """Position embedding for a rows×cols patch grid (DINO's ``interpolate_pos_encoding`` rule).

        Used as stored when the patch count matches the checkpoint's square grid and the input is
        square; otherwise the patch part is resized bicubically with scale factors
        ``(rows + 0.1) / √N, (cols + 0.1) / √N`` (align_corners=False), the CLS slot kept.
        """
        n_stored = self.pos_embed.shape[1] - 1
        if rows * cols == n_stored and rows == cols:
            return self.pos_embed
        side = int(math.sqrt(n_stored))
        dim = self.pos_embed.shape[-1]
        grid = self.pos_embed[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, scale_factor=((rows + 0.1) / math.sqrt(n_stored), (cols + 0.1) / math.sqrt(n_stored)),
                             mode="bicubic")
        if grid.shape[-2:] != (rows, cols):
            raise AdapterError(f"TerraFM position-embedding resize gave {tuple(grid.shape[-2:])} for a "
                               f"{rows}×{cols} patch grid; use an input size that is a multiple of 16")
        grid = grid.permute(0, 2, 3, 1).reshape(1, rows * cols, dim)
        return torch.cat([self.pos_embed[:, :1], grid], dim=1)

    def forward_tokens(self, x: torch.Tensor, stem: str) -> torch.Tensor:
        b, _, h, w = x.shape
        p = self.cfg.patch_size
        tokens = self.patch_embed(x, stem)
        tokens = torch.cat([self.cls_token.expand(b, -1, -1), tokens], dim=1)
        tokens = tokens + self.position_embedding(h // p, w // p)
        for blk in self.blocks:
            tokens = blk(tokens)
        return self.norm(tokens)


# --- preprocessing helpers -----------------------------------------------------------------------
def reject_db_input(arr: np.ndarray, *, what: str) -> None:
    """Raise when S1 values look dB-scaled: more than half of the finite non-zero values negative."""
    vals = arr[np.isfinite(arr) & (arr != 0.0)]
    if vals.size and float(np.mean(vals < 0)) > 0.5:
        raise AdapterError(
            f"{what} looks dB-scaled ({float(np.mean(vals < 0)):.0%} of the non-zero values are negative); TerraFM "
            "S1 preprocessing expects linear backscatter (e.g. COPERNICUS/S1_GRD_FLOAT or sigma0 in linear "
            "power) — convert with 10 ** (db / 10) first")


def log1p_p99(arr: np.ndarray) -> float:
    """The S1 scaling denominator: 99th percentile of log1p(max(x, 0)) over all values (1.0 if ≤ 0)."""
    x = np.log1p(np.maximum(arr, 0.0))
    denom = float(np.percentile(x, 99)) if np.isfinite(x).all() else 1.0
    return denom if denom > 0 else 1.0


def log1p_p99_blocks(blocks: Callable[[], Iterable[np.ndarray]], *, what: str) -> tuple[float, int]:
    """``log1p_p99`` over pixels given as blocks (C, ...) of a larger array, with bounded memory, exactly.

    Pixels with a non-finite value in any channel are left out (as ``tile_context`` does). Two passes:
    a histogram over the float32 bit patterns (monotonic for values >= 0) finds the bins holding the
    two order statistics that numpy's linear percentile interpolates; the second pass keeps only the
    values in those bins. Returns (denominator, pixels used).
    """
    hist = np.zeros(1 << 16, dtype=np.int64)
    n = negative = nonzero = pixels = 0
    for block in blocks():
        vals = np.asarray(block, dtype=np.float32).reshape(block.shape[0], -1)
        vals = vals[:, np.isfinite(vals).all(axis=0)]
        pixels += vals.shape[1]
        nz = vals[vals != 0.0]
        negative += int((nz < 0).sum())
        nonzero += int(nz.size)
        x = np.log1p(np.maximum(vals, np.float32(0.0))).ravel()
        n += x.size
        hist += np.bincount(x.view(np.uint32) >> 16, minlength=1 << 16)
    if nonzero and negative / nonzero > 0.5:
        reject_db_input(np.array([-1.0, -1.0, 1.0], np.float32), what=what)  # the same message as for arrays
    if n == 0:
        return 1.0, pixels
    h = 0.99 * (n - 1)
    k = int(np.floor(h))
    ranks = (k, min(k + 1, n - 1))
    cum = np.cumsum(hist)
    bins = [int(np.searchsorted(cum, r, side="right")) for r in ranks]
    lo_bin, hi_bin = bins[0], bins[1]
    below = int(cum[lo_bin - 1]) if lo_bin > 0 else 0
    kept = []
    for block in blocks():
        vals = np.asarray(block, dtype=np.float32).reshape(block.shape[0], -1)
        vals = vals[:, np.isfinite(vals).all(axis=0)]
        x = np.log1p(np.maximum(vals, np.float32(0.0))).ravel()
        b = x.view(np.uint32) >> 16
        kept.append(x[(b >= lo_bin) & (b <= hi_bin)])
    sel = np.sort(np.concatenate(kept))
    pair = np.array([sel[ranks[0] - below], sel[ranks[1] - below]], dtype=np.float32)
    denom = float(np.percentile(pair, (h - k) * 100.0))
    return (denom if denom > 0 else 1.0), pixels


# --- adapters ----------------------------------------------------------------------------------
class _TerraFMAdapter(Adapter):
    """Shared loading, forward and provenance for the S2 and S1 TerraFM-B models."""

    config_cls = TerraFMConfig
    stem_kind: str = ""

    @classmethod
    def build_model(cls, config: TerraFMConfig) -> TerraFMEncoder:
        return TerraFMEncoder(config)

    @classmethod
    def checkpoint_filter_fn(cls, checkpoint: Mapping[str, Any], model: nn.Module) -> dict[str, torch.Tensor]:
        """``TerraFM-B.pth`` is the raw state dict: no prefix, no renames, nothing dropped.

        Wrapped files (``state_dict`` / ``model`` / DINO ``teacher``/``student``) are not the
        published file and are rejected rather than guessed at.
        """
        for wrapper in ("state_dict", "model", "teacher", "student"):
            if wrapper in checkpoint and isinstance(checkpoint[wrapper], Mapping):
                raise CheckpointError(f"this TerraFM file wraps its weights in {wrapper!r}; the published "
                                      "TerraFM-B.pth (MBZUAI/TerraFM) is a raw state dict — use that file")
        return dict(checkpoint.items())

    @classmethod
    def published_state_dict(cls, model: nn.Module) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    @property
    def stem(self) -> str:
        return "s1" if self.stem_kind == "s1" else self.config.s2_stem

    def forward_embeddings(self, x: torch.Tensor, *, pooling: str = "mean", **_: Any):
        """pooled: CLS after the final norm ("mean") or max over the normed patch tokens ("max");
        grid: the normed patch tokens (B, D, h, w). One forward pass for both."""
        x = self.to_device(x)
        tokens = self.model.forward_tokens(x, self.stem)
        p = self.config.patch_size
        b, _, h, w = x.shape
        patches = tokens[:, 1:]
        grid = patches.reshape(b, h // p, w // p, -1).permute(0, 3, 1, 2)
        pooled = tokens[:, 0] if pooling == "mean" else patches.amax(dim=1)
        return pooled, grid

    def preprocessing_spec(self) -> dict[str, Any]:
        cfg = dataclasses.asdict(self.config)
        cfg.pop("batch_size")  # throughput only: does not change what the network sees
        cfg.pop("s1_scaling" if self.stem_kind == "s2" else "s2_stem")
        spec = {"model": self.spec.model_id, "sensor": self.spec.sensor, "bands": list(self.spec.bands),
                "chip_size": self.spec.chip_size, "frames": self.spec.frames, "config": cfg,
                "nan_fill": 0.0, "resize": "bilinear(align_corners=False, antialias=False) if size differs",
                "stem": self.stem,
                "pooled": {"mean": "cls_after_final_norm", "max": "max_over_final_normed_patch_tokens"},
                "grid": "final_normed_patch_tokens"}
        if self.stem_kind == "s2":
            spec["scaling"] = "clip(raw/10000, 0, 1)"
        else:
            spec["scaling"] = (f"clip(log1p(max(raw,0)) / p99, 0, 1); p99 over "
                               f"{'the tile-month composite' if self.config.s1_scaling == 'tile' else 'each chip'}"
                               "; dB input rejected")
        return spec


class TerraFMS2Adapter(_TerraFMAdapter):
    stem_kind = "s2"
    spec = _S2_SPEC

    def preprocess(self, raw: np.ndarray, *, bands: tuple[str, ...] | None = None,
                   tile_context: dict[str, Any] | None = None,
                   device: str | torch.device | None = None) -> torch.Tensor:
        """Raw S2 L2A DN (B, 12, H, W) -> clip(raw/10000, 0, 1), resized to image_size."""
        arr = np.asarray(raw)
        self._refuse_s1(arr, bands)
        arr = check_raw_input(arr, self.spec, ndim=4, bands=bands)
        return self.place(self.preprocess_tensor(host_tensor(arr, square=False), bands=bands), device)

    def _refuse_s1(self, arr, bands) -> None:
        if bands is None and arr.ndim == 4 and arr.shape[1] == len(S1_BANDS):
            raise AdapterError(f"terrafm_b takes the 12 Sentinel-2 bands {', '.join(S2_BANDS)}, got 2 channels "
                               f"(shape {tuple(arr.shape)}); for Sentinel-1 VV/VH use the model terrafm_b_s1")

    def device_preprocessing(self) -> bool:
        return True

    def preprocess_tensor(self, raw: torch.Tensor, *, bands: tuple[str, ...] | None = None,
                          tile_context: dict[str, Any] | None = None) -> torch.Tensor:
        """``preprocess``'s steps on a tensor, wherever it lives: clip(raw/10000, 0, 1), resized."""
        self._refuse_s1(raw, bands)
        x = check_raw_input(raw, self.spec, ndim=4, bands=bands)
        x = torch.clamp(finite_or_zero_tensor(x) / 10000.0, 0.0, 1.0)
        return resize_bilinear(x.contiguous(), self.config.image_size)


class TerraFMS1Adapter(_TerraFMAdapter):
    stem_kind = "s1"
    spec = _S1_SPEC

    def tile_context(self, raw_tile: np.ndarray, *, bands: tuple[str, ...] | None = None) -> dict[str, Any]:
        """With tile scaling: the joint 99th percentile of log1p(VV, VH) over the whole tile composite."""
        if self.config.s1_scaling != "tile":
            return {}
        arr = np.asarray(raw_tile)
        if arr.ndim not in (3, 4):
            raise AdapterError(f"terrafm_b_s1 tile_context expects the tile composite as (C, H, W) or "
                               f"(T, C, H, W), got shape {arr.shape}")
        arr = check_raw_input(arr[None] if arr.ndim == 3 else arr, self.spec, ndim=4, bands=bands)
        # pixels without a valid observation (NaN in the composite) do not enter the tile statistic
        vals = np.moveaxis(np.asarray(arr, dtype=np.float32), 1, 0).reshape(arr.shape[1], -1)
        vals = vals[:, np.isfinite(vals).all(axis=0)]
        reject_db_input(vals, what="the S1 tile composite")
        p99 = log1p_p99(vals) if vals.size else 1.0
        return {"s1_scaling": "tile", "s1_log1p_p99": p99, "s1_pixels": int(vals.shape[1])}

    def tile_context_blocks(self, blocks, *, bands: tuple[str, ...] | None = None) -> dict[str, Any]:
        """``tile_context`` over the tile given as row blocks (C, h, W), NaN where invalid: bounded memory,
        the same p99 (exact order statistics, see ``log1p_p99_blocks``)."""
        if self.config.s1_scaling != "tile":
            return {}
        if bands is not None and tuple(bands) != tuple(self.spec.bands):
            raise AdapterError(f"terrafm_b_s1 needs bands in the order {', '.join(self.spec.bands)}, got {bands}")
        p99, n = log1p_p99_blocks(blocks, what="the S1 tile composite")
        return {"s1_scaling": "tile", "s1_log1p_p99": p99, "s1_pixels": n}

    def preprocess(self, raw: np.ndarray, *, bands: tuple[str, ...] | None = None,
                   tile_context: dict[str, Any] | None = None,
                   device: str | torch.device | None = None) -> torch.Tensor:
        """Raw linear VV, VH (B, 2, H, W) -> clip(log1p(max(x, 0)) / p99, 0, 1), resized to image_size.

        p99 comes from ``tile_context`` (tile scaling) or from each chip (chip scaling, rs-embed).
        """
        arr = np.asarray(raw)
        if bands is None and arr.ndim == 4 and arr.shape[1] == len(S2_BANDS):
            raise AdapterError(f"terrafm_b_s1 takes Sentinel-1 {', '.join(S1_BANDS)}, got 12 channels "
                               f"(shape {arr.shape}); for the Sentinel-2 bands use the model terrafm_b")
        arr = finite_or_zero(check_raw_input(arr, self.spec, ndim=4, bands=bands))
        if self.config.s1_scaling == "tile":
            if not tile_context or "s1_log1p_p99" not in tile_context:
                raise AdapterError(
                    "RS_EMBED_TERRAFM_S1_SCALING=tile needs the tile's scaling: compute it once with "
                    "adapter.tile_context(tile_composite) and pass it as preprocess(..., tile_context=...), "
                    "or set RS_EMBED_TERRAFM_S1_SCALING=chip for rs-embed's per-chip scaling")
            denom = float(tile_context["s1_log1p_p99"])
            if not math.isfinite(denom) or denom <= 0:
                raise AdapterError(f"tile_context s1_log1p_p99={denom!r} must be a positive finite number")
        out = np.empty_like(arr)
        for i, chip in enumerate(arr):
            reject_db_input(chip, what=f"S1 chip {i}")
            x = np.log1p(np.maximum(chip, 0.0))
            d = denom if self.config.s1_scaling == "tile" else log1p_p99(chip)
            out[i] = np.clip(x / d, 0.0, 1.0)
        t = resize_bilinear(torch.from_numpy(out), self.config.image_size)
        return self.place(t, device)
