"""A 4-device emulated pool loses three devices in one run, each a different way, and finishes.

The pool runs in the testbed (namespaces, shaped links, cgroup caps). A pipeline over
a, b, c and d loses the last device of its plan after step 1, the last of the new plan
after step 4 and the last after step 7: d, c and b, mid-run. Three runs rotate the ways
(SIGKILL of its rank; SIGSTOP: frozen; its link set down on the host side: cut off), so
each of the three devices is killed, stopped and cut. After each loss the survivors
regroup in memory, the lost state from the backups their peers keep (or, for a step
whose backup was cut short, from its checkpoint). Each run finishes every step with the
uninterrupted run's losses (1e-5), names each loss, leaves no process behind, and its
last checkpoint verifies. Needs root; skipped otherwise.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml

from edgepool.testbed import Testbed, is_available
from edgepool.testing import CORPUS, rank_processes

_AVAIL = is_available()
pytestmark = [pytest.mark.root, pytest.mark.e2e,
              pytest.mark.skipif(not _AVAIL, reason=f"testbed unavailable: {_AVAIL.reason}")]

DEVICES = ("a", "b", "c", "d")
STEPS = 10


def _files(tmp: Path) -> tuple[Path, Path]:
    pool = tmp / "pool.yaml"
    pool.write_text(yaml.safe_dump({
        "name": "lossy", "network": {"medium": "switched", "bandwidth_mbps": 200},
        "devices": [{"name": n, "kind": "host-cpu", "host": "emulated", "compute_scale": 0.5, "memory_gb": 2.0}
                    for n in DEVICES]}))
    job = tmp / "job.yaml"
    job.write_text(yaml.safe_dump({"model": {"family": "gpt", "size": "tiny"}, "data": {"path": str(CORPUS)},
                                   "train": {"global_batch": 8, "seq_len": 16, "steps": STEPS, "seed": 0,
                                             "checkpoint_every": 1, "replicate_every": 1, "timeout_s": 30},
                                   "parallelism": {"mode": "pp", "num_microbatches": 2, "schedule": "1f1b"}}))
    return pool, job


def _records(out: Path) -> list[dict]:
    m = out / "metrics.jsonl"
    return [json.loads(ln) for ln in m.read_text().splitlines() if ln.strip()] if m.is_file() else []


def _faults(out: Path, first: tuple[str, ...], state, ways: tuple[str, ...], done: threading.Event,
            did: list) -> None:
    """After steps 1, 4 and 7, lose the last device of the plan then running but ``a`` by
    ``ways`` in turn."""
    for after, how in zip((1, 4, 7), ways):
        while not done.is_set() and not any(r["step"] >= after for r in _records(out)):
            time.sleep(0.05)
        if done.is_set():
            return
        plan = json.loads((out / "run.json").read_text())["plan"]
        devices = [d for s in plan["stages"] for d in s["devices"]]
        victim = next((d for d in reversed(devices) if d != "a" and d not in [v for _, v in did]), None)
        if victim is None:
            return
        if how == "CUT":
            subprocess.run(["ip", "link", "set", state.layout.of(victim).host_if, "down"], check=True)
        else:
            pid = next(p for p, r in rank_processes(out).items() if first[r] == victim)
            os.kill(pid, signal.SIGKILL if how == "KILL" else signal.SIGSTOP)
        did.append((how, victim))


@pytest.fixture(scope="module")
def pool_run(tmp_path_factory):
    """The testbed pool, the run's spec and its uninterrupted losses (once for the module)."""
    from edgepool.launch.local import pool_placement
    from edgepool.launch.prepare import prepare_run, proportional_plan
    from edgepool.launch.recover import train_recovering
    from edgepool.specs import load_job, load_pool

    tmp = tmp_path_factory.mktemp("lossy-pool")
    pool_path, job_path = _files(tmp)
    pool = load_pool(pool_path)
    plan = tmp / "plan.json"
    plan.write_text(proportional_plan(pool, load_job(job_path), 4, "pp").dumps())
    spec = prepare_run(pool, str(job_path), out_dir=tmp / "unused", plan_path=str(plan), log=lambda m: None)
    assert tuple(spec.plan.devices) == DEVICES
    with pool_placement(pool, log=lambda m: None) as placement:
        full = tmp / "full"
        train_recovering(spec.model_copy(update={"out_dir": str(full)}), placement=placement, log=lambda m: None)
        yield spec, placement, Testbed.attach(pool), {r["step"]: r["loss"] for r in _records(full)}


ROTATIONS = (("KILL", "STOP", "CUT"), ("STOP", "CUT", "KILL"), ("CUT", "KILL", "STOP"))


@pytest.mark.parametrize("ways", ROTATIONS, ids=["-".join(w) for w in ROTATIONS])
def test_three_devices_lost_three_ways_and_the_run_finishes(pool_run, tmp_path, ways, monkeypatch):
    from edgepool.launch import recover
    from edgepool.launch.recover import train_recovering
    from edgepool.runtime import checkpoint

    # Every survivor stays in the new plan, so that three devices can be lost: at the
    # testbed's speeds the planner would rightly leave one as a standby (``launch.speeds``;
    # standbys are covered by tests/e2e/test_launcher.py).
    plain = recover.replan
    monkeypatch.setattr(recover, "replan", lambda run, devices, log=print, every=False:
                        plain(run, devices, log=log, every=True))
    spec, placement, state, want = pool_run
    out = tmp_path / "lossy"
    done, did = threading.Event(), []
    watcher = threading.Thread(target=_faults, args=(out, DEVICES, state, ways, done, did), daemon=True)
    watcher.start()
    try:
        train_recovering(spec.model_copy(update={"out_dir": str(out)}), placement=placement, log=lambda m: None)
    finally:
        done.set()
        watcher.join(timeout=5)
        for n in DEVICES:
            subprocess.run(["ip", "link", "set", state.layout.of(n).host_if, "up"], check=False)
    got = {r["step"]: r["loss"] for r in _records(out)}
    assert sorted(got) == list(range(STEPS))
    assert all(abs(got[s] - want[s]) <= 1e-5 * abs(want[s]) for s in got), (got, want)
    events = [json.loads(ln) for ln in (out / "events.jsonl").read_text().splitlines()]
    assert did == list(zip(ways, ("d", "c", "b"))), did  # three devices lost, three ways
    assert [e["device"] for e in events] == ["d", "c", "b"], events
    # no restart: the survivors regroup each time; the lost state is a peer's replica, or,
    # for a device lost while a step's backup was on the way, that step's checkpoint files
    assert all(e["recovery"].startswith("in memory") for e in events), [e["recovery"] for e in events]
    for e, how in zip(events, ways):
        assert ("SIGKILL" if how == "KILL" else "no heartbeat") in e["reason"], (how, e["reason"])
        # the survivors report at once, not after a wait on the lost peer (train.timeout_s, 30 s)
        assert e["phases_s"]["reports"] < 10, e
    deadline = time.monotonic() + 10
    while rank_processes(out) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not rank_processes(out), "a rank process was left behind"
    found = checkpoint.survey(out / "checkpoints", spec.identity())
    assert found.usable and found.usable[0] == STEPS
    d = checkpoint.step_dir(out / "checkpoints", STEPS)
    manifest = checkpoint.read_manifest(d)
    assert checkpoint.check(d, manifest, spec.identity(), sorted(manifest["files"])) is None
