"""Who is alive: heartbeats in the rendezvous store, and collectives that blame the right device.

After torchft's design (its Lighthouse keeps a heartbeat per replica and names the
replicas that stopped beating), each rank's ``Heartbeat`` thread bumps a counter of its
own in the run's rendezvous store (the c10d store every rank already holds: edgepool's
TLS store, hosted by the launcher or the coordinator, or a FileStore in tests) twice a second. Counters, not clock times,
so hosts' clocks need not agree. When a blocking call times out or fails, ``silent()``
reads every counter twice, a few beats apart: the ranks whose counters did not move are
the silent ones (a frozen, SIGSTOPped or dead process). If the store itself does not
answer, its host is the silent one: rank 0 of a local run; under ``edgepool serve`` the
coordinator hosts it, and no rank is blamed for it.

``Comm`` is the world's guarded calls outside the engine's schedule: object collectives
and barriers. Objects travel as JSON in uint8 tensors (``gather_json``), never pickled:
torch's ``all_gather_object`` would unpickle whatever a peer sends. Every failure is a
``PeerError`` that names the silent device, not the one that noticed; the wire and the
engine ask the same ``Heartbeat`` when their own calls time out.

Going on without a lost device is ``launch.recover``'s and ``runtime.regroup``'s.
"""

from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager
from datetime import timedelta
from typing import Iterator

from edgepool.errors import PeerError

PREFIX = "edgepool/heartbeat"  # the store keys ``PREFIX/<rank>`` (counters) and ``PREFIX/left/<rank>``
BEAT_S = 0.5
# A rank is silent when its counter does not move over this many beats.
SILENT_BEATS = 2.5


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


class Heartbeat:
    """This rank's beat, and a reading of everybody's."""

    def __init__(self, store, rank: int, world_size: int, *, beat_s: float = BEAT_S, store_host: int | None = 0,
                 prefix: str = PREFIX, regrouping: threading.Event | None = None):
        import torch.distributed as dist

        self.store = dist.PrefixStore(prefix, store)
        # set when the launcher regroups the run (``runtime.regroup``): nobody is to blame then
        self.regrouping = regrouping
        self.rank, self.world_size, self.beat_s = rank, world_size, beat_s
        self.store_host = store_host  # the rank that hosts the store; None: no rank does (``edgepool serve``)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "Heartbeat":
        self.store.add(str(self.rank), 1)
        self._thread = threading.Thread(target=self._run, name="edgepool-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.beat_s):
            try:
                self.store.add(str(self.rank), 1)
            except Exception:  # noqa: BLE001 - the store's host is gone; silent() will say so
                return

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * self.beat_s)
            self._thread = None

    def leave(self) -> None:
        """Stop beating and say so: a rank that ends on an error it noticed is gone,
        not silent, and must not be blamed by the peers that notice after it."""
        self.stop()
        try:
            self.store.set(f"left/{self.rank}", "1")
        except Exception:  # noqa: BLE001 - the store's host is gone too
            pass

    def _read(self) -> list[int]:
        return [int(self.store.add(str(r), 0)) for r in range(self.world_size)]

    def silent(self) -> list[int]:
        """The ranks other than this one whose heartbeat stopped without their leaving
        (takes a few beats; this rank keeps beating meanwhile); none while the run regroups."""
        if self.regrouping is not None and self.regrouping.is_set():
            return []
        self.store.set_timeout(timedelta(seconds=max(2.0, 3 * self.beat_s)))
        try:
            before = self._read()
            if self.regrouping is not None:
                if self.regrouping.wait(SILENT_BEATS * self.beat_s):
                    return []
            else:
                time.sleep(SILENT_BEATS * self.beat_s)
            after = self._read()
            return [r for r in range(self.world_size)
                    if r != self.rank and after[r] == before[r] and not self.store.check([f"left/{r}"])]
        except Exception:  # noqa: BLE001 - the store does not answer: its host is silent (if a rank hosts it)
            host = self.store_host
            return [host] if host is not None and host != self.rank else []


def blame(heartbeat: Heartbeat | None, names: list[str], rank: int, what: str, exc: BaseException | None,
          *, suspect: int | None = None, timeout_s: float | None = None) -> PeerError:
    """The error for a blocking call of ``rank`` that failed: it names the silent ranks
    (from the heartbeats), else the rank it waited for (``suspect``), else the group."""
    silent = heartbeat.silent() if heartbeat is not None else []
    me = f"rank {rank} ({names[rank]})"
    cause = f": {first_line(exc)}" if exc is not None else ""
    if silent:
        who = ", ".join(f"rank {r} ({names[r]})" for r in silent)
        verb = "has" if len(silent) == 1 else "have"
        return PeerError(f"{who} {verb} stopped answering (no heartbeat); {me} noticed while {what}{cause}",
                         silent=tuple(silent))
    within = f" within {timeout_s:g} s" if timeout_s is not None else ""
    if suspect is not None:
        return PeerError(f"rank {suspect} ({names[suspect]}) failed or did not answer{within} while {me} was "
                         f"{what}{cause}", silent=(suspect,))
    return PeerError(f"a peer of {me} failed or did not answer{within} while {what}{cause}")


class Comm:
    """Guarded world-wide calls: JSON object collectives and barriers."""

    def __init__(self, rank: int, names: list[str], heartbeat: Heartbeat | None, timeout_s: float):
        self.rank, self.names, self.heartbeat, self.timeout_s = rank, names, heartbeat, timeout_s

    @contextmanager
    def guard(self, what: str) -> Iterator[None]:
        try:
            yield
        except PeerError:
            raise
        except RuntimeError as exc:  # gloo: a timeout, a closed connection
            raise self.blame(what, exc) from None

    def blame(self, what: str, exc: BaseException | None = None, *, suspect: int | None = None) -> PeerError:
        return blame(self.heartbeat, self.names, self.rank, what, exc, suspect=suspect, timeout_s=self.timeout_s)

    def gather_bytes(self, data: bytes, what: str) -> list[bytes]:
        """Every rank's ``data``, in rank order, on every rank (two all-gathers: sizes, then
        the padded bytes)."""
        import torch
        import torch.distributed as dist

        n = dist.get_world_size()
        with self.guard(what):
            sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(n)]
            dist.all_gather(sizes, torch.tensor([len(data)], dtype=torch.int64))
            longest = max(int(s) for s in sizes)
            buf = torch.zeros(longest, dtype=torch.uint8)
            if data:
                buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            parts = [torch.empty(longest, dtype=torch.uint8) for _ in range(n)]
            dist.all_gather(parts, buf)
        return [p[: int(s)].numpy().tobytes() for p, s in zip(parts, sizes)]

    def gather_json(self, obj, what: str) -> list:
        """Every rank's ``obj`` (JSON-able), in rank order, on every rank."""
        return [json.loads(b) for b in self.gather_bytes(json.dumps(obj).encode(), what)]

    def barrier(self, what: str) -> None:
        import torch.distributed as dist

        with self.guard(what):
            dist.barrier()
