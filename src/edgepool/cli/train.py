"""``edgepool train``: validate everything, then start one process per device."""

from __future__ import annotations

import argparse
import json

from rich.console import Console


from edgepool.launch.prepare import FAMILIES


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pool", required=True, help="pool file (YAML)")
    p.add_argument("--job", required=True, help="job file (YAML)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--plan", help="plan file (JSON or YAML), e.g. from `edgepool plan -o`")
    g.add_argument("--parallelism", choices=[*FAMILIES, "auto"],
                   help="build a plan of this family (shares in proportion to device speed)")
    p.add_argument("--steps", type=int, help="override the job's step count")
    p.add_argument("--out", required=True, help="output folder (metrics.jsonl, summary.json, checkpoints/)")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue from the newest good checkpoint in --out")
    again.add_argument("--fresh", action="store_true",
                       help="start over in an --out that holds a run (its files move to OUT/archive/, nothing is deleted)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    from edgepool.launch import folder
    from edgepool.launch.prepare import prepare_run

    console = Console(stderr=True)
    # The specs first: a bad one makes no folder. Then the folder's lock, and under it the start check.
    spec = prepare_run(args.pool, args.job, out_dir=args.out, plan_path=args.plan, parallelism=args.parallelism,
                       steps=args.steps, resume=args.resume, log=console.print)
    with folder.hold(args.out, "edgepool train", log=console.print):
        folder.check_start(spec, fresh=args.fresh, log=console.print)
        return _train(spec, args, console)


def _train(spec, args, console) -> int:
    from edgepool.cli.progress import TrainProgress
    from edgepool.launch.local import pool_placement
    from edgepool.launch.recover import train_recovering

    plan = spec.plan
    console.print(f"plan {plan.plan_id}: {plan.parallelism}, {len(plan.stages)} stage(s), "
                  f"{plan.num_microbatches} micro-batch(es), {plan.schedule}, devices {', '.join(plan.devices)}")
    with pool_placement(spec.pool, log=console.print) as placement:
        bar = TrainProgress(spec.steps, plan, console=console, enabled=not args.no_progress)
        with bar:
            summary = train_recovering(spec, placement=placement, on_step=bar.update, on_event=bar.event,
                                       log=console.print)
    console.print(f"final loss {summary.final_loss:.4f}, step {summary.step_time_s:.3f} s ({summary.step_time_stat}), "
                  f"{summary.samples_per_s:.1f} samples/s; results in {args.out}")
    print(json.dumps(summary.model_dump(include={"plan_id", "parallelism", "final_loss", "step_time_s", "samples_per_s"})))
    return 0
