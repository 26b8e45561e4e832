"""The chip lattice: where every model's chips lie on an MGRS tile, and which partition owns them.

One lattice per MGRS tile and chip size: chips are ``chip`` px squares anchored at the MGRS tile's
upper-left corner with stride ``chip``; only whole chips inside the 10 980 px tile exist (the
remainder at the east/south edge lies in the 9.8 km overlap the neighbouring tile covers).

A chip belongs to the (sub-)tile holding its upper-left pixel. So for any k×k sub-tiling:

- the union of the chips owned by the sub-tiles is the whole tile's lattice, without duplicates;
- a chip's id (``<MGRS>_<chip>px_r<row>_c<col>``, lattice indices) and its pixels do not depend on k;
- the grids of sub-tiles line up cell for cell with the whole tile's grid.

A sub-tile's chips may reach past its own extent; its composite therefore covers a *read window*:
its extent plus the margin its last chips reach into, for every model's chip size
(``read_window``). Everything that cuts chips or reads them back (embedding, catalog, exports)
uses this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from .grid import PIXEL_SIZE_M, TILE_PIXELS, Tile, mgrs_tile, subtile_span


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class Window:
    """A pixel window of an MGRS tile: rows ``y0:y0+height``, cols ``x0:x0+width`` (10 m pixels)."""

    y0: int
    x0: int
    height: int
    width: int

    @property
    def y1(self) -> int:
        return self.y0 + self.height

    @property
    def x1(self) -> int:
        return self.x0 + self.width


def tile_window(tile: Tile) -> Window:
    """The pixels of ``tile`` (a whole tile or a sub-tile) in its MGRS tile's pixel coordinates."""
    y0, _ = subtile_span(tile.k, tile.row)
    x0, _ = subtile_span(tile.k, tile.col)
    return Window(y0, x0, tile.height, tile.width)


def window_tile(tile: Tile, window: Window) -> Tile:
    """A ``Tile`` describing ``window`` (same MGRS tile, CRS and sub-tile identity; shifted origin/shape).

    Providers return exactly the pixels of the Tile they are given, so this is how a composite of a
    read window or of one row band of it is requested.
    """
    base = mgrs_tile(tile.mgrs)
    return Tile(mgrs=tile.mgrs, epsg=tile.epsg, x0=base.x0 + window.x0 * PIXEL_SIZE_M,
                y0=base.y0 - window.y0 * PIXEL_SIZE_M, width=window.width, height=window.height,
                k=tile.k, row=tile.row, col=tile.col)


@dataclass(frozen=True)
class ChipLattice:
    """The chips of one chip size owned by one (sub-)tile: lattice rows ``row0:row1``, cols ``col0:col1``."""

    tile: Tile
    chip: int
    row0: int
    row1: int
    col0: int
    col1: int

    @property
    def rows(self) -> int:
        return max(0, self.row1 - self.row0)

    @property
    def cols(self) -> int:
        return max(0, self.col1 - self.col0)

    @property
    def count(self) -> int:
        return self.rows * self.cols

    @property
    def window(self) -> Window:
        """The pixels the owned chips cover (MGRS-tile pixel coordinates); empty when no chip is owned."""
        return Window(self.row0 * self.chip, self.col0 * self.chip, self.rows * self.chip, self.cols * self.chip)

    def chip_id(self, row: int, col: int) -> str:
        return f"{self.tile.mgrs}_{self.chip}px_r{row:03d}_c{col:03d}"

    def positions(self) -> Iterable[tuple[int, int]]:
        """Owned (lattice row, lattice col), row-major."""
        for r in range(self.row0, self.row1):
            for c in range(self.col0, self.col1):
                yield r, c

    def grid_transform(self, cells_per_chip: int) -> tuple[float, float, float, float, float, float]:
        """GDAL-order transform of the stitched grid of the owned chips (cells of chip/cells_per_chip px)."""
        base = mgrs_tile(self.tile.mgrs)
        cell = self.chip * PIXEL_SIZE_M / cells_per_chip
        w = self.window
        return (base.x0 + w.x0 * PIXEL_SIZE_M, cell, 0.0, base.y0 - w.y0 * PIXEL_SIZE_M, 0.0, -cell)


def chip_lattice(tile: Tile, chip: int) -> ChipLattice:
    """The chips of size ``chip`` whose upper-left pixel lies in ``tile``."""
    if chip < 1:
        raise ValueError(f"chip size must be a positive number of pixels, got {chip}")
    n = TILE_PIXELS // chip  # whole chips of the MGRS tile per side
    w = tile_window(tile)
    r0, c0 = _ceil_div(w.y0, chip), _ceil_div(w.x0, chip)
    r1, c1 = min(n, _ceil_div(w.y1, chip)), min(n, _ceil_div(w.x1, chip))
    if r1 <= r0 or c1 <= c0:  # no chip corner in this sub-tile
        return ChipLattice(tile, chip, r0, r0, c0, c0)
    return ChipLattice(tile, chip, r0, r1, c0, c1)


def read_window(tile: Tile, chip_sizes: Iterable[int]) -> Window:
    """The pixels a (sub-)tile's composite must hold so that every owned chip of every size is whole."""
    own = tile_window(tile)
    y1, x1 = own.y1, own.x1
    for cs in chip_sizes:
        lat = chip_lattice(tile, cs)
        if lat.count:
            y1, x1 = max(y1, lat.window.y1), max(x1, lat.window.x1)
    return Window(own.y0, own.x0, y1 - own.y0, x1 - own.x0)


def owns_chips(tile: Tile, chip: int) -> bool:
    """Whether ``tile`` owns at least one chip of size ``chip`` (if not, that model has nothing to embed)."""
    return chip_lattice(tile, chip).count > 0
