"""``edgepool serve``: the coordinator of a pool across hosts.

It listens on one address (the pool file's ``coordinator``, or ``--bind``; never on
every interface unless the user asks for it) and speaks only the pool's mutual TLS
(``cluster.trust``). Two kinds of connection arrive:

- ``join``: an agent (``cluster.agent``) names its device, edgepool version and facts.
  It is admitted when the device is in the pool (and in the plan file, if one was
  given), has not joined already and runs the same version; otherwise it is refused
  with one line on both sides and told nothing else. The other devices go on.
- ``store``: a rank's connection to the run's rendezvous store (``cluster.store``),
  accepted only with the run's id, which only admitted agents receive.

Once every device has joined (or ``--min-devices`` of them by ``--join-timeout``), the
coordinator plans for the devices that joined (``launch.prepare.prepare_run``, the
planner as ``train`` uses it), sends each device of the plan its rank and the run
description, and follows the run: rank 0's agent forwards every step record (the
coordinator writes ``metrics.jsonl`` and the progress bar from them), and every agent
reports its rank's exit. The first failure stops everyone, named. The data never
travels: an agent sends facts and step records, never samples.

Membership is a table of devices that joined and left (``Member``): a device that
disconnects while the pool waits may join again.

With ``train.recover`` (the default) a lost device does not end the run: the
coordinator follows it as ``launch.local`` follows local processes, with the same
watcher and the same handler (``launch.recover.InMemory``). A rank on another host is a
``RemoteRank`` (its exit is its agent's report, or -9 once the agent is lost; stopping
it is asking its agent), the heartbeats are read from the coordinator's own store, and
every agent forwards the step records its rank writes, of which the coordinator keeps
those of the plan running, in order (the rank 0 of a new plan may be another device).
The survivors regroup in memory and the lost ranks' state comes from the backups their
peers keep (``train.replicate_every``) or a dp twin; a device's checkpoint files are on
its own host, so when no survivor holds the state the run ends, saying so. With
``train.rejoin_s`` an agent may join the running run (a device lost, or one not in it):
it is admitted and waits; the handler's offer takes it in at a step boundary when the
planner predicts a faster step with it, and its agent then starts its rank, whose
state streams from its peers.
"""

from __future__ import annotations

import json
import queue
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import edgepool
from edgepool.cluster.channel import PING_S, WAIT_S, Channel, ChannelError, Listener
from edgepool.cluster.store import StoreServer, store_handler
from edgepool.cluster.trust import tls_context
from edgepool.errors import EdgepoolError, SpecError

DEFAULT_PORT = 29400


@dataclass
class Member:
    device: str
    channel: Channel
    peer: str
    facts: dict
    rank: int | None = None
    gone: bool = False  # its connection ended


def bind_address(pool, bind: str | None) -> str:
    """Where ``serve`` listens: ``--bind``, else the pool's ``coordinator``, else loopback
    when every device is on this machine."""
    if bind is not None:
        return bind
    if pool.coordinator is not None:
        return pool.coordinator
    if all(d.host in ("local", "emulated", "127.0.0.1", "localhost") for d in pool.devices):
        return "127.0.0.1"
    raise SpecError("the pool file names no coordinator address: add `coordinator: ADDR` (this host's address on "
                    "the pool's network) or pass --bind ADDR")


