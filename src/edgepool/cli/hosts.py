"""``edgepool hosts``: the torchrun command each real host runs.

Writes ``DIR/run.json`` (the validated pool, job and plan) and prints, per device, the
torchrun command with a static rendezvous: ``--node-rank`` is the device's rank in the
plan, so torchrun's ``RANK`` equals it. Copy ``run.json`` to the same path on every
host (or pass another path), start the commands, and each rank trains its part.
``--local-addr`` and ``GLOO_SOCKET_IFNAME`` pin gloo to the pool's interface; without
them gloo may bind to loopback and peers are refused.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path


from edgepool.launch.prepare import FAMILIES
from edgepool.machine import check_iface, parse_endpoint


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pool", required=True)
    p.add_argument("--job", required=True)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--plan")
    g.add_argument("--parallelism", choices=[*FAMILIES, "auto"])
    p.add_argument("--steps", type=int)
    p.add_argument("--out", required=True, help="run folder; the same path on every host")
    p.add_argument("--master", required=True, help="ADDR:PORT of rank 0's host, reachable from every host")
    p.add_argument("--iface", default=None, help="network interface gloo should use on every host (GLOO_SOCKET_IFNAME)")
    p.add_argument("--resume", action="store_true")


def commands(spec, master: str, iface: str | None) -> list[tuple[str, str, str]]:
    """(device, host, command) for every rank; every argument shell-quoted (``shlex.join``)."""
    addr, port = parse_endpoint(master)
    run_json = Path(spec.out_dir) / "run.json"
    out = []
    for rank, name in enumerate(spec.plan.devices):
        host = spec.pool.device(name).host
        env = ["env"] + ([f"GLOO_SOCKET_IFNAME={check_iface(iface)}"] if iface else []) + ["OMP_NUM_THREADS=1"]
        argv = env + ["torchrun", "--nnodes", str(spec.plan.world_size), "--nproc-per-node", "1", "--node-rank",
                      str(rank), "--master-addr", addr, "--master-port", str(port)]
        if host not in ("local", "emulated"):
            argv += ["--local-addr", host]
        argv += ["-m", "edgepool.runtime.rank", str(run_json)]
        out.append((name, host, shlex.join(argv)))
    return out


def run(args) -> int:
    from edgepool.launch.folder import make_folder
    from edgepool.launch.prepare import prepare_run

    parse_endpoint(args.master)  # before anything is loaded: a bad value is the first thing said
    if args.iface is not None:
        check_iface(args.iface)
    spec = prepare_run(args.pool, args.job, out_dir=args.out, plan_path=args.plan, parallelism=args.parallelism,
                       steps=args.steps, resume=args.resume, any_host=True)
    make_folder(spec.out_dir)
    spec.dump(Path(spec.out_dir) / "run.json")
    print(f"# plan {spec.plan.plan_id} ({spec.plan.parallelism}); copy {shlex.quote(str(Path(spec.out_dir) / 'run.json'))} "
          "to every host")
    for name, host, cmd in commands(spec, args.master, args.iface):
        print(f"# {name} on {host}")
        print(cmd)
    return 0
