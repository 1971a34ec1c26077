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
  ``specs.plan.owner_regions`` and ``specs.plan.boundary``.

and once per step ``sync_grads`` (all-reduce of replicated gradients inside a dp or sp
group) then ``optim``.

Schedules (S stages, M micro-batches, stage s):

- ``gpipe``: all M forwards, then all M backwards, in micro-batch order.
- ``1f1b``: ``w = min(S - s - 1, M)`` warm-up forwards, then M - w pairs of one forward
  and one backward, then w cool-down backwards (Narayanan et al., PipeDream-Flush). At
  most ``w + 1`` micro-batches' activations are alive at once, instead of M.

A data owner sits on stage 0, so its ``head`` of micro-batch i is placed just before
stage 0's backward of i (which waits on it through the whole pipeline), and its
``embed`` just before stage 0's forward of i.

Sends are asynchronous and receives blocking in the runtime; both schedules are
deadlock-free under that rule because every stage consumes micro-batches in the order
its neighbour produces them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from edgepool.specs.plan import Plan, role_of

OpKind = Literal[
    "embed", "recv_act", "fwd", "send_act", "head", "recv_grad", "bwd", "send_grad", "embed_bwd", "sync_grads", "optim"
]


@dataclass(frozen=True)
class Op:
    kind: OpKind
    mb: int = -1  # micro-batch index; -1 for per-step ops

    def __str__(self) -> str:
        return self.kind if self.mb < 0 else f"{self.kind}[{self.mb}]"


def compute_order(num_stages: int, stage: int, num_microbatches: int, schedule: str) -> list[tuple[str, int]]:
    """The order of forward ('F') and backward ('B') passes of one stage."""
    m = num_microbatches
    if schedule == "gpipe":
        return [("F", i) for i in range(m)] + [("B", i) for i in range(m)]
    warm = min(num_stages - stage - 1, m)
    order = [("F", i) for i in range(warm)]
    for i in range(m - warm):
        order += [("F", warm + i), ("B", i)]
    order += [("B", i) for i in range(m - warm, m)]
    return order


def is_data_owner(plan: Plan, rank: int) -> bool:
    role = role_of(plan, rank)
    return role.is_first and (role.mode == "dp" or role.index == 0)


def lower_rank(plan: Plan, rank: int) -> list[Op]:
    role = role_of(plan, rank)
    owner = is_data_owner(plan, rank)
    ops: list[Op] = []
    for kind, mb in compute_order(role.num_stages, role.stage, plan.num_microbatches, plan.schedule):
        if kind == "F":
            if owner:
                ops.append(Op("embed", mb))
            ops += [Op("recv_act", mb), Op("fwd", mb), Op("send_act", mb)]
        else:
            if owner:
                ops.append(Op("head", mb))
            ops += [Op("recv_grad", mb), Op("bwd", mb), Op("send_grad", mb)]
            if owner:
                ops.append(Op("embed_bwd", mb))
    if len(role.group) > 1 and role.mode in ("dp", "sp"):
        ops.append(Op("sync_grads"))
    ops.append(Op("optim"))
    return ops


def lower(plan: Plan) -> dict[int, list[Op]]:
    """Every rank's ops for one step."""
    return {r: lower_rank(plan, r) for r in range(plan.world_size)}
