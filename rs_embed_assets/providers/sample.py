"""The offline ``sample`` provider: deterministic synthetic Sentinel-2 L2A and Sentinel-1 scenes.

Not real imagery — every composite is flagged ``synthetic=1`` and says so in ``provider_info``.
It exists so the catalog runs end to end on a machine without Earth Engine access (demos, tests,
CI). The scenes still have the structure models react to:

- a land-cover map from smooth noise fields in absolute UTM coordinates (sub-tiles of one tile
  join seamlessly), seeded by the MGRS tile id: water, vegetation, cropland, bare soil, urban;
- class spectra with plausible L2A reflectances for the 12 bands (B1…B12 without B10), DN 0…10000;
- seasonal change: vegetation greens up towards the local summer (hemisphere-aware), cropland
  is bare soil in winter and green in summer;
- cloud gaps: each month has cloud blobs where fewer scenes are valid, and a few pixels with none
  (valid_count 0, data 0);
- Sentinel-1 VV/VH linear backscatter per class with speckle reduced by the median of N scenes.
"""

from __future__ import annotations

import hashlib
from statistics import NormalDist
from typing import Any

import numpy as np
import xarray as xr

from ..composite import S2_BANDS, make_composite, parse_month, sensor_spec
from ..grid import PIXEL_SIZE_M, Tile, mgrs_tile
from .base import Provider

NOISE_BLOCK = 512  # random fields are drawn per fixed block of the MGRS tile, so windows agree
CLOUD_OPAQUE_SIGMA = 2.5  # where the cloud field exceeds this, no scene of the month is clear

CLASSES = ("water", "vegetation", "cropland", "bare_soil", "urban")

# Typical L2A reflectance × 10000 for B1,B2,B3,B4,B5,B6,B7,B8,B8A,B9,B11,B12
_S2_SPECTRA = {
    "water": [700, 600, 550, 400, 330, 260, 230, 200, 180, 120, 80, 50],
    "vegetation": [300, 350, 650, 380, 1100, 2700, 3300, 3500, 3650, 3700, 1900, 900],
    "bare_soil": [1000, 1150, 1450, 1750, 2000, 2200, 2350, 2450, 2550, 2600, 3200, 2700],
    "urban": [1200, 1250, 1350, 1450, 1550, 1650, 1700, 1780, 1820, 1800, 2100, 1950],
}
_DORMANT_VEGETATION = [450, 500, 700, 750, 1100, 1500, 1700, 1850, 1950, 2000, 2400, 1700]

# (VV, VH) linear σ0
_S1 = {"water": (0.008, 0.0015), "vegetation": (0.09, 0.025), "cropland": (0.06, 0.012),
       "bare_soil": (0.05, 0.008), "urban": (0.45, 0.07)}


def _seed(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256("|".join(map(str, parts)).encode()).digest()[:8], "little")


