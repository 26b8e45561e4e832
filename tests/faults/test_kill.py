"""Kill the writer (SIGKILL) at each step of each write path: the data root holds the old state or the
new one, never a mix; nothing committed is lost; after the next write nothing is left behind.

Each case copies a small, fully materialised data root (checkpoint, composite, embeddings, catalog),
runs one write in a child process with ``RS_EMBED_ASSETS_FAULT=<step>`` (the process kills itself
there, like an OOM kill), checks what it left, writes again, and asks ``doctor`` for leftovers.
"""

import hashlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from rs_embed_assets.catalog import connect_readonly
from rs_embed_assets.doctor import diagnose
from rs_embed_assets.storage import Storage
from tests.faults.writer import main as write

REPO = Path(__file__).resolve().parents[2]
TILE, MONTH, MODEL = "31UFU-k36-r21-c12", "2024-06", "fomo"
ENV = {"RS_EMBED_FOMO_DEPTH": "1", "RS_EMBED_FOMO_AUTO_DOWNLOAD": "0", "RS_EMBED_ASSETS_MODELS": MODEL}
CATALOG_HAS_FAULT_POINTS = "catalog:before" in (REPO / "rs_embed_assets" / "catalog.py").read_text()

WRITES = {"composite": ["composite", "s2", TILE, MONTH], "embeddings": ["embeddings", MODEL, TILE, MONTH],
          "checkpoint": ["checkpoint", MODEL], "catalog": ["catalog"]}


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        for k, v in ENV.items():
            mp.setenv(k, v)
        for k in ("RS_EMBED_FOMO_CKPT", "RS_EMBED_FOMO_CKPT_URL", "RS_EMBED_ASSETS_FAULT"):
            mp.delenv(k, raising=False)
        root = tmp_path_factory.mktemp("template") / "data"
        for kind in ("checkpoint", "composite", "embeddings", "catalog"):
            write([str(root), *WRITES[kind]])
        assert diagnose(root) == []
        yield root


@pytest.fixture
def root(template, tmp_path, monkeypatch):
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    dst = tmp_path / "data"
    shutil.copytree(template, dst, symlinks=True)
    # the checkpoint record holds an absolute path (the weights may live outside the root): follow the copy
    rec = Storage(dst).checkpoint_record(MODEL)
    rec.write_text(rec.read_text().replace(str(template), str(dst)))
    return dst


def _digest(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def snapshot(root: Path) -> dict:
    """The commit files of every partition (bytes), and a full verified read of what they point to."""
    st = Storage(root)
    state = {"composite": _digest(st.composite_record_path("s2", TILE, MONTH)),
             "vectors": _digest(st.vectors_path(MODEL, TILE, MONTH)),
             "checkpoint": _digest(st.checkpoint_record(MODEL))}
    if state["composite"]:
        st.open_composite("s2", TILE, MONTH).verify()  # every block against its recorded checksum
    if state["vectors"]:
        manifest = st.read_manifest(MODEL, TILE, MONTH)
        assert manifest["rows"] > 0 and (root / manifest["grid_path"]).is_dir(), "the manifest names its grid"
        st.open_grid(MODEL, TILE, MONTH)["embedding"].load()
    if st.catalog_path.exists():
        with connect_readonly(st.catalog_path) as con:
            state["catalog_rows"] = con.execute("SELECT count(*) FROM vectors").fetchone()[0]
    return state


def kill_at(root: Path, step: str, kind: str) -> None:
    env = {**os.environ, **ENV, "RS_EMBED_ASSETS_FAULT": step}
    out = subprocess.run([sys.executable, "-m", "tests.faults.writer", str(root), *WRITES[kind]], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == -signal.SIGKILL, f"the writer was not killed at {step!r}: rc={out.returncode}\n{out.stderr}"


CASES = [("composite", "composite"), ("composite", "composite_commit"), ("embeddings", "grid"),
         ("embeddings", "vectors"), ("checkpoint", "checkpoint")]
CATALOG_CASES = [("catalog", "catalog:before"), ("catalog", "catalog:after")]


@pytest.mark.parametrize("kind, step", CASES + [pytest.param(*c, marks=pytest.mark.skipif(
    not CATALOG_HAS_FAULT_POINTS, reason="catalog.py has no fault points yet")) for c in CATALOG_CASES])
def test_killed_rewrite_keeps_the_old_state_and_the_next_write_leaves_nothing(root, kind, step):
    before = snapshot(root)
    kill_at(root, step, kind)
    after_kill = snapshot(root)  # every committed file still reads back, verified
    if step != "catalog:after":  # killed before its commit point: the old partition, byte for byte
        assert after_kill == before
    assert not [f for f in diagnose(root) if f.kind == "damaged"]

    write([str(root), *WRITES[kind]])  # the next write of that partition
    assert snapshot(root).keys() == before.keys()
    left = diagnose(root)
    assert left == [], f"left behind after the next write: {[(f.kind, f.path) for f in left]}"


@pytest.mark.parametrize("kind, step, remove", [
    ("composite", "composite_commit", lambda st: (st.composite_record_path("s2", TILE, MONTH).unlink(),
                                                  shutil.rmtree(st.composite_versions_dir("s2", TILE, MONTH)))),
    ("embeddings", "vectors", lambda st: (st.vectors_path(MODEL, TILE, MONTH).unlink(),
                                          shutil.rmtree(st.grid_versions_dir(MODEL, TILE, MONTH)))),
])
def test_killed_first_write_leaves_no_partition_and_the_next_write_commits_it(root, kind, step, remove):
    st = Storage(root)
    remove(st)
    st.catalog_path.unlink()  # a root where this partition was never written has no catalog naming it
    kill_at(root, step, kind)
    assert snapshot(root)[{"composite": "composite", "embeddings": "vectors"}[kind]] is None, "nothing half-visible"
    write([str(root), *WRITES[kind]])
    assert snapshot(root)[{"composite": "composite", "embeddings": "vectors"}[kind]] is not None
    assert diagnose(root) == []


def test_killed_weights_write_leaves_a_part_file_that_the_next_write_removes(root):
    """The issue's 187 MB `.part` of a killed random-init write: gone after the next write of that file."""
    st = Storage(root)
    weights = Path(st.read_json(st.checkpoint_record(MODEL))["path"])
    weights.unlink()
    part = weights.with_name(f".{weights.name}.k1ll3d.part")
    part.write_bytes(b"\0" * 4096)  # what SIGKILL during torch.save leaves
    old = os.path.getmtime(part) - 3600
    os.utime(part, (old, old))
    assert [f.kind for f in diagnose(root, verify=False)] == ["partial_download"]
    write([str(root), *WRITES["checkpoint"]])
    assert weights.is_file() and not part.exists()
    assert diagnose(root) == []
