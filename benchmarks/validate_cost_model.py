"""Hold the planner's predictions against measured runs on the emulated testbed.

Cases are drawn at random from a seed (``--seed``, reported), so nobody tunes the model
to them. Each case draws:

- a GPT of hidden 64 to 768 (``HIDDENS``), 2 to 12 layers, FFN 4x hidden, and a
  sequence of 32 to 256 tokens (``SEQS``);
- a pool of 1 to 4 emulated devices of uneven speed (``SPEEDS``), each with a memory cap
  of ``MEMORY_GB``, on links of 20 Mbit/s to 1 Gbit/s (``LINKS_MBPS``), one shared
  channel or a switched link per device;
- a plan: ``single`` on one device; on more, one of dp, sp, tp, fsdp, pp with GPipe,
  pp with 1F1B, the Asteroid-style hybrid (3 or more devices) and the planner's own
  choice. Modes are dealt round-robin from a shuffled list, so every mode is covered;
- the largest global batch of ``BATCHES`` whose predicted step fits ``--step-budget-s``
  (the smallest when none does), so that large models stay runnable here.

and writes the planner's predicted step time and per-device peak memory beside the
measured ones to ``docs/results/cost-model.md`` (and ``.json``), with the machine it ran
on, the seed, and the median and maximum absolute errors.

What is compared:

- step time: predicted = the planner's figure for the plan: the discrete-event simulator
  (``sim.engine.simulate``) with the profile ``plan``, ``simulate`` and ``train`` use
  (``launch.speeds.run_profile`` through ``launch.study.study_profile``: the model
  measured on one core of this host, at the testbed's CPU scale); the cost model's closed
  form (``cost.estimate``) is shown beside it. Measured = the median step time of the
  timed steps (after one warm-up step) of a real run on the testbed
  (``launch.local.launch_local`` inside ``launch.local.pool_placement``). A run times
  between ``MIN_TIMED`` and ``MAX_TIMED`` steps, enough to cover ``--timed-s`` seconds
  of predicted step time: short steps vary by 10-30% from one to the next here (CFS
  quota periods, other work on the host).
- memory: predicted = the cost model's peak resident memory of each device
  (``cost.estimate(...).peak_memory_bytes``); measured = the rank's peak resident set
  (``VmHWM``, ``machine.peak_rss_bytes``). Every device of every run is one sample.

Cases whose smallest valid batch is predicted to step slower than ``--max-step-s`` are
listed, not run (a 20 Mbit/s channel makes some plans take minutes a step), and so are
cases for which the family's proportional plan is invalid (a device given no sample or
no head).

The pools describe what the testbed really emulates: where the kernel has no netem,
links have rate only, so the pools' ``latency_ms`` and ``jitter_ms`` are 0. The CPU caps
add up to ``--host-cpus`` (default 1.5 of this host's 2 cores) or less, which leaves room
for the launcher and keeps every device at or under one core (a rank runs one thread;
``testbed.caps.MAX_SUM_CORES``); the
testbed gives the devices' cgroups the largest CPU weight, so other work on the host
cannot take the CPU their caps promise (``testbed.cgroups.DeviceCgroup.set_cpu_priority``).

Targets (issues 4 and 14): median absolute error at most 10%, none over 25%, for step
time and for memory.

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

Found when the cases were widened (seed 14; the first run's step error was median
25.6%, max 64.6%, memory median 10.5%, max 85.5%):

- fixed in the testbed: fit=sum gave a lone or much faster device more than one core,
  which its one-thread rank could not use (every single-device case ran about a third
  slower than predicted); caps are now at most one core (``testbed.caps.MAX_SUM_CORES``);
- fixed in the runtime: with only DDP's 25 MiB cap a small model's gradients were one
  bucket, sent after the whole backward, while the model priced all but the first
  block's as overlapped; buckets now end with their block (``runtime.overlap``);
- fixed in the simulator: gloo writes one pair's messages to one TCP connection in
  turn, so boundary transfers from one device to another queue; the simulator shared
  the link among them, and a two-stage 1F1B on 20 Mbit/s links came out 62% slow
  (``sim.engine``, connections);
- changed in the profiler: single-device cases measured 10-17% slower than the parts
  of the profile added up to; the profile is now scaled by timed whole-model steps
  (``profiler.layers.calibrate``), and in the next run they were within about 10%
  (that run also re-measured every profile, so the calibration's own share is not
  separated);
- fixed in the cost model: in-memory backups were charged as optimizer state plus
  parameters from the first round, which holds parameters only; they are priced as the
  runtime holds them (``BackupCost.held_bytes``), and the benchmark's jobs take no
  backups (``replicate_every: 0``), so runs and predictions both leave them out;
- fixed in the cost model: gloo runs ``reduce_scatter_tensor`` as an all-reduce of the
  whole tensor (each device sent ``2 (n-1)/n`` of a unit, the time of an all-reduce,
  measured on the testbed with the devices' NIC counters), so fsdp's backward moves an
  all-gather's and an all-reduce's bytes per unit, not two all-gathers'; its two cases on
  shared channels measured 25% slower than predicted before (``modes.fsdp``);
- fixed in the cost model: the tiny dp's blocks (0.2 MB) share the runtime's 1 MiB
  buckets, so its last bucket (three blocks and the embed) is all-reduced after the
  backward, and the one before it waits for five blocks' backward; the model priced one
  block's all-reduce as exposed and the rest as overlapped from the last block on. It now
  prices the runtime's own buckets (``modes.base.sync_buckets``): that case went from
  -32% to -18% re-priced on the same measurement. A 3-device experiment on its pool
  (1.1 and 0.77 MB all-reduces) took 42 ms alone, as modelled, and 49-52 ms beside 20 ms
  of compute on each device, with CFS periods of 2, 5 or 10 ms alike: overlapping a
  collective with compute on a capped device costs time the model does not see;
- fixed in the profiler: the whole-step calibration timed three steps after one warm-up
  step, which for the tiniest model (steps of a few milliseconds) gave x1.54 once and
  x0.97-1.15 when timed again, and its single-device case measured 20-48% faster than
  predicted in four runs; it now times at least half a second of steps after a warm-up
  (``profiler.layers.calibrate``, PROFILE_METHOD 8);
- not fixed: fsdp's memory is under-predicted by up to 19% (perhaps its collectives'
  buffers); tiny single-device cases (steps of 15-60 ms) now measure about 16% slower
  than predicted (the calibration's steady whole steps leave out the runtime's per-step
  work), the largest model's about 20%.

With these the same seed's run met the targets (step median 4.0%, max 20.5%; memory
median 7.2%, max 16.0%). One fsdp case that measured 36.8 s a step before is now
predicted at 37 s and so listed as too slow to measure (``--max-step-s`` 30); re-priced on
its earlier measurement it was within 0.2%.

    python benchmarks/validate_cost_model.py [--seed 14] [--cases 32] [--timed-s 2] [--only 3 --only 7]
    python benchmarks/validate_cost_model.py --repredict   # re-predict the stored runs

``--repredict`` runs nothing: it reads the stored measurements (and the profile they
were predicted with) from the JSON file and predicts them again with the cost model as
it is now, for work on the model. Needs root and tc for the testbed; without them the
runs would not be emulated, and the script stops.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
import math
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "results"

SEQS = (32, 64, 128, 256)
HIDDENS = (64, 128, 192, 256, 384, 512, 768)
LAYERS = (2, 12)
SPEEDS = {1.0: "jetson-nano", 1.5: "jetson-tx2", 2.0: "jetson-orin-nano", 3.0: "host-cpu"}
LINKS_MBPS = (20, 50, 100, 200, 500, 1000)
MEDIA = ("shared", "switched")
BATCHES = (16, 8, 4, 2)
PLANS = ("dp", "sp", "tp", "fsdp", "pp-gpipe", "pp-1f1b", "hybrid", "planner")
MEMORY_GB = 3.0
TARGET_MEDIAN_PCT, TARGET_MAX_PCT = 10.0, 25.0
MIN_TIMED, MAX_TIMED = 2, 8  # timed steps per run, after one warm-up step


def draw_cases(seed: int, n: int) -> list[dict]:
    """``n`` cases from ``seed`` (module docstring). A case is plain data (JSON)."""
    rng = random.Random(seed)
    modes: list[str] = []
    cases = []
    for i in range(n):
        devices = rng.randint(1, 4)
        if devices == 1:
            plan = "single"
        else:
            if not modes:
                modes = list(PLANS)
                rng.shuffle(modes)
            plan = next((m for m in modes if m != "hybrid" or devices >= 3), modes[0])
            if plan == "hybrid" and devices < 3:
                devices = 3
            modes.remove(plan)
        hidden = rng.choice(HIDDENS)
        heads = rng.choice([h for h in (2, 4, 8, 12) if hidden % h == 0 and hidden // h >= 16])
        speeds = sorted((rng.choice(list(SPEEDS)) for _ in range(devices)), reverse=True)
        if devices > 1 and len(set(speeds)) == 1:  # uneven: the last device is the slowest kind
            speeds[-1] = min(SPEEDS)
            speeds[0] = max(speeds[0], 1.5)
        layers = rng.randint(*LAYERS)
        # What a family plan needs, set after the draws (the seed's later cases stay the
        # same): a stage per device for pp, and for tp the most heads the width allows.
        if plan.startswith("pp-") or plan == "hybrid":
            layers = max(layers, devices)
        if plan == "tp":
            heads = max(h for h in (2, 4, 8, 12) if hidden % h == 0 and hidden // h >= 16)
        cases.append({
            "case": i, "name": plan,
            "model": {"family": "gpt", "size": "small", "hidden": hidden, "num_layers": layers,
                      "num_heads": heads, "ffn": 4 * hidden},
            "seq_len": rng.choice(SEQS),
            "speeds": speeds, "medium": rng.choice(MEDIA), "link_mbps": rng.choice(LINKS_MBPS),
        })
    return cases


def pool_spec(case: dict, latency_ms: float = 0.0):
    from edgepool.specs.pool import PoolSpec

    return PoolSpec.model_validate({
        "name": f"vcm-{case['case']}",
        "network": {"medium": case["medium"], "bandwidth_mbps": case["link_mbps"], "latency_ms": latency_ms,
                    "jitter_ms": 0.0},
        "devices": [{"name": f"d{i}-x{s:g}".replace(".", "_"), "kind": SPEEDS[s], "host": "emulated",
                     "compute_scale": s, "memory_gb": MEMORY_GB} for i, s in enumerate(case["speeds"])],
    })


def job_spec(case: dict, global_batch: int, schedule: str = "1f1b", steps: int = 1):
    from edgepool.specs.job import JobSpec
    from edgepool.testing import CORPUS

    return JobSpec.model_validate({
        "model": case["model"], "data": {"path": str(CORPUS)},
        "train": {"global_batch": global_batch, "seq_len": case["seq_len"], "lr": 1e-3, "optimizer": "adamw",
                  "seed": 0, "timeout_s": 120, "steps": steps, "replicate_every": 0},
        "parallelism": {"mode": "auto", "schedule": schedule},
    })


def make_plan(pool, job, name: str, profile):
    """The plan of one case: the study's proportional family plans, the hybrid, or the
    planner's choice (what ``train --parallelism auto`` runs)."""
    from edgepool.launch.prepare import proportional_plan
    from edgepool.models.config import job_model_config
    from edgepool.planner import plan as search
    from edgepool.specs.layout import check_plan

    num_layers = job_model_config(job).num_layers
    if name == "planner":
        plan = search(pool, job, profile, objective="time").plan
    elif name.startswith("pp-"):
        plan = proportional_plan(pool, job, num_layers, "pp")
    else:
        plan = proportional_plan(pool, job, num_layers, name)
    check_plan(plan, shape_of(job), pool=pool, num_layers=num_layers)
    return plan


