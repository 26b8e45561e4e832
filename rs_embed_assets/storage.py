"""The on-disk layout of the catalog, its commit points, and streamed, verified reads and writes.

    <root>/checkpoints/<checkpoint_id>.json                          resolved checkpoint record
    <root>/checkpoints/<checkpoint_id>/random-init-seed<N>-<cfg>.pt  demo weights (only when asked for)
    <root>/composites/<sensor>/<tile>/<YYYY-MM>.json                 commit record of a composite partition
    <root>/composites/<sensor>/<tile>/<YYYY-MM>/<version>.zarr       the immutable store it points to
    <root>/embeddings/<model>/vectors/<YYYY-MM>/<tile>.parquet       commit point of an embedding partition:
                                                                     one row per chip, and the partition's
                                                                     manifest in the Parquet footer
    <root>/embeddings/<model>/grid/<tile>/<YYYY-MM>/<version>.zarr   the immutable grid it points to
    <root>/.staging/                                                 every write starts here
    <root>/catalog.duckdb, <root>/stac/                              built by the catalog asset

One commit point per partition. Stores are written under ``.staging/``, renamed to a new version
name (never over a live store), and become visible only when the partition's commit file (the
composite record, or the vectors Parquet with its manifest) is atomically renamed into place. Only
then is the previous version removed. So a reader that resolves a partition through its commit
file sees the old partition or the new one, never a mix, and the vectors and the manifest of a
partition can never disagree (they are one file). Leftovers of killed writes (staging files,
versions no commit file points to) are removed by the next write of that partition and by
``rs-embed-assets doctor``.

Folder names carry no ``key=value`` (no hive partitioning), so ``embeddings/<model>/vectors`` is one
plain GeoParquet dataset whose ``month`` column is a DATE for every reader.

Composite stores carry per-block CRC-32 checksums in their commit record; every read verifies the
blocks it touches (a deleted or damaged chunk is refused with the path and the fix).
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
import uuid
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

MANIFEST_KEY = b"rs_embed_assets"
STAGING = ".staging"
ZARR_FORMAT = 2  # GDAL (3.6+, including the one in rasterio's wheels) reads zarr v2 with zstd and blosc


class StorageError(RuntimeError):
    """A store or file that cannot be used as it is; the message names the path and the fix."""


class StaleReadError(StorageError):
    """The partition was replaced while it was being read; reading again gets the new version."""


def new_version() -> str:
    """A sortable, unique version name: UTC time plus randomness."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:8]


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


