"""The Plan: the one contract between planner, simulator, runtime and report.

A plan is a list of pipeline stages. Each stage is a contiguous range of Transformer
blocks ``[start, stop)`` served by a group of devices that split the stage's work in
one intra-stage mode:

- ``dp``: per-device batch shares of each micro-batch (may be uneven);
- ``tp``: per-device attention-head and FFN shares (Megatron-style, may be uneven);
- ``sp``: per-device sequence shares (may be uneven);
- ``fsdp``: per-device batch shares, parameters, gradients and optimizer state sharded.

Each mode is one module of ``edgepool.modes``; ``specs.layout`` resolves a plan's
shares into items, regions and transfers through them.

Pure DP/TP/SP is one stage over all devices, pure PP is S stages of one device, and
Asteroid-style hybrid is S stages with groups of different sizes. The embedding belongs
to the first stage, the final norm, head and loss to the last.

Invariants: a device serves exactly one stage; a device's rank is its position in the
stage order (stage 0's devices first). Shares are relative weights; ``split_counts``
turns them into whole samples, tokens, heads or FFN columns by largest remainder.

``plan_id`` is a short content hash of everything that changes execution (not the
estimate), so estimate, simulation and measurement of one plan can be joined.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, computed_field, model_serializer, model_validator

from edgepool.errors import PlanError
from edgepool.models.config import LIMITS
from edgepool.specs.values import MAX_DEVICES, MAX_MICROBATCHES, Count, Name, Real

Layer = Count(ge=0, le=LIMITS["num_layers"])

SCHEMA_VERSION = 1
# The plan schema's mode list; each mode lives in ``edgepool.modes.<name>``.
StageMode = Literal["dp", "tp", "sp", "fsdp"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StagePlan(_Strict):
    layers: tuple[Layer, Layer]
    mode: StageMode = "dp"
    devices: tuple[Name, ...] = Field(min_length=1, max_length=MAX_DEVICES)
    shares: tuple[Real(ge=0.0, le=1e6), ...] | None = None
    # Activation recomputation (``torch.utils.checkpoint``): the stage keeps each block's
    # input only and runs the block's forward again in the backward. Written only when
    # on, so a plan without it dumps, and hashes to its ``plan_id``, as before the field.
    recompute: bool = False

    @model_serializer(mode="wrap")
    def _without_defaults(self, handler):
        data = handler(self)
        if not self.recompute and isinstance(data, dict):
            data.pop("recompute", None)
        return data

    @model_validator(mode="after")
    def _check(self) -> "StagePlan":
        a, b = self.layers
        if not 0 <= a < b:
            raise ValueError(f"layers {list(self.layers)} must be [start, stop) with 0 <= start < stop")
        if self.shares is not None:
            if len(self.shares) != len(self.devices):
                raise ValueError(f"shares has {len(self.shares)} entries for {len(self.devices)} devices; give one share per device")
            if any(s <= 0 for s in self.shares):
                raise ValueError(f"shares {list(self.shares)} must all be > 0; leave a device out instead of giving it 0")
        return self

    @property
    def weights(self) -> tuple[float, ...]:
        return self.shares if self.shares is not None else tuple(1.0 for _ in self.devices)

    @property
    def num_layers(self) -> int:
        return self.layers[1] - self.layers[0]


class Estimate(_Strict):
    """What the planner or simulator predicted for one step, and from what."""

    step_time_s: float
    energy_j: float | None = None
    peak_memory_bytes: dict[str, int] = {}
    source: str = "cost-model"
    objective: str | None = None
    energy_source: str = "modelled"


Seconds = Real(ge=0.0, le=1e7)


class PassTimes(_Strict):
    """The per-micro-batch durations (seconds) a 1F1B pipeline's pass order is laid out
    with (``sim.lower.stage_orders``): each stage's forward and backward, the data
    owners' head (forward, loss and backward), and each boundary's one-way transfer
    (``link_s[k]``: into stage k; ``link_s[S]``: back to the owners). Only the order is
    read off them; the plan runs the same ops with any durations.
    ``sim.engine.best_order`` fills them from the plan's costs when they give a shorter
    step than unit durations."""

    fwd_s: tuple[Seconds, ...]
    bwd_s: tuple[Seconds, ...]
    head_s: Seconds
    link_s: tuple[Seconds, ...]

    def as_key(self) -> tuple:
        return (self.fwd_s, self.bwd_s, self.head_s, self.link_s)


class Plan(_Strict):
    schema_version: Literal[1] = SCHEMA_VERSION
    num_layers: Count(ge=1, le=LIMITS["num_layers"])
    stages: tuple[StagePlan, ...] = Field(min_length=1, max_length=MAX_DEVICES)
    num_microbatches: Count(ge=1, le=MAX_MICROBATCHES) = 1
    schedule: Literal["gpipe", "1f1b"] = "gpipe"
    power_modes: dict[Name, str] = {}
    # The durations the 1F1B pass order is laid out with (``PassTimes``); None: unit
    # durations. Written only when set, so a plan without it keeps its ``plan_id``.
    pass_times: PassTimes | None = None
    estimate: Estimate | None = None

    @model_serializer(mode="wrap")
    def _without_unset(self, handler):
        data = handler(self)
        if self.pass_times is None and isinstance(data, dict):
            data.pop("pass_times", None)
        return data

    @model_validator(mode="before")
    @classmethod
    def _drop_derived(cls, data: Any) -> Any:
        # plan_id and parallelism are derived; a dumped plan carries them, so accept
        # and recompute them (an edited plan gets a new id).
        if isinstance(data, dict):
            data = {k: v for k, v in data.items() if k not in ("plan_id", "parallelism")}
        return data

    @model_validator(mode="after")
    def _check(self) -> "Plan":
        expect = 0
        seen: set[str] = set()
        for i, st in enumerate(self.stages):
            if st.layers[0] != expect:
                raise ValueError(f"stages[{i}].layers starts at {st.layers[0]} but the previous stage ends at {expect}; stages must be contiguous")
            expect = st.layers[1]
            for d in st.devices:
                if d in seen:
                    raise ValueError(f"device {d!r} serves more than one stage; each device serves exactly one")
                seen.add(d)
        if len(seen) > MAX_DEVICES:
            raise ValueError(f"the plan uses {len(seen)} devices, more than edgepool's limit of {MAX_DEVICES}")
        if expect != self.num_layers:
            raise ValueError(f"stages cover layers [0, {expect}) but the model has {self.num_layers}; the last stage must end at {self.num_layers}")
        pt, S = self.pass_times, len(self.stages)
        if pt is not None and (len(pt.fwd_s), len(pt.bwd_s), len(pt.link_s)) != (S, S, S + 1):
            raise ValueError(f"pass_times has {len(pt.fwd_s)} forward, {len(pt.bwd_s)} backward and {len(pt.link_s)} "
                             f"link durations for {S} stages; give {S}, {S} and {S + 1}, or leave pass_times out")
        return self

    # -- derived -----------------------------------------------------------------
    @computed_field  # type: ignore[prop-decorator]
    @property
    def plan_id(self) -> str:
        body = self.model_dump(mode="json", exclude={"estimate", "plan_id", "parallelism"})
        digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
        return digest[:10]

    @computed_field  # type: ignore[prop-decorator]
    @property
    def parallelism(self) -> str:
        if len(self.stages) == 1:
            st = self.stages[0]
            return "single" if len(st.devices) == 1 else st.mode
        if all(len(st.devices) == 1 for st in self.stages):
            return "pp"
        return "hybrid"

    @property
    def devices(self) -> list[str]:
        """Devices in rank order."""
        return [d for st in self.stages for d in st.devices]

    @property
    def world_size(self) -> int:
        return len(self.devices)

    def with_estimate(self, estimate: Estimate) -> "Plan":
        return self.model_copy(update={"estimate": estimate})

    def dumps(self) -> str:
        return self.model_dump_json(indent=2)


def load_plan(path) -> Plan:
    from edgepool.specs.files import load

    return load(Plan, path, "plan")


def split_counts(total: int, weights: tuple[float, ...] | list[float]) -> tuple[int, ...]:
    """Split ``total`` whole items in proportion to ``weights`` (largest remainder).

    Ties in the remainder go to the earlier device, so the result is deterministic.
    """
    s = float(sum(weights))
    raw = [total * w / s for w in weights]
    base = [int(x) for x in raw]
    left = total - sum(base)
    order = sorted(range(len(raw)), key=lambda i: (-(raw[i] - base[i]), i))
    for i in order[:left]:
        base[i] += 1
    return tuple(base)


def offsets(counts: tuple[int, ...]) -> tuple[int, ...]:
    out, acc = [], 0
    for c in counts:
        out.append(acc)
        acc += c
    return tuple(out)


# -- shapes a plan needs from the job and the model ----------------------------------
@dataclass(frozen=True)
class Shape:
    """The numbers that turn shares into whole items."""

    global_batch: int
    seq_len: int
    num_heads: int
    ffn: int
    num_kv_heads: int | None = None


@dataclass(frozen=True)
class StageSplit:
    """A stage's shares resolved into whole items, one entry per device."""

    batch: tuple[int, ...]  # samples of each micro-batch (dp), else the full micro-batch
    seq: tuple[int, ...]  # tokens of each sequence (sp), else the full sequence
    heads: tuple[int, ...]  # attention heads (tp), else all heads
    ffn: tuple[int, ...]  # FFN columns (tp), else all


