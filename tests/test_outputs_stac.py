"""The static STAC catalog: valid STAC 1.1 (checked offline), extensions filled, portable, queryable in DuckDB.

What is validated: every catalog, collection and item JSON against the STAC 1.1.0 core JSON schemas with
stac-validator, offline (the core schemas are the copies that pystac ships; see ``_core_schema_map``). The
extension schemas (projection v2.0.0, raster v1.1.0, embeddings v1.0.0, MLM v1.4.0) are published only on
the web and this environment has no internet, so their fields are checked here through pystac's typed
extension classes and explicit assertions instead of their JSON schemas.
"""

import importlib.resources
import json
import shutil
from pathlib import Path

import duckdb
import pystac
import pytest
from pystac.extensions.mlm import MLMExtension
from pystac.extensions.projection import ProjectionExtension
from pystac.extensions.raster import RasterExtension

from outputs_data import MODEL, MONTHS, TILES, data_root
from rs_embed_assets.stac_catalog import EXTENSIONS, write_stac
from rs_embed_assets.storage import Storage


@pytest.fixture(scope="module")
def stac(tmp_path_factory):
    """A copy of the session's data root with its STAC catalog written (tests may move it around)."""
    root = tmp_path_factory.mktemp("stac") / "data"
    shutil.copytree(data_root(tmp_path_factory), root)
    storage = Storage(root)
    return storage, write_stac(storage)


def _core_schema_map() -> dict[str, str]:
    base = Path(str(importlib.resources.files("pystac.validation.jsonschemas")))
    out = {}
    for f in (base / "stac-spec" / "v1.1.0").glob("*.json"):
        spec = {"catalog": "catalog-spec", "collection": "collection-spec"}.get(f.stem, "item-spec")
        out[f"https://schemas.stacspec.org/v1.1.0/{spec}/json-schema/{f.name}"] = str(f)
    for f in (base / "geojson").glob("*.json"):
        out[f"https://geojson.org/schema/{f.name}"] = str(f)
    return out


def test_one_collection_per_product_and_one_item_per_partition(stac):
    storage, summary = stac
    n = len(TILES) * len(MONTHS)
    assert summary["collections"] == {"composites-s1": n, "composites-s2": n, f"embeddings-{MODEL}": n}
    cat = pystac.Catalog.from_file(summary["path"])
    assert sorted(c.id for c in cat.get_children()) == sorted(summary["collections"])
    ids = {i.id for i in cat.get_items(recursive=True)}
    assert f"embeddings-{MODEL}_{TILES[0]}_{MONTHS[1]}" in ids and len(ids) == 3 * n


def test_every_document_is_valid_stac_core(stac):
    from stac_validator import stac_validator

    storage, _ = stac
    docs = sorted((storage.root / "stac").rglob("*.json"))
    assert len(docs) == 1 + 3 + 3 * len(TILES) * len(MONTHS)
    schemas = _core_schema_map()
    for doc in docs:
        v = stac_validator.StacValidate(str(doc), core=True, schema_map=dict(schemas))
        assert v.run(), f"{doc.relative_to(storage.root)}: {v.message}"


def test_the_core_check_can_fail(stac, tmp_path):
    from stac_validator import stac_validator

    storage, _ = stac
    item = next((storage.root / "stac" / f"embeddings-{MODEL}").rglob("*_*.json"))
    bad = json.loads(item.read_text())
    del bad["properties"]["datetime"]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    assert not stac_validator.StacValidate(str(tmp_path / "bad.json"), core=True, schema_map=_core_schema_map()).run()


def test_embedding_items_carry_extensions_and_provenance(stac):
    storage, summary = stac
    cat = pystac.Catalog.from_file(summary["path"])
    coll = cat.get_child(f"embeddings-{MODEL}")
    item = coll.get_item(f"embeddings-{MODEL}_{TILES[0]}_{MONTHS[1]}")
    manifest = storage.read_manifest(MODEL, TILES[0], MONTHS[1])
    assert EXTENSIONS["emb"] in item.stac_extensions and EXTENSIONS["proj"] in item.stac_extensions
    props = item.properties
    for key in ("checkpoint_sha256", "composite_version", "preprocessing_hash", "code_version", "rows"):
        assert props[f"rsea:{key}"] == manifest[key]
    assert props["start_datetime"] == "2024-07-01T00:00:00Z" and props["end_datetime"] == "2024-07-31T23:59:59Z"
    vec, grid = item.assets["vectors"], item.assets["grid"]
    assert "embeddings" in vec.roles and vec.extra_fields["emb:dimensions"] == [768]
    assert vec.extra_fields["emb:type"] == "chip" and grid.extra_fields["emb:type"] == "pixel"
    proj = ProjectionExtension.ext(grid)
    gds = storage.open_grid(MODEL, TILES[0], MONTHS[1])
    x0, dx, _, y0, _, dy = (float(v) for v in gds["spatial_ref"].attrs["GeoTransform"].split())
    assert proj.code == "EPSG:32631" and proj.shape == list(gds["embedding"].shape[1:])
    assert proj.transform == [dx, 0.0, x0, 0.0, dy, y0]
    # the footprint contains every chip centre of the partition
    import pyarrow.parquet as pq
    from shapely.geometry import Point, shape

    foot = shape(item.geometry)
    t = pq.read_table(storage.vectors_path(MODEL, TILES[0], MONTHS[1]), columns=["center_lon", "center_lat"])
    assert all(foot.contains(Point(x, y)) for x, y in zip(*t.to_pydict().values()))


