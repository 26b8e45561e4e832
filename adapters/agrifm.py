"""AgriFM (Video-Swin encoder, Sentinel-2 branch) for multi-frame S2 stacks.

Input: a (B, T, 10, H, W) stack of S2 SR bands B2,B3,B4,B5,B6,B7,B8,B8A,B11,B12 (T = 8 frames by
default). The network is AgriFM's ``PretrainingSwinTransformer3DEncoder`` as configured by the
official ``configs/cropland_mapping.py`` (and by rs-embed):

- ``patch_emd``: the frames axis becomes depth, the stack is zero-padded at the end to multiples of
  (4, 2, 2) and embedded by a Conv3d(10→128, kernel = stride = (4, 2, 2)); no patch norm.
- ``backbone``: a 4-stage 3-D Swin (depths 2,2,18,2; heads 4,8,16,32; window (8,7,7)). In every
  stage the window is clamped per axis to the feature size (the shift on a clamped axis is 0), the
  relative-position index of the full window is sliced ``[:N, :N]``, shifted blocks roll the map by
  half a window and mask cross-region pairs with −100. Between stages a PatchMerging layer averages
  pairs of frames (an odd frame count is zero-padded first) and concatenates the four spatial
  parities before LN(4C) → Linear(4C→2C, no bias).
- output ``encoder_features`` = LayerNorm(final stage) with the (C, D) axes flattened as c·D+d:
  (B, 1024, 14, 14) for T ≤ 32 at 224 px.

Outputs (as rs-embed): pooled = spatial mean (or max) of ``encoder_features`` -> (1024,);
grid = ``encoder_features`` -> (1024, 14, 14), i.e. 16 px = 160 m cells.

Published checkpoint: ``AgriFM.pth``, an mmengine checkpoint whose weights sit under
``state_dict`` with one patch embedding per sensor (``S2_patch_emd.``, ``HLSL30_patch_emd.``,
``Modis_patch_emd.``) and the shared ``backbone.``. ``checkpoint_filter_fn`` keeps the S2 branch and
loading is strict (see its docstring for every rule).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .base import (Adapter, AdapterError, CheckpointError, CheckpointSource, ModelSpec, check_raw_input, env_int,
                   env_int_tuple, env_str)
from .preprocess import finite_or_zero_tensor, host_tensor, resize_bilinear

from .specs import AGRIFM as _SPEC, AGRIFM_BANDS as S2_BANDS, AGRIFM_URL  # noqa: F401 (spec data: torch-free)

# Official S2 statistics (AgriFM configs/cropland_mapping.py; rs-embed _AGRIFM_S2_MEAN/_STD), band order above.
AGRIFM_S2_MEAN = (4179.192015478227, 4065.9106675194444, 3957.274910960156, 5207.452475253116, 4327.12234687,
                  4873.16102239, 5049.1637925, 5111.07806856, 3056.86349163, 2490.9675032)
AGRIFM_S2_STD = (4041.5212325268735, 3691.003119315892, 3629.331318356375, 2973.5178530908756, 3569.73343885,
                 3085.9151435, 2937.56005119, 2806.04462314, 1808.30013156, 1694.20220774)


NORM_MODES = ("agrifm_stats", "unit_scale", "none")
# spellings rs-embed also accepts, mapped to the canonical names (which are what gets hashed)
_NORM_ALIASES = {"zscore": "agrifm_stats", "stats": "agrifm_stats", "unit": "unit_scale",
                 "reflectance": "unit_scale", "raw": "none", "off": "none"}

PATCH_SIZE = (4, 2, 2)  # (frames, h, w) of the S2 patch embedding
MASK_VALUE = -100.0  # added to attention logits of token pairs from different shifted regions

# Published-file key rules (see AgriFMAdapter.checkpoint_filter_fn).
S2_PATCH_PREFIX = "S2_patch_emd."
# Prefixes in the published file that the S2 encoder does not use and that are dropped on purpose:
# the other sensors' patch embeddings and any pretraining/decoder heads. Anything else that the
# encoder does not know still fails the strict load.
IGNORED_PREFIXES = ("HLSL30_patch_emd.", "Modis_patch_emd.", "decode_head.", "auxiliary_head.", "head.", "neck.",
                    "decoder.", "data_preprocessor.")
# Other sensors' patch embeddings written by published_state_dict (in_chans per sensor, as upstream).
_OTHER_PATCH_EMBEDS = {"HLSL30_patch_emd.": 6, "Modis_patch_emd.": 7}


@dataclass(frozen=True)
class AgriFMConfig:
    """Knobs of the rs-embed AgriFM adapter (RS_EMBED_AGRIFM_*) plus the architecture (defaults = published)."""

    frames: int = 8
    image_size: int = 224
    norm: str = "agrifm_stats"
    embed_dim: int = 128
    depths: tuple[int, ...] = (2, 2, 18, 2)
    num_heads: tuple[int, ...] = (4, 8, 16, 32)
    window_size: tuple[int, int, int] = (8, 7, 7)
    mlp_ratio: float = 4.0

    def __post_init__(self) -> None:
        norm = str(self.norm).strip().lower()
        norm = _NORM_ALIASES.get(norm, norm)
        if norm not in NORM_MODES:
            raise AdapterError(f"RS_EMBED_AGRIFM_NORM={self.norm!r} is not supported; use one of "
                               f"{', '.join(NORM_MODES)}")
        object.__setattr__(self, "norm", norm)
        for name in ("depths", "num_heads", "window_size"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        if self.frames < 1:
            raise AdapterError(f"RS_EMBED_AGRIFM_FRAMES={self.frames} must be at least 1 (default 8)")
        if self.image_size < 2:
            raise AdapterError(f"RS_EMBED_AGRIFM_IMG={self.image_size} must be at least 2 (default 224)")
        if len(self.depths) != len(self.num_heads) or not self.depths:
            raise AdapterError(f"AgriFM depths {self.depths} and num_heads {self.num_heads} must list one value "
                               "per stage")
        if len(self.window_size) != 3 or min(self.window_size) < 1:
            raise AdapterError(f"AgriFM window_size must be three positive integers (D, H, W), got {self.window_size}")
        for i, heads in enumerate(self.num_heads):
            dim = self.embed_dim * 2 ** i
            if heads < 1 or dim % heads:
                raise AdapterError(f"AgriFM stage {i} width {dim} is not divisible by its {heads} heads")

    @property
    def num_features(self) -> int:
        """Width of the final stage (1024 for the published model)."""
        return self.embed_dim * 2 ** (len(self.depths) - 1)

    @classmethod
    def from_env(cls) -> "AgriFMConfig":
        return cls(
            frames=env_int("RS_EMBED_AGRIFM_FRAMES", 8),
            image_size=env_int("RS_EMBED_AGRIFM_IMG", 224),
            norm=env_str("RS_EMBED_AGRIFM_NORM", "agrifm_stats"),
            embed_dim=env_int("RS_EMBED_AGRIFM_EMBED_DIM", 128),
            depths=env_int_tuple("RS_EMBED_AGRIFM_DEPTHS", (2, 2, 18, 2)),
            num_heads=env_int_tuple("RS_EMBED_AGRIFM_HEADS", (4, 8, 16, 32)),
            window_size=env_int_tuple("RS_EMBED_AGRIFM_WINDOW", (8, 7, 7), length=3),
        )


# --- network -----------------------------------------------------------------------------------
def clamp_window(size: tuple[int, int, int], window: tuple[int, ...],
                 shift: tuple[int, ...]) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Per axis: a feature axis no longer than the window becomes the window, with no shift."""
    win, sh = [], []
    for s, w, k in zip(size, window, shift):
        win.append(s if s <= w else w)
        sh.append(0 if s <= w else k)
    return tuple(win), tuple(sh)


