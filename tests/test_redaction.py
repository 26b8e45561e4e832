"""No secrets anywhere: credentials in URLs never reach logs, metadata, errors or the data root.

The end-to-end tests plant a password (userinfo), a token (query) and a fragment in a checkpoint
URL served by a real HTTP server on 127.0.0.1 that demands Basic auth, materialise through Dagster
on a SQLite instance with compute logs, and grep every byte the run left behind.
"""

import base64
import http.server
import threading
from functools import partial
from pathlib import Path

import dagster as dg
import pytest

from adapters import CheckpointError, CheckpointSource, get_adapter_class, resolve_checkpoint
from adapters.redact import redact_text, redact_url

PASSWORD, TOKEN, FRAGMENT = "pw-PLANTED-s3cr3t", "tok-PLANTED-7781", "frag-PLANTED-99"
SECRETS = (PASSWORD, TOKEN, FRAGMENT)


@pytest.mark.parametrize("url, expected", [
    ("https://user:pw@host:8443/a/w.pt?token=T&x=1#f", "https://***@host:8443/a/w.pt?token=***&x=***#***"),
    ("https://tokenonly@host/w.pt", "https://***@host/w.pt"),
    ("https://host/w.pt", "https://host/w.pt"),
    ("hf://repo/name/file.pt", "hf://repo/name/file.pt"),
    ("/a/local/file.pt", "/a/local/file.pt"),
])
def test_redact_url_keeps_where_and_drops_secrets(url, expected):
    assert redact_url(url) == expected


def test_redact_text_masks_urls_and_secret_pairs_inside_messages():
    msg = "GET https://u:hunter2@h/x?sig=abc failed; retry with api_key=zzz or password=qq"
    out = redact_text(msg)
    for secret in ("hunter2", "abc", "zzz", "qq"):
        assert secret not in out
    assert "https://***@h/x?sig=***" in out