class Coordinator:
    def __init__(self, pool, token: bytes, *, bind: str, port: int, allowed: list[str] | None = None, log=print):
        self.pool, self.log = pool, log
        self.allowed = list(allowed or pool.device_names)
        self.members: dict[str, Member] = {}
        self.events: queue.Queue = queue.Queue()
        self.store = StoreServer()
        self._lock = threading.Lock()
        self._run_id: str | None = None
        self.rejoining = False  # a device may join the running run, to be taken in (``train.rejoin_s``)
        self._listener = Listener(tls_context(token, server=True), bind, port, {
            "join": self._join, "store": store_handler(self.store, self._current_run, self._refuse)}, log=log)
        self.address = self._listener.address
        self._closed = threading.Event()
        threading.Thread(target=self._ping, name="edgepool-ping", daemon=True).start()

    def _current_run(self) -> str | None:
        with self._lock:
            return self._run_id

    def _ping(self) -> None:
        """Every agent hears from the coordinator every ``PING_S``, from admission to the end
        (an agent silent for ``WAIT_S`` counts as gone, and so does the coordinator for it)."""
        while not self._closed.wait(PING_S):
            self._broadcast({"ping": True})

    def close(self) -> None:
        self._closed.set()
        self._listener.close()

    def _refuse(self, ch: Channel, who: str, reason: str) -> None:
        self._listener.refuse(ch, who, reason)

    def _join(self, ch: Channel, peer: str, hello: dict) -> None:
        name, version, facts = hello.get("device"), hello.get("version"), hello.get("facts")
        who = f"device {name!r} from {peer}" if isinstance(name, str) else f"an agent from {peer}"
        # The name first: an agent with a name the pool lacks learns nothing else (not our version).
        if not isinstance(name, str) or name not in self.allowed:
            return self._refuse(ch, who, f"device {name!r} is not in pool {self.pool.name!r}"
                                         + ("'s plan" if len(self.allowed) < len(self.pool.devices) else ""))
        if version != edgepool.__version__:
            return self._refuse(ch, who, f"it runs edgepool {version}, the coordinator {edgepool.__version__}; "
                                         "install the same version on every device")
        with self._lock:  # admitted before any broadcast can reach it
            if self._run_id is not None:  # a device lost (or never in the run) may come back to be taken in
                if not self.rejoining or (name in self.members and not self.members[name].gone):
                    return self._refuse(ch, who, "the run has started; join the next one")
            elif name in self.members:
                self.log(f"{name} has already joined from {self.members[name].peer}")
                return self._refuse(ch, who, f"device {name!r} has already joined")
            member = Member(name, ch, peer, facts if isinstance(facts, dict) else {})
            ch.send({"admitted": name, "pool": self.pool.name})
            self.members[name] = member
        self.log(f"{name} joined from {peer}{_describe(member.facts)} "
                 f"({len(self.members)} of {len(self.allowed)})")
        self._check_kind(member)
        self.events.put(("joined", name, {}, member))
        self._read(member)

    def _check_kind(self, m: Member) -> None:
        said, kind = m.facts.get("kind"), self.pool.device(m.device).kind
        if said and said != kind:
            self.log(f"warning: {m.device} says it is a {said}; the pool file says {kind} (the plan uses the pool file)")

    def _read(self, m: Member) -> None:
        """Forward one agent's messages to the main thread until its connection ends."""
        while True:
            try:
                msg = m.channel.recv(timeout=WAIT_S)  # agents ping every PING_S
            except ChannelError as exc:
                m.gone = True
                with self._lock:
                    if self.members.get(m.device) is m:
                        if self._run_id is None:  # while the pool waits, a device may leave and join again
                            del self.members[m.device]
                self.events.put(("lost", m.device, {"reason": str(exc)}, m))
                return
            if isinstance(msg.get("facts"), dict):  # the speed probe, sent once admitted
                m.facts.update(msg["facts"])
                self.log(f"{m.device}{_describe(msg['facts'])}")
            for kind in ("step", "exit"):
                if kind in msg:
                    self.events.put((kind, m.device, msg, m))

    # -- the run -----------------------------------------------------------------

    def wait_for(self, *, min_devices: int | None, join_timeout_s: float) -> list[str]:
        """The devices that joined, in pool order: all of them, or ``min_devices`` once the timeout passed."""
        t0, want = time.monotonic(), set(self.allowed)
        while True:
            try:
                kind, name, _, _ = self.events.get(timeout=PING_S)
                if kind == "lost":
                    self.log(f"{name} left before the run started")
            except queue.Empty:
                pass
            with self._lock:
                joined = set(self.members)
            if joined >= want:
                break
            if time.monotonic() - t0 >= join_timeout_s:
                missing = ", ".join(sorted(want - joined))
                if min_devices is not None and len(joined) >= min_devices:
                    self.log(f"{len(joined)} of {len(want)} devices joined in {join_timeout_s:g} s; going on "
                             f"without {missing}")
                    break
                need = f"at least {min_devices} (--min-devices)" if min_devices else "all of them (or --min-devices K)"
                raise EdgepoolError(f"{len(joined)} of {len(want)} devices joined within {join_timeout_s:g} s "
                                    f"(--join-timeout), missing {missing}; the run needs {need}")
        return [n for n in self.allowed if n in joined]

    def _broadcast(self, msg: dict) -> None:
        with self._lock:
            members = list(self.members.values())
        for m in members:
            try:
                m.channel.send(msg)
            except ChannelError:
                pass

    def stop(self, reason: str) -> None:
        """Tell every admitted agent the run will not happen, or stops now."""
        self._broadcast({"stop": reason})

    def __enter__(self) -> "Coordinator":
        return self

    def __exit__(self, kind, exc, tb) -> bool:
        """On any error every agent is told to stop, with its first line; the listener always closes."""
        if exc is not None:
            self.stop(str(exc).splitlines()[0] if str(exc) else kind.__name__)
        self.close()
        return False

    def tell(self, device: str, msg: dict) -> None:
        """Send ``msg`` to one device's agent, if it is still there."""
        m = self.members.get(device)
        if m is not None:
            try:
                m.channel.send(msg)
            except ChannelError:
                pass

    def launch(self, spec, regroup: bool = False) -> None:
        """Hand each device of the plan its rank and the run (``regroup``: its rank goes
        on without a lost peer, ``runtime.regroup``); other admitted devices are let go."""
        with self._lock:
            gone = [n for n in spec.plan.devices if n not in self.members]
            if gone:
                raise EdgepoolError(f"device(s) {', '.join(gone)} left while the run was being planned; start again")
            self._run_id = secrets.token_hex(16)
            members = dict(self.members)
        for rank, name in enumerate(spec.plan.devices):
            self.send_run(members[name], spec, rank, regroup)
        for name, m in members.items():
            if m.rank is None:
                m.channel.send({"unused": "the plan for the devices that joined does not use this device"})

    def send_run(self, m: Member, spec, rank: int, regroup: bool, env: dict[str, str] | None = None) -> None:
        """Hand one agent its rank of ``spec`` (``env``: a device taken into the running run)."""
        m.rank = rank
        host = m.channel.sock.getsockname()[0]  # the address this agent reached
        store = f"[{host}]:{self.address[1]}" if ":" in host else f"{host}:{self.address[1]}"
        m.channel.send({"run": json.loads(spec.model_dump_json()), "rank": rank, "run_id": self._run_id,
                        "store": store, "regroup": regroup, "env": env or {}})

    def follow(self, spec, on_step: Callable | None = None, deadline_s: float | None = None) -> dict:
        """Until every rank has exited: rank 0's step records to ``on_step``; returns
        rank 0's agent's final message. The first failure (an agent's report, a lost
        agent, or ``deadline_s`` passed) stops every agent and raises ``RankFailed``
        naming the device, with the agent's own reason."""
        from edgepool.launch.local import RankFailed
        from edgepool.specs.metrics import StepRecord

        plan, out = spec.plan, Path(spec.out_dir)
        ranks = {n: r for r, n in enumerate(plan.devices)}
        exits: dict[str, dict] = {}
        t_end = time.monotonic() + deadline_s if deadline_s else None
        seen = 0

        def fail(name: str, message: str, reason: str, code: int = -1):
            self.stop(f"device {name} failed")
            return RankFailed(message, rank=ranks.get(name, -1), device=name, returncode=code, reason=reason,
                              log=out / "logs")

        while len(exits) < len(ranks):
            try:
                kind, name, msg, member = self.events.get(timeout=0.5)
            except queue.Empty:
                if t_end is not None and time.monotonic() > t_end:
                    raise fail("-", f"the run did not finish within {deadline_s:g} s (step {seen} of {spec.steps}); "
                               "stopped every device", f"timeout after {deadline_s:g} s at step {seen}")
                continue
            if name not in ranks or member is not self.members.get(name):  # not in the run, or a stale event
                continue
            if kind == "step" and ranks[name] == 0:
                rec = StepRecord.model_validate(msg["step"])
                seen += 1
                if on_step is not None:
                    on_step(rec)
            elif kind == "exit":
                exits[name] = msg
                if msg.get("exit") != 0:
                    reason = str(msg.get("reason", "failed"))
                    said = str(msg.get("message", reason))
                    raise fail(name, f"device {name} (rank {ranks[name]}): {said}", reason, int(msg.get("exit", 1)))
            elif kind == "lost" and name not in exits:
                raise fail(name, f"device {name} (rank {ranks[name]}) lost its connection to the coordinator "
                           f"({msg['reason']}); every other device was stopped", f"lost its connection ({msg['reason']})")
        self._broadcast({"done": True})
        return exits[plan.devices[0]]


