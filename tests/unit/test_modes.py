"""The mode registry: one module per mode, and nobody else branches on a mode's name."""

from __future__ import annotations

import ast
import typing
from pathlib import Path

import pytest

from edgepool import modes
from edgepool.cost import analytic_profile
from edgepool.cost.model import estimate, shape_for
from edgepool.cost.network import Network
from edgepool.errors import PlanError
from edgepool.models.config import preset
from edgepool.cost.profile import ModelDims
from edgepool.sim.engine import simulate
from edgepool.sim.lower import is_data_owner
from edgepool.specs import Plan, StagePlan
from edgepool.specs.layout import Layout
from edgepool.specs.plan import StageMode

from _plan_helpers import make_pool

SRC = Path(modes.__file__).resolve().parents[1]


def _mode_literals(node: ast.AST) -> list[str]:
    """Mode names written as string constants in ``node`` (a constant or a collection)."""
    if isinstance(node, ast.Constant) and node.value in modes.NAMES:
        return [node.value]
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return [x for e in node.elts for x in _mode_literals(e)]
    return []


def test_no_module_outside_the_modes_branches_on_a_mode_name():
    hits = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        if rel.startswith("modes/"):
            continue
        for node in ast.walk(ast.parse(path.read_text(), filename=rel)):
            if isinstance(node, ast.Compare):
                names = [x for part in [node.left, *node.comparators] for x in _mode_literals(part)]
            elif isinstance(node, ast.match_case):
                names = [x for x in _mode_literals(getattr(node.pattern, "value", node.pattern))]
            else:
                continue
            if names:
                hits.append(f"{rel}:{node.lineno} compares with {names}")
    assert not hits, "branches on mode names outside edgepool.modes:\n" + "\n".join(hits)


def test_the_scanner_would_catch_a_branch():
    tree = ast.parse('if st.mode == "tp":\n    pass\nif m in ("dp", "sp"):\n    pass\n')
    found = [x for n in ast.walk(tree) if isinstance(n, ast.Compare)
             for part in [n.left, *n.comparators] for x in _mode_literals(part)]
    assert found == ["tp", "dp", "sp"]


def test_registry_matches_the_plan_schema_and_names_the_known_modes():
    assert set(modes.NAMES) == set(typing.get_args(StageMode))
    for name in modes.NAMES:
        assert modes.get(name).name == name
    with pytest.raises(PlanError, match="known: dp, tp, sp, fsdp"):
        modes.get("zero")
    with pytest.raises(ValueError):
        StagePlan(layers=(0, 1), devices=("a",), mode="zero")


def test_modes_import_without_torch():
    import subprocess
    import sys

    code = ("import sys, edgepool.modes as m; [m.get(n) for n in m.NAMES]; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def _fsdp_and_dp(n_devices: int = 2):
    pool = make_pool(["jetson-orin-nano"] * n_devices, medium="switched", bandwidth_mbps=1000)
    cfg = preset("gpt", "small", vocab_size=50257)
    prof = analytic_profile(ModelDims.of(cfg))
    shape = shape_for(prof, 8, 64)
    names = tuple(d.name for d in pool.devices)
    plans = {m: Plan(num_layers=prof.num_layers, stages=[StagePlan(layers=(0, prof.num_layers), mode=m, devices=names,
                                                                   shares=tuple(float(i + 1) for i in range(n_devices)))])
             for m in ("dp", "fsdp")}
    return pool, prof, shape, plans


@pytest.mark.parametrize("n", [2, 3])
def test_fsdp_holds_less_and_sends_more_than_dp(n):
    pool, prof, shape, plans = _fsdp_and_dp(n)
    dp, fsdp = (estimate(plans[m], pool, prof, shape) for m in ("dp", "fsdp"))
    for name in plans["dp"].devices:
        a, b = dp.devices[name], fsdp.devices[name]
        assert b.memory_parts["optimizer"] == pytest.approx(a.memory_parts["optimizer"] / n)
        assert b.memory_bytes < a.memory_bytes
        assert b.bytes_moved > a.bytes_moved  # the parameters gathered twice and reduced per micro-batch
    assert fsdp.sync_s == 0 and dp.sync_s > 0
    # the backward's all-gather, and its reduce-scatter as gloo runs it: an all-reduce of each unit
    net, names = Network.of(pool), list(plans["fsdp"].devices)
    units = [lp.params_at() for lp in prof.blocks] + [prof.embed.params_at(), prof.head.params_at()]
    assert fsdp.stages[0].coll_bwd_s == pytest.approx(
        fsdp.stages[0].coll_fwd_s + sum(net.allreduce_time(names, u) for u in units))
    assert fsdp.stages[0].coll_bwd_s > 2.9 * fsdp.stages[0].coll_fwd_s
    # The simulator runs the same ops, and agrees on memory (it is exact on a single stage).
    sim = simulate(plans["fsdp"], pool, prof, shape)
    for name in plans["fsdp"].devices:
        assert sim.devices[name].peak_memory_bytes == pytest.approx(fsdp.devices[name].memory_bytes, rel=1e-9)
        assert sim.devices[name].bytes_moved == pytest.approx(fsdp.devices[name].bytes_moved, rel=1e-6)


def test_fsdp_every_device_owns_its_samples():
    pool, prof, shape, plans = _fsdp_and_dp(3)
    lay = Layout.of(plans["fsdp"], shape)
    assert [r[1] - r[0] for r in lay.owners] == list(lay.splits[0].batch)
    assert all(is_data_owner(plans["fsdp"], r) for r in range(3))
    # every owner feeds and reads its own rows: the single stage's boundaries stay local
    assert all(t.src == t.dst for k in (0, 1) for t in lay.fwd[k] + lay.bwd[k])
