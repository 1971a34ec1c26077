"""Shaped-link accuracy of the testbed: measured TCP payload rate vs configured rate.

Brings up small testbeds (switched and shared medium) at several rates, sends TCP
between namespaces for a few seconds, and writes the table to
``docs/results/testbed-links.md``. Needs root; asserts nothing (a benchmark, not a
test). Run: ``python benchmarks/testbed_links.py [--seconds 2]``.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

from edgepool.specs.pool import PoolSpec
from edgepool.testbed import Testbed, is_available, measure_throughput

OUT = Path(__file__).resolve().parent.parent / "docs" / "results" / "testbed-links.md"


def _pool(medium: str, mbps: float, n: int) -> PoolSpec:
    devices = [{"name": f"d{i}", "kind": "jetson-nano", "host": "emulated"} for i in range(n)]
    return PoolSpec.model_validate({"name": f"bench-{medium}-{mbps:g}", "network": {"medium": medium, "bandwidth_mbps": mbps}, "devices": devices})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=2.0)
    args = ap.parse_args()
    ok = is_available()
    if not ok:
        print(f"testbed unavailable: {ok.reason}")
        return 1
    rows = []
    for medium, mbps, flows in [
        ("switched", 10, 1),
        ("switched", 50, 1),
        ("switched", 100, 1),
        ("switched", 300, 1),
        ("shared", 50, 1),
        ("shared", 50, 2),
        ("shared", 50, 3),
        ("shared", 100, 2),
    ]:
        n = max(2, 2 * flows)
        with Testbed.running(_pool(medium, mbps, n), tag="bnch", caps=False) as state:
            pairs = [(f"d{2 * i}", f"d{2 * i + 1}") for i in range(flows)]
            res = measure_throughput(state, pairs, duration_s=args.seconds)
        total = sum(r.bps for r in res)
        per = ", ".join(f"{r.bps / 1e6:.1f}" for r in res)
        rows.append((medium, mbps, flows, total / 1e6, total / (mbps * 1e6), per))
        print(f"{medium:8s} {mbps:5g} Mbit/s, {flows} flow(s): {total / 1e6:6.1f} Mbit/s ({total / (mbps * 1e6):.1%}) [{per}]")
    lines = [
        "# Testbed links: measured vs configured rate",
        "",
        f"Measured by `benchmarks/testbed_links.py` on {time.strftime('%Y-%m-%d')}, kernel {platform.release()},",
        f"{args.seconds:g} s TCP transfers between namespaces (Python sockets). Rates are TCP payload; tc",
        "counts link-layer bytes, so the ceiling is 1448/1514 = 95.6% of the configured rate.",
        "Shared medium: disjoint pairs sending at once; their sum is what the one channel carried. Each",
        "flow's rate is over its own transfer, and the flows start a few milliseconds apart, so the sum",
        "can exceed the channel's rate by what they did not overlap.",
        "",
        "| medium | configured Mbit/s | flows | measured Mbit/s (sum) | ratio | per flow |",
        "|---|---:|---:|---:|---:|---|",
    ]
    lines += [f"| {m} | {c:g} | {f} | {t:.1f} | {r:.1%} | {p} |" for m, c, f, t, r, p in rows]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("\n".join(lines) + "\n")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
