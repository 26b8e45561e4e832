"""`rs-embed-assets doctor`: reports what killed writes left behind, cleans it, never touches committed data."""

import json
import os
import time

import pytest

from rs_embed_assets.cli import main
from rs_embed_assets.doctor import diagnose


def _touch(path, data=b"x", age_s=3600):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    t = time.time() - age_s
    os.utime(path, (t, t))
    return path


def _store(path, age_s=3600):
    _touch(path / ".zgroup", b"{}", age_s)
    _touch(path / "data" / "0.0.0", b"chunk", age_s)
    return path


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "data"
    comp = r / "composites" / "s2" / "31UFU"
    # a committed partition with one stale version beside the committed one
    _store(comp / "2024-06" / "v2.zarr")
    _store(comp / "2024-06" / "v1.zarr")
    _touch(comp / "2024-06.json", json.dumps({"store": "composites/s2/31UFU/2024-06/v2.zarr"}).encode())
    # a first write killed before its commit record
    _store(comp / "2024-07" / "v9.zarr")
    # a record whose store is gone
    _touch(comp / "2024-08.json", json.dumps({"store": "composites/s2/31UFU/2024-08/v3.zarr"}).encode())
    _touch(r / ".staging" / "0123abcd-2024-06.zarr" / "data" / "0.0.0")
    _touch(r / "checkpoints" / "fomo" / ".random-init-seed0.pt.k2j3.part", b"w" * 1000)
    _touch(r / "embeddings" / "fomo" / "grid" / "31UFU" / ".2024-06.zarr.old-1a2b3c4d" / "x")
    _touch(r / "embeddings" / "fomo" / "vectors" / ".tile.parquet.tmp-9f8e7d6c")
    return r


def _kinds(findings):
    return sorted((f.kind, f.path) for f in findings)


def test_reports_every_kind_of_leftover_and_the_dangling_record(root):
    found = _kinds(diagnose(root, verify=False))
    assert found == sorted([
        ("staging", ".staging/0123abcd-2024-06.zarr"),
        ("unreferenced_version", "composites/s2/31UFU/2024-06/v1.zarr"),
        ("uncommitted", "composites/s2/31UFU/2024-07"),
        ("damaged", "composites/s2/31UFU/2024-08.json"),
        ("partial_download", "checkpoints/fomo/.random-init-seed0.pt.k2j3.part"),
        ("old_layout", "embeddings/fomo/grid/31UFU/.2024-06.zarr.old-1a2b3c4d"),
        ("old_layout", "embeddings/fomo/vectors/.tile.parquet.tmp-9f8e7d6c"),
    ]), found


def test_clean_removes_leftovers_keeps_committed_data_and_reports_damage(root, capsys):
    assert main(["doctor", "--data-root", str(root), "--no-verify"]) == 1
    out = capsys.readouterr().out
    assert "run `rs-embed-assets doctor --clean`" in out and "composites/s2/31UFU/2024-06/v1.zarr" in out

    assert main(["doctor", "--data-root", str(root), "--no-verify", "--clean"]) == 1  # the damage remains
    assert (root / "composites/s2/31UFU/2024-06/v2.zarr/data/0.0.0").exists(), "the committed store is kept"
    assert not (root / "composites/s2/31UFU/2024-06/v1.zarr").exists()
    assert not (root / "composites/s2/31UFU/2024-07").exists()
    assert not any((root / ".staging").iterdir())
    assert _kinds(diagnose(root, verify=False)) == [("damaged", "composites/s2/31UFU/2024-08.json")]
    assert "re-materialise s2_composite 31UFU 2024-08" in capsys.readouterr().out


def test_young_leftovers_may_be_a_live_write_and_are_kept(root, capsys):
    live = _touch(root / ".staging" / "live-write.parquet", age_s=5)
    assert main(["doctor", "--data-root", str(root), "--no-verify", "--clean"]) == 1
    assert live.exists()
    assert "kept: younger than 900 s" in capsys.readouterr().out
    assert main(["doctor", "--data-root", str(root), "--no-verify", "--clean", "--min-age", "0"]) == 1
    assert not live.exists()


def test_clean_root_exits_0_and_missing_root_exits_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["doctor", "--data-root", str(tmp_path / "empty")]) == 0
    assert "nothing left behind" in capsys.readouterr().out
    assert main(["doctor", "--data-root", str(tmp_path / "absent")]) == 2
    assert "does not exist" in capsys.readouterr().out


def test_json_output_lists_findings(root, capsys):
    main(["doctor", "--data-root", str(root), "--no-verify", "--json"])
    rows = json.loads(capsys.readouterr().out)
    assert {r["kind"] for r in rows} >= {"staging", "uncommitted", "damaged"}
    assert all(not r["removed"] for r in rows)


def test_a_checkpoint_changed_on_disk_is_damage(tmp_path):
    from adapters import sha256_file

    root = tmp_path / "data"
    weights = _touch(root / "checkpoints" / "fomo" / "w.pt", b"weights-1")
    _touch(root / "checkpoints" / "fomo.json",
           json.dumps({"path": str(weights), "sha256": sha256_file(weights)}).encode())
    assert diagnose(root) == []
    weights.write_bytes(b"weights-2")
    [f] = diagnose(root)
    assert f.kind == "damaged" and "changed after it was recorded" in f.detail
