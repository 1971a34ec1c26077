"""Planning time of `edgepool.planner.plan` on large pools (a benchmark, not a test).

Plans a 48-block model on 16 devices and a 96-block model on 64 devices (a mixed edge
pool: Orin Nano, Xavier NX, Nano, Raspberry Pi 5 in equal numbers), on a shared Wi-Fi
channel and on switched Ethernet, for the time objective (the exact search) and, for
context, the energy objective. Each case runs ``--repeats`` times; the table reports the
fastest and the median wall time with the search's counters, and is written to
``docs/results/planner-speed.md`` with the machine it ran on. Every figure in the file
is measured by this script.

    python benchmarks/planner_speed.py [--repeats 3] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from edgepool.cost import ModelDims, analytic_profile, shape_for
from edgepool.planner import plan
from edgepool.specs import PoolSpec

OUT = Path(__file__).resolve().parents[1] / "docs" / "results" / "planner-speed.md"
KINDS = ["jetson-orin-nano", "jetson-xavier-nx", "jetson-nano", "rpi5"]
TARGETS = {(16, 48): 1.0, (64, 96): 30.0}  # seconds, issue 3


def pool_of(n: int, medium: str) -> PoolSpec:
    bw = 100.0 if medium == "shared" else 1000.0
    devices = [{"name": f"{KINDS[i % 4]}-{i}", "kind": KINDS[i % 4]} for i in range(n)]
    return PoolSpec.model_validate({"name": f"mixed-{n}", "devices": devices,
                                    "network": {"medium": medium, "bandwidth_mbps": bw, "latency_ms": 2.0}})


def run_case(n: int, layers: int, batch: int, medium: str, objective: str, repeats: int) -> dict:
    dims = ModelDims(family="gpt", vocab_size=32000, hidden=1024, num_layers=layers, num_heads=16, ffn=4096)
    profile = analytic_profile(dims)
    shape = shape_for(profile, batch, 256)
    pool = pool_of(n, medium)
    times, res = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        res = plan(pool, None, profile, shape=shape, objective=objective)
        times.append(time.perf_counter() - t0)
    p = res.plan
    return {
        "devices": n, "layers": layers, "batch": batch, "medium": medium, "objective": objective,
        "min_s": min(times), "median_s": statistics.median(times), "dp_runs": res.stats["dp_runs"],
        "evaluated": res.stats["plans_evaluated"], "micro": len(res.stats["microbatch_counts"]),
        "chosen": f"{p.parallelism}, {len(p.stages)} stages, {len(p.devices)} devices, M={p.num_microbatches}",
        "step_s": res.plan.estimate.step_time_s, "model_step_s": res.cost.step_time_s, "exact": res.exact,
        "simulated": res.stats["plans_simulated"], "simulate_s": res.stats["simulate_s"],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="time objective on Wi-Fi only")
    args = ap.parse_args()
    rows = []
    for (n, layers), batch in (((16, 48), 32), ((64, 96), 64)):
        for medium in ("shared",) if args.quick else ("shared", "switched"):
            for objective in ("time",) if args.quick else ("time", "energy"):
                reps = args.repeats if objective == "time" else 1
                r = run_case(n, layers, batch, medium, objective, reps)
                rows.append(r)
                print(f"{n:3d} devices {layers:3d} layers {medium:8s} {objective:6s} min {r['min_s']:.3f} s "
                      f"median {r['median_s']:.3f} s  ({r['dp_runs']} DP runs, {r['evaluated']} plans) -> {r['chosen']}",
                      flush=True)
    from edgepool.machine import machine_info

    info = machine_info()
    lines = [
        "# Planner speed",
        "",
        "Wall time of `edgepool.planner.plan(pool, job, profile, objective)` measured by",
        "`benchmarks/planner_speed.py` (the analytic profile of a GPT with hidden 1024, 16 heads, FFN 4096,",
        "vocabulary 32000, sequence 256; pools mix Orin Nano, Xavier NX, Nano and Raspberry Pi 5 in equal",
        "numbers; Wi-Fi = shared 100 Mbit/s channel, Ethernet = switched 1 Gbit/s). The time objective is",
        "the search that is exact under the cost model; the energy objective adds the power-mode search over",
        "candidate structures. Both then run the cost model's best plans in the simulator, which picks",
        "(`planner.search`, finalists); its share of the wall time is its own column (of the last repeat).",
        "",
        f"Machine: {info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB, {info['os']}, "
        f"Python {info['python']}; {info['date']}. Single process, numpy only, nothing else running; the energy",
        "rows are one run each.",
        "",
        "| devices | blocks | global batch | network | objective | target | min wall s | median wall s | DP runs "
        "| plans evaluated | plans simulated | simulator s | chosen plan | predicted step s (simulator) "
        "| cost model step s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        target = TARGETS[(r["devices"], r["layers"])]
        tgt = f"< {target:g} s" if r["objective"] == "time" else "-"
        ok = "" if r["objective"] != "time" else (" (met)" if r["min_s"] < target else " (MISSED)")
        net = "Wi-Fi" if r["medium"] == "shared" else "Ethernet"
        lines.append(f"| {r['devices']} | {r['layers']} | {r['batch']} | {net} | {r['objective']} | {tgt}{ok} "
                     f"| {r['min_s']:.3f} | {r['median_s']:.3f} | {r['dp_runs']} | {r['evaluated']} | {r['simulated']} "
                     f"| {r['simulate_s']:.2f} | {r['chosen']} | {r['step_s']:.3g} | {r['model_step_s']:.3g} |")
    lines += ["", "Reproduce: `python benchmarks/planner_speed.py`.", ""]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("\n".join(lines))
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
