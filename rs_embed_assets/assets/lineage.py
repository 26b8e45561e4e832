"""Per-partition lineage in Dagster: each partition's materialisation carries its own metadata and checks.

A run may cover many partitions (a backfill chunk). ``MaterializeResult(metadata=...)`` would stamp
the same metadata on every partition of the run, so the assets here instead:

- attach each partition's own metadata with ``context.add_asset_metadata(md, partition_key=pk)``
  (Dagster 1.13 merges it into that partition's ASSET_MATERIALIZATION event), keeping only what is
  truly shared (provider, checkpoint) in the run-wide part;
- report asset checks per partition: the check specs are partitioned like the asset, and one
  ``AssetCheckEvaluation(partition=pk)`` per partition is emitted *after* the materialisations so
  each evaluation points at its partition's materialisation. The check's step output is then
  satisfied with an empty ``Output`` (a run-level ``AssetCheckResult`` would carry no partition).

Previews and sample rows come from ``rs_embed_assets.previews``; the builders below take the
per-partition summary dicts that ``materialize_composite`` / ``materialize_embeddings`` return.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import dagster as dg

from .. import previews

# --- checks ----------------------------------------------------------------------------------


def partition_check_spec(name: str, asset: dg.AssetKey, partitions_def: dg.PartitionsDefinition,
                         description: str) -> dg.AssetCheckSpec:
    """An asset check evaluated once per partition of ``asset`` (partitioned check: preview in 1.13)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dg.PreviewWarning)
        return dg.AssetCheckSpec(name, asset=asset, partitions_def=partitions_def, description=description)


def _target(instance: dg.DagsterInstance, key: dg.AssetKey, pk: str, run_id: str):
    from dagster._core.definitions.asset_checks.asset_check_evaluation import (
        AssetCheckEvaluationTargetMaterializationData)

    records = instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=key, asset_partitions=[pk]),
                                              limit=1).records
    if not records or records[0].run_id != run_id:
        return None
    r = records[0]
    return AssetCheckEvaluationTargetMaterializationData(storage_id=r.storage_id, run_id=r.run_id,
                                                         timestamp=r.timestamp)


def partition_check_events(context: dg.AssetExecutionContext, key: dg.AssetKey,
                           results: Mapping[str, list[dg.AssetCheckResult]]) -> Iterator[Any]:
    """Yield one evaluation per (partition, check) and the empty outputs the check specs expect.

    ``results`` maps each partition key of the run to its ``AssetCheckResult``s (with check_name).
    Yield this *after* the ``MaterializeResult`` so evaluations link to their materialisation.
    """
    names = set()
    for pk, checks in results.items():
        target = _target(context.instance, key, str(pk), context.run_id)
        for r in checks:
            names.add(r.check_name)
            yield dg.AssetCheckEvaluation(asset_key=key, check_name=r.check_name, passed=r.passed,
                                          metadata=r.metadata, severity=r.severity, description=r.description,
                                          partition=str(pk), target_materialization_data=target)
    for spec in context.assets_def.check_specs:
        if spec.asset_key == key and spec.key in context.selected_asset_check_keys:
            if spec.name not in names:
                raise RuntimeError(f"asset check {spec.name} of {key.to_user_string()} got no per-partition result")
            yield dg.Output(None, output_name=context.assets_def.get_output_name_for_asset_check_key(spec.key))


# --- shared metadata helpers -----------------------------------------------------------------


def compact(obj: Any, limit: int = 300) -> str:
    """A dict as one short ``k=v; k=v`` line (long values elided): JSON blobs must not dominate a page."""
    if isinstance(obj, Mapping):
        text = "; ".join(f"{k}={compact(v, limit)}" for k, v in obj.items() if v not in (None, "", [], {}))
    elif isinstance(obj, (list, tuple)):
        text = ",".join(compact(v, limit) for v in obj)
    else:
        text = str(obj)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _path(root: Path, p: str | None) -> Path | None:
    if not p:
        return None
    path = Path(p)
    return path if path.is_absolute() else root / path


def _image(render, alt: str, log=None) -> dg.MetadataValue | None:
    """A preview as inline Markdown; a preview that cannot be made is logged, never fails the run."""
    try:
        png = previews.fit_png(render)
    except Exception as exc:  # noqa: BLE001 - a preview is a convenience, never a reason to fail
        if log is not None:
            log.warning(f"no preview {alt}: {exc}")
        return None
    return dg.MetadataValue.md(previews.markdown_image(png, alt))


# --- composites ------------------------------------------------------------------------------


def composite_partition_metadata(storage, summary: Mapping[str, Any], *, preview: bool = True, log=None) -> dict:
    """Metadata of ONE composite partition from its summary dict (and a quick-look read from the store)."""
    md: dict[str, Any] = {
        "tile": summary["tile"], "month": summary["month"],
        "data_version": str(summary.get("data_version", "")),
        "status": summary.get("status", ""),
        "valid_fraction": float(summary.get("valid_fraction", 0.0)),
        "scene_count": int(summary.get("scene_count", 0)),
        "shape": str(summary.get("shape", "")), "crs": str(summary.get("crs", "")),
        "fetch_seconds": float(summary.get("fetch_seconds", 0.0)),
    }
    if summary.get("written_at"):
        md["written_at"] = str(summary["written_at"])
    path = _path(storage.root, summary.get("path"))
    if path is not None:
        md["path"] = dg.MetadataValue.path(str(path))
    if preview and summary.get("status", "ok") == "ok":
        sensor = summary.get("sensor", "s2")
        want = previews.QUICKLOOK_BANDS[sensor]

        def render(max_px: int):
            # the committed store, lazily and raw (a picture needs no verified read); chunks hold all bands
            ds = storage.open_composite(sensor, summary["tile"], summary["month"]).lazy_dataset()
            data = ds["data"].sel(band=list(want))
            return previews.composite_rgb(_strided(data, max_px), want, sensor, max_px=max_px)

        alt = "RGB B4/B3/B2" if sensor == "s2" else "VV/VH false colour"
        img = _image(render, alt, log)
        if img is not None:
            md["preview"] = img
    return md


