"""``edgepool plan``: the best plan for a pool and a job, with the per-device table, the
best plan of each plain parallelism beside it and why each lost.

The profile is ``--profile FILE`` (a ``ModelProfile`` JSON, e.g. from ``edgepool
profile``) or, without one, the analytic FLOPs-based profile of the job's model; on an
emulated pool, the model measured on this host at the testbed's CPU scale, and a
``speeds:`` line says which scale it used (``launch.speeds.run_profile``). Resolving the job's model config goes through the runtime package (it reads the
tokenizer), which imports torch; the planner itself does not.
"""

from __future__ import annotations

from edgepool import modes

import argparse
from pathlib import Path


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pool", required=True, help="pool file (YAML/JSON)")
    parser.add_argument("--job", required=True, help="job file (YAML/JSON)")
    parser.add_argument("--profile", help="model profile JSON (default: analytic profile of the job's model)")
    parser.add_argument("--objective", choices=("time", "energy", "edp"), default="time")
    parser.add_argument("--deadline", type=float, metavar="S", help="step-time limit in seconds")
    parser.add_argument("--parallelism", choices=(*modes.NAMES, "pp"), help="best plan of this family only")
    parser.add_argument("--max-microbatches", type=int, help="largest micro-batch count to consider")
    parser.add_argument("--frontier", action="store_true", help="also search power modes and print the frontier")
    parser.add_argument("-o", "--output", help="write the plan as JSON here")


def resolve_profile(pool, job, path: str | None, log=print):
    """The profile to plan ``job`` on ``pool`` with (``path``, else the analytic one, or
    on an emulated pool the measured one), as ``train`` will run it (``cost.profile.for_job``)
    and at the speeds it will get: ``launch.speeds.run_profile``'s ``Speeds``."""
    from edgepool.launch.speeds import run_profile

    return run_profile(pool, job, path, log=log)


def _gb(x: float) -> str:
    return f"{x / 1e9:.2f}"


def device_table(plan, cost, title: str):
    from rich.markup import escape
    from rich.table import Table

    t = Table(title=title)
    for col in ("device", "kind", "stage", "layers", "mode", "share", "memory GB (free)", "power mode", "busy %",
                "energy J"):
        t.add_column(col, justify="right" if col in ("busy %", "energy J", "stage") else "left")
    T = cost.step_time_s
    for s, st in enumerate(plan.stages):
        for i, name in enumerate(st.devices):
            d = cost.devices[name]
            share = f"{st.shares[i]:g}/{sum(st.shares):g}" if st.shares else "all"
            mem = f"{_gb(d.memory_bytes)} ({_gb(d.memory_cap_bytes)})"
            if not d.fits:
                mem = f"[red]{mem}[/red]"
            mode = f"{st.mode}, recompute" if st.recompute else st.mode  # the notes below say why
            t.add_row(escape(name), escape(d.kind), str(s), f"[{st.layers[0]}, {st.layers[1]})", mode, share, mem,
                      escape(d.power_mode), f"{100 * d.busy_s / T:.0f}", f"{d.energy_j:.3g}")
    return t


