"""Checkpoint resolution: local path → cache → URL download (a real HTTP server on 127.0.0.1)."""

import dataclasses
import http.server
import threading
from functools import partial

import pytest

from adapters import CheckpointError, CheckpointSource, resolve_checkpoint, sha256_file

SOURCE = CheckpointSource(filename="weights.pt", url="http://127.0.0.1:1/none", min_bytes=1000,
                          env_prefix="RS_EMBED_TESTMODEL")


@pytest.fixture
def http_dir(tmp_path):
    """Serve a directory over HTTP on a free loopback port; yields (dir, base_url)."""
    served = tmp_path / "served"
    served.mkdir()
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture
def env(monkeypatch, tmp_path):
    for name in ("CKPT", "CACHE_DIR", "CKPT_URL", "AUTO_DOWNLOAD", "CKPT_FILE", "CKPT_MIN_BYTES"):
        monkeypatch.delenv(f"RS_EMBED_TESTMODEL_{name}", raising=False)
    monkeypatch.setenv("RS_EMBED_TESTMODEL_CACHE_DIR", str(tmp_path / "cache"))
    return monkeypatch


def test_local_path_wins(env, tmp_path):
    f = tmp_path / "mine.pt"
    f.write_bytes(b"x" * 10)
    env.setenv("RS_EMBED_TESTMODEL_CKPT", str(f))
    r = resolve_checkpoint(SOURCE, model_key="testmodel")
    assert r.origin == "local" and r.path == f.resolve()


def test_local_path_that_does_not_exist(env, tmp_path):
    env.setenv("RS_EMBED_TESTMODEL_CKPT", str(tmp_path / "missing.pt"))
    with pytest.raises(CheckpointError, match="RS_EMBED_TESTMODEL_CKPT points to"):
        resolve_checkpoint(SOURCE, model_key="testmodel")


def test_download_then_cache_hit(env, http_dir, tmp_path):
    served, base = http_dir
    (served / "weights.pt").write_bytes(b"w" * 5000)
    env.setenv("RS_EMBED_TESTMODEL_CKPT_URL", f"{base}/weights.pt?token=SECRET")
    r = resolve_checkpoint(SOURCE, model_key="testmodel")
    assert r.origin == "download" and r.path.read_bytes() == b"w" * 5000
    assert "SECRET" not in r.uri, "query strings (tokens) must not reach metadata"
    (served / "weights.pt").unlink()  # the second call must not touch the network
    r2 = resolve_checkpoint(SOURCE, model_key="testmodel")
    assert r2.origin == "cache" and sha256_file(r2.path) == sha256_file(r.path)


def test_truncated_download_leaves_nothing_behind(env, http_dir, tmp_path):
    served, base = http_dir
    (served / "weights.pt").write_bytes(b"w" * 10)  # below min_bytes
    env.setenv("RS_EMBED_TESTMODEL_CKPT_URL", f"{base}/weights.pt")
    with pytest.raises(CheckpointError, match="fewer than the expected minimum 1000"):
        resolve_checkpoint(SOURCE, model_key="testmodel")
    assert list((tmp_path / "cache").iterdir()) == []


def test_http_error_and_no_download(env, http_dir):
    _, base = http_dir
    env.setenv("RS_EMBED_TESTMODEL_CKPT_URL", f"{base}/absent.pt")
    with pytest.raises(CheckpointError, match="downloading .* failed"):
        resolve_checkpoint(SOURCE, model_key="testmodel")
    env.setenv("RS_EMBED_TESTMODEL_AUTO_DOWNLOAD", "0")
    with pytest.raises(CheckpointError, match="AUTO_DOWNLOAD=0"):
        resolve_checkpoint(SOURCE, model_key="testmodel")


class _Bookkeeping:
    """Pickled like mmengine's message-hub objects: a class torch's weights-only loader refuses."""

    def __init__(self):
        self.history = [1.0, 2.0]


