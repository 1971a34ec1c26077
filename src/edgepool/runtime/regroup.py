"""Recovery without a restart, rank side: the survivors of a lost device keep their processes.

Backups, while the run goes well: every ``train.replicate_every`` steps each rank takes a
snapshot of its state (parameters and optimizer state, ``Engine.pieces``: a copy in
memory, at the step boundary) and sends it to the rank that backs it up
(``specs.layout.backups``: the next rank of another stage, Asteroid's neighbour
backups; a rank of a dp group has twins that hold the same bits and sends nothing), as
safetensors bytes. The sends run in the background, over a process group of their own
(``StageGroups.backup_group``), while the next steps go on. Each rank counts its round
done in the store; at the next round's boundary every rank waits until all have (one
round in flight at most), and only then are the older copies dropped: whenever a device
is lost, one step is held by every survivor, and the lost rank's state of that step by
a twin or a replica. At a checkpoint step each rank also keeps a snapshot (the files
hold the lost rank's part of it), so without backups (``replicate_every: 0``), or
between two rounds, the run goes on from there.

The launcher (``launch.recover``) and the ranks meet in the run's store, which the
launcher hosts, so it outlives any rank:

1. The launcher loses a rank in generation ``g`` (it died, or its heartbeat stopped and the
   launcher stopped it). It writes ``edgepool/gen/<g+1>/lost`` and bumps the counter
   ``edgepool/gen``.
2. Each rank's watcher thread (``Regroup``) reads the counter every ``WATCH_S``. When it moves,
   the watcher shuts down this process's TCP connections of the old process groups, so
   whatever collective or transfer the main thread is blocked in fails at once, whether
   the lost peer was killed, frozen or cut off. gloo has no way to cancel a waiting op:
   ``ProcessGroupGloo.abort()`` left a blocked ``recv`` blocked here (torch 2.13), while a
   shut connection fails it within milliseconds. The store's own connection is kept.
3. The main thread, out of its step, reports what it holds (``gen/<g+1>/held/<old rank>``:
   its device, the steps of its snapshots and of the replicas it keeps), and waits for
   the launcher's answer (``gen/<g+1>/plan``): the new plan, old rank -> new rank (None:
   not in the new plan, a standby, which leaves cleanly), the step to go on from, which
   survivor gives which old rank's state, and which lost ranks' state comes from that
   step's checkpoint files (none, when a replica survives).
4. It destroys its groups and joins the new world over ``PrefixStore("edgepool/gen<g+1>")``
   of the same store (torchft's reconfigurable process group: a fresh gloo group per
   quorum, keyed by a prefix of one store; ``runtime.groups.regroup``), builds the engine
   of the new plan and fills it (``restore``): ``runtime.reshard`` routes every piece;
   pieces a survivor holds (its own, or a replica) travel rank to rank as safetensors
   bytes, one message per (sender, receiver) pair in an order every rank computes
   alike; pieces nobody holds in memory come from the checkpoint files of that step
   (the log says so). The step that was in progress is redone.

When no step is held in memory by everyone (two devices lost at once, a twin and its
replica both gone), the launcher says ``checkpoint`` and every rank loads the newest
good checkpoint instead, still without a restart.

Taking a device in (``launch.recover.InMemory.offer``) is the same protocol without a
loss: the launcher sets ``JOIN`` to the new generation; each rank's watcher reads it
with ``GEN``, and the step loop says what it last read in the step's metrics
all-gather, so all see it at the same boundary
(``Joining``), snapshot that step and report; the device's new process (``join``)
connects to the store without a world, reports, and joins the generation's world; its
state comes from the ranks that hold it, as a lost rank's would.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from edgepool.errors import EdgepoolError
from edgepool.runtime.health import PREFIX
from edgepool.specs.plan import Plan

GEN = "edgepool/gen"  # the generation a loss opened; ``GEN/<g>/...`` the keys of generation g
JOIN = "edgepool/join"  # the generation the launcher opened to take devices in at the next step boundary
# How often a rank reads GEN and JOIN: a survivor notices a new generation within this,
# so it is part of every recovery's time (two small store reads a period).
WATCH_S = 0.1


class Joining(Exception):  # noqa: N818 - a signal between the step loop and ``run_rank``, not an error
    """Every rank saw at the same step boundary (the step's metrics gather carries what
    each read) that the launcher opened generation ``gen`` to take devices in."""

    def __init__(self, gen: int, step: int):
        super().__init__(f"taking devices in at step {step} (generation {gen})")
        self.gen, self.step = gen, step


def key(gen: int, what: str) -> str:
    return f"{GEN}/{gen}/{what}"


def beat_prefix(gen: int) -> str:
    """The heartbeat keys of generation ``gen`` (``runtime.health``; ranks are renumbered)."""
    return PREFIX if gen == 0 else f"{PREFIX}/g{gen}"


@dataclass
class Snapshot:
    """One rank's whole state at a step boundary, copied (``Engine.pieces``)."""

    plan_id: str
    step: int
    tensors: dict[str, torch.Tensor]
    scalars: dict[str, dict]
    rng: torch.Tensor | None = None  # this process's own; a replica of a peer's carries none

    @classmethod
    def of(cls, engine, step: int) -> "Snapshot":
        tensors, scalars = engine.pieces()  # optimizer tensors are copies already, parameters are not
        tensors = {k: v.detach().clone() if k.startswith("model/") else v for k, v in tensors.items()}
        return cls(engine.plan.plan_id, step, tensors, json.loads(json.dumps(scalars)), torch.get_rng_state())

    def to_bytes(self) -> bytes:
        """Safetensors bytes of the tensors, the scalars in its metadata (never a pickle)."""
        from safetensors.torch import save

        return save(self.tensors, metadata={"scalars": json.dumps(self.scalars)})

    @classmethod
    def from_bytes(cls, blob: bytes, plan_id: str, step: int) -> "Snapshot":
        from safetensors.torch import load

        return cls(plan_id, step, load(blob), json.loads(_metadata(blob).get("scalars", "{}")))


