"""Shared fixtures: reference implementations for parity tests, deterministic seeds."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
RS_EMBED_REF = Path(os.environ.get("RS_EMBED_REFERENCE_DIR", REPO / ".cache/reference/rs_embed-0.3.1"))


def load_rs_embed_vendor(name: str) -> ModuleType:
    """Import one file of the rs-embed 0.3.1 wheel's ``embedders/_vendor`` (unpacked by scripts/setup.sh).

    The wheel needs Python >= 3.12 to install, so its vendored reference networks are imported
    straight from the unpacked files. Missing files fail loudly: parity tests must not skip.
    """
    path = RS_EMBED_REF / "rs_embed" / "embedders" / "_vendor" / f"{name}.py"
    if not path.is_file():
        raise FileNotFoundError(f"reference file {path} is missing; run scripts/setup.sh (it downloads and "
                                "unpacks the rs-embed 0.3.1 wheel) or set RS_EMBED_REFERENCE_DIR")
    mod_name = f"_rs_embed_ref_{name}"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    spec = importlib.util.spec_from_file_location(mod_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    spec.loader.exec_module(module)
    return module


def assert_close(ours: torch.Tensor, ref: torch.Tensor, *, rtol: float = 1e-5) -> float:
    """Parity check scaled to the reference's magnitude; returns the max abs difference."""
    diff = (ours - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert diff <= rtol * max(scale, 1.0), f"max abs diff {diff:.3g} (reference magnitude {scale:.3g})"
    return diff


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    np.random.seed(0)
    yield
