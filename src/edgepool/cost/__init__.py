"""Cost model: time, peak memory and energy of a Plan (pure functions, no torch).

- ``cost.profile``: per-layer costs on a reference device (measured or analytic).
- ``cost.network``: point-to-point (switched) and shared-medium (Wi-Fi) transfer and
  collective times.
- ``cost.model``: ``estimate(plan, pool, profile, shape) -> PlanCost``.

Units: seconds ``_s``, joules ``_j``, watts ``_w``, bytes ``_bytes``.
"""

from __future__ import annotations

from edgepool.cost.model import (DeviceCost, LinkCost, PlanCost, StageCost, device_speed, estimate, memory_cap_bytes,
                                 power_mode_of, shape_for)
from edgepool.cost.network import Network
from edgepool.cost.profile import LayerProfile, ModelDims, ModelProfile, Parts, analytic_profile

__all__ = [
    "DeviceCost", "LayerProfile", "LinkCost", "ModelDims", "ModelProfile", "Network", "Parts", "PlanCost", "StageCost",
    "analytic_profile", "device_speed", "estimate", "memory_cap_bytes", "power_mode_of", "shape_for",
]
