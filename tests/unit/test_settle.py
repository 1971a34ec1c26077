"""Re-planning after a loss with the state's moves counted (``planner.settle``)."""

from __future__ import annotations

from _plan_helpers import make_pool, tiny
from edgepool.cost.model import estimate, shape_for
from edgepool.cost.network import Network
from edgepool.planner.settle import flows, holdings, settle
from edgepool.specs import Plan, StagePlan


def _pp(bounds, devices, L=8):
    edges = (0, *bounds, L)
    return Plan(num_layers=L, stages=tuple(StagePlan(layers=(a, b), mode="dp", devices=(d,))
                                           for a, b, d in zip(edges, edges[1:], devices)), num_microbatches=2)


POOL = make_pool(["host-cpu", "host-cpu", "host-cpu"], bandwidth_mbps=20.0)
PROF = tiny(num_layers=8, hidden=256)
SHAPE = shape_for(PROF, 4, 32)
OLD = _pp((3, 6), ("d0", "d1", "d2"))  # d2 (rank 2, blocks 6-7) is lost; d0 keeps its replica
HOLDERS = {0: [0, 2], 1: [1]}


def test_holdings_and_flows_count_what_is_not_where_it_is_needed():
    mem, disk = holdings(OLD, HOLDERS, [])
    assert mem == {"d0": {b: 1.0 for b in (0, 1, 2, 6, 7)}, "d1": {3: 1.0, 4: 1.0, 5: 1.0}} and disk == {}
    block = [float(b + 1) for b in range(8)]
    # blocks 0-3 on d0, 4-7 on d1: d0 lacks block 3 (d1 has it), d1 lacks 6 and 7 (d0 has them)
    got = sorted(flows(_pp((4,), ("d0", "d1")), mem, disk, block))
    assert got == [("d0", "d1", 7.0), ("d0", "d1", 8.0), ("d1", "d0", 4.0)]
    # blocks 0-2 and 6-7 cannot both stay on d0 in two stages; 0-5 | 6-7 moves 3-5 to d0 and 6-7 to d1
    assert sum(b for *_, b in flows(_pp((6,), ("d0", "d1")), mem, disk, block)) == 4 + 5 + 6 + 7 + 8
    # a block the step's checkpoint files give moves nowhere
    mem, disk = holdings(OLD, {0: [0], 1: [1]}, [2])
    assert disk == {6: 1.0, 7: 1.0}
    assert sorted(flows(_pp((3,), ("d0", "d1")), mem, disk, block)) == []


def test_few_steps_left_keep_the_layers_many_take_the_fastest_split():
    planner = _pp((5,), ("d1", "d0"))  # as if the planner put d1 first and split 5 | 3
    few = settle(planner, OLD, HOLDERS, [], POOL, PROF, SHAPE, steps_left=1)
    net = Network.of(POOL)
    block = [lp.params_at() * (1 + PROF.opt_state_factor) for lp in PROF.blocks]
    mem, disk = holdings(OLD, HOLDERS, [])
    assert sorted(few.plan.devices) == ["d0", "d1"] and few.plan.stages[0].mode == "dp"
    assert few.move_s < few.planner_move_s
    assert abs(few.move_s - net.transfer_time(flows(few.plan, mem, disk, block))) < 1e-9

    def total(p, steps):
        return net.transfer_time(flows(p, mem, disk, block)) + steps * estimate(p, POOL, PROF, SHAPE).step_time_s

    # it is the best of every order and split, by the same sum: d0 first, as the blocks lie
    every = [_pp((b,), order) for order in (("d1", "d0"), ("d0", "d1")) for b in range(1, 8)]
    assert abs(total(few.plan, 1) - min(total(p, 1) for p in every)) < 1e-9
    assert few.plan.devices == ["d0", "d1"]
    many = settle(planner, OLD, HOLDERS, [], POOL, PROF, SHAPE, steps_left=10**7)
    fastest = min(every, key=lambda p: estimate(p, POOL, PROF, SHAPE).step_time_s)
    assert many.step_s == estimate(fastest, POOL, PROF, SHAPE).step_time_s
    assert many.step_s <= few.step_s


def test_a_split_that_does_not_fit_memory_is_not_chosen():
    planner = _pp((2,), ("d0", "d1"))  # the smallest part on d0
    free = settle(planner, OLD, HOLDERS, [], POOL, PROF, SHAPE, steps_left=1).plan
    assert free.stages[0].layers == (0, 3)  # d0 keeps blocks 0-2 when memory allows
    need = estimate(free, POOL, PROF, SHAPE).peak_memory_bytes["d0"]
    for gb in (0.33, 0.34, 0.345):  # find a cap under which that split does not fit d0
        small = make_pool(["host-cpu", "host-cpu"], bandwidth_mbps=20.0, extra={"memory_gb": [gb, None]})
        if not estimate(free, small, PROF, SHAPE).feasible and estimate(planner, small, PROF, SHAPE).feasible:
            break
    else:
        raise AssertionError(f"no cap separates the splits (d0 needs {need} B)")
    s = settle(planner, OLD, HOLDERS, [], small, PROF, SHAPE, steps_left=1)
    assert s.plan != free and estimate(s.plan, small, PROF, SHAPE).feasible
