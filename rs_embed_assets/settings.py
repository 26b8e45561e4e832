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
