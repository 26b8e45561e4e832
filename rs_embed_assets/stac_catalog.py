"""A static STAC catalog of every committed partition, written under ``<root>/stac/``.

    summary = write_stac(Storage("data"))

Layout (pystac's default, every href relative, so a copied or moved data root keeps working)::

    stac/catalog.json                                   root catalog
    stac/<collection>/collection.json                   composites-s2, composites-s1, embeddings-<model>
    stac/<collection>/<item>/<item>.json                one Item per tile-month (id <collection>_<tile>_<YYYY-MM>)
    stac/items.parquet                                  every Item as stac-geoparquet (asset hrefs relative to
                                                        stac/; per-band raster:bands only in the JSON items)

- Composite Items: the zarr store as asset ``data`` with the projection extension (``proj:code``,
  ``proj:shape``, ``proj:transform``) and the raster extension (``raster:bands``: dtype, nodata, 10 m),
  and the composite's status, valid fraction, provider and content version in properties.
- Embedding Items: asset ``vectors`` (the GeoParquet partition, ``emb:type`` "chip") and asset ``grid``
  (the zarr grid, ``emb:type`` "pixel", projection fields), both with role ``embeddings`` and
  ``emb:dimensions``; provenance in properties (``rsea:checkpoint_sha256``, ``rsea:composite_version``,
  ``rsea:preprocessing_hash``, ``rsea:code_version``, ``rsea:rows``).
- Embedding Collections describe the model with the MLM extension (name, architecture, task, input
  bands and shape, output shape, framework) and carry the checkpoint as an ``mlm:model`` asset.

Partitions are read only through the Storage API (``iter_composite_records``/``open_composite``,
``iter_manifests``/``open_grid``); nothing here changes a partition. The catalog is rebuilt whole in
``.staging/`` and swapped into place.
"""

from __future__ import annotations

import calendar
import json
import os
import shutil
import time
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable

import numpy as np

STAC_DIR = "stac"
GEOPARQUET = "items.parquet"
PREFIX = "rsea"  # this project's own property prefix (provenance fields)

EXTENSIONS = {
    "proj": "https://stac-extensions.github.io/projection/v2.0.0/schema.json",
    "raster": "https://stac-extensions.github.io/raster/v1.1.0/schema.json",
    "emb": "https://stac-extensions.github.io/embeddings/v1.0.0/schema.json",
    "mlm": "https://stac-extensions.github.io/mlm/v1.4.0/schema.json",
}
ZARR_TYPE = "application/vnd+zarr"
PARQUET_TYPE = "application/vnd.apache.parquet"


# --- georeferencing helpers ---------------------------------------------------------------------
@lru_cache(maxsize=64)
def _crs_code(wkt: str) -> str | None:
    from pyproj import CRS

    crs = CRS.from_wkt(wkt)
    auth = crs.to_authority()
    return f"{auth[0]}:{auth[1]}" if auth else None


def _georef(attrs: dict[str, Any], shape: tuple[int, int]) -> dict[str, Any]:
    """proj:* fields and the CRS84 footprint of a raster with GDAL GeoTransform ``attrs``."""
    from pyproj import CRS, Transformer

    wkt = attrs.get("crs_wkt") or attrs.get("spatial_ref")
    x0, dx, _, y0, _, dy = (float(v) for v in str(attrs["GeoTransform"]).split())
    h, w = shape
    xs = np.array([x0, x0 + w * dx, x0 + w * dx, x0, x0])
    ys = np.array([y0, y0, y0 + h * dy, y0 + h * dy, y0])
    tr = Transformer.from_crs(CRS.from_wkt(wkt), "OGC:CRS84", always_xy=True)
    lon, lat = tr.transform(xs, ys)
    ring = [[round(float(a), 9), round(float(b), 9)] for a, b in zip(lon, lat)]
    if _signed_area(ring) < 0:  # GeoJSON: exterior rings counter-clockwise
        ring = ring[::-1]
    code = _crs_code(wkt)
    proj = {"proj:code": code} if code else {"proj:wkt2": wkt}
    proj.update({"proj:shape": [h, w], "proj:transform": [dx, 0.0, x0, 0.0, dy, y0]})
    bbox = [min(lon), min(lat), max(lon), max(lat)]
    return {"proj": proj, "geometry": {"type": "Polygon", "coordinates": [ring]}, "bbox": [float(v) for v in bbox]}


def _signed_area(ring: list[list[float]]) -> float:
    return 0.5 * sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(ring, ring[1:]))


