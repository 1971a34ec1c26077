"""Resharding: which state pieces of one plan make up each rank's state under another.

A rank's state is a set of tensors in full-model names: ``model/<name>`` for every
parameter of its stage parts, ``optim/<name>/<key>`` for the optimizer state of each
(AdamW's ``exp_avg``, ``exp_avg_sq``, ``step``). Where its stage's mode cuts a tensor
(tp: heads and FFN columns, fsdp: dim-0 chunks) it holds the slice the mode's
``shard_of`` names; everywhere else the whole tensor. An optimizer tensor is cut like
its parameter, except scalars (``step``), which every holder keeps whole.

``reshard(old_plan, new_plan, holders, shapes=..., shape=...)`` is a pure function of
descriptions, with no tensors and no torch: given who holds a copy of which old rank's
state (a checkpoint's rank files; survivors and the replicas they keep for a
neighbour), it says for every rank of the new plan which slice of which held piece
fills which slice of each of its tensors (``Move``), or that a part is held by nobody
(``Reshard.missing``). Layers that move between stages, and tp and fsdp shards cut
anew, are the same case: boxes in the full tensor intersected. Every party computes the
same moves, so a holder knows what to send and a receiver what to wait for.

``assemble`` applies the moves of one new rank to held tensors (torch is imported
then). ``torch.distributed.checkpoint`` reshards FSDP/DTensor state between world
sizes, but not a model whose layers move between pipeline stages with tp and fsdp
shards inside stages of uneven shares; here both are one box intersection, and the
same description drives the resume from files and the in-memory recovery.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Hashable, Iterable, Mapping

from edgepool import modes
from edgepool.errors import PlanError
from edgepool.specs.layout import Layout
from edgepool.specs.plan import Plan, Shape, role_of

Spec = tuple[int, int, int] | None  # (dim, start, stop) in the full tensor, None: whole
Box = tuple[tuple[int, int], ...]  # [start, stop) per dimension


def part_of(name: str) -> str | int:
    """The model part a tensor belongs to: ``"embed"``, ``"head"`` or a block's layer index."""
    head, _, rest = name.partition(".")
    if head == "blocks":
        return int(rest.split(".", 1)[0])
    return head


def holdings(plan: Plan, rank: int, shapes: Mapping[str, tuple[int, ...]], shape: Shape,
             layout: Layout | None = None) -> dict[str, Spec]:
    """The parameters ``rank`` holds under ``plan`` and where each sits in the full tensor.

    ``shapes``: every parameter's full shape (``full_shapes``); ``layout``: the plan's
    ``Layout`` when the caller has it."""
    from edgepool.sim.lower import is_data_owner

    role = role_of(plan, rank)
    st = plan.stages[role.stage]
    owner = is_data_owner(plan, rank)
    mode = modes.get(st.mode)
    split = (layout or Layout.of(plan, shape)).splits[role.stage] if len(st.devices) > 1 else None
    a, b = st.layers
    out: dict[str, Spec] = {}
    for name, full in shapes.items():
        part = part_of(name)
        mine = owner if isinstance(part, str) else a <= part < b
        if mine:
            out[name] = mode.shard_of(name, tuple(full), split, role.index, shape) if split is not None else None
    return out


def box(spec: Spec, full: tuple[int, ...]) -> Box:
    dims = [(0, n) for n in full]
    if spec is not None:
        dim, a, b = spec
        dims[dim] = (a, b)
    return tuple(dims)


@dataclass(frozen=True)
class Move:
    """Fill ``dst`` (local coordinates of the new rank's tensor) of parameter ``name`` and
    its optimizer state from ``src`` (local coordinates of the piece old rank
    ``old_rank`` held) as kept by ``holder``."""

    name: str
    holder: Hashable
    old_rank: int
    src: Box
    dst: Box


@dataclass
class Reshard:
    moves: dict[int, list[Move]] = field(default_factory=dict)  # new rank -> its moves
    wanted: dict[int, dict[str, Spec]] = field(default_factory=dict)  # new rank -> what it holds under the new plan
    missing: list[tuple[int, str]] = field(default_factory=list)  # (new rank, parameter) that nobody holds


def _local(b: Box, within: Box) -> Box:
    return tuple((x0 - w0, x1 - w0) for (x0, x1), (w0, _) in zip(b, within))


def _covers(outer: Box, inner: Box) -> bool:
    return all(o0 <= i0 and i1 <= o1 for (o0, o1), (i0, i1) in zip(outer, inner))


