"""The command line: one month format, months outside the partitions refused, `tiles remove`, and
commands that start without importing Dagster, torch or DuckDB (reported: 7–12 s to start)."""

import json
import subprocess
import sys

import dagster as dg
import pytest

from rs_embed_assets.cli import main, parse_months


def test_months_accept_both_spellings_and_come_out_sorted():
    assert parse_months("2024-07-01,2024-06") == ("2024-06", "2024-07")
    assert parse_months("2024-06,2024-06-01") == ("2024-06",)


@pytest.mark.parametrize("months, fragment", [
    ("2031-01", "not a partition yet"),       # the future
    ("2023-12", "before the first month partition 2024-01"),  # before RS_EMBED_ASSETS_START_MONTH
    ("2024-13", "malformed month"),
    ("June", "malformed month"),
    (",", "at least one month"),
])
def test_demo_refuses_months_that_are_not_partitions_before_doing_anything(tmp_path, monkeypatch, capsys,
                                                                           months, fragment):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    assert main(["demo", "--data-root", str(tmp_path / "data"), "--months", months]) == 2
    assert fragment in capsys.readouterr().err
    assert not (tmp_path / "data").exists(), "nothing is written for a refused month"


def test_tiles_remove_deletes_partitions_and_says_what_happens_to_data(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    assert main(["tiles", "add", "31UFU", "31UFV", "31UGU"]) == 0
    capsys.readouterr()
    assert main(["tiles", "remove", "31UFV", "31UGU"]) == 0
    out = capsys.readouterr().out
    assert "removed 2 tile partition(s): 31UFV, 31UGU" in out and "files" in out and "kept" in out
    assert main(["tiles", "list"]) == 0
    assert capsys.readouterr().out.split() == ["31UFU"]
    with dg.DagsterInstance.get() as instance:  # the Dagster API agrees with the fast listing
        assert instance.get_dynamic_partitions("tiles") == ["31UFU"]


def test_tiles_remove_refuses_unknown_keys_and_removes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    assert main(["tiles", "add", "31UFU"]) == 0
    assert main(["tiles", "remove", "31UFU", "not-a-tile"]) == 2
    err = capsys.readouterr().err
    assert "not tile partitions: not-a-tile (nothing removed)" in err
    assert main(["tiles", "remove"]) == 2
    capsys.readouterr()
    assert main(["tiles", "list"]) == 0
    assert capsys.readouterr().out.split() == ["31UFU"]


def test_tiles_list_on_a_fresh_home_is_empty(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "fresh"))
    assert main(["tiles", "list"]) == 0
    assert capsys.readouterr().out.strip() == ""


def test_tiles_list_asks_dagster_when_the_instance_is_not_the_default_sqlite(tmp_path, monkeypatch, capsys):
    home = tmp_path / "home"
    home.mkdir()
    storage = home / "st"
    (home / "dagster.yaml").write_text(
        "storage:\n  sqlite:\n    base_dir: " + str(storage) + "\ntelemetry:\n  enabled: false\n")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    assert main(["tiles", "add", "31UFU"]) == 0
    capsys.readouterr()
    assert main(["tiles", "list"]) == 0
    assert capsys.readouterr().out.split() == ["31UFU"]


HEAVY = ("dagster", "torch", "duckdb")


def _heavy_loaded(code: str, home) -> list[str]:
    code += ("\nimport sys, json\n"
             "print(json.dumps(sorted(m for m in %r if m in sys.modules)), file=sys.stderr)" % (HEAVY,))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={"DAGSTER_HOME": str(home), "PATH": "/usr/bin:/bin"})
    return json.loads(res.stderr.strip().splitlines()[-1])


@pytest.mark.parametrize("argv", [["tiles", "list"], ["similar", "--help"], ["models"], ["tiles", "--help"]])
def test_light_commands_import_no_heavy_library(tmp_path, argv):
    """What makes `tiles list`, `models` and `similar --help` start in well under 2 s (README)."""
    loaded = _heavy_loaded("from rs_embed_assets.cli import main\ntry:\n    main(%r)\nexcept SystemExit:\n    pass"
                           % (argv,), tmp_path / "home")
    # `models` prints the adapters' specs: it may load only what reading the specs loads
    allowed = _heavy_loaded("import adapters\nfor m in adapters.list_models(): adapters.get_spec(m)",
                            tmp_path / "home") if argv == ["models"] else []
    assert set(loaded) <= set(allowed), f"{' '.join(argv)} imported {loaded}"