def test_model_is_described_with_mlm(stac):
    import adapters

    _, summary = stac
    coll = pystac.Catalog.from_file(summary["path"]).get_child(f"embeddings-{MODEL}")
    spec = adapters.get_spec(MODEL)
    assert EXTENSIONS["mlm"] in coll.stac_extensions
    mlm = MLMExtension.ext(coll)
    assert mlm.mlm_name == MODEL and mlm.architecture and list(mlm.tasks) == ["similarity-search"]
    (inp,) = mlm.input
    assert inp.bands == list(spec.bands) and inp.input.shape == [-1, len(spec.bands), spec.image_size,
                                                                  spec.image_size]
    assert [o.result.shape for o in mlm.output] == [[-1, 768], [-1, 768, spec.grid_size, spec.grid_size]]
    ckpt = coll.assets["checkpoint"]
    assert "mlm:model" in ckpt.roles and ckpt.extra_fields["mlm:artifact_type"] == "torch.save"
    assert len(ckpt.extra_fields["rsea:sha256"]) == 64


def test_composite_items_carry_projection_and_raster(stac):
    storage, summary = stac
    item = pystac.Catalog.from_file(summary["path"]).get_child("composites-s1").get_item(
        f"composites-s1_{TILES[1]}_{MONTHS[0]}")
    record = storage.composite_record("s1", TILES[1], MONTHS[0])
    asset = item.assets["data"]
    bands = RasterExtension.ext(asset).bands
    assert [b.data_type for b in bands] == ["float32", "float32"] and bands[0].to_dict()["nodata"] == "nan"
    assert ProjectionExtension.ext(asset).shape == record["shape"][1:]
    assert item.properties["rsea:data_version"] == record["data_version"]


def test_hrefs_are_relative_so_a_moved_root_still_resolves(stac, tmp_path):
    storage, _ = stac
    moved = tmp_path / "elsewhere" / "copy of data"
    shutil.copytree(storage.root, moved)
    cat = pystac.Catalog.from_file(str(moved / "stac" / "catalog.json"))
    items = list(cat.get_items(recursive=True))
    for item in items:
        for asset in item.assets.values():
            assert not Path(asset.href).is_absolute() or str(moved) in asset.href
            assert Path(asset.get_absolute_href()).exists(), asset.get_absolute_href()
    for path in (moved / "stac").rglob("*.json"):
        assert str(storage.root) not in path.read_text(), f"{path} names the original root"


def test_stac_geoparquet_is_queryable_in_duckdb(stac):
    storage, summary = stac
    path = str(storage.root / "stac" / "items.parquet").replace("'", "''")
    con = duckdb.connect()
    n = con.execute(f"SELECT count(*) FROM read_parquet('{path}') WHERE collection = 'embeddings-{MODEL}' "
                    "AND datetime >= TIMESTAMPTZ '2024-07-01 00:00:00+00'").fetchone()[0]
    assert n == len(TILES)
    sha = con.execute(f"""SELECT "rsea:checkpoint_sha256" FROM read_parquet('{path}') WHERE id = ?""",
                      [f"embeddings-{MODEL}_{TILES[0]}_{MONTHS[0]}"]).fetchone()[0]
    assert sha == storage.read_manifest(MODEL, TILES[0], MONTHS[0])["checkpoint_sha256"]
    href = con.execute(f"SELECT assets.vectors.href FROM read_parquet('{path}') WHERE id = ?",
                       [f"embeddings-{MODEL}_{TILES[0]}_{MONTHS[0]}"]).fetchone()[0]
    assert (storage.root / "stac" / href).resolve() == storage.vectors_path(MODEL, TILES[0], MONTHS[0]).resolve()


def test_rewriting_replaces_the_catalog(stac):
    storage, first = stac
    again = write_stac(storage)
    assert again["collections"] == first["collections"]
    assert not list(storage.staging_dir.glob("*stac*")), "no staged catalog left behind"


def test_the_catalog_asset_writes_the_stac_catalog(tmp_path_factory):
    import dagster as dg

    from rs_embed_assets.assets.catalog import catalog
    from rs_embed_assets.resources import CatalogResource, StorageResource

    root = tmp_path_factory.mktemp("asset") / "data"
    shutil.copytree(data_root(tmp_path_factory), root)
    res = dg.materialize([catalog], resources={"storage": StorageResource(root=str(root)),
                                               "catalog_db": CatalogResource()})
    assert res.success
    meta = res.asset_materializations_for_node("catalog")[0].metadata
    assert meta["stac_items"].value == 3 * len(TILES) * len(MONTHS)
    assert pystac.Catalog.from_file(str(root / "stac" / "catalog.json")).get_child(f"embeddings-{MODEL}")
