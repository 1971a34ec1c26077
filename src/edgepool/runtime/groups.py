"""Process groups from a Plan: the one place that knows how groups are made.

``init_world`` joins the world group with a timeout through torch's rendezvous (so the
run keeps the store, for ``runtime.health``'s heartbeats), or, for a rank an agent of
``edgepool join`` started, through the coordinator's authenticated store
(``cluster.store``); ``StageGroups.build(plan)`` makes
one subgroup per multi-device stage (every rank creates every group, in plan order, as
torch.distributed requires) and ``destroy()`` tears them down. Nothing re-plans a
running job yet: a lost device ends the run (a ``PeerError`` naming it), and ``--resume``
continues under the same plan only.

Backend: gloo. NCCL would need every rank of a group to hold CUDA tensors; the runtime
keeps tensors on the CPU today, so it never picks NCCL (see docs/runtime.md).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch.distributed as dist

from edgepool.runtime.device import CPU, TorchDevice
from edgepool.specs.plan import Plan, stage_ranks


_WORLD_STORE = None


def init_world(rank: int, world_size: int, *, init_method: str, timeout_s: float, device: TorchDevice = CPU):
    """Join the world group (``env://`` under the launcher or torchrun, ``file://`` in
    tests); returns the rendezvous store, which ``world_store()`` also gives."""
    global _WORLD_STORE
    timeout = timedelta(seconds=timeout_s)
    if init_method == "env://" and os.environ.get("EDGEPOOL_STORE"):  # a rank of `edgepool join`
        store = _pool_store(rank, timeout)
    else:
        store, rank, world_size = next(dist.rendezvous(init_method, rank, world_size, timeout=timeout))
    store.set_timeout(timeout)
    dist.init_process_group(device.backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
    _WORLD_STORE = store
    return store


def _pool_store(rank: int, timeout: timedelta):
    """The coordinator's store over the pool's TLS (``cluster.store``): ``EDGEPOOL_STORE``
    (ADDR:PORT), ``EDGEPOOL_RUN_ID`` and ``EDGEPOOL_TOKEN_FILE``, set by the agent."""
    from edgepool.cluster.store import ChannelStore
    from edgepool.cluster.trust import read_token
    from edgepool.machine import parse_endpoint

    addr, port = parse_endpoint(os.environ["EDGEPOOL_STORE"], "EDGEPOOL_STORE")
    return ChannelStore(addr, port, read_token(os.environ["EDGEPOOL_TOKEN_FILE"]), os.environ["EDGEPOOL_RUN_ID"],
                        rank, timeout)


def world_store():
    """The store of the world group ``init_world`` made in this process, or None."""
    return _WORLD_STORE if dist.is_initialized() else None


@dataclass
class StageGroups:
    plan: Plan
    rank: int
    timeout_s: float
    stage_groups: list = field(default_factory=list)  # one per stage; None for single-device stages

    @classmethod
    def build(cls, plan: Plan, rank: int, timeout_s: float, *, device: TorchDevice = CPU) -> "StageGroups":
        self = cls(plan=plan, rank=rank, timeout_s=timeout_s)
        for ranks in stage_ranks(plan):
            group = (dist.new_group(list(ranks), timeout=timedelta(seconds=timeout_s), backend=device.backend)
                     if len(ranks) > 1 else None)
            self.stage_groups.append(group)
        return self

    def of_stage(self, stage: int):
        return self.stage_groups[stage]

    def destroy(self) -> None:
        for g in self.stage_groups:
            if g is not None:
                dist.destroy_process_group(g)
        self.stage_groups = []


def shutdown(*, clean: bool = True) -> None:
    """Leave the world group. After a clean run, wait for every rank first: a gloo peer
    that closes its connections while another still uses them aborts that process."""
    global _WORLD_STORE
    if dist.is_initialized():
        if clean:
            dist.barrier()
        dist.destroy_process_group()
    _WORLD_STORE = None
