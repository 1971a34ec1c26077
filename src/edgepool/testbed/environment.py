"""What this machine offers edgepool: energy meters and testbed features, with reasons.

``environment_report()`` is what ``edgepool env`` prints, and what a study or a run
report can embed so a reader knows which figures were measured and which modelled,
and what the emulated links did (rate only, or delay and loss too).
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass

from edgepool.energy import meter_report
from edgepool.testbed import cgroups
from edgepool.testbed.core import congestion_controls
from edgepool.testbed.net import TCP_CONGESTION
from edgepool.testbed.probe import probe


@dataclass(frozen=True)
class EnvironmentReport:
    host: dict[str, str]
    meters: list[tuple[str, bool, str]]
    testbed: list[tuple[str, bool, str]]
    summary: list[str]

    def to_json(self) -> dict:
        return {
            "host": self.host,
            "meters": [{"name": n, "available": a, "detail": d} for n, a, d in self.meters],
            "testbed": [{"feature": n, "available": a, "detail": d} for n, a, d in self.testbed],
            "summary": self.summary,
        }


def environment_report(refresh: bool = False) -> EnvironmentReport:
    f = probe(refresh=refresh)
    meters = meter_report()
    host = {
        "kernel": platform.release(),
        "python": platform.python_version(),
        "cpus": f"{cgroups.host_cpus():g}",
        "memory available": f"{cgroups.host_memory_available_bytes() / 1e9:.1f} GB",
        "user": "root" if os.geteuid() == 0 else f"uid {os.geteuid()}",
    }
    summary = []
    net = f.network
    if net:
        shaped = "rate, delay, jitter and loss" if f.netem else "rate only (no netem: latency, jitter and loss are not emulated)"
        summary.append(f"testbed: emulated devices get namespaces and shaped links ({shaped})")
        if not f.shared_medium:
            summary.append(f"testbed: a shared medium is emulated as separate links ({f.shared_medium.reason})")
        summary.append(
            "testbed: CPU and memory caps via " + (f.cgroup.describe() if f.cgroup else f"NONE ({f.caps.reason})")
        )
        cc = congestion_controls()
        if cc is not None:
            host_cc, available, _ = cc
            ns_cc = TCP_CONGESTION if TCP_CONGESTION in available or host_cc == TCP_CONGESTION else host_cc
            summary.append(f"testbed: TCP congestion control {ns_cc} in the namespaces (this host's own: {host_cc})")
    else:
        summary.append(f"testbed: unavailable ({net.reason}); emulated devices run as plain local processes")
    sensors = [n for n, ok, _ in meters if ok and n in ("zeus", "tegrastats")]
    if sensors:
        summary.append(f"energy: measured with {', '.join(sensors)}")
    else:
        summary.append("energy: no power sensor here, so energy figures are modelled (source 'modelled')")
    return EnvironmentReport(host, meters, f.rows(), summary)
