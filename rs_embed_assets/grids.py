"""A lazy xarray view over every tile and month of a model's embedding grids.

    import rs_embed_assets
    grids = rs_embed_assets.open_grids("fomo", data_root="data")
    ds = grids["31UFU-k36-r21-c12"]            # xr.Dataset, dims (month, feature, y, x)
    ds["embedding"].sel(month="2024-07-01").isel(x=slice(0, 4)).values   # reads only those chunks

``open_grids`` returns a dict ``tile key → xr.Dataset``: tiles differ in CRS and extent, so each gets
its own dataset (the same grid mapping, ``x``/``y`` in metres of the tile's UTM CRS). Within a tile the
committed months are stacked along a ``month`` dimension (numpy datetime64, first of month). Nothing is
read when the view is built: every month is opened through ``Storage.open_grid`` (lazy zarr) and the
stack is an xarray lazily indexed backend array, so indexing reads only the chunks it touches and
``.values``/``.load()`` reads what is selected. No dask needed.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import xarray as xr
from xarray.backends import BackendArray
from xarray.core import indexing


class _MonthStack(BackendArray):
    """Months of one tile's grid as one (month, feature, y, x) array; reads go to the months touched."""

    def __init__(self, arrays: list[xr.DataArray]):
        self.arrays = arrays
        self.shape = (len(arrays), *arrays[0].shape)
        self.dtype = np.dtype(arrays[0].dtype)

    def __getitem__(self, key: indexing.ExplicitIndexer) -> np.ndarray:
        return indexing.explicit_indexing_adapter(key, self.shape, indexing.IndexingSupport.OUTER, self._raw)

    def _raw(self, key: tuple) -> np.ndarray:
        mkey, rest = key[0], tuple(key[1:])
        months = np.arange(len(self.arrays))[mkey]
        parts = [np.asarray(self.arrays[int(m)][rest].values) for m in np.atleast_1d(months)]
        out = np.stack(parts) if parts else np.empty((0, *self.shape[1:]), self.dtype)[(slice(None), *rest)]
        return out[0] if np.ndim(months) == 0 else out


def _grid_keys(storage, model: str) -> dict[str, list[str]]:
    keys: dict[str, list[str]] = {}
    for manifest in storage.iter_manifests(model):
        keys.setdefault(manifest["tile"], []).append(manifest["month"])
    return {t: sorted(set(ms)) for t, ms in sorted(keys.items())}


def open_grids(model: str, data_root: str | os.PathLike | None = None, *, storage=None) -> dict[str, xr.Dataset]:
    """Every committed grid of ``model``: tile key → lazy ``xr.Dataset`` with dims (month, feature, y, x).

    ``data_root`` defaults to $RS_EMBED_ASSETS_DATA_ROOT (or ``data``). Raises ``LookupError`` naming the
    model when it has no committed grid at all.
    """
    from .composite import parse_month
    from .storage import Storage

    if storage is None:
        storage = Storage(data_root or os.environ.get("RS_EMBED_ASSETS_DATA_ROOT", "data"))
    out: dict[str, xr.Dataset] = {}
    for tile, months in _grid_keys(storage, model).items():
        opened = [(m, storage.open_grid(model, tile, m)) for m in months]
        opened = [(m, ds) for m, ds in opened if ds is not None]
        if not opened:
            continue
        first = opened[0][1]
        shape = first["embedding"].shape
        odd = [m for m, ds in opened if ds["embedding"].shape != shape]
        if odd:
            raise ValueError(f"{model} grids of {tile} differ in shape across months ({opened[0][0]}: {shape}; "
                             f"{', '.join(odd)} differ); re-materialise embeddings/{model} for those months")
        same = opened
        stack = _MonthStack([ds["embedding"].variable for _, ds in same])
        month_index = np.array([np.datetime64(f"{parse_month(m)}-01", "ns") for m, _ in same])
        var = xr.Variable(("month", *first["embedding"].dims), indexing.LazilyIndexedArray(stack),
                          attrs=dict(first["embedding"].attrs))
        coords: dict[str, Any] = {"month": month_index, **{k: v for k, v in first.coords.items()}}
        attrs = {k: v for k, v in first.attrs.items() if k not in ("month",)}
        attrs["months"] = [m for m, _ in same]
        out[tile] = xr.Dataset({"embedding": var}, coords=coords, attrs=attrs)
    if not out:
        raise LookupError(f"no committed {model} grid under {storage.root}; materialise embeddings/{model} first")
    return out
