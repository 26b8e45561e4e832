"""Embedding one tile-month: a streaming engine from committed composites to vectors and a grid.

Library code, called by the Dagster assets and usable on its own::

    stats = embed_partition(adapter, readers, tile=tile, month="2024-07", provenance={...},
                            vectors=VectorsSink(...), grid=GridSink(...))

Chips lie on the MGRS tile's lattice (``rs_embed_assets.lattice``); the partition embeds the chips
it owns. Memory is bounded whatever the tile size:

1. a first pass reads only ``valid_count`` to find the chips with at least one valid pixel (their
   valid fraction and footprints are then known, so the GeoParquet metadata is written up front);
2. a background thread reads the composite chip row by chip row (verified blocks), cuts the kept
   chips, converts and preprocesses them into batches (pinned host memory on CUDA) while the model
   runs the previous batch;
3. pooled vectors go to Parquet row groups and grid cells to the zarr store region by region.

Chips without a single valid pixel are not embedded (their grid cells stay NaN); pixels without a
valid observation inside an embedded chip enter the model as 0, the fill value rs-embed uses, and
each row records the chip's ``valid_fraction``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import inspect
import json
import queue
import struct
import threading
import time
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Callable, Sequence

import numpy as np
import pyarrow as pa

from .composite import crs_wkt, parse_month
from .grid import PIXEL_SIZE_M, Tile, utm_to_lonlat
from .lattice import ChipLattice, chip_lattice

PROGRESS_EVERY_S = 30.0  # progress is logged this often, not per batch
ROW_GROUP_CHIPS = 4096
FLOAT16_MAX = 65504.0


def package_version() -> str:
    """The installed distribution's version (pyproject.toml is the one place it is written)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("rs-embed-assets")
    except PackageNotFoundError:  # running from a source tree without installing
        return "0+unknown"


class EmbeddingError(ValueError):
    pass


MMAP_THRESHOLD_BYTES = 4 << 20
# All frames' composite tails of a temporal model together (CompositeReader.tail_bytes). For AgriFM's
# 8 frames of 10 bands (+ valid_count) that is 243 rows a frame on a whole 10 980 px tile: tails of up to
# 224 rows are kept, longer ones decoded again (each block about twice, against 3.3 times with no tail),
# which keeps the whole-tile step within 2 GB above baseline; on k=2 sub-tiles (5 600 px windows) every
# tail but the 480-row ones is kept. Measured: benchmarks/bench_partition.py memory (README).
TEMPORAL_TAIL_BYTES = 448 << 20


