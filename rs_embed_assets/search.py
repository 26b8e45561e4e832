"""Fast similarity search over a model's committed vectors: faiss IVF candidates, exact re-rank.

Library code (no Dagster); the ``catalog`` asset builds the indexes, ``rs-embed-assets similar``
and :func:`similar` query them::

    from rs_embed_assets import search
    from rs_embed_assets.storage import Storage
    idx = search.open_index(Storage("data"), "fomo")
    idx.similar("31UFU-k36-r21-c12_64px_r000_c000", "2024-06", k=10, months=["2024-07"],
                bbox=(5.0, 52.6, 5.1, 52.7))

Layout (built by the catalog asset, next to ``catalog.duckdb``)::

    <root>/index/<model>.json               commit record: the current version, the files it covers
    <root>/index/<model>/<version>/         immutable: rows.parquet (chip_id, tile, month, centre,
                                            valid_fraction), vectors (unit-norm float32, or int8 with a
                                            per-vector scale), ivf.faiss (when the model has many rows)

How a query runs: filters (months, a lon/lat box) make a row mask. When the mask or the whole
index is small (``EXACT_BELOW`` rows), the cosine of every selected row is computed exactly. Otherwise
faiss' IVF index (inverted lists over k-means cells, 8-bit scalar-quantised codes, searched with the
mask as an ID selector) proposes ``max(8k, 100)`` candidates from ``nprobe`` cells, and those are
re-ranked with the stored vectors, so the similarities returned are exact (float32) or within the
int8 error (``storage="int8"``: 1 byte a value plus a float scale per vector; ``1 - cos`` between a
vector and its int8 copy is measured in benchmarks/bench_search.py).
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .storage import Storage

EXACT_BELOW = 65_536     # below this many (selected) rows an exact scan is as fast as the IVF path
INDEX_FORMAT = 1
ROW_COLUMNS = ["chip_id", "tile", "month", "center_lon", "center_lat", "valid_fraction"]


class SearchError(ValueError):
    """A query the index cannot answer (unknown model, chip or month, bad k); the message says why."""


# --- vectors -------------------------------------------------------------------------------------
def normalise(x: np.ndarray) -> np.ndarray:
    """Unit-length rows (float32, in place when possible); zero rows stay zero."""
    x = np.asarray(x, dtype=np.float32)
    if not x.flags.writeable:
        x = x.copy()
    n = np.linalg.norm(x, axis=1, keepdims=True)
    np.divide(x, n, out=x, where=n > 0)
    return x


def quantise_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int8 codes and a float32 scale per row, so that ``codes * scale`` ≈ ``x`` (max |x| maps to 127)."""
    scale = np.abs(x).max(axis=1) / 127.0
    scale[scale == 0] = 1.0
    codes = np.rint(x / scale[:, None]).astype(np.int8)
    return codes, scale.astype(np.float32)


