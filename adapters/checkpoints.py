"""Finding published checkpoints: local path -> cache -> download (URL or Hugging Face hub).

The knobs follow rs-embed's names, per model prefix (e.g. ``RS_EMBED_FOMO``):

- ``<P>_CKPT``            a local file; used as is, never copied
- ``<P>_CACHE_DIR``       cache directory (default ``~/.cache/rs_embed/<model>``)
- ``<P>_CKPT_FILE``       file name inside the cache
- ``<P>_CKPT_URL``        download URL (URL sources)
- ``<P>_AUTO_DOWNLOAD``   1/0, allow downloading when the cache misses (default 1)
- ``<P>_CKPT_MIN_BYTES``  a file smaller than this is treated as truncated

Hugging Face sources honour ``HF_HOME`` / ``HUGGINGFACE_HUB_CACHE`` through huggingface_hub and
look in the local hub cache before asking the network.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .specs import CheckpointError, CheckpointSource, env_bool, env_int, env_str
from .redact import redact_text, redact_url, split_credentials

if TYPE_CHECKING:  # resolving, hashing and verifying checkpoints needs no torch; writing weights does
    from torch import nn


@dataclass(frozen=True)
class ResolvedCheckpoint:
    path: Path
    origin: str  # "local" | "cache" | "download" | "hf_cache" | "hf_download"
    uri: str  # where it came from (path, URL or hf://repo/file); never contains credentials


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class CheckpointChangedError(CheckpointError):
    """The file on disk is not the one that was recorded (overwritten, truncated or replaced)."""

    def __init__(self, message: str, *, path: Path, recorded_sha256: str, observed_sha256: str | None):
        super().__init__(message)
        self.path, self.recorded_sha256, self.observed_sha256 = path, recorded_sha256, observed_sha256


def verify_sha256(path: str | Path, recorded_sha256: str, *, what: str, fix: str) -> str:
    """Hash ``path`` and refuse it unless it is the recorded file; returns the sha256."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointChangedError(f"{what}: the recorded file {path} is gone; {fix}", path=path,
                                     recorded_sha256=recorded_sha256, observed_sha256=None)
    observed = sha256_file(path)
    if observed != recorded_sha256:
        raise CheckpointChangedError(
            f"{what}: {path} changed after it was recorded (recorded sha256 {recorded_sha256[:12]}…, the file now "
            f"has {observed[:12]}…); embeddings made from it would carry the wrong provenance, so it is refused. "
            f"{fix}", path=path, recorded_sha256=recorded_sha256, observed_sha256=observed)
    return observed


def default_cache_dir(model_key: str) -> Path:
    return Path(os.path.expanduser("~/.cache/rs_embed")) / model_key


STALE_PART_S = 600.0  # a .part file untouched this long belongs to a killed write, not a running one


def remove_stale_parts(dst: Path, older_than_s: float = STALE_PART_S) -> list[Path]:
    """Remove ``.<name>.*.part`` siblings of ``dst`` left by killed downloads/writes of the same file."""
    import time

    removed = []
    now = time.time()
    for p in Path(dst).parent.glob(f".{Path(dst).name}.*.part"):
        try:
            if now - p.stat().st_mtime >= older_than_s:
                p.unlink()
                removed.append(p)
        except FileNotFoundError:
            pass
    return removed


