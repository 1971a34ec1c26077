"""Specs as files a user writes: pool, job and plan, validated before anything starts."""

from __future__ import annotations

from edgepool.specs.job import JobSpec, load_job
from edgepool.specs.plan import Estimate, Plan, Shape, StagePlan, load_plan, role_of, split_counts
from edgepool.specs.pool import DeviceSpec, NetworkSpec, PoolSpec, load_pool

__all__ = [
    "DeviceSpec", "Estimate", "JobSpec", "NetworkSpec", "Plan", "PoolSpec", "Shape", "StagePlan",
    "load_job", "load_plan", "load_pool", "role_of", "split_counts",
]
