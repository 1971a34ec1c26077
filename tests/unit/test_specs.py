"""Pool, job and plan files: validation, one-line errors, and the Plan's pure functions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgepool.cli.main import main
from edgepool.errors import PlanError, SpecError
from edgepool.sim.lower import compute_order, lower, stage_orders, timeline
from edgepool.specs.plan import inflight_limit
from edgepool.specs import Plan, StagePlan, load_job, load_plan, load_pool
from edgepool.specs.layout import Layout, check_plan
from edgepool.specs.plan import Shape, split_counts

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
POOL = EXAMPLES / "pool-local.yaml"
JOB = EXAMPLES / "job-gpt-tiny.yaml"


def test_examples_load():
    pool = load_pool(POOL)
    assert [d.name for d in pool.devices] == ["laptop", "orin", "nano-1", "nano-2"]
    job = load_job(JOB)
    assert Path(job.data.path_for("orin")).is_file()
    plan = load_plan(EXAMPLES / "plan-hybrid.json")
    assert plan.parallelism == "hybrid" and plan.world_size == 4


def _write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


BAD_POOLS = {
    "unknown kind": ("devices:\n  - {name: a, kind: jetson-nanoo}\n", "unknown device kind 'jetson-nanoo'"),
    "wrong field": ("devices:\n  - {name: a, kind: jetson-nano, memroy_gb: 2}\n", "devices.0.memroy_gb: unknown field"),
    "bad medium": ("network: {medium: wifi}\ndevices:\n  - {name: a, kind: jetson-nano}\n", "network.medium"),
    "duplicate": ("devices:\n  - {name: a, kind: jetson-nano}\n  - {name: a, kind: host-cpu}\n", "appears twice"),
    "bad yaml": ("devices: [\n", "not valid YAML"),
    "no devices": ("name: x\n", "devices: required field is missing"),
}


@pytest.mark.parametrize("case", list(BAD_POOLS))
def test_bad_pool_is_one_line(tmp_path, capsys, case):
    text, expect = BAD_POOLS[case]
    pool = _write(tmp_path, "pool.yaml", text)
    rc = main(["train", "--pool", str(pool), "--job", str(JOB), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert expect in err, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # nothing started


BAD_JOBS = {
    "missing data": ("model: {family: gpt}\ndata: {path: nope.txt}\n", "does not exist"),
    "bad family": ("model: {family: gtp}\ndata: {path: x}\n", "model.family"),
    "negative batch": ("model: {family: gpt}\ndata: {path: x}\ntrain: {global_batch: -1}\n", "train.global_batch"),
    "bad optimizer": ("model: {family: gpt}\ndata: {path: x}\ntrain: {optimizer: adam2}\n", "train.optimizer"),
    "missing plan": ("model: {family: gpt}\ndata: {path: x}\nparallelism: {plan: none.json}\n", "plan file"),
    "seq too long": ("model: {family: gpt, max_seq_len: 16}\ndata: {path: x}\ntrain: {seq_len: 64}\n", "exceeds"),
}


@pytest.mark.parametrize("case", list(BAD_JOBS))
def test_bad_job_is_one_line(tmp_path, capsys, case):
    text, expect = BAD_JOBS[case]
    (tmp_path / "x").write_text("hello " * 100)
    job = _write(tmp_path, "job.yaml", text)
    rc = main(["train", "--pool", str(POOL), "--job", str(job), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and expect in err and len(err.splitlines()) == 1, err


BAD_PLANS = {
    "gap": ({"num_layers": 4, "stages": [{"layers": [0, 2], "devices": ["laptop"]}, {"layers": [3, 4], "devices": ["orin"]}]},
            "must be contiguous"),
    "short": ({"num_layers": 4, "stages": [{"layers": [0, 2], "devices": ["laptop"]}]}, "the last stage must end at 4"),
    "twice": ({"num_layers": 4, "stages": [{"layers": [0, 2], "devices": ["laptop"]}, {"layers": [2, 4], "devices": ["laptop"]}]},
              "more than one stage"),
    "stranger": ({"num_layers": 4, "stages": [{"layers": [0, 4], "devices": ["toaster"]}]}, "not in the pool"),
    "zero share": ({"num_layers": 4, "stages": [{"layers": [0, 4], "devices": ["laptop", "orin"], "shares": [1, 0]}]},
                   "must all be > 0"),
    "too thin": ({"num_layers": 4, "stages": [{"layers": [0, 4], "devices": ["laptop", "orin"], "shares": [50, 1]}]},
                 "gives device 'orin' 0 of 8"),
    "batch": ({"num_layers": 4, "num_microbatches": 3, "stages": [{"layers": [0, 4], "devices": ["laptop"]}]},
              "not divisible by num_microbatches 3"),
    "layers": ({"num_layers": 6, "stages": [{"layers": [0, 6], "devices": ["laptop"]}]}, "the model has 4"),
    "schedule": ({"num_layers": 4, "schedule": "zb", "stages": [{"layers": [0, 4], "devices": ["laptop"]}]}, "schedule"),
}


@pytest.mark.parametrize("case", list(BAD_PLANS))
def test_bad_plan_is_one_line(tmp_path, capsys, case):
    body, expect = BAD_PLANS[case]
    plan = _write(tmp_path, "plan.json", json.dumps(body))
    rc = main(["train", "--pool", str(POOL), "--job", str(JOB), "--plan", str(plan), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and expect in err and len(err.splitlines()) == 1, err


def test_cli_error_has_no_traceback_in_a_real_process(tmp_path):
    pool = _write(tmp_path, "pool.yaml", "devices:\n  - {name: a, kind: nope}\n")
    r = subprocess.run([sys.executable, "-m", "edgepool.cli.main", "train", "--pool", str(pool), "--job", str(JOB),
                        "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr and "unknown device kind 'nope'" in r.stderr


def _plan(**kw) -> Plan:
    base = dict(num_layers=4, stages=[StagePlan(layers=(0, 2), devices=("a", "b"), shares=(2, 1)),
                                      StagePlan(layers=(2, 4), devices=("c",))], num_microbatches=2)
    base.update(kw)
    return Plan(**base)


def test_plan_id_is_a_content_hash():
    p = _plan()
    assert len(p.plan_id) == 10
    assert Plan.model_validate_json(p.dumps()).plan_id == p.plan_id  # round trip keeps it
    assert _plan(schedule="1f1b").plan_id != p.plan_id  # an edit changes it
    from edgepool.specs.plan import Estimate

    assert p.with_estimate(Estimate(step_time_s=1.0)).plan_id == p.plan_id  # the estimate does not


@pytest.mark.parametrize("stages, label", [
    ([StagePlan(layers=(0, 4), devices=("a",))], "single"),
    ([StagePlan(layers=(0, 4), devices=("a", "b"), mode="sp")], "sp"),
    ([StagePlan(layers=(0, 1), devices=("a",)), StagePlan(layers=(1, 4), devices=("b",))], "pp"),
    ([StagePlan(layers=(0, 1), devices=("a", "b")), StagePlan(layers=(1, 4), devices=("c",))], "hybrid"),
])
def test_parallelism_label(stages, label):
    assert Plan(num_layers=4, stages=stages).parallelism == label


@given(st.integers(0, 500), st.lists(st.floats(0.01, 100), min_size=1, max_size=8))
@settings(max_examples=200, deadline=None)
def test_split_counts_sums_and_is_proportional(total, weights):
    counts = split_counts(total, weights)
    assert sum(counts) == total and min(counts) >= 0
    for c, w in zip(counts, weights):
        assert abs(c - total * w / sum(weights)) < 1.0 + 1e-9


@given(
    modes=st.lists(st.sampled_from(["dp", "sp", "tp"]), min_size=1, max_size=3),
    sizes=st.lists(st.integers(1, 3), min_size=3, max_size=3),
    shares=st.lists(st.integers(1, 3), min_size=9, max_size=9),
)
@settings(max_examples=150, deadline=None)
def test_boundaries_cover_every_need_exactly_once(modes, sizes, shares):
    names = iter(f"d{i}" for i in range(20))
    stages, it = [], iter(shares)
    for s, mode in enumerate(modes):
        devs = tuple(next(names) for _ in range(sizes[s]))
        stages.append(StagePlan(layers=(s, s + 1), devices=devs, mode=mode, shares=tuple(next(it) for _ in devs)))
    plan = Plan(num_layers=len(modes), stages=stages, num_microbatches=2)
    shape = Shape(global_batch=12, seq_len=12, num_heads=6, ffn=24)
    check_plan(plan, shape)
    from edgepool.specs.plan import stage_ranks
    lay = Layout.of(plan, shape)

    ranks = stage_ranks(plan)
    for k in range(len(stages) + 1):
        for backward in (False, True):
            fwd_dst = (ranks[0], list(lay.owners)) if k == len(stages) else (ranks[k], list(lay.regions[k]))
            fwd_src = (ranks[0], list(lay.owners)) if k == 0 else (ranks[k - 1], list(lay.regions[k - 1]))
            dst_ranks, need = fwd_src if backward else fwd_dst
            cells: dict[int, list] = {r: [] for r in dst_ranks}
            for t in lay.boundary(k, backward=backward):
                b0, b1, t0, t1 = t.region
                cells[t.dst] += [(b, x) for b in range(b0, b1) for x in range(t0, t1)]
            for r, (b0, b1, t0, t1) in zip(dst_ranks, need):
                want = sorted((b, x) for b in range(b0, b1) for x in range(t0, t1))
                assert sorted(cells[r]) == want  # covered, and exactly once


@pytest.mark.parametrize("stages,m", [(1, 4), (2, 4), (4, 4), (4, 8), (3, 2)])
def test_1f1b_order_is_complete_and_bounds_in_flight(stages, m):
    for s in range(stages):
        order = compute_order(stages, s, m, "1f1b")
        heads = [("H", i) for i in range(m)] if s == 0 else []  # the data owners' heads
        assert sorted(order) == sorted([("F", i) for i in range(m)] + [("B", i) for i in range(m)] + heads)
        alive = peak = 0
        for kind, _ in order:
            alive += {"F": 1, "B": -1}.get(kind, 0)
            peak = max(peak, alive)
        # One per stage to the end, plus the owners' head once there are two stages or more.
        assert peak == min(stages - s + (stages > 1), m) == inflight_limit(stages, s, m, "1f1b")
    gpipe = compute_order(stages, 0, m, "gpipe")
    assert gpipe[:m] == [("F", i) for i in range(m)]  # gpipe holds all m at once


def test_heads_run_as_soon_as_their_microbatch_arrives():
    """Stage 0 does not hold head i back until its own backward of i: with 4 stages the
    head of micro-batch 1 comes before stage 0's backward of micro-batch 0."""
    order = compute_order(4, 0, 8, "1f1b")
    assert order.index(("H", 1)) < order.index(("B", 0))
    for i in range(8):
        assert order.index(("H", i)) < order.index(("B", i))