class RemoteRank:
    """A rank on an agent's host, as ``launch.local`` watches a process: ``poll()`` is its
    exit code as its agent reported it (-9 once the agent is lost), ``stop()`` asks the
    agent to stop it. There is nothing to reap here: ``wait()`` does not block (a frozen
    or cut-off host may never answer; the run goes on without it either way)."""

    def __init__(self, ranks: "RemoteRanks", device: str):
        self.ranks, self.device, self.code = ranks, device, None

    def poll(self) -> int | None:
        self.ranks.pump()
        return self.code

    def stop(self) -> None:
        self.ranks.coord.tell(self.device, {"stop": f"device {self.device} was lost; the run goes on without it"})

    def wait(self) -> int | None:
        return self.poll()


class RemoteRanks:
    """The run's ranks on the agents, fed by the coordinator's events: exits, lost agents
    (their ``OUT/logs/<device>.log`` says why) and step records. Of the records, those of
    the plan running go to ``OUT/metrics.jsonl``, in order: each agent forwards what its
    rank writes, and a rank that was rank 0 of an earlier plan wrote steps that are
    redone. Only the main thread reads it (``pump`` from ``poll``)."""

    def __init__(self, coord: Coordinator, spec):
        self.coord, self.out = coord, Path(spec.out_dir)
        self.plan_id, self.next_step, self.from_step = spec.plan.plan_id, 0, 0
        self.ranks = {n: RemoteRank(self, n) for n in spec.plan.devices}
        self.logs = {r: self.log_of(n) for r, n in enumerate(spec.plan.devices)}
        self.trace: dict | None = None
        self.back: set[str] = set()  # devices whose agent joined while the run goes on, not yet taken in
        self.on_back: Callable[[str], None] = lambda device: None

    def log_of(self, device: str) -> Path:
        """Where a device's failure is written (``launch.local`` reads the reason there)."""
        return self.out / "logs" / f"{device}.log"

    def start(self, rank: int, device: str, extra: dict[str, str], name: str, run) -> tuple[RemoteRank, Path]:
        """``launch.local``'s ``start`` for a device whose agent is back: its rank of ``run``."""
        self.coord.send_run(self.coord.members[device], run, rank, True, extra)
        self.back.discard(device)
        self.ranks[device] = rank_ = RemoteRank(self, device)
        return rank_, self.log_of(device)

    def follow(self, run, start: int) -> None:
        """From now on keep the records of ``run``'s plan, which goes on from step ``start``
        (the handler kept the records before it), and the earlier plan's of the steps
        before ``start`` still on their way; a step whose record was lost with its rank 0
        stays a gap."""
        from edgepool.specs.metrics import read_metrics

        path = self.out / "metrics.jsonl"
        self.plan_id, self.from_step = run.plan.plan_id, start
        self.next_step = min(len(read_metrics(path)) if path.is_file() else 0, start)

    def pump(self) -> None:
        from edgepool.specs.metrics import StepRecord, append_record

        while True:
            try:
                kind, name, msg, member = self.coord.events.get_nowait()
            except queue.Empty:
                return
            if member is not self.coord.members.get(name):  # a stale event
                continue
            if kind == "joined":
                self.back.add(name)
                self.on_back(name)
            rank = self.ranks.get(name)
            if rank is None:  # not in the run
                continue
            if kind == "step":
                rec = StepRecord.model_validate(msg["step"])
                if rec.step >= self.next_step and (rec.plan_id == self.plan_id or rec.step < self.from_step):
                    append_record(self.out / "metrics.jsonl", rec)
                    self.next_step = rec.step + 1
            elif kind in ("exit", "lost") and rank.code is None:
                rank.code = int(msg.get("exit", 1)) if kind == "exit" else -9
                if msg.get("trace"):
                    self.trace = msg["trace"]
                if rank.code:
                    why = msg.get("reason", "failed") if kind == "exit" else f"lost its connection ({msg['reason']})"
                    self.log_of(name).write_text(f"{msg.get('message', why)}\nEDGEPOOL-ERROR {name}: {why}\n")