class Storage:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().resolve()

    # --- paths -----------------------------------------------------------------------------
    def rel(self, path: Path) -> str:
        """``path`` relative to the data root (what records store, so a moved root still works)."""
        return Path(path).resolve().relative_to(self.root).as_posix()

    def resolve(self, rel: str) -> Path:
        return self.root / rel

    def checkpoint_record(self, checkpoint_id: str) -> Path:
        return self.root / "checkpoints" / f"{checkpoint_id}.json"

    def checkpoint_dir(self, checkpoint_id: str) -> Path:
        return self.root / "checkpoints" / checkpoint_id

    def composite_record_path(self, sensor: str, tile: str, month: str) -> Path:
        return self.root / "composites" / sensor / tile / f"{month}.json"

    def composite_versions_dir(self, sensor: str, tile: str, month: str) -> Path:
        return self.root / "composites" / sensor / tile / month

    def vectors_dir(self, model: str) -> Path:
        return self.root / "embeddings" / model / "vectors"

    def vectors_path(self, model: str, tile: str, month: str) -> Path:
        return self.vectors_dir(model) / month / f"{tile}.parquet"

    def grid_versions_dir(self, model: str, tile: str, month: str) -> Path:
        return self.root / "embeddings" / model / "grid" / tile / month

    @property
    def staging_dir(self) -> Path:
        return self.root / STAGING

    @property
    def catalog_path(self) -> Path:
        return self.root / "catalog.duckdb"

    def staging_path(self, hint: str) -> Path:
        """A fresh name under ``.staging/`` (same filesystem as the data, so renames are atomic)."""
        self.staging_dir.mkdir(parents=True, exist_ok=True)
        return self.staging_dir / f"{uuid.uuid4().hex[:12]}-{hint}"

    # --- atomic files ----------------------------------------------------------------------
    @contextmanager
    def atomic_path(self, dst: Path) -> Iterator[Path]:
        """Yield a staging path; on success it is fsynced and renamed over ``dst`` (a file)."""
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.staging_path(dst.name)
        try:
            yield tmp
            if not tmp.exists():
                raise StorageError(f"writer produced nothing for {dst}")
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, dst)
            _fsync_dir(dst.parent)
        except OSError as exc:
            raise StorageError(f"could not write {dst}: {exc.strerror or exc}; check free space and permissions "
                               f"under {self.root}") from exc
        finally:
            if tmp.exists():
                _remove(tmp)

    def write_json(self, dst: Path, obj: Any) -> Path:
        with self.atomic_path(dst) as tmp:
            tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
        return dst

    def read_json(self, path: Path) -> Any:
        try:
            return json.loads(Path(path).read_text())
        except json.JSONDecodeError as exc:
            raise StorageError(f"{path} is not valid JSON ({exc}); it was damaged outside this tool — "
                               "re-materialise the partition it belongs to") from exc

    # --- committing versioned stores ---------------------------------------------------------
    def publish_version(self, staged: Path, versions_dir: Path, suffix: str = ".zarr") -> Path:
        """Move a finished staged store to a new, never-before-used version name; returns its path."""
        versions_dir.mkdir(parents=True, exist_ok=True)
        dst = versions_dir / f"{new_version()}{suffix}"
        os.replace(staged, dst)
        _fsync_dir(versions_dir)
        return dst

    def prune_versions(self, versions_dir: Path, keep: Path | None) -> list[Path]:
        """Remove every version in ``versions_dir`` but ``keep`` (run right after a commit)."""
        removed = []
        if not versions_dir.is_dir():
            return removed
        for p in versions_dir.iterdir():
            if keep is not None and p.resolve() == Path(keep).resolve():
                continue
            _remove(p)
            removed.append(p)
        if keep is None:
            try:
                versions_dir.rmdir()
            except OSError:
                pass
        return removed

    # --- composites ---------------------------------------------------------------------------
    def composite_record(self, sensor: str, tile: str, month: str) -> dict[str, Any] | None:
        path = self.composite_record_path(sensor, tile, month)
        return self.read_json(path) if path.exists() else None

    def commit_composite(self, sensor: str, tile: str, month: str, store: Path, record: dict[str, Any]) -> dict:
        """Make ``store`` (already published) the partition's composite; remove older versions."""
        record = dict(record, store=self.rel(store))
        self.write_json(self.composite_record_path(sensor, tile, month), record)
        self.prune_versions(self.composite_versions_dir(sensor, tile, month), keep=store)
        return record

    def open_composite(self, sensor: str, tile: str, month: str) -> "CompositeReader":
        record = self.composite_record(sensor, tile, month)
        if record is None:
            raise StorageError(f"{sensor}_composite {tile} {month} is not materialised "
                               f"({self.composite_record_path(sensor, tile, month)} is missing); "
                               f"materialise {sensor}_composite for that partition first")
        return CompositeReader(self, record)

    def iter_composite_records(self, sensor: str | None = None) -> Iterator[dict[str, Any]]:
        base = self.root / "composites"
        for path in sorted(base.glob(f"{sensor or '*'}/*/*.json")):
            yield self.read_json(path)

    # --- embeddings ---------------------------------------------------------------------------
    def read_manifest(self, model: str, tile: str, month: str) -> dict[str, Any] | None:
        """The committed manifest of an embedding partition (from its vectors file), or None."""
        path = self.vectors_path(model, tile, month)
        return read_footer_manifest(path) if path.exists() else None

    def iter_manifests(self, model: str | None = None) -> Iterator[dict[str, Any]]:
        base = self.root / "embeddings"
        for path in sorted(base.glob(f"{model or '*'}/vectors/*/*.parquet")):
            yield read_footer_manifest(path)

    def open_grid(self, model: str, tile: str, month: str):
        """The committed grid of a partition as a lazy ``xarray.Dataset`` (None when it has no grid)."""
        import xarray as xr

        for attempt in range(2):
            manifest = self.read_manifest(model, tile, month)
            if manifest is None:
                raise StorageError(f"embeddings/{model} {tile} {month} is not materialised; "
                                   f"materialise embeddings/{model} for that partition first")
            if not manifest.get("grid_path"):
                return None
            path = self.resolve(manifest["grid_path"])
            try:
                return xr.open_zarr(path, zarr_format=ZARR_FORMAT, consolidated=True)
            except FileNotFoundError:
                if attempt:
                    raise StorageError(f"grid {path} named by the manifest of {model} {tile} {month} is gone; "
                                       "re-materialise the partition (or run `rs-embed-assets doctor`)") from None
            except (ValueError, KeyError) as exc:  # damaged metadata (.zmetadata, .zarray): name the store
                raise StorageError(f"grid store {path} cannot be opened ({type(exc).__name__}: {exc}); re-materialise "
                                   f"embeddings/{model} {tile} {month} (or run `rs-embed-assets doctor`)") from None
        raise AssertionError("unreachable")

    def commit_vectors(self, staged_parquet: Path, model: str, tile: str, month: str) -> Path:
        """The embedding partition's commit point: rename its vectors file (manifest inside) into place."""
        dst = self.vectors_path(model, tile, month)
        dst.parent.mkdir(parents=True, exist_ok=True)
        with open(staged_parquet, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(staged_parquet, dst)
        _fsync_dir(dst.parent)
        return dst

    # --- housekeeping -------------------------------------------------------------------------
    def clean_staging(self, older_than_s: float = 0.0, suffix: str = "") -> list[Path]:
        """Remove staging leftovers (of killed writes): those ending in ``suffix``, older than ``older_than_s``."""
        removed = []
        if not self.staging_dir.is_dir():
            return removed
        now = time.time()
        for p in self.staging_dir.iterdir():
            if suffix and not p.name.endswith(suffix):
                continue
            try:
                if now - p.stat().st_mtime >= older_than_s:
                    _remove(p)
                    removed.append(p)
            except FileNotFoundError:
                pass
        return removed


def read_footer_manifest(path: Path) -> dict[str, Any]:
    try:
        meta = pq.read_metadata(path).metadata or {}
    except (OSError, pa.ArrowInvalid) as exc:
        raise StorageError(f"{path} is not a readable Parquet file ({exc}); re-materialise its partition") from exc
    if MANIFEST_KEY not in meta:
        raise StorageError(f"{path} has no partition manifest in its footer; it was not written by "
                           "rs-embed-assets — remove it or re-materialise its partition")
    return json.loads(meta[MANIFEST_KEY])


# --- zarr stores --------------------------------------------------------------------------------
def _compressor(kind: str = "compact"):
    """The codec of a store's variables.

    ``compact`` (grids): zstd level 1. ``fast`` (composites, which every embedding step decodes in
    full): Blosc LZ4 with byte shuffle — on 12-band uint16 reflectance it decodes about 2× faster than
    zstd per core (4.5 vs 1.9 GB/s on two threads, benchmarks/results/partition_host_cpu.json) and
    compresses as well or better (1.50 vs 1.36 on the sample imagery). Both are zarr v2 codecs that
    zarr-python, xarray and GDAL (3.10 in rasterio's wheels) read.
    """
    import numcodecs

    if kind == "fast":
        return numcodecs.Blosc(cname="lz4", clevel=5, shuffle=numcodecs.Blosc.SHUFFLE)
    return numcodecs.Zstd(level=1)


READ_THREADS_ENV = "RS_EMBED_ASSETS_READ_THREADS"
_SCRATCH = threading.local()  # per decode thread: the buffer chunks are decoded into
_POOL: dict[Any, Any] = {}


def read_threads() -> int:
    """Threads that decode a composite block's chunks (RS_EMBED_ASSETS_READ_THREADS, default min(4, CPUs))."""
    raw = os.environ.get(READ_THREADS_ENV, "").strip()
    if not raw:
        return max(1, min(4, os.cpu_count() or 1))
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"{READ_THREADS_ENV}={raw!r} is not a thread count; set it to a whole number ≥ 1 "
                         "(threads that decode composite chunks) or unset it for min(4, CPUs)")
    return n


