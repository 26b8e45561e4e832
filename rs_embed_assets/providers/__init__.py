"""Imagery providers: ``sample`` (offline, synthetic), ``local`` (your own files), ``gee`` (Earth Engine),
``stac`` (a STAC API of COGs: Earth Search, Planetary Computer)."""

from __future__ import annotations

import importlib
from typing import Any

from .base import Provider, ProviderError

_PROVIDERS = {
    "sample": "rs_embed_assets.providers.sample:SampleProvider",
    "local": "rs_embed_assets.providers.local:LocalProvider",
    "gee": "rs_embed_assets.providers.gee:GEEProvider",
    "stac": "rs_embed_assets.providers.stac:STACProvider",
}


def create_provider(kind: str, **options: Any) -> Provider:
    """Build a provider by name; options are the provider's constructor arguments."""
    try:
        target = _PROVIDERS[kind]
    except KeyError:
        raise ProviderError(f"unknown provider {kind!r}; use one of {', '.join(_PROVIDERS)}") from None
    module, cls = target.split(":")
    return getattr(importlib.import_module(module), cls)(**options)


__all__ = ["Provider", "ProviderError", "create_provider"]
