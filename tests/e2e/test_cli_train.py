"""`edgepool train` end to end: every mode on 4 local processes agrees with `single`.

Real processes started by the launcher (as a user runs it), a tiny GPT, 3 steps. The
per-step losses of every mode must agree with the single-device run to 1e-4 relative.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgepool.cli.main import main

pytestmark = pytest.mark.e2e  # real processes; `pytest -m "not e2e"` leaves them out

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
POOL = EXAMPLES / "pool-local.yaml"
STEPS = 3


def _job(tmp_path: Path, schedule: str) -> Path:
    text = (EXAMPLES / "job-gpt-tiny.yaml").read_text().replace("schedule: 1f1b", f"schedule: {schedule}")
    text = text.replace("../src/", str(EXAMPLES.parent / "src") + "/")
    p = tmp_path / f"job-{schedule}.yaml"
    p.write_text(text)
    return p


def _plan(tmp_path: Path, family: str, schedule: str) -> list[str]:
    """The plain family plan over all four devices (``--parallelism`` would let the
    planner leave devices out), as a plan file."""
    from edgepool.launch.prepare import proportional_plan
    from edgepool.specs import load_job, load_pool

    plan = proportional_plan(load_pool(POOL), load_job(_job(tmp_path, schedule)), 4, family)
    assert plan.world_size == 4
    path = tmp_path / f"plan-{family}.json"
    path.write_text(plan.dumps())
    return ["--plan", str(path)]


def _train(tmp_path: Path, name: str, *args: str, schedule: str = "1f1b") -> list[float]:
    out = tmp_path / name
    rc = main(["train", "--pool", str(POOL), "--job", str(_job(tmp_path, schedule)), "--steps", str(STEPS),
               "--out", str(out), "--no-progress", *args])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == STEPS
    return [json.loads(ln)["loss"] for ln in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("single"), "single", "--parallelism", "single")


@pytest.mark.parametrize("name, family, schedule", [
    ("dp", "dp", "1f1b"), ("sp", "sp", "1f1b"), ("tp", "tp", "1f1b"), ("pp-gpipe", "pp", "gpipe"),
    ("pp-1f1b", "pp", "1f1b"), ("hybrid", "hybrid", "1f1b"), ("hybrid-plan-file", None, "1f1b"),
])
def test_mode_matches_single(tmp_path, single, name, family, schedule):
    args = _plan(tmp_path, family, schedule) if family else ["--plan", str(EXAMPLES / "plan-hybrid.json")]
    losses = _train(tmp_path, name, *args, schedule=schedule)
    assert len(losses) == STEPS
    for a, b in zip(single, losses):
        assert abs(a - b) <= 1e-4 * abs(a), (name, single, losses)


def test_fsdp_on_three_processes_matches_single(tmp_path, single):
    """Sharded data parallelism over three local processes with uneven batch shares."""
    from edgepool.specs import Plan, StagePlan

    plan = Plan(num_layers=4, stages=[StagePlan(layers=(0, 4), mode="fsdp", devices=("laptop", "orin", "nano-1"),
                                                shares=(2.0, 1.5, 1.0))])
    path = tmp_path / "plan-fsdp.json"
    path.write_text(plan.dumps())
    losses = _train(tmp_path, "fsdp", "--plan", str(path))
    summary = json.loads((tmp_path / "fsdp" / "summary.json").read_text())
    assert set(summary["devices"]) == {"laptop", "orin", "nano-1"}
    assert all(d["bytes_sent"] > 0 for d in summary["devices"].values())  # FSDP2's collectives are counted
    for a, b in zip(single, losses):
        assert abs(a - b) <= 1e-4 * abs(a), ("fsdp", single, losses)


def test_parallelism_flag_takes_the_planners_best_of_family(tmp_path):
    losses = _train(tmp_path, "planned-pp", "--parallelism", "pp")
    run = json.loads((tmp_path / "planned-pp" / "run.json").read_text())
    assert run["plan"]["parallelism"] in ("pp", "single") and run["plan"]["estimate"]["source"] == "simulator"
    assert len(losses) == STEPS


def test_a_killed_rank_is_reported(tmp_path, capsys, monkeypatch):
    """A rank that dies is named with its device and reason; the others are stopped."""
    monkeypatch.setenv("EDGEPOOL_FAULT", "rank=2,step=1")
    rc = main(["train", "--pool", str(POOL), "--job", str(_job(tmp_path, "1f1b")), *_plan(tmp_path, "pp", "1f1b"),
               "--steps", "3", "--out", str(tmp_path / "o"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "rank 2 (nano-1) failed" in err and "injected fault" in err


def test_kill_and_resume_gives_the_same_trajectory(tmp_path, single, monkeypatch):
    """A run killed mid-way, resumed with --resume, repeats the uninterrupted losses."""
    job = _job(tmp_path, "1f1b")  # checkpoint_every: 5 in the example; kill at step 6 of 8
    args = ["train", "--pool", str(POOL), "--job", str(job), *_plan(tmp_path, "hybrid", "1f1b"), "--steps", "8",
            "--out", str(tmp_path / "cut"), "--no-progress"]
    monkeypatch.setenv("EDGEPOOL_FAULT", "rank=1,step=6")
    assert main(args) == 2
    monkeypatch.delenv("EDGEPOOL_FAULT")
    assert main(args + ["--resume"]) == 0
    assert main(["train", "--pool", str(POOL), "--job", str(job), *_plan(tmp_path, "hybrid", "1f1b"), "--steps", "8",
                 "--out", str(tmp_path / "full"), "--no-progress"]) == 0
    read = lambda d: [json.loads(ln)["loss"] for ln in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert len(read("cut")) == 8
    assert read("cut") == read("full")
    assert read("full")[:STEPS] == pytest.approx(single, rel=1e-4)


def test_a_pool_that_fits_the_model_only_with_recomputation_trains(tmp_path):
    """The planner turns recomputation on where nothing fits without it, and the run
    (launched by ``train --parallelism auto``, as a user runs it) trains with it."""
    import math
    import sys

    import yaml

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
    from test_planner import _recompute_pool

    job, _prof, _shape, pool = _recompute_pool({"steps": STEPS})
    gb = pool.devices[0].memory_gb
    pool_file = tmp_path / "pool.yaml"
    pool_file.write_text(yaml.safe_dump({"network": {"medium": "shared", "bandwidth_mbps": 100}, "devices": [
        {"name": "small", "kind": "host-cpu", "host": "local", "memory_gb": gb}]}))
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump({**job.model_dump(mode="json", exclude_defaults=True),  # the job priced
                                        "data": {"path": str(EXAMPLES.parent / "src/edgepool/data/corpus.txt")},
                                        "parallelism": "auto"}))
    out = tmp_path / "run"
    assert main(["train", "--pool", str(pool_file), "--job", str(job_file), "--out", str(out), "--no-progress"]) == 0
    run = json.loads((out / "run.json").read_text())
    assert [st.get("recompute") for st in run["plan"]["stages"]] == [True]
    losses = [json.loads(ln)["loss"] for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == STEPS and all(math.isfinite(x) for x in losses)