def _follow_regrouping(coord: Coordinator, spec, on_step: Callable, on_event: Callable | None,
                       deadline_s: float | None, log):
    """Follow ``spec`` on the agents, going on without each device it loses (see the
    module docstring); the summary from ``OUT/metrics.jsonl`` with the events."""
    from edgepool.launch.local import Heartbeats, Placement, _watch
    from edgepool.launch.recover import InMemory, _Events
    from edgepool.runtime.train import RunSpec
    from edgepool.specs.metrics import Trace, read_metrics, summarize, write_json

    out = Path(spec.out_dir)
    remote = RemoteRanks(coord, spec)
    events = _Events(out, log, on_step, on_event)
    handler = InMemory(events, wait_s=spec.job.train.detect_s + spec.job.train.timeout_s, log=log)
    handler.store = coord.store
    handler.available = lambda device: device in remote.back
    remote.on_back = lambda device: handler.away.setdefault(device, float("-inf"))  # one new to the run
    coord.rejoining = spec.job.train.rejoin_s > 0

    class Following:
        """The handler, after which the coordinator keeps the new plan's records."""

        def __call__(self, *args):
            new = handler(*args)
            remote.follow(new[0], events.events[-1]["from_step"])
            return new

        def offer(self, *args):
            new = handler.offer(*args)
            if new is not None:
                remote.follow(new[0], events.events[-1]["from_step"])
            return new

    procs = {r: remote.ranks[n] for r, n in enumerate(spec.plan.devices)}
    try:
        _watch(spec, procs, dict(remote.logs), Placement(), events.step, 0.1, deadline_s,
               beats=Heartbeats(coord.store, spec.job.train.detect_s), regroup=Following(),
               start=remote.start if coord.rejoining else None, summary=False)
    finally:
        handler.close()
    final = RunSpec.read(out / "run.json")
    plan = final.plan
    summary = summarize(read_metrics(out / "metrics.jsonl"), plan_id=plan.plan_id, parallelism=plan.parallelism,
                        schedule=plan.schedule, num_microbatches=plan.num_microbatches)
    if events.events:
        summary = summary.model_copy(update={"events": events.events})
    write_json(out / "summary.json", summary)
    if remote.trace:
        write_json(out / "trace.json", Trace.model_validate(remote.trace))
    coord._broadcast({"done": True})
    return summary


