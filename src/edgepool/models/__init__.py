"""Transformer families with an explicit layer list.

A model is three parts with fixed names: ``embed`` (token embedding), ``blocks.<i>``
(Transformer block i, global index) and ``head`` (final norm, LM or MLM head). A
``StageModel`` builds only the parts a device needs, so a pipeline stage never
allocates another stage's layers, and its parameter names equal the full model's.

Initialisation is deterministic per part (seeded by the job seed and the part's
index), so a stage's parameters are bit-identical to the same part of a full model
built with the same seed. That is what makes every parallel mode comparable with
single-device training.
"""

from __future__ import annotations

from edgepool.models.config import ModelConfig, from_hf_config, preset

FAMILIES = ("gpt", "bert", "llama")

# torch-backed names load on first use, so ``import edgepool.models.config`` (the planner's
# path to model dimensions) never imports torch.
_LAZY = {"StageModel": "edgepool.models.stage", "build_model": "edgepool.models.stage",
         "load_pretrained": "edgepool.models.hf", "with_seeded_init": "edgepool.models.hf"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'edgepool.models' has no attribute {name!r}")


__all__ = ["FAMILIES", "ModelConfig", "StageModel", "build_model", "from_hf_config", "load_pretrained", "preset",
           "with_seeded_init"]
