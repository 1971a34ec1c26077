"""Stage models: the parts of a model one device builds (see ``edgepool.models``)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from edgepool.models.config import ModelConfig
from edgepool.models.layers import Block, Embedding, Head, init_weights
from edgepool.models.lora import Tuning, is_adapter

def _seeded(seed: int, part: int, build, adapt=None):
    """Build a unit and initialise it from its own seed; ``adapt`` (a ``Tuning``'s
    ``apply``) then adds its adapters from the same RNG stream and marks what trains."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 100003 + part)
        module = build()
        init_weights(module)
        if adapt is not None:
            adapt(module)
    return module


def load_given(module: nn.Module, state: dict[str, torch.Tensor], prefix: str = "") -> None:
    """Load ``module``'s tensors from ``state`` (full-model names, ``prefix`` + the
    module's own). Every tensor must be there but LoRA adapters, which keep their seeded
    start when a state (pretrained weights) has none."""
    current = module.state_dict()
    missing = [prefix + k for k in current if prefix + k not in state and not is_adapter(k)]
    if missing:
        raise KeyError(f"state is missing {len(missing)} tensors, e.g. {missing[:3]}")
    module.load_state_dict({k: state.get(prefix + k, v) for k, v in current.items()})


class Blocks(nn.ModuleDict):
    """A stage's blocks, run in order. A module of its own so that a mode can wrap the
    blocks as one unit (``modes.fsdp`` makes it the FSDP root the forward goes through).

    ``recompute`` (the plan's ``StagePlan.recompute``): each block runs under
    ``torch.utils.checkpoint`` (non-reentrant: the RNG state is restored, so dropout
    draws the same masks), which keeps the block's input only and runs its forward again
    in the backward; the numbers do not change."""

    recompute = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.values():
            if self.recompute and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x


class StageModel(nn.Module):
    """The parts of a model one device holds: optional embed, a block range, optional head.

    Every part (the embed, each block, the head) is one *unit*, built with a seed of its
    own, so a stage's units equal the same units of a single-device model. With
    ``deferred=True`` the units are placeholders on the ``meta`` device (no memory) until
    ``materialize`` builds them one at a time: a mode that shards (fsdp) builds, loads and
    shards each unit before the next, so no device ever holds its whole stage at once.
    """

    def __init__(self, cfg: ModelConfig, layers: tuple[int, int], *, embed: bool, head: bool, seed: int = 0,
                 deferred: bool = False, tuning: Tuning | None = None):
        super().__init__()
        self.cfg, self.layers, self.seed, self.tuning = cfg, tuple(layers), seed, tuning
        self._parts: dict[str, tuple[int, object]] = {}
        if embed:
            self._parts["embed"] = (0, lambda: Embedding(cfg))
        for i in range(*layers):
            self._parts[f"blocks.{i}"] = (1 + i, lambda: Block(cfg))
        if head:
            self._parts["head"] = (1 + cfg.num_layers, lambda: Head(cfg))

        def make(name: str) -> nn.Module:
            part, build = self._parts[name]
            if deferred:
                with torch.device("meta"):
                    module = build()
                    if tuning is not None:
                        tuning.apply(name, module)
                    return module
            return _seeded(seed, part, build, self._adapt(name))

        self.embed = make("embed") if embed else None
        self.blocks = Blocks({str(i): make(f"blocks.{i}") for i in range(*layers)})
        self.head = make("head") if head else None

    def _adapt(self, name: str):
        return None if self.tuning is None else (lambda module: self.tuning.apply(name, module))

    def units(self) -> list[str]:
        """The units' names in build order: ``embed``, ``blocks.<i>``, ``head``."""
        return list(self._parts)

    def materialize(self, name: str, state: dict[str, torch.Tensor] | None = None, *, device=None,
                    dtype=None) -> nn.Module:
        """Build unit ``name`` for real (seeded as in the eager build), load its tensors
        from ``state`` (full-model names) when given, and put it in place."""
        part, build = self._parts[name]
        module = _seeded(self.seed, part, build, self._adapt(name)).to(device, dtype)
        if state is not None:
            load_given(module, state, name + ".")
        if name.startswith("blocks."):
            self.blocks[name.split(".", 1)[1]] = module
        else:
            setattr(self, name, module)
        return module

    def run_blocks(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Full forward (needs embed and head): token ids -> logits."""
        assert self.embed is not None and self.head is not None
        return self.head(self.run_blocks(self.embed(ids)))


def build_model(cfg: ModelConfig, seed: int = 0, tuning: Tuning | None = None) -> StageModel:
    """The whole model on one device."""
    return StageModel(cfg, (0, cfg.num_layers), embed=True, head=True, seed=seed, tuning=tuning)

