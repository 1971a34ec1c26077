"""Hold the cost model's predictions against measured runs on the emulated testbed.

Runs every parallelism (dp, sp, tp, pp with GPipe and with 1F1B, and a hybrid: a dp
group of the two slowest devices plus the fastest device) on emulated pools of 2, 3
and 4 devices with different ``compute_scale``, each on a shared channel at two link
speeds, and writes the cost model's predicted step time and energy beside the measured
ones to ``docs/results/cost-model.md`` (and ``.json``), with the machine it ran on and
the median and maximum absolute step-time error. The discrete-event simulator's step
time (``sim.engine.simulate``, same profile) is shown beside them.

What is compared:

- step time: predicted = ``cost.estimate(plan, pool, profile, shape).step_time_s`` with
  the study's profile (``launch.study.study_profile``: the model measured on one core of
  this host, its reference speed set from the testbed's CPU caps); measured = the
  median step time of the timed steps (after one warm-up step) of a real run on the
  testbed (``launch.local.launch_local`` inside ``launch.local.pool_placement``). A run
  times between ``MIN_TIMED`` and ``MAX_TIMED`` steps, enough to cover ``--timed-s``
  seconds of predicted step time: steps of a few hundred milliseconds vary by 10-30%
  from one to the next here (CFS quota periods, other work on the host).
- energy per step: predicted = the cost model's energy; measured side = the study's
  modelled energy from *measured* CPU time and bytes sent
  (each rank's modelled meter, ``runtime.train.step_meter``). Neither is a sensor reading (this machine
  has none); both are labelled ``modelled``.

The pools describe what the testbed really emulates: where the kernel has no netem,
links have rate only, so the pools' ``latency_ms`` and ``jitter_ms`` are 0. The CPU caps
add up to ``--host-cpus`` (default 1.5 of this host's 2 cores), which leaves room for
the launcher and keeps every device at or under one core (a rank runs one thread); the
testbed gives the devices' cgroups the largest CPU weight, so other work on the host
cannot take the CPU their caps promise (``testbed.cgroups.DeviceCgroup.set_cpu_priority``).

Targets (issue 4): median absolute step-time error at most 10%, none over 25%.

Causes found with this benchmark (numbers in the commit messages and the report):

- fixed in the cost model: link rates are TCP payload at 1448/1514 of the configured
  rate (``cost.network``); sp runs two padded all-gathers forward and two all-reduces of
  the whole K and V gradients backward per block (``cost.model.group_comm``);
- fixed in the cost model: on a shared medium a pipeline is bounded by the channel,
  ``W_0 + M chan``, not by the flow shop's fill plus ``M - 1`` channel periods, which
  counted every stage's compute as if no stage could compute while the channel carried
  another micro-batch (``cost.model`` docstring);
- fixed in the profiler: timings are the CPU time of the fastest call, so a profile
  measured while other work runs is not slow, and they start after a one-second
  warm-up, because a fresh process computes up to 1.5x slower for its first half
  second (``profiler.layers``);
- fixed in the runtime: gloo moves a point-to-point message only once the receiver has
  posted its receive, and the runtime posted each receive just before it needed the
  data, so boundary transfers ran in series with compute. It now posts every receive of
  a step at its start (``runtime.engine``);
- fixed in the testbed: a CFS quota is a budget per period, and with the kernel's
  default 100 ms period a device that waits on the network part of the time ran short
  pipeline steps faster than its cap allows (the figures are in the commit that made the
  period 10 ms). The testbed now uses 10 ms periods (``testbed.cgroups.CFS_PERIOD_US``);
- fixed in the testbed: each device is pinned to host CPUs; unpinned, the scheduler
  moved the devices' threads between CPUs and they spent more CPU time per step than
  their profile (``testbed.caps.pin_cpus``);
- fixed in the runtime: 1F1B kept only ``S - s`` micro-batches in flight, and every
  micro-batch's round trip through the data owners' head (on stage 0) left stage 0
  waiting; the head now counts as a stage (``specs.plan.inflight_limit``);
- changed in the planner: the cost model's closed form counts no queueing of the
  pipelines' round trips through the data owners' head on the shared channel, so short
  pipelines on the fast link measured slower than it predicts. The prediction is now the
  simulator's, which runs the schedule (``planner.search``, finalists); the closed form
  stays in the table. Since the fix below, the two are about as close to the testbed
  here; the simulator over-predicts 1F1B on the fast link (cause not found), the closed
  form under-predicts GPipe there;
- fixed in the testbed: a namespace inherited the host's TCP congestion control, BBR on
  this host, whose window, sized from a microsecond minimum RTT on the unshaped veth,
  starved on shaped links: in most steps of the hybrid on the fast link one
  point-to-point transfer arrived tens of milliseconds late (the run's per-op trace). The
  namespaces now run cubic, Linux's default (``testbed.net.TCP_CONGESTION``).

    python benchmarks/validate_cost_model.py [--timed-s 2] [--host-cpus 1.5] [--only 3-50] [--plans pp-1f1b]
    python benchmarks/validate_cost_model.py --repredict   # re-predict the stored runs

``--repredict`` runs nothing: it reads the stored measurements (and the profile they
were predicted with) from the JSON file and predicts them again with the cost model as
it is now, for work on the model. Needs root and tc for the testbed; without them the
runs would not be emulated, and the script stops.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "results"

# (name, catalog kind, compute_scale) per pool size; speeds differ within every pool.
POOLS: dict[int, list[tuple[str, str, float]]] = {
    2: [("orin", "jetson-orin-nano", 2.0), ("nano", "jetson-nano", 1.0)],
    3: [("orin", "jetson-orin-nano", 2.0), ("nano-1", "jetson-nano", 1.0), ("nano-2", "jetson-nano", 1.0)],
    4: [("orin", "jetson-orin-nano", 2.0), ("tx2", "jetson-tx2", 1.5), ("nano", "jetson-nano", 1.0),
        ("rpi", "rpi5", 1.0)],
}
LINKS_MBPS = (50, 200)
PLANS = ("dp", "sp", "tp", "pp-gpipe", "pp-1f1b", "hybrid")
MEMORY_GB = 1.0
# A small GPT: every plan fits 1 GB, a step takes a fraction of a second to a few
# seconds on the testbed, and the compute/communication balance differs by plan.
MODEL = {"family": "gpt", "size": "small", "hidden": 128, "num_layers": 4, "num_heads": 8, "ffn": 512}
TRAIN = {"global_batch": 8, "seq_len": 128, "lr": 1e-3, "optimizer": "adamw", "seed": 0, "timeout_s": 60}
NUM_MICROBATCHES = 4
TARGET_MEDIAN_PCT, TARGET_MAX_PCT = 10.0, 25.0
MIN_TIMED, MAX_TIMED = 2, 8  # timed steps per run, after one warm-up step


def pool_spec(n: int, mbps: float, latency_ms: float):
    from edgepool.specs.pool import PoolSpec

    return PoolSpec.model_validate({
        "name": f"vcm-{n}-{mbps:g}",
        "network": {"medium": "shared", "bandwidth_mbps": mbps, "latency_ms": latency_ms, "jitter_ms": 0.0},
        "devices": [{"name": name, "kind": kind, "host": "emulated", "compute_scale": scale, "memory_gb": MEMORY_GB}
                    for name, kind, scale in POOLS[n]],
    })


def job_spec(schedule: str = "1f1b"):
    from edgepool.specs.job import JobSpec
    from edgepool.testing import CORPUS

    return JobSpec.model_validate({
        "model": MODEL, "data": {"path": str(CORPUS)}, "train": {**TRAIN, "steps": 1},
        "parallelism": {"mode": "dp", "num_microbatches": NUM_MICROBATCHES, "schedule": schedule},
    })


def make_plan(pool, name: str, num_layers: int):
    """The plan of one entry: the study's proportional family plans, and the hybrid."""
    from edgepool.launch.prepare import proportional_plan
    from edgepool.specs.plan import Plan, StagePlan, split_counts

    if name in ("dp", "sp", "tp"):
        return proportional_plan(pool, job_spec(), num_layers, name)
    if name.startswith("pp-"):
        return proportional_plan(pool, job_spec(name[3:]), num_layers, "pp")
    if name == "hybrid":
        # A dp group of the two slowest devices serves the first layers, the fastest
        # device the rest; layers in proportion to the groups' speeds.
        devs = sorted(pool.devices, key=lambda d: -d.speed())
        group, last = tuple(d.name for d in devs[-2:]), devs[0].name
        speed = {d.name: d.speed() for d in devs}
        counts = split_counts(num_layers, (sum(speed[g] for g in group), speed[last]))
        return Plan(num_layers=num_layers, num_microbatches=NUM_MICROBATCHES, schedule="1f1b", stages=[
            StagePlan(layers=(0, counts[0]), devices=group, mode="dp", shares=tuple(speed[g] for g in group)),
            StagePlan(layers=(counts[0], num_layers), devices=(last,))])
    raise ValueError(f"unknown plan {name!r}; known: {', '.join(PLANS)}")


