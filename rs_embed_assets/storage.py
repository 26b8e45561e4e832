"""The on-disk layout of the catalog and atomic writes.

    <root>/checkpoints/<checkpoint_id>.json                       resolved checkpoint record
    <root>/checkpoints/<checkpoint_id>/random-init-seed<N>.pt     demo weights (only when asked for)
    <root>/composites/<sensor>/<tile>/<YYYY-MM>.zarr              composite (band, y, x) + valid_count
    <root>/embeddings/<model>/grid/<tile>/<YYYY-MM>.zarr          (feature, y, x) georeferenced grid
    <root>/embeddings/<model>/vectors/month=<YYYY-MM>/tile=<tile>.parquet   one row per chip
    <root>/embeddings/<model>/manifest/month=<YYYY-MM>/tile=<tile>.json     per-partition provenance
    <root>/catalog.duckdb

Every write goes to a temporary sibling and is renamed into place, so a reader sees either the
old or the new partition, never a half-written one, and re-materialising replaces, never duplicates.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import xarray as xr


class StorageError(RuntimeError):
    pass


class Storage:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().resolve()

    # --- paths -----------------------------------------------------------------------------
    def checkpoint_record(self, checkpoint_id: str) -> Path:
        return self.root / "checkpoints" / f"{checkpoint_id}.json"

    def checkpoint_dir(self, checkpoint_id: str) -> Path:
        return self.root / "checkpoints" / checkpoint_id

    def composite_path(self, sensor: str, tile: str, month: str) -> Path:
        return self.root / "composites" / sensor / tile / f"{month}.zarr"

    def grid_path(self, model: str, tile: str, month: str) -> Path:
        return self.root / "embeddings" / model / "grid" / tile / f"{month}.zarr"

    def vectors_path(self, model: str, tile: str, month: str) -> Path:
        return self.root / "embeddings" / model / "vectors" / f"month={month}" / f"tile={tile}.parquet"

    def manifest_path(self, model: str, tile: str, month: str) -> Path:
        return self.root / "embeddings" / model / "manifest" / f"month={month}" / f"tile={tile}.json"

    def composite_manifest_path(self, sensor: str, tile: str, month: str) -> Path:
        return self.root / "composites" / sensor / "_manifest" / f"month={month}" / f"tile={tile}.json"

    @property
    def catalog_path(self) -> Path:
        return self.root / "catalog.duckdb"

    # --- atomic primitives -----------------------------------------------------------------
    @contextmanager
    def atomic_path(self, dst: Path) -> Iterator[Path]:
        """Yield a temporary sibling path; on success move it over ``dst`` (file or directory)."""
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            yield tmp
            if not tmp.exists():
                raise StorageError(f"writer produced nothing at {tmp}")
            replace(tmp, dst)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()

    def write_json(self, dst: Path, obj: Any) -> Path:
        with self.atomic_path(dst) as tmp:
            tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
        return dst

    def read_json(self, path: Path) -> Any:
        return json.loads(path.read_text())

    # --- datasets --------------------------------------------------------------------------
    def write_zarr(self, ds: xr.Dataset, dst: Path, *, chunks: dict[str, int] | None = None) -> Path:
        ds = ds.copy()
        encoding = {}
        if chunks:
            for name, var in ds.data_vars.items():
                if var.ndim:
                    encoding[name] = {"chunks": tuple(min(chunks.get(d, var.sizes[d]), var.sizes[d]) for d in var.dims)}
        for name in ds.variables:  # zarr v3 / xarray refuse attrs that are not JSON scalars/lists
            ds[name].attrs = {k: (v.item() if hasattr(v, "item") else v) for k, v in ds[name].attrs.items()}
        with self.atomic_path(dst) as tmp:
            ds.to_zarr(tmp, mode="w", zarr_format=3, encoding=encoding, consolidated=False)
        return dst

    def read_zarr(self, path: Path) -> xr.Dataset:
        if not path.exists():
            raise StorageError(f"{path} does not exist")
        with xr.open_zarr(path, zarr_format=3, consolidated=False) as ds:
            return ds.load()

    def write_parquet(self, table: pa.Table, dst: Path) -> Path:
        with self.atomic_path(dst) as tmp:
            pq.write_table(table, tmp, compression="zstd")
        return dst


def replace(tmp: Path, dst: Path) -> None:
    """Move ``tmp`` over ``dst``; directories are swapped via a short-lived backup name."""
    if tmp.is_dir():
        backup = None
        if dst.exists():
            backup = dst.with_name(f".{dst.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(dst, backup)
        try:
            os.replace(tmp, dst)
        except BaseException:
            if backup is not None:
                os.replace(backup, dst)
            raise
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)
    else:
        os.replace(tmp, dst)
