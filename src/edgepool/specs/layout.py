"""A plan resolved for one (plan, shape): splits, regions, data owners, boundaries.

``Layout.of(plan, shape)`` computes once, through each stage's mode
(``edgepool.modes``), what the cost model, the simulator and the runtime all read:

- ``splits[s]``: stage s's shares as whole items (``StageSplit``);
- ``regions[s][i]``: the part of each micro-batch's activations device i of stage s
  holds, as (batch start, batch stop, token start, token stop);
- ``owners[i]``: the part whose raw data first-stage device i owns. Data never leaves
  its device: a device reads its samples from its own file, embeds them, and computes
  the loss on them with its own labels. In a mode that owns data (dp, fsdp) every device
  owns its batch share; otherwise the group's first device owns the whole micro-batch
  and the others own nothing (they receive embedded activations);
- ``fwd[k]`` / ``bwd[k]``: the transfers across boundary k as global ranks. Boundary 0
  runs from the data owners (embedding) into stage 0's blocks, boundary k (0 < k < S)
  from stage k-1 to stage k, and boundary S from the last stage's blocks to the data
  owners (head and loss). Forward carries activations, backward their gradients the
  other way. A group whose mode holds replicas of its input and output (tp) sends each
  piece from one replica.

Building a layout checks the plan against the shape (``PlanError`` with the numbers);
``check_plan`` adds the checks against the pool and the model.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgepool import catalog, modes
from edgepool.errors import PlanError, SpecError
from edgepool.specs.plan import (EMPTY, Plan, Region, Shape, StageSplit, Transfer, microbatch_size, role_of, stage_ranks,
                                 transfers)


@dataclass(frozen=True)
class Layout:
    plan: Plan
    shape: Shape
    microbatch: int
    ranks: tuple[tuple[int, ...], ...]
    splits: tuple[StageSplit, ...]
    regions: tuple[tuple[Region, ...], ...]
    owners: tuple[Region, ...]
    fwd: tuple[tuple[Transfer, ...], ...]
    bwd: tuple[tuple[Transfer, ...], ...]

    @classmethod
    def of(cls, plan: Plan, shape: Shape) -> "Layout":
        # Keyed by the plan object (held by the entry, so its id is not reused while
        # cached): the cost model and the simulator ask many times per plan.
        key = (id(plan), shape)
        hit = _CACHE.get(key)
        if hit is not None and hit.plan is plan:
            return hit
        mb = microbatch_size(plan, shape)
        splits, regions = [], []
        for s, st in enumerate(plan.stages):
            mode = modes.get(st.mode)
            sp = mode.split(st.weights, mb, shape)
            modes.check_split(mode, s, st.devices, sp, mb, shape)
            splits.append(sp)
            regions.append(tuple(mode.region(sp, i, mb, shape) for i in range(len(st.devices))))
        if modes.get(plan.stages[0].mode).owns_data:
            owners = regions[0]
        else:
            owners = ((0, mb, 0, shape.seq_len),) + (EMPTY,) * (len(regions[0]) - 1)
        ranks = tuple(stage_ranks(plan))
        S = len(plan.stages)

        def crossing(k: int, backward: bool) -> tuple[Transfer, ...]:
            src_s, dst_s = k - 1, k  # stage indices; -1 / S are the owners
            src = (ranks[0], owners, False) if k == 0 else (ranks[src_s], regions[src_s],
                                                            modes.get(plan.stages[src_s].mode).replicated_io)
            dst = (ranks[0], owners, False) if k == S else (ranks[dst_s], regions[dst_s],
                                                           modes.get(plan.stages[dst_s].mode).replicated_io)
            if backward:
                src, dst = dst, src
            src_ranks, have, replicated = src
            dst_ranks, need, _ = dst
            return tuple(Transfer(src_ranks[i], dst_ranks[j], r) for i, j, r in transfers(list(have), replicated, list(need)))

        layout = cls(plan=plan, shape=shape, microbatch=mb, ranks=ranks, splits=tuple(splits), regions=tuple(regions),
                     owners=tuple(owners), fwd=tuple(crossing(k, False) for k in range(S + 1)),
                     bwd=tuple(crossing(k, True) for k in range(S + 1)))
        if len(_CACHE) > 4096:
            _CACHE.clear()
        _CACHE[key] = layout
        return layout

    def boundary(self, k: int, *, backward: bool = False) -> tuple[Transfer, ...]:
        return (self.bwd if backward else self.fwd)[k]


_CACHE: dict[tuple, Layout] = {}


def check_plan(plan: Plan, shape: Shape, pool=None, num_layers: int | None = None) -> None:
    """Everything that can be checked before any process starts. Raises PlanError.
    ``pool`` (a ``PoolSpec``): the plan's devices and power modes must be the pool's."""
    if num_layers is not None and plan.num_layers != num_layers:
        raise PlanError(f"plan has num_layers {plan.num_layers} but the model has {num_layers}; re-plan for this model")
    if pool is not None:
        names = pool.device_names
        for d in plan.devices:
            if d not in names:
                raise PlanError(f"plan uses device {d!r}, which is not in the pool ({', '.join(names)}); fix the plan or the pool")
        for d, mode in plan.power_modes.items():
            if d not in names:
                raise PlanError(f"power_modes names device {d!r}, which is not in the pool")
            kind = catalog.get(pool.device(d).kind)
            try:
                kind.power_mode(mode)
            except SpecError as exc:
                raise PlanError(f"power_modes: device {d!r}: {exc}") from None
    Layout.of(plan, shape)


def twins(plan: Plan, rank: int) -> list[int]:
    """The other ranks that hold the same state as ``rank``, bit for bit: the members of
    its stage's group when the stage's mode replicates its whole state (dp: parameters,
    embed and head on every first-stage device, and the optimizer state stepped alike)."""
    role = role_of(plan, rank)
    st = plan.stages[role.stage]
    if len(st.devices) < 2 or not modes.get(st.mode).replicated_state:
        return []
    return [plan.devices.index(d) for d in st.devices if d != plan.devices[rank]]


def backups(plan: Plan) -> dict[int, int]:
    """Where each rank's state is backed up in memory: rank -> the rank that keeps a
    replica of it (Asteroid's neighbour backups). A rank with a twin (``twins``) needs
    none. Else the replica goes to the next rank, in rank order and around, of another
    stage (a pipeline neighbour: it is already linked to it), or of the same group when
    the plan has one stage. Pure; every rank and the launcher compute the same."""
    n = plan.world_size
    out: dict[int, int] = {}
    if n < 2:
        return out
    stage = {r: role_of(plan, r).stage for r in range(n)}
    for r in range(n):
        if twins(plan, r):
            continue
        ring = [(r + k) % n for k in range(1, n)]
        out[r] = next((q for q in ring if stage[q] != stage[r]), ring[0])
    return out