def _describe(facts: dict) -> str:
    parts = [f"{facts[k]} {label}" for k, label in (("cores", "cores"), ("memory_gb", "GB")) if k in facts]
    if facts.get("gflops"):
        parts.append(f"{facts['gflops']:.1f} GFLOP/s")
    return f" ({', '.join(parts)})" if parts else ""


def run_spec(coord: Coordinator, spec, *, on_step: Callable | None = None, progress: Callable | None = None,
             deadline_s: float | None = None, recover: bool = False, log=print):
    """Launch ``spec`` on the admitted agents and follow it: ``OUT/metrics.jsonl`` from
    rank 0's step records, then ``summary.json`` and ``trace.json``; returns the summary.
    ``recover``: go on without a lost device (the module docstring)."""
    from edgepool.specs.metrics import Summary, Trace, append_record, write_json

    out_dir = Path(spec.out_dir)
    (out_dir / "logs").mkdir(parents=True, exist_ok=True)
    spec.dump(out_dir / "run.json")
    (out_dir / "devices.json").write_text(json.dumps(
        {n: {"peer": m.peer, **m.facts} for n, m in coord.members.items()}, indent=2))
    metrics = out_dir / "metrics.jsonl"
    metrics.write_text("")
    with (progress(spec) if progress else _Quiet()) as bar:
        def step(rec) -> None:
            if not recover:
                append_record(metrics, rec)
            bar.update(rec)
            if on_step is not None:
                on_step(rec)

        coord.launch(spec, regroup=recover)
        if recover:
            return _follow_regrouping(coord, spec, step, bar.event, deadline_s, log)
        final = coord.follow(spec, on_step=step, deadline_s=deadline_s)
    if not final.get("summary"):
        raise EdgepoolError("rank 0's agent ended without a summary")
    summary = Summary.model_validate(final["summary"])
    write_json(out_dir / "summary.json", summary)
    if final.get("trace"):
        write_json(out_dir / "trace.json", Trace.model_validate(final["trace"]))
    return summary


