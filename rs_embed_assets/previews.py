"""Small pictures and tables of a partition for the catalog's UI (no Dagster here).

- ``composite_quicklook``  RGB of an S2 composite (B4, B3, B2), or S1 false colour (VV, VH, VV/VH)
- ``grid_pca_quicklook``   the first three principal components of an embedding grid as RGB
- ``encode_png``           a minimal PNG writer (zlib only), so previews need no imaging library
- ``markdown_image``       a PNG as a Markdown data-URI image, the form Dagster's UI renders inline
- ``sample_rows_markdown`` the first rows of an Arrow table as a Markdown table, wide columns left out

Every picture is at most ``max_px`` on its longer side (block-averaged), with a 2–98 % stretch per
channel; pixels without data are black. A 256 px RGB preview is ~10–60 KB as PNG, ~15–80 KB as a data URI.
"""

from __future__ import annotations

import base64
import struct
import warnings
import zlib
from typing import Iterable

import numpy as np

DEFAULT_MAX_PX = 256
QUICKLOOK_BANDS = {"s2": ("B4", "B3", "B2"), "s1": ("VV", "VH")}  # what composite_rgb reads per sensor
PNG_BUDGET_BYTES = 100_000  # a data URI bigger than this is not embedded (the page must stay light)


# --- PNG -------------------------------------------------------------------------------------
def encode_png(rgb: np.ndarray) -> bytes:
    """8-bit RGB (H, W, 3) or grey (H, W) array → PNG bytes (filter type 'up', zlib level 9)."""
    img = np.asarray(rgb)
    if img.dtype != np.uint8:
        raise ValueError(f"encode_png needs uint8 pixels, got {img.dtype}")
    if img.ndim == 2:
        colour_type, channels = 0, 1
        img = img[:, :, None]
    elif img.ndim == 3 and img.shape[2] == 3:
        colour_type, channels = 2, 3
    else:
        raise ValueError(f"encode_png needs (H, W) or (H, W, 3), got {img.shape}")
    h, w = img.shape[:2]
    if h == 0 or w == 0:
        raise ValueError("encode_png needs a non-empty image")
    rows = img.reshape(h, w * channels).astype(np.int16)
    up = np.empty_like(rows)
    up[0] = rows[0]
    up[1:] = rows[1:] - rows[:-1]  # PNG filter 2 ("up"): smooth images compress far better
    raw = np.concatenate([np.full((h, 1), 2, np.uint8), (up % 256).astype(np.uint8)], axis=1).tobytes()

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 8, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def markdown_image(png: bytes, alt: str) -> str:
    """``![alt](data:image/png;base64,...)``: Dagster renders it inline on the materialisation."""
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode('ascii')})"