def replicate(snap: Snapshot, plan: Plan, rank: int, group=None) -> dict[int, Snapshot]:
    """Collective over ``group`` (every rank): send this rank's ``snap`` to the rank that
    backs it up (``specs.layout.backups``) and receive the snapshots of the ranks this
    one backs up. Every send and receive is posted at once (a ring of blocking sends
    would wait on each other), sizes first. Returns old rank -> its replica."""
    import torch.distributed as dist

    from edgepool.specs.layout import backups

    to = backups(plan)
    dst = to.get(rank)
    srcs = sorted(r for r, b in to.items() if b == rank)
    blob = snap.to_bytes() if dst is not None else b""
    sizes = {r: torch.zeros(1, dtype=torch.int64) for r in srcs}
    reqs = [dist.irecv(sizes[r], r, group=group) for r in srcs]
    if dst is not None:
        reqs.append(dist.isend(torch.tensor([len(blob)], dtype=torch.int64), dst, group=group))
    for q in reqs:
        q.wait()
    bufs = {r: torch.empty(int(sizes[r]), dtype=torch.uint8) for r in srcs}
    reqs = [dist.irecv(bufs[r], r, group=group) for r in srcs]
    if dst is not None:
        reqs.append(dist.isend(torch.frombuffer(bytearray(blob), dtype=torch.uint8), dst, group=group))
    for q in reqs:
        q.wait()
    return {r: Snapshot.from_bytes(bufs[r].numpy().tobytes(), snap.plan_id, snap.step) for r in srcs}


@dataclass
class Assignment:
    """The launcher's answer for one generation."""

    gen: int
    old_plan: Plan
    plan: Plan
    rank: int | None  # this process's rank under ``plan``; None: a standby
    old_rank: int | None  # this process's rank under ``old_plan``; None: a device taken in
    ranks: dict[int, int | None]  # old rank -> new rank, for every survivor
    step: int
    source: str  # "memory": survivors' snapshots and replicas (and files where named); "checkpoint": files only
    holders: dict[int, list[int]]  # survivor (old rank) -> the old ranks whose state of ``step`` it gives
    files: list[int]  # old ranks whose state of ``step`` comes from the checkpoint's files


def _connections(keep: set[tuple[str, int]]) -> list[int]:
    """This process's connected TCP sockets (file descriptors), but those to ``keep``."""
    out = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if not os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                continue
            s = socket.socket(fileno=os.dup(int(name)))
        except OSError:
            continue
        try:
            if s.type == socket.SOCK_STREAM and s.family in (socket.AF_INET, socket.AF_INET6) and \
                    not s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                peer = s.getpeername()
                if (peer[0], peer[1]) not in keep:
                    out.append(int(name))
        except OSError:  # not connected
            pass
        finally:
            s.close()
    return out


