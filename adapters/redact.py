"""Credentials never leave the process: one place that strips them from URLs and free text.

A checkpoint or imagery URL may carry secrets in three places: the userinfo
(``https://user:password@host/...``), the query (``?token=...``, signed-URL keys) and the
fragment. ``redact_url`` keeps scheme, host, port and path (what a reader needs to recognise the
source) and replaces each secret with ``***``; ``redact_text`` does the same to every URL found
in a message, so error texts and logs built from third-party exceptions are safe too.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

MASK = "***"

# scheme://anything-up-to-whitespace-or-quote; good enough for URLs embedded in messages
_URL_IN_TEXT = re.compile(r"""[A-Za-z][A-Za-z0-9+.\-]*://[^\s'"<>`]+""")
# key=value pairs whose key names a secret, outside URLs too ("token=abc" in an exception text)
_SECRET_KV = re.compile(r"(?i)\b((?:access_?)?token|api_?key|apikey|key|secret|password|passwd|pwd|sig|signature|"
                        r"auth|authorization|credential|credentials|rlkey|x-amz-[a-z-]+)=([^&\s'\"#]+)")


def redact_url(url: str) -> str:
    """``url`` without userinfo secrets, query values or fragment (``***`` in their place)."""
    try:
        parts = urlsplit(str(url))
    except ValueError:
        return _SECRET_KV.sub(lambda m: f"{m.group(1)}={MASK}", str(url))
    if not parts.scheme or not parts.netloc:
        return _SECRET_KV.sub(lambda m: f"{m.group(1)}={MASK}", str(url))
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{MASK}@{netloc.rsplit('@', 1)[1]}"
    query = "&".join(f"{kv.split('=', 1)[0]}={MASK}" if "=" in kv else MASK
                     for kv in parts.query.split("&") if kv) if parts.query else ""
    fragment = MASK if parts.fragment else ""
    return urlunsplit((parts.scheme, netloc, parts.path, query, fragment))


def redact_text(text: str) -> str:
    """``text`` with every URL in it redacted and ``secret=value`` pairs masked."""
    text = _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), str(text))
    return _SECRET_KV.sub(lambda m: f"{m.group(1)}={MASK}", text)


def split_credentials(url: str) -> tuple[str, tuple[str, str] | None]:
    """(url without userinfo, (user, password) or None): credentials go in a header, never in logs."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url, None
    host = parts.netloc.rsplit("@", 1)[1]
    from urllib.parse import unquote

    return (urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment)),
            (unquote(parts.username or ""), unquote(parts.password or "")))