def relative_position_index(window: tuple[int, int, int]) -> torch.Tensor:
    """(N, N) int64 index into the (2Wd-1)(2Wh-1)(2Ww-1) bias table for a full window, N = Wd·Wh·Ww."""
    wd, wh, ww = window
    grid = torch.stack(torch.meshgrid(torch.arange(wd), torch.arange(wh), torch.arange(ww), indexing="ij"))
    flat = grid.flatten(1)  # (3, N), token order d-major then h then w
    rel = (flat[:, :, None] - flat[:, None, :]).permute(1, 2, 0)  # (N, N, 3), offsets i - j
    rel = rel + torch.tensor([wd - 1, wh - 1, ww - 1])
    strides = torch.tensor([(2 * wh - 1) * (2 * ww - 1), 2 * ww - 1, 1])
    return (rel * strides).sum(-1).to(torch.int64)


def to_windows(x: torch.Tensor, window: tuple[int, int, int]) -> torch.Tensor:
    """(B, D, H, W, C) with each axis a multiple of the window -> (B·nW, Wd·Wh·Ww, C)."""
    b, d, h, w, c = x.shape
    wd, wh, ww = window
    x = x.reshape(b, d // wd, wd, h // wh, wh, w // ww, ww, c)
    return x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(-1, wd * wh * ww, c)


def from_windows(windows: torch.Tensor, window: tuple[int, int, int], b: int, d: int, h: int, w: int) -> torch.Tensor:
    """Inverse of ``to_windows``."""
    wd, wh, ww = window
    x = windows.reshape(b, d // wd, h // wh, w // ww, wd, wh, ww, -1)
    return x.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, d, h, w, -1)


def shifted_window_mask(padded: tuple[int, int, int], window: tuple[int, int, int], shift: tuple[int, int, int],
                        device: torch.device) -> torch.Tensor:
    """(nW, N, N) additive mask: 0 for token pairs of the same shifted region, MASK_VALUE otherwise.

    Along each axis of padded length L the rolled map has up to three regions: [0, L-w), [L-w, L-s)
    and [L-s, L); an axis with no shift is a single region.
    """
    labels = []
    for length, w, s in zip(padded, window, shift):
        lab = torch.zeros(length, dtype=torch.int64, device=device)
        if s > 0:
            lab[length - w:length - s] = 1
            lab[length - s:] = 2
        labels.append(lab)
    region = labels[0][:, None, None] * 9 + labels[1][None, :, None] * 3 + labels[2][None, None, :]
    win = to_windows(region[None, ..., None], window).squeeze(-1)  # (nW, N)
    differs = win[:, None, :] != win[:, :, None]
    return torch.zeros(differs.shape, device=device).masked_fill(differs, MASK_VALUE)


class PatchEmbed3D(nn.Module):
    """(B, T, C, H, W) -> zero-pad (T, H, W) at the end to multiples of the patch -> Conv3d -> (B, E, D, h, w)."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: tuple[int, int, int] = PATCH_SIZE):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 1, 3, 4)  # (B, C, T, H, W)
        pt, ph, pw = self.patch_size
        _, _, t, h, w = x.shape
        x = F.pad(x, (0, (-w) % pw, 0, (-h) % ph, 0, (-t) % pt))
        return self.proj(x)


class WindowAttention3D(nn.Module):
    """Multi-head self-attention inside one window, with a learned relative-position bias.

    ``fused``: use ``scaled_dot_product_attention`` (None: on CUDA only). The fused kernel sums in
    another order: float32 outputs differ from the explicit formula by a few ulps (≤ 3e-6 on values
    up to 4.3 at full size), so the CPU keeps the explicit formula and stays bit-identical.
    """

    fused: bool | None = None

    def __init__(self, dim: int, num_heads: int, window: tuple[int, int, int]):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        wd, wh, ww = window
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * wd - 1) * (2 * wh - 1) * (2 * ww - 1), num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        # persistent: the published state dict carries it (checked against this rebuild on load)
        self.register_buffer("relative_position_index", relative_position_index(window))
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        bw, n, c = x.shape
        q, k, v = self.qkv(x).reshape(bw, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        index = self.relative_position_index[:n, :n].reshape(-1)
        bias = self.relative_position_bias_table[index].reshape(n, n, -1).permute(2, 0, 1)  # (heads, N, N)
        if mask is None:
            attn_mask = bias.unsqueeze(0).to(q.dtype)
        else:  # one additive mask per window, the same for every batch item
            nw = mask.shape[0]
            attn_mask = (bias.unsqueeze(0) + mask[:, None]).to(q.dtype).repeat(bw // nw, 1, 1, 1)
        if self.fused if self.fused is not None else q.is_cuda:
            # one fused kernel (memory-efficient on CUDA): the (B·nW, heads, N, N) logits are never stored
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=self.scale)
        else:  # the explicit formula: float32 outputs on the CPU bit-identical to the reference
            out = ((q * self.scale) @ k.transpose(-2, -1) + attn_mask).softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(bw, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()  # exact (erf)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwinBlock3D(nn.Module):
    """Pre-norm (shifted-)window attention + MLP on a channels-last (B, D, H, W, C) map."""

    def __init__(self, dim: int, num_heads: int, window: tuple[int, int, int], shift: tuple[int, int, int],
                 mlp_ratio: float):
        super().__init__()
        self.window = window
        self.shift = shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention3D(dim, num_heads, window)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def _attend(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, d, h, w, c = x.shape
        window, shift = clamp_window((d, h, w), self.window, self.shift)
        x = self.norm1(x)
        pads = [(-s) % k for s, k in zip((d, h, w), window)]
        x = F.pad(x, (0, 0, 0, pads[2], 0, pads[1], 0, pads[0]))  # zeros after the norm, at the end
        dp, hp, wp = d + pads[0], h + pads[1], w + pads[2]
        shifted = any(s > 0 for s in shift)
        if shifted:
            x = torch.roll(x, shifts=tuple(-s for s in shift), dims=(1, 2, 3))
        out = self.attn(to_windows(x, window), mask if shifted else None)
        x = from_windows(out, window, b, dp, hp, wp)
        if shifted:
            x = torch.roll(x, shifts=shift, dims=(1, 2, 3))
        return x[:, :d, :h, :w, :]

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self._attend(x, mask)
        return x + self.mlp(self.norm2(x))


class PatchMerging3D(nn.Module):
    """Halve (D, H, W): average frame pairs, concatenate the four spatial parities, LN(4C) -> Linear(4C→2C)."""

    def __init__(self, dim: int):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, d, h, w, _ = x.shape
        # zero-pad an odd H / W / D at the end; a lone last frame is thus averaged with zeros
        x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2, 0, d % 2))
        x = (x[:, 0::2] + x[:, 1::2]) / 2
        parts = [x[:, :, 0::2, 0::2], x[:, :, 1::2, 0::2], x[:, :, 0::2, 1::2], x[:, :, 1::2, 1::2]]
        return self.reduction(self.norm(torch.cat(parts, dim=-1)))


class SwinStage3D(nn.Module):
    def __init__(self, dim: int, depth: int, num_heads: int, window: tuple[int, int, int], mlp_ratio: float,
                 downsample: bool):
        super().__init__()
        self.window = window
        self.shift = tuple(k // 2 for k in window)
        self.blocks = nn.ModuleList(
            SwinBlock3D(dim, num_heads, window, (0, 0, 0) if i % 2 == 0 else self.shift, mlp_ratio)
            for i in range(depth))
        self.downsample = PatchMerging3D(dim) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # channels-last (B, D, H, W, C)
        _, d, h, w, _ = x.shape
        window, shift = clamp_window((d, h, w), self.window, self.shift)
        mask = None
        if any(s > 0 for s in shift) and len(self.blocks) > 1:
            padded = tuple(-(-s // k) * k for s, k in zip((d, h, w), window))
            mask = shifted_window_mask(padded, window, shift, x.device).to(x.dtype)
        for blk in self.blocks:
            x = blk(x, mask)
        return self.downsample(x) if self.downsample is not None else x


class SwinTransformer3D(nn.Module):
    """The AgriFM backbone; ``forward`` takes the patch embedding (B, C, D, H, W) -> LN'd final map (B, C', D', h, w)."""

    def __init__(self, cfg: AgriFMConfig):
        super().__init__()
        self.layers = nn.ModuleList(
            SwinStage3D(cfg.embed_dim * 2 ** i, depth, heads, cfg.window_size, cfg.mlp_ratio,
                        downsample=i < len(cfg.depths) - 1)
            for i, (depth, heads) in enumerate(zip(cfg.depths, cfg.num_heads)))
        self.norm = nn.LayerNorm(cfg.num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 4, 1)
        for layer in self.layers:
            x = layer(x)
        return self.norm(x).permute(0, 4, 1, 2, 3)


class AgriFMEncoder(nn.Module):
    """S2 patch embedding + backbone; ``forward`` -> ``encoder_features`` (B, C·D, h, w), channel = c·D + d."""

    def __init__(self, cfg: AgriFMConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_emd = PatchEmbed3D(len(S2_BANDS), cfg.embed_dim)
        self.backbone = SwinTransformer3D(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5 or x.shape[2] != len(S2_BANDS):
            raise AdapterError(f"AgriFM expects input shaped (B, T, {len(S2_BANDS)}, H, W), got {tuple(x.shape)}")
        feats = self.backbone(self.patch_emd(x))
        b, c, d, h, w = feats.shape
        return feats.reshape(b, c * d, h, w)


# --- adapter -----------------------------------------------------------------------------------
class AgriFMAdapter(Adapter):
    spec = _SPEC
    config_cls = AgriFMConfig

    @classmethod
    def build_model(cls, config: AgriFMConfig) -> AgriFMEncoder:
        return AgriFMEncoder(config)

    @classmethod
    def checkpoint_filter_fn(cls, checkpoint: Mapping[str, Any], model: nn.Module) -> dict[str, torch.Tensor]:
        """Published ``AgriFM.pth`` -> encoder state dict. The rules, in order:

        1. Unwrap: the weights are under ``state_dict`` (mmengine, the published layout); a ``model``
           wrapper or a bare state dict (all values tensors) is also accepted, as rs-embed's loader does.
        2. Strip a leading ``module.`` (DDP saves), as upstream's ``revise_keys``.
        3. Drop keys under ``IGNORED_PREFIXES`` (the HLSL30 / MODIS patch embeddings, heads).
        4. Rename ``S2_patch_emd.`` -> ``patch_emd.``; ``backbone.`` keys are kept as they are.
        5. The 24 ``relative_position_index`` buffers must equal the deterministic rebuild; a file
           that carries none of them gets the rebuilt ones (a file with only some of them fails).

        Anything else unexpected, missing or mis-shaped fails the strict load that follows.
        """
        weights = _unwrap(checkpoint)
        out: dict[str, torch.Tensor] = {}
        for key, value in weights.items():
            if not isinstance(key, str) or not isinstance(value, torch.Tensor):
                raise CheckpointError(f"AgriFM checkpoint entry {key!r} is a {type(value).__name__}, not a tensor; "
                                      "the file is not an AgriFM state dict")
            name = re.sub(r"^module\.", "", key)
            if name.startswith(IGNORED_PREFIXES):
                continue
            if name.startswith(S2_PATCH_PREFIX):
                name = "patch_emd." + name[len(S2_PATCH_PREFIX):]
            if name in out:
                raise CheckpointError(f"AgriFM checkpoint maps two entries to {name!r} (e.g. both "
                                      f"'{S2_PATCH_PREFIX}…' and 'patch_emd.…'); keep one of them")
            out[name] = value
        _check_index_buffers(out, model)
        return out

    @classmethod
    def published_state_dict(cls, model: nn.Module) -> dict[str, Any]:
        """The mmengine layout of ``AgriFM.pth``: ``meta`` + ``state_dict`` with the per-sensor patch embeddings."""
        sd: dict[str, torch.Tensor] = {}
        for key, value in model.state_dict().items():
            if key.startswith("patch_emd."):
                key = S2_PATCH_PREFIX + key[len("patch_emd."):]
            sd[key] = value.detach().clone()
        # the other sensors' embeddings, shaped as upstream builds them; values are placeholders
        s2_weight = sd[S2_PATCH_PREFIX + "proj.weight"]
        for prefix, chans in _OTHER_PATCH_EMBEDS.items():
            sd[prefix + "proj.weight"] = s2_weight[:, :chans].clone()
            sd[prefix + "proj.bias"] = sd[S2_PATCH_PREFIX + "proj.bias"].clone()
        meta = {"note": "written by rs-embed-assets AgriFMAdapter.published_state_dict (not the published weights)",
                "model": "agrifm", "epoch": 0, "iter": 0}
        return {"meta": meta, "state_dict": sd}

    def preprocess(self, raw: np.ndarray, *, bands: tuple[str, ...] | None = None,
                   tile_context: dict[str, Any] | None = None,
                   device: str | torch.device | None = None) -> torch.Tensor:
        """Raw S2 SR DN (B, T, 10, H, W) -> (B, T, 10, img, img) as rs-embed's AgriFM adapter.

        nan/inf -> 0, clip [0, 10000], then ``agrifm_stats`` ((x - mean) / std with the official
        per-band statistics), ``unit_scale`` (/10000) or ``none``; after normalisation a non-square
        chip is reflect-padded to a square (edge-padded when the pad is not smaller than the short
        side), then every plane is bilinearly resized (align_corners=False, no antialias) to
        RS_EMBED_AGRIFM_IMG. The frame count must equal RS_EMBED_AGRIFM_FRAMES (no silent
        repetition or truncation of frames).
        """
        arr = check_raw_input(raw, self.spec, ndim=5, bands=bands)
        return self.place(self.preprocess_tensor(host_tensor(arr, square=True), bands=bands), device)

    def device_preprocessing(self) -> bool:
        return True  # the engine's chips are square (no padding) and the resize is torch's in both paths

    def preprocess_tensor(self, raw: torch.Tensor, *, bands: tuple[str, ...] | None = None,
                          tile_context: dict[str, Any] | None = None) -> torch.Tensor:
        """``preprocess``'s steps on a tensor of square chips (B, T, 10, H, W), wherever it lives (the host path
        pads, then calls this)."""
        x = check_raw_input(raw, self.spec, ndim=5, bands=bands)
        if x.shape[1] != self.config.frames:
            raise AdapterError(f"agrifm expects {self.config.frames} frames per sample (RS_EMBED_AGRIFM_FRAMES), got "
                               f"{x.shape[1]} (shape {tuple(x.shape)}); build the stack with exactly that many "
                               "frames or change RS_EMBED_AGRIFM_FRAMES (a different experiment)")
        if x.shape[-1] != x.shape[-2]:
            raise AdapterError(f"agrifm tensor preprocessing takes square chips, got {tuple(x.shape[-2:])}; "
                               "preprocess() pads non-square chips")
        x = torch.clamp(finite_or_zero_tensor(x), 0.0, 10000.0)
        if self.config.norm == "agrifm_stats":
            mean = torch.tensor(AGRIFM_S2_MEAN, dtype=torch.float32, device=x.device)[None, None, :, None, None]
            std = torch.clamp_min(torch.tensor(AGRIFM_S2_STD, dtype=torch.float32, device=x.device),
                                  1e-6)[None, None, :, None, None]
            x = (x - mean) / std
        elif self.config.norm == "unit_scale":
            x = torch.clamp(x / 10000.0, 0.0, 1.0)
        return resize_bilinear(x.contiguous(), self.config.image_size)

    def forward_embeddings(self, x: torch.Tensor, *, pooling: str = "mean", **_: Any):
        if x.ndim != 5 or x.shape[1] != self.config.frames or x.shape[2] != len(S2_BANDS):
            raise AdapterError(f"agrifm expects a preprocessed batch shaped (B, {self.config.frames} frames, "
                               f"{len(S2_BANDS)} bands, H, W), got {tuple(x.shape)}; use preprocess() on raw "
                               "(B, T, C, H, W) chips (RS_EMBED_AGRIFM_FRAMES sets the frame count)")
        grid = self.model(self.to_device(x))
        pooled = grid.mean(dim=(2, 3)) if pooling == "mean" else grid.amax(dim=(2, 3))
        return pooled, grid

    def preprocessing_spec(self) -> dict[str, Any]:
        spec = super().preprocessing_spec()
        spec.update(frames=self.config.frames, clip=[0, 10000],
                    resize="reflect_pad_square+bilinear(align_corners=False) after normalisation",
                    norm_stats={"mean": list(AGRIFM_S2_MEAN), "std": list(AGRIFM_S2_STD)}
                    if self.config.norm == "agrifm_stats" else None,
                    pooled="spatial_mean/max of encoder_features", grid="encoder_features (c·D+d, h, w)")
        return spec


# --- helpers -----------------------------------------------------------------------------------
def _unwrap(checkpoint: Mapping[str, Any]) -> Mapping[str, Any]:
    for wrapper in ("state_dict", "model"):
        inner = checkpoint.get(wrapper)
        if isinstance(inner, Mapping):
            return inner
    if checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        return checkpoint
    raise CheckpointError(f"AgriFM checkpoint has no 'state_dict' (mmengine) or 'model' entry and is not a bare "
                          f"state dict (top-level keys: {sorted(map(str, checkpoint))[:8]}); use the published "
                          "AgriFM.pth")


def _check_index_buffers(sd: dict[str, torch.Tensor], model: nn.Module) -> None:
    own = {k: v for k, v in model.state_dict().items() if k.endswith("relative_position_index")}
    present = [k for k in own if k in sd]
    if not present:
        sd.update({k: v.clone() for k, v in own.items()})
        return
    absent = sorted(set(own) - set(present))
    if absent:
        raise CheckpointError(f"AgriFM checkpoint carries {len(present)} of {len(own)} relative_position_index "
                              f"buffers; missing {absent[:4]}{' …' if len(absent) > 4 else ''}. The file is "
                              "incomplete or from a different architecture")
    for k in present:
        got, want = sd[k], own[k]
        if tuple(got.shape) != tuple(want.shape) or not torch.equal(got.to(torch.int64), want.cpu()):
            raise CheckpointError(f"AgriFM checkpoint {k} {tuple(got.shape)} differs from the deterministic index "
                                  f"of a {tuple(want.shape)} window; the file was built with another window_size "
                                  "(RS_EMBED_AGRIFM_WINDOW, published (8,7,7)) or is corrupt")
        sd[k] = got.to(torch.int64)