def shut_connections(keep: set[tuple[str, int]]) -> int:
    """Shut down every connected TCP socket of this process but those to ``keep`` (the
    store): the old groups' peers. A listener is left alone (gloo aborts the process
    when its accept fails). Returns how many were shut."""
    n = 0
    for fd in _connections(keep):
        try:
            s = socket.socket(fileno=os.dup(fd))
            s.shutdown(socket.SHUT_RDWR)
            s.close()
            n += 1
        except OSError:
            pass
    return n


ABANDON_S = 1.0  # how long a rank that regroups waits for its round of backups in flight


@dataclass
class _Round:
    """A round of backups in flight: its step, the world it runs over, its thread, and
    why it failed (set by the thread)."""

    step: int
    world: int
    group: object
    thread: threading.Thread | None = None
    failed: BaseException | None = None


class Regroup:
    """This rank's part in going on without a lost device (see the module docstring)."""

    def __init__(self, store, *, timeout_s: float, keep: set[tuple[str, int]] = frozenset(), beat_s: float = WATCH_S):
        self.store, self.timeout_s, self.keep, self.beat_s = store, timeout_s, set(keep), beat_s
        self.gen = 0
        self.own: dict[int, Snapshot] = {}  # step -> this rank's state (the confirmed one, and one being confirmed)
        self.kept: dict[int, dict[int, Snapshot]] = {}  # old rank -> step -> the replica this rank keeps of it
        self.moved = threading.Event()  # the launcher started a new generation; the old groups are cut
        self.joining = 0  # the generation the launcher opened to take devices in (``JOIN``), as last read
        self._target = 0
        self.groups = None  # the generation's ``StageGroups``, torn down on regrouping
        self._round: _Round | None = None  # the backups in flight
        self._lock = threading.Lock()  # ``own`` and ``kept``, against the round in flight
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edgepool-regroup", daemon=True)

    @classmethod
    def from_env(cls, store, timeout_s: float) -> "Regroup | None":
        """A ``Regroup`` when the launcher recovers in memory (``EDGEPOOL_REGROUP=1``), else None."""
        if os.environ.get("EDGEPOOL_REGROUP") != "1" or store is None:
            return None
        from edgepool.machine import parse_endpoint

        keep = set()
        if os.environ.get("EDGEPOOL_STORE"):
            host, port = parse_endpoint(os.environ["EDGEPOOL_STORE"], "EDGEPOOL_STORE")
            keep.add((host, port))
        return cls(store, timeout_s=timeout_s, keep=keep).start()

    def start(self) -> "Regroup":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.beat_s):
            try:
                wanted = int(self.store.add(GEN, 0))
                self.joining = int(self.store.add(JOIN, 0))
            except Exception:  # noqa: BLE001 - the store's host (the launcher) is gone: the watchdog ends us
                return
            if wanted > self.gen and not self.moved.is_set():
                self._target = wanted
                shut_connections(self.keep)
                self.moved.set()

    def keep_state(self, engine, step: int, group=None, *, backup: bool = False) -> None:
        """Remember this rank's state after ``step`` steps. ``backup`` (collective: every
        rank calls it at the same step) also backs it up on its peer and keeps the
        replicas of the peers it backs up (``replicate``), in the background over
        ``group``; first, the round before must be done on every rank (``settle``). The
        older versions are dropped only once every rank holds the newer, so a loss at
        any point leaves one step that every survivor and some replica of each lost
        rank hold. Without ``backup`` (a checkpoint step: its files hold the rest) the
        snapshot replaces the older ones at once."""
        if backup:
            self.settle()
        snap = Snapshot.of(engine, step)
        with self._lock:
            self.own[step] = snap
            if not backup:
                self._drop_before(step)
        if backup:
            rnd = _Round(step=step, world=engine.plan.world_size, group=group)
            rnd.thread = threading.Thread(target=self._send, args=(rnd, snap, engine.plan, engine.rank),
                                          name="edgepool-backup", daemon=True)
            self._round = rnd
            rnd.thread.start()

    def _send(self, rnd: "_Round", snap: Snapshot, plan: Plan, rank: int) -> None:
        try:
            got = replicate(snap, plan, rank, rnd.group)
            with self._lock:
                if self._round is rnd:  # not a round given up on (a later generation holds other state)
                    for r, rep in got.items():
                        self.kept.setdefault(r, {})[snap.step] = rep
        except Exception as exc:  # noqa: BLE001 - a peer lost mid-round: the main thread hears of it
            rnd.failed = exc

    def abandon(self) -> None:
        """Leave the round in flight behind (a loss: its peer may never answer). Waits a
        moment for it; if it is still blocked, its thread and its process group are left
        to fail on their own (destroying a gloo group under a blocked op could hang)."""
        rnd = self._round
        if rnd is None:
            return
        rnd.thread.join(ABANDON_S)
        with self._lock:  # from here on the thread's replicas, if it ends, are dropped
            self._round = None
        if rnd.thread.is_alive() and self.groups is not None and self.groups.backup_group is rnd.group:
            self.groups.backup_group = None

    def settle(self, timeout_s: float | None = None) -> None:
        """Wait for the round in flight to be done on every rank, then drop the older
        copies (each rank calls it at the same boundary, before the next round)."""
        if self._round is None:
            return
        rnd = self._round
        t, step, world = rnd.thread, rnd.step, rnd.world
        limit = self.timeout_s if timeout_s is None else timeout_s
        end = time.monotonic() + limit
        # A RuntimeError, as gloo's, when a peer is lost (the launcher opened a generation:
        # ``moved``) or the round is not done in time: the rank then regroups (``runtime.train``).
        while t.is_alive() and not self.moved.is_set() and time.monotonic() < end:
            t.join(0.05)
        if t.is_alive() or rnd.failed is not None:
            why = rnd.failed or ("a peer was lost" if self.moved.is_set() else f"not done within {limit:g} s")
            raise RuntimeError(f"backing up the state of step {step} failed: {why}")
        self._round = None
        done = key(self.gen, f"backups/{step}")  # counted here: the sending thread keeps off the store
        self.store.add(done, 1)
        while int(self.store.add(done, 0)) < world:
            if self.moved.is_set() or time.monotonic() > end:
                raise RuntimeError(f"the backups of step {step} were not done on every rank "
                                   f"({'a peer was lost' if self.moved.is_set() else f'within {limit:g} s'})")
            time.sleep(0.002)
        with self._lock:
            self._drop_before(step)

    def _drop_before(self, step: int) -> None:
        self.own = {t: v for t, v in self.own.items() if t >= step}
        self.kept = {r: {t: v for t, v in by.items() if t >= step} for r, by in self.kept.items()}

    def held(self) -> dict:
        """What this rank holds, as its report says it: the steps of its snapshots and of
        the replicas it keeps (a round in flight counts once its replicas are here)."""
        with self._lock:
            return {"snapshots": [[v.plan_id, t] for t, v in sorted(self.own.items())],
                    "replicas": {str(r): [[v.plan_id, t] for t, v in sorted(by.items())]
                                 for r, by in self.kept.items()}}

    def forget(self) -> None:
        """Drop every snapshot and replica (a new generation's plan starts its own)."""
        self._round = None
        with self._lock:
            self.own, self.kept = {}, {}

    def rejoin(self, old_rank: int, device: str, old_plan: Plan, log=print, gen: int | None = None) -> Assignment:
        """Report, wait for the launcher's answer, and join the new world (``None`` rank:
        leave it). ``gen``: the generation that takes devices in (``Joining``), else the
        one a loss opened."""
        from edgepool.runtime.groups import leave_world, regroup_world

        g = self._target = gen if gen is not None else self._target
        self.abandon()  # a round in flight: done, or left behind with the old groups
        self.store.set(key(g, f"held/{old_rank}"), json.dumps({"device": device, **self.held()}))
        answer = self._answer(g)
        if answer.get("again"):  # a device was lost while others were taken in: that generation follows
            if not self.moved.wait(self.timeout_s):
                raise EdgepoolError(f"generation {g} was called off and no other followed within {self.timeout_s:g} s")
            return self.rejoin(old_rank, device, old_plan, log=log)
        ranks = {int(k): v for k, v in answer["ranks"].items()}
        plan = Plan.model_validate(answer["plan"])
        self.gen = g
        self.moved.clear()
        if self.groups is not None:
            self.groups.destroy()
            self.groups = None
        new = ranks.get(old_rank)
        if new is None:
            leave_world()
        else:
            regroup_world(new, plan.world_size, prefix=f"{GEN}{g}", timeout_s=self.timeout_s)
        log(f"generation {g}: rank {old_rank} ({device}) is rank {new} of plan {plan.plan_id}; going on from step "
            f"{answer['step']} ({answer['source']})")
        return _assignment(answer, g, old_plan, new, old_rank)

    def _answer(self, g: int) -> dict:
        """The launcher's answer for generation ``g``, within the store's timeout (train.timeout_s)."""
        answer = json.loads(self.store.get(key(g, "plan")))
        if "stop" in answer:
            raise EdgepoolError(f"the launcher ended the run: {answer['stop']}")
        return answer

    def join(self, device: str, gen: int, log=print) -> Assignment:
        """This process is ``device``, taken into the run at generation ``gen``: report,
        wait for the launcher's answer, join the new world; its state comes from its peers."""
        from edgepool.runtime.groups import regroup_world

        self._target = gen
        self.store.set(key(gen, f"joiner/{device}"), json.dumps({"device": device}))
        answer = self._answer(gen)
        if answer.get("again") or device not in answer.get("joined", {}):
            raise EdgepoolError(f"{device} was not taken in: the launcher called it off")
        plan = Plan.model_validate(answer["plan"])
        new = int(answer["joined"][device])
        self.gen = gen
        regroup_world(new, plan.world_size, prefix=f"{GEN}{gen}", timeout_s=self.timeout_s)
        log(f"generation {gen}: {device} is taken in as rank {new} of plan {plan.plan_id} at step {answer['step']}; "
            "its state comes from its peers")
        return _assignment(answer, gen, Plan.model_validate(answer["old_plan"]), new, None)


