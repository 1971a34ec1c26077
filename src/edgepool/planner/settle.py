"""Re-planning after a loss with the state's journey counted (layer-level re-planning).

After a device is lost, the planner's best plan over the devices left may put layers on
devices that do not hold them: their parameters and optimizer state then travel over the
pool's network before the first step under the new plan. Over a slow link, with a big
model or few steps left, that costs more than a split a little slower per step that
keeps the layers where they are (Asteroid re-plans at the layer level for the same
reason). ``settle`` keeps the plan's device groups (devices, modes, shares) and its
micro-batches and schedule, and tries the groups in other stage orders (up to
``MAX_REORDER`` stages) over other layer boundaries: every split when there are at most
``MAX_SPLITS`` in all, else a hill-climb from the planner's boundaries, one layer at a
time. It picks the plan that ends the run soonest, by the cost model:

    time of the state's moves + steps left x the step time,

among plans that fit every device's memory.

The moves are counted per Transformer block (its trainable parameters and their
optimizer state: under LoRA or freezing the frozen base is read from the run's initial
state, not moved): a device needs all of a block's state when
its new stage keeps whole replicas (dp), else its share; it holds what its old rank held
of the block, what it gives of other old ranks (a replica, ``holders``), and whatever
the checkpoint files of the step give (``files``: read where they lie, one host's disk in
a local or emulated pool); the rest comes from a device that holds it, over
``cost.network``. The embedding and head stay with the data owners under every split,
so they are left out of the comparison. Pure Python; no torch.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

from edgepool import modes
from edgepool.specs.plan import Plan

MAX_SPLITS = 400  # past this many (orders x splits), a hill-climb from the planner's boundaries per order
MAX_REORDER = 4  # stage orders are tried up to this many stages (4! = 24 orders)


@dataclass(frozen=True)
class Settled:
    plan: Plan
    planner_plan: Plan
    move_s: float  # the chosen split's moves
    moved_bytes: float
    planner_move_s: float  # the planner's split's moves
    step_s: float  # the cost model's step of the chosen split
    planner_step_s: float

    @property
    def changed(self) -> bool:
        return self.plan.plan_id != self.planner_plan.plan_id


def _fraction(plan: Plan, s: int, device: str) -> float:
    """The part of stage ``s``'s blocks ``device`` holds: all (a replica) or its share."""
    st = plan.stages[s]
    if len(st.devices) == 1 or modes.get(st.mode).replicated_state:
        return 1.0
    w = st.weights
    return w[st.devices.index(device)] / sum(w)


def holdings(old_plan: Plan, holders: dict[int, list[int]], files: list[int]) -> tuple[dict, dict]:
    """(device -> block -> the fraction it holds in memory, block -> the fraction the files give)."""
    of_rank = {}
    for s, st in enumerate(old_plan.stages):
        for d in st.devices:
            of_rank[old_plan.devices.index(d)] = (s, _fraction(old_plan, s, d))
    mem: dict[str, dict[int, float]] = {}
    for r, given in holders.items():
        mine = mem.setdefault(old_plan.devices[r], {})
        for q in given:
            s, f = of_rank[q]
            for b in range(*old_plan.stages[s].layers):
                mine[b] = min(1.0, mine.get(b, 0.0) + f)
    disk: dict[int, float] = {}
    for q in files:
        s, f = of_rank[q]
        for b in range(*old_plan.stages[s].layers):
            disk[b] = min(1.0, disk.get(b, 0.0) + f)
    return mem, disk


def flows(plan: Plan, mem: dict, disk: dict, block_bytes: list[float]) -> list[tuple[str, str, float]]:
    """The transfers (from, to, bytes) that give every device of ``plan`` its blocks' state."""
    out = []
    for s, st in enumerate(plan.stages):
        for d in st.devices:
            need = _fraction(plan, s, d)
            for b in range(*st.layers):
                short = need - mem.get(d, {}).get(b, 0.0) - disk.get(b, 0.0)
                if short > 1e-9:
                    src = max((h for h in mem if h != d), key=lambda h: mem[h].get(b, 0.0), default=d)
                    out.append((src, d, short * block_bytes[b]))
    return out


def _arranged(plan: Plan, order: tuple[int, ...], bounds: tuple[int, ...]) -> Plan:
    """``plan``'s stages in ``order`` over the layer ranges ``bounds`` cut."""
    edges = (0, *bounds, plan.num_layers)
    data = plan.model_dump(mode="json", exclude={"estimate"})
    data["stages"] = [data["stages"][i] for i in order]
    for st, a, b in zip(data["stages"], edges, edges[1:]):
        st["layers"] = [a, b]
    return Plan.model_validate(data)


def settle(plan: Plan, old_plan: Plan, holders: dict[int, list[int]], files: list[int], pool, profile, shape,
           steps_left: int) -> Settled:
    """``plan`` with the stage order and layer boundaries that end the run soonest (see
    the module docstring)."""
    from edgepool.cost.model import estimate
    from edgepool.cost.network import Network

    net = Network.of(pool)
    mem, disk = holdings(old_plan, holders, files)
    # what moves of a block: its trainable parameters and their optimizer state (all of
    # them in full training); a fine-tuning's frozen base comes from the run's initial
    # state on every device (``models.lora``), never over the network
    block_bytes = [lp.trainable_at() * (1 + profile.opt_state_factor) for lp in profile.blocks]
    k, n = len(plan.stages), plan.num_layers
    start = (tuple(range(k)), tuple(st.layers[0] for st in plan.stages[1:]))
    seen: dict[tuple, tuple | None] = {}

    def cost(key: tuple):
        """(the run's remaining time, the moves' time, the step, the plan, the bytes moved), or None: no fit."""
        if key not in seen:
            p = plan if key == start else _arranged(plan, *key)
            c = estimate(p, pool, profile, shape, network=net)
            fl = flows(p, mem, disk, block_bytes)
            move = net.transfer_time(fl)
            seen[key] = ((move + steps_left * c.step_time_s, move, c.step_time_s, p, sum(b for _, _, b in fl))
                         if c.feasible or key == start else None)
        return seen[key]

    def better(a: tuple, b: tuple) -> bool:
        return cost(a) is not None and cost(a)[0] < cost(b)[0] - 1e-9

    best = start
    orders = list(itertools.permutations(range(k))) if k <= MAX_REORDER else [start[0]]
    every = len(orders) * math.comb(n - 1, k - 1) <= MAX_SPLITS
    for order in orders:
        if every:
            for bounds in itertools.combinations(range(1, n), k - 1):
                if better((order, bounds), best):
                    best = (order, bounds)
            continue
        here, climb = (order, start[1]), True
        while climb:  # one boundary one layer at a time, while the run ends sooner
            climb = False
            for i, delta in itertools.product(range(k - 1), (-1, 1)):
                b = here[1][:i] + (here[1][i] + delta,) + here[1][i + 1:]
                if all(x < y for x, y in zip((0, *b), (*b, n))) and better((order, b), here):
                    here, climb = (order, b), True
        if better(here, best):
            best = here
    _, move, step, chosen, moved = cost(best)
    return Settled(plan=chosen, planner_plan=plan, move_s=move, moved_bytes=moved, planner_move_s=cost(start)[1],
                   step_s=step, planner_step_s=cost(start)[2])