class _Payload:
    """A hostile pickle: unpickling would run a shell command."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.target}",))


def test_training_checkpoint_loads_weights_without_running_pickled_code(tmp_path, monkeypatch):
    import sys
    import types

    import numpy as np
    import torch

    from adapters.base import read_checkpoint_file

    # pickle a bookkeeping object under mmengine's module name, as a real training checkpoint holds
    fake = types.ModuleType("mmengine_history")
    monkeypatch.setattr(_Bookkeeping, "__module__", "mmengine_history")
    fake._Bookkeeping = _Bookkeeping
    monkeypatch.setitem(sys.modules, "mmengine_history", fake)
    ckpt = {"meta": {"epoch": 170, "arr": np.arange(3)}, "message_hub": {"buf": _Bookkeeping()},
            "state_dict": {"backbone.w": torch.ones(2, 2)}}
    torch.save(ckpt, tmp_path / "mm.pth")
    monkeypatch.delitem(sys.modules, "mmengine_history")  # the reader does not have mmengine installed
    obj = read_checkpoint_file(tmp_path / "mm.pth")
    assert torch.equal(obj["state_dict"]["backbone.w"], torch.ones(2, 2))
    assert obj["message_hub"]["buf"].__dict__.get("history") is None  # an inert stand-in, not the class


def test_checkpoint_with_code_payload_is_refused_and_nothing_runs(tmp_path):
    import torch

    from adapters.base import read_checkpoint_file

    marker = tmp_path / "pwned"
    torch.save({"state_dict": {"w": torch.ones(1)}, "evil": _Payload(marker)}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="refuses to load safely"):
        read_checkpoint_file(tmp_path / "evil.pth")
    assert not marker.exists(), "code pickled in the checkpoint must not run"


HF_SOURCE = CheckpointSource(filename="TerraFM-B.pth", hf_repo="MBZUAI/TerraFM", min_bytes=1000,
                             env_prefix="RS_EMBED_TESTHF")


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """A minimal Hugging Face hub on 127.0.0.1 (the network boundary): HEAD/GET on /<repo>/resolve/<rev>/<file>."""
    import hashlib

    files: dict[str, bytes] = {}

    class Hub(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def _head(self):
            body = files.get(self.path)
            if body is None:
                self.send_response(404)
                self.send_header("X-Error-Code", "EntryNotFound")
                self.end_headers()
                return None
            etag = hashlib.sha256(body).hexdigest()
            self.send_response(200)
            for k, v in {"X-Repo-Commit": "a" * 40, "ETag": f'"{etag}"', "X-Linked-Etag": f'"{etag}"',
                         "Content-Length": str(len(body))}.items():
                self.send_header(k, v)
            self.end_headers()
            return body

        def do_HEAD(self):
            self._head()

        def do_GET(self):
            body = self._head()
            if body is not None:
                self.wfile.write(body)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for name in ("CKPT", "AUTO_DOWNLOAD", "CKPT_MIN_BYTES"):
        monkeypatch.delenv(f"RS_EMBED_TESTHF_{name}", raising=False)
    yield files
    server.shutdown()


def test_hf_download_then_cache_first(fake_hub):
    fake_hub["/MBZUAI/TerraFM/resolve/main/TerraFM-B.pth"] = b"t" * 4000
    r = resolve_checkpoint(HF_SOURCE, model_key="terrafm_b")
    assert r.origin == "hf_download" and r.uri == "hf://MBZUAI/TerraFM/TerraFM-B.pth"
    assert "models--MBZUAI--TerraFM" in str(r.path) and r.path.read_bytes() == b"t" * 4000
    fake_hub.clear()  # the hub forgets the file: the second resolution must come from the cache
    r2 = resolve_checkpoint(HF_SOURCE, model_key="terrafm_b")
    assert r2.origin == "hf_cache" and r2.path == r.path


def test_hf_missing_file_and_truncated_file(fake_hub, monkeypatch):
    with pytest.raises(CheckpointError, match="downloading hf://MBZUAI/TerraFM/TerraFM-B.pth failed"):
        resolve_checkpoint(HF_SOURCE, model_key="terrafm_b")
    fake_hub["/MBZUAI/TerraFM/resolve/main/TerraFM-B.pth"] = b"t" * 10  # below min_bytes
    with pytest.raises(CheckpointError, match="truncated"):
        resolve_checkpoint(HF_SOURCE, model_key="terrafm_b")
    monkeypatch.setenv("RS_EMBED_TESTHF_AUTO_DOWNLOAD", "0")
    with pytest.raises(CheckpointError, match="not in the Hugging Face cache"):
        resolve_checkpoint(dataclasses.replace(HF_SOURCE, filename="other.pth"), model_key="terrafm_b")
