"""Entry of one rank: ``python -m edgepool.runtime.rank RUN_JSON`` (the launcher, or torchrun).

Before anything heavy is imported, a rank started by edgepool's launcher makes sure it
cannot outlive it (``launch.local``):

- it asks the kernel to SIGKILL it when its parent dies (``PR_SET_PDEATHSIG``, Linux);
  the launcher is the parent, since the testbed's wrappers ``exec``;
- a daemon thread blocks on the read end of the launcher's watchdog pipe
  (``EDGEPOOL_WATCHDOG_FD``); end-of-file means the launcher is gone however it went
  (even SIGKILL, even between fork and the prctl call), and the rank leaves at once.

Under torchrun neither is set up: torchrun's agent owns its workers.
"""

from __future__ import annotations

import os
import signal
import sys
import threading


def _die_with_parent(launcher_pid: int) -> None:
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the watchdog pipe still holds
        return
    if os.getppid() != launcher_pid:  # the parent died before the prctl
        os._exit(1)


def _watch(fd: int) -> None:
    try:
        while os.read(fd, 1):
            pass
    except OSError:
        pass
    print("EDGEPOOL-ERROR the launcher is gone; this rank stops", file=sys.stderr, flush=True)
    os._exit(1)


def watch_launcher(env=os.environ) -> bool:
    """Tie this process's life to the launcher's; False when no launcher started it."""
    fd = env.get("EDGEPOOL_WATCHDOG_FD")
    if not fd:
        return False
    if env.get("EDGEPOOL_LAUNCHER_PID"):
        _die_with_parent(int(env["EDGEPOOL_LAUNCHER_PID"]))
    threading.Thread(target=_watch, args=(int(fd),), name="edgepool-watchdog", daemon=True).start()
    return True


def main() -> int:
    watch_launcher()
    from edgepool.runtime.train import main as train_main

    return train_main()


if __name__ == "__main__":
    raise SystemExit(main())
