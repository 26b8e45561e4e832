"""Integration: materialise the asset graph on an ephemeral instance and query the DuckDB catalog."""

import json

import dagster as dg
import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest

from adapters import CheckpointError
from rs_embed_assets.assets.catalog import catalog
from rs_embed_assets.catalog import connect_readonly
from rs_embed_assets.assets.checkpoints import build_checkpoint_asset
from rs_embed_assets.assets.composites import composite_assets
from rs_embed_assets.assets.embeddings import build_embedding_asset
from rs_embed_assets.automation import aoi_tiles_sensor
from rs_embed_assets.materialize import MissingUpstreamError, agrifm_frame_months
from rs_embed_assets.partitions import TILES, make_key
from rs_embed_assets.resources import (CatalogResource, CheckpointPolicyResource, ModelResource, ProviderResource,
                                       StorageResource)
from rs_embed_assets.storage import Storage

TILE_KEYS = ["31UFU-k36-r21-c12", "31UFU-k36-r21-c13"]
MONTHS = ["2024-06", "2024-07"]
FOMO = dg.AssetKey(["embeddings", "fomo"])
CKPT = dg.AssetKey(["checkpoint", "fomo"])
S2, S1 = dg.AssetKey("s2_composite"), dg.AssetKey("s1_composite")


@pytest.fixture
def small_fomo(monkeypatch):
    monkeypatch.setenv("RS_EMBED_FOMO_DEPTH", "2")  # a real knob: small network, same code paths
    for name in ("RS_EMBED_FOMO_CKPT", "RS_EMBED_FOMO_CKPT_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RS_EMBED_FOMO_AUTO_DOWNLOAD", "0")  # CI has no network: never try


@pytest.fixture
def env(tmp_path, small_fomo):
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(TILES.name, TILE_KEYS)
    assets = [build_checkpoint_asset("fomo", "fomo"), *composite_assets, build_embedding_asset("fomo"), catalog]
    resources = {
        "storage": StorageResource(root=str(tmp_path / "data")),
        "provider": ProviderResource(kind="sample"),
        "checkpoint_policy": CheckpointPolicyResource(allow_random_init=True),
        "model_fomo": ModelResource(model_id="fomo", device="cpu", batch_size=8),
        "catalog_db": CatalogResource(),
    }
    return instance, assets, resources, Storage(tmp_path / "data")


def _range_tags():
    return {"dagster/asset_partition_range_start": str(make_key(TILE_KEYS[0], MONTHS[0])),
            "dagster/asset_partition_range_end": str(make_key(TILE_KEYS[-1], MONTHS[-1]))}


def _materialize_all(instance, assets, resources):
    assert dg.materialize(assets, selection=[CKPT], instance=instance, resources=resources).success
    res = dg.materialize(assets, selection=[S2, S1, FOMO], instance=instance, resources=resources, tags=_range_tags())
    assert res.success
    assert dg.materialize(assets, selection=[dg.AssetKey("catalog")], instance=instance, resources=resources).success
    return res