@pytest.mark.parametrize("stages,m,times", [
    (2, 4, None), (3, 6, None), (4, 8, None), (2, 8, ((0.05, 0.05), (0.1, 0.1), 0.4, (0.0, 0.01, 0.01))),
    (3, 6, ((1.0, 1.5, 1.0), (2.0, 3.0, 2.0), 0.1, (0.0, 0.3, 0.3, 0.3)))])
def test_1f1b_heads_run_as_soon_as_their_activation_can_be_back(stages, m, times):
    """In the laid-out step (``timeline``), the head of micro-batch i starts when its
    activation can be back from the last stage, or when stage 0 finishes the pass it was
    in then: no forward or backward of stage 0 starts between the two."""
    tl = timeline(stages, m, "1f1b", times)
    link_back = times[3][stages] if times else 0.0
    last_fwd = {i: end for k, i, _, end in tl[stages - 1] if k == "F"}
    for k, i, start, _ in tl[0]:
        if k != "H":
            continue
        arrives = last_fwd[i] + link_back
        assert start >= arrives - 1e-9
        assert not [p for p in tl[0] if p[0] != "H" and arrives - 1e-9 <= p[2] < start - 1e-9], (i, tl[0])


def test_1f1b_orders_of_two_stages():
    """The last stage alternates (its forward of i + 1 covers the round trip of i through
    the owners' head); stage 0 runs each head before its next pass."""
    s0, s1 = stage_orders(2, 4, "1f1b")
    assert " ".join(f"{k}{i}" for k, i in s0) == "F0 F1 H0 H1 F2 B0 H2 F3 B1 H3 B2 B3"
    assert " ".join(f"{k}{i}" for k, i in s1) == "F0 F1 B0 F2 B1 F3 B2 B3"
    ops = [str(o) for o in lower(Plan(num_layers=2, num_microbatches=4, schedule="1f1b", stages=[
        StagePlan(layers=(0, 1), devices=("a",)), StagePlan(layers=(1, 2), devices=("b",))]))[0]]
    # the owner's head of micro-batch 2 comes before its backward of micro-batch 1, which arrives later
    assert ops.index("head[2]") < ops.index("bwd[1]") and ops.index("head[2]") > ops.index("bwd[0]")


