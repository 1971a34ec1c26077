"""``edgepool profile``: measure the job's model on this host, and optionally the links.

Prints per-part times and memory, and writes the profile to the cache (and ``-o``).
With ``--links`` it also measures latency and bandwidth between the pool's first two
devices (inside the testbed for emulated devices).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--job", required=True)
    p.add_argument("--pool", help="pool file (needed for --links)")
    p.add_argument("-o", "--output", help="also write the profile JSON here")
    p.add_argument("--refresh", action="store_true", help="measure again even if a cached profile exists")
    p.add_argument("--links", action="store_true", help="measure link latency and bandwidth between two devices")


def run(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from edgepool.errors import SpecError
    from edgepool.profiler.layers import cached_profile
    from edgepool.models.config import job_model_config
    from edgepool.specs import load_job, load_pool

    console = Console()
    job = load_job(args.job)
    cfg = job_model_config(job)
    prof, path, cached = cached_profile(cfg, seq_len=job.train.seq_len, optimizer=job.train.optimizer,
                                        precision=job.train.precision, refresh=args.refresh, progress=lambda m: console.print(f"  measuring {m}"))
    console.print(f"profile of {prof.model} ({prof.source}, {'from cache' if cached else 'measured now'}): {path}")
    t = Table(title=f"per token at sequence {job.train.seq_len}; {prof.notes[0] if prof.notes else prof.source}")
    for h in ("part", "fwd us/token", "bwd us/token", "fixed fwd ms", "params MB", "saved act KB/token"):
        t.add_column(h, justify="right" if h != "part" else "left")
    T = job.train.seq_len
    for lp in (prof.embed, prof.blocks[0], prof.head):
        t.add_row(lp.name, f"{lp.fwd_s.total(T) * 1e6:.2f}", f"{lp.bwd_s.total(T) * 1e6:.2f}",
                  f"{lp.fixed_fwd_s * 1e3:.3f}", f"{lp.params_at() / 1e6:.2f}", f"{lp.act_bytes.total(T) / 1e3:.1f}")
    console.print(t)
    console.print(f"optimizer ({prof.optimizer}): {prof.optim_s_per_param_byte * 1e9:.3f} ns per parameter byte")
    if args.output:
        Path(args.output).write_text(prof.dumps())
    if args.links:
        if not args.pool:
            raise SpecError("--links needs --pool")
        from edgepool.launch.local import pool_placement
        from edgepool.profiler.link import measure_link

        pool = load_pool(args.pool)
        if len(pool.devices) < 2:
            raise SpecError("--links needs a pool of at least two devices")
        a, b = pool.devices[0].name, pool.devices[1].name
        with pool_placement(pool, log=console.print) as placement:
            link = measure_link(pool, a, b, placement, Path(args.output or ".").resolve().parent / ".edgepool-links")
        where = "shaped testbed link" if placement.emulated else "loopback (plain local processes)"
        console.print(f"link {a} <-> {b} ({where}): latency {link['latency_ms']:.2f} ms, "
                      f"bandwidth {link['bandwidth_mbps']:.1f} Mbit/s")
    return 0