def training_line(job, profile, plan) -> str:
    """What the plan trains and how, as the planner priced it: the precision, what trains
    (LoRA, frozen patterns), the stages that recompute their activations and the wire's
    compression (``train.wire``)."""
    t = job.train
    parts = [f"precision {t.precision}"]
    if t.lora is not None:
        parts.append(f"LoRA rank {t.lora.rank} on {', '.join(t.lora.targets)} (the rest frozen)")
    elif t.freeze:
        parts.append(f"frozen: {', '.join(t.freeze)}")
    else:
        parts.append("every parameter trains")
    units = [profile.embed, *profile.blocks, profile.head]
    total = sum(u.params_at() for u in units)
    trained = sum(u.trainable_at() for u in units)
    if trained < total:
        parts.append(f"{trained / 1e6:.3g} MB of {total / 1e6:.3g} MB of parameters train")
    on = [str(i) for i, st in enumerate(plan.stages) if st.recompute]
    parts.append(f"activation recomputation in stage(s) {', '.join(on)}" if on else "every activation kept")
    if not t.wire.is_off:  # lossy: said where it is priced
        w = t.wire
        parts.append(f"wire (lossy): boundaries {w.activations}, gradients {w.gradients}"
                     + (f" rank {w.rank}" if w.gradients == "powersgd" else ""))
    return "training: " + "; ".join(parts)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from edgepool.planner import plan as make_plan
    from edgepool.specs.job import load_job
    from edgepool.specs.pool import load_pool

    pool = load_pool(args.pool)
    job = load_job(args.job)
    console = Console()
    speeds = resolve_profile(pool, job, args.profile, log=lambda m: console.print(escape(m), highlight=False))
    profile = speeds.profile
    res = make_plan(pool, job, profile, objective=args.objective, deadline_s=args.deadline, family=args.parallelism,
                    max_microbatches=args.max_microbatches, explore_modes=True if args.frontier else None)
    p, c = res.plan, res.cost
    est = p.estimate
    head = (f"plan {p.plan_id}: {p.parallelism}, {len(p.stages)} stage(s), {p.num_microbatches} micro-batches, "
            f"{p.schedule}; predicted {est.step_time_s:.3g} s and {est.energy_j:.4g} J per step (the simulator's; "
            f"the cost model says {c.step_time_s:.3g} s; energy modelled from catalog power figures); bottleneck "
            f"(cost model): {c.bottleneck}; {res.stats['plans_simulated']} finalist plans simulated")
    console.print(device_table(p, c, f"{args.objective} objective" + (f", deadline {args.deadline:g} s" if args.deadline else "")))
    console.print(escape(head), highlight=False)
    console.print(escape(training_line(job, profile, p)), highlight=False)
    if speeds.line:
        console.print(escape(speeds.line), highlight=False)
    if res.baselines:
        t = Table(title="best plan of each plain parallelism")
        for col in ("family", "devices", "M", "step s", "energy J", "why it lost"):
            t.add_column(col, overflow="fold")
        for fam, bl in res.baselines.items():
            cd = bl.candidate
            if cd is None:
                t.add_row(fam, "-", "-", "-", "-", escape(bl.why))
            else:
                t.add_row(fam, escape(", ".join(cd.plan.devices)), str(cd.plan.num_microbatches),
                          f"{cd.step_time_s:.3g}", f"{cd.energy_j:.4g}", escape(bl.why))
        console.print(t)
    if args.frontier and res.frontier:
        t = Table(title="time-energy Pareto frontier")
        for col in ("step s", "energy J", "parallelism", "M", "power modes below max"):
            t.add_column(col, overflow="fold")
        for cd in res.frontier[:15]:
            t.add_row(f"{cd.step_time_s:.4g}", f"{cd.energy_j:.4g}", cd.plan.parallelism, str(cd.plan.num_microbatches),
                      escape(", ".join(f"{k}={v}" for k, v in cd.plan.power_modes.items()) or "-"))
        console.print(t)
    console.print(f"searched in {res.stats['elapsed_s']:.2f} s ({res.stats['dp_runs']} DP runs, "
                  f"{res.stats['plans_evaluated']} plans evaluated; "
                  f"{'exact over the plan space' if res.exact else 'power modes over candidate structures'})",
                  highlight=False)
    for note in res.stats["notes"]:
        console.print(f"note: {escape(note)}", highlight=False)
    if args.output:
        Path(args.output).write_text(p.dumps() + "\n")
        console.print(f"wrote {escape(args.output)}", highlight=False)
    return 0


def _shape(profile, job):
    from edgepool.cost.model import shape_for

    return shape_for(profile, job.train.global_batch, job.train.seq_len)
