"""``rs-embed-assets doctor``: find (and with ``--clean`` remove) what killed writes left behind.

A write that dies (SIGKILL, OOM, a lost node, a full disk) never damages a committed partition —
the commit file is renamed into place last — but it can leave things behind. The doctor walks the
data root and reports, by kind:

- ``staging``               anything under ``.staging/`` (temp names of unfinished writes)
- ``unreferenced_version``  a zarr version of a committed partition that its commit file does not name
- ``uncommitted``           versions of a partition that has no commit file at all
- ``partial_download``      ``*.part`` files (interrupted checkpoint downloads / demo-weight writes)
- ``old_layout``            ``.old-*`` / ``.tmp-*`` swap names and stores of the previous layout
- ``damaged``               committed data that fails verification (block hashes, unreadable files,
                            a commit file naming a store that is gone, a checkpoint that changed)

Leftovers (the first five kinds) are removable: ``--clean`` deletes those older than ``--min-age``
(default 15 minutes, so a write in progress right now is never touched). Damaged partitions are
only reported, with the asset partition to re-materialise; removing committed data is not the
doctor's call.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

from .storage import Storage

LEFTOVER_KINDS = ("staging", "unreferenced_version", "uncommitted", "partial_download", "old_layout")
DEFAULT_MIN_AGE_S = 15 * 60


@dataclass
class Finding:
    kind: str
    path: str  # relative to the data root
    detail: str
    bytes: int = 0
    age_s: float = 0.0
    removed: bool = False

    @property
    def leftover(self) -> bool:
        return self.kind in LEFTOVER_KINDS


def _size(path: Path) -> int:
    try:
        if path.is_dir() and not path.is_symlink():
            return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        return path.stat().st_size
    except OSError:
        return 0


def _age(path: Path, now: float) -> float:
    """Seconds since anything in ``path`` was last written (files decide; an empty folder by its own time)."""
    try:
        files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
        newest = max((p.stat().st_mtime for p in files), default=path.stat().st_mtime)
        return max(0.0, now - newest)
    except OSError:
        return 0.0


class Doctor:
    def __init__(self, storage: Storage, *, verify: bool = True):
        self.storage = storage
        self.root = storage.root
        self.verify = verify
        self.now = time.time()

    def _finding(self, kind: str, path: Path, detail: str) -> Finding:
        return Finding(kind, path.relative_to(self.root).as_posix(), detail, _size(path), _age(path, self.now))

    # --- walkers ----------------------------------------------------------------------------
    def diagnose(self) -> list[Finding]:
        if not self.root.is_dir():
            return []
        out: list[Finding] = []
        out += self._staging()
        out += self._swap_names_and_parts()
        out += self._composites()
        out += self._embeddings()
        out += self._checkpoints()
        seen, unique = set(), []
        for f in out:  # a path is reported once, under its first kind, and not again inside a reported folder
            parts = f.path.split("/")
            if any("/".join(parts[:i]) in seen for i in range(1, len(parts) + 1)):
                continue
            seen.add(f.path)
            unique.append(f)
        return unique

    def _staging(self) -> Iterator[Finding]:
        staging = self.root / ".staging"
        if staging.is_dir():
            for p in sorted(staging.iterdir()):
                yield self._finding("staging", p, "temp file of a write that did not finish")

    def _swap_names_and_parts(self) -> Iterator[Finding]:
        for p in sorted(self.root.rglob("*")):
            if ".staging" in p.relative_to(self.root).parts[:1]:
                continue
            name = p.name
            if name.endswith(".part"):
                yield self._finding("partial_download", p, "interrupted download or weights write")
            elif name.startswith(".") and (".old-" in name or ".tmp-" in name):
                yield self._finding("old_layout", p, "swap copy left by a killed write (previous layout)")

    def _composites(self) -> Iterator[Finding]:
        base = self.root / "composites"
        if not base.is_dir():
            return
        for tile_dir in sorted(p for p in base.glob("*/*") if p.is_dir()):
            sensor, tile = tile_dir.parent.name, tile_dir.name
            for entry in sorted(tile_dir.iterdir()):
                if entry.name.startswith("."):
                    continue
                if entry.suffix == ".zarr" and entry.is_dir():
                    yield self._finding("old_layout", entry, "composite store of the previous layout "
                                        "(<month>.zarr); re-materialise the partition, then remove it")
                elif entry.suffix == ".json":
                    yield from self._composite_partition(sensor, tile, entry.stem)
                elif entry.is_dir() and not (tile_dir / f"{entry.name}.json").exists():
                    yield self._finding("uncommitted", entry, f"versions of {sensor}_composite {tile} {entry.name} "
                                        "without a commit record (a killed first write)")
        for legacy in sorted(base.glob("*/_manifest")):
            yield self._finding("old_layout", legacy, "composite manifests of the previous layout")

    def _composite_partition(self, sensor: str, tile: str, month: str) -> Iterator[Finding]:
        st = self.storage
        record_path = self.root / "composites" / sensor / tile / f"{month}.json"
        versions = self.root / "composites" / sensor / tile / month
        what = f"{sensor}_composite {tile} {month}"
        try:
            record = json.loads(record_path.read_text())
            store = self.root / record["store"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            yield self._finding("damaged", record_path, f"commit record of {what} is unreadable ({exc}); "
                                f"re-materialise {what}")
            return
        if versions.is_dir():
            for v in sorted(versions.iterdir()):
                if v.resolve() != store.resolve():
                    yield self._finding("unreferenced_version", v, f"not the committed version of {what}")
        if not store.exists():
            yield self._finding("damaged", record_path, f"names {record['store']}, which is gone; re-materialise {what}")
        elif self.verify and hasattr(st, "open_composite"):
            try:
                reader = st.open_composite(sensor, tile, month)
                if hasattr(reader, "verify"):
                    reader.verify()
            except Exception as exc:  # any failure to read back is damage, reported with its reason
                yield self._finding("damaged", store, f"{type(exc).__name__}: {exc}")

    def _embeddings(self) -> Iterator[Finding]:
        base = self.root / "embeddings"
        if not base.is_dir():
            return
        for model_dir in sorted(p for p in base.iterdir() if p.is_dir()):
            model = model_dir.name
            referenced: set[Path] = set()
            unreadable: set[tuple[str, str]] = set()  # (tile, month): their grids are not leftovers
            for vec in sorted((model_dir / "vectors").glob("*/*.parquet")):
                month, tile = vec.parent.name, vec.stem
                what = f"embeddings/{model} {tile} {month}"
                try:
                    manifest = _footer_manifest(vec)
                except Exception as exc:
                    unreadable.add((tile, month))
                    yield self._finding("damaged", vec, f"{what}: {exc}; re-materialise {what}")
                    continue
                grid = manifest.get("grid_path")
                if grid:
                    gpath = self.root / grid
                    referenced.add(gpath.resolve())
                    if not gpath.exists():
                        yield self._finding("damaged", vec, f"{what}: its manifest names {grid}, which is gone; "
                                            f"re-materialise {what}")
                    elif self.verify:
                        problem = _grid_problem(gpath, manifest)
                        if problem:
                            yield self._finding("damaged", gpath, f"{what}: {problem}; re-materialise {what}")
            grid_base = model_dir / "grid"
            for versions in sorted(p for p in grid_base.glob("*/*") if p.is_dir() and not p.name.startswith(".")):
                tile, month = versions.parent.name, versions.name
                if versions.suffix == ".zarr":
                    yield self._finding("old_layout", versions, "grid store of the previous layout (<month>.zarr)")
                    continue
                if (tile, month) in unreadable:
                    continue
                committed = (model_dir / "vectors" / month / f"{tile}.parquet").exists()
                for v in sorted(versions.iterdir()):
                    if v.resolve() not in referenced:
                        kind = "unreferenced_version" if committed else "uncommitted"
                        yield self._finding(kind, v, f"grid of embeddings/{model} {tile} {month} that no manifest "
                                            "names")
            for legacy in sorted([*(model_dir / "vectors").glob("month=*"), *model_dir.glob("manifest")]):
                yield self._finding("old_layout", legacy, "hive-partitioned files of the previous layout")

    def _checkpoints(self) -> Iterator[Finding]:
        base = self.root / "checkpoints"
        if not base.is_dir():
            return
        from adapters.checkpoints import CheckpointChangedError, verify_sha256

        for record_path in sorted(base.glob("*.json")):
            cid = record_path.stem
            try:
                record = json.loads(record_path.read_text())
            except (OSError, ValueError) as exc:
                yield self._finding("damaged", record_path, f"unreadable ({exc}); re-materialise checkpoint/{cid}")
                continue
            if not self.verify:
                continue
            try:
                verify_sha256(record["path"], record["sha256"], what=f"checkpoint/{cid}",
                              fix=f"re-materialise checkpoint/{cid}")
            except CheckpointChangedError as exc:
                yield self._finding("damaged", record_path, str(exc))

    # --- cleaning ---------------------------------------------------------------------------
    def clean(self, findings: list[Finding], *, min_age_s: float = DEFAULT_MIN_AGE_S) -> list[Finding]:
        for f in findings:
            if not f.leftover or f.age_s < min_age_s:
                continue
            path = self.root / f.path
            if f.kind == "old_layout" and not (path.name.startswith(".") or path.name.endswith(".part")):
                continue  # stores of the previous layout hold data: reported, removed by hand after re-materialising
            try:
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
                f.removed = True
            except FileNotFoundError:
                f.removed = True
        return findings


def _footer_manifest(path: Path) -> dict:
    try:
        from .storage import read_footer_manifest
    except ImportError:  # the previous layout had no footer manifest
        import pyarrow.parquet as pq

        pq.read_metadata(path)
        return {}
    return read_footer_manifest(path)


def _grid_problem(path: Path, manifest: dict) -> str | None:
    """A grid store that does not open, or whose shape is not the one its manifest recorded."""
    import xarray as xr

    try:
        with xr.open_zarr(path, consolidated=None) as ds:
            shape = list(ds["embedding"].shape)
            ds["embedding"].isel(feature=0).load()  # touches every spatial chunk of one feature
    except Exception as exc:
        return f"grid {path.name} cannot be read ({type(exc).__name__}: {exc})"
    if manifest.get("grid_shape") and list(manifest["grid_shape"]) != shape:
        return f"grid is shaped {shape}, its manifest says {manifest['grid_shape']}"
    return None


def diagnose(root: str | Path, *, verify: bool = True) -> list[Finding]:
    return Doctor(Storage(root), verify=verify).diagnose()


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def run(root: str | Path, *, clean: bool = False, verify: bool = True, min_age_s: float = DEFAULT_MIN_AGE_S,
        as_json: bool = False, out=print) -> int:
    """The CLI: print findings; exit 0 when nothing is left to do, 1 otherwise."""
    doc = Doctor(Storage(root), verify=verify)
    if not doc.root.is_dir():
        out(f"error: data root {doc.root} does not exist; give --data-root or set RS_EMBED_ASSETS_DATA_ROOT")
        return 2
    findings = doc.diagnose()
    if clean:
        doc.clean(findings, min_age_s=min_age_s)
    if as_json:
        out(json.dumps([asdict(f) for f in findings], indent=2))
    else:
        if not findings:
            out(f"{doc.root}: nothing left behind, nothing damaged")
        for kind in (*LEFTOVER_KINDS, "damaged"):
            group = [f for f in findings if f.kind == kind]
            if not group:
                continue
            out(f"{kind} ({len(group)}, {_human(sum(f.bytes for f in group))}):")
            for f in group:
                state = "removed" if f.removed else (
                    f"kept: younger than {min_age_s:.0f} s (a write in progress?)" if clean and f.leftover
                    and f.age_s < min_age_s else "")
                out(f"  {f.path}  — {f.detail}" + (f"  [{state}]" if state else ""))
        left = [f for f in findings if f.leftover and not f.removed]
        if left and not clean:
            out("run `rs-embed-assets doctor --clean` to remove the leftovers")
    remaining = [f for f in findings if not f.removed]
    return 0 if not remaining else 1