def _month_props(month: str) -> dict[str, str]:
    y, m = map(int, month.split("-"))
    last = calendar.monthrange(y, m)[1]
    return {"datetime": f"{y:04d}-{m:02d}-01T00:00:00Z", "start_datetime": f"{y:04d}-{m:02d}-01T00:00:00Z",
            "end_datetime": f"{y:04d}-{m:02d}-{last:02d}T23:59:59Z"}


def _zarr_spatial_ref(path: Path) -> dict[str, Any]:
    import zarr

    return dict(zarr.open_group(str(path), mode="r", zarr_format=2)["spatial_ref"].attrs)


# --- items ----------------------------------------------------------------------------------------
def composite_item(storage, record: dict[str, Any]) -> dict[str, Any]:
    """One composite partition (its commit record) as a STAC Item dict with absolute asset hrefs."""
    from .composite import sensor_spec

    sensor, tile, month = record["sensor"], record["tile"], record["month"]
    reader = storage.open_composite(sensor, tile, month)
    geo = _georef(_zarr_spatial_ref(reader.path), reader.shape[1:])
    spec = sensor_spec(sensor)
    nodata = "nan" if isinstance(spec.nodata, float) and np.isnan(spec.nodata) else spec.nodata
    band = {"data_type": str(reader.dtype), "nodata": nodata, "spatial_resolution": abs(geo["proj"]["proj:transform"][0])}
    props = {**_month_props(month), "title": f"{sensor.upper()} composite {tile} {month}",
             f"{PREFIX}:tile": tile, f"{PREFIX}:sensor": sensor, f"{PREFIX}:bands": list(reader.bands)}
    for key in ("status", "valid_fraction", "scene_count", "provider", "data_version"):
        if record.get(key) is not None:
            props[f"{PREFIX}:{key}"] = record[key]
    props[f"{PREFIX}:synthetic"] = bool(record.get("synthetic", False))  # one type per column in items.parquet
    cid = f"composites-{sensor}"
    return {
        "type": "Feature", "stac_version": "1.1.0", "stac_extensions": [EXTENSIONS["proj"], EXTENSIONS["raster"]],
        "id": f"{cid}_{tile}_{month}", "collection": cid, "geometry": geo["geometry"], "bbox": geo["bbox"],
        "properties": props, "links": [],
        "assets": {"data": {"href": str(reader.path), "type": ZARR_TYPE, "roles": ["data"],
                            "title": f"{sensor} composite (zarr v2: data (band, y, x), valid_count (y, x))",
                            **geo["proj"], "raster:bands": [dict(band) for _ in reader.bands]}},
    }


def embedding_item(storage, manifest: dict[str, Any]) -> dict[str, Any] | None:
    """One embedding partition (its manifest) as a STAC Item dict with absolute asset hrefs."""
    import adapters

    model, tile, month = manifest["model"], manifest["tile"], manifest["month"]
    spec = adapters.get_spec(model)
    grid = storage.open_grid(model, tile, month)
    props = {**_month_props(month), "title": f"{model} embeddings {tile} {month}", f"{PREFIX}:tile": tile,
             f"{PREFIX}:model": model}
    for key in ("checkpoint_sha256", "checkpoint_random_init", "composite_version", "preprocessing_hash",
                "code_version", "rows", "provider", "pooling"):
        if manifest.get(key) is not None:
            props[f"{PREFIX}:{key}"] = manifest[key]
    props[f"{PREFIX}:synthetic"] = bool(manifest.get("synthetic", False))
    dims = [int(spec.embed_dim)]
    assets: dict[str, Any] = {
        "vectors": {"href": str(storage.vectors_path(model, tile, month)), "type": PARQUET_TYPE,
                    "roles": ["data", "embeddings"], "title": "pooled vectors per chip (GeoParquet)",
                    "emb:type": "chip", "emb:dimensions": dims},
    }
    if grid is not None:
        geo = _georef(grid["spatial_ref"].attrs, grid["embedding"].shape[1:])
        assets["grid"] = {"href": str(storage.resolve(manifest["grid_path"])), "type": ZARR_TYPE,
                          "roles": ["data", "embeddings"], "title": "embedding grid (zarr v2: embedding (feature, y, x))",
                          "emb:type": "pixel", "emb:dimensions": dims, **geo["proj"]}
        geometry, bbox = geo["geometry"], geo["bbox"]
    else:
        bbox = _vectors_bbox(storage.vectors_path(model, tile, month))
        if bbox is None:
            return None  # no grid and no chip: nothing to locate
        w, s, e, n = bbox
        geometry = {"type": "Polygon", "coordinates": [[[w, s], [e, s], [e, n], [w, n], [w, s]]]}
    cid = f"embeddings-{model}"
    return {
        "type": "Feature", "stac_version": "1.1.0", "stac_extensions": [EXTENSIONS["emb"], EXTENSIONS["proj"]],
        "id": f"{cid}_{tile}_{month}", "collection": cid, "geometry": geometry, "bbox": bbox,
        "properties": props, "links": [], "assets": assets,
    }


