"""``edgepool env``: which energy meters and testbed features this machine has."""

from __future__ import annotations

import argparse
import json


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from edgepool.testbed.environment import environment_report

    rep = environment_report()
    if args.json:
        print(json.dumps(rep.to_json(), indent=2))
        return 0
    console = Console()
    host = Table(title="host", show_header=False)
    for k, v in rep.host.items():
        host.add_row(escape(k), escape(v))
    console.print(host)
    for title, rows, first in (("energy meters", rep.meters, "meter"), ("testbed features", rep.testbed, "feature")):
        t = Table(title=title)
        t.add_column(first)
        t.add_column("available")
        t.add_column("detail", overflow="fold")
        for name, ok, detail in rows:
            t.add_row(escape(name), "[green]yes[/green]" if ok else "[red]no[/red]", escape(detail))
        console.print(t)
    for line in rep.summary:
        console.print(escape(line), highlight=False)
    return 0
