"""The catalog asset: rebuilt by automation while partitions are missing, checks rows against manifests."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest

from catalog_data import ENV, FOMO_ROWS, copy_root, rewrite_vectors, shared_materialisation
from rs_embed_assets.assets.catalog import CATALOG_AUTOMATION, catalog, catalog_current
from rs_embed_assets.assets.checkpoints import build_checkpoint_asset
from rs_embed_assets.assets.composites import composite_assets
from rs_embed_assets.assets.embeddings import build_embedding_asset
from rs_embed_assets.resources import CatalogResource, StorageResource, default_resources

TILES = ["31UFU-k36-r21-c12", "31UFU-k36-r21-c13"]
FOMO = dg.AssetKey(["embeddings", "fomo"])
CATALOG = dg.AssetKey("catalog")


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    return shared_materialisation(tmp_path_factory)


def graph():
    return [build_checkpoint_asset("fomo", "fomo"), *composite_assets, build_embedding_asset("fomo"), catalog]


def test_catalog_is_requested_after_one_embedding_partition_lands_while_others_are_missing():
    assert catalog.automation_conditions_by_key[CATALOG] == CATALOG_AUTOMATION
    defs = dg.Definitions(assets=graph(), asset_checks=[catalog_current], resources=default_resources())
    selection = dg.AssetSelection.keys(CATALOG) | dg.AssetSelection.checks(catalog_current)
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("tiles", TILES)
        first = dg.evaluate_automation_conditions(defs=defs, instance=instance, asset_selection=selection)
        assert first.total_requested == 0
        # one partition of one model is materialised; every other partition of every upstream is missing
        instance.report_runless_asset_event(dg.AssetMaterialization(FOMO, partition=f"2024-06-01|{TILES[0]}"))
        second = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=first.cursor,
                                                   asset_selection=selection)
        assert second.get_num_requested(CATALOG) == 1
        assert second.total_requested == 2  # and the `current` check, which shows a lagging catalog at once
        instance.report_runless_asset_event(dg.AssetMaterialization(CATALOG))
        third = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=second.cursor,
                                                  asset_selection=dg.AssetSelection.keys(CATALOG))
        assert third.get_num_requested(CATALOG) == 0  # handled: nothing new upstream


def _resources(root):
    return {"storage": StorageResource(root=str(root)), "catalog_db": CatalogResource(path="")}


def _check(result, name):
    return next(e for e in result.get_asset_check_evaluations() if e.check_name == name)


def test_rows_check_passes_and_fails_when_a_manifest_disagrees_with_its_rows(made, tmp_path):
    root = copy_root(made, tmp_path / "data")
    res = dg.materialize([catalog], resources=_resources(root))
    check = _check(res, "rows_match_manifests")
    assert check.passed and check.metadata["partitions_checked"].value == 4
    mat = res.get_asset_materialization_events()[0].materialization
    assert mat.metadata["rows_per_model"].value == {"fomo": FOMO_ROWS, "terrafm_b": 0}

    # a vectors file whose footer manifest claims 99 rows (it holds 16 or 20)
    victim = sorted((root / "embeddings/fomo/vectors").glob("*/*.parquet"))[0]
    rewrite_vectors(victim, manifest={"rows": 99})
    check = _check(dg.materialize([catalog], resources=_resources(root), raise_on_error=False), "rows_match_manifests")
    assert not check.passed
    assert check.metadata["mismatched_partitions"].value[0]["manifest_rows"] == 99


def test_current_check_warns_while_the_catalog_is_behind(made, tmp_path):
    root = copy_root(made, tmp_path / "data")
    assets = [catalog, catalog_current]
    assert _check(dg.materialize(assets, resources=_resources(root)), "current").passed
    victim = sorted((root / "embeddings/fomo/vectors").glob("*/*.parquet"))[0]
    rewrite_vectors(victim, rows=4)  # a partition re-materialised after the build
    only_check = dg.AssetSelection.checks(catalog_current)
    stale = _check(dg.materialize(assets, selection=only_check, resources=_resources(root)), "current")
    assert not stale.passed and stale.severity == dg.AssetCheckSeverity.WARN
    assert "stale" in stale.description
