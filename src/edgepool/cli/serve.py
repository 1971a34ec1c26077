"""``edgepool serve``: the coordinator of a pool across hosts (``cluster.coordinator``)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from edgepool.launch.prepare import FAMILIES


def default_token() -> Path:
    return Path(os.environ.get("EDGEPOOL_HOME") or Path.home() / ".edgepool") / "pool.token"


def add_parser(p: argparse.ArgumentParser) -> None:
    from edgepool.cluster.coordinator import DEFAULT_PORT

    p.add_argument("--pool", required=True, help="pool file (YAML); its devices may join")
    p.add_argument("--job", required=True, help="job file (YAML)")
    p.add_argument("--out", required=True, help="output folder (run.json, metrics.jsonl, summary.json)")
    p.add_argument("--token", help=f"pool token file (default: {default_token()}, made when missing)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port to listen on (default {DEFAULT_PORT}; 0: any)")
    p.add_argument("--bind", help="address to listen on (default: the pool file's coordinator; 0.0.0.0 only if you "
                                  "mean every interface)")
    p.add_argument("--min-devices", type=int, help="start with this many devices once --join-timeout passes")
    p.add_argument("--join-timeout", type=float, default=300.0, help="seconds to wait for devices (default 300)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--plan", help="plan file (JSON or YAML); only its devices may join")
    g.add_argument("--parallelism", choices=[*FAMILIES, "auto"], help="plan this family over the devices that joined")
    p.add_argument("--steps", type=int, help="override the job's step count")
    p.add_argument("--fresh", action="store_true", help="start over in an --out that holds a run (archived)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    from rich.console import Console

    from edgepool.cli.progress import TrainProgress
    from edgepool.cluster.coordinator import serve
    from edgepool.cluster.trust import new_token, pool_id, read_token
    from edgepool.errors import SpecError

    console = Console(stderr=True)
    if not 0 <= args.port < 65536:
        raise SpecError(f"--port must be 0..65535, got {args.port}")
    if not 0 < args.join_timeout <= 86_400:
        raise SpecError(f"--join-timeout must be more than 0 and at most 86400 s, got {args.join_timeout:g}")
    token_path = Path(args.token) if args.token else default_token()
    if args.token is None and not token_path.exists():
        token_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        new_token(token_path)
        console.print(f"made a pool token: {token_path}; copy it to every device (mode 0600)")
    token = read_token(token_path)
    console.print(f"pool token {token_path} (pool id {pool_id(token)})")
    summary = serve(args.pool, args.job, out=args.out, token=token, bind=args.bind, port=args.port,
                    min_devices=args.min_devices, join_timeout_s=args.join_timeout, plan_path=args.plan,
                    parallelism=args.parallelism, steps=args.steps, fresh=args.fresh, log=console.print,
                    progress=lambda spec: TrainProgress(spec.steps, spec.plan, console=console,
                                                        enabled=not args.no_progress))
    console.print(f"final loss {summary.final_loss:.4f}, step {summary.step_time_s:.3f} s ({summary.step_time_stat}), "
                  f"{summary.samples_per_s:.1f} samples/s; results in {args.out}")
    print(json.dumps(summary.model_dump(include={"plan_id", "parallelism", "final_loss", "step_time_s", "samples_per_s"})))
    return 0