def inflight_limit(num_stages: int, stage: int, num_microbatches: int, schedule: str) -> int:
    """Most micro-batches whose activations a stage keeps at once (``sim.lower``).

    GPipe: all M. 1F1B (PipeDream-Flush): one per stage from this one to the end, where
    the data owners' head on stage 0 counts as one more stage after the last (with two
    or more stages every micro-batch goes back to the owners before its backward; with
    one, the head runs inside stage 0's own pass).
    """
    S, M = num_stages, num_microbatches
    if schedule == "gpipe":
        return M
    return min(S - stage + (1 if S > 1 else 0), M)


def microbatch_size(plan: Plan, shape: Shape) -> int:
    if shape.global_batch % plan.num_microbatches:
        raise PlanError(
            f"global_batch {shape.global_batch} is not divisible by num_microbatches {plan.num_microbatches}; "
            "pick a divisor of the global batch"
        )
    return shape.global_batch // plan.num_microbatches


# -- roles and regions: pure functions shared by runtime and simulator ---------------
@dataclass(frozen=True)
class Role:
    rank: int
    device: str
    stage: int
    num_stages: int
    mode: StageMode
    group: tuple[int, ...]  # ranks of this stage's group, in group order
    index: int  # position in the group
    prev_group: tuple[int, ...]  # ranks of the previous stage (empty on the first)
    next_group: tuple[int, ...]  # ranks of the next stage (empty on the last)

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.num_stages - 1


