"""The imagery provider interface.

A provider turns (sensor, tile, month) into a composite with the structure described in
``rs_embed_assets.composite``: raw provider values on the tile's own UTM grid at 10 m, the band
names, a per-pixel valid-observation count, CRS and transform. An empty collection is not an
exception: it is an ``empty_composite`` with ``status="empty"`` and the reason recorded.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

from ..grid import Tile

if TYPE_CHECKING:
    import xarray as xr


class ProviderError(RuntimeError):
    """The provider could not produce a composite (auth, quota, missing files...); says how to fix it."""


class Provider(ABC):
    name: str = "provider"
    synthetic: bool = False

    @abstractmethod
    def composite(self, sensor: str, tile: Tile, month: str) -> xr.Dataset:
        """The monthly composite of ``sensor`` ('s2' | 's1') for ``tile`` and ``month`` ('YYYY-MM')."""

    def describe(self) -> dict[str, Any]:
        """Configuration recorded as lineage. Must never contain credentials."""
        return {"provider": self.name}
