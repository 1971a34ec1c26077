"""The intra-stage modes: one module per mode, and this registry.

A plan's stage splits its work over its group in one mode (``specs.plan.StagePlan``).
Each mode is one module, ``edgepool.modes.<name>``, whose ``MODE`` holds the mode's
split, data ownership, work, memory, collectives, lowering flags and engine ``apply``
(``modes.base.Mode``). The cost model, simulator, lowering, planner and engine ask
``get(name)``; none of them branches on a mode's name (``tests/unit/test_modes.py``
checks this).

Adding a mode: write its module, add it to ``_MODULES`` and to ``specs.plan.StageMode``
(the plan schema's list), and test it.
"""

from __future__ import annotations

from importlib import import_module

from edgepool.errors import PlanError
from edgepool.modes.base import BoundInputs, GroupComm, Mode, StageWork, check_split

_MODULES = {"dp": "edgepool.modes.dp", "tp": "edgepool.modes.tp", "sp": "edgepool.modes.sp",
            "fsdp": "edgepool.modes.fsdp"}
NAMES: tuple[str, ...] = tuple(_MODULES)
_CACHE: dict[str, Mode] = {}


def get(name: str) -> Mode:
    """The mode called ``name``; a ``PlanError`` listing the known modes otherwise."""
    hit = _CACHE.get(name)
    if hit is None:
        if name not in _MODULES:
            raise PlanError(f"unknown stage mode {name!r}; known: {', '.join(NAMES)}")
        hit = _CACHE[name] = import_module(_MODULES[name]).MODE
    return hit


def all_modes() -> list[Mode]:
    return [get(n) for n in NAMES]


__all__ = ["NAMES", "BoundInputs", "GroupComm", "Mode", "StageWork", "all_modes", "check_split", "get"]
