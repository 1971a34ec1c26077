"""Runtime behaviour beyond parity: checkpoints and resume, dead peers, metrics."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from edgepool.errors import PeerError
from edgepool.runtime.train import RunSpec, run_rank
from edgepool.specs import JobSpec, Plan, PoolSpec, StagePlan
from edgepool.testing import CORPUS
from edgepool.testing.dist import run_distributed

POOL = PoolSpec(devices=[{"name": "a", "kind": "host-cpu"}, {"name": "b", "kind": "jetson-nano"}])
PP = Plan(num_layers=4, stages=[StagePlan(layers=(0, 2), devices=("a",)), StagePlan(layers=(2, 4), devices=("b",))],
          num_microbatches=2, schedule="1f1b")


def _job(**train) -> JobSpec:
    return JobSpec(model={"family": "gpt", "size": "tiny"}, data={"path": str(CORPUS)},
                   train={"global_batch": 4, "seq_len": 16, "steps": 6, "lr": 1e-3, "checkpoint_every": 2, **train})


def _run(rank, world, spec_json):
    spec = RunSpec.model_validate_json(spec_json)
    messages = []
    run_rank(rank, world, spec, log=messages.append)
    return messages


def _train(out: Path, steps: int, resume: bool = False, plan: Plan = PP) -> list[str]:
    spec = RunSpec(pool=POOL, job=_job(), plan=plan, out_dir=str(out), steps=steps, resume=resume)
    return run_distributed(_run, plan.world_size, spec.model_dump_json())[0]


def _losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def test_metrics_and_summary(tmp_path):
    _train(tmp_path, 3)
    recs = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [0, 1, 2]
    for r in recs:
        assert r["samples_per_s"] == pytest.approx(4 / r["step_time_s"])
        assert r["tokens_per_s"] == pytest.approx(4 * 16 / r["step_time_s"])
        assert set(r["devices"]) == {"a", "b"}
        assert all(d["bytes_sent"] > 0 and d["peak_memory_bytes"] > 10**6 for d in r["devices"].values())
    # Per micro-batch ([2, 16, 64] floats): a sends stage 0's output to b and the loss
    # gradient of its own samples back to b; b sends its output to a's head and the
    # gradient of stage 0's output back to a.
    one = 2 * 16 * 64 * 4
    assert recs[0]["devices"]["a"]["bytes_sent"] == 2 * 2 * one
    assert recs[0]["devices"]["b"]["bytes_sent"] == 2 * 2 * one
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["plan_id"] == PP.plan_id and summary["parallelism"] == "pp"
    assert summary["final_loss"] == recs[-1]["loss"]
    assert summary["devices"]["b"]["bytes_sent"] == sum(r["devices"]["b"]["bytes_sent"] for r in recs)
    trace = json.loads((tmp_path / "trace.json").read_text())
    assert [e[0] for e in trace["ranks"][1]["events"]][:3] == ["recv_act[0]", "fwd[0]", "send_act[0]"]


def _run_replayed(rank, world, spec_json):
    from edgepool.energy import ReplayMeter

    spec = RunSpec.model_validate_json(spec_json)
    watts = {"a": 7.5, "b": 2.5}
    run_rank(rank, world, spec, log=lambda m: None,
             meter_factory=lambda run, device, engine: (ReplayMeter.constant_power({device: watts[device]}), []))


def test_step_records_carry_each_devices_meter_reading(tmp_path):
    """Each rank's meter is a window around each step; the record keeps its joules and label."""
    spec = RunSpec(pool=POOL, job=_job(), plan=PP, out_dir=str(tmp_path), steps=3)
    run_distributed(_run_replayed, 2, spec.model_dump_json())
    recs = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for r in recs:
        for name, watts in (("a", 7.5), ("b", 2.5)):
            d = r["devices"][name]
            assert d["energy_source"] == "measured:replay"
            # the window is the rank's own step (its start waits on its peers): power times
            # a duration under the whole run's
            assert 0 < d["energy_j"] < watts * 60
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["devices"]["a"]["energy_source"] == "measured:replay"
    assert summary["devices"]["a"]["mean_energy_j"] == pytest.approx(
        sum(r["devices"]["a"]["energy_j"] for r in recs[1:]) / (len(recs) - 1))


def test_default_meter_here_is_modelled_and_says_so(tmp_path):
    _train(tmp_path, 2)
    recs = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(d["energy_source"] == "modelled" and d["energy_j"] > 0 for r in recs for d in r["devices"].values())