class _BasicAuthHandler(http.server.SimpleHTTPRequestHandler):
    expected = "Basic " + base64.b64encode(f"user:{PASSWORD}".encode()).decode()

    def do_GET(self):  # noqa: N802 (http.server API)
        if self.headers.get("Authorization") != self.expected:
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="weights"')
            self.end_headers()
            return
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture
def auth_server(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(_BasicAuthHandler, directory=str(served)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield served, server.server_address[1]
    server.shutdown()


def _planted_url(port: int, password: str = PASSWORD, name: str = "w.pt") -> str:
    return f"http://user:{password}@127.0.0.1:{port}/{name}?token={TOKEN}#{FRAGMENT}"


def _leaks(*roots: Path) -> list[str]:
    found = []
    for root in roots:
        for f in sorted(p for p in root.rglob("*") if p.is_file()):
            data = f.read_bytes()
            found += [f"{secret} in {f.relative_to(root)}" for secret in SECRETS if secret.encode() in data]
    return found


def _grep(root: Path, needle: bytes) -> bool:
    return any(needle in f.read_bytes() for f in root.rglob("*") if f.is_file())


def test_download_sends_userinfo_as_basic_auth_and_records_no_secret(auth_server, tmp_path, monkeypatch):
    served, port = auth_server
    (served / "w.pt").write_bytes(b"w" * 2000)
    monkeypatch.setenv("RS_EMBED_TESTMODEL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("RS_EMBED_TESTMODEL_CKPT_URL", _planted_url(port))
    src = CheckpointSource(filename="w.pt", url=None, min_bytes=1000, env_prefix="RS_EMBED_TESTMODEL")
    r = resolve_checkpoint(src, model_key="testmodel")
    assert r.path.read_bytes() == b"w" * 2000
    assert not any(s in r.uri for s in SECRETS), r.uri


@pytest.mark.parametrize("password, name, fragment", [
    ("wrong-PLANTED-s3cr3t", "w.pt", "HTTP Error 401"),  # refused credentials
    (PASSWORD, "absent.pt", "HTTP Error 404"),
])
def test_failed_download_error_names_no_secret(auth_server, tmp_path, monkeypatch, password, name, fragment):
    _, port = auth_server
    monkeypatch.setenv("RS_EMBED_TESTMODEL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("RS_EMBED_TESTMODEL_CKPT_URL", _planted_url(port, password, name))
    src = CheckpointSource(filename="w.pt", min_bytes=1000, env_prefix="RS_EMBED_TESTMODEL")
    with pytest.raises(CheckpointError) as info:
        resolve_checkpoint(src, model_key="testmodel")
    text = "".join(__import__("traceback").format_exception(info.value))
    assert fragment in text
    assert not any(s in text for s in (*SECRETS, password)), text


@pytest.fixture
def dagster_home(tmp_path, monkeypatch):
    home = tmp_path / "dagster_home"
    home.mkdir()
    # SQLite run/event storage and compute logs under $DAGSTER_HOME, as a local deployment has them
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    return home


def _checkpoint_run(tmp_path, *, allow_random_init: bool):
    from rs_embed_assets.assets.checkpoints import build_checkpoint_asset
    from rs_embed_assets.resources import CheckpointPolicyResource, StorageResource

    instance = dg.DagsterInstance.get()
    resources = {"storage": StorageResource(root=str(tmp_path / "data")),
                 "checkpoint_policy": CheckpointPolicyResource(allow_random_init=allow_random_init)}
    result = dg.materialize([build_checkpoint_asset("fomo", "fomo")], instance=instance, resources=resources,
                            raise_on_error=False)
    instance.dispose()
    return result


@pytest.fixture
def fomo_url_env(monkeypatch, tmp_path, auth_server):
    served, port = auth_server
    monkeypatch.setenv("RS_EMBED_FOMO_DEPTH", "1")  # a small network, same code path
    for name in ("RS_EMBED_FOMO_CKPT", "RS_EMBED_FOMO_CKPT_FILE", "RS_EMBED_FOMO_AUTO_DOWNLOAD"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RS_EMBED_FOMO_CACHE_DIR", str(tmp_path / "data" / "cache"))
    monkeypatch.setenv("RS_EMBED_FOMO_CKPT_MIN_BYTES", "1000")
    cls = get_adapter_class("fomo")
    cls.write_random_checkpoint(served / cls.spec.checkpoint.filename, seed=3)
    return port, cls.spec.checkpoint.filename


def test_planted_credentials_reach_no_event_log_compute_log_or_data_root(dagster_home, tmp_path, monkeypatch,
                                                                         fomo_url_env):
    port, filename = fomo_url_env
    monkeypatch.setenv("RS_EMBED_FOMO_CKPT_URL", _planted_url(port, name=filename))
    result = _checkpoint_run(tmp_path, allow_random_init=False)
    assert result.success
    assert (tmp_path / "data" / "cache" / filename).is_file()
    assert _grep(dagster_home, f"127.0.0.1:{port}/{filename}".encode()), "the source is recorded (redacted)"
    assert not _leaks(dagster_home, tmp_path / "data")


@pytest.mark.parametrize("allow_random_init", [False, True])
def test_failed_download_leaks_nothing_into_the_run_records(dagster_home, tmp_path, monkeypatch, fomo_url_env,
                                                            allow_random_init):
    port, filename = fomo_url_env
    monkeypatch.setenv("RS_EMBED_FOMO_CKPT_URL", _planted_url(port, password="wrong-" + PASSWORD, name=filename))
    result = _checkpoint_run(tmp_path, allow_random_init=allow_random_init)
    assert result.success is allow_random_init  # refused, or demo weights with the reason in a warning
    assert _grep(dagster_home, b"HTTP Error 401"), "the failure is reported in the event log (without the secret)"
    assert not _leaks(dagster_home, tmp_path / "data")
