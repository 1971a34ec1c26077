"""Stage models: the parts of a model one device builds (see ``edgepool.models``)."""

from __future__ import annotations

import torch
from torch import nn

from edgepool.models.config import ModelConfig
from edgepool.models.layers import Block, Embedding, Head, init_weights

def _seeded(seed: int, part: int, build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 100003 + part)
        module = build()
        init_weights(module)
    return module


class Blocks(nn.ModuleDict):
    """A stage's blocks, run in order. A module of its own so that a mode can wrap the
    blocks as one unit (``modes.fsdp`` makes it the FSDP root the forward goes through)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.values():
            x = block(x)
        return x


class StageModel(nn.Module):
    """The parts of a model one device holds: optional embed, a block range, optional head."""

    def __init__(self, cfg: ModelConfig, layers: tuple[int, int], *, embed: bool, head: bool, seed: int = 0):
        super().__init__()
        self.cfg, self.layers = cfg, tuple(layers)
        self.embed = _seeded(seed, 0, lambda: Embedding(cfg)) if embed else None
        self.blocks = Blocks(
            {str(i): _seeded(seed, 1 + i, lambda: Block(cfg)) for i in range(*layers)}
        )
        self.head = _seeded(seed, 1 + cfg.num_layers, lambda: Head(cfg)) if head else None

    def run_blocks(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Full forward (needs embed and head): token ids -> logits."""
        assert self.embed is not None and self.head is not None
        return self.head(self.run_blocks(self.embed(ids)))


def build_model(cfg: ModelConfig, seed: int = 0) -> StageModel:
    """The whole model on one device."""
    return StageModel(cfg, (0, cfg.num_layers), embed=True, head=True, seed=seed)

