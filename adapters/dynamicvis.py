"""DynamicVis-B (``DynamicVisBackbone``, released fMoW pretraining config) for Sentinel-2 RGB.

Backbone, per stage s = 0..3 (arch 'b': C = 96/192/384/768, layers 2/4/16/4, token keep ratios 8/4/2/1):

1. mmcv-style patch embedding: Conv2d (k7/s4 at stage 0, k3/s2 after, padding k//2, bias) -> flatten to
   raster-ordered tokens (B, N, C) -> LayerNorm(eps 1e-6). Stage 0 then adds the learned ``pos_embed``.
2. ``num_layers[s]`` x ``SpatialSparseMixer`` (eval semantics):
   - global tokens: ``adaptive_avg_pool1d`` of the N raster tokens into ``num = H_s`` tokens (row means);
   - routing weights ``w = softmax(spatial_gate(x))`` over the N tokens (Linear C->1, no bias);
   - ``topk(w, N // r)``: the selected tokens, in DESCENDING weight order, which is the scan order;
   - ``MambaBlock([global ; selected])``: RMSNorm(eps 1e-5, fp32) -> Mamba mixer run on the batch
     concatenation of the sequence and its flip -> ``seq + (fwd + flip(rev)) / 2`` (path 'forward_reverse_mean');
   - the global tokens are dropped, the rest is multiplied by ``w[selected]``;
   - ``new = x + x * w`` everywhere, except the selected positions: ``new[sel] = x[sel] + w_sel * block_out``.
3. Stage LayerNorm(eps 1e-6), tokens back to a (B, C, H, W) map.

Outputs (as rs-embed): grid = the stage-4 map (768, 16, 16) at 512 px; pooled = its spatial mean (or max).

Published checkpoint: HF ``KyanChen/DynamicVis`` ``pretrain_dynamicvis_b_bf16_mamba_best_single-label_f1-score_epoch_170.pth``,
an mmengine file whose ``state_dict`` holds the backbone under ``backbone.`` (311 tensors, 36,745,536 parameters)
plus the pretraining heads (``pre_neck.``, ``neck.``, ``head.``), which :data:`IGNORED_PREFIXES` drops by rule.
``pos_embed`` is resized at load time (bicubic, align_corners=False, fp32) when the model is built for another
image size. Everything else must match exactly (strict loading).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .base import (Adapter, AdapterError, CheckpointError, CheckpointSource, ModelSpec, check_raw_input, env_bool,
                   env_float, env_int, env_int_tuple, env_str)
from .preprocess import IMAGENET_MEAN, IMAGENET_STD, ImageNetRGBOnDevice, sr_rgb_to_imagenet
from .mamba import DEFAULT_CHUNK, SCAN_CHOICES, MambaMixer, MambaRMSNorm, resolve_scan_impl

from .specs import (DYNAMICVIS as _SPEC, DYNAMICVIS_BANDS as RGB_BANDS, DYNAMICVIS_CKPT_FILE as CKPT_FILE,  # noqa: F401
                    DYNAMICVIS_ENV as ENV, DYNAMICVIS_HF_REPO as HF_REPO)

# Upstream ``DynamicVisBackbone.arch_zoo``. Dims of 'l' are in the reference notes (rs-embed.md §3.5); its layer
# counts come from the upstream arch table (KyanChen/DynamicVis dynamicvis/models/models.py).
ARCHS: dict[str, dict[str, tuple[int, ...]]] = {
    "b": {"dims": (96, 192, 384, 768), "layers": (2, 4, 16, 4)},
    "l": {"dims": (128, 256, 512, 1024), "layers": (2, 4, 32, 4)},
}
ARCH_ALIASES = {"b": "b", "base": "b", "l": "l", "large": "l"}
PATCH_SIZES = (7, 3, 3, 3)
STRIDES = (4, 2, 2, 2)
KEEP_RATIOS = (8, 4, 2, 1)
PRETRAIN_IMG = 512  # the published pos_embed is (1, 128*128, 96): built for 512 px
LN_EPS = 1e-6
RMS_EPS = 1e-5

# path types of upstream MambaBlock: what the published weights can run, and why the others are refused
PATH_TYPES_OK = ("forward_reverse_mean", "forward")
PATH_TYPES_REFUSED = {
    "forward_reverse_gate": "needs a gate_layer (Linear 2C->2) that is not in the published weights",
    "forward_reverse_shuffle_gate": "needs a gate_layer (Linear 3C->3) that is not in the published weights",
    "forward_reverse_shuffle_mean": "scans a fresh random permutation on every call, so embeddings are not "
                                    "reproducible",
    "shuffle": "scans a fresh random permutation on every call, so embeddings are not reproducible",
}

# top-level keys of the published mmengine ``state_dict`` that are not backbone weights and are dropped on purpose
BACKBONE_PREFIX = "backbone."
IGNORED_PREFIXES = ("pre_neck.", "neck.", "head.", "data_preprocessor.")



def _infer_arch(name: str) -> str:
    """'auto' arch from a checkpoint file name (``..._dynamicvis_l_...`` / ``large`` -> 'l', else 'b')."""
    base = os.path.basename(name).lower()
    return "l" if re.search(r"dynamicvis_l(?:_|\.|$)|(?:^|[_-])large(?:_|\.|-|$)", base) else "b"


@dataclass(frozen=True)
class DynamicVisConfig:
    """Knobs of the DynamicVis adapter (RS_EMBED_DYNAMICVIS_*), validated against what the weights support."""

    arch: str = "b"
    image_size: int = 512
    path_type: str = "forward_reverse_mean"
    sampling_scale: float = 0.1  # Gumbel noise scale of the router: training only, no effect in eval
    keep_ratios: tuple[int, ...] = KEEP_RATIOS
    mamba2: bool = False
    scan: str = "auto"  # auto | torch | sequential | cuda
    scan_chunk: int = DEFAULT_CHUNK
    num_layers: tuple[int, ...] | None = None  # None = the arch's; reduced values only for tests/demos

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise AdapterError(f"{ENV}_ARCH={self.arch!r} is not a DynamicVis arch; use b (base), l (large) or auto")
        if self.mamba2:
            raise AdapterError(f"{ENV}_MAMBA2=1 is not supported: the published DynamicVis weights hold Mamba-1 "
                               "mixers (A_log (2C,16), x_proj, dt_proj); a Mamba2 mixer has different parameters. "
                               f"Unset {ENV}_MAMBA2 or set it to 0")
        if self.path_type in PATH_TYPES_REFUSED:
            raise AdapterError(f"{ENV}_PATH_TYPE={self.path_type!r} is refused: it "
                               f"{PATH_TYPES_REFUSED[self.path_type]}. Use forward_reverse_mean (the pretraining "
                               "setting) or forward")
        if self.path_type not in PATH_TYPES_OK:
            raise AdapterError(f"{ENV}_PATH_TYPE={self.path_type!r} is unknown; use one of {', '.join(PATH_TYPES_OK)}")
        if not math.isfinite(self.sampling_scale) or self.sampling_scale < 0:
            raise AdapterError(f"{ENV}_SAMPLING_SCALE={self.sampling_scale} must be a finite number >= 0 (it scales "
                               "the training-time Gumbel noise of the router and has no effect at inference)")
        if self.image_size < 32 or self.image_size % 32:
            raise AdapterError(f"{ENV}_IMG={self.image_size} must be a positive multiple of 32 (the backbone "
                               "downsamples by 32; 512 is the pretraining size)")
        if len(self.keep_ratios) != 4 or any(r < 1 for r in self.keep_ratios):
            raise AdapterError(f"{ENV}_KEEP_RATIOS={','.join(map(str, self.keep_ratios))} must be 4 integers >= 1 "
                               "(token keep ratio per stage; 0 would drop the spatial_gate weights of the published "
                               "file). Default 8,4,2,1")
        grids = stage_grids(self.image_size)
        for s, (g, r) in enumerate(zip(grids, self.keep_ratios)):
            if g * g // r < 1:
                raise AdapterError(f"{ENV}_KEEP_RATIOS: stage {s} has {g * g} tokens at {ENV}_IMG={self.image_size}, "
                                   f"ratio {r} would select none")
        if self.scan not in SCAN_CHOICES:
            raise AdapterError(f"{ENV}_SCAN={self.scan!r} is not supported; use one of {', '.join(SCAN_CHOICES)}")
        if self.scan_chunk < 1:
            raise AdapterError(f"{ENV}_SCAN_CHUNK={self.scan_chunk} must be a positive integer")
        if self.num_layers is not None and (len(self.num_layers) != 4 or any(n < 1 for n in self.num_layers)):
            raise AdapterError(f"num_layers={self.num_layers} must be 4 integers >= 1")

    @property
    def dims(self) -> tuple[int, ...]:
        return ARCHS[self.arch]["dims"]

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(self.num_layers) if self.num_layers is not None else ARCHS[self.arch]["layers"]

    @classmethod
    def from_env(cls) -> "DynamicVisConfig":
        arch_raw = env_str(f"{ENV}_ARCH", "auto").lower()
        if arch_raw == "auto":
            name = env_str(f"{ENV}_CKPT", "") or env_str(f"{ENV}_CKPT_FILE", CKPT_FILE)
            arch = _infer_arch(name)
        elif arch_raw in ARCH_ALIASES:
            arch = ARCH_ALIASES[arch_raw]
        else:
            raise AdapterError(f"{ENV}_ARCH={arch_raw!r} is not a DynamicVis arch; use b (base), l (large) or auto")
        return cls(
            arch=arch,
            image_size=env_int(f"{ENV}_IMG", 512),
            path_type=env_str(f"{ENV}_PATH_TYPE", "forward_reverse_mean").lower(),
            sampling_scale=env_float(f"{ENV}_SAMPLING_SCALE", 0.1),
            keep_ratios=env_int_tuple(f"{ENV}_KEEP_RATIOS", KEEP_RATIOS, length=4),
            mamba2=env_bool(f"{ENV}_MAMBA2", False),
            scan=env_str(f"{ENV}_SCAN", "auto").lower(),
            scan_chunk=env_int(f"{ENV}_SCAN_CHUNK", DEFAULT_CHUNK),
        )


def stage_grids(image_size: int) -> tuple[int, ...]:
    """Token-grid side per stage: conv output size floor((s + 2*(k//2) - k) / stride) + 1."""
    sizes, s = [], image_size
    for k, st in zip(PATCH_SIZES, STRIDES):
        s = (s + 2 * (k // 2) - k) // st + 1
        sizes.append(s)
    return tuple(sizes)


# --- network -----------------------------------------------------------------------------------
class PatchEmbed(nn.Module):
    """mmcv ``PatchEmbed`` with an integer padding: Conv2d -> raster tokens -> LayerNorm."""

    def __init__(self, in_ch: int, dim: int, kernel: int, stride: int):
        super().__init__()
        self.projection = nn.Conv2d(in_ch, dim, kernel, stride=stride, padding=kernel // 2, bias=True)
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.projection(x)
        hw = (x.shape[2], x.shape[3])
        return self.norm(x.flatten(2).transpose(1, 2)), hw


class MambaBlock(nn.Module):
    """RMSNorm -> Mamba mixer over (seq, flip(seq)) in one batch -> residual + mean of both directions."""

    def __init__(self, dim: int, path_type: str):
        super().__init__()
        self.path_type = path_type
        self.pre_norm = MambaRMSNorm(dim, eps=RMS_EPS)
        self.mamba_layer = MambaMixer(dim, d_state=16, d_conv=4, expand=2, dt_rank=math.ceil(dim / 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.path_type == "forward":
            return x + self.mamba_layer(self.pre_norm(x))
        b = x.shape[0]
        both = self.mamba_layer(self.pre_norm(torch.cat([x, x.flip(1)], dim=0)))
        fwd, rev = both[:b], both[b:]
        return x + (fwd + rev.flip(1)) / 2


class SpatialSparseMixer(nn.Module):
    """Routed token selection + bidirectional Mamba over [global tokens ; top-k tokens by weight]."""

    def __init__(self, dim: int, keep_ratio: int, num_global: int, path_type: str):
        super().__init__()
        self.keep_ratio = keep_ratio
        self.num_global = num_global
        self.spatial_gate = nn.Linear(dim, 1, bias=False)
        self.spatial_mamba_mixer = MambaBlock(dim, path_type)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(softmax weights (B, N), selected token ids (B, k) in descending-weight order)."""
        w = torch.softmax(self.spatial_gate(x).squeeze(-1), dim=1)
        k = x.shape[1] // self.keep_ratio
        return w, torch.topk(w, k, dim=1, largest=True, sorted=True).indices

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        glob = F.adaptive_avg_pool1d(x.transpose(1, 2), self.num_global).transpose(1, 2)   # (B, num, C)
        w, idx = self.route(x)
        gather_idx = idx.unsqueeze(-1).expand(-1, -1, c)
        selected = torch.gather(x, 1, gather_idx)                                           # scan order
        out = self.spatial_mamba_mixer(torch.cat([glob, selected], dim=1))[:, self.num_global:]
        out = out * torch.gather(w, 1, idx).unsqueeze(-1)
        residual = (x * w.unsqueeze(-1)).scatter(1, gather_idx, out)
        return x + residual


class DynamicVisBackbone(nn.Module):
    """Four stages of PatchEmbed -> SpatialSparseMixer x n -> LayerNorm; ``forward`` returns the stage maps."""

    def __init__(self, cfg: DynamicVisConfig):
        super().__init__()
        self.cfg = cfg
        self.grids = stage_grids(cfg.image_size)
        dims, layers = cfg.dims, cfg.layers
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grids[0] ** 2, dims[0]))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        stages = []
        for s in range(4):
            in_ch = 3 if s == 0 else dims[s - 1]
            blocks = nn.ModuleList(
                SpatialSparseMixer(dims[s], cfg.keep_ratios[s], num_global=self.grids[s], path_type=cfg.path_type)
                for _ in range(layers[s]))
            stages.append(nn.ModuleList([PatchEmbed(in_ch, dims[s], PATCH_SIZES[s], STRIDES[s]), blocks,
                                         nn.LayerNorm(dims[s], eps=LN_EPS)]))
        self.layers = nn.ModuleList(stages)

    def mixers(self) -> list[MambaMixer]:
        return [m for m in self.modules() if isinstance(m, MambaMixer)]

    def forward(self, x: torch.Tensor, out_indices: tuple[int, ...] = (3,)) -> list[torch.Tensor]:
        size = self.cfg.image_size
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[2] != size or x.shape[3] != size:
            raise AdapterError(f"DynamicVis input must be (B, 3, {size}, {size}) (the pos_embed is fixed at build "
                               f"time by {ENV}_IMG), got {tuple(x.shape)}; preprocess() resizes raw chips")
        outs = []
        for s, (embed, blocks, norm) in enumerate(self.layers):
            x, (h, w) = embed(x)
            if s == 0:
                x = x + self.pos_embed
            for block in blocks:
                x = block(x)
            x = norm(x).transpose(1, 2).reshape(x.shape[0], -1, h, w)
            if s in out_indices:
                outs.append(x)
        return outs


def resize_pos_embed(pos_embed: torch.Tensor, dst_side: int) -> torch.Tensor:
    """mmpretrain ``resize_pos_embed`` (no extra tokens): square grid -> (dst_side, dst_side), bicubic in fp32."""
    _, length, c = pos_embed.shape
    src_side = int(math.isqrt(length))
    if src_side * src_side != length:
        raise CheckpointError(f"pos_embed has {length} positions, not a square grid; cannot resize it")
    if src_side == dst_side:
        return pos_embed
    grid = pos_embed.reshape(1, src_side, src_side, c).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(dst_side, dst_side), mode="bicubic", align_corners=False)
    return grid.flatten(2).transpose(1, 2).to(pos_embed.dtype)


# --- adapter -----------------------------------------------------------------------------------
class DynamicVisAdapter(ImageNetRGBOnDevice, Adapter):
    spec = _SPEC
    config_cls = DynamicVisConfig

    def __init__(self, model: nn.Module, config: DynamicVisConfig, **kwargs: Any):
        super().__init__(model, config, **kwargs)
        self.scan_impl = resolve_scan_impl(config.scan, self.device, knob=f"{ENV}_SCAN")
        for mixer in self.model.mixers():
            mixer.set_scan(self.scan_impl, config.scan_chunk)
        if config.arch != "b" or config.image_size != 512:  # per-instance spec for non-default builds
            self.spec = dataclasses.replace(type(self).spec, embed_dim=config.dims[-1], image_size=config.image_size,
                                            grid_size=stage_grids(config.image_size)[-1])

    @classmethod
    def build_model(cls, config: DynamicVisConfig) -> DynamicVisBackbone:
        return DynamicVisBackbone(config)

    @classmethod
    def checkpoint_filter_fn(cls, checkpoint: Mapping[str, Any], model: nn.Module) -> dict[str, torch.Tensor]:
        """mmengine file -> backbone state dict.

        Rules, in order: weights under ``state_dict``; ``backbone.X`` -> ``X``; keys under
        :data:`IGNORED_PREFIXES` (pretraining heads) dropped; any other key kept as is, so strict loading reports
        it as unexpected. ``pos_embed`` is resized (bicubic, fp32) when the model is built for another size.
        """
        sd = checkpoint.get("state_dict") if isinstance(checkpoint, Mapping) else None
        if not isinstance(sd, Mapping):
            raise CheckpointError("the DynamicVis checkpoint must be an mmengine file with the weights under "
                                  f"'state_dict' (top-level keys here: {sorted(checkpoint)[:8]}); use the published "
                                  f"{CKPT_FILE}")
        out: dict[str, torch.Tensor] = {}
        for key, value in sd.items():
            if key.startswith(BACKBONE_PREFIX):
                out[key[len(BACKBONE_PREFIX):]] = value
            elif key.startswith(IGNORED_PREFIXES):
                continue
            else:
                out[key] = value
        pos = out.get("pos_embed")
        if isinstance(model, DynamicVisBackbone) and isinstance(pos, torch.Tensor) and pos.ndim == 3:
            want = model.pos_embed.shape
            if pos.shape[2] != want[2]:
                raise CheckpointError(
                    f"checkpoint pos_embed has {pos.shape[2]} channels but the model is DynamicVis-"
                    f"{model.cfg.arch.upper()} (stage-0 width {want[2]}); set {ENV}_ARCH to match the file "
                    "(b: 96, l: 128)")
            if pos.shape[1] != want[1]:
                out["pos_embed"] = resize_pos_embed(pos, model.grids[0])
        return out

    @classmethod
    def published_state_dict(cls, model: nn.Module) -> dict[str, Any]:
        """The mmengine layout of the published file: backbone under ``backbone.`` plus (dummy) head tensors."""
        sd = {BACKBONE_PREFIX + k: v.detach().clone() for k, v in model.state_dict().items()}
        gen = torch.Generator().manual_seed(0)
        width = model.cfg.dims[-1] if isinstance(model, DynamicVisBackbone) else 768
        # stand-ins for the pretraining heads; the loader must drop them by IGNORED_PREFIXES
        sd["head.fc.weight"] = torch.randn(62, width, generator=gen) * 0.01
        sd["head.fc.bias"] = torch.zeros(62)
        sd["pre_neck.lateral_convs.0.conv.weight"] = torch.randn(8, width, 1, 1, generator=gen) * 0.01
        meta = {"epoch": 170, "note": "written by rs-embed-assets (deterministic demo weights)",
                "dataset_meta": {"classes": 62}}
        return {"meta": meta, "state_dict": sd}

    # --- inference ------------------------------------------------------------------------------
    def preprocess(self, raw: np.ndarray, *, bands: tuple[str, ...] | None = None,
                   tile_context: dict[str, Any] | None = None,
                   device: str | torch.device | None = None) -> torch.Tensor:
        """Raw S2 SR DN (B, 3, H, W) in B4,B3,B2 order -> (B, 3, img, img) ImageNet-normalised, as rs-embed.

        Per chip, in fp32: nan/inf -> 0, ``/10000``, clip to [0, 1], ``x255`` and a *truncating* ``astype(uint8)``;
        PIL ``BICUBIC`` resize (antialiased when shrinking) to RS_EMBED_DYNAMICVIS_IMG (non-square chips are
        stretched); ``/255``; ImageNet mean/std.
        """
        arr = check_raw_input(raw, self.spec, ndim=4, bands=bands)
        return self.place(sr_rgb_to_imagenet(arr, self.config.image_size), device)

    def forward_embeddings(self, x: torch.Tensor, *, pooling: str = "mean", **_: Any):
        grid = self.model(self.to_device(x), out_indices=(3,))[-1]
        pooled = grid.mean(dim=(2, 3)) if pooling == "mean" else grid.amax(dim=(2, 3))
        return pooled, grid

    def preprocessing_spec(self) -> dict[str, Any]:
        spec = super().preprocessing_spec()
        spec.update(
            arch=self.config.arch, image_size=self.config.image_size,
            u8="clip(raw/10000,0,1)*255 -> astype(uint8) (truncating)",
            resize="PIL BICUBIC to img x img (stretch)", norm={"mean": IMAGENET_MEAN, "std": IMAGENET_STD},
            scan_requested=self.config.scan, scan_resolved=self.scan_impl,
            pooled="featmap_mean/max", grid="last_stage_featmap",
        )
        return spec