def _strided(da, max_px: int):
    """Read only every s-th pixel of a big raster (s keeps ≥ 2 × max_px per side for the block mean)."""
    h, w = da.shape[-2:]
    s = max(1, max(h, w) // (2 * max_px))
    return da[..., ::s, ::s].values


# --- embeddings ------------------------------------------------------------------------------


def vectors_column_schema(dim: int) -> dg.TableSchema:
    """``dagster/column_schema`` of the vectors Parquet files, from the one schema that writes them."""
    import pyarrow as pa

    from ..embedding import vectors_schema

    def kind(t: pa.DataType) -> str:
        if pa.types.is_fixed_size_list(t):
            return f"FLOAT[{t.list_size}]"
        return {"string": "VARCHAR", "date32[day]": "DATE", "int32": "INTEGER", "double": "DOUBLE",
                "float": "FLOAT", "binary": "BLOB (WKB)", "bool": "BOOLEAN"}.get(str(t), str(t))

    described = {"embedding": f"pooled {dim}-d vector of the chip", "geometry": "chip footprint, WKB in CRS84",
                 "month": "first day of the month", "chip_id": "<MGRS>_<cs>px_r<RRR>_c<CCC>",
                 "chip_row": "lattice row in the whole MGRS tile", "chip_col": "lattice column in the MGRS tile"}
    return dg.TableSchema(columns=[dg.TableColumn(f.name, kind(f.type), description=described.get(f.name))
                                   for f in vectors_schema(dim)])


def embedding_partition_metadata(storage, manifest: Mapping[str, Any], *, preview: bool = True,
                                 sample_rows: int = 5, log=None) -> dict:
    """Metadata of ONE embedding partition from its manifest: rows, versions, paths, timings, previews."""
    rows = int(manifest.get("rows", manifest.get("chips_embedded", 0)))
    seconds = float(manifest.get("seconds", 0.0) or 0.0)
    md: dict[str, Any] = {
        "dagster/row_count": rows,
        "tile": manifest["tile"], "month": manifest["month"], "status": str(manifest.get("status", "ok")),
        "composite_version": str(manifest.get("composite_version", "")),
        "checkpoint_sha256": str(manifest.get("checkpoint_sha256", "")),
        "checkpoint_random_init": bool(manifest.get("checkpoint_random_init", False)),
        "code_version": str(manifest.get("code_version", "")),
        "preprocessing_hash": str(manifest.get("preprocessing_hash", "")),
        "chips_embedded": int(manifest.get("chips_embedded", rows)),
        "chips_skipped": int(manifest.get("chips_skipped", 0)),
        "embed_seconds": round(seconds, 3),
        "chips_per_s": float(manifest.get("chips_per_s") or 0.0),
        "device": str(manifest.get("device", "")), "dtype": str(manifest.get("dtype", "")),
    }
    if manifest.get("chip_rows") and manifest.get("chip_cols"):
        md["chip_lattice_rows_cols"] = f"r{manifest['chip_rows'][0]}..{manifest['chip_rows'][1]} " \
                                       f"c{manifest['chip_cols'][0]}..{manifest['chip_cols'][1]}"
    if manifest.get("grid_shape"):
        md["grid_shape"] = str(manifest["grid_shape"])
        md["grid_dtype"] = str(manifest.get("grid_dtype", ""))
    if manifest.get("written_at"):
        md["written_at"] = str(manifest["written_at"])
    if manifest.get("frame_months") and len(manifest["frame_months"]) > 1:
        md["frame_months"] = ",".join(manifest["frame_months"])
        md["distinct_frames"] = int(manifest.get("distinct_frames", len(set(manifest["frame_months"]))))
    vpath, gpath = _path(storage.root, manifest.get("vectors_path")), _path(storage.root, manifest.get("grid_path"))
    if vpath is not None:
        md["vectors_path"] = dg.MetadataValue.path(str(vpath))
    if gpath is not None:
        md["grid_path"] = dg.MetadataValue.path(str(gpath))
    if preview and rows and gpath is not None:
        def render(max_px: int):
            ds = storage.open_grid(manifest["model"], manifest["tile"], manifest["month"])  # lazy
            # every feature is read, so cells are strided to ~128 per side (a whole tile: 40 MB, not 1.4 GB)
            return previews.pca_rgb(_strided(ds["embedding"], 64), max_px=max_px)

        img = _image(render, "embedding PCA (PC1-3 as RGB)", log)
        if img is not None:
            md["preview"] = img
    if sample_rows and rows and vpath is not None and vpath.exists():
        import pyarrow.parquet as pq

        columns = ["chip_id", "month", "chip_row", "chip_col", "center_lon", "center_lat", "valid_fraction"]
        table = pq.ParquetFile(vpath).read_row_group(0, columns=[c for c in columns
                                                                 if c in pq.read_schema(vpath).names])
        md["sample_rows"] = dg.MetadataValue.md(previews.sample_rows_markdown(table, sample_rows))
    return md
