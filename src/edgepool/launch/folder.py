"""A run folder: one writer at a time, and nothing in it lost.

``hold(out, what)`` makes ``out`` and holds its lock for as long as a ``train`` or
``study`` writes there: an exclusive ``flock`` on ``out/.edgepool.lock``, with the
holder's pid and command written inside. A second writer is refused with one line
naming the holder. The kernel drops the lock when its process dies, however it dies,
so a lock left by a dead process is simply taken over, and the log says whose it was.

``check_start(run, fresh=..., log=...)`` runs before any process starts, on the
console:

- a plain start into a folder that holds a run (checkpoints or step records) is
  refused: continue it with ``--resume``, or start over with ``--fresh``;
- ``--fresh`` moves the old run's files (``checkpoints/``, ``metrics.jsonl``,
  ``summary.json``, ``trace.json``, ``logs/``) into ``out/archive/<UTC time>/`` and
  starts at step 0: nothing is deleted;
- ``--resume`` needs the folder's checkpoints to be this run's (plan, seed, model,
  batch, ...: ``RunSpec.identity``); one of another run is refused, naming what differs.
  Stray entries in ``checkpoints/``, partial checkpoints and a cut last line of
  ``metrics.jsonl`` are skipped with a warning.

The ranks check again for themselves (``runtime.train``): they never overwrite step
records of an earlier run, and a resume that finds nothing loadable stops instead of
starting over.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from edgepool.errors import EdgepoolError, SpecError
from edgepool.runtime import checkpoint
from edgepool.specs.metrics import read_metrics

LOCK = ".edgepool.lock"
RUN_FILES = ("checkpoints", "metrics.jsonl", "summary.json", "trace.json", "logs")


class FolderBusy(EdgepoolError):
    """Another live process writes into this run folder."""


def make_folder(out: str | Path) -> Path:
    """``out`` as a folder that exists and can be written, or a one-line error."""
    p = Path(out).resolve()
    try:
        p.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise SpecError(f"--out {str(out)!r} is a file, not a folder; give a folder path") from None
    except OSError as exc:
        raise SpecError(f"--out {str(out)!r} cannot be made ({exc.strerror}); choose a folder you can write to") from None
    if not os.access(p, os.W_OK | os.X_OK):
        raise SpecError(f"--out {str(out)!r} is not writable; choose a folder you can write to")
    return p


def _holder(fd: int) -> str:
    return os.pread(fd, 512, 0).decode(errors="replace").strip()


@contextmanager
def hold(out: str | Path, what: str, *, log=print) -> Iterator[Path]:
    """Hold ``out``'s lock while the body runs; yields the resolved folder."""
    folder = make_folder(out)
    path = folder / LOCK
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise SpecError(f"--out {str(out)!r}: cannot write its lock file ({exc.strerror}); choose a folder you can "
                        "write to") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FolderBusy(f"--out {folder} is in use by {_holder(fd) or 'another process'}; wait for it to end "
                             "or choose another --out") from None
        stale = _holder(fd)
        if stale:
            log(f"took over the lock of {folder} from {stale}, which is no longer running")
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} ({what}, since {stamp})\n".encode(), 0)
        try:
            yield folder
        finally:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # drops the flock


def _records(metrics: Path, log) -> int:
    try:
        return len(read_metrics(metrics, log=log)) if metrics.is_file() else 0
    except SpecError:
        return -1  # unreadable: still an earlier run's file, never overwritten


def check_start(run, *, fresh: bool, log=print) -> None:
    """Refuse, archive or accept what ``run``'s folder holds, before any process starts."""
    out = Path(run.out_dir)
    root = out / "checkpoints"
    steps, _ = checkpoint.step_folders(root)
    if fresh:
        archive(out, log=log)
        return
    found = checkpoint.survey(root, run.identity())
    for w in found.skipped:
        log(f"warning: {w}")
    records = _records(out / "metrics.jsonl", log)
    held = (f"checkpoints up to step {max(steps)}" if steps else "no checkpoint") + (
        f", {records} steps in metrics.jsonl" if records > 0 else ", an unreadable metrics.jsonl" if records < 0 else "")
    if not run.resume:
        if steps or records:
            raise SpecError(f"{out} already holds a run ({held}); continue it with --resume, or start over with "
                            f"--fresh (the old files move to {out / 'archive'}/)")
        return
    if found.foreign:
        step, why = max(found.foreign)
        raise SpecError(f"cannot resume in {out}: checkpoint {checkpoint.step_dir(root, step).name} was {why}; "
                        "resume with the job that wrote it, or start over with --fresh (nothing is deleted)")
    if found.usable:
        log(f"resuming from {checkpoint.step_dir(root, max(found.usable))} (each rank checks its files' checksums)")
    elif steps or records:
        raise SpecError(f"cannot resume in {out}: it has no complete checkpoint ({held}); start over with --fresh "
                        "(the old files move to the archive)")
    else:
        log(f"nothing to resume in {out}; starting from step 0")


def archive(out: Path, *, log=print) -> Path | None:
    """Move the run files of ``out`` into ``out/archive/<UTC time>/``; the archive folder,
    or None when there was nothing to move."""
    present = [name for name in RUN_FILES if (out / name).exists()]
    if not present:
        return None
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    dest = out / "archive" / stamp
    dest.mkdir(parents=True)
    for name in present:
        shutil.move(str(out / name), str(dest / name))
    log(f"--fresh: moved the earlier run's {', '.join(present)} to {dest}")
    return dest