def predict(row: dict, profile) -> dict:
    from edgepool.cost import estimate
    from edgepool.models.config import job_model_config as model_config
    from edgepool.sim.engine import simulate
    from edgepool.specs.plan import Plan, Shape
    from edgepool.specs.pool import PoolSpec

    pool = PoolSpec.model_validate(row["pool"])
    plan = Plan.model_validate(row["plan"])
    cfg = model_config(job_spec())
    shape = Shape(global_batch=TRAIN["global_batch"], seq_len=TRAIN["seq_len"], num_heads=cfg.num_heads, ffn=cfg.ffn,
                  num_kv_heads=cfg.num_kv_heads)
    c = estimate(plan, pool, profile, shape)
    sim = simulate(plan, pool, profile, shape)
    return {"step_time_s": sim.step_time_s, "energy_j": sim.energy_j, "source": "simulator",
            "model_step_time_s": c.step_time_s, "model_energy_j": c.energy_j, "pipe_s": c.pipe_s, "sync_s": c.sync_s,
            "optim_s": c.optim_s, "bottleneck": c.bottleneck, "fits": c.feasible}


def error_pct(pred: float | None, meas: float | None) -> float | None:
    if pred is None or not meas:
        return None
    return 100.0 * (pred - meas) / meas


def run_one(pool, plan, placement, out_dir: Path, steps: int) -> dict:
    from edgepool.launch.local import RankFailed, launch_local
    from edgepool.launch.study import device_figures
    from edgepool.runtime.train import RunSpec
    from edgepool.specs.metrics import read_metrics, timed_steps

    spec = RunSpec(pool=pool, job=job_spec(plan.schedule), plan=plan, out_dir=str(out_dir), steps=steps)
    t0 = time.monotonic()
    try:
        summary = launch_local(spec, placement=placement, deadline_s=180.0)
    except RankFailed as exc:
        return {"status": "failed", "cause": exc.reason, "wall_s": time.monotonic() - t0}
    metrics = read_metrics(out_dir / "metrics.jsonl")
    timed = timed_steps(metrics)
    figs = device_figures(pool, plan, summary, placement, spec.threads)
    return {
        "status": "ok", "wall_s": time.monotonic() - t0, "steps": steps,
        "step_times_s": [m.step_time_s for m in metrics],
        "step_time_s": summary.step_time_s,
        "energy_j": sum(f["energy_j"] for f in figs.values()),
        "devices": {d: {"cpu_s": statistics.median(m.devices[d].cpu_s for m in timed),
                        "bytes_sent": statistics.median(m.devices[d].bytes_sent for m in timed),
                        "busy_pct": figs[d]["busy_pct"], "cores": figs[d]["cores"],
                        "peak_memory_bytes": figs[d]["peak_memory_bytes"]} for d in plan.devices},
        "final_loss": summary.final_loss,
    }


