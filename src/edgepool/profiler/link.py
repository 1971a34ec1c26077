"""Link latency and bandwidth between two devices, measured with gloo.

Rank 0 sends a tensor of ``n`` bytes to rank 1, which sends it back (ping-pong), for
several sizes. A line through (bytes, one-way seconds) gives latency (intercept) and
bandwidth (1 / slope). Run inside the testbed, this measures the shaped link; on plain
local processes it measures loopback (and says so).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SIZES = (1_000, 100_000, 1_000_000, 4_000_000)


def _rank_main(out_path: str) -> None:
    import torch
    import torch.distributed as dist

    from edgepool.runtime.groups import init_world, shutdown

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    init_world(rank, world, init_method="env://", timeout_s=60.0)  # the run's own TLS store (``launch.local``)
    results = []
    for n in SIZES:
        buf = torch.zeros(n // 4, dtype=torch.float32)
        times = []
        for _ in range(5):
            dist.barrier()
            t0 = time.perf_counter()
            if rank == 0:
                dist.send(buf, 1)
                dist.recv(buf, 1)
            else:
                dist.recv(buf, 0)
                dist.send(buf, 0)
            times.append((time.perf_counter() - t0) / 2)
        results.append((n, sorted(times)[len(times) // 2]))
    dist.barrier()
    if rank == 0:
        Path(out_path).write_text(json.dumps(results))
    shutdown(clean=False)


def fit_link(points: list[tuple[int, float]]) -> dict:
    x = np.array([p[0] for p in points], dtype=float)
    y = np.array([p[1] for p in points], dtype=float)
    slope, intercept = np.polyfit(x, y, 1)
    bw_bps = 8.0 / slope if slope > 0 else float("inf")
    return {"latency_ms": max(0.0, intercept) * 1e3, "bandwidth_mbps": bw_bps / 1e6, "points": points}


def measure_link(pool, a: str, b: str, placement, out_dir: Path, timeout_s: float = 120.0) -> dict:
    """Ping-pong between devices ``a`` and ``b`` of ``pool`` where ``placement`` puts them."""
    from edgepool.launch.local import remove_private, run_store_env
    from edgepool.machine import free_port

    out_dir.mkdir(parents=True, exist_ok=True)
    result = out_dir / f"link-{a}-{b}.json"
    port = free_port()
    private, store = run_store_env(placement.master_addr(a), port)
    try:
        return _ping_pong(a, b, placement, port, store, result, timeout_s)
    finally:
        remove_private(private)


def _ping_pong(a: str, b: str, placement, port: int, store: dict[str, str], result: Path,
               timeout_s: float) -> dict:
    procs = []
    for rank, dev in enumerate((a, b)):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR=placement.master_addr(a),
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1", **store)
        env.update({k: v for k, v in placement.env(dev).items() if k != "MASTER_ADDR"})
        cmd = placement.prefix(dev) + [sys.executable, "-m", "edgepool.profiler.link", str(result)]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    for p in procs:
        try:
            _, err = p.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise RuntimeError(f"link measurement {a} <-> {b} did not finish in {timeout_s:g} s") from None
        if p.returncode != 0:
            raise RuntimeError(f"link measurement {a} <-> {b} failed: {(err or '').strip().splitlines()[-1:]}")
    return fit_link([tuple(p) for p in json.loads(result.read_text())])


if __name__ == "__main__":
    _rank_main(sys.argv[1])
