"""Fault injection for crash-safety tests: ``RS_EMBED_ASSETS_FAULT=<step>`` kills the writer there.

Write paths call ``fault_point("<step>")`` between their steps (``composite``, ``grid``, ``vectors``,
``manifest``, ``catalog``, ``checkpoint``, with ``:before``/``:after`` suffixes where a step has
two sides). Unset (always, outside tests), a call is one dictionary lookup. Set to a step name, the
process sends itself SIGKILL when it reaches that point: no ``finally`` block, no atexit handler,
no flush — exactly what an OOM kill or a lost node does. ``RS_EMBED_ASSETS_FAULT_SKIP=<n>`` lets the
first n hits pass (kill on the second partition of a range run, say). ``RS_EMBED_ASSETS_FAULT_MODE=enospc``
raises "No space left on device" there instead of killing: a failure the process survives and reports.
"""

from __future__ import annotations

import errno
import os
import signal

ENV = "RS_EMBED_ASSETS_FAULT"
SKIP_ENV = "RS_EMBED_ASSETS_FAULT_SKIP"
MODE_ENV = "RS_EMBED_ASSETS_FAULT_MODE"
_hits: dict[str, int] = {}


def reset() -> None:
    """Forget the hits counted for ``RS_EMBED_ASSETS_FAULT_SKIP`` (between in-process runs of a test)."""
    _hits.clear()


def fault_point(name: str) -> None:
    """Die here (SIGKILL) when ``RS_EMBED_ASSETS_FAULT`` names this point; otherwise do nothing."""
    wanted = os.environ.get(ENV)
    if not wanted or wanted != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] <= int(os.environ.get(SKIP_ENV, "0") or 0):
        return
    if os.environ.get(MODE_ENV, "kill") == "enospc":
        raise OSError(errno.ENOSPC, f"No space left on device (injected at {name})")
    os.kill(os.getpid(), signal.SIGKILL)
