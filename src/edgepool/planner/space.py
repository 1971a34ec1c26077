"""The planner's plan space: which plans the search considers, and how to build them.

The space (the search is exact over it; ``enumerate_plans`` lists it for tests):

1. **Canonical device order.** Devices are sorted by their kind's catalog speed at
   its maximum mode (fastest first), then kind id, then name. The order depends only
   on kinds, never on ``compute_scale``, bandwidth or memory, so making a device or a
   link faster never changes which plans exist.
2. **Groups** are runs of consecutive devices in that order; stages take their groups
   in that order (stage 0 the earliest). Devices outside every group are left out.
3. **Single-stage plans**: one group in any mode of ``edgepool.modes`` (dp, tp, sp,
   fsdp; a group of one device is plain single-device training, written ``dp``;
   restricted to a family, such plans have at least two devices and pp plans at least
   two stages).
4. **Pipelines** (2 or more stages): contiguous layer ranges of at least one block,
   every group of two or more devices in ``dp`` or ``fsdp`` (the modes with
   ``in_pipelines``, whose closed form ``tables`` holds: Asteroid-style pipelines of
   data-parallel groups, replicated or sharded). tp and sp need per-block collectives of
   whole activations, which on an edge LAN only pay off, if ever, inside a single stage.
5. **Shares**: whole items (the mode's ``num_items``: samples for dp and fsdp, tokens
   for sp, KV-head groups for tp) are
   given one at a time to the device that would finish its items soonest, i.e. they
   minimise ``max_i items_i / speed_i`` (speed in the device's power mode); each
   device gets at least one. The shares written into the plan are these counts, so
   ``split_counts`` reproduces them exactly.
6. **Micro-batches**: every divisor of the global batch (up to ``max_microbatches``, and
   never more than ``specs.values.MAX_MICROBATCHES``).
7. **Schedule**: ``1f1b`` unless the job asks for ``gpipe``. In the cost model 1f1b is
   never slower and never holds more activations than gpipe.
8. **Power modes**: every mode of a device's kind (only its pinned mode if the pool
   pins one); the devices of one kind inside one group share a mode. The time
   objective uses maximum modes (they are never slower).
"""

from __future__ import annotations

import heapq
from functools import lru_cache
import itertools
from dataclasses import dataclass, field
from typing import Iterator

from edgepool import catalog
from edgepool import modes as modes_mod
from edgepool.cost.model import device_speed
from edgepool.cost.profile import ModelProfile
from edgepool.specs.plan import Plan, Shape, StagePlan
from edgepool.specs.pool import DeviceSpec, PoolSpec
from edgepool.specs.values import MAX_MICROBATCHES

# Modes a single stage may take, and the one the pipeline search composes (``tables``).
MODES_SINGLE = modes_mod.NAMES
PIPELINE_MODES = tuple(m.name for m in modes_mod.all_modes() if m.in_pipelines)
PIPELINE_MODE = PIPELINE_MODES[0]  # the plain one: a one-device stage, the energy search's closed form


def canonical_order(pool: PoolSpec) -> list[DeviceSpec]:
    def key(d: DeviceSpec):
        return (-catalog.get(d.kind).relative_speed(None), d.kind, d.name)

    return sorted(pool.devices, key=key)


def minimax_counts(items: int, speeds: list[float] | tuple[float, ...]) -> tuple[int, ...] | None:
    return _minimax_counts(items, tuple(speeds))


@lru_cache(maxsize=65536)
def _minimax_counts(items: int, speeds: tuple[float, ...]) -> tuple[int, ...] | None:
    """Whole items minimising ``max count_i / speed_i``, each count >= 1 (None if impossible).

    Greedy: give each next item to the device whose finishing time ``(count+1)/speed``
    is smallest (ties to the earlier device). For increasing per-device costs this is
    optimal for the maximum, and a faster device never raises it.

    The greedy takes the ``items`` smallest finishing times ``c / speed_i``. At the
    threshold ``T = (items - n) / sum(speeds)`` at most ``items`` of them lie below it,
    so the greedy is started there (one item less per device, against rounding) and
    the heap hands out only the last ``3n`` items or fewer: the cost is ``O(n log n)``,
    not ``O(items log n)`` (``items`` may be a 131072-token sequence).
    """
    n = len(speeds)
    if items < n:
        return None
    T = (items - n) / sum(speeds)
    counts = [max(1, int(T * s) - 1) for s in speeds]
    heap = [((c + 1) / s, i) for i, (c, s) in enumerate(zip(counts, speeds))]
    heapq.heapify(heap)
    for _ in range(items - sum(counts)):
        _, i = heapq.heappop(heap)
        counts[i] += 1
        heapq.heappush(heap, ((counts[i] + 1) / speeds[i], i))
    return tuple(counts)


def mode_options(dev: DeviceSpec, objective: str) -> tuple[str, ...]:
    kind = catalog.get(dev.kind)
    if dev.power_mode is not None:
        return (kind.power_mode(dev.power_mode).name,)
    if objective == "time":
        return (kind.max_mode.name,)
    return tuple(m.name for m in kind.power_modes)


def group_mode_assignments(devices: list[DeviceSpec], objective: str) -> list[dict[str, str]]:
    """Power-mode assignments of a group: devices of one kind (and pin) share a mode."""
    keys: dict[tuple[str, str | None], list[DeviceSpec]] = {}
    for d in devices:
        keys.setdefault((d.kind, d.power_mode), []).append(d)
    choices = [[(grp, m) for m in mode_options(grp[0], objective)] for grp in keys.values()]
    out = []
    for combo in itertools.product(*choices):
        out.append({d.name: m for grp, m in combo for d in grp})
    return out


