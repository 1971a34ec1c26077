"""``edgepool`` entry point.

Subcommands live in their own modules under ``edgepool.cli`` and are imported only when
used, so ``edgepool --help`` and the pure commands stay fast (no torch). Each module
exposes ``add_parser(subparsers)`` and ``run(args) -> int``.

Any ``EdgepoolError`` is printed without a traceback, one line (one per bad file where several are found at
once, as the data check does), and exits with 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from edgepool.errors import EdgepoolError

# name -> (module, one-line help). Modules are imported lazily.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("edgepool.cli.demo", "the built-in demo: a 4-device emulated pool, planned, trained and compared"),
    "train": ("edgepool.cli.train", "train a model on a pool of devices"),
    "profile": ("edgepool.cli.profile", "measure the job's model on this host (and links between devices)"),
    "serve": ("edgepool.cli.serve", "coordinate a pool across hosts: admit devices with the pool token, plan, train"),
    "join": ("edgepool.cli.join", "join a pool's coordinator from this device and train its part"),
    "token": ("edgepool.cli.token", "make a pool token (the secret every device of a pool holds)"),
    "hosts": ("edgepool.cli.hosts", "print the torchrun command each real host needs"),
    "study": ("edgepool.cli.study", "run DP, SP, TP, PP and the planner's choice on a pool; measure and compare"),
    "testbed": ("edgepool.cli.testbed", "bring an emulated pool (namespaces, shaped links, cgroups) up or down"),
    "env": ("edgepool.cli.env", "show which energy meters and testbed features this machine has"),
    "devices": ("edgepool.cli.devices", "list the device catalog: compute, memory, power modes, sources"),
    "plan": ("edgepool.cli.plan", "find the best plan of a pool for a job (time, energy or edp)"),
    "simulate": ("edgepool.cli.simulate", "simulate one step of a plan: timeline, energy, peak memory, Gantt chart"),
    "export": ("edgepool.cli.export", "write a run's trained model (and LoRA adapters) as a Hugging Face folder"),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgepool", description="Train Transformers on a pool of edge devices.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        if only is not None and name != only:
            sub.add_parser(name, help=help_)
            continue
        importlib.import_module(module).add_parser(sub.add_parser(name, help=help_))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in COMMANDS else None
    parser = build_parser(only=command)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return int(importlib.import_module(COMMANDS[args.command][0]).run(args) or 0)
    except EdgepoolError as exc:
        for line in str(exc).splitlines() or [type(exc).__name__]:  # several only where each names its own file
            print(f"edgepool {args.command}: error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"edgepool {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
