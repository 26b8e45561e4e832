"""Per-partition lineage: in a run over many partitions each partition's materialisation and check
describe that partition only (reported: a 2-partition run showed row_count 32 on a 16-row partition)."""

import base64
import os
from pathlib import Path

import dagster as dg
import pyarrow.parquet as pq
import pytest

from rs_embed_assets.assets.checkpoints import build_checkpoint_asset
from rs_embed_assets.assets.composites import composite_assets
from rs_embed_assets.assets.embeddings import build_embedding_asset
from rs_embed_assets.partitions import TILES, make_key
from rs_embed_assets.resources import CheckpointPolicyResource, ModelResource, ProviderResource, StorageResource
from rs_embed_assets.storage import Storage

TILE_KEYS = ["31UFU-k36-r21-c12", "31UFU-k36-r21-c13"]
MONTHS = ["2024-06", "2024-07"]
FOMO = dg.AssetKey(["embeddings", "fomo"])
S2, S1 = dg.AssetKey("s2_composite"), dg.AssetKey("s1_composite")
PARTITIONS = [str(make_key(t, m)) for t in TILE_KEYS for m in MONTHS]


@pytest.fixture(scope="module")
def range_run(tmp_path_factory):
    """One run materialising 2 tiles × 2 months of s2, s1 and fomo embeddings."""
    mp = pytest.MonkeyPatch()
    mp.setenv("RS_EMBED_FOMO_DEPTH", "2")
    mp.setenv("RS_EMBED_FOMO_AUTO_DOWNLOAD", "0")
    for name in ("RS_EMBED_FOMO_CKPT", "RS_EMBED_FOMO_CKPT_URL"):
        mp.delenv(name, raising=False)
    root = tmp_path_factory.mktemp("lineage") / "data"
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(TILES.name, TILE_KEYS)
    assets = [build_checkpoint_asset("fomo", "fomo"), *composite_assets, build_embedding_asset("fomo")]
    resources = {"storage": StorageResource(root=str(root)), "provider": ProviderResource(kind="sample"),
                 "checkpoint_policy": CheckpointPolicyResource(allow_random_init=True),
                 "model_fomo": ModelResource(model_id="fomo", device="cpu", batch_size=8)}
    assert dg.materialize(assets, selection=[dg.AssetKey(["checkpoint", "fomo"])], instance=instance,
                          resources=resources).success
    tags = {"dagster/asset_partition_range_start": PARTITIONS[0],
            "dagster/asset_partition_range_end": str(make_key(TILE_KEYS[-1], MONTHS[-1]))}
    res = dg.materialize(assets, selection=[S2, S1, FOMO], instance=instance, resources=resources, tags=tags)
    assert res.success
    yield instance, res, Storage(root)
    mp.undo()


def _materialisations(instance, key, pk):
    return instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=key, asset_partitions=[pk]),
                                           limit=10).records


def _event(instance, key, pk):
    return _materialisations(instance, key, pk)[0].asset_materialization


def _meta(instance, key, pk):
    return {k: v.value for k, v in _event(instance, key, pk).metadata.items()}


def test_each_embedding_partition_reports_its_own_rows_versions_and_files(range_run):
    instance, res, storage = range_run
    seen_paths, counts = set(), set()
    for pk in PARTITIONS:
        records = _materialisations(instance, FOMO, pk)
        assert len(records) == 1 and records[0].run_id == res.run_id, f"{pk}: one materialisation per run"
        md = _meta(instance, FOMO, pk)
        tile, month = md["tile"], md["month"]
        assert pk == str(make_key(tile, month))
        rows = pq.read_metadata(md["vectors_path"]).num_rows
        assert md["dagster/row_count"] == rows > 0, f"{pk}: row count of the partition, not of the run"
        comp = _meta(instance, S2, pk)
        assert md["composite_version"] == comp["data_version"], "the partition's own composite version"
        assert tile in md["vectors_path"] and tile in md["grid_path"]
        assert len(md["checkpoint_sha256"]) == 64 and md["embed_seconds"] > 0
        seen_paths.add(md["vectors_path"])
        counts.add(rows)
        assert "partitions" not in md and "composite_versions" not in md, "no run-wide aggregates left"
    assert len(seen_paths) == len(PARTITIONS)
    assert len(counts) > 1, "the two sub-tiles own different numbers of chips: each partition says its own"


def test_composite_versions_differ_per_partition(range_run):
    instance, _, _ = range_run
    versions = {pk: _meta(instance, S2, pk)["data_version"] for pk in PARTITIONS}
    assert len(set(versions.values())) == len(PARTITIONS)
    for pk in PARTITIONS:
        md = _meta(instance, S2, pk)
        assert pk == str(make_key(md["tile"], md["month"])) and md["tile"] in md["path"]
        assert not {"partitions", "per_partition", "mean_valid_fraction"} & set(md), "no run-wide aggregates left"


def test_partition_pages_carry_previews_sample_rows_and_schema(range_run):
    instance, _, _ = range_run
    pk = PARTITIONS[0]
    for key, alt in ((S2, "RGB"), (S1, "VV/VH"), (FOMO, "PCA")):
        md = _meta(instance, key, pk)
        text = md["preview"]
        assert alt in text and text.startswith("![") and "data:image/png;base64," in text
        png = base64.b64decode(text.split("base64,", 1)[1].rstrip(")"))
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(text) < 100_000
        if os.environ.get("RS_EMBED_TEST_ARTIFACTS"):  # look at them: RS_EMBED_TEST_ARTIFACTS=tests/artifacts
            out = Path(os.environ["RS_EMBED_TEST_ARTIFACTS"])
            out.mkdir(parents=True, exist_ok=True)
            (out / f"preview_{key.to_python_identifier()}.png").write_bytes(png)
    md = _meta(instance, FOMO, pk)
    assert md["sample_rows"].startswith("| chip_id |") and "embedding" not in md["sample_rows"]
    cols = {c.name: c.type for c in
            build_embedding_asset("fomo").specs_by_key[FOMO].metadata["dagster/column_schema"].columns}
    assert cols["embedding"] == "FLOAT[768]" and cols["month"] == "DATE"
    # no JSON blob in the per-partition metadata
    for key in (S2, S1, FOMO):
        for name, value in _event(instance, key, pk).metadata.items():
            assert not isinstance(value, dg.JsonMetadataValue), f"{key.to_user_string()}: {name} is a JSON blob"


def test_asset_check_is_evaluated_per_partition_and_points_at_its_materialisation(range_run):
    instance, res, _ = range_run
    evaluations = res.get_asset_check_evaluations()
    by_partition = {ev.partition: ev for ev in evaluations}
    assert set(by_partition) == set(PARTITIONS), "one evaluation per partition, none run-wide"
    for pk, ev in by_partition.items():
        target = _materialisations(instance, FOMO, pk)[0]
        rows = target.asset_materialization.metadata["dagster/row_count"].value
        assert ev.passed and ev.metadata["rows"].value == rows
        assert ev.target_materialization_data.storage_id == target.storage_id