def test_graph_materialises_and_catalog_answers_sql(env):
    instance, assets, resources, storage = env
    res = _materialize_all(instance, assets, resources)

    # one run batched all 4 partitions of each asset
    for key in (S2, S1, FOMO):
        assert len(instance.get_materialized_partitions(key)) == 4
    # files per partition, georeferenced grid, lineage
    # on the 31UFU lattice, sub-tile c12 owns 4 × 4 FoMo chips and c13 owns 4 × 5 (its last column
    # reaches 11 px into c14)
    for tile, (rows, cols) in zip(TILE_KEYS, [(4, 4), (4, 5)]):
        for month in MONTHS:
            vec = pq.read_table(storage.vectors_path("fomo", tile, month))
            assert vec.num_rows == rows * cols and vec.schema.field("embedding").type.list_size == 768
            assert json.loads(vec.schema.metadata[b"geo"])["primary_column"] == "geometry"
            grid = storage.open_grid("fomo", tile, month)
            assert grid["embedding"].shape == (768, 4 * rows, 4 * cols)
            assert grid.attrs["crs"] == "EPSG:32631" and grid.attrs["cell_size_m"] == 160.0
            manifest = storage.read_manifest("fomo", tile, month)
            assert manifest["checkpoint_random_init"] is True and len(manifest["checkpoint_sha256"]) == 64
    mat = [e for e in res.get_asset_materialization_events() if e.asset_key == FOMO][0].materialization
    for key in ("checkpoint_sha256", "preprocessing_hash", "code_version", "composite_version", "chips_per_s",
                "device", "dtype"):
        assert key in mat.metadata, key
    assert res.get_asset_check_evaluations()[0].passed

    ckpt_event = instance.get_latest_materialization_event(CKPT)
    assert ckpt_event.asset_materialization.metadata["random_init"].value is True

    with connect_readonly(storage.catalog_path) as con:
        assert con.execute("SELECT count(*) FROM vectors_fomo").fetchone()[0] == 72
        assert con.execute("SELECT typeof(embedding) FROM vectors_fomo LIMIT 1").fetchone()[0] == "FLOAT[768]"
        chip, month = con.execute("SELECT chip_id, month FROM vectors ORDER BY chip_id, month LIMIT 1").fetchone()
        rows = con.execute("SELECT * FROM similar_chips('fomo', ?, ?, 3)", [chip, str(month)]).fetchall()
        assert len(rows) == 3 and rows[0][-1] >= rows[-1][-1]
        # the same chip in the other month is, on synthetic data with a small net, among the most similar
        series = con.execute("SELECT count(*) FROM chip_timeseries('fomo', ?)", [chip]).fetchone()[0]
        assert series == 2
        assert con.execute("SELECT count(*) FROM manifest WHERE model='fomo'").fetchone()[0] == 4
        # spatial filtering with DuckDB's core geometry (no extension): the western sub-tile only
        aoi = ('{"type":"Polygon","coordinates":[[[5.04,52.63],[5.06,52.63],[5.06,52.65],[5.04,52.65],'
               '[5.04,52.63]]]}')
        hits = con.execute("SELECT count(*), count(DISTINCT tile) FROM vectors_fomo "
                           "WHERE ST_Intersects_Extent(geometry, ST_GeomFromGeoJSON(?))", [aoi]).fetchone()
        assert 0 < hits[0] < 72 and hits[1] == 1
        assert con.execute("SELECT count(*) FROM composites").fetchone()[0] == 8


def test_rematerialising_replaces_and_never_duplicates(env):
    instance, assets, resources, storage = env
    _materialize_all(instance, assets, resources)
    before = pq.read_table(storage.vectors_path("fomo", TILE_KEYS[0], MONTHS[0]))
    _materialize_all(instance, assets, resources)
    after = pq.read_table(storage.vectors_path("fomo", TILE_KEYS[0], MONTHS[0]))
    assert before.column("chip_id").to_pylist() == after.column("chip_id").to_pylist()
    np.testing.assert_array_equal(np.asarray(before.column("embedding").combine_chunks().flatten()),
                                  np.asarray(after.column("embedding").combine_chunks().flatten()))
    files = list((storage.root / "embeddings" / "fomo" / "vectors").rglob("*"))
    assert sorted(f.name for f in files if f.is_file()) == sorted(f"{t}.parquet" for t in TILE_KEYS for _ in MONTHS)
    # one grid version per partition, one composite version per partition, nothing left in staging
    for tile in TILE_KEYS:
        for month in MONTHS:
            assert len(list(storage.grid_versions_dir("fomo", tile, month).iterdir())) == 1
            assert len(list(storage.composite_versions_dir("s2", tile, month).iterdir())) == 1
    assert not any(storage.staging_dir.iterdir())
    with connect_readonly(storage.catalog_path) as con:
        assert con.execute("SELECT count(*), count(DISTINCT (chip_id, month)) FROM vectors").fetchone() == (72, 72)


def test_missing_checkpoint_without_random_init_is_a_clear_error(env):
    instance, assets, resources, storage = env
    resources = {**resources, "checkpoint_policy": CheckpointPolicyResource(allow_random_init=False)}
    with pytest.raises(CheckpointError, match="RS_EMBED_FOMO_CKPT"):
        dg.materialize(assets, selection=[CKPT], instance=instance, resources=resources)
    assert not storage.checkpoint_record("fomo").exists()


def test_wrong_checkpoint_file_is_refused_at_the_checkpoint_asset(env, tmp_path, monkeypatch):
    import torch

    instance, assets, resources, storage = env
    bad = tmp_path / "other_model.pt"
    torch.save({"encoder.weight": torch.zeros(3)}, bad)
    monkeypatch.setenv("RS_EMBED_FOMO_CKPT", str(bad))
    with pytest.raises(CheckpointError, match="missing keys"):
        dg.materialize(assets, selection=[CKPT], instance=instance, resources=resources)
    good = tmp_path / "fomo.pt"
    from adapters.fomo import FomoAdapter

    FomoAdapter.write_random_checkpoint(good)
    (tmp_path / "cut.pt").write_bytes(good.read_bytes()[:1000])
    monkeypatch.setenv("RS_EMBED_FOMO_CKPT", str(tmp_path / "cut.pt"))
    with pytest.raises(CheckpointError, match="truncated"):
        dg.materialize(assets, selection=[CKPT], instance=instance, resources=resources)


