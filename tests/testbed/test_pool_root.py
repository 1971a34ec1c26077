"""``serve`` and ``join`` across the testbed's namespaces: the closest thing to separate hosts.

The coordinator runs in device a's namespace, bound to a's address; each device's agent
(and so its rank) runs in its own namespace and cgroups, over the shaped links. The
per-step losses equal ``edgepool train`` of the same plan on local processes. Needs
root; skipped otherwise.
"""

from __future__ import annotations

import json
import secrets
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from edgepool.cli.main import main
from edgepool.testbed import Testbed, is_available
from edgepool.testing import CORPUS

_AVAIL = is_available()
pytestmark = [pytest.mark.root, pytest.mark.skipif(not _AVAIL, reason=f"testbed unavailable: {_AVAIL.reason}")]

DEVICES = [("a", 2.0), ("b", 1.5), ("c", 1.0)]
STEPS = 3


def _files(tmp: Path, host: str) -> tuple[Path, Path]:
    pool = tmp / f"pool-{host}.yaml"
    pool.write_text(yaml.safe_dump({
        "name": "ns-pool", "network": {"medium": "switched", "bandwidth_mbps": 200},
        "devices": [{"name": n, "kind": "host-cpu", "host": host, "compute_scale": s, "memory_gb": 3.0}
                    for n, s in DEVICES]}))
    job = tmp / "job.yaml"
    job.write_text(yaml.safe_dump({"model": {"family": "gpt", "size": "tiny"}, "data": {"path": str(CORPUS)},
                                   "train": {"global_batch": 8, "seq_len": 32, "steps": STEPS, "seed": 0},
                                   "parallelism": {"mode": "dp", "num_microbatches": 2, "schedule": "1f1b"}}))
    return pool, job


def _losses(out: Path) -> list[float]:
    return [json.loads(ln)["loss"] for ln in (out / "metrics.jsonl").read_text().splitlines()]


def test_serve_and_join_across_namespaces_equal_train(tmp_path):
    from edgepool.launch.prepare import proportional_plan
    from edgepool.specs import load_job, load_pool

    pool, job = _files(tmp_path, "emulated")
    plan = tmp_path / "plan.json"
    plan.write_text(proportional_plan(load_pool(pool), load_job(job), 4, "hybrid").dumps())
    token = tmp_path / "pool.token"
    assert main(["token", "new", "-o", str(token)]) == 0
    tag = "t" + secrets.token_hex(2)[:3]
    with Testbed.running(load_pool(pool), tag=tag) as state:
        addr = state.address("a")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cli = [sys.executable, "-m", "edgepool.cli.main"]
        serve = subprocess.Popen(["ip", "netns", "exec", state.netns("a"), *cli, "serve", "--pool", str(pool),
                                  "--job", str(job), "--out", str(tmp_path / "serve"), "--token", str(token),
                                  "--bind", addr, "--port", str(port), "--plan", str(plan), "--steps", str(STEPS),
                                  "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        agents = {n: subprocess.Popen(state.command_prefix(n) + [*cli, "join", "--coordinator", f"{addr}:{port}",
                                                                 "--token", str(token), "--device", n, "--work",
                                                                 str(tmp_path / f"work-{n}")],
                                      stdout=subprocess.DEVNULL, stderr=open(tmp_path / f"join-{n}.txt", "w"))
                  for n, _ in DEVICES}
        try:
            results = {n: (p.wait(timeout=240), (tmp_path / f"join-{n}.txt").read_text()) for n, p in agents.items()}
            _, err = serve.communicate(timeout=60)
        finally:
            for p in [serve, *agents.values()]:
                p.kill()
        assert serve.returncode == 0, err
        assert all(rc == 0 for rc, _ in results.values()), results
        # Each device joined from its own namespace's address.
        for n, _ in DEVICES:
            assert f"{n} joined from {state.address(n)}:" in err, err
    got = _losses(tmp_path / "serve")
    local, _ = _files(tmp_path, "local")
    assert main(["train", "--pool", str(local), "--job", str(job), "--plan", str(plan), "--steps", str(STEPS),
                 "--out", str(tmp_path / "train"), "--no-progress"]) == 0
    assert got == pytest.approx(_losses(tmp_path / "train"), rel=1e-5)