# --- arrays → RGB ----------------------------------------------------------------------------
def _downsample(arr: np.ndarray, max_px: int) -> np.ndarray:
    """Block mean over the last two axes (NaN-aware) so the longer side is ≤ max_px."""
    h, w = arr.shape[-2:]
    f = max(1, int(np.ceil(max(h, w) / max_px)))
    if f == 1:
        return arr.astype(np.float32)
    hh, ww = (h // f) * f, (w // f) * f
    if hh == 0 or ww == 0:
        return arr.astype(np.float32)
    blocks = arr[..., :hh, :ww].astype(np.float32).reshape(*arr.shape[:-2], hh // f, f, ww // f, f)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN blocks (no data) stay NaN, quietly
        return np.nanmean(blocks, axis=(-3, -1))




def stretch_to_uint8(channels: np.ndarray, lo: float = 2.0, hi: float = 98.0, *, joint: bool = False) -> np.ndarray:
    """(C, H, W) floats → (H, W, C) uint8 with a percentile stretch; NaN → 0.

    ``joint`` uses one range for all channels (keeps the colour balance of a true-colour image);
    otherwise each channel is stretched on its own (false colour, principal components).
    """
    out = np.zeros(channels.shape, np.uint8)
    every = channels[np.isfinite(channels)]
    for i, band in enumerate(channels):
        finite = np.isfinite(band)
        if not finite.any():
            continue
        a, b = np.percentile(every if joint else band[finite], [lo, hi])
        scale = 255.0 / (b - a) if b > a else 0.0
        with np.errstate(invalid="ignore"):
            scaled = np.clip((band - a) * scale, 0, 255)
        out[i] = np.where(finite, scaled, 0).astype(np.uint8)
    return np.moveaxis(out, 0, -1)


def composite_rgb(data: np.ndarray, bands: Iterable[str], sensor: str, *, max_px: int = DEFAULT_MAX_PX) -> np.ndarray:
    """(band, y, x) composite values → (H, W, 3) uint8 preview.

    S2: true colour B4/B3/B2; DN 0 means no observation. S1: VV dB, VH dB and VV−VH dB (the
    VV/VH ratio) as R/G/B, the usual false colour where water is dark and vegetation green.
    """
    names = [str(b) for b in bands]
    arr = np.asarray(data, dtype=np.float32)
    if sensor == "s2":
        want = QUICKLOOK_BANDS["s2"]
        missing = [b for b in want if b not in names]
        if missing:
            raise ValueError(f"S2 quick-look needs bands {want}; composite has {names}")
        rgb = np.stack([arr[names.index(b)] for b in want])
        rgb[:, (rgb <= 0).all(axis=0)] = np.nan  # DN 0 in every band: no observation
    elif sensor == "s1":
        if not {"VV", "VH"} <= set(names):
            raise ValueError(f"S1 false colour needs bands VV and VH; composite has {names}")
        with np.errstate(divide="ignore", invalid="ignore"):
            vv = 10 * np.log10(np.where(arr[names.index("VV")] > 0, arr[names.index("VV")], np.nan))
            vh = 10 * np.log10(np.where(arr[names.index("VH")] > 0, arr[names.index("VH")], np.nan))
        rgb = np.stack([vv, vh, vv - vh])
    else:
        raise ValueError(f"no quick-look for sensor {sensor!r}")
    return stretch_to_uint8(_downsample(rgb, max_px), joint=sensor == "s2")


def pca_rgb(grid: np.ndarray, *, max_px: int = DEFAULT_MAX_PX, seed: int = 0) -> np.ndarray:
    """(feature, y, x) embedding grid → (H, W, 3) uint8: the first 3 principal components.

    Components are fitted on up to 20 000 cells with data (deterministic sample) and their signs
    fixed so the largest loading is positive, so re-running gives the same colours. Cells without a
    vector (NaN) are black. Up-sampled by pixel repetition when the grid is small (≥ 128 px side).
    """
    g = np.asarray(grid, dtype=np.float32)
    if g.ndim != 3:
        raise ValueError(f"pca_rgb needs (feature, y, x), got {g.shape}")
    d, h, w = g.shape
    cells = g.reshape(d, h * w).T
    ok = np.isfinite(cells).all(axis=1)
    comps = np.full((3, h * w), np.nan, np.float32)
    if ok.sum() >= 2:
        x = cells[ok].astype(np.float64)
        fit = x
        if len(x) > 20_000:
            fit = x[np.random.default_rng(seed).choice(len(x), 20_000, replace=False)]
        mean = fit.mean(axis=0)
        _, _, vt = np.linalg.svd(fit - mean, full_matrices=False)
        k = min(3, vt.shape[0])
        basis = vt[:k]
        signs = np.sign(basis[np.arange(k), np.argmax(np.abs(basis), axis=1)])
        basis = basis * np.where(signs == 0, 1, signs)[:, None]
        comps[:k, ok] = ((x - mean) @ basis.T).T.astype(np.float32)
        if k < 3:
            comps[k:, ok] = 0.0
    img = stretch_to_uint8(_downsample(comps.reshape(3, h, w), max_px))
    rep = max(1, 128 // max(1, max(img.shape[:2])))
    return np.repeat(np.repeat(img, rep, axis=0), rep, axis=1) if rep > 1 else img


def fit_png(render, *, max_px: int = DEFAULT_MAX_PX, budget: int = PNG_BUDGET_BYTES) -> bytes:
    """PNG of ``render(max_px)``, halving the size until it fits the byte budget."""
    size = max_px
    while True:
        png = encode_png(render(size))
        if len(png) * 4 / 3 <= budget or size <= 32:
            return png
        size //= 2


# --- tables ----------------------------------------------------------------------------------
WIDE_COLUMNS = ("embedding", "geometry")


def sample_rows_markdown(table, n: int = 5, *, exclude: Iterable[str] = WIDE_COLUMNS,
                         columns: Iterable[str] | None = None) -> str:
    """The first ``n`` rows of a pyarrow Table as a Markdown table (vector/geometry columns left out)."""
    skip = set(exclude)
    names = [c for c in (columns or table.column_names) if c in table.column_names and c not in skip]
    head = table.slice(0, n).select(names).to_pylist()

    def fmt(v) -> str:
        if isinstance(v, float):
            return f"{v:.6g}"
        s = str(v)
        return (s[:12] + "…") if len(s) > 16 and all(ch in "0123456789abcdef" for ch in s) else s.replace("|", "\\|")

    lines = ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in names) + " |" for r in head]
    if not head:
        lines.append("| " + " | ".join("" for _ in names) + " |")
    return "\n".join(lines)
