"""The command line: tiles from an AOI, adding partitions, refusing bad keys, listing models."""

import pytest

from rs_embed_assets.cli import main


def test_tiles_for_aoi_prints_keys(capsys):
    assert main(["tiles", "for-aoi", "--bbox", "5.041,52.638,5.087,52.646", "--k", "36"]) == 0
    assert capsys.readouterr().out.split() == ["31UFU-k36-r21-c12", "31UFU-k36-r21-c13"]


def test_tiles_add_and_list_use_the_instance(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    assert main(["tiles", "add", "--bbox", "5.041,52.638,5.087,52.646", "--k", "36"]) == 0
    assert main(["tiles", "add", "31UFU"]) == 0
    assert main(["tiles", "add", "31UFU"]) == 0  # idempotent
    capsys.readouterr()
    assert main(["tiles", "list"]) == 0
    assert capsys.readouterr().out.split() == ["31UFU-k36-r21-c12", "31UFU-k36-r21-c13", "31UFU"]
    assert (tmp_path / "home" / "dagster.yaml").exists()


@pytest.mark.parametrize("args, fragment", [
    (["tiles", "add", "31UFU-k172-r00-c00"], "out of range"),
    (["tiles", "add", "T31UFU"], "unknown tile key"),
    (["tiles", "for-aoi", "--bbox", "5,53,4,52"], "min < max"),
    (["tiles", "for-aoi", "--bbox", "45.1,120.2,45.3,120.4"], "lat/lon are swapped"),
    (["tiles", "for-aoi", "--bbox", "5,52,6,53", "--geojson", "x.geojson"], "exactly one AOI"),
    (["tiles", "for-aoi", "--file", "no-such.gpkg"], "does not exist"),
    (["tiles", "add", "--file", "no-such.gpkg"], "does not exist"),
])
def test_bad_input_exits_2_with_the_reason(tmp_path, monkeypatch, capsys, args, fragment):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    assert main(args) == 2
    assert fragment in capsys.readouterr().err


def test_models_lists_every_adapter(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for m in ("agrifm", "dynamicvis", "fomo", "scalemae_rgb", "terrafm_b", "terrafm_b_s1"):
        assert m in out


def test_dev_starts_dagster_dev_with_one_planned_event_per_asset_and_run(tmp_path, monkeypatch):
    """The local UI gets the planning setting the backfill benchmark measures (and docs/deployment.md asks for)."""
    import os

    import rs_embed_assets.cli as cli

    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DAGSTER_EMIT_PARTITION_SUBSET_IN_PLANNED_EVENTS", "x")  # restored (unset) after the test
    monkeypatch.delenv("DAGSTER_EMIT_PARTITION_SUBSET_IN_PLANNED_EVENTS")
    launched = []
    monkeypatch.setattr(cli.os, "execvp", lambda exe, argv: launched.append(argv))
    assert main(["dev"]) == 0
    assert launched and launched[0][1:4] == ["-m", "dagster", "dev"]
    assert os.environ["DAGSTER_EMIT_PARTITION_SUBSET_IN_PLANNED_EVENTS"] == "1"