def stage_ranks(plan: Plan) -> list[tuple[int, ...]]:
    out, r = [], 0
    for st in plan.stages:
        out.append(tuple(range(r, r + len(st.devices))))
        r += len(st.devices)
    return out


def role_of(plan: Plan, rank: int) -> Role:
    groups = stage_ranks(plan)
    for s, g in enumerate(groups):
        if rank in g:
            return Role(
                rank=rank,
                device=plan.devices[rank],
                stage=s,
                num_stages=len(groups),
                mode=plan.stages[s].mode,
                group=g,
                index=g.index(rank),
                prev_group=groups[s - 1] if s > 0 else (),
                next_group=groups[s + 1] if s + 1 < len(groups) else (),
            )
    raise PlanError(f"rank {rank} is outside the plan's {plan.world_size} ranks")


Region = tuple[int, int, int, int]  # (batch start, batch stop, token start, token stop) in a micro-batch


@dataclass(frozen=True)
class Transfer:
    src: int  # sending rank
    dst: int  # receiving rank
    region: Region  # in micro-batch coordinates


EMPTY: Region = (0, 0, 0, 0)


def transfers(have: list[Region], have_replicated: bool, need: list[Region]) -> list[tuple[int, int, Region]]:
    """Who sends which part of a tensor to whom between two groups.

    ``have[i]`` is what sender i holds, ``need[j]`` what receiver j needs. When the
    senders hold replicas (a tp group), receiver j takes everything from sender
    ``j % len(have)``, spreading the load; otherwise each receiver takes the
    intersection of its need with every sender's part. Returns (sender index,
    receiver index, region) triples.
    """
    out = []
    for j, (nb0, nb1, nt0, nt1) in enumerate(need):
        srcs = [j % len(have)] if have_replicated else range(len(have))
        for i in srcs:
            hb0, hb1, ht0, ht1 = have[i]
            b0, b1, t0, t1 = max(nb0, hb0), min(nb1, hb1), max(nt0, ht0), min(nt1, ht1)
            if b0 < b1 and t0 < t1:
                out.append((i, j, (b0, b1, t0, t1)))
    return out