@dataclass(frozen=True)
class Space:
    """Everything the search and the enumerator need, fixed for one (pool, job)."""

    pool: PoolSpec
    profile: ModelProfile
    shape: Shape
    order: tuple[DeviceSpec, ...]
    microbatches: tuple[int, ...]
    schedule: str
    objective: str
    family: str | None = None  # None: all; dp/sp/tp: single stage; pp: single-device stages
    # every stage recomputes its activations in the backward (``StagePlan.recompute``):
    # the space the planner searches when nothing fits without it (``planner.search``)
    recompute: bool = False
    without: tuple[str, ...] = ()  # modes the search leaves out (``plan(without=...)``)
    _speeds: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def build(cls, pool: PoolSpec, profile: ModelProfile, shape: Shape, *, schedule: str = "1f1b",
              objective: str = "time", family: str | None = None, max_microbatches: int | None = None,
              microbatches: tuple[int, ...] | None = None, recompute: bool = False,
              without: tuple[str, ...] = ()) -> "Space":
        B = shape.global_batch
        top = min(max_microbatches or MAX_MICROBATCHES, MAX_MICROBATCHES, B)
        ms = microbatches or tuple(m for m in range(1, top + 1) if B % m == 0)
        return cls(pool=pool, profile=profile, shape=shape, order=tuple(canonical_order(pool)), microbatches=ms,
                   schedule=schedule, objective=objective, family=family, recompute=recompute, without=without)

    @property
    def num_layers(self) -> int:
        return self.profile.num_layers

    def speed(self, d: DeviceSpec, mode: str) -> float:
        key = (d.name, mode)
        if key not in self._speeds:
            self._speeds[key] = device_speed(d, mode)
        return self._speeds[key]

    def shares(self, mode: str, devices: list[DeviceSpec], modes: dict[str, str], M: int) -> tuple[int, ...] | None:
        mb = self.shape.global_batch // M
        return minimax_counts(modes_mod.get(mode).num_items(mb, self.shape), [self.speed(d, modes[d.name]) for d in devices])

    def stage(self, layers: tuple[int, int], mode: str, devices: list[DeviceSpec], modes: dict[str, str],
              M: int) -> StagePlan | None:
        if len(devices) == 1:
            return StagePlan(layers=layers, mode=PIPELINE_MODE, devices=(devices[0].name,), recompute=self.recompute)
        counts = self.shares(mode, devices, modes, M)
        if counts is None:
            return None
        return StagePlan(layers=layers, mode=mode, devices=tuple(d.name for d in devices),
                         shares=tuple(float(c) for c in counts), recompute=self.recompute)

    def make_plan(self, stages: list[StagePlan], M: int, modes: dict[str, str]) -> Plan:
        # Only modes that differ from the device's default (its pin, else the maximum).
        default = {d.name: catalog.get(d.kind).power_mode(d.power_mode).name for d in self.pool.devices}
        pm = {n: m for n, m in sorted(modes.items()) if m != default[n]}
        return Plan(num_layers=self.num_layers, stages=tuple(stages), num_microbatches=M, schedule=self.schedule,
                    power_modes=pm)


def group_sequences(n: int, S: int, start: int = 0) -> Iterator[list[tuple[int, int]]]:
    """Every sequence of S disjoint runs ``[a, b)`` of ``range(start, n)``, in order."""
    if S == 0:
        yield []
        return
    for a in range(start, n):
        for b in range(a + 1, n + 1):
            for rest in group_sequences(n, S - 1, b):
                yield [(a, b)] + rest


def runs(n: int) -> Iterator[tuple[int, int]]:
    for a in range(n):
        for b in range(a + 1, n + 1):
            yield a, b


def enumerate_plans(space: Space) -> Iterator[Plan]:
    """Every plan of the space (exhaustive; for tests and tiny pools)."""
    order = list(space.order)
    N, L = len(order), space.num_layers
    fam = space.family
    for M in space.microbatches:
        # Single-stage plans.
        if fam is None or fam in MODES_SINGLE:
            for a, b in runs(N):
                devs = order[a:b]
                modes_single = (PIPELINE_MODE,) if b - a == 1 else (MODES_SINGLE if fam is None else (fam,))
                if fam is not None and b - a == 1:
                    continue  # a family plan (dp, sp, tp) has at least two devices
                for mode in modes_single:
                    for modes in group_mode_assignments(devs, space.objective):
                        st = space.stage((0, L), mode, devs, modes, M)
                        if st is not None:
                            yield space.make_plan([st], M, modes)
        if fam in MODES_SINGLE:
            continue
        # Pipelines of dp and fsdp groups (pp: groups of one device).
        for S in range(2, min(N, L) + 1):
            for groups in group_sequences(N, S):
                if fam == "pp" and any(b - a != 1 for a, b in groups):
                    continue
                for bounds in itertools.combinations(range(1, L), S - 1):
                    edges = (0,) + bounds + (L,)
                    per_group = [group_mode_assignments(order[a:b], space.objective) for a, b in groups]
                    stage_modes = [PIPELINE_MODES if b - a > 1 else (PIPELINE_MODE,) for a, b in groups]
                    for combo in itertools.product(*per_group):
                        modes = {k: v for c in combo for k, v in c.items()}
                        for kinds in itertools.product(*stage_modes):
                            stages = []
                            for i, (a, b) in enumerate(groups):
                                st = space.stage((edges[i], edges[i + 1]), kinds[i], order[a:b], modes, M)
                                if st is None:
                                    break
                                stages.append(st)
                            else:
                                yield space.make_plan(stages, M, modes)
