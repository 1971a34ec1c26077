"""Start one process per device on this machine and watch them.

Each rank runs ``python -m edgepool.runtime.rank DIR/run.json`` with the torchrun
environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``), its output in
``DIR/logs/rank-N.log``. A ``Placement`` may wrap a rank's command (a network namespace
and cgroups of the testbed) and add environment (``GLOO_SOCKET_IFNAME``).

The launcher follows ``DIR/metrics.jsonl`` and hands every step's record to its
``on_step`` callback (the CLI's progress bar). When a rank fails, it
stops the others at once and raises an error naming the rank, its device and the
rank's own one-line reason, with the log to read. A rank that names a silent peer
(``EDGEPOOL-SILENT`` in its log, from ``runtime.health``) has the silent device blamed,
not itself.

The launcher hosts the run's rendezvous store (``cluster.store``, TLS, a token made for
the run), so it outlives any rank, and reads the ranks' heartbeats in it: a rank silent
for ``train.detect_s`` is stopped and named (``Heartbeats``). What happens next is
``launch.recover``'s (go on without it) or the caller's.

The launcher owns its ranks: no rank outlives it.
- SIGTERM and SIGHUP (and SIGINT, Ctrl-C) make it stop every rank's process group
  before it exits (``Stopped``).
- Its own death, even by SIGKILL, ends every rank: each rank holds the read end of a
  pipe whose only write end is the launcher's (``EDGEPOOL_WATCHDOG_FD``); a rank whose
  read returns end-of-file leaves at once (``runtime.rank``), and it
  also asks the kernel for SIGKILL when its parent dies (``PR_SET_PDEATHSIG``; the
  testbed's wrappers ``exec``, so the launcher is the parent).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from edgepool.errors import EdgepoolError
from edgepool.machine import free_port
from edgepool.specs.metrics import StepRecord, Summary, read_summary


class Stopped(EdgepoolError):
    """The launcher was told to stop (SIGTERM, SIGHUP); every rank was stopped first."""


@contextmanager
def _stop_on_signals() -> Iterator[None]:
    """Turn SIGTERM and SIGHUP into ``Stopped`` while the ranks run (main thread only)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, _frame):
        raise Stopped(f"stopped by {signal.Signals(signum).name}; every rank was stopped")

    old = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


class RankFailed(EdgepoolError):
    def __init__(self, message: str, *, rank: int, device: str, returncode: int, reason: str, log: Path):
        super().__init__(message)
        self.rank, self.device, self.returncode, self.reason, self.log = rank, device, returncode, reason, log


@dataclass
class Placement:
    """Where a rank runs: a command prefix and extra environment per device, and how to
    explain its exit (the testbed knows about OOM kills under a memory cap)."""

    # Rank 0 hosts the rendezvous store, so the address is rank 0's device's own.
    master_addr: Callable[[str], str] = lambda rank0_device: "127.0.0.1"
    prefix: Callable[[str], list[str]] = lambda device: []
    env: Callable[[str], dict[str, str]] = lambda device: {}
    exit_cause: Callable[[str, int], str | None] = lambda device, returncode: None
    cores: Callable[[str], float | None] = lambda device: None  # CPU a device may use, if capped
    notes: list[str] = field(default_factory=list)
    emulated: bool = False
    # An address of this machine that every device reaches (the testbed's bridge): where a
    # coordinator here listens (``cluster.coordinator.launch_pool``).
    host_addr: str = "127.0.0.1"


@contextmanager
def pool_placement(pool, *, log=print, bring_up: bool = True) -> Iterator[Placement]:
    """Where a pool's ranks run: inside the testbed for ``host: emulated`` devices.

    Uses a testbed that is already up for this pool (``edgepool testbed up``), else
    brings one up for the run and down after it (unless ``bring_up`` is False: an agent
    only uses a testbed that is up). Without root or tc the testbed says so once and the
    ranks run as plain local processes.
    """
    if not any(d.host == "emulated" for d in pool.devices):
        yield Placement()
        return
    from edgepool.testbed import Testbed

    state = Testbed.attach(pool)
    owned = state is None
    if owned and not bring_up:
        yield Placement()
        return
    if owned:
        state = Testbed.up(pool, replace=True)
    if state.notice:
        log(state.notice)
    for w in state.warnings:
        log(f"testbed warning: {w}")
    before = {d: state.oom_kills(d) for d in state.devices if state.is_emulated(d)}

    def cores(device: str) -> float | None:
        caps = state.device_caps(device)
        return caps.cpu_cores if caps is not None else None

    placement = Placement(
        master_addr=lambda d: state.address(d) if state.emulated else "127.0.0.1",
        prefix=state.command_prefix, env=state.env,
        exit_cause=lambda d, rc: state.exit_cause(d, rc, before.get(d, 0)) if state.is_emulated(d) else None,
        cores=cores, notes=state.describe() if state.emulated else [state.notice], emulated=state.emulated,
        host_addr=state.master_addr,
    )
    try:
        yield placement
    finally:
        if owned and state.emulated:
            Testbed.down(tag=state.tag)


