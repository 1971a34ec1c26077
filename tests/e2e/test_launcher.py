"""The launcher owns its ranks and its folder: signals, one writer, resume, a frozen device.

Real ``edgepool train`` processes (as a user starts them) on a tiny GPT. A rank is
found by its ``/proc`` entry: a process whose command line names this run's
``run.json``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgepool.cli.main import main
from edgepool.testing import CORPUS, rank_processes

pytestmark = pytest.mark.e2e


def _files(tmp: Path, devices: tuple[str, ...], *, steps: int = 10_000, timeout_s: float = 20,
           recover: bool = True, extra: str = "checkpoint_every: 1") -> tuple[Path, Path]:
    pool = tmp / "pool.yaml"
    pool.write_text("devices:\n" + "".join(f"  - {{name: {d}, kind: host-cpu, host: local}}\n" for d in devices))
    job = tmp / "job.yaml"
    job.write_text(f"model: {{family: gpt, size: tiny}}\ndata: {{path: {CORPUS}}}\n"
                   f"train: {{global_batch: 4, seq_len: 16, steps: {steps}, {extra}, "
                   f"timeout_s: {timeout_s}, recover: {str(recover).lower()}}}\n")
    return pool, job


def _plan(tmp: Path, pool: Path, job: Path, family: str) -> Path:
    from edgepool.launch.prepare import proportional_plan
    from edgepool.specs import load_job, load_pool

    plan = proportional_plan(load_pool(pool), load_job(job), 4, family)
    path = tmp / f"plan-{family}.json"
    path.write_text(plan.dumps())
    return path


def _start(pool: Path, job: Path, plan: Path, out: Path, *args: str) -> tuple[subprocess.Popen, Path]:
    err = out.parent / f"{out.name}-stderr.txt"
    with open(err, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "edgepool.cli.main", "train", "--pool", str(pool), "--job",
                                 str(job), "--plan", str(plan), "--out", str(out), "--no-progress", *args],
                                stdout=subprocess.DEVNULL, stderr=fh, start_new_session=True)
    return proc, err


_ranks = rank_processes  # pid -> rank of every live rank process of the run in a folder


def _wait_steps(out: Path, n: int, proc: subprocess.Popen, timeout: float = 90) -> None:
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        m = out / "metrics.jsonl"
        if m.is_file() and len(m.read_text().splitlines()) >= n:
            return
        assert proc.poll() is None, f"the launcher ended early ({proc.returncode})"
        time.sleep(0.2)
    raise AssertionError(f"no {n} steps in {out} within {timeout} s")


def _gone(out: Path, timeout: float = 10) -> bool:
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        if not _ranks(out):
            return True
        time.sleep(0.2)
    return False


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("two")
    pool, job = _files(tmp, ("a", "b"))
    return tmp, pool, job, _plan(tmp, pool, job, "dp")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGKILL], ids=lambda s: s.name)
def test_killing_the_launcher_leaves_no_rank_behind(two, sig):
    tmp, pool, job, plan = two
    out = tmp / f"run-{sig.name}"
    proc, err = _start(pool, job, plan, out)
    try:
        _wait_steps(out, 1, proc)
        assert len(_ranks(out)) == 2
        os.kill(proc.pid, sig)
        proc.wait(timeout=15)
        assert _gone(out), f"ranks left behind after {sig.name}: {_ranks(out)}"
    finally:
        for pid in _ranks(out):
            os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
    if sig != signal.SIGKILL:
        lines = [ln for ln in err.read_text().splitlines() if ln.startswith("edgepool train: error:")]
        assert lines and f"stopped by {sig.name}" in lines[-1]
        assert "Traceback" not in err.read_text()


def test_a_second_writer_into_one_folder_is_refused(two):
    tmp, pool, job, plan = two
    out = tmp / "shared"
    first, _ = _start(pool, job, plan, out)
    try:
        _wait_steps(out, 1, first)
        second, err = _start(pool, job, plan, out, "--resume")
        assert second.wait(timeout=60) == 2
        text = err.read_text().strip()
        assert text.startswith("edgepool train: error:") and "is in use by pid" in text and len(text.splitlines()) == 1
        assert str(first.pid) in text
        assert first.poll() is None  # the first run goes on
    finally:
        first.terminate()
        first.wait(timeout=15)
    assert _gone(out)


def test_resume_under_another_plan_goes_on_and_another_run_is_refused(tmp_path, capsys):
    pool, job = _files(tmp_path, ("a", "b"), steps=2)
    dp, pp = _plan(tmp_path, pool, job, "dp"), _plan(tmp_path, pool, job, "pp")
    out = tmp_path / "run"
    base = ["train", "--pool", str(pool), "--job", str(job), "--out", str(out), "--no-progress"]
    assert main(base + ["--plan", str(dp)]) == 0
    kept = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and "logs" not in p.parts and p.name != "run.json"}
    capsys.readouterr()
    # Another seed: refused before any process starts, naming what differs.
    other = tmp_path / "seed.yaml"
    other.write_text(job.read_text().replace("train: {", "train: {seed: 7, "))
    assert main(["train", "--pool", str(pool), "--job", str(other), "--out", str(out), "--no-progress", "--plan",
                 str(pp), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "seed" in err and "(this run:" in err
    # A plain start into the folder: refused too.
    assert main(base + ["--plan", str(pp)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in kept} == kept  # nothing overwritten
    # Another plan: the checkpoint is resharded to it, and the run goes on.
    assert main(base + ["--plan", str(pp), "--resume", "--steps", "3"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["parallelism"] == "pp" and summary["resumed_from"] == 2 and summary["steps"] == 3
    assert "resharded to plan" in (out / "logs" / "rank-0.log").read_text()
    # --fresh starts over and keeps the old run in the archive.
    assert main(base + ["--plan", str(pp), "--fresh"]) == 0
    archived = list((out / "archive").iterdir())
    assert len(archived) == 1
    assert json.loads((out / "summary.json").read_text())["parallelism"] == "pp"


def test_a_frozen_device_is_named_not_the_one_that_noticed(tmp_path):
    """Three stages a -> b -> c; c is SIGSTOPped: its heartbeat stops, and the launcher (or
    a and b, timing out) must blame c. Without train.recover the run ends there."""
    pool, job = _files(tmp_path, ("a", "b", "c"), timeout_s=3, recover=False)
    plan = _plan(tmp_path, pool, job, "pp")
    out = tmp_path / "frozen"
    proc, err = _start(pool, job, plan, out)
    try:
        _wait_steps(out, 2, proc)
        victim = next(pid for pid, rank in _ranks(out).items() if rank == 2)
        os.kill(victim, signal.SIGSTOP)
        assert proc.wait(timeout=60) == 2
        line = [ln for ln in err.read_text().splitlines() if ln.startswith("edgepool train: error:")][-1]
        assert "device c (rank 2) stopped answering" in line, line
        assert "Traceback" not in err.read_text()
        assert _gone(out)
    finally:
        for pid in _ranks(out):
            os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()


def test_a_planted_pickle_in_a_checkpoint_never_runs(tmp_path, capsys):
    """A rank file replaced by a pickle that would run code (its checksum in the manifest
    updated, as someone who can write the folder would) is refused on --resume with one
    line, read no further than its header; the run resumes from the newest good
    checkpoint. Nothing in edgepool unpickles, so the code never runs."""
    import hashlib
    import pickle

    pool, job = _files(tmp_path, ("a", "b"), steps=2)
    plan = _plan(tmp_path, pool, job, "dp")
    out = tmp_path / "run"
    base = ["train", "--pool", str(pool), "--job", str(job), "--plan", str(plan), "--out", str(out), "--no-progress"]
    assert main(base) == 0
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    step = out / "checkpoints" / "step-000002"
    (step / "rank-0.safetensors").write_bytes(pickle.dumps(Payload()))
    manifest = json.loads((step / "manifest.json").read_text())
    manifest["files"]["rank-0.safetensors"] = hashlib.sha256((step / "rank-0.safetensors").read_bytes()).hexdigest()
    (step / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    rc = main(base + ["--resume", "--steps", "3"])
    assert not marker.exists(), "the planted pickle ran"
    assert rc == 0, capsys.readouterr().err
    refusals = [ln for ln in (out / "logs" / "rank-0.log").read_text().splitlines() if "refused" in ln]
    assert refusals == ["checkpoint step-000002 refused: rank-0.safetensors is not a safetensors file (a planted "
                        "pickle or another format); refused unread"], refusals
    assert json.loads((out / "summary.json").read_text())["resumed_from"] == 1


def _losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


NO_CHECKPOINT = "checkpoint_every: 0, replicate_every: 1"  # backups in memory only: nothing on disk
FILES_ONLY = "checkpoint_every: 1, replicate_every: 0"  # no backups: the lost state from the checkpoint


@pytest.mark.parametrize("family,sig,extra", [("pp", "KILL", NO_CHECKPOINT), ("pp", "STOP", "checkpoint_every: 1"),
                                              ("tp", "KILL", NO_CHECKPOINT), ("pp", "KILL", FILES_ONLY)])
def test_a_lost_device_and_the_run_goes_on(tmp_path, capsys, monkeypatch, family, sig, extra):
    """pp (or tp) over a, b, c; b is SIGKILLed (or SIGSTOPped: frozen, found by its
    heartbeat) before step 3. a and c keep their processes and go on in memory under a
    new plan (tp: every shard cut anew, slices sent rank to rank), b's state from the
    replica its backup peer keeps (with no checkpoint at all), or, without backups, from
    the last checkpoint; every step finishes with the uninterrupted run's losses (1e-5),
    the event is in events.jsonl and summary.json, and no process is left behind."""
    pool, job = _files(tmp_path, ("a", "b", "c"), steps=6, timeout_s=30, extra=extra)
    plan = _plan(tmp_path, pool, job, family)
    base = ["train", "--pool", str(pool), "--job", str(job), "--plan", str(plan), "--no-progress"]
    assert main(base + ["--out", str(tmp_path / "full")]) == 0
    monkeypatch.setenv("EDGEPOOL_FAULT", f"rank=1,step=3,signal={sig}")
    out = tmp_path / "lost"
    t0 = time.monotonic()
    assert main(base + ["--out", str(out)]) == 0, capsys.readouterr().err
    took = time.monotonic() - t0
    got, want = _losses(out), _losses(tmp_path / "full")
    assert sorted(got) == list(range(6))
    assert all(abs(got[s] - want[s]) <= 1e-5 * abs(want[s]) for s in got), (got, want)
    events = [json.loads(ln) for ln in (out / "events.jsonl").read_text().splitlines()]
    assert len(events) == 1
    ev = events[0]
    assert ev["event"] == "device_lost" and ev["device"] == "b" and sorted(ev["devices"] + ev["standby"]) == ["a", "c"]
    # b's backup of step 3 travels in the background while step 3 runs: lost with b when cut
    # short, and the run goes on from the round before (step 2); a checkpoint holds step 3
    assert ev["lost_at_step"] == 3 and not ev["samples_lost"]
    assert ev["from_step"] in ((2, 3) if extra == NO_CHECKPOINT else (3,)), ev
    if sig == "STOP":
        assert "no heartbeat" in ev["reason"]
    assert 0 < ev["recovery_s"] < took
    summary = json.loads((out / "summary.json").read_text())
    assert summary["events"] == events and summary["plan_id"] == ev["plan_id"] != json.loads(plan.read_text())["plan_id"]
    assert "event: device_lost b" in capsys.readouterr().err
    # the survivors kept their processes: no restart, the lost rank's log is there
    if extra == NO_CHECKPOINT:
        assert ev["recovery"] == "in memory"
    elif extra == FILES_ONLY:
        assert ev["recovery"] == "in memory, the state of b from the checkpoint"
    else:  # backups every "auto" steps and a checkpoint every step: b's state from either
        assert ev["recovery"].startswith("in memory"), ev["recovery"]
    assert not (out / "logs-before-recovery-1").exists()
    assert (out / "checkpoints").is_dir() == (extra != NO_CHECKPOINT)
    assert "EDGEPOOL-FAULT at" in (out / "logs" / "rank-1.log").read_text()
    assert f"going on from step {ev['from_step']} (memory)" in (out / "logs" / "rank-2.log").read_text()
    assert ev["detected_at"] < ev["recovered_at"]
    phases = ev["phases_s"]  # where the recovery's time went
    assert set(phases) == {"stop_lost", "reports", "plan", "regroup_and_step"} and min(phases.values()) >= 0
    assert sum(phases.values()) == pytest.approx(ev["recovery_s"], abs=0.01)
    assert _gone(out)


def _scaled(tmp: Path, scales: dict[str, float], train: str) -> tuple[Path, Path]:
    """A compute-bound local pool (each device's ``compute_scale``, a 1 Gbit/s switch) and a
    tiny GPT job with ``train``'s settings."""
    pool = tmp / "pool.yaml"
    pool.write_text("network: {medium: switched, bandwidth_mbps: 1000}\ndevices:\n" + "".join(
        f"  - {{name: {d}, kind: host-cpu, host: local, compute_scale: {s}}}\n" for d, s in scales.items()))
    job = tmp / "job.yaml"
    job.write_text(f"model: {{family: gpt, size: tiny}}\ndata: {{path: {CORPUS}}}\ntrain: {{{train}}}\n")
    return pool, job


def test_a_survivor_whose_state_is_nowhere_else_stays_in_the_plan(tmp_path, capsys, monkeypatch):
    """pp over a, b, c, d with backups in memory only (no checkpoint); c is very slow, so
    the planner alone would leave it out once d is lost. But c's replica was on d: its
    state is in c alone. The launcher keeps every survivor in the plan and the run goes
    on in memory with the uninterrupted run's losses (1e-5)."""
    from edgepool.launch.recover import replan
    from edgepool.runtime.train import RunSpec

    pool, job = _scaled(tmp_path, {"a": 0.01, "b": 0.01, "c": 0.001, "d": 0.01},
                        "global_batch: 4, seq_len: 16, steps: 6, timeout_s: 30, checkpoint_every: 0, replicate_every: 1")
    plan = _plan(tmp_path, pool, job, "pp")
    base = ["train", "--pool", str(pool), "--job", str(job), "--plan", str(plan), "--no-progress"]
    assert main(base + ["--out", str(tmp_path / "full")]) == 0
    run = RunSpec.read(tmp_path / "full" / "run.json")
    assert "c" not in replan(run, ["a", "b", "c"], log=lambda m: None).devices  # the planner would leave c out
    monkeypatch.setenv("EDGEPOOL_FAULT", "rank=3,step=3,signal=KILL")
    out = tmp_path / "lost"
    capsys.readouterr()
    assert main(base + ["--out", str(out)]) == 0, capsys.readouterr().err
    got, want = _losses(out), _losses(tmp_path / "full")
    assert sorted(got) == list(range(6))
    assert all(abs(got[s] - want[s]) <= 1e-5 * abs(want[s]) for s in got), (got, want)
    (ev,) = [json.loads(ln) for ln in (out / "events.jsonl").read_text().splitlines()]
    assert ev["device"] == "d" and sorted(ev["devices"]) == ["a", "b", "c"] and ev["standby"] == []
    assert ev["recovery"] == "in memory", ev
    assert "keeping every survivor (a, b, c) in the plan" in capsys.readouterr().err
    assert _gone(out)


@pytest.mark.parametrize("b_scale,taken_in", [(0.01, True), (0.001, False)])
def test_a_lost_device_comes_back(tmp_path, capsys, monkeypatch, b_scale, taken_in):
    """dp over a, b, c; b is SIGKILLed before step 2 and offered back 0.2 s later
    (``train.rejoin_s``). The planner predicts the step with b again: where b is as fast
    as the others it is taken in at a step boundary, its state streamed from its peers,
    and the run finishes over a, b and c; where b is very slow it stays a standby. Either
    way every step (120 short ones: the offer comes while the run goes on) finishes with
    the uninterrupted run's losses (1e-5) and no process is left behind."""
    pool, job = _scaled(tmp_path, {"a": 0.01, "b": b_scale, "c": 0.01},
                        "global_batch: 24, seq_len: 16, steps: 120, timeout_s: 30, rejoin_s: 0.2")
    plan = _plan(tmp_path, pool, job, "dp")
    base = ["train", "--pool", str(pool), "--job", str(job), "--plan", str(plan), "--no-progress"]
    assert main(base + ["--out", str(tmp_path / "full")]) == 0
    monkeypatch.setenv("EDGEPOOL_FAULT", "rank=1,step=2,signal=KILL")
    out = tmp_path / "back"
    assert main(base + ["--out", str(out)]) == 0, capsys.readouterr().err
    got, want = _losses(out), _losses(tmp_path / "full")
    assert sorted(got) == list(range(120))
    assert all(abs(got[s] - want[s]) <= 1e-5 * abs(want[s]) for s in got), (got, want)
    events = [json.loads(ln) for ln in (out / "events.jsonl").read_text().splitlines()]
    assert [e["device"] for e in events if e["event"] == "device_lost"] == ["b"]
    if taken_in:
        joined = [e for e in events if e["event"] == "device_joined"]
        assert len(joined) == 1, events
        ev = joined[0]
        assert ev["joined"] == ["b"] and sorted(ev["devices"]) == ["a", "b", "c"]
        assert ev["predicted_step_s"] < ev["predicted_before_s"] and ev["join_s"] > 0
        assert json.loads((out / "summary.json").read_text())["plan_id"] == ev["plan_id"]
        assert "its state comes from its peers" in next((out / "logs").glob("join-*-b.log")).read_text()
    else:
        kept = [e for e in events if e["event"] == "device_standby"]
        assert [e["device"] for e in kept] == ["b"] and not any(e["event"] == "device_joined" for e in events)
        assert kept[0]["predicted_with_s"] is None or kept[0]["predicted_with_s"] > kept[0]["predicted_step_s"] * 0.95
    assert _gone(out)
