"""Simulation of a Plan: ``lower(plan)`` and the discrete-event simulator. No torch.

- ``sim.lower``: the op sequence each rank runs in one step;
- ``sim.engine``: ``simulate(plan, pool, profile, shape) -> SimResult`` (step time,
  per-device timeline, energy, peak memory);
- ``sim.gantt``: ``draw_gantt(result, path)`` (matplotlib, imported on use).
"""

from __future__ import annotations

from edgepool.sim.engine import DeviceTrace, Segment, SimResult, simulate
from edgepool.sim.lower import Op, lower

__all__ = ["DeviceTrace", "Op", "Segment", "SimResult", "lower", "simulate"]
