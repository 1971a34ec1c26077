"""``runtime.reshard``: the state of one plan cut anew for another, for every pair of modes."""

from __future__ import annotations

import itertools

import pytest
import torch

from edgepool.models.config import preset
from edgepool.runtime.reshard import Tensors, assemble, box, full_shapes, holdings, reshard
from edgepool.specs import Plan, StagePlan
from edgepool.specs.plan import Shape

L = 4


def _plan(*stages, m=2) -> Plan:
    return Plan(num_layers=L, stages=[StagePlan(**s) for s in stages], num_microbatches=m)


PLANS = {
    "single": _plan(dict(layers=(0, L), devices=("a",))),
    "dp": _plan(dict(layers=(0, L), mode="dp", devices=("a", "b", "c"), shares=(3, 2, 1))),
    "tp": _plan(dict(layers=(0, L), mode="tp", devices=("b", "a"), shares=(3, 2))),
    "sp": _plan(dict(layers=(0, L), mode="sp", devices=("a", "b", "c"), shares=(1, 2, 2))),
    "fsdp": _plan(dict(layers=(0, L), mode="fsdp", devices=("c", "a", "b"), shares=(2, 1, 1))),
    "pp": _plan(dict(layers=(0, 1), devices=("a",)), dict(layers=(1, 3), devices=("b",)),
                dict(layers=(3, 4), devices=("c",))),
    "hybrid": _plan(dict(layers=(0, 2), mode="fsdp", devices=("a", "b"), shares=(2, 1)),
                    dict(layers=(2, 4), mode="tp", devices=("c", "d"), shares=(1, 1))),
    "hybrid2": _plan(dict(layers=(0, 3), mode="dp", devices=("d", "c"), shares=(1, 3)),
                     dict(layers=(3, 4), mode="sp", devices=("a", "b"))),
}


@pytest.fixture(scope="module", params=["gpt", "llama"])
def model(request):
    cfg = preset(request.param, "tiny", vocab_size=50, num_layers=L,
                 num_kv_heads=2 if request.param == "llama" else None)
    shapes = full_shapes(cfg)
    g = torch.Generator().manual_seed(20261203)
    full = {}
    for name, s in shapes.items():
        full[f"model/{name}"] = torch.randn(s, generator=g)
        full[f"optim/{name}/exp_avg"] = torch.randn(s, generator=g)
        full[f"optim/{name}/exp_avg_sq"] = torch.rand(s, generator=g)
        full[f"optim/{name}/step"] = torch.tensor(7.0)
    shape = Shape(global_batch=12, seq_len=16, num_heads=cfg.num_heads, ffn=cfg.ffn, num_kv_heads=cfg.num_kv_heads)
    return shapes, shape, full


def _cut(full, shapes, plan, rank, shape):
    """What ``rank`` holds under ``plan``, cut straight from the full state."""
    out = {}
    for name, spec in holdings(plan, rank, shapes, shape).items():
        sl = tuple(slice(a, b) for a, b in box(spec, shapes[name]))
        out[f"model/{name}"] = full[f"model/{name}"][sl]
        out[f"optim/{name}/exp_avg"] = full[f"optim/{name}/exp_avg"][sl]
        out[f"optim/{name}/exp_avg_sq"] = full[f"optim/{name}/exp_avg_sq"][sl]
        out[f"optim/{name}/step"] = full[f"optim/{name}/step"]
    return out


def test_holdings_cover_the_model_under_every_plan(model):
    shapes, shape, _ = model
    for plan in PLANS.values():
        held = [holdings(plan, r, shapes, shape) for r in range(plan.world_size)]
        assert set().union(*held) == set(shapes)


@pytest.mark.parametrize("old,new", list(itertools.product(PLANS, PLANS)))
def test_every_pair_of_modes(model, old, new):
    shapes, shape, full = model
    a, b = PLANS[old], PLANS[new]
    files = {r: Tensors(_cut(full, shapes, a, r, shape)) for r in range(a.world_size)}
    plan = reshard(a, b, {f"file-{r}": [r] for r in range(a.world_size)}, shapes=shapes, shape=shape)
    assert plan.missing == []
    for j in range(b.world_size):
        got = assemble(j, plan, shapes, lambda holder, r: files[r])
        want = _cut(full, shapes, b, j, shape)
        assert set(got) == set(want)
        for k in want:
            assert torch.equal(got[k], want[k]), k


def test_same_plan_moves_nothing(model):
    shapes, shape, _ = model
    for p in PLANS.values():
        plan = reshard(p, p, {r: [r] for r in range(p.world_size)}, shapes=shapes, shape=shape,
                       prefer=lambda j, h: j == h)
        assert all(m.holder == j for j, moves in plan.moves.items() for m in moves)