def test_resume_continues_the_same_trajectory(tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    _train(full, 6)
    _train(cut, 4)  # stops after step 4, as if killed after its checkpoint
    assert sorted(p.name for p in (cut / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    log = _train(cut, 6, resume=True)
    assert any("resuming after step 4" in m for m in log)
    assert _losses(cut) == _losses(full)  # exactly, step by step


def test_resume_under_fsdp_continues_the_same_trajectory(tmp_path):
    """Sharded parameters and optimizer state come back from each rank's own file."""
    fsdp = Plan(num_layers=4, stages=[StagePlan(layers=(0, 4), mode="fsdp", devices=("a", "b"), shares=(3, 1))])
    full, cut = tmp_path / "full", tmp_path / "cut"
    _train(full, 6, plan=fsdp)
    _train(cut, 4, plan=fsdp)
    log = _train(cut, 6, resume=True, plan=fsdp)
    assert any("resuming after step 4" in m for m in log)
    assert _losses(cut) == _losses(full)


def test_corrupt_and_partial_checkpoints_are_refused(tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    _train(full, 6)
    _train(cut, 4)
    ck = cut / "checkpoints"
    # step 4: rank 1's file corrupted; a partial step 6 with no manifest.
    f = ck / "step-000004" / "rank-1.safetensors"
    f.write_bytes(f.read_bytes()[:-10] + b"0123456789")
    (ck / "step-000006").mkdir()
    (ck / "step-000006" / "rank-0.safetensors").write_bytes(b"partial")
    log = _train(cut, 6, resume=True)
    assert any("step-000006 refused: no manifest" in m for m in log)
    assert any("step-000004 refused: rank-1.safetensors does not match its checksum" in m for m in log)
    assert any("resuming after step 2" in m for m in log)
    assert _losses(cut) == _losses(full)


SINGLE = Plan(num_layers=4, stages=[StagePlan(layers=(0, 4), devices=("a",))])
FSDP = Plan(num_layers=4, stages=[StagePlan(layers=(0, 4), mode="fsdp", devices=("a", "b"), shares=(3, 1))])
TP_PP = Plan(num_layers=4, stages=[StagePlan(layers=(0, 1), devices=("b",)),
                                   StagePlan(layers=(1, 4), mode="tp", devices=("a", "c"), shares=(1, 3))])
POOL3 = PoolSpec(devices=[*POOL.devices, {"name": "c", "kind": "host-cpu"}])


@pytest.mark.parametrize("before,after", [(PP, SINGLE), (FSDP, TP_PP)], ids=["pp-to-single", "fsdp-to-tp-pp"])
def test_resume_under_another_plan_continues_the_trajectory(tmp_path, before, after):
    """A checkpoint is resharded to the plan that resumes it: a device fewer (pp on a and
    b, then a alone), or a device more with layers and shards moved (fsdp over a, b, then
    b's stage 0 and a tp stage over a and c). Losses as uninterrupted, to 1e-5."""
    full, cut = tmp_path / "full", tmp_path / "cut"

    def train(out, plan, steps, resume=False):
        spec = RunSpec(pool=POOL3, job=_job(), plan=plan, out_dir=str(out), steps=steps, resume=resume)
        return run_distributed(_run, plan.world_size, spec.model_dump_json())[0]

    train(full, before, 6)
    train(cut, before, 4)
    log = train(cut, after, 6, resume=True)
    assert any(f"resuming after step 4 from" in m and f"resharded to plan {after.plan_id}" in m for m in log), log
    got, want = _losses(cut), _losses(full)
    assert sorted(got) == list(range(6))
    assert all(got[s] == want[s] for s in range(4))
    assert all(abs(got[s] - want[s]) <= 1e-5 * abs(want[s]) for s in (4, 5)), (got, want)


def test_resume_of_another_run_or_format_is_refused_and_overwrites_nothing(tmp_path):
    _train(tmp_path, 2)
    before = (tmp_path / "metrics.jsonl").read_text()
    files = sorted(p.name for p in (tmp_path / "checkpoints").rglob("*"))
    spec = RunSpec(pool=POOL, job=_job(seed=5), plan=PP, out_dir=str(tmp_path), steps=3, resume=True)
    with pytest.raises(RuntimeError, match="CheckpointError: no checkpoint .* can be resumed by this run"):
        run_distributed(_run, 2, spec.model_dump_json())
    manifest = tmp_path / "checkpoints" / "step-000002" / "manifest.json"
    old = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({k: v for k, v in old.items() if k not in ("plan", "format")}))
    with pytest.raises(RuntimeError, match="CheckpointError"):
        _train(tmp_path, 3, resume=True)
    assert (tmp_path / "metrics.jsonl").read_text() == before
    assert sorted(p.name for p in (tmp_path / "checkpoints").rglob("*")) == files


def test_a_fresh_start_never_overwrites_earlier_steps(tmp_path):
    _train(tmp_path, 2)
    before = (tmp_path / "metrics.jsonl").read_text()
    with pytest.raises(RuntimeError, match="holds 2 steps of an earlier run"):
        _train(tmp_path, 3)
    assert (tmp_path / "metrics.jsonl").read_text() == before


def test_stray_entries_and_a_cut_metrics_line_are_skipped_on_resume(tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    _train(full, 6)
    _train(cut, 4)
    (cut / "checkpoints" / "step-latest").mkdir()
    (cut / "checkpoints" / "notes.txt").write_text("mine")
    with open(cut / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "lo')
    log = _train(cut, 6, resume=True)
    assert any("resuming after step 4" in m for m in log)
    assert any("cut short" in m for m in log)
    assert _losses(cut) == _losses(full)


def _dead_peer(rank, world):
    import torch.distributed as dist

    from edgepool.data import Sampler
    from edgepool.models.config import preset
    from edgepool.runtime.engine import Engine
    from edgepool.runtime.groups import StageGroups

    groups = StageGroups.build(PP, rank, 3)
    if rank == 1:
        return "left"  # device b leaves before the step
    cfg = preset("gpt", "tiny", vocab_size=260)
    sampler = Sampler(path=str(CORPUS), seq_len=16, family="gpt", seed=0, mask_token_id=259)
    eng = Engine(PP, cfg, rank=0, sampler=sampler, global_batch=4, seq_len=16, groups=groups, lr=1e-3, timeout_s=3)
    t0 = time.monotonic()
    try:
        eng.step(0)
    except PeerError as exc:
        dist.destroy_process_group()
        return str(exc), time.monotonic() - t0
    return "no error", 0.0


def test_dead_peer_is_named_not_a_hang():
    msg, waited = run_distributed(_dead_peer, 2, timeout_s=10)[0]
    assert "rank 1 (b)" in msg, msg
    assert waited < 10
