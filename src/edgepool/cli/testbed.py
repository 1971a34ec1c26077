"""``edgepool testbed up|down|status|measure``: the emulated pool on this machine.

``up --pool P`` builds namespaces, shaped links and cgroups for the pool's
``host: emulated`` devices and leaves them up (state in ``/run/edgepool``), so later
commands (``train``, ``study``) run their ranks inside. ``down`` removes them, also after
a crash. ``status`` lists what is there. ``measure`` sends TCP between two devices and
prints the rate against the configured one.
"""

from __future__ import annotations

import argparse
import json


def add_parser(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    up = sub.add_parser("up", help="bring the pool's emulated devices up")
    up.add_argument("--pool", required=True, help="pool file (YAML/JSON)")
    up.add_argument("--tag", help="1-4 lower-case letters/digits naming the testbed (default: from the pool name)")
    up.add_argument("--cpu-fit", choices=("sum", "fastest"), default="sum", help="how CPU caps fit the host (default: sum)")
    up.add_argument("--memory-fit", choices=("exact", "fit"), default="exact", help="memory caps exact or scaled to fit")
    up.add_argument("--no-caps", action="store_true", help="no CPU/memory cgroups, only namespaces and links")
    up.add_argument("--replace", action="store_true", help="first remove a testbed with the same tag")
    down = sub.add_parser("down", help="remove a testbed (namespaces, links, qdiscs, cgroups)")
    down.add_argument("--pool", help="pool file whose testbed to remove")
    down.add_argument("--tag", help="tag of the testbed to remove")
    down.add_argument("--all", action="store_true", help="remove every edgepool testbed on this machine")
    st = sub.add_parser("status", help="list testbeds and what they hold")
    st.add_argument("--json", action="store_true")
    ms = sub.add_parser("measure", help="measure TCP throughput between two emulated devices")
    ms.add_argument("--pool", required=True)
    ms.add_argument("--src", help="sending device (default: the first emulated)")
    ms.add_argument("--dst", help="receiving device (default: the second emulated)")
    ms.add_argument("--seconds", type=float, default=1.0)


def _load(path: str):
    from edgepool.specs.pool import load_pool

    return load_pool(path)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.markup import escape

    from edgepool.testbed import Testbed, TestbedError

    console = Console(highlight=False)
    if args.action == "up":
        pool = _load(args.pool)
        state = Testbed.up(
            pool,
            tag=args.tag,
            cpu_fit=args.cpu_fit,
            memory_fit=args.memory_fit,
            caps=not args.no_caps,
            replace=args.replace,
        )
        for line in state.describe():
            console.print(escape(line))
        if state.emulated:
            console.print(f"up in {state.setup_s:.2f} s; remove with: edgepool testbed down --pool {args.pool}")
        return 0
    if args.action == "down":
        if not (args.pool or args.tag or args.all):
            raise TestbedError("say which testbed: --pool FILE, --tag TAG or --all")
        reports = Testbed.down(_load(args.pool) if args.pool else None, tag=args.tag, all=args.all)
        rc = 0
        if not reports:
            console.print("no edgepool testbed found")
        for r in reports:
            what = f"{len(r.removed)} item(s)" + (f", killed {len(r.killed_pids)} process(es)" if r.killed_pids else "")
            console.print(f"testbed {r.tag}: removed {what}")
            for p in r.problems:
                console.print(f"[red]problem:[/red] {escape(p)}")
                rc = 1
        return rc
    if args.action == "status":
        rows = Testbed.status()
        if args.json:
            print(json.dumps([r.__dict__ for r in rows], indent=2, default=list))
            return 0
        if not rows:
            console.print("no edgepool testbed on this machine")
        for r in rows:
            owner = f"pool {r.pool_name!r}" if r.pool_name else "NO state file (left over; `edgepool testbed down --all`)"
            console.print(f"[bold]testbed {r.tag}[/bold]: {escape(owner)}")
            console.print(escape(f"  namespaces: {', '.join(r.netns) or '-'}"))
            console.print(escape(f"  links: {', '.join(f'{n} ({k})' for n, k in r.links) or '-'}"))
            for q in r.qdiscs:
                console.print(escape(f"  qdisc {q}"))
            console.print(escape(f"  cgroups: {', '.join(r.cgroups) or '-'}"))
        return 0
    if args.action == "measure":
        from edgepool.testbed.measure import measure_throughput

        pool = _load(args.pool)
        state = Testbed.attach(pool)
        if state is None or not state.emulated:
            raise TestbedError(f"no testbed is up for pool {pool.name!r}; run `edgepool testbed up --pool {args.pool}`")
        devs = state.devices
        src = args.src or devs[0]
        dst = args.dst or (devs[1] if len(devs) > 1 else None)
        if dst is None:
            raise TestbedError("measure needs two emulated devices")
        (r,) = measure_throughput(state, [(src, dst)], duration_s=args.seconds)
        conf = f"{r.configured_bps / 1e6:g} Mbit/s configured" if r.configured_bps else "unshaped"
        ratio = f" ({r.ratio:.1%} of it; TCP payload is at most ~96% of a shaped rate)" if r.ratio else ""
        console.print(escape(f"{src} -> {dst}: {r.bps / 1e6:.1f} Mbit/s of TCP payload, {conf}{ratio}"))
        return 0
    raise AssertionError(args.action)
