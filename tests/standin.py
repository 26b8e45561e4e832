"""A stand-in adapter with a tiny network, for tests of the tile engine at any chip size.

It is a real ``adapters.base.Adapter`` (preprocess → forward → pooled + grid), only small: a strided
convolution whose output cells are the model's grid, so engine tests stay fast at every chip size.
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
