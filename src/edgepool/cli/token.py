"""``edgepool token new -o FILE``: a pool secret (256 random bits, mode 0600)."""

from __future__ import annotations

import argparse


def add_parser(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    new = sub.add_parser("new", help="write a new pool token (never overwrites a file)")
    new.add_argument("-o", "--out", required=True, help="token file to write (mode 0600)")


def run(args) -> int:
    from edgepool.cluster.trust import new_token, pool_id, read_token

    path = new_token(args.out)
    print(f"wrote the pool token {path} (mode 0600; pool id {pool_id(read_token(path))}); copy it to every device "
          "of the pool, over a channel you trust (scp, a USB stick), and keep it secret")
    return 0
