"""A discrete-event simulation of one training step of a Plan (plain Python, no torch).

It executes ``lower(plan)``, each rank's op list, exactly as the runtime orders it:

- compute ops (``embed``, ``fwd``, ``head``, ``bwd``, ``embed_bwd``, ``optim``) take
  the durations of ``cost.model.device_work`` (the same per-device compute the cost
  model uses, so the two agree where their assumptions coincide);
- ``send_act``/``send_grad``/``embed``/``head`` start the transfers of
  ``specs.layout.Layout`` boundaries as network flows and do not wait for them (asynchronous
  sends); ``recv_*``, ``head`` and ``embed_bwd`` block until every flow they need has
  arrived (blocking receives);
- ``fwd``/``bwd`` of a mode with collectives inside (tp, sp, fsdp: ``Mode.group_ops``)
  and ``sync_grads`` are group operations: every member
  waits for the others, computes its share, then the group runs its ring collective as
  flows (one flow per ring edge, after the ring's latency-bound steps);
- the gradient sync overlaps the last micro-batch's backward, as the runtime's buckets
  do (``runtime.overlap``, ``GroupComm.sync_buckets``): a bucket is final on a member
  once the backward of its lowest block is done in its last ``bwd``
  (``DeviceWork.bwd_left_s`` before the op's end); once every member has it final and
  the bucket before it is summed, the group runs its ring all-reduce beside the
  compute; ``sync_grads`` waits for those, then runs the buckets final only at the
  backward's end (the first block's, the embed's) in turn.

**Network.** Flows start after the pair's latency and then share bandwidth max-min
fairly (progressive filling) under these capacities: every device's uplink and
downlink (its ``bandwidth_mbps``), and, on a ``shared`` medium, the one channel of
``network.bandwidth_mbps`` that every flow crosses. Rates are recomputed whenever a
flow starts or ends, so concurrent transfers on the shared medium slow each other
down: the contention the analytic model only bounds. Flows on one connection go one
at a time, in the order they were sent: gloo gives a process group one TCP connection
per pair of ranks and writes its messages to it in turn (its pair's send queue), so
the boundary transfers from one device to another (``isend`` calls on the world
group) queue behind each other instead of sharing the link; a micro-batch's activation
arrives after its own bytes and those sent before it, not after every one in the air.
A collective's ring edges run on their stage group's connections, not the world
group's, and each collective counts as a connection of its own (gloo cuts a collective
into many small messages, so two at once interleave): they share links as before.

**Outputs.** Step time (the last rank's finish), a per-device timeline of compute and
collective segments (everything else is idle), energy per device (``busy_w`` while
computing, ``idle_w`` otherwise, plus radio energy per byte sent or received; modelled
from catalog figures) and peak memory (static state plus the activations of the
micro-batches whose forward has started and backward not yet finished, plus the
head's transient logits while it runs).

**Op order.** ``best_order`` picks the 1F1B pass order of a plan: laid out with unit
durations (the default) or with the plan's own costs (``PassTimes``: the cost model's
per-stage passes, head and transfers), whichever this simulator finds shorter, and
writes the choice into the plan, so the runtime runs the same order.

**Size.** A step has about ``world_size x num_microbatches`` ops, and on a shared
medium every flow in the air is re-rated at each event, so the work grows faster than
the ops. ``simulate`` refuses a plan past ``MAX_SIM_OPS`` ops with a one-line
``PlanError``; the planner prices such plans with the cost model alone and says so in
the estimate's ``source`` and its notes.

Units: seconds, bytes, joules.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from edgepool import catalog, modes
from edgepool.cost.model import (EnergyParts, backup_cost, boundary_flows, device_work, estimate, group_comm,
                                  power_mode_of, sync_codec_s)
from edgepool.cost.network import Network
from edgepool.cost.profile import ModelProfile
from edgepool.errors import PlanError
from edgepool.sim.lower import Op, lower
from edgepool.specs.plan import Estimate, PassTimes, Plan, Shape, role_of
from edgepool.specs.pool import PoolSpec

# Times are seconds from the step's start; a step can last hours, where 1e-12 is below a
# double's resolution and a flow's last bytes would take "no time" forever. A nanosecond
# is far below anything the model resolves.
_EPS = 1e-9


@dataclass(frozen=True)
class Segment:
    device: str
    start_s: float
    end_s: float
    label: str  # e.g. "fwd[3]"
    kind: str  # "compute" or "comm"


@dataclass(frozen=True)
class DeviceTrace(EnergyParts):
    name: str
    power_mode: str
    finish_s: float
    busy_s: float
    idle_s: float
    peak_memory_bytes: float
    bytes_moved: float


@dataclass(frozen=True)
class SimResult:
    plan_id: str
    step_time_s: float
    devices: dict[str, DeviceTrace]
    segments: tuple[Segment, ...]
    num_flows: int
    network_busy_s: float = 0.0  # time with bytes on the wire in the step (its own transfers)

    @property
    def energy_j(self) -> float:
        return sum(d.energy_j for d in self.devices.values())

    @property
    def peak_memory_bytes(self) -> dict[str, int]:
        return {n: int(round(d.peak_memory_bytes)) for n, d in self.devices.items()}

    def to_estimate(self, objective: str | None = None) -> Estimate:
        return Estimate(step_time_s=self.step_time_s, energy_j=self.energy_j, peak_memory_bytes=self.peak_memory_bytes,
                        source="simulator", objective=objective, energy_source="modelled (catalog power figures)")


@dataclass
class _Flow:
    src: str
    dst: str
    remaining: float
    start_s: float  # active from (after latency)
    on_done: object  # callable
    rate: float = 0.0
    conn: object = None  # the connection it travels on: one message at a time, in order sent


@dataclass
class _Rank:
    rank: int
    device: str
    ops: list[Op]
    pc: int = 0
    free_at: float = 0.0
    blocked: bool = False  # inside a group operation
    done: bool = False
    inflight: int = 0
    mem_peak: float = 0.0
    busy_s: float = 0.0


class _Net:
    """Flows with max-min fair rates under link and channel capacities; the flows of one
    connection move one at a time, in the order they were added."""

    def __init__(self, net: Network):
        self.net = net
        self.flows: list[_Flow] = []
        self.moved: dict[str, float] = {}
        self.count = 0
        self.busy_s = 0.0  # time with bytes on the wire (the room left for the backups in the background)

    def add(self, src: str, dst: str, nbytes: float, now: float, on_done, delay_s: float | None = None,
            group: object = "world") -> None:
        """A transfer of ``nbytes`` from ``src`` to ``dst`` on ``group``'s connection between
        them (the world group's for point-to-point sends), behind what that connection
        already carries."""
        lat = max(self.net.dev_latency_s[src], self.net.dev_latency_s[dst]) if delay_s is None else delay_s
        self.flows.append(_Flow(src, dst, float(nbytes), now + lat, on_done, conn=(group, src, dst)))
        self.moved[src] = self.moved.get(src, 0.0) + nbytes
        self.moved[dst] = self.moved.get(dst, 0.0) + nbytes
        self.count += 1

    def active(self, now: float) -> list[_Flow]:
        """The flows moving bytes at ``now``: started, and first in their connection's
        queue (``flows`` is in the order they were sent)."""
        out, busy = [], set()
        for f in self.flows:
            if f.conn in busy:
                continue
            busy.add(f.conn)
            if f.start_s <= now + _EPS:
                out.append(f)
        return out

    def allocate(self, now: float) -> None:
        active = self.active(now)
        for f in self.flows:
            f.rate = 0.0
        if not active:
            return
        cap: dict[object, float] = {}
        users: dict[object, list[_Flow]] = {}
        for f in active:
            res = [("tx", f.src), ("rx", f.dst)] + (["chan"] if self.net.shared else [])
            for r in res:
                if r not in cap:
                    cap[r] = self.net.channel_Bps if r == "chan" else self.net.dev_Bps[r[1]]
                users.setdefault(r, []).append(f)
        frozen: set[int] = set()
        while len(frozen) < len(active):
            live = {r: [f for f in fs if id(f) not in frozen] for r, fs in users.items()}
            inc = min(cap[r] / len(fs) for r, fs in live.items() if fs)
            for r, fs in live.items():
                cap[r] -= inc * len(fs)
            for f in active:
                if id(f) not in frozen:
                    f.rate += inc
            for r, fs in live.items():
                if fs and cap[r] <= 1e-9 * (self.net.channel_Bps if r == "chan" else self.net.dev_Bps[r[1]]):
                    frozen.update(id(f) for f in fs)

    def next_event(self, now: float) -> float:
        t = float("inf")
        for f in self.flows:
            if f.start_s > now + _EPS:
                t = min(t, f.start_s)
            elif f.rate > 0:
                t = min(t, now + f.remaining / f.rate)
        return t

    def advance(self, now: float, to: float) -> list[_Flow]:
        dt = to - now
        done = []
        if any(f.start_s <= now + _EPS and f.rate > 0 for f in self.flows):
            self.busy_s += dt
        for f in self.flows:
            if f.start_s <= now + _EPS and f.rate > 0:
                f.remaining -= f.rate * dt
            # Done when what is left would take under _EPS: ``now + remaining / rate``
            # may round to ``now`` late in a long step, and time would stop.
            if f.start_s <= to + _EPS and f.remaining <= max(1e-6, f.rate * _EPS):
                done.append(f)
        self.flows = [f for f in self.flows if f not in done]
        return done


MAX_SIM_OPS = 4096


def sim_size(plan: Plan) -> int:
    """What ``MAX_SIM_OPS`` bounds: devices x micro-batches."""
    return plan.world_size * plan.num_microbatches


def simulate(plan: Plan, pool: PoolSpec, profile: ModelProfile, shape: Shape, *, network: Network | None = None,
             ops: dict[int, list[Op]] | None = None) -> SimResult:
    """Run one step of ``plan`` (see the module docstring).

    ``ops`` replaces ``lower(plan)`` (a what-if: another op order for the same plan).
    """
    if sim_size(plan) > MAX_SIM_OPS:
        raise PlanError(f"plan {plan.plan_id} has {plan.world_size} devices x {plan.num_microbatches} micro-batches "
                        f"= {sim_size(plan)}, past the simulator's limit of {MAX_SIM_OPS}; use fewer micro-batches")
    net = network or Network.of(pool)
    devs = {d.name: d for d in pool.devices}
    work = device_work(plan, pool, profile, shape)
    S = len(plan.stages)
    roles = [role_of(plan, r) for r in range(plan.world_size)]
    comms = [group_comm(plan, s, profile, shape, net) for s in range(S)]
    # The framework's own memory, then parameters, gradients and optimizer state as the mode holds them.
    static = {n: profile.runtime_bytes + w.static_bytes for n, w in work.items()}
    # In-memory backups (``cost.model.BackupCost.held_bytes``): held through the step, a long run's.
    bc = backup_cost(plan, work, net, profile.backup_every)
    for n in static:
        static[n] += bc.held_bytes(n)

    # Transfers of every boundary, and how many each receiver waits for.
    flows_of: dict[tuple[int, bool], list[tuple[str, str, float]]] = {}
    expect: dict[tuple[int, bool, str], int] = {}
    for k in range(S + 1):
        for bw in (False, True):
            fl = boundary_flows(plan, shape, profile, k, bw)
            flows_of[(k, bw)] = fl
            for _, dst, _ in fl:
                expect[(k, bw, dst)] = expect.get((k, bw, dst), 0) + 1
    arrived: dict[tuple[int, bool, int, str], int] = {}

    ranks = [_Rank(r, plan.devices[r], list(rank_ops)) for r, rank_ops in (ops or lower(plan)).items()]
    for rk in ranks:
        rk.mem_peak = static[rk.device]
    netsim = _Net(net)
    segments: list[Segment] = []
    heap: list[tuple[float, int, object]] = []  # (time, seq, callback)
    seq = [0]
    now = 0.0

    def at(t: float, fn) -> None:
        seq[0] += 1
        heapq.heappush(heap, (t, seq[0], fn))

    def launch(k: int, bw: bool, mb: int, src: str) -> None:
        for s_, d_, nb in flows_of[(k, bw)]:
            if s_ == src:
                def done(d_=d_):
                    key = (k, bw, mb, d_)
                    arrived[key] = arrived.get(key, 0) + 1
                netsim.add(s_, d_, nb, now, done)

    def has_all(k: int, bw: bool, mb: int, dst: str) -> bool:
        return arrived.get((k, bw, mb, dst), 0) >= expect.get((k, bw, dst), 0)

    def compute(rk: _Rank, dur: float, label: str, then=None) -> None:
        if dur > 0:
            segments.append(Segment(rk.device, now, now + dur, label, "compute"))
            rk.busy_s += dur
        rk.free_at = now + dur
        if then is not None:
            at(now + dur, then)

    def bump_mem(rk: _Rank, extra: float = 0.0) -> None:
        w = work[rk.device]
        rk.mem_peak = max(rk.mem_peak, static[rk.device] + rk.inflight * w.act_bytes + extra)

    M = plan.num_microbatches

    def ring(names: list[str], nbytes: float, then) -> None:
        """A ring all-reduce of ``nbytes`` over ``names`` from now, as flows; ``then`` when done."""
        n = len(names)
        if n < 2 or nbytes <= 0:
            then()
            return
        pending = [n]
        per_dev = 2.0 * (n - 1) / n * nbytes

        def edge_done() -> None:
            pending[0] -= 1
            if pending[0] == 0:
                then()

        coll = object()  # its own connections: it does not queue behind other transfers
        for i, x in enumerate(names):
            netsim.add(x, names[(i + 1) % n], per_dev, now, edge_done, delay_s=2 * (n - 1) * net.lat(names),
                       group=coll)

    # The sync's buckets (``GroupComm.sync_buckets``, the runtime's): those final before
    # the backward's end (``blocks_left > 0``, a prefix of the launch order) go during the
    # last backward, one all-reduce at a time in order, each once every member has it
    # final; the others go in ``sync_grads``.
    def syncs(s: int) -> bool:
        return len(plan.stages[s].devices) > 1 and modes.get(plan.stages[s].mode).syncs_grads \
            and comms[s].sync_bytes > 0

    def n_early(s: int) -> int:
        return sum(1 for bk in comms[s].sync_buckets if bk.blocks_left > 0)

    bk_ready: dict[tuple[int, int], int] = {}  # (stage, bucket): members that have it final
    bk_next: dict[int, int] = {}  # per stage: the next early bucket to launch
    bk_busy: set[int] = set()  # stages with an early bucket's all-reduce running
    early_waiters: dict[int, list] = {}

    def early_done(s: int) -> bool:
        return bk_next.get(s, 0) >= n_early(s) and s not in bk_busy

    def launch_bucket(s: int) -> None:
        """Start the stage's next early bucket if every member has it final and the one
        before it is summed; when none is left, wake ``sync_grads``."""
        if s in bk_busy:
            return
        k = bk_next.get(s, 0)
        if k >= n_early(s):
            for fn in early_waiters.pop(s, []):
                fn()
            return
        names = list(plan.stages[s].devices)
        if bk_ready.get((s, k), 0) < len(names):
            return
        bk_busy.add(s)
        t0 = now

        def done() -> None:
            if now > t0:  # a bucket of frozen units only sends nothing
                for x in names:
                    segments.append(Segment(x, t0, now, "sync_grads:lead", "comm"))
            bk_busy.discard(s)
            bk_next[s] = k + 1
            launch_bucket(s)

        ring(names, comms[s].sync_buckets[k].nbytes, done)

    def bucket_final(s: int, k: int) -> None:
        bk_ready[(s, k)] = bk_ready.get((s, k), 0) + 1
        launch_bucket(s)

    def last_bwd(rk: _Rank, s: int, mb: int, dur: float) -> None:
        """A member starts its last backward: each early bucket is final once the backward
        of its lowest block is done (``DeviceWork.bwd_left_s`` before the op's end)."""
        if mb == M - 1 and syncs(s):
            left = work[rk.device].bwd_left_s
            for k in range(n_early(s)):
                at(now + max(0.0, dur - left[comms[s].sync_buckets[k].blocks_left]),
                   lambda k=k: bucket_final(s, k))
            bk_next.setdefault(s, 0)

    # Group operations (tp/sp fwd and bwd, sync_grads): members arrive, then run together.
    arrivals: dict[tuple[int, str, int], list[_Rank]] = {}

    def group_op(rk: _Rank, op: Op) -> bool:
        s = roles[rk.rank].stage
        key = (s, op.kind, op.mb)
        members = arrivals.setdefault(key, [])
        members.append(rk)
        rk.blocked = True
        if len(members) < len(plan.stages[s].devices):
            return True
        gc = comms[s]
        names = list(plan.stages[s].devices)
        n = len(names)
        if op.kind == "sync_grads":
            # the early buckets ran beside the backward; wait for them, then the compression
            # of the gradients (PowerSGD: ``cost.model.sync_codec_s``, each member busy for
            # its own; the slowest decides), then the other buckets' all-reduces in turn
            codec = {m.device: sync_codec_s(gc, profile, work[m.device].slow) for m in members}
            # no last backward ran (an op list without one): every bucket goes now
            late = gc.sync_buckets[n_early(s):] if s in bk_next else gc.sync_buckets

            def late_buckets() -> None:
                if max(codec.values()) > 0:
                    for m in members:
                        segments.append(Segment(m.device, now, now + codec[m.device], f"{op}:compress", "compute"))
                        m.busy_s += codec[m.device]
                    at(now + max(codec.values()), lambda: late_ring(0))
                else:
                    late_ring(0)

            def late_ring(i: int) -> None:
                if i == len(late):
                    for m in members:
                        m.blocked = False
                        m.free_at = max(m.free_at, now)
                        m.pc += 1
                    del arrivals[key]
                    return
                t0 = now

                def done() -> None:
                    if now > t0:
                        for x in names:
                            segments.append(Segment(x, t0, now, f"{op}:comm", "comm"))
                    late_ring(i + 1)

                ring(names, late[i].nbytes, done)

            if s in bk_next and not early_done(s):
                early_waiters.setdefault(s, []).append(late_buckets)
            else:
                late_buckets()
            return True
        else:
            dur = {m.device: (work[m.device].blocks_fwd_s if op.kind == "fwd" else work[m.device].blocks_bwd_s)
                   for m in members}
            for m in members:
                if op.kind == "fwd":
                    m.inflight += 1
                    bump_mem(m)
                else:
                    bump_mem(m, work[m.device].recompute_bytes)
                    last_bwd(m, s, op.mb, dur[m.device])
                if dur[m.device] > 0:
                    segments.append(Segment(m.device, now, now + dur[m.device], str(op), "compute"))
                    m.busy_s += dur[m.device]
            if op.kind == "fwd":
                steps, sizes = gc.coll_steps, gc.coll_send_bytes
            else:
                steps, sizes = gc.coll_steps_bwd, gc.coll_send_bytes_bwd
            start_comm = now + max(dur.values())
        lat = net.lat(names)
        pending = [n]

        def finish() -> None:
            for m in members:
                if op.kind == "bwd":
                    m.inflight -= 1
                m.blocked = False
                m.free_at = max(m.free_at, now)
                m.pc += 1
            del arrivals[key]

        def edge_done() -> None:
            pending[0] -= 1
            if pending[0] == 0:
                for x in names:
                    segments.append(Segment(x, start_comm, now, f"{op}:comm", "comm"))
                finish()

        def start() -> None:
            coll = object()
            for i, x in enumerate(names):
                netsim.add(x, names[(i + 1) % n], sizes[x], now, edge_done, delay_s=steps * lat, group=coll)

        if n < 2 or sum(sizes.values()) <= 0:
            at(start_comm, finish)
        else:
            at(start_comm, start)
        return True

    def step_rank(rk: _Rank) -> bool:
        """Start rk's next op if it can; True if it made progress."""
        if rk.done or rk.blocked or rk.free_at > now + _EPS:
            return False
        if rk.pc >= len(rk.ops):
            rk.done = True
            return True
        op = rk.ops[rk.pc]
        role = roles[rk.rank]
        w = work[rk.device]
        s, mb = role.stage, op.mb
        grouped = len(role.group) > 1 and modes.get(role.mode).group_ops
        if op.kind in ("fwd", "bwd") and grouped or op.kind == "sync_grads":
            return group_op(rk, op)
        if op.kind == "embed":
            compute(rk, w.embed_fwd_s, str(op), then=lambda: launch(0, False, mb, rk.device))
        elif op.kind == "recv_act":
            if not has_all(s, False, mb, rk.device):
                return False
        elif op.kind == "fwd":
            rk.inflight += 1
            bump_mem(rk)
            compute(rk, w.blocks_fwd_s, str(op))
        elif op.kind == "send_act":
            launch(s + 1, False, mb, rk.device)
        elif op.kind == "head":
            if not has_all(S, False, mb, rk.device):
                return False
            bump_mem(rk, w.transient_bytes)
            compute(rk, w.head_s, str(op), then=lambda: launch(S, True, mb, rk.device))
        elif op.kind == "recv_grad":
            if not has_all(s + 1, True, mb, rk.device):
                return False
        elif op.kind == "bwd":
            bump_mem(rk, w.recompute_bytes)  # a recomputing stage rebuilds one block's activations at a time
            last_bwd(rk, s, mb, w.blocks_bwd_s)
            compute(rk, w.blocks_bwd_s, str(op))
            rk.inflight -= 1
        elif op.kind == "send_grad":
            launch(s, True, mb, rk.device)
        elif op.kind == "embed_bwd":
            if not has_all(0, True, mb, rk.device):
                return False
            compute(rk, w.embed_bwd_s, str(op))
        elif op.kind == "optim":
            compute(rk, w.optim_s, str(op))
        else:  # pragma: no cover - lower() emits only the kinds above
            raise PlanError(f"simulator does not know op {op}")
        rk.pc += 1
        return True

    guard = 0
    while True:
        progress = True
        while progress:
            progress = False
            for rk in ranks:
                while step_rank(rk):
                    progress = True
        if all(rk.done for rk in ranks):
            break
        netsim.allocate(now)
        t_next = heap[0][0] if heap else float("inf")
        t_next = min(t_next, netsim.next_event(now),
                     min((rk.free_at for rk in ranks if not rk.done and not rk.blocked and rk.free_at > now + _EPS),
                         default=float("inf")))
        if t_next == float("inf"):
            stuck = [f"rank {rk.rank} at {rk.ops[rk.pc]}" for rk in ranks if not rk.done]
            raise PlanError(f"simulation deadlocked: {', '.join(stuck[:4])}")
        finished = netsim.advance(now, t_next)
        now = t_next  # before the callbacks: what they start or record happens at t_next
        for f in finished:
            f.on_done()
        while heap and heap[0][0] <= now + _EPS:
            _, _, fn = heapq.heappop(heap)
            fn()
        guard += 1
        if guard > 10_000_000:  # pragma: no cover - internal invariant
            raise PlanError("simulation did not finish")

    step = max((rk.free_at for rk in ranks), default=0.0)
    step = max(step, max((sg.end_s for sg in segments), default=0.0))
    backup = backup_cost(plan, work, net, profile.backup_every, step_s=step, busy_s=netsim.busy_s)
    step += backup.time_s
    traces = {}
    for rk in ranks:
        dev = devs[rk.device]
        kind = catalog.get(dev.kind)
        pm = kind.power_mode(power_mode_of(plan, dev))
        moved = netsim.moved.get(rk.device, 0.0) + backup.bytes_moved.get(rk.device, 0.0)
        finish = max([sg.end_s for sg in segments if sg.device == rk.device] + [rk.free_at])
        traces[rk.device] = DeviceTrace(
            name=rk.device, power_mode=pm.name, finish_s=finish, busy_s=rk.busy_s, idle_s=step - rk.busy_s,
            peak_memory_bytes=rk.mem_peak, bytes_moved=moved,
            **EnergyParts.of(busy_w=pm.busy_w, idle_w=pm.idle_w, radio_j_per_mb=kind.radio_j_per_mb, wall_s=step,
                             busy_s=rk.busy_s, radio_bytes=moved))
    segments.sort(key=lambda sg: (sg.device, sg.start_s))
    return SimResult(plan_id=plan.plan_id, step_time_s=step, devices=traces, segments=tuple(segments),
                     num_flows=netsim.count, network_busy_s=netsim.busy_s)


def _sig(x: float) -> float:
    """``x`` to 4 significant digits: a readable plan, and the same order for costs that
    differ in float noise."""
    return float(f"{x:.4g}")


def costed_times(plan: Plan, pool: PoolSpec, profile: ModelProfile, shape: Shape, *,
                 network: Network | None = None) -> PassTimes:
    """The plan's own per-micro-batch durations (``cost.model.estimate``): each stage's
    forward and backward with its group's collectives (stage 0's without the head), the
    owners' head, and each pipelined boundary's transfer (0 where it runs inside stage
    0's own work)."""
    c = estimate(plan, pool, profile, shape, network=network)
    work = device_work(plan, pool, profile, shape)
    head = max(work[n].head_s for n in plan.stages[0].devices)
    S = len(plan.stages)
    link = [0.0] * (S + 1)
    for lk in c.links:
        if not lk.in_stage:
            link[lk.k] = max(lk.fwd_s, lk.bwd_s)
    return PassTimes(fwd_s=tuple(_sig(sc.fwd_s) for sc in c.stages),
                     bwd_s=tuple(_sig(sc.bwd_s - (head if s == 0 else 0.0)) for s, sc in enumerate(c.stages)),
                     head_s=_sig(head), link_s=tuple(_sig(x) for x in link))


def best_order(plan: Plan, pool: PoolSpec, profile: ModelProfile, shape: Shape, *,
               network: Network | None = None) -> tuple[Plan, SimResult]:
    """``plan`` with the shorter of its two 1F1B pass orders (``sim.lower.timeline``),
    and its simulation: laid out with unit durations (no ``pass_times``) or with the
    plan's costs (``costed_times``). A tie keeps unit durations (and the plan's id).
    GPipe plans and single stages have one order and come back as they are."""
    plan = plan.model_copy(update={"pass_times": None}) if plan.pass_times is not None else plan
    res = simulate(plan, pool, profile, shape, network=network)
    if plan.schedule != "1f1b" or len(plan.stages) < 2 or plan.num_microbatches < 2:
        return plan, res
    timed = plan.model_copy(update={"pass_times": costed_times(plan, pool, profile, shape, network=network)})
    if lower(timed) == lower(plan):
        return plan, res
    res_t = simulate(timed, pool, profile, shape, network=network)
    if res_t.step_time_s < res.step_time_s * (1 - 1e-9):
        return timed, res_t
    return plan, res