def measure(args) -> dict:
    from edgepool.launch.local import pool_placement
    from edgepool.launch.study import study_profile
    from edgepool.models.config import job_model_config as model_config
    from edgepool.testbed import Testbed

    features = Testbed.features()
    if not features.network:
        sys.exit(f"the testbed is unavailable here ({features.network.reason}); this benchmark needs it")
    latency_ms = 2.0 if features.netem else 0.0
    cfg = model_config(job_spec())
    if not args.reuse_profile:
        # Measure the profile now (it is cached, and the runs below then use it), rather
        # than trust one cached under unknown conditions.
        from edgepool.profiler.layers import cached_profile

        prof, path, _ = cached_profile(cfg, seq_len=TRAIN["seq_len"], optimizer=TRAIN["optimizer"], refresh=True)
    rows: list[dict] = []
    notes: list[str] = []
    profile_json = None
    profile_notes: list[str] = [] if args.reuse_profile else [f"{prof.model} measured at the start of this run ({path})"]
    prediction_source = ""
    only = set(args.only or [])
    raw = Path(args.raw) if args.raw else Path(tempfile.mkdtemp(prefix="edgepool-vcm-"))
    for n in sorted(POOLS):
        for mbps in LINKS_MBPS:
            key = f"{n}-{mbps:g}"
            if only and key not in only:
                continue
            pool = pool_spec(n, mbps, latency_ms)
            state = Testbed.up(pool, host_cpus=args.host_cpus, replace=True)
            try:
                with pool_placement(pool, log=lambda m: None) as placement:
                    if not placement.emulated:
                        sys.exit("the testbed fell back to plain local processes; this benchmark needs it")
                    notes = placement.notes
                    profile, prediction_source = study_profile(
                        pool, job_spec(), placement, log=profile_notes.append if args.reuse_profile else lambda m: None)
                    profile_json = profile.to_json()
                    for name in PLANS:
                        if args.plans and name not in args.plans:
                            continue
                        if name == "hybrid" and n < 3:
                            continue
                        plan = make_plan(pool, name, cfg.num_layers)
                        row = {"pool_name": pool.name, "devices": n, "link_mbps": mbps, "name": name,
                               "plan_id": plan.plan_id, "parallelism": plan.parallelism,
                               "pool": json.loads(pool.model_dump_json()), "plan": json.loads(plan.dumps()),
                               "reference_speed_value": profile.reference_speed_value}
                        row["predicted"] = predict(row, profile)
                        # Short steps are noisy here: time enough of them (after the warm-up step)
                        # to cover about --timed-s seconds, between MIN_TIMED and MAX_TIMED steps.
                        timed = min(MAX_TIMED, max(MIN_TIMED, math.ceil(args.timed_s / row["predicted"]["step_time_s"])))
                        row["measured"] = run_one(pool, plan, placement, raw / key / name, 1 + timed)
                        m, p = row["measured"], row["predicted"]
                        print(f"{key} {name:9s} {m['status']:6s} measured {m.get('step_time_s', float('nan')):7.3f} s "
                              f"predicted {p['step_time_s']:7.3f} s ({error_pct(p['step_time_s'], m.get('step_time_s')) or 0:+.1f}%)"
                              f"  {1 + timed} steps, run {m['wall_s']:.1f} s", flush=True)
                        rows.append(row)
            finally:
                Testbed.down(tag=state.tag)
    return {"rows": rows, "profile": profile_json, "profile_notes": profile_notes[:1],
            "prediction_source": prediction_source, "testbed": notes, "host_cpus": args.host_cpus,
            "timed_s": args.timed_s, "latency_ms": latency_ms, "raw_dir": str(raw)}


