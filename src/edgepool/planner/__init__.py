"""The planner: the best Plan of a pool for a job, by time, energy or energy-delay product.

``plan(pool, job, profile, objective="time", deadline_s=None, family=None) -> PlanResult``
searches the plan space of ``planner.space`` with a dynamic program over layer ranges
and device groups (``planner.dp``), evaluates every candidate with ``cost.model``, runs
the best of them in the simulator (``sim.engine``), and returns the best plan by the
simulator (with its estimate), the time-energy Pareto frontier and the best plan of
each plain parallelism with the reason it lost. Pure Python and numpy; no torch.
"""

from __future__ import annotations

from edgepool.planner.search import (FAMILIES, OBJECTIVES, Baseline, Candidate, PlanResult, explain, plan,
                                     plan_for_run)

__all__ = ["FAMILIES", "OBJECTIVES", "Baseline", "Candidate", "PlanResult", "explain", "plan", "plan_for_run"]