def _vectors_bbox(path: Path) -> list[float] | None:
    import pyarrow.parquet as pq

    meta = pq.read_metadata(path).metadata or {}
    geo = json.loads(meta.get(b"geo", b"{}"))
    bbox = geo.get("columns", {}).get("geometry", {}).get("bbox")
    return [float(v) for v in bbox] if bbox else None


# --- collections ----------------------------------------------------------------------------------
def _extent(items: list[dict[str, Any]]) -> dict[str, Any]:
    boxes = np.array([it["bbox"] for it in items])
    starts = sorted(it["properties"]["start_datetime"] for it in items)
    ends = sorted(it["properties"]["end_datetime"] for it in items)
    return {"spatial": {"bbox": [[float(boxes[:, 0].min()), float(boxes[:, 1].min()),
                                  float(boxes[:, 2].max()), float(boxes[:, 3].max())]]},
            "temporal": {"interval": [[starts[0], ends[-1]]]}}


def _collection(cid: str, title: str, description: str, items: list[dict[str, Any]], extensions: list[str],
                **extra: Any) -> dict[str, Any]:
    return {"type": "Collection", "stac_version": "1.1.0", "stac_extensions": extensions, "id": cid,
            "title": title, "description": description, "license": "other", "extent": _extent(items),
            "links": [], **extra}


