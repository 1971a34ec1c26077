"""Measure what a testbed link really carries: timed TCP transfers between namespaces.

``measure_throughput(state, [("a", "b")], duration_s=1.0)`` starts a receiver in
``b``'s namespace and a sender in ``a``'s, both plain Python sockets, sends for
``duration_s`` and returns the TCP payload rate the receiver saw. Several pairs run at
once, which is how a shared medium shows itself: their rates add up to the channel's.

Only the testbed's own addresses are used, and every process has a hard timeout.
Payload (goodput) is about 96% of the shaped rate, since tc counts Ethernet, IP and TCP
headers (1448 payload bytes per 1514-byte frame).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Sequence

from edgepool.testbed.core import TestbedError, TestbedState

_RECEIVER = r"""
import json, socket, sys, time
addr, port, limit = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((addr, port)); s.listen(1); s.settimeout(limit)
print("ready", flush=True)
c, _ = s.accept(); c.settimeout(limit)
n = 0; t0 = None
while True:
    b = c.recv(1 << 20)
    if not b:
        break
    if t0 is None:
        t0 = time.perf_counter()
    n += len(b)
dt = time.perf_counter() - t0 if t0 else 0.0
print(json.dumps({"bytes": n, "seconds": dt}), flush=True)
"""

_SENDER = r"""
import socket, sys, time
addr, port, duration = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
c = socket.create_connection((addr, port), timeout=10)
buf = b"\0" * (1 << 16)
end = time.perf_counter() + duration
while time.perf_counter() < end:
    c.sendall(buf)
c.shutdown(socket.SHUT_WR)
c.recv(1)
c.close()
"""


@dataclass(frozen=True)
class Throughput:
    src: str
    dst: str
    payload_bytes: int
    seconds: float
    configured_bps: int | None

    @property
    def bps(self) -> float:
        return self.payload_bytes * 8 / self.seconds if self.seconds > 0 else 0.0

    @property
    def ratio(self) -> float | None:
        """Measured payload rate over the configured link rate (None if unshaped)."""
        return self.bps / self.configured_bps if self.configured_bps else None


def _configured_bps(state: TestbedState, src: str, dst: str) -> int | None:
    assert state.layout is not None
    rates = [state.layout.of(src).up_bps, state.layout.of(dst).down_bps, state.layout.shared_bps]
    rates_known = [r for r in rates if r]
    return min(rates_known) if rates_known else None


def measure_throughput(
    state: TestbedState, pairs: Sequence[tuple[str, str]], *, duration_s: float = 1.0, port: int = 45201
) -> list[Throughput]:
    """Send from ``src`` to ``dst`` for each pair at the same time; return the rates."""
    if not state.emulated or state.layout is None:
        raise TestbedError("measure_throughput needs an emulated testbed (state.emulated is False)")
    limit_s = duration_s + 10.0
    receivers = []
    try:
        for i, (src, dst) in enumerate(pairs):
            for dev in (src, dst):
                if not state.is_emulated(dev):
                    raise TestbedError(f"device {dev!r} is not emulated in testbed {state.tag}")
            argv = ["ip", "netns", "exec", state.netns(dst) or "", sys.executable, "-c", _RECEIVER]
            argv += [state.address(dst), str(port + i), str(limit_s)]
            receivers.append(subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        for r in receivers:
            assert r.stdout is not None
            line = r.stdout.readline().strip()
            if line != "ready":
                raise TestbedError(f"receiver did not start: {line or r.stderr.read() if r.stderr else ''}")
        senders = []
        for i, (src, dst) in enumerate(pairs):
            argv = ["ip", "netns", "exec", state.netns(src) or "", sys.executable, "-c", _SENDER]
            argv += [state.address(dst), str(port + i), str(duration_s)]
            senders.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
        deadline = time.monotonic() + limit_s
        out = []
        for (src, dst), r, s in zip(pairs, receivers, senders):
            stdout, stderr = r.communicate(timeout=max(1.0, deadline - time.monotonic()))
            s.wait(timeout=max(1.0, deadline - time.monotonic()))
            if r.returncode != 0:
                raise TestbedError(f"receiver {src}->{dst} failed: {stderr.strip().splitlines()[-1:]}")
            res = json.loads(stdout.strip().splitlines()[-1])
            out.append(Throughput(src, dst, int(res["bytes"]), float(res["seconds"]), _configured_bps(state, src, dst)))
        return out
    finally:
        for p in receivers + (senders if "senders" in locals() else []):
            if p.poll() is None:
                p.kill()
                p.wait()