def shape_of(job):
    from edgepool.models.config import job_model_config
    from edgepool.specs.plan import Shape

    cfg = job_model_config(job)
    return Shape(global_batch=job.train.global_batch, seq_len=job.train.seq_len, num_heads=cfg.num_heads,
                 ffn=cfg.ffn, num_kv_heads=cfg.num_kv_heads)


def predict(row: dict, profile) -> dict:
    from edgepool.cost import estimate
    from edgepool.sim.engine import simulate
    from edgepool.specs.job import JobSpec
    from edgepool.specs.plan import Plan
    from edgepool.specs.pool import PoolSpec

    pool = PoolSpec.model_validate(row["pool"])
    plan = Plan.model_validate(row["plan"])
    shape = shape_of(JobSpec.model_validate(row["job"]))
    # No in-memory backups on either side: the jobs set replicate_every 0 (rows stored
    # before they did ran with "auto", whose first backup comes after the few steps run).
    profile = replace(profile, backup_every=0)
    c = estimate(plan, pool, profile, shape)
    sim = simulate(plan, pool, profile, shape)
    return {"step_time_s": sim.step_time_s, "energy_j": sim.energy_j, "source": "simulator",
            "model_step_time_s": c.step_time_s, "model_energy_j": c.energy_j, "bottleneck": c.bottleneck,
            "fits": c.feasible, "memory_bytes": c.peak_memory_bytes}


