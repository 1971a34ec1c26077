"""``lower(plan)``: the op sequence each rank runs in one step.

The simulator executes these ops; the runtime executes the same ops and names its
timing events after them, so estimate, simulation and measurement line up op by op.

Op kinds, per micro-batch ``mb``:

- ``recv_act`` / ``send_act``: activations (and labels) from the previous stage / to
  the next one;
- ``fwd`` / ``bwd``: the stage's forward / backward over its layers, including the
  group's own collectives (tp all-reduces, sp K/V all-gathers);
- ``recv_grad`` / ``send_grad``: activation gradients from the next stage / to the
  previous one;
- ``embed`` / ``embed_bwd`` (data owners only): embed the device's own samples and send
  them into stage 0; later take their gradient back and finish the backward;
- ``head`` (data owners only): receive the last stage's output for the device's own
  samples, compute head, loss and its backward with the device's own labels, and send
  the gradient back. Raw data (token ids and labels) never leaves its device; see
  ``specs.layout.Layout``.

and once per step ``sync_grads`` (all-reduce of replicated gradients inside a group
whose mode syncs them: dp, sp; ``Mode.syncs_grads``) then ``optim``.

Schedules (S stages, M micro-batches, stage s; ``pass_sequence``):

- ``gpipe``: all M forwards, then all M backwards, in micro-batch order.
- ``1f1b`` (Narayanan et al., PipeDream-Flush): ``L = S - s + 1`` forwards to warm up
  (the data owners' head counted as a stage after the last; ``specs.plan.inflight_limit``),
  then one backward and one forward in turn, so at most L micro-batches are in flight on
  stage s instead of M.

The data owners sit on stage 0, so the head of micro-batch i (after the last stage's
forward of i, before its backward) is one more pass on stage 0, and a priority one:
``timeline`` runs the whole pipeline once and, under 1F1B, puts each head before stage
0's next forward or backward as soon as its micro-batch can be back, so the last stage
gets its gradient without waiting behind stage 0's own work. (Before, every stage took
a ready backward first: the last stage ran its backwards back to back, then waited for
a head that stage 0 ran only after its own backwards; 2 stages measured 14% slower than
torch's Schedule1F1B on the same split.) Where the
head lands depends on the durations: unit ones (F 1, B 2, H 1) unless the plan carries
its own (``Plan.pass_times``, which ``sim.engine.best_order`` writes when they give a
shorter step). An owner's ``embed`` comes just before stage 0's forward of i.

Sends are asynchronous and receives blocking in the runtime (every receive is posted at
the step's start); every order ``timeline`` gives is deadlock-free under that rule (its
docstring has the argument).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

from edgepool import modes
from edgepool.specs.plan import Plan, inflight_limit, role_of

OpKind = Literal[
    "embed", "recv_act", "fwd", "send_act", "head", "recv_grad", "bwd", "send_grad", "embed_bwd", "sync_grads", "optim"
]


@dataclass(frozen=True)
class Op:
    kind: OpKind
    mb: int = -1  # micro-batch index; -1 for per-step ops

    def __str__(self) -> str:
        return self.kind if self.mb < 0 else f"{self.kind}[{self.mb}]"


Times = tuple[tuple[float, ...], tuple[float, ...], float, tuple[float, ...]]  # ``PassTimes.as_key``


def _unit_times(num_stages: int) -> Times:
    """Unit durations (F 1, B 2, H 1, transfers free): the order when the plan carries none."""
    return (1.0,) * num_stages, (2.0,) * num_stages, 1.0, (0.0,) * (num_stages + 1)


def pass_sequence(num_stages: int, stage: int, num_microbatches: int, schedule: str) -> list[tuple[str, int]]:
    """Stage ``stage``'s forward and backward passes in order, without the heads.

    ``gpipe``: all forwards, then all backwards. ``1f1b`` (PipeDream-Flush): ``L =
    inflight_limit`` forwards to warm up, then one backward and one forward in turn,
    then the remaining backwards."""
    M = num_microbatches
    if schedule == "gpipe":
        return [("F", i) for i in range(M)] + [("B", i) for i in range(M)]
    L = inflight_limit(num_stages, stage, M, schedule)
    out = [("F", i) for i in range(L)]
    for i in range(M - L):
        out += [("B", i), ("F", L + i)]
    return out + [("B", i) for i in range(M - L, M)]


@lru_cache(maxsize=256)
def timeline(num_stages: int, num_microbatches: int, schedule: str,
             times: Times | None = None) -> tuple[tuple[tuple[str, int, float, float], ...], ...]:
    """Every stage's passes as ``(kind, mb, start, end)``, from one run of the whole
    pipeline with durations ``times`` (``PassTimes.as_key``; None: unit durations).

    Dependencies: F(s, i) after F(s-1, i); H(i) after F(S-1, i); B(S-1, i) after H(i);
    B(s, i) after B(s+1, i); each plus the boundary's transfer. Every stage runs its
    forwards and backwards in the fixed order of ``pass_sequence``, each as soon as its
    input is there. The heads (stage 0's data owners) are priority passes: with
    ``1f1b``, when stage 0 is free and a head's input is there, the head runs before
    stage 0's next forward or backward, so the last stage gets its gradient back as soon
    as the owners can turn it round; with ``gpipe`` the heads wait for stage 0's
    forwards (all of them come first).

    The runtime executes these orders with blocking receives and asynchronous sends
    (every receive is posted at the step's start, ``runtime.wire.Wire.post``), and that
    is deadlock-free whatever the durations: the orders are read off one valid execution
    in which every pass starts after its inputs were sent, so by induction on that
    execution's start times every pass's input is sent before any rank waits on it. A
    send never waits for its receiver (``isend``, completed at the step's end, its
    receive already posted), and the members of a group share their stage's order, so
    they reach their collectives in the same sequence.
    """
    S, M = num_stages, num_microbatches
    fwd, bwd, head, link = times or _unit_times(S)
    seqs = [pass_sequence(S, s, M, schedule) for s in range(S)]
    pc = [0] * S
    num_heads = 0
    done: dict[tuple[str, int, int], float] = {}  # end time of each pass
    free = [0.0] * S
    out: list[list[tuple[str, int, float, float]]] = [[] for _ in range(S)]
    inf = float("inf")

    def ready_at(kind: str, s: int, i: int) -> float:
        if kind == "F":
            return 0.0 if s == 0 else done.get(("F", s - 1, i), inf) + link[s]
        if kind == "H":
            return done.get(("F", S - 1, i), inf) + link[S]
        if s == S - 1:
            return done.get(("H", 0, i), inf) + link[S]
        return done.get(("B", s + 1, i), inf) + link[s + 1]

    def due(s: int) -> list[tuple[str, int, float]]:
        """Stage s's candidate passes: its next head (stage 0) and its next pass."""
        c = []
        if s == 0 and num_heads < M:
            c.append(("H", num_heads, ready_at("H", 0, num_heads)))
        if pc[s] < len(seqs[s]):
            k, i = seqs[s][pc[s]]
            c.append((k, i, ready_at(k, s, i)))
        return c

    t = 0.0
    while any(pc[s] < len(seqs[s]) for s in range(S)) or num_heads < M:
        eps = 1e-12 * max(1.0, t)
        for s in range(S):
            if free[s] > t + eps:
                continue
            now = [(k, i) for k, i, r in due(s) if r <= t + eps]
            if len(now) == 2 and schedule != "1f1b" and now[1][0] == "F":
                now = now[1:]  # gpipe: stage 0's forwards before any head
            if not now:
                continue
            k, i = now[0]  # a head first
            d = head if k == "H" else (fwd if k == "F" else bwd)[s]
            done[(k, 0 if k == "H" else s, i)] = free[s] = t + d
            out[s].append((k, i, t, t + d))
            if k == "H":
                num_heads += 1
            else:
                pc[s] += 1
        later = [x for x in free if x > t + eps] + [r for s in range(S) for _, _, r in due(s) if t + eps < r < inf]
        if not later:  # pragma: no cover - the sequences above always progress
            raise RuntimeError(f"schedule {schedule} with {S} stages and {M} micro-batches cannot progress")
        t = min(later)
    return tuple(tuple(o) for o in out)


@lru_cache(maxsize=256)
def stage_orders(num_stages: int, num_microbatches: int, schedule: str,
                 times: Times | None = None) -> tuple[tuple[tuple[str, int], ...], ...]:
    """The order of forward ('F'), head ('H', stage 0's data owners) and backward ('B')
    passes of every stage (``timeline`` without the times)."""
    return tuple(tuple((k, i) for k, i, _, _ in o) for o in timeline(num_stages, num_microbatches, schedule, times))


def compute_order(num_stages: int, stage: int, num_microbatches: int, schedule: str,
                  times: Times | None = None) -> list[tuple[str, int]]:
    """One stage's passes (see ``stage_orders``)."""
    return list(stage_orders(num_stages, num_microbatches, schedule, times)[stage])


def plan_times(plan: Plan) -> Times | None:
    """The durations ``plan`` lays out its order with: its ``pass_times`` (1F1B only)."""
    if plan.schedule != "1f1b" or plan.pass_times is None:
        return None
    return plan.pass_times.as_key()


def is_data_owner(plan: Plan, rank: int) -> bool:
    """Whether ``rank`` embeds and computes the loss on samples of its own: every
    first-stage device of a mode that owns data (dp, fsdp), else the group's first."""
    role = role_of(plan, rank)
    return role.is_first and (modes.get(role.mode).owns_data or role.index == 0)


def lower_rank(plan: Plan, rank: int, order: list[tuple[str, int]] | None = None) -> list[Op]:
    """Rank ``rank``'s ops for one step; ``order``: its stage's passes (a what-if: the
    simulator's tests compare an order), else ``compute_order`` with the plan's
    ``pass_times``."""
    role = role_of(plan, rank)
    owner = is_data_owner(plan, rank)
    ops: list[Op] = []
    if order is None:
        order = compute_order(role.num_stages, role.stage, plan.num_microbatches, plan.schedule, plan_times(plan))
    for kind, mb in order:
        if kind == "F":
            if owner:
                ops.append(Op("embed", mb))
            ops += [Op("recv_act", mb), Op("fwd", mb), Op("send_act", mb)]
        elif kind == "H":
            if owner:
                ops.append(Op("head", mb))
        else:
            ops += [Op("recv_grad", mb), Op("bwd", mb), Op("send_grad", mb)]
            if owner:
                ops.append(Op("embed_bwd", mb))
    if len(role.group) > 1 and modes.get(role.mode).syncs_grads:
        ops.append(Op("sync_grads"))
    ops.append(Op("optim"))
    return ops


def lower(plan: Plan) -> dict[int, list[Op]]:
    """Every rank's ops for one step."""
    return {r: lower_rank(plan, r) for r in range(plan.world_size)}