def serve(pool_path, job_path, *, out: str, token: bytes, bind: str | None = None, port: int = DEFAULT_PORT,
          min_devices: int | None = None, join_timeout_s: float = 300.0, plan_path: str | None = None,
          parallelism: str | None = None, steps: int | None = None, fresh: bool = False, log=print,
          progress: Callable | None = None):
    """The whole coordinator: wait for the devices, plan, run, write the results; returns the summary.

    ``progress(spec) -> context manager with .update(record)`` shows the run (the CLI's bar)."""
    from edgepool.launch import folder
    from edgepool.launch.prepare import prepare_run
    from edgepool.specs.job import load_job
    from edgepool.specs.plan import load_plan
    from edgepool.specs.pool import load_pool

    pool, job = load_pool(pool_path), load_job(job_path)
    allowed = None
    if plan_path or job.parallelism.plan:
        allowed = [n for n in pool.device_names if n in load_plan(plan_path or job.parallelism.plan).devices]
    if min_devices is not None and not 0 < min_devices <= len(allowed or pool.devices):
        raise SpecError(f"--min-devices must be 1..{len(allowed or pool.devices)}, got {min_devices}")
    address = bind_address(pool, bind)
    with folder.hold(out, "edgepool serve", log=log) as out_dir:
        with Coordinator(pool, token, bind=address, port=port, allowed=allowed, log=log) as coord:
            a, p = coord.address
            log(f"listening on {a}:{p} for {len(coord.allowed)} device(s) of pool {pool.name!r}: "
                f"{', '.join(coord.allowed)}")
            joined = coord.wait_for(min_devices=min_devices, join_timeout_s=join_timeout_s)
            sub = pool.model_copy(update={"devices": tuple(d for d in pool.devices if d.name in joined)})
            spec = prepare_run(sub, job, out_dir=out_dir, plan_path=plan_path, parallelism=parallelism,
                               steps=steps, any_host=True, log=log)
            folder.check_start(spec, fresh=fresh, log=log)
            plan = spec.plan
            log(f"plan {plan.plan_id}: {plan.parallelism}, {len(plan.stages)} stage(s), {plan.num_microbatches} "
                f"micro-batch(es), {plan.schedule}, devices {', '.join(plan.devices)}")
            return run_spec(coord, spec, progress=progress, recover=spec.job.train.recover, log=log)


def launch_pool(spec, *, placement=None, on_step: Callable | None = None, deadline_s: float | None = None,
                join_timeout_s: float = 120.0):
    """Run ``spec`` (every device on this machine) through the real path: a coordinator
    here and one ``edgepool join`` agent per device, with a token made for the run. On
    the testbed each agent starts its rank inside its device's namespace and caps
    (``cluster.agent``); the coordinator listens on the testbed's bridge address, which
    every namespace reaches. What ``launch_local`` returns and raises, this does too."""
    import subprocess
    import sys

    from edgepool.cluster.trust import read_token
    from edgepool.launch.local import Placement, private_token, remove_private

    placement = placement or Placement()
    out_dir = Path(spec.out_dir)
    (out_dir / "logs").mkdir(parents=True, exist_ok=True)
    private, token_file = private_token()
    agents: list[subprocess.Popen] = []
    try:
        with Coordinator(spec.pool, read_token(token_file), bind=placement.host_addr, port=0,
                         allowed=list(spec.plan.devices), log=lambda m: None) as coord:
            addr, port = coord.address
            for name in spec.plan.devices:
                with open(out_dir / "logs" / f"agent-{name}.log", "w") as fh:
                    agents.append(subprocess.Popen(
                        [sys.executable, "-m", "edgepool.cli.main", "join", "--coordinator", f"{addr}:{port}",
                         "--token", str(token_file), "--device", name, "--work", str(out_dir / "devices" / name)],
                        stdout=fh, stderr=subprocess.STDOUT, start_new_session=True))
            coord.wait_for(min_devices=None, join_timeout_s=join_timeout_s)
            return run_spec(coord, spec, on_step=on_step, deadline_s=deadline_s)
    finally:
        for a in agents:
            try:
                a.wait(timeout=15)
            except subprocess.TimeoutExpired:
                a.kill()
                a.wait()
        remove_private(private)


class _Quiet:
    def __enter__(self):
        return self

    def event(self, ev: dict) -> None:
        pass

    def __exit__(self, *exc):
        return False

    def update(self, rec) -> None:
        pass