def error_pct(pred: float | None, meas: float | None) -> float | None:
    if pred is None or not meas:
        return None
    return 100.0 * (pred - meas) / meas


def run_one(pool, job, plan, placement, out_dir: Path, steps: int) -> dict:
    from edgepool.launch.local import RankFailed, launch_local
    from edgepool.launch.study import device_figures
    from edgepool.runtime.train import RunSpec
    from edgepool.specs.metrics import read_metrics, timed_steps

    spec = RunSpec(pool=pool, job=job, plan=plan, out_dir=str(out_dir), steps=steps)
    t0 = time.monotonic()
    try:
        summary = launch_local(spec, placement=placement, deadline_s=600.0)
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


def choose_batch(case: dict, pool, profile, budget_s: float):
    """The largest global batch of ``BATCHES`` whose plan is valid and predicted to step
    within ``budget_s`` (else the smallest valid one), with its job and plan."""
    from edgepool.errors import EdgepoolError

    valid, why = None, "no global batch of %s fits the pool" % (BATCHES,)
    from edgepool.sim.engine import simulate

    for gb in BATCHES:
        if gb < len(case["speeds"]):
            continue
        job = job_spec(case, gb, case["name"][3:] if case["name"].startswith("pp-") else "1f1b")
        try:
            plan = make_plan(pool, job, case["name"], profile)
        except EdgepoolError as exc:
            why = str(exc)
            continue
        valid = (job, plan, "")
        if simulate(plan, pool, profile, shape_of(job)).step_time_s <= budget_s:
            break
    return valid or (None, None, why)


