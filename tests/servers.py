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
