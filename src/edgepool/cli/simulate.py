"""``edgepool simulate``: run one step of a plan in the discrete-event simulator.

Prints the simulated step time beside the cost model's estimate, each device's busy
and idle time, energy (modelled) and peak memory, and optionally draws a Gantt chart.
The profile is ``edgepool plan``'s (``cli.plan.resolve_profile``): on an emulated pool,
at the testbed's CPU scale, with a ``speeds:`` line that says so.
"""

from __future__ import annotations

import argparse


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--plan", required=True, help="plan file (JSON, e.g. from `edgepool plan -o`)")
    parser.add_argument("--pool", required=True, help="pool file (YAML/JSON)")
    parser.add_argument("--job", required=True, help="job file (YAML/JSON)")
    parser.add_argument("--profile", help="model profile JSON (default: analytic profile of the job's model)")
    parser.add_argument("--gantt", metavar="PNG", help="write a Gantt chart of the step here")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from edgepool.cli.plan import _shape, resolve_profile
    from edgepool.cost.model import estimate
    from edgepool.sim.engine import simulate
    from edgepool.specs.job import load_job
    from edgepool.specs.layout import check_plan
    from edgepool.specs.plan import load_plan
    from edgepool.specs.pool import load_pool

    pool = load_pool(args.pool)
    job = load_job(args.job)
    plan = load_plan(args.plan)
    console = Console()
    speeds = resolve_profile(pool, job, args.profile, log=lambda m: console.print(escape(m), highlight=False))
    profile = speeds.profile
    shape = _shape(profile, job)
    check_plan(plan, shape, pool=pool, num_layers=profile.num_layers)
    res = simulate(plan, pool, profile, shape)
    est = estimate(plan, pool, profile, shape)
    t = Table(title=f"plan {plan.plan_id} ({plan.parallelism}, M={plan.num_microbatches}, {plan.schedule})")
    for col in ("device", "power mode", "busy s", "idle s", "busy %", "energy J", "peak memory GB", "MB moved"):
        t.add_column(col, justify="left" if col in ("device", "power mode") else "right")
    for name, d in res.devices.items():
        t.add_row(escape(name), escape(d.power_mode), f"{d.busy_s:.3g}", f"{d.idle_s:.3g}",
                  f"{100 * d.busy_s / res.step_time_s:.0f}", f"{d.energy_j:.4g}", f"{d.peak_memory_bytes / 1e9:.2f}",
                  f"{d.bytes_moved / 1e6:.4g}")
    console.print(t)
    gap = res.step_time_s / est.step_time_s - 1
    console.print(f"simulated step {res.step_time_s:.4g} s, {res.energy_j:.4g} J (modelled); cost model "
                  f"{est.step_time_s:.4g} s, {est.energy_j:.4g} J ({gap:+.1%}); {res.num_flows} network flows",
                  highlight=False)
    if speeds.line:
        console.print(escape(speeds.line), highlight=False)
    if args.gantt:
        from edgepool.sim.gantt import draw_gantt

        out = draw_gantt(res, args.gantt, order=plan.devices)
        console.print(f"wrote {escape(str(out))}", highlight=False)
    return 0
