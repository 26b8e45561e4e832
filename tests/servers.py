"""Helpers for tests that start servers on 127.0.0.1 (the Dagster webserver, the distributed profile)."""

from __future__ import annotations

import signal
import socket


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def reset_signals() -> None:
    """``preexec_fn`` for server processes: the parent may ignore SIGTERM/SIGINT; give them default handlers."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def stop_group(proc, log=None, timeout: float = 30) -> None:
    """Stop a server started with ``start_new_session=True``: SIGTERM its process group, SIGKILL if it lingers."""
    import os
    import subprocess

    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    if log is not None:
        log.close()


def gql(url: str, query: str, variables: dict | None = None) -> dict:
    """POST a GraphQL query to the webserver; fail the test on any GraphQL error."""
    import requests

    r = requests.post(url, json={"query": query, "variables": variables or {}}, timeout=60)
    r.raise_for_status()
    body = r.json()
    assert "errors" not in body, body["errors"]
    return body["data"]