def download_url(url: str, dst: Path, *, min_bytes: int = 0, timeout: float = 180.0) -> Path:
    """Download to a temporary file beside ``dst``, check its size, then rename into place."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_parts(dst)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".part", dir=dst.parent)
    tmp = Path(tmp_name)
    plain_url, credentials = split_credentials(url)  # user:password@ travels as a header, not in the URL
    request = urllib.request.Request(plain_url)
    if credentials is not None:
        token = base64.b64encode(f"{credentials[0]}:{credentials[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with os.fdopen(fd, "wb") as out:
            failure = None
            try:
                with urllib.request.urlopen(request, timeout=timeout) as resp:
                    shutil.copyfileobj(resp, out, length=1 << 20)
            except (urllib.error.URLError, TimeoutError, OSError, ValueError) as exc:
                failure = redact_text(f"{type(exc).__name__}: {exc}")
            if failure is not None:  # raised outside the handler: the cause (which may hold the URL) is not chained
                raise CheckpointError(
                    f"downloading {redact_url(url)} failed ({failure}); check the network, or download the file by "
                    f"hand and point the *_CKPT variable at it")
        size = tmp.stat().st_size
        if size < min_bytes:
            raise CheckpointError(
                f"download of {redact_url(url)} gave {size} bytes, fewer than the expected minimum {min_bytes}; "
                "the file is truncated or the URL returned an error page — retry, or download it by hand"
            )
        os.replace(tmp, dst)
        return dst
    finally:
        if tmp.exists():
            tmp.unlink()


def resolve_checkpoint(source: CheckpointSource, *, model_key: str, local_path: str | None = None,
                       allow_download: bool | None = None) -> ResolvedCheckpoint:
    """Find the checkpoint file for a model, downloading it only when allowed."""
    p = source.env_prefix
    local = local_path or env_str(f"{p}_CKPT", "")
    if local:
        path = Path(local).expanduser()
        if not path.is_file():
            raise CheckpointError(f"{p}_CKPT points to {path}, which is not a file; fix the path or unset "
                                  f"{p}_CKPT to use the cache/download")
        return ResolvedCheckpoint(path.resolve(), "local", str(path.resolve()))

    min_bytes = env_int(f"{p}_CKPT_MIN_BYTES", source.min_bytes)
    allow = env_bool(f"{p}_AUTO_DOWNLOAD", True) if allow_download is None else allow_download

    if source.hf_repo:
        return _resolve_hf(source, allow=allow, min_bytes=min_bytes)

    cache_dir = Path(env_str(f"{p}_CACHE_DIR", str(default_cache_dir(model_key)))).expanduser()
    filename = env_str(f"{p}_CKPT_FILE", source.filename)
    cached = cache_dir / filename
    if cached.is_file() and cached.stat().st_size >= min_bytes:
        return ResolvedCheckpoint(cached.resolve(), "cache", str(cached.resolve()))
    url = env_str(f"{p}_CKPT_URL", source.url or "")
    if not url:
        raise CheckpointError(f"no checkpoint for {model_key}: set {p}_CKPT to a local file")
    if not allow:
        raise CheckpointError(
            f"checkpoint for {model_key} is not in the cache ({cached}) and {p}_AUTO_DOWNLOAD=0; "
            f"set {p}_CKPT to a local copy of {source.filename} or allow the download"
        )
    download_url(url, cached, min_bytes=min_bytes)
    return ResolvedCheckpoint(cached.resolve(), "download", redact_url(url))


def _resolve_hf(source: CheckpointSource, *, allow: bool, min_bytes: int) -> ResolvedCheckpoint:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    uri = f"hf://{source.hf_repo}/{source.filename}"
    # huggingface_hub reads its cache variables once at import; read them at call time instead
    cache_dir = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE") or (
        str(Path(os.environ["HF_HOME"]) / "hub") if os.environ.get("HF_HOME") else None)
    endpoint = os.environ.get("HF_ENDPOINT") or None  # mirrors / private hubs
    try:
        path = Path(hf_hub_download(source.hf_repo, source.filename, local_files_only=True, cache_dir=cache_dir))
        origin = "hf_cache"
    except LocalEntryNotFoundError:
        if not allow:
            raise CheckpointError(
                f"{uri} is not in the Hugging Face cache and {source.env_prefix}_AUTO_DOWNLOAD=0; set "
                f"{source.env_prefix}_CKPT to a local copy or allow the download"
            ) from None
        failure = None
        try:
            path = Path(hf_hub_download(source.hf_repo, source.filename, cache_dir=cache_dir, endpoint=endpoint))
        except Exception as exc:  # hub raises many HTTP/offline error types
            failure = redact_text(f"{type(exc).__name__}: {exc}")
        if failure is not None:  # not chained: the hub's exception may quote a mirror URL with credentials
            raise CheckpointError(f"downloading {uri} failed ({failure}); check network/HF_TOKEN, or set "
                                  f"{source.env_prefix}_CKPT to a local copy")
        origin = "hf_download"
    if path.stat().st_size < min_bytes:
        raise CheckpointError(f"{uri} in the cache is {path.stat().st_size} bytes (< {min_bytes}); it is "
                              "truncated — delete it from the Hugging Face cache and download again")
    return ResolvedCheckpoint(path, origin, uri)


def randomize_parameters(model: nn.Module, *, seed: int = 0, scale: float = 0.02) -> nn.Module:
    """Deterministically give every parameter and float buffer non-trivial values.

    Used for demos without network access and for parity tests, where every weight must matter
    (a LayerNorm left at ones or a bias left at zero would hide a wrong key mapping).
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in sorted(model.state_dict(keep_vars=True).items()):
            if not torch.is_floating_point(tensor):
                continue
            noise = torch.randn(tensor.shape, generator=gen, dtype=torch.float32) * scale
            if name.endswith("weight") and tensor.ndim == 1:  # norm scales stay near one
                tensor.copy_((1.0 + noise).to(tensor.dtype))
            else:
                tensor.copy_(noise.to(tensor.dtype))
    return model


def save_atomic(obj: object, dst: str | Path) -> Path:
    """``torch.save`` to a temporary file beside ``dst`` and rename it into place."""
    import torch

    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_parts(dst)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".part", dir=dst.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp_name)
        os.replace(tmp_name, dst)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
    return dst