def measure(args) -> dict:
    from edgepool.launch.local import pool_placement
    from edgepool.launch.study import study_profile
    from edgepool.testbed import Testbed

    features = Testbed.features()
    if not features.network:
        sys.exit(f"the testbed is unavailable here ({features.network.reason}); this benchmark needs it")
    cases = draw_cases(args.seed, args.cases)
    rows: list[dict] = []
    notes: list[str] = []
    only = set(args.only or [])
    raw = Path(args.raw) if args.raw else Path(tempfile.mkdtemp(prefix="edgepool-vcm-"))
    for case in cases:
        if only and case["case"] not in only:
            continue
        pool = pool_spec(case)
        state = Testbed.up(pool, host_cpus=args.host_cpus, replace=True)
        try:
            with pool_placement(pool, log=lambda m: None) as placement:
                if not placement.emulated:
                    sys.exit("the testbed fell back to plain local processes; this benchmark needs it")
                notes = placement.notes
                profile_notes: list[str] = []
                profile, _ = study_profile(pool, job_spec(case, BATCHES[-1]), placement, log=profile_notes.append)
                job, plan, why = choose_batch(case, pool, profile, args.step_budget_s)
                row = {**case, "pool_name": pool.name, "pool": json.loads(pool.model_dump_json()),
                       "profile": profile.to_json(), "profile_notes": profile_notes,
                       "caps": {d.name: placement.cores(d.name) for d in pool.devices}}
                if plan is None:
                    row["skipped"] = why
                    print(f"case {case['case']:2d} {case['name']:8s} skipped: {why}", flush=True)
                    rows.append(row)
                    continue
                row.update(job=json.loads(job.model_dump_json()), global_batch=job.train.global_batch,
                           plan=json.loads(plan.dumps()), plan_id=plan.plan_id, parallelism=plan.parallelism)
                row["predicted"] = predict(row, profile)
                if row["predicted"]["step_time_s"] > args.max_step_s:
                    row["skipped"] = (f"predicted {row['predicted']['step_time_s']:.0f} s per step at its smallest "
                                      f"batch, over --max-step-s {args.max_step_s:g}: too slow to measure here")
                    print(f"case {case['case']:2d} {case['name']:8s} skipped: {row['skipped']}", flush=True)
                    rows.append(row)
                    continue
                timed = min(MAX_TIMED, max(MIN_TIMED, math.ceil(args.timed_s / row["predicted"]["step_time_s"])))
                row["measured"] = run_one(pool, job, plan, placement, raw / f"case-{case['case']}", 1 + timed)
                m, p = row["measured"], row["predicted"]
                print(f"case {case['case']:2d} {case['name']:8s} {describe(row)}: {m['status']:6s} measured "
                      f"{m.get('step_time_s', float('nan')):7.3f} s predicted {p['step_time_s']:7.3f} s "
                      f"({error_pct(p['step_time_s'], m.get('step_time_s')) or 0:+.1f}%), {1 + timed} steps, "
                      f"run {m['wall_s']:.1f} s", flush=True)
                rows.append(row)
        finally:
            Testbed.down(tag=state.tag)
    return {"rows": rows, "seed": args.seed, "cases": args.cases, "testbed": notes, "host_cpus": args.host_cpus,
            "timed_s": args.timed_s, "step_budget_s": args.step_budget_s, "raw_dir": str(raw)}