def model_collection_fields(storage, model: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """MLM fields describing ``model`` and its checkpoint asset (absolute href or the published URL)."""
    import adapters

    spec = adapters.get_spec(model)  # plain data: no torch import
    src = spec.checkpoint
    record_path = storage.checkpoint_record(spec.checkpoint_id)
    record = storage.read_json(record_path) if record_path.exists() else {}
    frames = [-1, spec.frames] if spec.frames > 1 else [-1]
    dim_in = ["batch", "time", "channel", "height", "width"] if spec.frames > 1 else ["batch", "channel", "height", "width"]
    fields = {
        "mlm:name": model, "mlm:architecture": spec.description.split(":")[0].strip() or model,
        "mlm:tasks": ["similarity-search"], "mlm:framework": "pytorch",
        "mlm:pretrained": not record.get("random_init", False),  # demo weights are not a pretrained model
        "mlm:input": [{
            "name": f"{spec.sensor} chips", "bands": list(spec.bands),
            "input": {"shape": [*frames, len(spec.bands), spec.image_size, spec.image_size],
                      "dim_order": dim_in, "data_type": "float32"},
            "description": f"{spec.chip_size} px chips of the {spec.sensor} composite at "
                           f"{spec.source_resolution_m:g} m; preprocessing as in adapters/{model}",
        }],
        "mlm:output": [{
            "name": "pooled embedding", "tasks": ["similarity-search"],
            "result": {"shape": [-1, spec.embed_dim], "dim_order": ["batch", "embedding"], "data_type": "float32"},
        }, {
            "name": "embedding grid", "tasks": ["similarity-search"],
            "result": {"shape": [-1, spec.embed_dim, spec.grid_size, spec.grid_size],
                       "dim_order": ["batch", "embedding", "height", "width"], "data_type": "float32"},
        }],
    }
    if src.hf_repo:
        fields["mlm:pretrained_source"] = f"https://huggingface.co/{src.hf_repo}"
    href = None
    ckpt = record.get("path")
    if ckpt and Path(ckpt).resolve().is_relative_to(storage.root):
        href = str(Path(ckpt).resolve())
    elif src.hf_repo:
        href = f"https://huggingface.co/{src.hf_repo}/resolve/main/{src.filename}"
    elif src.url:
        href = src.url
    asset = {}
    if href:
        asset = {"checkpoint": {"href": href, "type": "application/octet-stream",
                                "roles": ["mlm:model", "mlm:weights"], "mlm:artifact_type": "torch.save",
                                "title": src.filename}}
        if record.get("sha256"):
            asset["checkpoint"][f"{PREFIX}:sha256"] = record["sha256"]
        if record.get("random_init"):
            asset["checkpoint"][f"{PREFIX}:random_init"] = True
    return fields, asset


# --- the catalog ------------------------------------------------------------------------------------
def build_items(storage) -> dict[str, list[dict[str, Any]]]:
    """collection id → item dicts (absolute asset hrefs), for every committed partition."""
    out: dict[str, list[dict[str, Any]]] = {}
    for record in storage.iter_composite_records():
        out.setdefault(f"composites-{record['sensor']}", []).append(composite_item(storage, record))
    for manifest in storage.iter_manifests():
        item = embedding_item(storage, manifest)
        if item is not None:
            out.setdefault(item["collection"], []).append(item)
    return out


def write_stac(storage) -> dict[str, Any]:
    """(Re)write ``<root>/stac/`` (JSON catalog + ``items.parquet``); returns a summary."""
    import pystac

    t0 = time.perf_counter()
    by_collection = build_items(storage)
    final = storage.root / STAC_DIR
    staged = storage.staging_path("stac")
    catalog = pystac.Catalog(id="rs-embed-assets", title="rs-embed-assets catalog",
                             description="Monthly Sentinel-2/Sentinel-1 composites per MGRS tile and the "
                                         "embeddings of remote-sensing foundation models made from them.")
    flat: list[dict[str, Any]] = []
    for cid in sorted(by_collection):
        items = sorted(by_collection[cid], key=lambda it: it["id"])
        extensions, extra = [], {}
        if cid.startswith("embeddings-"):
            import adapters

            model = cid.removeprefix("embeddings-")
            fields, assets = model_collection_fields(storage, model)
            extensions = [EXTENSIONS["mlm"], EXTENSIONS["emb"]]
            extra = {**fields, "emb:type": "chip", "emb:dimensions": items[0]["assets"]["vectors"]["emb:dimensions"]}
            if assets:
                extra["assets"] = assets
            about = adapters.get_spec(model).description
            title = f"{model} embeddings"
            desc = f"Pooled chip vectors and embedding grids of {model} per tile-month. {about}".strip()
        else:
            sensor = cid.removeprefix("composites-")
            title, desc = f"{sensor.upper()} monthly composites", f"Monthly {sensor.upper()} composites per tile."
        coll = pystac.Collection.from_dict(_collection(cid, title, desc, items, extensions, **extra))
        catalog.add_child(coll)
        for it in items:
            coll.add_item(pystac.Item.from_dict(it))
        flat.extend(items)
    catalog.normalize_hrefs(str(final))  # hrefs are made relative to where the catalog will live ...
    catalog.make_all_asset_hrefs_relative()
    catalog.save(catalog_type=pystac.CatalogType.SELF_CONTAINED, dest_href=str(staged))  # ... written aside first
    # stac-geoparquet: the same items, asset hrefs relative to stac/ (where items.parquet lies)
    if flat:
        _write_geoparquet([_geoparquet_row(it, storage.root / STAC_DIR) for it in flat], staged / GEOPARQUET)
    _swap(staged, final, storage)
    return {"path": str(final / "catalog.json"), "collections": {c: len(v) for c, v in sorted(by_collection.items())},
            "items": len(flat), "geoparquet": str(final / GEOPARQUET) if flat else None,
            "seconds": round(time.perf_counter() - t0, 3)}


def _geoparquet_row(item: dict[str, Any], base: Path) -> dict[str, Any]:
    """An item for items.parquet: asset hrefs relative to ``base``; per-band ``raster:bands`` left to the JSON
    items (their ``nodata`` is 0 for S2 and "nan" for S1, which one Arrow column cannot hold)."""
    item = json.loads(json.dumps(item))
    for asset in item["assets"].values():
        asset.pop("raster:bands", None)
        href = asset["href"]
        if "://" not in href:
            asset["href"] = os.path.relpath(href, base).replace(os.sep, "/")
    return item


def _write_geoparquet(items: Iterable[dict[str, Any]], dst: Path) -> None:
    from stac_geoparquet.arrow import parse_stac_items_to_arrow, to_parquet

    to_parquet(parse_stac_items_to_arrow(list(items)), dst)


def _swap(staged: Path, final: Path, storage) -> None:
    """Put the freshly written catalog in place of the old one (the old one is removed after)."""
    old = None
    if final.exists():
        old = storage.staging_path("stac-old")
        os.replace(final, old)
    os.replace(staged, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
