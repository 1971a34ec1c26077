"""Helpers shipped for tests: forked multi-rank runs and tiny specs."""

from __future__ import annotations

from pathlib import Path

# The bundled text corpus (Python standard-library docstrings), used by the demo and tests.
CORPUS = Path(__file__).resolve().parent.parent / "data" / "corpus.txt"


def rank_processes(out: Path) -> dict[int, int]:
    """pid -> first-generation rank (its ``RANK``) of every live rank process of the run
    whose folder is ``out`` (found in /proc by its ``run.json``)."""
    needle = str(out / "run.json").encode()
    found = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes()
            if needle not in cmd or b"edgepool.runtime.rank" not in cmd:
                continue
            env = dict(kv.split(b"=", 1) for kv in (d / "environ").read_bytes().split(b"\0") if b"=" in kv)
            state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and b"RANK" in env:
            found[int(d.name)] = int(env[b"RANK"])
    return found