def test_embeddings_before_composites_name_the_missing_partition(env):
    instance, assets, resources, storage = env
    assert dg.materialize(assets, selection=[CKPT], instance=instance, resources=resources).success
    with pytest.raises(MissingUpstreamError, match="materialise s2_composite"):
        dg.materialize(assets, selection=[FOMO], instance=instance, resources=resources,
                       partition_key=str(make_key(TILE_KEYS[0], MONTHS[0])))


def test_unknown_tile_partition_is_refused(env):
    instance, assets, resources, storage = env
    instance.add_dynamic_partitions(TILES.name, ["nonsense"])
    with pytest.raises(Exception, match="unknown tile key 'nonsense'"):
        dg.materialize(assets, selection=[S2], instance=instance, resources=resources,
                       partition_key=str(make_key("nonsense", "2024-06")))
    assert not (storage.root / "composites" / "s2" / "nonsense").exists()


def test_temporal_frames_use_nearest_available_month(tmp_path):
    st = Storage(tmp_path)
    for m, status in [("2024-01", "ok"), ("2024-04", "ok"), ("2024-05", "empty"), ("2024-08", "ok")]:
        st.write_json(st.composite_record_path("s2", "T", m), {"status": status, "valid_fraction": 0.0 if status == "empty" else 0.9})
    window, used = agrifm_frame_months(st, "s2", "T", "2024-08", 8)
    assert window == ["2024-01", "2024-02", "2024-03", "2024-04", "2024-05", "2024-06", "2024-07", "2024-08"]
    # 02 → 01 (nearer than 04); 03 → 04; 05 (empty) → 04; 06 → tie 04/08 → later; 07 → 08
    assert used == ["2024-01", "2024-01", "2024-04", "2024-04", "2024-04", "2024-08", "2024-08", "2024-08"]
    with pytest.raises(MissingUpstreamError, match="no s2_composite of T is materialised"):
        agrifm_frame_months(st, "s2", "T", "2023-06", 8)
    # only empty months in the window: an empty outcome from the latest one, not an error
    st.write_json(st.composite_record_path("s2", "T", "2025-06"), {"status": "empty", "valid_fraction": 0.0})
    assert agrifm_frame_months(st, "s2", "T", "2025-07", 8)[1] == ["2025-06"] * 8


def test_aoi_sensor_adds_tiles_once(tmp_path, monkeypatch):
    aoi = tmp_path / "aoi.geojson"
    aoi.write_text(json.dumps({"type": "Feature", "properties": {"subtile_k": 36}, "geometry": {
        "type": "Polygon", "coordinates": [[[5.041, 52.638], [5.087, 52.638], [5.087, 52.646], [5.041, 52.646],
                                            [5.041, 52.638]]]}}))
    monkeypatch.setenv("RS_EMBED_ASSETS_AOI_FILE", str(aoi))
    with dg.instance_for_test() as instance:
        ctx = dg.build_sensor_context(instance=instance)
        result = aoi_tiles_sensor(ctx)
        assert result.dynamic_partitions_requests[0].partition_keys == TILE_KEYS
        instance.add_dynamic_partitions(TILES.name, TILE_KEYS)
        again = aoi_tiles_sensor(dg.build_sensor_context(instance=instance, cursor=ctx.cursor))
        assert isinstance(again, dg.SkipReason)