def _caps(rows: list[dict]) -> dict[int, dict[str, float]]:
    """CPU cores per device of each pool size, from the measured runs."""
    out: dict[int, dict[str, float]] = {}
    for r in rows:
        for d, v in r["measured"].get("devices", {}).items():
            out.setdefault(r["devices"], {})[d] = v["cores"]
    return out


def write(result: dict, out: Path, wall_s: float | None) -> None:
    from edgepool.machine import machine_line

    rows = result["rows"]
    errs: list[float] = []
    model_errs: list[float] = []
    for r in rows:
        m, p = r["measured"], r["predicted"]
        r.pop("sim_error_pct", None)  # older files: the simulator had its own column
        r["step_error_pct"] = error_pct(p["step_time_s"], m.get("step_time_s"))
        r["energy_error_pct"] = error_pct(p["energy_j"], m.get("energy_j"))
        r["model_error_pct"] = error_pct(p["model_step_time_s"], m.get("step_time_s"))
        if r["step_error_pct"] is not None:
            errs.append(abs(r["step_error_pct"]))
            model_errs.append(abs(r["model_error_pct"]))
    summary = {
        "runs": len(rows), "measured_runs": len(errs),
        "median_abs_step_error_pct": statistics.median(errs) if errs else None,
        "max_abs_step_error_pct": max(errs) if errs else None,
        "median_abs_energy_error_pct": statistics.median(abs(r["energy_error_pct"]) for r in rows
                                                         if r["energy_error_pct"] is not None) if errs else None,
        "median_abs_model_error_pct": statistics.median(model_errs) if model_errs else None,
        "max_abs_model_error_pct": max(model_errs) if model_errs else None,
        "target_median_pct": TARGET_MEDIAN_PCT, "target_max_pct": TARGET_MAX_PCT,
    }
    summary["targets_met"] = bool(errs) and summary["median_abs_step_error_pct"] <= TARGET_MEDIAN_PCT and \
        summary["max_abs_step_error_pct"] <= TARGET_MAX_PCT and len(errs) == len(rows)
    if wall_s is not None:
        result["benchmark_wall_s"] = wall_s
    result["summary"] = summary
    out.mkdir(parents=True, exist_ok=True)
    (out / "cost-model.json").write_text(json.dumps(result, indent=1))

    info = result["machine"]
    med, mx = summary["median_abs_step_error_pct"], summary["max_abs_step_error_pct"]
    lines = [
        "# Planner's predictions vs measured (testbed)", "",
        f"Machine: {machine_line(info)}.", "",
        "Written by `benchmarks/validate_cost_model.py`; do not edit by hand.", "",
        f"Model: GPT, hidden {MODEL['hidden']}, {MODEL['num_layers']} layers, {MODEL['num_heads']} heads, "
        f"FFN {MODEL['ffn']}; global batch {TRAIN['global_batch']}, sequence {TRAIN['seq_len']}, AdamW; "
        f"pipelines with {NUM_MICROBATCHES} micro-batches. Each run times {MIN_TIMED} to {MAX_TIMED} steps after one "
        f"warm-up step (about {result['timed_s']:g} s of predicted step time); measured step time is their median.",
        f"Pools: {', '.join(str(n) for n in sorted(POOLS))} emulated devices "
        f"({'; '.join(', '.join(f'{d} x{s:g}' for d, _, s in POOLS[n]) for n in sorted(POOLS))}) on one shared "
        f"channel of {' or '.join(f'{m:g}' for m in LINKS_MBPS)} Mbit/s, latency {result['latency_ms']:g} ms "
        f"(what the testbed emulates), memory cap {MEMORY_GB:g} GB each; CPU caps add up to "
        f"{result['host_cpus']:g} host cores.",
        "Profile: measured on this host (`launch.study.study_profile`); each pool's CPU caps give its reference "
        f"speed: {'; '.join(n.removeprefix('profile: ') for n in result.get('profile_notes', [])) or 'in the JSON file'}.",
        "CPU caps (host cores): " + "; ".join(
            f"{n} devices: " + ", ".join(f"{d} {c:.2f}" for d, c in caps.items()) for n, caps in _caps(rows).items()) + ".",
        "Predicted = the planner's estimate of a plan: the discrete-event simulator (`sim.engine`) running the "
        "plan's op order on the pool, which is what `planner.plan` reports for its choice and ranks its finalists "
        "by. The cost model's closed form (`cost.estimate`), which the planner's search optimises, is shown beside "
        "it.",
        "Energy per step: predicted = the simulator's; measured = modelled from measured CPU time and bytes sent "
        "(each rank's modelled meter, `runtime.train.step_meter`): both modelled, no sensor.", "",
        f"**Step-time error of the prediction (|predicted - measured| / measured): median {med:.1f}% "
        f"(target <= {TARGET_MEDIAN_PCT:g}%), max {mx:.1f}% (target <= {TARGET_MAX_PCT:g}%): "
        f"{'targets met' if summary['targets_met'] else 'TARGETS MISSED'}.** "
        f"Energy: median |error| {summary['median_abs_energy_error_pct']:.1f}%. The cost model's closed form: "
        f"median {summary['median_abs_model_error_pct']:.1f}%, max {summary['max_abs_model_error_pct']:.1f}%."
        if errs else "No run finished.",
        "",
    ]
    if wall_s is not None:
        lines += [f"Benchmark wall time: {wall_s / 60:.1f} min.", ""]
    lines += [
        "| devices | link Mbit/s | plan | plan id | steps | step s measured | step s predicted | error | "
        "step s cost model | error | J/step measured | J/step predicted | error | cost-model bottleneck |",
        "| ---: | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    over = []
    for r in rows:
        m, p = r["measured"], r["predicted"]
        head = f"| {r['devices']} | {r['link_mbps']:g} | {r['name']} | {r['plan_id']} | {m.get('steps', '-')} |"
        if m["status"] != "ok":
            lines.append(f"{head} {m['status']}: {m.get('cause', '')} | {p['step_time_s']:.3f} | - | "
                         f"{p['model_step_time_s']:.3f} | - | - | {p['energy_j']:.2f} | - | {p['bottleneck']} |")
            continue
        if abs(r["step_error_pct"]) > TARGET_MAX_PCT:
            over.append(f"{r['name']} on {r['devices']} devices at {r['link_mbps']:g} Mbit/s")
        lines.append(
            f"{head} {m['step_time_s']:.3f} | {p['step_time_s']:.3f} | {r['step_error_pct']:+.1f}% | "
            f"{p['model_step_time_s']:.3f} | {r['model_error_pct']:+.1f}% | {m['energy_j']:.2f} | {p['energy_j']:.2f} | "
            f"{r['energy_error_pct']:+.1f}% | {p['bottleneck']} |")
    from edgepool.testbed.cgroups import CFS_PERIOD_US

    pipe = [r["measured"]["step_time_s"] for r in rows
            if r["measured"]["status"] == "ok" and (r["name"].startswith("pp") or r["name"] == "hybrid")]
    pipe_lo = min(pipe) if pipe else 0.0
    worst = sorted((r for r in rows if r["step_error_pct"] is not None), key=lambda r: -abs(r["step_error_pct"]))[:3]
    if worst:
        lines += [
            "", "Largest step-time errors: " + "; ".join(
                f"{r['name']} on {r['devices']} devices at {r['link_mbps']:g} Mbit/s ({r['step_error_pct']:+.1f}%)"
                for r in worst) + (f"; over the {TARGET_MAX_PCT:g}% target: {'; '.join(over)}" if over else "") + ".",
            f"Short pipeline steps (from {pipe_lo:.2f} s here) last a few tens of the devices' CFS quota periods "
            f"({CFS_PERIOD_US / 1e3:g} ms each), so they vary by some percent from one run to the next."
        ]
    lines += ["", f"Testbed (the last pool's; the others differ in devices and rate): {'; '.join(result['testbed'])}", ""]
    (out / "cost-model.md").write_text("\n".join(lines))
    print("\n".join(lines[10:14]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--timed-s", type=float, default=2.0,
                    help="predicted seconds of timed steps per run (between %d and %d steps)" % (MIN_TIMED, MAX_TIMED))
    ap.add_argument("--host-cpus", type=float, default=1.5)
    ap.add_argument("--only", action="append", help="run one pool and link only, e.g. 3-50 (repeatable)")
    ap.add_argument("--plans", action="append", choices=PLANS, help="run this plan only (repeatable)")
    ap.add_argument("--reuse-profile", action="store_true", help="use the cached profile instead of measuring it")
    ap.add_argument("--raw", help="folder for the runs' own files (default: a new temporary folder)")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--repredict", action="store_true", help="predict the stored runs again; run nothing")
    args = ap.parse_args()
    out = Path(args.out)
    if args.repredict:
        from edgepool.cost.profile import ModelProfile

        result = json.loads((out / "cost-model.json").read_text())
        profile = ModelProfile.from_json(result["profile"])
        from dataclasses import replace

        for r in result["rows"]:
            r["predicted"] = predict(r, replace(profile, reference_speed_value=r["reference_speed_value"]))
        write(result, out, result.get("benchmark_wall_s"))
        return
    from edgepool.machine import machine_info

    t0 = time.monotonic()
    result = measure(args)
    result["machine"] = machine_info()
    write(result, out, time.monotonic() - t0)


if __name__ == "__main__":
    main()