def test_survivors_and_replicas(model):
    """pp over a, b, c loses b; each rank's replica sits on the next rank (c keeps b's)."""
    shapes, shape, full = model
    old = PLANS["pp"]
    new = _plan(dict(layers=(0, 2), devices=("a",)), dict(layers=(2, 4), devices=("c",)))
    held = {0: Tensors(_cut(full, shapes, old, 0, shape)), 1: Tensors(_cut(full, shapes, old, 1, shape)),
            2: Tensors(_cut(full, shapes, old, 2, shape))}
    # new rank 0 is a (old rank 0, with c's replica), new rank 1 is c (old 2, with b's replica)
    plan = reshard(old, new, {"a": [0, 2], "c": [2, 1]}, shapes=shapes, shape=shape,
                   prefer=lambda j, h: (j, h) in ((0, "a"), (1, "c")))
    assert plan.missing == []
    assert {m.holder for m in plan.moves[1]} == {"c"}  # c already holds everything it needs
    assert {(m.holder, m.old_rank) for m in plan.moves[0]} == {("a", 0), ("c", 1)}
    for j in range(2):
        got = assemble(j, plan, shapes, lambda h, r: held[r])
        want = _cut(full, shapes, new, j, shape)
        assert all(torch.equal(got[k], want[k]) for k in want) and set(got) == set(want)
    # nobody kept b's state: its layers are missing, and named
    lost = reshard(old, new, {"a": [0], "c": [2]}, shapes=shapes, shape=shape)
    assert lost.missing and all(n.startswith(("blocks.1.", "blocks.2.")) for _, n in lost.missing)


def test_tp_and_fsdp_cuts_match_the_engine(model):
    """The pure cuts are the ones the modes make (``shard_block``, FSDP2's dim-0 chunks)."""
    from edgepool import modes
    from edgepool.models.layers import Block
    from edgepool.models.tp import shard_block
    from edgepool.specs.layout import Layout

    shapes, shape, _ = model
    block_shapes = {n[len("blocks.0."):]: s for n, s in shapes.items() if n.startswith("blocks.0.")}
    family = "llama" if "mlp.gate.weight" in block_shapes else "gpt"
    cfg = preset(family, "tiny", vocab_size=50, num_layers=L, num_kv_heads=2 if family == "llama" else None)
    split = Layout.of(PLANS["tp"], shape).splits[0]
    tp = modes.get("tp")
    for index in range(2):
        block = Block(cfg)
        heads, ffn = tp._ranges(split, index)
        spec = shard_block(block, heads=heads, ffn=ffn)
        for k, s in block_shapes.items():
            assert spec.get(k) == tp.shard_of(f"blocks.0.{k}", s, split, index, shape), k
            want = tuple(b - a for a, b in box(spec.get(k), s))
            assert tuple(dict(block.named_parameters())[k].shape) == want, k
    fsdp_split = Layout.of(PLANS["fsdp"], shape).splits[0]
    for name, s in shapes.items():
        rows = torch.zeros(s[0]).chunk(3)
        got = [modes.get("fsdp").shard_of(name, s, fsdp_split, i, shape) for i in range(3)]
        assert [g[2] - g[1] for g in got][: len(rows)] == [len(r) for r in rows]


@pytest.mark.parametrize("name", sorted(PLANS))
def test_one_lost_rank_is_always_held_in_memory(model, name):
    """Under every plan, whichever rank is lost, the survivors' own state and the
    replicas ``backups`` places give every rank its state back bit-exact, with no file:
    a rank with a dp twin needs no replica, every other one has a peer (never itself,
    of another stage where there is one) keeping one."""
    from edgepool.runtime.reshard import Tensors
    from edgepool.specs.layout import backups, role_of, twins

    shapes, shape, full = model
    plan = PLANS[name]
    to = backups(plan)
    n = plan.world_size
    for r, b in to.items():
        assert b != r and not twins(plan, r)
        if len(plan.stages) > 1:
            assert role_of(plan, b).stage != role_of(plan, r).stage
    assert all(r in to for r in range(n) if not twins(plan, r)) or n == 1
    held = [_cut(full, shapes, plan, r, shape) for r in range(n)]
    for lost in range(n) if n > 1 else []:
        holders = {("mem", s): [s] + [q for q, b in to.items() if b == s and q == lost] for s in range(n) if s != lost}
        moves = reshard(plan, plan, holders, shapes=shapes, shape=shape)
        assert not moves.missing, (lost, moves.missing[:2])
        for j in range(n):
            got = assemble(j, moves, shapes, lambda h, old: Tensors(held[old]))
            assert set(got) == set(held[j]) and all(torch.equal(got[k], held[j][k]) for k in got)


def test_twins_are_dp_groups_only():
    from edgepool.specs.layout import backups, twins

    assert twins(PLANS["dp"], 0) == [1, 2] and twins(PLANS["sp"], 1) == [] and twins(PLANS["fsdp"], 0) == []
    assert backups(PLANS["single"]) == {} and backups(PLANS["dp"]) == {}
    assert backups(PLANS["pp"]) == {0: 1, 1: 2, 2: 0}
    assert backups(PLANS["tp"]) == {0: 1, 1: 0}
    assert backups(PLANS["hybrid2"]) == {2: 0, 3: 0}  # the dp stage's ranks are twins; sp's back up on stage 0
