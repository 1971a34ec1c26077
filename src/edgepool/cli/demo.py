"""``edgepool demo``: the built-in pool, planned, trained and compared, in a few minutes.

Brings up the built-in heterogeneous pool of four emulated devices (a laptop, an Orin
Nano and two Jetson Nanos with small memory, on one 802.11n-like channel), plans the
built-in job, and runs the study: DP, TP, SP, FSDP, PP and the planner's choice, each
trained for a few steps with a progress bar. Prints the study table and where the
report and plots are, then takes the testbed down.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

BUILTIN = Path(__file__).resolve().parent.parent / "examples"


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    p.add_argument("--steps", type=int, default=None, help="steps per run (default: the built-in job's)")
    p.add_argument("--no-progress", action="store_true")


def run(args) -> int:
    from rich.console import Console

    from edgepool.cli.progress import TrainProgress
    from edgepool.launch.study import run_study
    from edgepool.report.study import print_table
    from edgepool.specs import load_job, load_pool

    console = Console(stderr=True)
    t0 = time.monotonic()
    pool = load_pool(BUILTIN / "demo-pool.yaml")
    job = load_job(BUILTIN / "demo-job.yaml")
    console.print(f"[bold]edgepool demo[/bold]: pool {pool.name!r} ({', '.join(pool.device_names)}), "
                  f"{job.model.family} model, {args.out}")
    result = run_study(pool, job, out_dir=Path(args.out), steps=args.steps or job.train.steps, console=console,
                       deadline_s=150.0, progress_bar=None if args.no_progress else
                       (lambda plan, steps: TrainProgress(steps, plan, console=console)))
    out = Console()
    print_table(result, out)
    out.print(f"report: {args.out}/study.md; plots: {args.out}/study-bars.png, {args.out}/study-timeline.png; "
              f"specs: {BUILTIN / 'demo-pool.yaml'}, {BUILTIN / 'demo-job.yaml'}")
    out.print(f"demo finished in {time.monotonic() - t0:.0f} s")
    return 0
