"""Preprocessing steps shared by several adapters, each reproducing one rs-embed behaviour."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .specs import AdapterError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def finite_or_zero(arr: np.ndarray) -> np.ndarray:
    """float32 with NaN / ±inf -> 0, the fill value rs-embed's provider writes for missing pixels.

    The same values as ``np.nan_to_num(..., nan=0, posinf=0, neginf=0)`` (tested), at a third of the
    cost: one ``isfinite`` pass, and a copy only when something must be replaced.
    """
    x = np.asarray(arr, dtype=np.float32)
    bad = ~np.isfinite(x)
    if bad.any():
        x = x.copy() if x is arr else x
        x[bad] = 0.0
    return x


def finite_or_zero_tensor(x: torch.Tensor) -> torch.Tensor:
    """``finite_or_zero`` for a tensor on any device: float32, NaN / ±inf -> 0.

    uint16 (the S2 composites' stored dtype, what GPU workers copy) is widened through its int16 bit
    pattern: CUDA kernels cover only a few operations on unsigned 16-bit tensors, int16/int32 all of them.
    """
    if x.dtype == torch.uint16:
        return x.view(torch.int16).to(torch.int32).bitwise_and_(0xFFFF).to(torch.float32)
    return torch.nan_to_num(x.to(torch.float32), nan=0.0, posinf=0.0, neginf=0.0)


def host_tensor(arr: np.ndarray, *, square: bool) -> torch.Tensor:
    """A raw host batch as the float32 tensor ``preprocess_tensor`` takes (the adapters whose host
    ``preprocess`` is their tensor preprocessing on the CPU); ``square`` centre-pads it first
    (``pad_square``: padding copies values, so it commutes with the per-value steps and the per-chip
    min/max that follow)."""
    return torch.from_numpy(np.ascontiguousarray(pad_square(arr) if square else arr, dtype=np.float32))


class ImageNetRGBOnDevice:
    """Device preprocessing of the RGB adapters (ScaleMAE, DynamicVis): ``sr_rgb_to_imagenet_tensor``,
    for chips that are already image-size (otherwise PIL resizes them on the host)."""

    def device_preprocessing(self) -> bool:
        return self.spec.chip_size == self.config.image_size

    def preprocess_tensor(self, raw: torch.Tensor, *, bands: tuple[str, ...] | None = None,
                          tile_context: dict | None = None) -> torch.Tensor:
        """``preprocess`` on a tensor of image-size chips, on its device: the same values (no resize)."""
        from .base import check_raw_input

        arr = check_raw_input(raw, self.spec, ndim=4, bands=bands)
        return sr_rgb_to_imagenet_tensor(arr, self.config.image_size, model_id=self.spec.model_id)


def pad_square(x: np.ndarray) -> np.ndarray:
    """Centre-pad the last two axes to a square: reflect, or edge when the pad is not smaller than the side
    (rs-embed ``prepare_square(..., shape_adjust="pad")``). A square input is returned unchanged."""
    h, w = x.shape[-2:]
    if h == w:
        return x
    side = max(h, w)
    ph, pw = side - h, side - w
    mode = "edge" if (ph >= h or pw >= w) else "reflect"
    pad = [(0, 0)] * (x.ndim - 2) + [(ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2)]
    return np.pad(x, pad, mode=mode)


def resize_bilinear(t: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of (..., C, H, W) to size×size (align_corners=False, no antialias).

    Extra leading axes (e.g. AgriFM's frames) are folded into the batch; a size×size input is returned as is.
    """
    if t.shape[-2:] == (size, size):
        return t
    lead = t.shape[:-2]
    out = F.interpolate(t.reshape(-1, *t.shape[-3:]), size=(size, size), mode="bilinear", align_corners=False)
    return out.reshape(*lead, size, size)


def sr_rgb_to_imagenet(rgb: np.ndarray, size: int) -> torch.Tensor:
    """Raw S2 SR DN (B, 3, H, W) -> ImageNet-normalised (B, 3, size, size), as rs-embed's RGB adapters:

    nan/inf -> 0, /10000, clip [0, 1], ×255, *truncating* ``astype(uint8)``, PIL BICUBIC resize
    (antialiased when shrinking; non-square chips are stretched), /255, ImageNet mean/std.
    """
    u8 = (np.clip(finite_or_zero(rgb) / np.float32(10000.0), 0.0, 1.0) * np.float32(255.0)).astype(np.uint8)
    out = np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(chip.transpose(1, 2, 0)), mode="RGB")
                               .resize((size, size), resample=Image.BICUBIC)) for chip in u8])
    t = torch.from_numpy(out).permute(0, 3, 1, 2).float().div_(255.0)
    return _imagenet(t)


def _imagenet(t: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=t.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=t.device).view(1, 3, 1, 1)
    return (t - mean) / std


def sr_rgb_to_imagenet_tensor(rgb: torch.Tensor, size: int, *, model_id: str = "RGB") -> torch.Tensor:
    """``sr_rgb_to_imagenet`` on a tensor (any device) for chips already ``size`` × ``size``: PIL's
    resize is then the identity, and every other step is the same float32 arithmetic and the same
    truncating conversion to uint8, so the values are identical."""
    if tuple(rgb.shape[-2:]) != (size, size):
        raise AdapterError(f"{model_id} tensor preprocessing takes {size} px chips, got {tuple(rgb.shape[-2:])}; "
                           "preprocess() resizes them (PIL bicubic)")
    u8 = (torch.clamp(finite_or_zero_tensor(rgb) / 10000.0, 0.0, 1.0) * 255.0).to(torch.uint8)
    return _imagenet(u8.to(torch.float32).div_(255.0))