def describe(row: dict) -> str:
    m = row["model"]
    return (f"h{m['hidden']} L{m['num_layers']} a{m['num_heads']} seq {row['seq_len']} batch "
            f"{row.get('global_batch', '-')}; {len(row['speeds'])} dev x{'/'.join(f'{s:g}' for s in row['speeds'])}; "
            f"{row['medium']} {row['link_mbps']:g} Mbit/s")


def errors(rows: list[dict]) -> None:
    """Fill each row's step, model and memory errors (percent of measured)."""
    for r in rows:
        if "measured" not in r:
            continue
        m, p = r["measured"], r["predicted"]
        r["step_error_pct"] = error_pct(p["step_time_s"], m.get("step_time_s"))
        r["model_error_pct"] = error_pct(p["model_step_time_s"], m.get("step_time_s"))
        r["memory_error_pct"] = {d: error_pct(p["memory_bytes"][d], v["peak_memory_bytes"])
                                 for d, v in m.get("devices", {}).items()}


def verdict(value: float | None, target: float) -> str:
    if value is None:
        return "not measured"
    return "met" if value <= target else f"missed by {value - target:.1f} points"


def _stats(values: list[float]) -> dict:
    return {"median": statistics.median(values) if values else None, "max": max(values) if values else None,
            "n": len(values)}


