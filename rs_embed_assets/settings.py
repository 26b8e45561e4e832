"""Deployment-wide settings read from the environment (documented in the README)."""

from __future__ import annotations

import os

import adapters


def enabled_models() -> list[str]:
    """Models this deployment carries: RS_EMBED_ASSETS_MODELS (comma-separated) or all registered."""
    raw = os.environ.get("RS_EMBED_ASSETS_MODELS", "").strip()
    known = adapters.list_models()
    if not raw:
        return known
    chosen = [m.strip() for m in raw.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in known]
    if unknown:
        raise ValueError(f"RS_EMBED_ASSETS_MODELS names unknown models {unknown}; known: {', '.join(known)}")
    return chosen


def checkpoint_ids() -> dict[str, str]:
    """checkpoint id → the first model id that loads it (terrafm_b and terrafm_b_s1 share one)."""
    out: dict[str, str] = {}
    for model_id in enabled_models():
        out.setdefault(adapters.get_spec(model_id).checkpoint_id, model_id)
    return out


def start_month() -> str:
    """RS_EMBED_ASSETS_START_MONTH (YYYY-MM, default 2024-01): the first monthly partition."""
    from .composite import CompositeError, parse_month

    raw = os.environ.get("RS_EMBED_ASSETS_START_MONTH", "").strip() or "2024-01"
    try:
        return parse_month(raw)
    except CompositeError:
        raise CompositeError(f"RS_EMBED_ASSETS_START_MONTH={raw!r} is not a month; set it to YYYY-MM (e.g. 2024-01) "
                             "or unset it for the default 2024-01") from None