def _read_ahead_pool():
    from concurrent.futures import ThreadPoolExecutor

    if "ahead" not in _POOL:
        _POOL["ahead"] = ThreadPoolExecutor(1, thread_name_prefix="block-read-ahead")
    return _POOL["ahead"]


def _decode_pool():
    from concurrent.futures import ThreadPoolExecutor

    n = read_threads()
    if n not in _POOL:
        _POOL[n] = ThreadPoolExecutor(n, thread_name_prefix="chunk-decode")
    return _POOL[n]


class ChunkRows:
    """Full-width rows of a plain zarr v2 array read straight from its chunk files.

    The arrays this package writes are C-ordered, unfiltered and compressed with one numcodecs
    codec; for them, decoding each chunk on a thread pool (the codecs release the GIL) and copying
    it into place is 1.5–2.5× faster than zarr-python's general read path, which bounds how fast a
    GPU can be fed. A missing chunk reads as the fill value, as in zarr; the caller's block checksum
    then reports it. Arrays in any other layout return ``None`` from :meth:`open` and are read
    through zarr.
    """

    def __init__(self, path: Path, meta: dict[str, Any]):
        import numcodecs

        self.path = path
        self.shape = tuple(meta["shape"])
        self.chunks = tuple(meta["chunks"])
        self.dtype = np.dtype(meta["dtype"])
        self.sep = meta.get("dimension_separator") or "."
        self.codec = numcodecs.get_codec(meta["compressor"]) if meta.get("compressor") else None
        fill = meta.get("fill_value")
        self.fill = np.nan if fill in ("NaN", "nan") else (0 if fill is None else fill)

    @classmethod
    def open(cls, path: Path) -> "ChunkRows | None":
        try:
            meta = json.loads((path / ".zarray").read_text())
        except (OSError, ValueError):
            return None
        if meta.get("zarr_format") != 2 or meta.get("order", "C") != "C" or meta.get("filters"):
            return None
        if len(meta["shape"]) not in (2, 3) or (len(meta["shape"]) == 3 and meta["chunks"][0] != meta["shape"][0]):
            return None  # the leading (band) axis must be one chunk
        return cls(path, meta)

    def _chunk(self, key: str) -> np.ndarray | None:
        """A decoded chunk, in this thread's reusable buffer (valid until the thread decodes its next chunk).

        Decoding into fresh memory would fault in and zero a chunk's worth of pages each time (large
        buffers are mapped and unmapped, ``embedding.bound_heap_growth``); one buffer per thread does not.
        """
        try:
            buf = (self.path / key).read_bytes()
        except FileNotFoundError:
            return None
        if self.codec is None:
            return np.frombuffer(buf, dtype=self.dtype).reshape(self.chunks)
        nbytes = int(np.prod(self.chunks)) * self.dtype.itemsize
        scratch = getattr(_SCRATCH, "buf", None)
        if scratch is None or scratch.nbytes < nbytes:
            scratch = _SCRATCH.buf = np.empty(nbytes, dtype=np.uint8)
        out = scratch[:nbytes].view(self.dtype).reshape(self.chunks)
        self.codec.decode(buf, out=out)
        return out

    def rows(self, i: int) -> np.ndarray:
        """Chunk row ``i`` (all leading axes, rows ``i*ch … (i+1)*ch`` clipped, every column)."""
        ch, cw = self.chunks[-2], self.chunks[-1]
        h, w = self.shape[-2], self.shape[-1]
        y0, y1 = i * ch, min(h, (i + 1) * ch)
        out = np.empty(self.shape[:-2] + (y1 - y0, w), dtype=self.dtype)
        lead = "0" + self.sep if len(self.shape) == 3 else ""

        def put(j: int) -> None:
            x0, x1 = j * cw, min(w, (j + 1) * cw)
            c = self._chunk(f"{lead}{i}{self.sep}{j}")
            if c is None:
                out[..., :, x0:x1] = self.fill
            else:
                out[..., :, x0:x1] = c[..., :y1 - y0, :x1 - x0]

        n = -(-w // cw)
        if n == 1:
            put(0)
        else:
            pool = _decode_pool()
            for f in [pool.submit(put, j) for j in range(n)]:
                f.result()
        return out


def geo_attrs(crs_wkt: str, transform: Sequence[float]) -> dict[str, Any]:
    """CF/GDAL grid-mapping attributes for the ``spatial_ref`` coordinate."""
    return {"crs_wkt": crs_wkt, "spatial_ref": crs_wkt, "GeoTransform": " ".join(repr(float(v)) for v in transform)}


class ZarrStoreWriter:
    """A zarr v2 store written region by region under ``.staging/``, then published as a version.

    ``variables``: name → (dims, shape, chunks, dtype, fill_value, attrs). Coordinates are 1-D numpy
    arrays (written at once); ``spatial_ref`` is a scalar coordinate carrying the CRS.
    """

    def __init__(self, storage: Storage, hint: str, *, variables: dict[str, tuple], coords: dict[str, tuple],
                 attrs: dict[str, Any], crs_wkt: str, transform: Sequence[float], codec: str = "compact"):
        self.storage = storage
        self.codec = codec
        self.path = storage.staging_path(hint)
        try:
            self._create(variables, coords, attrs, crs_wkt, transform)
        except OSError as exc:
            _remove(self.path)
            raise _write_error(self.path, storage.root, exc) from exc

    def _create(self, variables, coords, attrs, crs_wkt, transform) -> None:
        import zarr

        self.group = zarr.open_group(str(self.path), mode="w", zarr_format=ZARR_FORMAT)
        self.group.attrs.update(_jsonable(attrs))
        crs = geo_attrs(crs_wkt, transform)
        sr = self.group.create_array("spatial_ref", shape=(), dtype="int32", fill_value=0)
        sr.attrs.update({"_ARRAY_DIMENSIONS": [], **crs})
        sr[...] = 0
        for name, (dims, values, vattrs) in coords.items():
            values = np.asarray(values)
            arr = self.group.create_array(name, shape=values.shape, dtype=values.dtype, chunks=values.shape,
                                          compressors=None, fill_value=None)
            arr.attrs.update({"_ARRAY_DIMENSIONS": list(dims), **_jsonable(vattrs)})
            arr[...] = values
        self.arrays = {}
        for name, (dims, shape, chunks, dtype, fill, vattrs) in variables.items():
            arr = self.group.create_array(name, shape=shape, chunks=tuple(min(c, s) for c, s in zip(chunks, shape)),
                                          dtype=dtype, compressors=_compressor(self.codec), fill_value=fill)
            arr.attrs.update({"_ARRAY_DIMENSIONS": list(dims), "grid_mapping": "spatial_ref",
                              "coordinates": "spatial_ref", "_CRS": {"wkt": crs_wkt}, **_jsonable(vattrs)})
            self.arrays[name] = arr

    def write(self, name: str, region: tuple[slice, ...], values: np.ndarray) -> None:
        try:
            self.arrays[name][region] = values
        except OSError as exc:  # zarr's chunk writes raise ENOSPC without a file name: name the store
            raise _write_error(self.path, self.storage.root, exc) from exc

    def set_attrs(self, attrs: dict[str, Any]) -> None:
        self.group.attrs.update(_jsonable(attrs))

    def publish(self, versions_dir: Path) -> Path:
        import zarr

        try:
            zarr.consolidate_metadata(str(self.path), zarr_format=ZARR_FORMAT)
            return self.storage.publish_version(self.path, versions_dir)
        except OSError as exc:
            raise _write_error(self.path, self.storage.root, exc) from exc

    def abort(self) -> None:
        _remove(self.path)


def _write_error(path: Path, root: Path, exc: OSError) -> StorageError:
    return StorageError(f"could not write {path}: {exc.strerror or exc}; check free space and permissions under "
                        f"{root} (the partition keeps its previous version)")


def _jsonable(attrs: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in attrs.items():
        if hasattr(v, "item") and not isinstance(v, (list, dict, str)):
            v = v.item()
        out[k] = v
    return out


def block_hash(*arrays: np.ndarray) -> str:
    """A checksum of decoded values (dtype, shape, bytes): CRC-32, several GB/s, catches lost or altered chunks.

    It guards against damage, not tampering; the partition's data version is a SHA-256 over these.
    """
    crc = 0
    parts = []
    for a in arrays:
        a = np.ascontiguousarray(a)
        parts.append(f"{a.dtype}{a.shape}")
        crc = zlib.crc32(memoryview(a).cast("B"), zlib.crc32(parts[-1].encode(), crc))
    return f"crc32:{crc:08x}"


@dataclass
class _Block:
    index: int
    data: np.ndarray | None  # (C, rows, W) stored dtype; None while only valid_count was read
    valid_count: np.ndarray  # (rows, W)


@dataclass
class _Tail:
    """The rows of one verified block below the last rows an uncached reader served (see ``rows``)."""
    index: int  # the block
    y0: int  # first row held (store rows); the tail runs to the block's end
    bands: tuple[int, ...] | None  # band selection of ``data`` (None: all bands; no data: valid_count only)
    data: np.ndarray | None  # (C', rows, W) stored dtype
    valid: np.ndarray  # (rows, W)


class CompositeReader:
    """Verified, block-wise reads of a committed composite.

    Blocks are full-width row bands of ``block_rows`` rows (the store's chunk height). Every block
    is hashed when first read and compared with the commit record; a mismatch (deleted or damaged
    chunk) is an error naming the store and the fix. The last ``cache_blocks`` blocks stay in memory
    so consecutive chip rows reuse them, and the next block is decoded ahead.

    With ``cache_blocks = 0`` (temporal models read many frames at once, so holding whole blocks per
    frame would not fit) a reader keeps only a *tail*: the rows of the last block it touched that lie
    below the rows it just served, band-selected as asked. The next read down the store is served from
    it, so a pass of chip rows decodes (and verifies) each block once, and between calls the reader
    holds fewer than ``block_rows`` rows of the selected bands (``block end − y1``), nothing else.
    ``tail_bytes`` (None: no limit) bounds a tail: a longer rest is dropped and decoded again when
    asked for. There is no read-ahead there: one decoded block per frame ahead would cost more than
    the tails.
    """

    def __init__(self, storage: Storage, record: dict[str, Any], *, cache_blocks: int = 2):
        import zarr

        self.storage = storage
        self.record = record
        self.path = storage.resolve(record["store"])
        try:
            group = zarr.open_group(str(self.path), mode="r", zarr_format=ZARR_FORMAT)
            self._data = group["data"]
            self._valid = group["valid_count"]
        except (FileNotFoundError, KeyError, ValueError, json.JSONDecodeError) as exc:
            raise StorageError(f"composite store {self.path} cannot be opened ({type(exc).__name__}: {exc}); "
                               f"re-materialise {record['sensor']}_composite {record['tile']} {record['month']} "
                               "(or run `rs-embed-assets doctor`)") from exc
        self.bands: list[str] = list(record["bands"])
        self.block_rows = int(record["block_rows"])
        self.hashes: list[list[str]] = [list(h) for h in record["block_hashes"]]  # [data, valid_count]
        self.shape = tuple(self._data.shape)  # (C, H, W)
        self.cache_blocks = cache_blocks
        self._cache: dict[int, _Block] = {}
        self._ahead: tuple[int, Any] | None = None  # (block index, future of its verified data)
        self.tail_bytes: int | None = None  # uncached readers: the most a tail may hold (None: no limit)
        self._tail: _Tail | None = None  # uncached readers: rows() tail (data and valid_count)
        self._vtail: _Tail | None = None  # uncached readers: valid_rows() tail (valid_count only)
        # blocks are chunk rows: read them straight from the chunk files when the layout allows it
        self._fast = [ChunkRows.open(self.path / name) for name in ("data", "valid_count")]
        if any(f is None or f.chunks[-2] != self.block_rows for f in self._fast):
            self._fast = [None, None]

    @property
    def height(self) -> int:
        return self.shape[1]

    @property
    def width(self) -> int:
        return self.shape[2]

    @property
    def dtype(self) -> np.dtype:
        return self._data.dtype

    def _check(self, what: int, i: int, arrays: tuple[np.ndarray, ...], y0: int, y1: int) -> None:
        if block_hash(*arrays) == self.hashes[i][what]:
            return
        current = self.storage.composite_record(self.record["sensor"], self.record["tile"], self.record["month"])
        if current is not None and current.get("store") != self.record["store"]:
            raise StaleReadError(f"{self.path} was replaced while reading; read the partition again")
        name = ("data", "valid_count")[what]
        raise StorageError(
            f"composite store {self.path} is damaged: {name} rows {y0}–{y1} do not match the hash recorded when "
            f"it was written (a chunk was deleted or changed). Re-materialise {self.record['sensor']}_composite "
            f"{self.record['tile']} {self.record['month']}; `rs-embed-assets doctor` lists every damaged store")

    def _read(self, what: int, i: int) -> np.ndarray:
        """Block ``i`` of data (what=0) or valid_count (what=1), unverified."""
        y0, y1 = i * self.block_rows, min(self.height, (i + 1) * self.block_rows)
        try:
            fast = self._fast[what]
            if fast is not None:
                return fast.rows(i)
            arr = (self._data, self._valid)[what]
            return arr[(slice(None),) * (arr.ndim - 2) + (slice(y0, y1), slice(None))]
        except FileNotFoundError as exc:
            raise StaleReadError(f"{self.path} disappeared while reading") from exc

    def _data_block(self, i: int) -> np.ndarray:
        y0, y1 = i * self.block_rows, min(self.height, (i + 1) * self.block_rows)
        data = self._read(0, i)
        self._check(0, i, (data,), y0, y1)
        return data

    def _block(self, i: int) -> _Block:
        blk = self._cache.get(i)
        if blk is not None and blk.data is not None:
            return blk
        ahead, self._ahead = self._ahead, None
        data = ahead[1].result() if ahead is not None and ahead[0] == i else self._data_block(i)
        valid = blk.valid_count if blk is not None else self._valid_block(i)
        blk = _Block(i, data, valid)
        self._remember(blk)
        if self.cache_blocks and i + 1 < len(self.hashes):
            # sequential reader: decode and verify the next block while this one is cut into chips
            # (one block more in memory; errors surface only if that block is asked for)
            self._ahead = (i + 1, _read_ahead_pool().submit(self._data_block, i + 1))
        return blk

    def _valid_block(self, i: int) -> np.ndarray:
        y0, y1 = i * self.block_rows, min(self.height, (i + 1) * self.block_rows)
        valid = self._read(1, i)
        self._check(1, i, (valid,), y0, y1)
        return valid

    def _remember(self, blk: _Block) -> None:
        if not self.cache_blocks and blk.data is not None:
            return  # uncached reader (many frames at once): rows() keeps only the tail it needs
        self._cache.pop(blk.index, None)
        self._cache[blk.index] = blk  # newest last
        while len(self._cache) > self.cache_blocks:
            self._cache.pop(next(iter(self._cache)))  # least recently read first

    def valid_rows(self, y0: int, y1: int) -> np.ndarray:
        """Rows ``y0:y1`` of valid_count only (cheap: no band data is read), verified."""
        if not self.cache_blocks:
            return self._streamed(y0, y1, None, data=False)[1]
        parts = []
        for i in range(y0 // self.block_rows, (y1 - 1) // self.block_rows + 1):
            blk = self._cache.get(i)
            if blk is None:
                blk = _Block(i, None, self._valid_block(i))
                self._remember(blk)
            valid = blk.valid_count
            b0 = i * self.block_rows
            parts.append(valid[max(y0, b0) - b0:min(y1, b0 + valid.shape[0]) - b0])
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)

    def rows(self, y0: int, y1: int, band_index: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Rows ``y0:y1`` (window coordinates) of the data (C', h, W) and valid_count (h, W), verified."""
        if not self.cache_blocks:
            sel = None if band_index is None or list(band_index) == list(range(self.shape[0])) else tuple(band_index)
            return self._streamed(y0, y1, sel, data=True)
        parts_d, parts_v = [], []
        first = y0 // self.block_rows
        for old in [k for k in self._cache if k < first]:  # reads move down the store: free what lies above
            del self._cache[old]
        for i in range(first, (y1 - 1) // self.block_rows + 1):
            blk = self._block(i)
            b0 = i * self.block_rows
            s, e = max(y0, b0) - b0, min(y1, b0 + blk.valid_count.shape[0]) - b0
            d = blk.data[:, s:e]
            if band_index is not None and list(band_index) != list(range(d.shape[0])):
                d = d[list(band_index)]  # a model's subset of the bands (a copy); all bands stay a view
            parts_d.append(d)
            parts_v.append(blk.valid_count[s:e])
        if len(parts_d) == 1:
            return parts_d[0], parts_v[0]
        return np.concatenate(parts_d, axis=1), np.concatenate(parts_v, axis=0)

    def _streamed(self, y0: int, y1: int, sel: tuple[int, ...] | None, *, data: bool):
        """``rows`` (data=True) or ``valid_rows`` of an uncached reader: each block decoded once per pass.

        A block's rows come from the tail when it holds them (same block, same bands, from ``y0`` or
        above), else from the block decoded and verified now. Everything returned is a copy; the rows of
        the last block below ``y1`` become the new tail, and any other tail is dropped.
        """
        if data:
            self._vtail = None  # the valid_count pass (planning) is over
            tail, self._tail = self._tail, None
        else:
            tail, self._vtail = self._vtail, None
        idx = None if sel is None else list(sel)

        def take(a: np.ndarray, lo: int, hi: int, select: bool) -> np.ndarray:
            if select and idx is not None:
                return a[idx, lo:hi]  # band selection: a copy of just these rows
            return a[:, lo:hi].copy()

        new_tail: _Tail | None = None
        parts_d, parts_v = [], []
        for i in range(y0 // self.block_rows, (y1 - 1) // self.block_rows + 1):
            b0 = i * self.block_rows
            b1 = min(self.height, b0 + self.block_rows)
            s, e = max(y0, b0), min(y1, b1)
            if tail is not None and tail.index == i and tail.y0 <= s and (not data or tail.bands == sel):
                src_d, src_v, o, select = tail.data, tail.valid, tail.y0, False  # already band-selected
            elif data:
                blk = self._block(i)  # decoded and verified
                src_d, src_v, o, select = blk.data, blk.valid_count, b0, True
                del blk
            else:
                src_d, src_v, o, select = None, self._valid_block(i), b0, False
            if data:
                parts_d.append(take(src_d, s - o, e - o, select))
            parts_v.append(src_v[s - o:e - o].copy())
            if e < b1 and self._tail_fits(b1 - e, len(sel) if sel is not None else self.shape[0], data):
                # later reads need the rest of this block: keep just that
                new_tail = _Tail(i, e, sel if data else None,
                                 take(src_d, e - o, b1 - o, select) if data else None, src_v[e - o:b1 - o].copy())
            if tail is not None and tail.index <= i:
                tail = None  # reads move down the store: a tail above is never asked for again
            src_d = src_v = None  # a decoded block is dropped before the next one is read
        if data:
            self._tail = new_tail
        else:
            self._vtail = new_tail
        valid = parts_v[0] if len(parts_v) == 1 else np.concatenate(parts_v, axis=0)
        if not data:
            return None, valid
        return (parts_d[0] if len(parts_d) == 1 else np.concatenate(parts_d, axis=1)), valid

    def _tail_fits(self, rows: int, bands: int, data: bool) -> bool:
        if self.tail_bytes is None:
            return True
        row = self.width * (self._valid.dtype.itemsize + (bands * self.dtype.itemsize if data else 0))
        return rows * row <= self.tail_bytes

    def verify(self) -> None:
        """Read and check every block (what ``doctor`` does)."""
        for i in range(len(self.hashes)):
            self._block(i)
            self._cache.clear()
        self._ahead = self._tail = self._vtail = None

    def lazy_dataset(self):
        """The store as a lazily loaded ``xarray.Dataset`` of raw values (not verified: for checks and previews
        that read a few variables; use ``rows``/``to_dataset`` for data that feeds a model)."""
        import xarray as xr

        return xr.open_zarr(self.path, zarr_format=ZARR_FORMAT, consolidated=True, mask_and_scale=False)

    def to_dataset(self):
        """The whole composite as an in-memory, verified ``xarray.Dataset`` (small tiles, previews, tests)."""
        import xarray as xr

        # raw stored values (no fill-value masking), exactly what was hashed
        with xr.open_zarr(self.path, zarr_format=ZARR_FORMAT, consolidated=True, mask_and_scale=False) as ds:
            out = ds.load()
        data, valid = out["data"].values, out["valid_count"].values
        for i in range(len(self.hashes)):
            y0, y1 = i * self.block_rows, min(self.height, (i + 1) * self.block_rows)
            self._check(0, i, (data[:, y0:y1],), y0, y1)
            self._check(1, i, (valid[y0:y1],), y0, y1)
        return out