def _reason(log: Path) -> str:
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return "no log"
    for ln in reversed(lines):
        if ln.startswith("EDGEPOOL-ERROR"):
            return ln.split(": ", 1)[1] if ": " in ln else ln
    return lines[-1] if lines else "exited without output"


def launch_local(run, *, placement: Placement | None = None, on_step: Callable[[StepRecord], None] | None = None,
                 poll_s: float = 0.2, deadline_s: float | None = None, ranks: list[int] | None = None,
                 env: dict[str, str] | None = None, stop=None, regroup=None, summary: bool = True) -> Summary | None:
    """Run ``run`` (a RunSpec) on local processes; returns the summary.

    ``on_step`` gets every step's record as rank 0 writes it (a progress bar, say).
    ``deadline_s`` bounds the whole run: past it every rank is stopped and a
    ``RankFailed`` with reason "timeout" is raised. ``ranks``: start only these (an
    agent of ``cluster.agent`` starts its own device's rank; the others run elsewhere),
    with ``env`` added to their environment; without rank 0 there is no summary here
    (None), nor with ``summary=False`` (an agent's rank in a run that regroups: the
    coordinator writes it). ``stop`` (a ``threading.Event``, set from another thread) stops every rank
    and raises ``Stopped``, as SIGTERM does. ``regroup(failure, run, procs, logs, beats)``
    (``launch.recover``) goes on without a lost rank, keeping the others' processes, or
    raises, and its ``offer`` takes a device back in; it needs the store this launcher
    hosts."""
    placement = placement or Placement()
    out = Path(run.out_dir)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    run_json = out / "run.json"
    run.dump(run_json)
    ranks = list(range(run.plan.world_size)) if ranks is None else list(ranks)
    port = free_port()
    master = placement.master_addr(run.plan.devices[0])
    private, hosted = None, None
    if env is None or "EDGEPOOL_STORE" not in env:  # the run's own store, hosted here
        private, hosted, store = _host_run_store(placement.host_addr)
        env = {**(env or {}), **store}
    if hosted is None:
        regroup = None
    elif regroup is not None:
        regroup.store = hosted[1]
        env["EDGEPOOL_REGROUP"] = "1"
    procs: dict[int, subprocess.Popen] = {}
    logs: dict[int, Path] = {}
    # The watchdog pipe: ranks inherit only the read end; it reads end-of-file when
    # the launcher is gone, however it went.
    watch_r, watch_w = os.pipe()
    os.set_inheritable(watch_r, True)
    later: dict[int, subprocess.Popen] = {}  # devices taken in while the run goes on

    def start(rank: int, device: str, extra: dict[str, str], name: str, _run=None) -> tuple[subprocess.Popen, Path]:
        """Start ``device``'s process as ``rank`` of a later generation (``launch.recover``;
        the run under the plan that takes it in, ``_run``, is for ranks elsewhere)."""
        path = out / "logs" / name
        later[len(later)] = p = _start_rank(run, rank, run_json, placement, master, port, watch_r, path,
                                            {**env, **extra}, device=device)
        return p, path

    with _stop_on_signals():
        try:
            for rank in ranks:
                logs[rank] = out / "logs" / f"rank-{rank}.log"
                procs[rank] = _start_rank(run, rank, run_json, placement, master, port, watch_r, logs[rank], env)
            beats = Heartbeats(hosted[1], run.job.train.detect_s) if hosted is not None else None
            return _watch(run, procs, logs, placement, on_step, poll_s, deadline_s, stop, beats, regroup, start,
                          summary)
        finally:
            _stop_all(procs)
            _stop_all(later)
            os.close(watch_r)
            os.close(watch_w)
            if hosted is not None:
                hosted[0].close()
            remove_private(private)


def private_token() -> tuple[str, Path]:
    """A token made for one run, in a private folder (mode 0700) the caller removes afterwards."""
    import tempfile

    from edgepool.cluster.trust import new_token

    private = tempfile.mkdtemp(prefix="edgepool-run-")
    return private, new_token(Path(private) / "run.token")


def run_store_env(master: str, port: int) -> tuple[str, dict[str, str]]:
    """(the private folder to remove afterwards, the environment) for a run whose rank 0
    hosts the rendezvous store (``cluster.store``) with a token made for this run alone.
    torch's TCPStore would listen on every interface, unauthenticated."""
    import secrets

    private, token = private_token()
    return private, {"EDGEPOOL_STORE": f"[{master}]:{port}" if ":" in master else f"{master}:{port}",
                     "EDGEPOOL_RUN_ID": secrets.token_hex(16), "EDGEPOOL_TOKEN_FILE": str(token),
                     "EDGEPOOL_STORE_HOST": "0"}


