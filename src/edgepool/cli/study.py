"""``edgepool study``: DP, SP, TP, PP and the planner's choice on one pool, measured."""

from __future__ import annotations

import argparse


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pool", required=True)
    p.add_argument("--job", required=True)
    p.add_argument("--steps", type=int, help="steps per run (default: the job's)")
    p.add_argument("--out", required=True, help="output folder: study.json, study.md, PNG plots, runs/")
    p.add_argument("--deadline", type=float, default=240.0, help="seconds a single run may take before it is stopped")
    p.add_argument("--no-progress", action="store_true")


def run(args) -> int:
    from rich.console import Console

    from edgepool.cli.progress import TrainProgress
    from edgepool.launch.study import run_study
    from edgepool.report.study import print_table
    from edgepool.specs import load_job, load_pool

    console = Console(stderr=True)
    pool, job = load_pool(args.pool), load_job(args.job)
    result = run_study(pool, job, out_dir=args.out, steps=args.steps or job.train.steps, console=console,
                       deadline_s=args.deadline, progress_bar=None if args.no_progress else
                       (lambda plan, steps: TrainProgress(steps, plan, console=console)))
    print_table(result, Console())
    Console().print(f"report: {args.out}/study.md, plots: {args.out}/study-bars.png, {args.out}/study-timeline.png")
    return 0
