"""Adapters for tests: a stand-in with a tiny network, and real models without their network.

``standin_adapter`` is a real ``adapters.base.Adapter`` (preprocess → forward → pooled + grid), only
small: a strided convolution whose output cells are the model's grid, so engine tests stay fast at
every chip size. ``preprocessing_only`` is a registered model's adapter with its configuration and no
network, for tests of what reaches the network.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import nn

from adapters.base import Adapter, CheckpointSource, ModelSpec
from rs_embed_assets.composite import S2_BANDS


@dataclasses.dataclass
class StandInConfig:
    batch_size: int = 0


def standin_adapter(chip: int, *, grid: int = 4, dim: int = 8) -> Adapter:
    spec = ModelSpec(model_id=f"standin{chip}", description="test stand-in", sensor="s2", bands=S2_BANDS,
                     chip_size=chip, image_size=chip, source_resolution_m=10.0, grid_size=grid, embed_dim=dim,
                     checkpoint=CheckpointSource(filename="standin.pt", env_prefix="RS_EMBED_STANDIN"),
                     checkpoint_id=f"standin{chip}")

    class StandIn(Adapter):
        config_cls = StandInConfig

        def preprocess(self, raw, *, bands=None, tile_context=None):
            return torch.from_numpy(np.ascontiguousarray(raw, dtype=np.float32) / 10000.0)

        def forward_embeddings(self, x, *, pooling="mean", **_):
            g = self.model(x.to(self.dtype))
            return (g.mean(dim=(2, 3)) if pooling == "mean" else g.amax(dim=(2, 3))), g

    StandIn.spec = spec
    torch.manual_seed(chip)
    net = nn.Conv2d(len(S2_BANDS), dim, kernel_size=chip // grid, stride=chip // grid)
    return StandIn(net.eval(), StandInConfig())


def preprocessing_only(model_id: str, **config) -> Adapter:
    """The registered adapter of ``model_id`` with its default config (``config`` overrides), without a network."""
    import adapters

    cls = adapters.get_adapter_class(model_id)
    ad = cls.__new__(cls)  # preprocessing needs the config, not the network
    ad.config = dataclasses.replace(cls.default_config(), **config)
    ad.device = torch.device("cpu")
    return ad


def raw_batch(ad: Adapter, batch: int = 3, dtype=np.uint16) -> np.ndarray:
    """A deterministic raw batch in the adapter's layout: DN 0–12,000 (saturated values included), some zeros."""
    spec = ad.spec
    rng = np.random.default_rng(7)
    shape = (batch, *((ad.frames,) if spec.frames > 1 else ()), len(spec.bands), spec.chip_size, spec.chip_size)
    raw = rng.integers(0, 12000, size=shape).astype(dtype)
    raw.reshape(-1)[:: 997] = 0
    return raw
