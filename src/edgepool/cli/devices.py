"""``edgepool devices``: list the device catalog (compute, memory, power modes, sources)."""

from __future__ import annotations

import argparse
import json


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("kind", nargs="?", help="show one kind with every power mode and the source of each figure")
    parser.add_argument("--json", action="store_true", help="print the catalog as JSON")


def _as_json(kind) -> dict:
    from dataclasses import asdict

    d = asdict(kind)
    d["relative_speed"] = {m.name: kind.relative_speed(m.name) for m in kind.power_modes}
    return d


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from edgepool import catalog

    kinds = [catalog.get(args.kind)] if args.kind else catalog.kinds()
    if args.json:
        print(json.dumps([_as_json(k) for k in kinds], indent=2))
        return 0
    console = Console()
    table = Table(title=f"device catalog (speed relative to {catalog.REFERENCE_KIND} at max mode)")
    for col in ("kind", "memory GB", "mem BW GB/s", "CPU fp32 GFLOPS", "GPU fp32 GFLOPS", "GPU fp16 GFLOPS",
                "radio J/MB", "power modes: budget W, idle/busy W, compute, speed"):
        table.add_column(col, justify="left" if col.startswith(("kind", "power")) else "right")
    for k in kinds:
        modes = "\n".join(
            f"{m.name}: {m.budget_w:g} W, {m.idle_w:g}/{m.busy_w:g} W, x{m.compute_fraction:.3g}, "
            f"speed {k.relative_speed(m.name):.2f}" for m in k.power_modes
        )
        table.add_row(escape(f"{k.id}\n{k.name}"), f"{k.memory_gb:g} ({k.usable_memory_gb:g} free)",
                      f"{k.mem_bandwidth_gbps:g}", f"{k.cpu_fp32_gflops:g}", f"{k.gpu_fp32_gflops:g}",
                      f"{k.gpu_fp16_gflops:g}", f"{k.radio_j_per_mb:g}", escape(modes))
    console.print(table)
    if args.kind:
        src = Table(title=f"sources for {args.kind}")
        src.add_column("figure")
        src.add_column("source", overflow="fold")
        for key, text in kinds[0].sources.items():
            src.add_row(escape(key), escape(text))
        console.print(src)
    else:
        console.print("Figures marked ESTIMATE in `edgepool devices KIND` are modelled, not measured.", highlight=False)
    return 0