def write(result: dict, out: Path, wall_s: float | None) -> None:
    from edgepool.machine import machine_line

    rows = result["rows"]
    errors(rows)
    ran = [r for r in rows if "measured" in r]
    ok = [r for r in ran if r["step_error_pct"] is not None]
    step = _stats([abs(r["step_error_pct"]) for r in ok])
    model = _stats([abs(r["model_error_pct"]) for r in ok])
    mem = _stats([abs(e) for r in ok for e in r["memory_error_pct"].values()])
    met = lambda s: s["n"] > 0 and s["median"] <= TARGET_MEDIAN_PCT and s["max"] <= TARGET_MAX_PCT  # noqa: E731
    summary = {"cases": len(rows), "ran": len(ran), "measured": len(ok), "skipped": len(rows) - len(ran),
               "step_error_pct": step, "model_error_pct": model, "memory_error_pct": mem,
               "target_median_pct": TARGET_MEDIAN_PCT, "target_max_pct": TARGET_MAX_PCT,
               "targets_met": met(step) and met(mem) and len(ok) == len(ran)}
    if wall_s is not None:
        result["benchmark_wall_s"] = wall_s
    result["summary"] = summary
    out.mkdir(parents=True, exist_ok=True)
    (out / "cost-model.json").write_text(json.dumps(result, indent=1))

    def pct(s: dict) -> str:
        return f"median {s['median']:.1f}%, max {s['max']:.1f}%" if s["n"] else "no samples"

    lines = [
        "# Planner's predictions vs measured (testbed)", "",
        f"Machine: {machine_line(result['machine'])}.", "",
        "Written by `benchmarks/validate_cost_model.py`; do not edit by hand.", "",
        f"**Seed {result['seed']}: {result['cases']} cases drawn at random** (the script's docstring says from what): "
        f"GPTs of hidden {min(HIDDENS)}-{max(HIDDENS)}, {LAYERS[0]}-{LAYERS[1]} layers, sequence "
        f"{min(SEQS)}-{max(SEQS)}; pools of 1-4 emulated devices of speeds {', '.join(f'{s:g}' for s in SPEEDS)}, "
        f"memory cap {MEMORY_GB:g} GB each, CPU caps adding up to {result['host_cpus']:g} host cores; links "
        f"{min(LINKS_MBPS)}-{max(LINKS_MBPS)} Mbit/s, shared or switched, no latency (the kernel has no netem); "
        f"plans {', '.join(PLANS)} (single on one device); global batch the largest of "
        f"{', '.join(map(str, BATCHES))} predicted to step within {result['step_budget_s']:g} s.",
        f"Each run times {MIN_TIMED} to {MAX_TIMED} steps after one warm-up step (about {result['timed_s']:g} s of "
        "predicted step time); measured step time is their median.",
        "Predicted step = the planner's figure (the simulator, `sim.engine`, with the profile `plan`/`train` use: "
        "measured on one core of this host, at the testbed's CPU scale); the cost model's closed form "
        "(`cost.estimate`) beside it. Predicted memory = the cost model's peak per device; measured = the rank's "
        "peak resident set (VmHWM); every device of every run is one sample.", "",
        f"**Step time: {pct(step)}; memory: {pct(mem)} (targets: median <= {TARGET_MEDIAN_PCT:g}%, max <= "
        f"{TARGET_MAX_PCT:g}%): {'targets met' if summary['targets_met'] else 'TARGETS MISSED'}"
        f" (step median {verdict(step['median'], TARGET_MEDIAN_PCT)}, step max {verdict(step['max'], TARGET_MAX_PCT)}; "
        f"memory median {verdict(mem['median'], TARGET_MEDIAN_PCT)}, memory max {verdict(mem['max'], TARGET_MAX_PCT)}).** The cost "
        f"model's closed form: step {pct(model)}. {len(ok)} of {len(rows)} cases measured"
        + (f"; {summary['skipped']} not run (no valid plan, or too slow to measure here: listed below)"
           if summary["skipped"] else "")
        + (f"; {len(ran) - len(ok)} failed" if len(ran) > len(ok) else "") + ".", "",
    ]
    if wall_s is not None:
        lines += [f"Benchmark wall time: {wall_s / 60:.1f} min" + (
            f" (cases {', '.join(map(str, result['rerun']))} run again on their own: `--only`)"
            if result.get("rerun") else "") + ".", ""]
    lines += [
        "| case | model | seq | batch | devices (speed: host cores) | link | plan | plan id | steps | step s measured | "
        "step s predicted | error | cost model | error | memory error per device |",
        "| ---: | --- | ---: | ---: | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        m = r["model"]
        devs = ", ".join(f"x{s:g}: {r['caps'][d]:.2f}" for s, d in zip(r["speeds"], r["caps"]))
        head = (f"| {r['case']} | h{m['hidden']} L{m['num_layers']} a{m['num_heads']} | {r['seq_len']} | "
                f"{r.get('global_batch', '-')} | {devs} | {r['medium']} {r['link_mbps']:g} | {r['name']} |")
        if "measured" not in r:
            lines.append(f"{head} {r.get('plan_id', '-')} | - | not run: {r['skipped'][:160]} | | | | | | |")
            continue
        meas, p = r["measured"], r["predicted"]
        if meas["status"] != "ok":
            lines.append(f"{head} {r['plan_id']} | {meas.get('steps', '-')} | {meas['status']}: "
                         f"{meas.get('cause', '')[:120]} | {p['step_time_s']:.3f} | | {p['model_step_time_s']:.3f} | | |")
            continue
        memerr = ", ".join(f"{e:+.0f}%" for e in r["memory_error_pct"].values())
        lines.append(f"{head} {r['plan_id']} | {meas['steps']} | {meas['step_time_s']:.3f} | {p['step_time_s']:.3f} | "
                     f"{r['step_error_pct']:+.1f}% | {p['model_step_time_s']:.3f} | {r['model_error_pct']:+.1f}% | "
                     f"{memerr} |")
    worst = sorted(ok, key=lambda r: -abs(r["step_error_pct"]))[:3]
    worst_mem = sorted(((abs(e), e, r, d) for r in ok for d, e in r["memory_error_pct"].items()),
                       key=lambda t: -t[0])[:3]
    if worst:
        lines += ["", "Largest step-time errors: " + "; ".join(
            f"case {r['case']} {r['name']} ({r['step_error_pct']:+.1f}%: {describe(r)})" for r in worst) + "."]
    if worst_mem:
        lines += ["Largest memory errors: " + "; ".join(
            f"case {r['case']} {r['name']} on {d} ({e:+.1f}%)" for _, e, r, d in worst_mem) + "."]
    lines += ["", f"Testbed (the last case's): {'; '.join(result['testbed'])}", ""]
    (out / "cost-model.md").write_text("\n".join(lines))
    print("\n".join(lines[6:14]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=14, help="the cases' seed (reported)")
    ap.add_argument("--cases", type=int, default=32)
    ap.add_argument("--timed-s", type=float, default=2.0,
                    help="predicted seconds of timed steps per run (between %d and %d steps)" % (MIN_TIMED, MAX_TIMED))
    ap.add_argument("--step-budget-s", type=float, default=2.0, help="the largest predicted step a case's batch may give")
    ap.add_argument("--max-step-s", type=float, default=30.0,
                    help="skip a case whose predicted step at its smallest batch is longer (listed as skipped)")
    ap.add_argument("--host-cpus", type=float, default=1.5)
    ap.add_argument("--only", action="append", type=int,
                    help="run this case only (repeatable); its row replaces the stored run's of the same seed")
    ap.add_argument("--list", action="store_true", help="print the drawn cases; run nothing")
    ap.add_argument("--raw", help="folder for the runs' own files (default: a new temporary folder)")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--repredict", action="store_true", help="predict the stored runs again; run nothing")
    args = ap.parse_args()
    out = Path(args.out)
    if args.list:
        for c in draw_cases(args.seed, args.cases):
            print(c)
        return
    if args.repredict:
        from edgepool.cost.profile import ModelProfile

        result = json.loads((out / "cost-model.json").read_text())
        for r in result["rows"]:
            if "measured" in r:
                r["predicted"] = predict(r, ModelProfile.from_json(r["profile"]))
        write(result, out, result.get("benchmark_wall_s"))
        return
    from edgepool.machine import machine_info

    t0 = time.monotonic()
    result = measure(args)
    result["machine"] = machine_info()
    wall_s = time.monotonic() - t0
    stored = out / "cost-model.json"
    if args.only and stored.is_file():
        # Rerun cases replace their rows in the stored run of the same seed; the others stay.
        old = json.loads(stored.read_text())
        if old.get("seed") == args.seed and old.get("cases") == args.cases:
            new = {r["case"]: r for r in result["rows"]}
            result["rows"] = [new.pop(r["case"], r) for r in old["rows"]] + list(new.values())
            result["rows"].sort(key=lambda r: r["case"])
            result["rerun"] = sorted(set(old.get("rerun", [])) | set(args.only))
            wall_s += old.get("benchmark_wall_s", 0.0)
    write(result, out, wall_s)


if __name__ == "__main__":
    main()