def _host_run_store(bind: str):
    """The run's rendezvous store, served by the launcher on ``bind`` only, over TLS with a
    token made for this run (``cluster.store``): it outlives any rank, so a lost rank 0
    does not take the store, and the heartbeats in it, down with it. Returns (the private
    folder to remove, (listener, store), the ranks' environment)."""
    import secrets

    from edgepool.cluster.store import StoreServer, host_store
    from edgepool.cluster.trust import read_token

    private, token = private_token()
    run_id = secrets.token_hex(16)
    store = StoreServer()
    listener = host_store(bind, 0, read_token(token), run_id, store=store, log=lambda m: None)
    host, port = listener.address
    return private, (listener, store), {"EDGEPOOL_STORE": f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
                                        "EDGEPOOL_RUN_ID": run_id, "EDGEPOOL_TOKEN_FILE": str(token)}


class Heartbeats:
    """The ranks' heartbeat counters (``runtime.health``) as the launcher's store holds
    them: a rank whose counter has not moved for ``detect_s`` since it first beat is lost
    (frozen, SIGSTOPped, cut off), whatever its process looks like from here."""

    def __init__(self, store, detect_s: float):
        from edgepool.runtime.health import PREFIX

        self.store, self.detect_s, self.prefix = store, detect_s, PREFIX
        self._last: dict[int, tuple[bytes, float]] = {}

    def follow(self, prefix: str) -> None:
        """Read the counters under ``prefix`` from now on (a new generation's ranks)."""
        self.prefix, self._last = prefix, {}

    def silent(self, now: float | None = None) -> dict[int, float]:
        """Lost ranks -> seconds since their last beat."""
        PREFIX = self.prefix
        now = time.monotonic() if now is None else now
        out = {}
        data = self.store.items(f"{PREFIX}/")
        for key in data:
            tail = key[len(PREFIX) + 1:]
            if not tail.isdigit():
                continue
            rank, value = int(tail), data.get(key)
            seen = self._last.get(rank)
            if seen is None or seen[0] != value:
                self._last[rank] = (value, now)
            elif now - seen[1] > self.detect_s and f"{PREFIX}/left/{rank}" not in data:
                out[rank] = now - seen[1]
        return out


def remove_private(private: str | None) -> None:
    if private is not None:
        import shutil

        shutil.rmtree(private, ignore_errors=True)


def _start_rank(run, rank: int, run_json: Path, placement: Placement, master: str, port: int,
                watch_fd: int, log: Path, extra: dict[str, str], device: str | None = None) -> subprocess.Popen:
    device = device or run.plan.devices[rank]
    world = run.plan.world_size
    env = dict(os.environ)
    env.update(RANK=str(rank), LOCAL_RANK="0", WORLD_SIZE=str(world), MASTER_ADDR=master,
               MASTER_PORT=str(port), OMP_NUM_THREADS=str(run.threads), PYTHONUNBUFFERED="1",
               EDGEPOOL_WATCHDOG_FD=str(watch_fd), EDGEPOOL_LAUNCHER_PID=str(os.getpid()))
    env.update({k: v for k, v in placement.env(device).items() if k != "MASTER_ADDR"})
    env.update(extra)
    if placement.cores(device):  # the modelled energy meter's busy time is CPU time over the cap
        env["EDGEPOOL_CPU_CORES"] = str(placement.cores(device))
    cmd = placement.prefix(device) + [sys.executable, "-m", "edgepool.runtime.rank", str(run_json)]
    with open(log, "w") as fh:
        return subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
                                pass_fds=(watch_fd,))


def _stop_all(procs: dict) -> None:
    """Kill every rank's process group (a rank and anything it started) and reap it; a
    rank on another host (``cluster.coordinator.RemoteRank``) is stopped by its agent."""
    for p in procs.values():
        if p.poll() is None:
            if not isinstance(p, subprocess.Popen):
                p.stop()
                continue
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for p in procs.values():
        p.wait()