def test_every_model_materialises_through_the_graph(tmp_path, small_fomo, monkeypatch):
    """All six embedding assets (five models, TerraFM on S2 and S1) on one 549 px sub-tile.

    AgriFM reads the 8 months M-7 … M; two of them are left unmaterialised to exercise the
    nearest-available-month rule, which the manifest must record.
    """
    import adapters
    from rs_embed_assets.composite import shift_month
    from rs_embed_assets.definitions import defs

    for m in adapters.list_models():
        prefix = adapters.get_spec(m).checkpoint.env_prefix
        monkeypatch.setenv(f"{prefix}_AUTO_DOWNLOAD", "0")
        monkeypatch.delenv(f"{prefix}_CKPT", raising=False)
    tile, month = "31UFU-k20-r11-c07", "2024-09"
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(TILES.name, [tile])
    storage = Storage(tmp_path / "data")
    resources = {**defs.resources, "storage": StorageResource(root=str(storage.root)),
                 "provider": ProviderResource(kind="sample"),
                 "checkpoint_policy": CheckpointPolicyResource(allow_random_init=True)}
    assets = list(defs.assets)
    ckpts = [a.key for a in assets if a.key.path[0] == "checkpoint"]
    assert len(ckpts) == 5  # terrafm_b and terrafm_b_s1 share one checkpoint
    assert dg.materialize(assets, selection=ckpts, instance=instance, resources=resources).success
    history = [shift_month(month, -k) for k in range(7, -1, -1)]
    for m in history:
        if m in ("2024-04", "2024-05"):
            continue
        assert dg.materialize(assets, selection=[S2, S1], instance=instance, resources=resources,
                              partition_key=str(make_key(tile, m))).success
    models = adapters.list_models()
    res = dg.materialize(assets, selection=[dg.AssetKey(["embeddings", m]) for m in models], instance=instance,
                         resources=resources, partition_key=str(make_key(tile, month)))
    assert res.success
    # the sub-tile owns 8 × 8 FoMo chips, 3 × 2 chips of 224 px and one 512 px chip of the 31UFU lattice
    expected = {"fomo": (64, (768, 32, 32)), "terrafm_b": (6, (768, 42, 28)), "terrafm_b_s1": (6, (768, 42, 28)),
                "scalemae_rgb": (6, (1024, 42, 28)), "agrifm": (6, (1024, 42, 28)), "dynamicvis": (1, (768, 16, 16))}
    for m in models:
        man = storage.read_manifest(m, tile, month)
        assert (man["rows"], tuple(man["grid_shape"])) == expected[m], m
    agri = storage.read_manifest("agrifm", tile, month)
    assert agri["window_months"] == history
    assert agri["frame_months"] == ["2024-02", "2024-03", "2024-03", "2024-06", "2024-06", "2024-07", "2024-08", "2024-09"]
    assert agri["distinct_frames"] == 6
    assert all(c.passed for c in res.get_asset_check_evaluations())


def test_empty_composite_is_a_recorded_outcome_not_a_crash(env, tmp_path):
    """A month without imagery (here: the local provider finds no file) gives status=empty composites and
    zero-row embeddings, and the backfill goes on."""
    instance, assets, resources, storage = env
    resources = {**resources, "provider": ProviderResource(kind="local", options={"root": str(tmp_path / "none")})}
    assert dg.materialize(assets, selection=[CKPT], instance=instance, resources=resources).success
    key = str(make_key(TILE_KEYS[0], MONTHS[0]))
    res = dg.materialize(assets, selection=[S2, FOMO], instance=instance, resources=resources, partition_key=key)
    assert res.success
    comp = storage.composite_record("s2", TILE_KEYS[0], MONTHS[0])
    assert comp["status"] == "empty" and "no file at" in json.dumps(comp["provider_info"])
    assert pq.read_table(storage.vectors_path("fomo", TILE_KEYS[0], MONTHS[0])).num_rows == 0
    mat = [e for e in res.get_asset_materialization_events() if e.asset_key == S2][0].materialization
    assert mat.metadata["status"].value == "empty"


def test_random_init_weights_follow_the_architecture_knobs(tmp_path, monkeypatch, small_fomo):
    """Demo weights for one config are never reused for another (they would not load strictly)."""
    from rs_embed_assets.materialize import materialize_checkpoint

    storage = Storage(tmp_path)
    a = materialize_checkpoint(storage, "fomo", allow_random_init=True, warn=lambda m: None)
    monkeypatch.setenv("RS_EMBED_FOMO_DEPTH", "3")
    b = materialize_checkpoint(storage, "fomo", allow_random_init=True, warn=lambda m: None)
    assert a["path"] != b["path"] and a["sha256"] != b["sha256"]
    monkeypatch.setenv("RS_EMBED_FOMO_DEPTH", "2")
    assert materialize_checkpoint(storage, "fomo", allow_random_init=True, warn=lambda m: None)["sha256"] == a["sha256"]


def test_catalog_builds_before_any_embeddings_exist(tmp_path):
    from rs_embed_assets.catalog import build_catalog

    summary = build_catalog(Storage(tmp_path / "empty"))
    assert summary["rows_per_model"] and set(summary["rows_per_model"].values()) == {0}  # every view, empty
    with connect_readonly(summary["path"]) as con:
        with pytest.raises(duckdb.InvalidInputException, match="unknown chip 'x'"):
            con.execute("SELECT * FROM similar_chips('fomo', 'x', '2024-01-01', 5)").fetchall()
        assert con.execute("SELECT count(*) FROM manifest").fetchone()[0] == 0