def reshard(old_plan: Plan, new_plan: Plan, holders: Mapping[Hashable, Iterable[int]], *,
            shapes: Mapping[str, tuple[int, ...]], shape: Shape,
            prefer: Callable[[int, Hashable], bool] | None = None) -> Reshard:
    """The moves that give every rank of ``new_plan`` its state from pieces of ``old_plan``.

    ``holders``: who keeps a whole copy of which old ranks' state (``{"file-0": [0]}``
    for a checkpoint's files, ``{1: [1, 2]}`` for a survivor with a replica of rank 2).
    ``prefer(new_rank, holder)``: a holder to take from first (the receiver itself), so
    that as little as possible travels. Pure and deterministic."""
    old_layout, new_layout = Layout.of(old_plan, shape), Layout.of(new_plan, shape)
    old_hold = {r: holdings(old_plan, r, shapes, shape, old_layout) for r in range(old_plan.world_size)}
    keepers: dict[int, list[Hashable]] = {}
    for h in holders:
        for r in holders[h]:
            if not 0 <= r < old_plan.world_size:
                raise PlanError(f"holder {h!r} claims rank {r}, outside the old plan's {old_plan.world_size} ranks")
            keepers.setdefault(r, []).append(h)
    out = Reshard()
    for j in range(new_plan.world_size):
        want = holdings(new_plan, j, shapes, shape, new_layout)
        out.wanted[j] = want

        def near(h: Hashable, j: int = j) -> bool:
            return prefer is not None and prefer(j, h)

        moves: list[Move] = []
        for name, spec in want.items():
            full = tuple(shapes[name])
            # every surviving piece of this tensor: (old rank, its box, the holder to take it from)
            pieces = [(r, box(old_hold[r][name], full), next((k for k in keepers[r] if near(k)), keepers[r][0]))
                      for r in sorted(keepers) if name in old_hold[r]]
            got = _route(name, box(spec, full), pieces, near)
            if got is None:
                out.missing.append((j, name))
            else:
                moves.extend(got)
        out.moves[j] = moves
    return out


def _route(name: str, target: Box, pieces, near) -> list[Move] | None:
    """Pieces that tile ``target``: one that covers it (a near one first), else the
    pieces cut along one dimension, in order, intersected with the target."""
    whole = [p for p in pieces if _covers(p[1], target)]
    if whole:
        r, b, h = next((p for p in whole if near(p[2])), whole[0])
        return [Move(name, h, r, _local(target, b), _local(target, target))]
    for dim in range(len(target)):
        # pieces that are whole (at least over the target) in every other dimension
        cut = [p for p in pieces if all(_covers((p[1][d],), (target[d],)) for d in range(len(target)) if d != dim)]
        lo, hi = target[dim]
        moves, at = [], lo
        for r, b, h in sorted(cut, key=lambda p: (p[1][dim][0], not near(p[2]))):
            a0, a1 = b[dim]
            if a0 <= at < a1:
                part = tuple((at, min(hi, a1)) if d == dim else target[d] for d in range(len(target)))
                moves.append(Move(name, h, r, _local(part, b), _local(part, target)))
                at = min(hi, a1)
            if at >= hi:
                return moves
    return None


def full_shapes(cfg, tuning=None) -> dict[str, tuple[int, ...]]:
    """The full shape of every tensor of the training state, from a model built on
    ``meta`` (no memory): every parameter, or with a ``models.lora.Tuning`` only those
    that train (LoRA adapters; the frozen rest is never moved or checkpointed)."""
    from edgepool.models.stage import StageModel

    m = StageModel(cfg, (0, cfg.num_layers), embed=True, head=True, deferred=True, tuning=tuning)
    return {k: tuple(v.shape) for k, v in m.state_dict().items() if tuning is None or tuning.trainable(k)}


class Source:
    """The state of one old rank as a holder keeps it: tensor names, and slices of them."""

    def keys(self) -> list[str]:
        raise NotImplementedError

    def get(self, key: str, src: Box):
        """``tensor[src]``; a scalar whole."""
        raise NotImplementedError


class Tensors(Source):
    """A state held in memory (``{key: tensor}``)."""

    def __init__(self, state: Mapping[str, object]):
        self.state = state

    def keys(self) -> list[str]:
        return list(self.state)

    def get(self, key: str, src: Box):
        t = self.state[key]
        return t if t.dim() != len(src) else t[tuple(slice(a, b) for a, b in src)]


def assemble(rank: int, plan: Reshard, shapes: Mapping[str, tuple[int, ...]],
             source: Callable[[Hashable, int], Source]) -> dict[str, object]:
    """New rank ``rank``'s state (``model/...`` and ``optim/...`` tensors) from its moves;
    ``source(holder, old_rank)`` is old rank ``old_rank``'s state as ``holder`` keeps it."""
    import torch

    by_name: dict[str, list[Move]] = {}
    for m in plan.moves.get(rank, []):
        by_name.setdefault(m.name, []).append(m)
    keys: dict[tuple[Hashable, int], dict[str, list[str]]] = {}
    out: dict[str, torch.Tensor] = {}
    for name, spec in plan.wanted[rank].items():
        moves = by_name.get(name)
        if not moves:
            continue
        first = moves[0]
        src0 = source(first.holder, first.old_rank)
        if (first.holder, first.old_rank) not in keys:
            keys[first.holder, first.old_rank] = by_param(src0.keys())
        local = tuple(b - a for a, b in box(spec, tuple(shapes[name])))
        for key in keys[first.holder, first.old_rank].get(name, []):
            head = src0.get(key, first.src)
            if head.dim() != len(local):  # a scalar (``step``): whole from the first piece
                out[key] = head.clone()
                continue
            t = torch.empty(local, dtype=head.dtype)
            for m in moves:
                piece = head if m is first else source(m.holder, m.old_rank).get(key, m.src)
                t[tuple(slice(a, b) for a, b in m.dst)] = piece
            out[key] = t
    return out


def by_param(keys) -> dict[str, list[str]]:
    """``model/<name>`` and ``optim/<name>/<key>`` grouped by parameter name, the parameter first."""
    out: dict[str, list[str]] = {}
    for k in keys:
        kind, _, rest = k.partition("/")
        if kind == "model":
            out.setdefault(rest, []).insert(0, k)
        elif kind == "optim":
            out.setdefault(rest.rsplit("/", 1)[0], []).append(k)
    return out