def dequantise_int8(codes: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return codes.astype(np.float32) * scale[:, None]


def _vectors_files(storage: Storage, model: str) -> list[Path]:
    from .catalog import vectors_files

    return vectors_files(storage, model)


def files_fingerprint(storage: Storage, files: Sequence[Path]) -> str:
    import hashlib

    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{storage.rel(f)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def read_vectors(files: Sequence[Path], *, unit: bool = False) -> tuple[pa.Table, np.ndarray]:
    """Row metadata and the (N, D) float32 matrix of every row of ``files`` (unit-norm rows when ``unit``).

    The matrix is allocated once and filled file by file, so memory stays at one copy of the vectors.
    """
    counts = [pq.ParquetFile(f).metadata.num_rows for f in files]
    n = sum(counts)
    dim = pq.read_schema(files[0]).field("embedding").type.list_size if files else 0
    mat = np.empty((n, dim), np.float32)
    metas, s = [], 0
    for f, k in zip(files, counts):
        t = pq.read_table(f, columns=ROW_COLUMNS + ["embedding"])
        emb = t.column("embedding").combine_chunks()
        if k:
            block = emb.values.to_numpy(zero_copy_only=False).reshape(k, dim)
            mat[s:s + k] = block
            if unit:
                normalise(mat[s:s + k])
        metas.append(t.drop_columns(["embedding"]))
        s += k
    if not metas:
        return pa.table({c: pa.array([], pa.string()) for c in ROW_COLUMNS}), mat
    return pa.concat_tables(metas, promote_options="default"), mat


# --- building ------------------------------------------------------------------------------------
def _nlist(n: int) -> int:
    # ~n/4000 cells: the coarse assignment (n × nlist × d) stays a few seconds per million on 2 cores
    return int(min(4096, max(4, round(n / 4000))))


def build_index(storage: Storage, model: str, *, storage_type: str = "float32", force: bool = False,
                nprobe: int = 16, ivf_min_rows: int = EXACT_BELOW, seed: int = 0, log=None) -> dict[str, Any]:
    """(Re)build the search index of ``model`` from its committed vectors; a no-op when it is current.

    Written under ``.staging/``, renamed to a new version directory and committed by atomically
    replacing ``index/<model>.json``; older versions are removed after the commit.
    """
    if storage_type not in ("float32", "int8"):
        raise ValueError(f"index storage must be 'float32' or 'int8', got {storage_type!r}")
    files = _vectors_files(storage, model)
    fp = files_fingerprint(storage, files)
    record_path = index_record_path(storage, model)
    if record_path.exists() and not force:
        rec = storage.read_json(record_path)
        if rec.get("fingerprint") == fp and rec.get("storage") == storage_type and rec.get("format") == INDEX_FORMAT:
            return dict(rec, rebuilt=False)
    t0 = time.perf_counter()
    rows, mat = read_vectors(files, unit=True)
    t_read = time.perf_counter() - t0
    n = len(rows)
    staged = storage.staging_path(f"index-{model}")
    staged.mkdir(parents=True)
    try:
        pq.write_table(rows, staged / "rows.parquet")
        t1 = time.perf_counter()
        nlist = 0
        if n >= ivf_min_rows:
            import faiss

            nlist = _nlist(n)
            quantizer = faiss.IndexFlatIP(mat.shape[1])
            ivf = faiss.IndexIVFScalarQuantizer(quantizer, mat.shape[1], nlist, faiss.ScalarQuantizer.QT_8bit,
                                                faiss.METRIC_INNER_PRODUCT)
            ivf.cp.seed = seed
            ivf.cp.niter = 10
            rng = np.random.default_rng(seed)
            sample = mat[np.sort(rng.choice(n, size=min(n, 64 * nlist), replace=False))]
            ivf.train(sample)
            ivf.add(mat)
            ivf.nprobe = nprobe
            faiss.write_index(ivf, str(staged / "ivf.faiss"))
        t_ivf = time.perf_counter() - t1
        if storage_type == "int8":
            codes, scale = quantise_int8(mat)
            np.save(staged / "codes.npy", codes)
            np.save(staged / "scale.npy", scale)
        else:
            np.save(staged / "vectors.npy", mat)
        version_dir = storage.publish_version(staged, storage.root / "index" / model, suffix="")
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    record = {"format": INDEX_FORMAT, "model": model, "version": storage.rel(version_dir), "rows": n,
              "dim": int(mat.shape[1]) if n else 0, "storage": storage_type, "nlist": nlist, "nprobe": nprobe,
              "exact_below": ivf_min_rows,
              "fingerprint": fp, "partitions": len(files), "read_seconds": round(t_read, 3),
              "ivf_seconds": round(t_ivf, 3), "seconds": round(time.perf_counter() - t0, 3),
              "built_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    storage.write_json(record_path, record)
    storage.prune_versions(storage.root / "index" / model, keep=version_dir)
    if log:
        log(f"search index {model}: {n} rows, nlist {nlist}, {record['seconds']} s")
    return dict(record, rebuilt=True)


def index_record_path(storage: Storage, model: str) -> Path:
    return storage.root / "index" / f"{model}.json"


# --- querying ------------------------------------------------------------------------------------
@dataclass
class Hit:
    chip_id: str
    tile: str
    month: dt.date
    center_lon: float
    center_lat: float
    valid_fraction: float
    similarity: float

    def as_tuple(self) -> tuple:
        return (self.chip_id, self.tile, self.month, self.center_lon, self.center_lat, self.valid_fraction,
                self.similarity)


class VectorIndex:
    """One model's committed index, opened read-only (vectors memory-mapped)."""

    def __init__(self, storage: Storage, record: dict[str, Any]):
        self.record = record
        self.model = record["model"]
        path = storage.resolve(record["version"])
        rows = pq.read_table(path / "rows.parquet")
        self.chip_id = rows.column("chip_id").to_numpy(zero_copy_only=False)
        self.tile = rows.column("tile").to_numpy(zero_copy_only=False)
        self.month = rows.column("month").cast(pa.int32()).to_numpy(zero_copy_only=False)  # days since epoch
        self.lon = rows.column("center_lon").to_numpy(zero_copy_only=False)
        self.lat = rows.column("center_lat").to_numpy(zero_copy_only=False)
        self.valid = rows.column("valid_fraction").to_numpy(zero_copy_only=False)
        if record["storage"] == "int8":
            self.codes = np.load(path / "codes.npy", mmap_mode="r")
            self.scale = np.load(path / "scale.npy", mmap_mode="r")
            self.vectors = None
        else:
            self.vectors = np.load(path / "vectors.npy", mmap_mode="r")
        self.ivf = None
        if record["nlist"]:
            import faiss

            self.ivf = faiss.read_index(str(path / "ivf.faiss"))
            self.ivf.nprobe = record.get("nprobe", 16)
        self._key: dict[tuple[str, int], int] | None = None

    def __len__(self) -> int:
        return len(self.chip_id)

    def rows_of(self, ids: np.ndarray) -> np.ndarray:
        """Unit-norm float32 vectors of the given row ids (dequantised for int8 storage)."""
        ids = np.asarray(ids)
        if self.vectors is not None:
            return np.asarray(self.vectors[ids], dtype=np.float32)
        return dequantise_int8(np.asarray(self.codes[ids]), np.asarray(self.scale[ids]))

    def row_id(self, chip_id: str, month: str | dt.date) -> int:
        from .catalog import parse_month

        day = (parse_month(month) - dt.date(1970, 1, 1)).days
        if self._key is None:
            self._key = {(c, int(m)): i for i, (c, m) in enumerate(zip(self.chip_id, self.month))}
        i = self._key.get((chip_id, day))
        if i is None:
            months = sorted({int(m) for c, m in self._key if c == chip_id})
            if not months:
                raise SearchError(f"unknown chip '{chip_id}' for model {self.model}: it has no vectors in any month")
            have = ", ".join(f"{dt.date(1970, 1, 1) + dt.timedelta(days=m):%Y-%m}" for m in months)
            raise SearchError(f"chip '{chip_id}' has no {self.model} vector in {parse_month(month):%Y-%m}; "
                              f"it has: {have}")
        return i

    def mask(self, *, months: Iterable[str | dt.date] | None = None,
             bbox: tuple[float, float, float, float] | None = None) -> np.ndarray | None:
        """Rows passing the filters (months; a (min_lon, min_lat, max_lon, max_lat) box on chip centres)."""
        from .catalog import parse_month

        m = None
        if months is not None:
            days = [(parse_month(x) - dt.date(1970, 1, 1)).days for x in months]
            m = np.isin(self.month, days)
        if bbox is not None:
            x0, y0, x1, y1 = bbox
            if not (x0 <= x1 and y0 <= y1):
                raise SearchError(f"bbox {bbox} is not (min_lon, min_lat, max_lon, max_lat)")
            b = (self.lon >= x0) & (self.lon <= x1) & (self.lat >= y0) & (self.lat <= y1)
            m = b if m is None else m & b
        return m

    def search(self, query: np.ndarray, k: int = 10, *, months=None, bbox=None, exclude: int | None = None,
               nprobe: int | None = None, exact: bool = False) -> list[Hit]:
        """Top-k rows by cosine to ``query`` among those passing the filters (``exclude``: a row id to skip)."""
        if k < 1:
            raise SearchError(f"k must be at least 1, got {k}")
        q = normalise(np.array(query, dtype=np.float32, ndmin=2))
        if q.shape[1] != self.record["dim"]:
            raise SearchError(f"the query vector has {q.shape[1]} values; {self.model} vectors have "
                              f"{self.record['dim']}")
        mask = self.mask(months=months, bbox=bbox)
        selected = len(self) if mask is None else int(np.count_nonzero(mask))
        if selected == 0:
            return []
        want = k + (exclude is not None)
        if exact or self.ivf is None or selected < self.record.get("exact_below", EXACT_BELOW):
            ids = None if mask is None else np.flatnonzero(mask)
            sims = self._exact(q[0], ids)
            ids = np.arange(len(self)) if ids is None else ids
        else:
            # a selective filter leaves few rows per cell: probe proportionally more cells
            probe = nprobe or self.ivf.nprobe
            probe = min(self.ivf.nlist, int(np.ceil(probe * len(self) / selected)))
            ids = self._candidates(q, max(8 * want, 100), mask, probe)
            sims = self.rows_of(ids) @ q[0]
        if exclude is not None:
            sims = np.where(ids == exclude, -np.inf, sims)
        top = np.argpartition(-sims, want - 1)[:want] if len(sims) > want else np.arange(len(sims))
        order = top[np.lexsort((ids[top], -sims[top]))]
        order = [i for i in order if np.isfinite(sims[i])][:k]
        return [Hit(str(self.chip_id[ids[i]]), str(self.tile[ids[i]]),
                    dt.date(1970, 1, 1) + dt.timedelta(days=int(self.month[ids[i]])), float(self.lon[ids[i]]),
                    float(self.lat[ids[i]]), float(self.valid[ids[i]]), float(sims[i])) for i in order]

    def _exact(self, q: np.ndarray, ids: np.ndarray | None, block: int = 262_144) -> np.ndarray:
        if ids is not None and len(ids) and self.vectors is not None:
            lo, hi = int(ids[0]), int(ids[-1]) + 1
            if hi - lo <= 4 * len(ids):  # rows are grouped by month: scan the covering slice, no gather
                return self._exact_slice(q, lo, hi, block)[ids - lo]
        if ids is None:
            return self._exact_slice(q, 0, len(self), block)
        return self._exact_rows(q, ids, block)

    def _exact_rows(self, q: np.ndarray, ids: np.ndarray | None, block: int) -> np.ndarray:
        n = len(ids)
        out = np.empty(n, np.float32)
        for s in range(0, n, block):
            out[s:s + block] = self.rows_of(ids[s:s + block]) @ q
        return out

    def _exact_slice(self, q: np.ndarray, lo: int, hi: int, block: int) -> np.ndarray:
        out = np.empty(hi - lo, np.float32)
        for s in range(lo, hi, block):  # contiguous rows of the memory map: views, no copy
            e = min(hi, s + block)
            out[s - lo:e - lo] = (self.vectors[s:e] if self.vectors is not None else self.rows_of(np.arange(s, e))) @ q
        return out

    def _candidates(self, q: np.ndarray, n: int, mask: np.ndarray | None, nprobe: int) -> np.ndarray:
        import faiss

        params = faiss.SearchParametersIVF(nprobe=nprobe)
        if mask is not None:
            bits = np.packbits(mask, bitorder="little")
            params.sel = faiss.IDSelectorBitmap(len(mask), faiss.swig_ptr(bits))
            params._bits = bits  # keep the buffer alive while faiss uses it
        _, ids = self.ivf.search(q, n, params=params)
        ids = ids[0]
        return np.sort(ids[ids >= 0])

    def similar(self, chip_id: str, month: str | dt.date, k: int = 10, **filters) -> list[Hit]:
        """The k chips most similar to ``chip_id`` in ``month`` (itself excluded)."""
        i = self.row_id(chip_id, month)
        return self.search(self.rows_of([i])[0], k, exclude=i, **filters)


def open_index(storage: Storage, model: str, *, require_current: bool = True) -> VectorIndex:
    """The committed index of ``model``; SearchError when there is none (or it lags the vectors)."""
    path = index_record_path(storage, model)
    if not path.exists():
        raise SearchError(f"no search index for model '{model}' under {storage.root}; materialise the `catalog` "
                          "asset (it builds the indexes), or query the catalog with SQL")
    record = storage.read_json(path)
    if require_current and record.get("fingerprint") != files_fingerprint(storage, _vectors_files(storage, model)):
        raise SearchError(f"the search index of {model} is older than its vectors; rebuild the `catalog` asset")
    return VectorIndex(storage, record)


def register_sql(con, storage: Storage) -> None:
    """Make the indexes reachable from SQL on ``con``:
    ``similar_chips_ann(model, chip_id, month, k)`` → ``LIST(STRUCT(chip_id, tile, month, similarity))``::

        SELECT unnest(similar_chips_ann('fomo', '31UFU_64px_r101_c058', '2024-06', 10), recursive := true)

    (A Python function on this connection only: close the connection when done.)
    """
    opened: dict[str, VectorIndex] = {}

    def similar_chips_ann(model: str, chip_id: str, month: str, k: int):
        if model not in opened:
            opened[model] = open_index(storage, model)
        return [{"chip_id": h.chip_id, "tile": h.tile, "month": h.month, "similarity": h.similarity}
                for h in opened[model].similar(chip_id, month, int(k))]

    con.create_function("similar_chips_ann", similar_chips_ann, ["VARCHAR", "VARCHAR", "VARCHAR", "BIGINT"],
                        "STRUCT(chip_id VARCHAR, tile VARCHAR, month DATE, similarity FLOAT)[]", side_effects=True)


def build_indexes(storage: Storage, models: Sequence[str], *, storage_type: str | None = None,
                  log=None) -> dict[str, dict[str, Any]]:
    """Build (or keep, when current) the index of every model; ``RS_EMBED_ASSETS_INDEX_STORAGE`` = float32|int8."""
    kind = storage_type or os.environ.get("RS_EMBED_ASSETS_INDEX_STORAGE", "float32")
    return {m: build_index(storage, m, storage_type=kind, log=log) for m in models}


def similar(storage: Storage, model: str, chip_id: str, month: str, k: int = 10, **filters) -> list[Hit]:
    """Top-k similar chips from the index (exact re-ranked cosine)."""
    return open_index(storage, model).similar(chip_id, month, k, **filters)


__all__ = ["Hit", "SearchError", "VectorIndex", "build_index", "build_indexes", "open_index", "similar",
           "quantise_int8", "dequantise_int8"]
