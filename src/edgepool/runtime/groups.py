"""Process groups from a Plan: the one place that knows how groups are made.

``init_world`` joins the world group with a timeout through torch's rendezvous (so the
run keeps the store, for ``runtime.health``'s heartbeats), or, for a rank an agent of
``edgepool join`` started, through the coordinator's authenticated store
(``cluster.store``); ``StageGroups.build(plan)`` makes
one subgroup per multi-device stage (every rank creates every group, in plan order, as
torch.distributed requires) and ``destroy()`` tears them down. ``regroup_world`` joins
the world of a new generation after a lost device (``runtime.regroup``), over a prefix
of the same store.

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
_STORE_HOST = None  # the store this rank serves (rank 0 of a local run), if any


def init_world(rank: int, world_size: int, *, init_method: str, timeout_s: float, device: TorchDevice = CPU):
    """Join the world group (``env://`` under the launcher or torchrun, ``file://`` in
    tests); returns the rendezvous store, which ``world_store()`` also gives."""
    global _WORLD_STORE
    timeout = timedelta(seconds=timeout_s)
    if init_method == "env://" and os.environ.get("EDGEPOOL_STORE"):  # edgepool's launcher or agent
        store = _pool_store(rank, timeout)
    else:
        store, rank, world_size = next(dist.rendezvous(init_method, rank, world_size, timeout=timeout))
    store.set_timeout(timeout)
    dist.init_process_group(device.backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
    _WORLD_STORE = store
    return store


def _pool_store(rank: int, timeout: timedelta):
    """The run's store over TLS (``cluster.store``): ``EDGEPOOL_STORE`` (ADDR:PORT),
    ``EDGEPOOL_RUN_ID`` and ``EDGEPOOL_TOKEN_FILE``, set by the agent (the coordinator's
    store) or by the local launcher (a store rank ``EDGEPOOL_STORE_HOST`` hosts, with a
    token made for the run)."""
    from edgepool.cluster.store import ChannelStore
    from edgepool.cluster.trust import read_token
    from edgepool.machine import parse_endpoint

    global _STORE_HOST
    addr, port = parse_endpoint(os.environ["EDGEPOOL_STORE"], "EDGEPOOL_STORE")
    token, run_id = read_token(os.environ["EDGEPOOL_TOKEN_FILE"]), os.environ["EDGEPOOL_RUN_ID"]
    if os.environ.get("EDGEPOOL_STORE_HOST") == str(rank):  # a local run: this rank hosts it, as TCPStore's rank 0 did
        from edgepool.cluster.store import host_store

        _STORE_HOST = host_store(addr, port, token, run_id, log=lambda m: print(m, flush=True))
    return ChannelStore(addr, port, token, run_id, rank, timeout)


def connect_store(rank: int, *, timeout_s: float):
    """The run's store, without a world group yet (a device taken into a running run,
    ``runtime.regroup``): ``regroup_world`` then joins the world of its generation."""
    global _WORLD_STORE
    store = _pool_store(rank, timedelta(seconds=timeout_s))
    store.set_timeout(timedelta(seconds=timeout_s))
    _WORLD_STORE = store
    return store


def regroup_world(rank: int, world_size: int, *, prefix: str, timeout_s: float, device: TorchDevice = CPU) -> None:
    """Leave the world group and join a new one under ``prefix`` of the same store
    (``runtime.regroup``): a new generation, with ranks renumbered."""
    leave_world()
    timeout = timedelta(seconds=timeout_s)
    dist.init_process_group(device.backend, store=dist.PrefixStore(prefix, _WORLD_STORE), rank=rank,
                            world_size=world_size, timeout=timeout)


def leave_world() -> None:
    """Destroy the world group (its connections may be cut already), keeping the store."""
    if dist.is_initialized():
        dist.destroy_process_group()


def world_store():
    """The store of the world group ``init_world`` made in this process, or None."""
    return _WORLD_STORE if dist.is_initialized() else None


@dataclass
class StageGroups:
    plan: Plan
    rank: int
    timeout_s: float
    stage_groups: list = field(default_factory=list)  # one per stage; None for single-device stages
    # every rank, for the in-memory backups that travel while the steps go on
    # (``runtime.regroup``): their own connections, so they never queue behind a step's
    backup_group: object = None

    @classmethod
    def build(cls, plan: Plan, rank: int, timeout_s: float, *, device: TorchDevice = CPU,
              backups: bool = False) -> "StageGroups":
        self = cls(plan=plan, rank=rank, timeout_s=timeout_s)
        for ranks in stage_ranks(plan):
            group = (dist.new_group(list(ranks), timeout=timedelta(seconds=timeout_s), backend=device.backend)
                     if len(ranks) > 1 else None)
            self.stage_groups.append(group)
        if backups:
            self.backup_group = dist.new_group(list(range(plan.world_size)), timeout=timedelta(seconds=timeout_s),
                                               backend="gloo")
        return self

    def of_stage(self, stage: int):
        return self.stage_groups[stage]

    def destroy(self) -> None:
        for g in [*self.stage_groups, self.backup_group]:
            if g is not None:
                dist.destroy_process_group(g)
        self.stage_groups, self.backup_group = [], None


def shutdown(*, clean: bool = True) -> None:
    """Leave the world group. After a clean run, wait for every rank first: a gloo peer
    that closes its connections while another still uses them aborts that process."""
    global _WORLD_STORE, _STORE_HOST
    if dist.is_initialized():
        if clean:
            dist.barrier()
        dist.destroy_process_group()
    _WORLD_STORE = None
    if _STORE_HOST is not None:
        _STORE_HOST.close()
        _STORE_HOST = None