def test_pass_times_change_the_order_and_the_id_only_when_set():
    base = Plan(num_layers=2, num_microbatches=4, schedule="1f1b", stages=[
        StagePlan(layers=(0, 1), devices=("a",)), StagePlan(layers=(1, 2), devices=("b",))])
    timed = Plan.model_validate({**base.model_dump(mode="json"), "pass_times": {
        "fwd_s": [1, 1], "bwd_s": [2, 2], "head_s": 8, "link_s": [0, 0.5, 0.5]}})
    assert "pass_times" not in base.dumps() and timed.plan_id != base.plan_id
    assert Plan.model_validate_json(timed.dumps()) == timed
    assert [str(o) for o in lower(timed)[0]][:9] == ["embed[0]", "recv_act[0]", "fwd[0]", "send_act[0]", "embed[1]",
                                                      "recv_act[1]", "fwd[1]", "send_act[1]", "embed[2]"]
    assert lower(timed) != lower(base)
    with pytest.raises(ValueError, match="pass_times has 1 forward"):
        Plan.model_validate({**base.model_dump(mode="json"), "pass_times": {
            "fwd_s": [1], "bwd_s": [2, 2], "head_s": 8, "link_s": [0, 0.5, 0.5]}})


def test_lower_gives_owners_embed_and_head():
    ops = lower(_plan())
    kinds = {r: [o.kind for o in v] for r, v in ops.items()}
    assert kinds[0].count("embed") == 2 and kinds[0].count("head") == 2
    assert "embed" not in kinds[2] and kinds[2][-1] == "optim"
    assert "sync_grads" in kinds[0] and "sync_grads" not in kinds[2]


def test_tp_split_respects_kv_groups():
    plan = Plan(num_layers=1, stages=[StagePlan(layers=(0, 1), devices=("a", "b"), mode="tp", shares=(3, 1))])

    split = Layout.of(plan, Shape(global_batch=2, seq_len=4, num_heads=8, ffn=16, num_kv_heads=4)).splits[0]
    assert split.heads == (6, 2) and sum(split.ffn) == 16
    with pytest.raises(PlanError):
        Layout.of(plan, Shape(global_batch=2, seq_len=4, num_heads=8, ffn=16, num_kv_heads=3))


def test_spec_error_is_a_value_error():
    assert issubclass(SpecError, ValueError) and issubclass(PlanError, ValueError)