def _watch(run, procs: dict[int, subprocess.Popen], logs: dict[int, Path], placement: Placement,
           on_step: Callable[[StepRecord], None] | None, poll_s: float, deadline_s: float | None,
           stop=None, beats: Heartbeats | None = None, regroup=None, start=None,
           summary: bool = True) -> Summary | None:
    out = Path(run.out_dir)
    metrics = out / "metrics.jsonl"
    seen, ino = 0, None
    delivered: set[tuple[str, int]] = set()
    t_end = time.monotonic() + deadline_s if deadline_s else None

    def follow() -> None:
        """The new step records, each once: a file written anew (a regrouped rank 0, or the
        launcher, keeps the steps before the one redone) is read again from its start."""
        nonlocal seen, ino
        try:
            now = metrics.stat().st_ino
        except OSError:
            return
        if now != ino:
            ino, seen = now, 0
        for ln in metrics.read_text().splitlines()[seen:]:
            try:
                rec = StepRecord.model_validate_json(ln)
            except ValueError:  # a line still being written
                return
            seen += 1
            if (rec.plan_id, rec.step) not in delivered:
                delivered.add((rec.plan_id, rec.step))
                if on_step is not None:
                    on_step(rec)

    while True:
        follow()
        codes = {r: p.poll() for r, p in procs.items()}
        failure = _failure(run, procs, codes, logs, placement, beats)
        if failure is not None:
            if regroup is None:
                raise failure
            # the survivors go on in memory (``launch.recover``), or this raises
            run, procs, logs = regroup(failure, run, procs, logs, beats)
            continue
        if regroup is not None and start is not None:  # a device to take in at the next step boundary
            moved = regroup.offer(run, procs, logs, beats, start)
            if moved is not None:
                run, procs, logs = moved
                continue
        if stop is not None and stop.is_set():
            raise Stopped("told to stop; every rank was stopped")
        if all(c == 0 for c in codes.values()):
            follow()  # the last steps, written just before the ranks exited
            break
        if t_end is not None and time.monotonic() > t_end:
            raise RankFailed(f"the run did not finish within {deadline_s:g} s (step {seen} of {run.steps}); "
                             f"stopped all ranks", rank=-1, device="-", returncode=-1,
                             reason=f"timeout after {deadline_s:g} s at step {seen}", log=out / "logs")
        time.sleep(poll_s)
    if 0 not in procs or not summary:
        return None
    summary_path = out / "summary.json"
    if not summary_path.is_file():
        raise EdgepoolError(f"the run ended without {summary_path}; see {out / 'logs'}")
    return read_summary(summary_path)


def _failure(run, procs, codes: dict[int, int | None], logs: dict[int, Path], placement: Placement,
             beats: Heartbeats | None) -> RankFailed | None:
    """The rank lost first, as the error that names it: a silent one (stopped here), or
    the one that died first; None while every rank is well."""
    out = Path(run.out_dir)
    failed = [r for r, c in codes.items() if c not in (None, 0)]
    quiet = {r: s for r, s in (beats.silent() if beats is not None else {}).items() if codes.get(r) is None}
    if quiet and not failed:  # alive but silent: frozen or cut off; stopped here, named
        first = min(quiet, key=lambda r: (-quiet[r], r))
        device = run.plan.devices[first]
        if first in procs:
            _stop_all({first: procs[first]})
        reason = f"no heartbeat for {quiet[first]:.1f} s (frozen, stopped or cut off); stopped"
        return RankFailed(f"device {device} (rank {first}) stopped answering: {reason}; see {logs[first]}",
                          rank=first, device=device, returncode=-9, reason=reason, log=logs[first])
    if not failed:
        return None
    causes = {r: placement.exit_cause(run.plan.devices[r], codes[r]) for r in failed}
    # The rank that died first: one the kernel killed (OOM, signal) over
    # peers that only noticed it; then the oldest log.
    first = min(failed, key=lambda r: (causes[r] is None and codes[r] > 0, _mtime(logs[r])))
    device = run.plan.devices[first]
    reason = causes[first] or _reason(logs[first])
    message = f"rank {first} ({device}) failed (exit {codes[first]}): {reason}; see {logs[first]}"
    named = Counter(r for f in failed for r in _silent(logs[f]))
    if named:  # a peer the noticing ranks found silent (``runtime.health``) is the culprit
        noticed, log = f"rank {first} ({device})", logs[first]
        first = min(named, key=lambda r: (-named[r], r))  # the rank most of them name
        device = run.plan.devices[first]
        message = f"device {device} (rank {first}) stopped answering; {noticed} noticed: {reason}; see {log}"
    code = codes.get(first) if codes.get(first) is not None else -1  # a silent rank may be there, or elsewhere
    return RankFailed(message, rank=first, device=device, returncode=code, reason=reason,
                      log=logs.get(first, out / "logs"))


def _silent(log: Path) -> list[int]:
    """The ranks a rank's log names as silent (its ``EDGEPOOL-SILENT`` line)."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return []
    for ln in reversed(lines):
        if ln.startswith("EDGEPOOL-SILENT "):
            return [int(x) for x in ln.split(" ", 1)[1].split(",") if x.strip().isdigit()]
    return []


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return float("inf")
