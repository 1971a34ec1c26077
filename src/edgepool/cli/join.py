"""``edgepool join``: the agent on one device of a pool across hosts (``cluster.agent``)."""

from __future__ import annotations

import argparse


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--coordinator", required=True, help="ADDR:PORT where `edgepool serve` listens")
    p.add_argument("--token", help="the pool token file (the same file as the coordinator's)")
    p.add_argument("--device", required=True, help="this device's name in the pool file")
    p.add_argument("--data", help="this device's training data (stays on this device)")
    p.add_argument("--work", help="folder for this device's results (default ~/.edgepool/work/DEVICE)")
    p.add_argument("--kind", help="this device's kind in the catalog, to check against the pool file")


def run(args) -> int:
    import sys

    from edgepool.cluster.agent import join

    return join(args.coordinator, args.token, args.device, data=args.data, work=args.work, kind=args.kind,
                log=lambda m: print(f"edgepool join: {m}", file=sys.stderr, flush=True))