@lru_cache(maxsize=1)
def bound_heap_growth() -> bool:
    """Ask glibc to serve buffers of ≥ 4 MiB by mmap, so freed block, chunk and batch buffers go back to
    the OS at once instead of fragmenting the heap across the reader threads.

    glibc otherwise raises its mmap threshold after the first large free and keeps later buffers on
    the heap: measured on a quarter-tile terrafm_b step, the peak above baseline fell from 0.93 GiB to
    0.42 GiB with this setting (``benchmarks/bench_partition.py``). A no-op where glibc is absent.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(-3, MMAP_THRESHOLD_BYTES))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


@lru_cache(maxsize=32)
def code_version(model_id: str) -> str:
    """Package version + a hash of the code that turns composites into this model's embeddings.

    The sources are read as text: hashing a model's code must not import it (and torch).
    """
    import adapters

    return _code_hash([adapters.module_source(model_id)])


def code_version_of(adapter) -> str:
    """``code_version`` of a loaded adapter (registered or not, e.g. a stand-in in tests)."""
    import adapters

    model_id = adapter.spec.model_id
    if model_id in adapters.list_models():
        return code_version(model_id)
    return _code_hash([inspect.getsource(inspect.getmodule(type(adapter)))])


def _code_hash(model_sources: list[str]) -> str:
    import adapters

    from . import lattice

    h = hashlib.sha256()
    for text in (*model_sources, adapters.module_source("adapters.base"), adapters.module_source("adapters.specs"),
                 inspect.getsource(inspect.getmodule(_code_hash)), inspect.getsource(lattice)):
        h.update(text.encode())
    return f"{package_version()}+{h.hexdigest()[:12]}"


def polygon_wkb(coords: Sequence[tuple[float, float]]) -> bytes:
    """A little-endian WKB Polygon with one closed ring."""
    ring = list(coords)
    if ring[0] != ring[-1]:
        ring.append(ring[0])
    out = struct.pack("<BII", 1, 3, 1) + struct.pack("<I", len(ring))
    return out + b"".join(struct.pack("<dd", float(x), float(y)) for x, y in ring)


# --- the vectors table ------------------------------------------------------------------------
BBOX_TYPE = pa.struct([("xmin", pa.float64()), ("ymin", pa.float64()), ("xmax", pa.float64()),
                       ("ymax", pa.float64())])


def vectors_schema(dim: int) -> pa.Schema:
    return pa.schema([
        ("chip_id", pa.string()), ("model", pa.string()), ("tile", pa.string()), ("mgrs_tile", pa.string()),
        ("month", pa.date32()), ("chip_row", pa.int32()), ("chip_col", pa.int32()), ("chip_size_px", pa.int32()),
        ("utm_epsg", pa.int32()), ("utm_minx", pa.float64()), ("utm_miny", pa.float64()),
        ("utm_maxx", pa.float64()), ("utm_maxy", pa.float64()), ("center_lon", pa.float64()),
        ("center_lat", pa.float64()), ("geometry", pa.binary()), ("bbox", BBOX_TYPE),
        ("valid_fraction", pa.float32()),
        ("embedding", pa.list_(pa.float32(), dim)), ("pooling", pa.string()),
        ("checkpoint_sha256", pa.string()), ("checkpoint_random_init", pa.bool_()),
        ("composite_version", pa.string()), ("preprocessing_hash", pa.string()), ("code_version", pa.string()),
        ("provider", pa.string()), ("synthetic", pa.bool_()),
    ])


@dataclass
class Footprints:
    """UTM bounds, centres and CRS84 polygons of a list of chips (all projected in one call)."""

    minx: np.ndarray
    miny: np.ndarray
    maxx: np.ndarray
    maxy: np.ndarray
    center_lon: np.ndarray
    center_lat: np.ndarray
    lon: np.ndarray  # (n, 5) ring SW, SE, NE, NW, SW
    lat: np.ndarray

    @classmethod
    def of(cls, lattice: ChipLattice, positions: Sequence[tuple[int, int]]) -> "Footprints":
        from .grid import mgrs_tile

        base = mgrs_tile(lattice.tile.mgrs)
        cs, n = lattice.chip, len(positions)
        pos = np.asarray(positions, dtype=np.int64).reshape(n, 2)
        minx = base.x0 + pos[:, 1] * cs * PIXEL_SIZE_M
        maxy = base.y0 - pos[:, 0] * cs * PIXEL_SIZE_M
        maxx, miny = minx + cs * PIXEL_SIZE_M, maxy - cs * PIXEL_SIZE_M
        epsg = lattice.tile.epsg
        if n:
            clon, clat = utm_to_lonlat(epsg, (minx + maxx) / 2, (miny + maxy) / 2)
            xs = np.stack([minx, maxx, maxx, minx, minx], axis=1)
            ys = np.stack([miny, miny, maxy, maxy, miny], axis=1)
            lon, lat = utm_to_lonlat(epsg, xs.ravel(), ys.ravel())
            lon, lat = np.asarray(lon).reshape(n, 5), np.asarray(lat).reshape(n, 5)
        else:
            clon = clat = np.zeros(0)
            lon = lat = np.zeros((0, 5))
        return cls(minx, miny, maxx, maxy, np.asarray(clon), np.asarray(clat), lon, lat)

    def bbox(self) -> list[float] | None:
        if not len(self.minx):
            return None
        return [float(self.lon.min()), float(self.lat.min()), float(self.lon.max()), float(self.lat.max())]


def geo_metadata(bbox: list[float] | None) -> dict[str, Any]:
    """GeoParquet 1.1 metadata: WKB polygons in CRS84 with a ``bbox`` covering column."""
    col = {"encoding": "WKB", "geometry_types": ["Polygon"],
           "covering": {"bbox": {"xmin": ["bbox", "xmin"], "ymin": ["bbox", "ymin"],
                                 "xmax": ["bbox", "xmax"], "ymax": ["bbox", "ymax"]}}}
    if bbox is not None:
        col["bbox"] = bbox
    return {"version": "1.1.0", "primary_column": "geometry", "columns": {"geometry": col}}


def vectors_table(lattice: ChipLattice, spec, month: str, tile: Tile, positions: Sequence[tuple[int, int]],
                  fp: Footprints, valid_fraction: np.ndarray, pooled: np.ndarray, prov: dict[str, Any],
                  pooling: str, schema: pa.Schema) -> pa.Table:
    """The rows of ``positions`` (lattice row, col) as a table with ``schema``."""
    n = len(positions)
    cs = lattice.chip
    y, m = map(int, month.split("-"))
    geoms = [polygon_wkb(list(zip(fp.lon[k].tolist(), fp.lat[k].tolist()))) for k in range(n)]
    bbox = pa.StructArray.from_arrays(
        [pa.array(fp.lon.min(axis=1) if n else [], pa.float64()), pa.array(fp.lat.min(axis=1) if n else [], pa.float64()),
         pa.array(fp.lon.max(axis=1) if n else [], pa.float64()), pa.array(fp.lat.max(axis=1) if n else [], pa.float64())],
        fields=list(BBOX_TYPE))
    cols: dict[str, Any] = {
        "chip_id": [lattice.chip_id(r, c) for r, c in positions],
        "model": [spec.model_id] * n, "tile": [tile.key] * n, "mgrs_tile": [tile.mgrs] * n,
        "month": [dt.date(y, m, 1)] * n, "chip_row": [r for r, _ in positions], "chip_col": [c for _, c in positions],
        "chip_size_px": [cs] * n, "utm_epsg": [tile.epsg] * n, "utm_minx": fp.minx, "utm_miny": fp.miny,
        "utm_maxx": fp.maxx, "utm_maxy": fp.maxy, "center_lon": fp.center_lon, "center_lat": fp.center_lat,
        "geometry": geoms, "bbox": bbox, "valid_fraction": np.asarray(valid_fraction, np.float32),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(np.asarray(pooled, np.float32).reshape(-1),
                                                                pa.float32()), spec.embed_dim),
        "pooling": [pooling] * n,
        "checkpoint_sha256": [prov["checkpoint_sha256"]] * n,
        "checkpoint_random_init": [bool(prov.get("checkpoint_random_init", False))] * n,
        "composite_version": [prov["composite_version"]] * n,
        "preprocessing_hash": [prov["preprocessing_hash"]] * n, "code_version": [prov["code_version"]] * n,
        "provider": [prov.get("provider", "")] * n, "synthetic": [bool(prov.get("synthetic", False))] * n,
    }
    arrays = [cols[f.name] if isinstance(cols[f.name], pa.Array) else pa.array(cols[f.name], type=f.type)
              for f in schema]
    return pa.Table.from_arrays(arrays, schema=schema)


# --- sinks ---------------------------------------------------------------------------------------
class VectorsSink:
    """Pooled vectors as Parquet row groups in a staged file; the manifest goes into the footer at close."""

    def __init__(self, path, schema: pa.Schema, row_group_chips: int = ROW_GROUP_CHIPS):
        import pyarrow.parquet as pq

        self.path = path
        self.schema = schema
        self.writer = pq.ParquetWriter(str(path), schema, compression="zstd")
        self.row_group_chips = row_group_chips
        self.rows = 0

    def write(self, table: pa.Table) -> None:
        if table.num_rows:
            self.writer.write_table(table, row_group_size=self.row_group_chips)
            self.rows += table.num_rows

    def close(self, manifest: dict[str, Any]) -> None:
        from .storage import MANIFEST_KEY

        if self.rows == 0:  # an empty partition is still one committed file with the full schema
            self.writer.write_table(self.schema.empty_table())
        self.writer.add_key_value_metadata({MANIFEST_KEY.decode(): json.dumps(manifest, sort_keys=True, default=str)})
        self.writer.close()

    def abort(self) -> None:
        try:
            self.writer.close()
        except Exception:  # noqa: BLE001 - best effort; the staged file is removed by the caller
            pass


class GridSink:
    """The stitched grid (feature, y, x) of a partition's owned chips, written chunk row by chunk row.

    Cells of one chunk row (a whole number of chip rows) are buffered until all their chips are done,
    then written as whole chunks: memory is one chunk row, however large the tile.
    """

    def __init__(self, writer, lattice: ChipLattice, cells_per_chip: int, dim: int, dtype: str):
        self.writer = writer
        self.lattice = lattice
        self.g = cells_per_chip
        self.dim = dim
        self.dtype = np.dtype(dtype)
        self.chip_rows_per_chunk = self.chunks(self.g, dim)[1] // self.g  # one chunk row of the store
        self.buffer_row = lattice.row0  # first chip row held in the buffer
        self.buffer = self._fresh()

    @staticmethod
    def chunks(cells_per_chip: int, dim: int) -> tuple[int, int, int]:
        """Store chunks: all features, about 64 cells a side, a whole number of chips."""
        rows = cells_per_chip * max(1, 64 // cells_per_chip)
        return (dim, rows, rows)

    def _fresh(self) -> np.ndarray:
        # held in the stored dtype: a float16 grid buffers half the bytes and is written without a copy
        return np.full((self.dim, self.chip_rows_per_chunk * self.g, self.lattice.cols * self.g), np.nan,
                       dtype=self.dtype)

    def put(self, positions: Sequence[tuple[int, int]], grids: np.ndarray) -> None:
        g = self.g
        if self.dtype == np.float16 and len(grids):
            peak = float(np.nanmax(np.abs(grids))) if np.isfinite(grids).any() else 0.0
            if peak > FLOAT16_MAX:
                raise EmbeddingError(f"{self.lattice.tile.key}: grid values exceed the float16 range (max "
                                     f"{peak:.3g}); store this model's grids as float32 "
                                     "(RS_EMBED_GRID_DTYPE=float32 or RS_EMBED_<MODEL>_GRID_DTYPE=float32)")
        i, n = 0, len(positions)
        while i < n:  # runs of neighbouring chips in one lattice row are placed with one slice
            r, c = positions[i]
            j = i + 1
            while j < n and positions[j] == (r, c + (j - i)):
                j += 1
            while r >= self.buffer_row + self.chip_rows_per_chunk:
                self._flush()
            y = (r - self.buffer_row) * g
            x = (c - self.lattice.col0) * g
            run = grids[i:j]  # (m, D, g, g) → (D, g, m·g)
            self.buffer[:, y:y + g, x:x + (j - i) * g] = run.transpose(1, 2, 0, 3).reshape(self.dim, g, -1)
            i = j

    def _flush(self) -> None:
        lat, g = self.lattice, self.g
        rows = min(self.chip_rows_per_chunk, lat.row1 - self.buffer_row)
        if rows > 0:
            y0 = (self.buffer_row - lat.row0) * g
            self.writer.write("embedding", (slice(None), slice(y0, y0 + rows * g), slice(None)),
                              self.buffer[:, :rows * g])
        self.buffer_row += self.chip_rows_per_chunk
        self.buffer = self._fresh()

    def close(self) -> None:
        while self.buffer_row < self.lattice.row1:
            self._flush()


# --- the engine ------------------------------------------------------------------------------------
@dataclass
class EmbedOptions:
    pooling: str = "mean"
    batch_size: int | None = None
    min_valid_fraction: float = 0.0
    prefetch: int = 2  # batches prepared ahead of the model
    progress_every_s: float = PROGRESS_EVERY_S


@dataclass
class ChipPlan:
    """Which owned chips are embedded, with their valid fractions and footprints."""

    lattice: ChipLattice
    positions: list[tuple[int, int]]
    valid_fraction: np.ndarray
    footprints: Footprints
    chips_total: int
    mean_valid_fraction: float = 0.0


def _offset(reader, lattice: ChipLattice) -> tuple[int, int]:
    """Where the lattice's pixel window starts inside the composite's read window; checks coverage."""
    w = reader.record["window"]
    need = lattice.window
    oy, ox = need.y0 - w["y0"], need.x0 - w["x0"]
    if oy < 0 or ox < 0 or oy + need.height > w["height"] or ox + need.width > w["width"]:
        raise EmbeddingError(
            f"composite {reader.record['sensor']} {reader.record['tile']} {reader.record['month']} covers MGRS "
            f"pixels rows {w['y0']}–{w['y0'] + w['height']}, cols {w['x0']}–{w['x0'] + w['width']}, but the "
            f"{lattice.chip} px chips of this partition need rows {need.y0}–{need.y1}, cols {need.x0}–{need.x1}; "
            "it was written before the chip lattice — re-materialise the composite partition")
    return oy, ox


def plan_chips(readers: Sequence, lattice: ChipLattice, min_valid_fraction: float = 0.0) -> ChipPlan:
    """Pass 1: valid fractions of every owned chip from ``valid_count`` only (averaged over frames)."""
    cs = lattice.chip
    vf = np.zeros((lattice.rows, lattice.cols), dtype=np.float64)
    for reader in readers if lattice.count else ():
        oy, ox = _offset(reader, lattice)
        for i in range(lattice.rows):
            v = reader.valid_rows(oy + i * cs, oy + (i + 1) * cs)[:, ox:ox + lattice.cols * cs] > 0
            vf[i] += v.reshape(cs, lattice.cols, cs).mean(axis=(0, 2))
    vf = (vf / max(1, len(readers))).astype(np.float32)
    keep = [(lattice.row0 + i, lattice.col0 + j) for i in range(lattice.rows) for j in range(lattice.cols)
            if vf[i, j] > 0 and vf[i, j] >= min_valid_fraction]
    kept_vf = np.array([vf[r - lattice.row0, c - lattice.col0] for r, c in keep], dtype=np.float32)
    return ChipPlan(lattice, keep, kept_vf, Footprints.of(lattice, keep), lattice.count,
                    float(vf.mean()) if vf.size else 0.0)


def _batches(plan: ChipPlan, readers: Sequence, band_index: Sequence[Sequence[int]], bs: int,
             prepare: Callable[[np.ndarray], Any]):
    """Yield (positions, prepared batch) in lattice order, reading the composite chip row by chip row."""
    lat, cs = plan.lattice, plan.lattice.chip
    offsets = [_offset(r, lat) for r in readers]
    temporal = len(readers) > 1
    pending_pos: list[tuple[int, int]] = []
    batch: np.ndarray | None = None  # (bs, [T,] C, cs, cs): chips are cut straight into it
    by_row: dict[int, list[int]] = {}
    for r, c in plan.positions:
        by_row.setdefault(r, []).append(c)
    for r in sorted(by_row):
        i = r - lat.row0
        frames = []
        for reader, (oy, ox), bidx in zip(readers, offsets, band_index):
            data, _ = reader.rows(oy + i * cs, oy + (i + 1) * cs, bidx)  # (C, cs, W) stored dtype
            frames.append((data, ox))
        for c in by_row[r]:
            j = c - lat.col0
            if batch is None:
                d0 = frames[0][0]
                batch = np.empty((bs, *((len(frames),) if temporal else ()), d0.shape[0], cs, cs), dtype=d0.dtype)
            k = len(pending_pos)
            for t, (d, ox) in enumerate(frames):
                (batch[k, t] if temporal else batch[k])[...] = d[:, :, ox + j * cs: ox + (j + 1) * cs]
            pending_pos.append((r, c))
            if len(pending_pos) == bs:
                item = (pending_pos, prepare(batch))
                pending_pos, batch = [], None  # the raw batch is not held while the item waits
                yield item
                del item
    if pending_pos:
        item = (pending_pos, prepare(batch[:len(pending_pos)]))
        batch = None
        yield item


class _Prefetcher:
    """Runs a generator on a background thread, ``depth`` items ahead; re-raises its errors."""

    _END = object()

    def __init__(self, gen, depth: int):
        self.q: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(gen,), name="chip-prefetch", daemon=True)
        self.thread.start()

    def _run(self, gen) -> None:
        try:
            for item in gen:
                while not self.stop.is_set():
                    try:
                        self.q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self.stop.is_set():
                    return
            self.q.put(self._END)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            self.q.put(exc)

    def __iter__(self):
        while True:
            item = self.q.get()
            if item is self._END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=10)


def to_float32(raw: np.ndarray) -> np.ndarray:
    """Stored dtype → float32 with NaN (S1 pixels without observations) → 0, rs-embed's fill."""
    arr = raw.astype(np.float32)
    if np.issubdtype(raw.dtype, np.floating):
        np.nan_to_num(arr, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
    return arr


def tile_context_of(adapter, readers: Sequence, window_lattice: ChipLattice, band_index,
                    block_rows: int = 512) -> dict[str, Any]:
    """The adapter's tile statistics over the partition's chips (only for adapters that use them).

    The pixels are handed over as row blocks (``Adapter.tile_context_blocks``), so an adapter with a
    streaming statistic (TerraFM's S1 p99) never needs the whole window in memory. Pixels without a
    valid observation enter as NaN so the statistic can leave them out.
    """
    from adapters.base import Adapter

    if type(adapter).tile_context is Adapter.tile_context:
        return {}
    w = window_lattice.window
    offsets = [_offset(r, window_lattice) for r in readers]

    def blocks():
        for y in range(0, w.height, block_rows):
            h = min(block_rows, w.height - y)
            frames = []
            for reader, (oy, ox), bidx in zip(readers, offsets, band_index):
                data, valid = reader.rows(oy + y, oy + y + h, bidx)
                data = data[:, :, ox:ox + w.width].astype(np.float32)
                data[:, valid[:, ox:ox + w.width] == 0] = np.nan
                frames.append(data)
            yield np.stack(frames) if len(frames) > 1 else frames[0]

    return adapter.tile_context_blocks(blocks, bands=adapter.spec.bands)


def embed_partition(adapter, readers: Sequence, *, tile: Tile, month: str, provenance: dict[str, Any],
                    vectors_path, grid_writer_factory: Callable[[ChipLattice], Any] | None,
                    grid_dtype: str = "float32", options: EmbedOptions | None = None,
                    log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Embed every chip ``tile`` owns for one month; stream vectors to ``vectors_path`` and the grid.

    ``readers`` are verified composite readers (``Storage.open_composite``): one for single-frame
    models, ``adapter.frames`` (oldest first) for temporal models. ``grid_writer_factory(lattice)``
    returns a ``ZarrStoreWriter`` for the grid (None: no grid). Returns the statistics that go into
    the manifest; the caller closes the vectors file with the manifest and commits.
    """
    opts = options or EmbedOptions()
    bound_heap_growth()
    spec = adapter.spec
    month = parse_month(month)
    if len(readers) != adapter.frames:
        raise EmbeddingError(f"{spec.model_id} needs {adapter.frames} composite frame(s), got {len(readers)}")
    band_index = []
    for reader in readers:
        missing = [b for b in spec.bands if b not in reader.bands]
        if missing:
            raise EmbeddingError(f"composite {reader.record['tile']}/{reader.record['month']} lacks bands {missing}; "
                                 f"it has {reader.bands}")
        band_index.append([reader.bands.index(b) for b in spec.bands])
    if len(readers) > 1:
        # a temporal model reads T frames per chip row: holding each frame's decoded blocks would cost
        # T × two full-width blocks, so each frame keeps only the band-selected rest of its current block
        # below the chip row (CompositeReader's tail), all frames' tails within TEMPORAL_TAIL_BYTES: each
        # block is decoded once where the tails fit (sub-tiles), a longer rest again when it is needed
        for reader in readers:
            reader.cache_blocks = 0
            reader.tail_bytes = TEMPORAL_TAIL_BYTES // len(readers)
    lattice = chip_lattice(tile, spec.chip_size)
    plan = plan_chips(readers, lattice, opts.min_valid_fraction)
    bs = opts.batch_size or adapter.batch_size()
    if bs < 1:
        raise EmbeddingError(f"batch size must be at least 1, got {bs}; set RS_EMBED_BATCH_SIZE to a positive "
                             "number (0 = the model's default)")
    tile_ctx = tile_context_of(adapter, readers, lattice, band_index) if plan.positions else {}
    shape = (1, *((adapter.frames,) if spec.frames > 1 else ()), len(spec.bands), spec.chip_size, spec.chip_size)
    fwd_kwargs = adapter.forward_kwargs(shape, pixel_size_m=PIXEL_SIZE_M)
    schema = vectors_schema(spec.embed_dim).with_metadata({b"geo": json.dumps(geo_metadata(plan.footprints.bbox()))})
    sink = VectorsSink(vectors_path, schema)
    grid_writer = grid_writer_factory(lattice) if (grid_writer_factory and lattice.count) else None
    gsink = GridSink(grid_writer, lattice, spec.grid_size, spec.embed_dim, grid_dtype) if grid_writer else None

    feeder = adapter.device_feeder()
    on_device = feeder.overlap and adapter.device_preprocessing()

    def prepare(raw: np.ndarray):
        # runs on the prefetch thread while the model runs the previous batch. On CUDA the batch stays in
        # pinned host memory and the main thread copies it on a side stream: raw, in the stored dtype, when
        # the adapter preprocesses on the device (the host only reads, verifies and cuts), else preprocessed.
        if on_device:
            import torch  # only in embedding steps, where the adapter has loaded it already

            return feeder.pin(torch.from_numpy(np.ascontiguousarray(raw)))
        if feeder.overlap:
            x = adapter.preprocess(to_float32(raw), bands=spec.bands, tile_context=tile_ctx,
                                   device=feeder.host_device)
            return feeder.pin(x)
        return adapter.preprocess(to_float32(raw), bands=spec.bands, tile_context=tile_ctx)

    done, t0, last_log = 0, time.perf_counter(), time.perf_counter()
    forward_s = 0.0
    pending_rows: list[tuple] = []
    pending_n = 0
    fetch = _Prefetcher(_batches(plan, readers, band_index, bs, prepare), opts.prefetch)
    try:
        for positions, x in feeder.iter_on_device(fetch):
            tf = time.perf_counter()
            if on_device:
                x = adapter.preprocess_tensor(x, bands=spec.bands, tile_context=tile_ctx)
            out = adapter.embed(x, pooling=opts.pooling, **fwd_kwargs)
            pooled, grids = out.numpy()
            forward_s += time.perf_counter() - tf
            if grids.shape[1:] != (spec.embed_dim, spec.grid_size, spec.grid_size):
                raise EmbeddingError(f"{spec.model_id} returned grids shaped {grids.shape[1:]}, spec says "
                                     f"{(spec.embed_dim, spec.grid_size, spec.grid_size)}")
            if not np.isfinite(pooled).all():
                raise EmbeddingError(f"{spec.model_id} produced non-finite vectors for {tile.key} {month}; "
                                     "check the checkpoint and the input composite")
            if gsink is not None:
                gsink.put(positions, grids)
            pending_rows.append((done, positions, pooled))
            pending_n += len(positions)
            done += len(positions)
            if pending_n >= ROW_GROUP_CHIPS:
                _flush_rows(sink, pending_rows, plan, spec, month, tile, provenance, opts.pooling, schema)
                pending_rows, pending_n = [], 0
            now = time.perf_counter()
            if log is not None and now - last_log >= opts.progress_every_s:
                log(f"{spec.model_id} {tile.key} {month}: {done}/{len(plan.positions)} chips "
                    f"({done / (now - t0):.1f} chips/s)")
                last_log = now
        _flush_rows(sink, pending_rows, plan, spec, month, tile, provenance, opts.pooling, schema)
        if gsink is not None:
            gsink.close()
    except BaseException:
        fetch.close()
        sink.abort()
        if grid_writer is not None:
            grid_writer.abort()
        raise
    fetch.close()
    seconds = time.perf_counter() - t0
    return {
        "sink": sink, "grid_writer": grid_writer, "lattice": lattice,
        "stats": {"chips_total": plan.chips_total, "chips_embedded": len(plan.positions),
                  "chips_skipped": plan.chips_total - len(plan.positions), "seconds": round(seconds, 3),
                  "forward_seconds": round(forward_s, 3),
                  "chips_per_s": round(len(plan.positions) / seconds, 3) if seconds > 0 and plan.positions else None,
                  "batch_size": bs, "tile_context": tile_ctx, "forward_kwargs": fwd_kwargs,
                  "mean_valid_fraction": round(plan.mean_valid_fraction, 6)},
    }


def _flush_rows(sink: VectorsSink, pending, plan: ChipPlan, spec, month, tile, prov, pooling, schema) -> None:
    if not pending:
        return
    start = pending[0][0]
    positions = [p for _, pos, _ in pending for p in pos]
    pooled = np.concatenate([p for _, _, p in pending])
    sl = slice(start, start + len(positions))
    fp = plan.footprints
    part = Footprints(fp.minx[sl], fp.miny[sl], fp.maxx[sl], fp.maxy[sl], fp.center_lon[sl], fp.center_lat[sl],
                      fp.lon[sl], fp.lat[sl])
    sink.write(vectors_table(plan.lattice, spec, month, tile, positions, part, plan.valid_fraction[sl], pooled,
                             prov, pooling, schema))


def grid_attrs(spec, tile: Tile, month: str, lattice: ChipLattice, prov: dict[str, Any]) -> dict[str, Any]:
    cell = spec.grid_resolution_m
    transform = lattice.grid_transform(spec.grid_size)
    return {"model": spec.model_id, "tile": tile.key, "month": month, "crs": tile.crs,
            "transform": list(transform), "cell_size_m": cell, "chip_size_px": spec.chip_size,
            "chip_rows": [lattice.row0, lattice.row1], "chip_cols": [lattice.col0, lattice.col1],
            "proj:code": tile.crs, "spatial:transform": [cell, 0.0, transform[0], 0.0, -cell, transform[3]],
            "spatial:dimensions": ["y", "x"],
            **{k: v for k, v in prov.items() if isinstance(v, (str, int, float, bool))}}


def grid_coords(spec, lattice: ChipLattice) -> tuple[dict[str, tuple], tuple]:
    transform = lattice.grid_transform(spec.grid_size)
    cell = transform[1]
    nx, ny = lattice.cols * spec.grid_size, lattice.rows * spec.grid_size
    coords = {
        "feature": (("feature",), np.arange(spec.embed_dim, dtype=np.int32), {"long_name": "embedding feature"}),
        "y": (("y",), transform[3] - (np.arange(ny) + 0.5) * cell,
              {"units": "m", "standard_name": "projection_y_coordinate"}),
        "x": (("x",), transform[0] + (np.arange(nx) + 0.5) * cell,
              {"units": "m", "standard_name": "projection_x_coordinate"}),
    }
    return coords, transform


__all__ = ["EmbedOptions", "EmbeddingError", "embed_partition", "vectors_schema", "code_version", "crs_wkt",
           "grid_attrs", "grid_coords", "plan_chips", "Footprints", "geo_metadata"]
