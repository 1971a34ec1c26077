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

Schedules (S stages, M micro-batches, stage s):

- ``gpipe``: all M forwards, then all M backwards, in micro-batch order.
- ``1f1b``: backward first when one is ready, and at most ``S - s + 1`` micro-batches
  in flight on stage s (Narayanan et al., PipeDream-Flush, with the data owners' head
  counted as a stage after the last; ``specs.plan.inflight_limit``) instead of M. With
  ``S - s``, every micro-batch's round trip through the owners' head left stage 0
  waiting, and 1F1B pipelines on a fast link ran slower (figures in the commit).

The data owners sit on stage 0, so the head of micro-batch i (after the last stage's
forward of i, before its backward) is one more pass on stage 0. ``stage_orders`` lays
out all passes by list-scheduling the whole pipeline once, so each head runs as soon as
its micro-batch arrives (placing it just before stage 0's own backward would make
every micro-batch's backward cross the pipeline alone). An owner's ``embed`` comes just
before stage 0's forward of i.

Sends are asynchronous and receives blocking in the runtime; both schedules are
deadlock-free under that rule because every stage consumes micro-batches in the order
its neighbour produces them.
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


_DURATION = {"F": 1.0, "H": 1.0, "B": 2.0}  # unit costs that only set the order


@lru_cache(maxsize=256)
def stage_orders(num_stages: int, num_microbatches: int, schedule: str) -> tuple[tuple[tuple[str, int], ...], ...]:
    """The order of forward ('F'), head ('H', stage 0's data owners) and backward ('B')
    passes of every stage, from one list-scheduled run of the whole pipeline.

    Dependencies: F(s, i) after F(s-1, i); H(i) after F(S-1, i); B(S-1, i) after H(i);
    B(s, i) after B(s+1, i). Each stage takes its micro-batches in order and, when
    idle, starts the ready pass of highest priority:

    - ``1f1b``: B, then H, then F while fewer than ``inflight_limit`` micro-batches are
      in flight;
    - ``gpipe``: F, then H, then B (all forwards first).

    Unit durations (F 1, H 1, B 2) only decide the order. Because every stage's order
    is read off one valid execution, the orders are deadlock-free together under
    blocking receives and asynchronous sends. The heads run as soon as their
    micro-batch leaves the last stage, so backward passes of successive micro-batches
    overlap across stages.
    """
    S, M = num_stages, num_microbatches
    nxt = {"F": [0] * S, "B": [0] * S, "H": 0}
    done: dict[tuple[str, int, int], float] = {}
    free = [0.0] * S
    orders: list[list[tuple[str, int]]] = [[] for _ in range(S)]
    total = M * (2 * S + 1)
    t = 0.0

    def ready(kind: str, s: int) -> int | None:
        i = nxt["H"] if kind == "H" else nxt[kind][s]
        if i >= M:
            return None
        if kind == "F":
            dep = ("F", s - 1, i) if s > 0 else None
            if schedule == "1f1b" and nxt["F"][s] - nxt["B"][s] >= inflight_limit(S, s, M, schedule):
                return None
        elif kind == "H":
            dep = ("F", S - 1, i)
        else:
            dep = ("H", 0, i) if s == S - 1 else ("B", s + 1, i)
        if dep is not None and done.get(dep, float("inf")) > t:
            return None
        return i

    priority = ("B", "H", "F") if schedule == "1f1b" else ("F", "H", "B")
    while len(done) < total:
        progressed = False
        for s in range(S):
            if free[s] > t:
                continue
            for kind in priority:
                if kind == "H" and s != 0:
                    continue
                i = ready(kind, s)
                if i is None:
                    continue
                done[(kind, 0 if kind == "H" else s, i)] = t + _DURATION[kind]
                free[s] = t + _DURATION[kind]
                orders[s].append((kind, i))
                if kind == "H":
                    nxt["H"] += 1
                else:
                    nxt[kind][s] += 1
                progressed = True
                break
        pending = [v for v in list(done.values()) + free if v > t]
        if not pending:
            if not progressed:
                raise RuntimeError(f"schedule {schedule} with {S} stages and {M} micro-batches cannot progress")
            continue
        t = min(pending)
    return tuple(tuple(o) for o in orders)


def compute_order(num_stages: int, stage: int, num_microbatches: int, schedule: str) -> list[tuple[str, int]]:
    """One stage's passes (see ``stage_orders``)."""
    return list(stage_orders(num_stages, num_microbatches, schedule)[stage])


def is_data_owner(plan: Plan, rank: int) -> bool:
    """Whether ``rank`` embeds and computes the loss on samples of its own: every
    first-stage device of a mode that owns data (dp, fsdp), else the group's first."""
    role = role_of(plan, rank)
    return role.is_first and (modes.get(role.mode).owns_data or role.index == 0)


def lower_rank(plan: Plan, rank: int) -> list[Op]:
    role = role_of(plan, rank)
    owner = is_data_owner(plan, rank)
    ops: list[Op] = []
    for kind, mb in compute_order(role.num_stages, role.stage, plan.num_microbatches, plan.schedule):
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