def _assignment(answer: dict, gen: int, old_plan: Plan, rank: int | None, old_rank: int | None) -> Assignment:
    """The launcher's ``answer`` for generation ``gen`` as this process's ``Assignment``."""
    return Assignment(gen=gen, old_plan=old_plan, plan=Plan.model_validate(answer["plan"]), rank=rank,
                      old_rank=old_rank, ranks={int(k): v for k, v in answer["ranks"].items()},
                      step=int(answer["step"]), source=answer["source"],
                      holders={int(k): v for k, v in answer.get("holders", {}).items()},
                      files=list(answer.get("files", [])))


class _Held:
    """Slices of one old rank's state that arrived from the survivor holding it (a
    ``runtime.reshard.Source``)."""

    def __init__(self):
        self.slices: dict[tuple[str, tuple], torch.Tensor] = {}

    def keys(self) -> list[str]:
        return list(dict.fromkeys(k for k, _ in self.slices))

    def get(self, key: str, src):
        return self.slices[key, tuple(src)]


def _name(old_rank: int, key: str, src) -> str:
    return f"{old_rank}|{key}|{json.dumps([list(b) for b in src])}"


def exchange(a: Assignment, moves, held: dict[int, Snapshot], comm) -> tuple[dict, dict]:
    """Send the pieces other ranks need of the states this rank holds (``held``: old rank
    -> its snapshot or the replica kept of it) and receive the ones this rank needs from
    other survivors (one safetensors message per pair, in the same order on every rank).
    Returns (old rank -> a source of its received slices, the scalars received)."""
    import torch.distributed as dist
    from safetensors.torch import load, save

    from edgepool.runtime.reshard import Tensors, by_param

    me = a.rank
    pairs: dict[tuple[int, int], list] = {}
    for j in range(a.plan.world_size):
        for m in moves.moves.get(j, []):
            if isinstance(m.holder, tuple) and a.ranks[m.holder[1]] != j:  # ("mem", old rank), held elsewhere
                pairs.setdefault((a.ranks[m.holder[1]], j), []).append(m)
    got: dict[int, _Held] = {}
    scalars: dict[str, dict] = {}
    keys = {r: by_param(state.tensors) for r, state in held.items()}
    for (src, dst), ms in sorted(pairs.items()):
        if me == src:
            out, extra = {}, {}
            for m in ms:
                state = held[m.old_rank]
                own = Tensors(state.tensors)
                for k in keys[m.old_rank].get(m.name, []):
                    out[_name(m.old_rank, k, m.src)] = own.get(k, m.src).clone().contiguous()
                if m.name in state.scalars:
                    extra[m.name] = state.scalars[m.name]
            blob = save(out, metadata={"scalars": json.dumps(extra)})
            with comm.guard(f"sending state to rank {dst}"):
                dist.send(torch.tensor([len(blob)], dtype=torch.int64), dst)
                dist.send(torch.frombuffer(bytearray(blob), dtype=torch.uint8), dst)
        elif me == dst:
            with comm.guard(f"receiving state from rank {src}"):
                size = torch.zeros(1, dtype=torch.int64)
                dist.recv(size, src)
                buf = torch.empty(int(size), dtype=torch.uint8)
                dist.recv(buf, src)
            blob = buf.numpy().tobytes()
            for name, t in load(blob).items():
                r, k, where = name.split("|", 2)
                got.setdefault(int(r), _Held()).slices[k, tuple(tuple(b) for b in json.loads(where))] = t
            scalars.update(json.loads(_metadata(blob).get("scalars", "{}")))
    return got, scalars