def _normal(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return rng.standard_normal(shape, dtype=np.float32)


def _smooth_field(seed: int, x: np.ndarray, y: np.ndarray, wavelengths_m=(9000, 4000, 1800, 800)) -> np.ndarray:
    """Sum of random plane waves evaluated on absolute coordinates; roughly N(0, 1)."""
    rng = np.random.default_rng(seed)
    out = np.zeros((y.size, x.size), dtype=np.float32)
    n = 0
    for wl in wavelengths_m:
        for _ in range(3):
            theta = rng.uniform(0, 2 * np.pi)
            k = 2 * np.pi / wl * rng.uniform(0.7, 1.3)
            kx, ky, phase = k * np.cos(theta), k * np.sin(theta), rng.uniform(0, 2 * np.pi)
            ax, ay = kx * x, ky * y + phase
            # sin(ax + ay) = sin(ax)cos(ay) + cos(ax)sin(ay) as outer products: no 2-D trig
            out += (np.outer(np.cos(ay), np.sin(ax)) + np.outer(np.sin(ay), np.cos(ax))).astype(np.float32)
            n += 1
    return out * np.float32(np.sqrt(2.0 / n))


class SampleProvider(Provider):
    """Synthetic composites for any tile and month; deterministic given (seed, tile, month)."""

    name = "sample"
    synthetic = True

    def __init__(self, seed: int = 0, scenes_per_month: int = 6, cloud_cover: float = 0.25):
        if not 1 <= scenes_per_month <= 60:
            raise ValueError(f"scenes_per_month={scenes_per_month} must be in 1..60")
        if not 0.0 <= cloud_cover < 1.0:
            raise ValueError(f"cloud_cover={cloud_cover} must be in [0, 1)")
        self.seed = int(seed)
        self.scenes_per_month = int(scenes_per_month)
        self.cloud_cover = float(cloud_cover)

    def describe(self) -> dict[str, Any]:
        return {"provider": self.name, "synthetic": True, "seed": self.seed,
                "scenes_per_month": self.scenes_per_month, "cloud_cover": self.cloud_cover}

    # -- land cover ----------------------------------------------------------------------------
    def land_cover(self, tile: Tile) -> np.ndarray:
        """Class index per pixel (indices into CLASSES); fixed over time."""
        x, y = tile.x_coords(), tile.y_coords()
        water = _smooth_field(_seed(self.seed, tile.mgrs, "water"), x, y, (12000, 5000, 2000))
        urban = _smooth_field(_seed(self.seed, tile.mgrs, "urban"), x, y, (6000, 2500, 900))
        soil = _smooth_field(_seed(self.seed, tile.mgrs, "soil"), x, y, (7000, 3000, 1200))
        crop = _smooth_field(_seed(self.seed, tile.mgrs, "crop"), x, y, (3000, 1200, 500))
        lc = np.full(water.shape, CLASSES.index("vegetation"), dtype=np.uint8)
        lc[crop > 0.2] = CLASSES.index("cropland")
        lc[soil > 1.0] = CLASSES.index("bare_soil")
        lc[urban > 1.1] = CLASSES.index("urban")
        lc[water > 1.2] = CLASSES.index("water")
        return lc

    def _season(self, tile: Tile, month: str) -> float:
        """1 at local mid-summer, 0 at mid-winter."""
        m = int(month[5:7])
        peak = 7 if tile.epsg < 32700 else 1
        return float(0.5 + 0.5 * np.cos(2 * np.pi * (m - peak) / 12.0))

    # -- composites ----------------------------------------------------------------------------
    def composite(self, sensor: str, tile: Tile, month: str) -> xr.Dataset:
        """The composite of exactly ``tile``'s pixels (any window of an MGRS tile).

        Every value is a function of the absolute pixel position, the month and the seed, never of
        the window: a sub-tile, a row band or a whole tile agree pixel for pixel where they overlap.
        """
        month = parse_month(month)
        sensor_spec(sensor)
        lc = self.land_cover(tile)
        season = self._season(tile, month)
        x, y = tile.x_coords(), tile.y_coords()
        info = {"synthetic": True, "note": "SYNTHETIC sample data, not real Sentinel imagery",
                "season_index": round(season, 3), "classes": list(CLASSES)}
        if sensor == "s2":
            data, valid = self._s2(lc, season, x, y, tile, month)
            info["cloud_cover_target"] = self.cloud_cover
        else:
            data, valid = self._s1(lc, season, tile, month)
        return make_composite(sensor=sensor, tile=tile, month=month, data=data, valid_count=valid,
                              provider=self.name, synthetic=True, scene_count=self.scenes_per_month,
                              provider_info=info)

    def _noise(self, tile: Tile, lead: tuple[int, ...], draw, *key: Any) -> np.ndarray:
        """Random fields (``lead`` + (H, W), float32) drawn per fixed 512 px block of the MGRS tile."""
        base = mgrs_tile(tile.mgrs)
        oy = int(round((base.y0 - tile.y0) / PIXEL_SIZE_M))
        ox = int(round((tile.x0 - base.x0) / PIXEL_SIZE_M))
        h, w, b = tile.height, tile.width, NOISE_BLOCK
        out = np.empty(lead + (h, w), dtype=np.float32)
        for by in range(oy // b, (oy + h - 1) // b + 1):
            for bx in range(ox // b, (ox + w - 1) // b + 1):
                rng = np.random.default_rng(_seed(self.seed, tile.mgrs, *key, by, bx))
                blk = draw(rng, lead + (b, b))
                y0, y1 = max(oy, by * b), min(oy + h, (by + 1) * b)
                x0, x1 = max(ox, bx * b), min(ox + w, (bx + 1) * b)
                out[..., y0 - oy:y1 - oy, x0 - ox:x1 - ox] = blk[..., y0 - by * b:y1 - by * b, x0 - bx * b:x1 - bx * b]
        return out

    def _s2(self, lc, season, x, y, tile, month):
        spectra = np.zeros((len(CLASSES), len(S2_BANDS)), dtype=np.float32)
        green = np.asarray(_S2_SPECTRA["vegetation"], np.float32)
        dormant = np.asarray(_DORMANT_VEGETATION, np.float32)
        soil = np.asarray(_S2_SPECTRA["bare_soil"], np.float32)
        spectra[CLASSES.index("water")] = _S2_SPECTRA["water"]
        spectra[CLASSES.index("vegetation")] = dormant + (green - dormant) * (0.35 + 0.65 * season)
        crop_green = max(0.0, (season - 0.4) / 0.6)  # crops emerge in late spring
        spectra[CLASSES.index("cropland")] = soil + (green - soil) * crop_green
        spectra[CLASSES.index("bare_soil")] = soil
        spectra[CLASSES.index("urban")] = _S2_SPECTRA["urban"]
        img = spectra[lc].transpose(2, 0, 1)  # (C, H, W) float32
        # within-class texture (smooth, fixed in time) and per-month noise
        texture = _smooth_field(_seed(self.seed, tile.mgrs, "texture"), x, y, (600, 250, 120))
        img *= (1.0 + 0.08 * texture)[None]
        img *= 1.0 + 0.03 * self._noise(tile, (len(S2_BANDS),), _normal, month, "s2")
        # clouds: blobs where fewer of the month's scenes are clear; the thickest leave no valid scene.
        # The field is ~N(0, 1), so a fixed threshold gives the target cover whatever the window.
        cloud = _smooth_field(_seed(self.seed, tile.mgrs, month, "cloud"), x, y, (5000, 2000, 800))
        if self.cloud_cover > 0:
            thr = NormalDist().inv_cdf(1.0 - self.cloud_cover)
            cloudiness = np.clip((cloud - thr) / max(1e-6, CLOUD_OPAQUE_SIGMA - thr), 0, 1)
        else:
            cloudiness = np.zeros_like(cloud)
        valid = np.round(self.scenes_per_month * (1.0 - cloudiness)).astype(np.uint16)
        data = np.clip(np.round(img), 1, 10000).astype(np.uint16)
        data[:, valid == 0] = 0
        return data, valid

    def _s1(self, lc, season, tile, month):
        h, w = lc.shape
        base = np.zeros((len(CLASSES), 2), np.float32)
        for i, c in enumerate(CLASSES):
            vv, vh = _S1[c]
            if c in ("vegetation", "cropland"):
                g = 0.6 + 0.6 * season
                vv, vh = vv * g, vh * g
            base[i] = (vv, vh)
        mean = base[lc].transpose(2, 0, 1)
        n = self.scenes_per_month
        # median of n gamma-distributed looks (speckle, 4.4 ENL) ≈ reduced multiplicative noise
        looks = self._noise(tile, (n, 2), lambda rng, shape: rng.gamma(4.4, 1 / 4.4, size=shape), month, "s1")
        data = (mean * np.median(looks, axis=0)).astype(np.float32)
        valid = np.full((h, w), n, dtype=np.uint16)
        return data, valid

    @property
    def pixel_size_m(self) -> float:
        return PIXEL_SIZE_M