def _metadata(blob: bytes) -> dict:
    n = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8:8 + n]).get("__metadata__") or {}


def restore(engine, a: Assignment, regroup: Regroup, ckpt_root: Path, identity: dict, shapes, comm,
            log=print) -> None:
    """Fill the new engine of ``a.rank`` with the state of step ``a.step``: from the
    survivors' snapshots and the replicas they keep of lost ranks, and, for what no
    survivor holds, from the checkpoint files of that step (the log says so)."""
    from edgepool.runtime import checkpoint
    from edgepool.runtime.reshard import Tensors, assemble, reshard

    snapshot = regroup.own.get(a.step) if a.old_rank is not None else None  # a device taken in holds nothing
    if a.old_rank is not None and (snapshot is None or snapshot.plan_id != a.old_plan.plan_id):
        raise checkpoint.CheckpointError(f"this rank holds no snapshot of step {a.step} under plan "
                                         f"{a.old_plan.plan_id}")
    held = {a.old_rank: snapshot} if snapshot is not None else {}
    held.update({r: by[a.step] for r, by in regroup.kept.items() if a.step in by})
    holders = {("mem", r): list(given) for r, given in a.holders.items()}
    holders.update({checkpoint.rank_file(r): [r] for r in a.files})
    moves = reshard(a.old_plan, a.plan, holders, shapes=shapes, shape=engine.shape,
                    prefer=lambda j, h: isinstance(h, tuple) and a.ranks[h[1]] == j)
    if moves.missing:
        raise checkpoint.CheckpointError(f"nobody holds {moves.missing[0][1]} (needed by rank {moves.missing[0][0]})")
    mine = a.holders.get(a.old_rank, [a.old_rank]) if a.old_rank is not None else []
    if any(r not in held for r in mine):
        raise checkpoint.CheckpointError(f"this rank keeps no replica of step {a.step} of rank(s) "
                                         f"{', '.join(str(r) for r in mine if r not in held)}")
    t0 = time.monotonic()
    received, scalars = exchange(a, moves, held, comm)
    took = time.monotonic() - t0
    d = checkpoint.step_dir(ckpt_root, a.step)
    files = sorted({m.holder for m in moves.moves[a.rank] if isinstance(m.holder, str)})
    if files:
        manifest = checkpoint.read_manifest(d) or {}
        why = checkpoint.check(d, manifest, identity, files)
        if why is not None:
            raise checkpoint.CheckpointError(f"checkpoint {d.name} refused: {why}")
        log(f"no survivor keeps the state of rank(s) {', '.join(map(str, a.files))} in memory: it comes from {d} "
            f"({', '.join(files)})")
    from contextlib import ExitStack

    from safetensors import safe_open

    with ExitStack() as stack:
        opened: dict[str, checkpoint.RankFile] = {}

        def source(holder, old_rank):
            if isinstance(holder, tuple):
                return Tensors(held[old_rank].tensors) if a.ranks[holder[1]] == a.rank else received[old_rank]
            if holder not in opened:
                opened[holder] = checkpoint.RankFile(stack.enter_context(safe_open(str(d / holder), framework="pt")))
            return opened[holder]

        tensors = assemble(a.rank, moves, shapes, source)
        for f in opened.values():
            scalars.update(f.meta.get("optim_scalars", {}))
    for r in mine:
        if r != a.old_rank:
            scalars.update(held[r].scalars)
    if snapshot is not None:
        scalars.update(snapshot.scalars)
    engine.load_pieces(tensors, scalars)
    if snapshot is not None:
        torch.set_rng_state(snapshot.rng)
    got = sum(t.numel() * t.element_size() for h in received.values() for t in h.slices.values())
    log(f"state of step {a.step} in place after {time.monotonic() - t0:.2f} s ({got / 1e6:.1f} MB from peers in "
        f"{took:.2f} s)")
