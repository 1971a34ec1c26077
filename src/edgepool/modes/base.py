"""What an intra-stage mode is: the plug point every mode module fills in.

A stage's group of devices splits the stage's work in one mode. A mode module holds
everything about its mode and nothing else does (``edgepool.modes``):

- **split**: how the group's shares turn into whole items (samples, tokens, heads and
  FFN columns) and which part of each micro-batch's activations a device holds (its
  *region*);
- **data**: whether every first-stage device owns its samples (embeds them, computes
  head and loss with its own labels) or only the group's first device does;
- **work**: what part of every block a device computes (tokens, head and FFN
  fractions, which ``cost.profile.Parts.at`` prices);
- **memory**: the parameter, gradient and optimizer bytes a device holds;
- **collectives**: the group's own communication per micro-batch and per step, as
  the runtime runs it (``GroupComm``);
- **lowering**: whether forward and backward are group operations (members wait for
  each other) and whether a ``sync_grads`` op ends the step;
- **engine**: ``apply`` changes a built stage model for this device (slices it,
  shards it, gives it its collectives) and names the parameters synced once per step.

Everything here is pure Python; ``apply`` and the state hooks import torch when they
run, so ``import edgepool.modes`` stays cheap and the planner never loads torch.

Units: seconds, bytes, counts (``num_``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from edgepool.errors import PlanError
from edgepool.specs.plan import Region, Shape, StageSplit, offsets, split_counts

if TYPE_CHECKING:  # pragma: no cover
    from edgepool.cost.network import Network
    from edgepool.cost.profile import LayerProfile, ModelProfile


@dataclass(frozen=True)
class GroupComm:
    """A stage group's own communication: per-micro-batch collectives and the sync.

    ``coll_send_bytes`` and ``coll_steps`` are the forward's; ``coll_send_bytes_bwd``
    and ``coll_steps_bwd`` the backward's (tp: the same; sp: all-reduces backward where
    the forward all-gathers; fsdp: one all-gather forward, an all-gather and a
    reduce-scatter backward).
    """

    coll_fwd_s: float = 0.0
    coll_bwd_s: float = 0.0
    coll_airtime_s: float = 0.0  # per micro-batch, fwd + bwd
    coll_send_bytes: dict[str, float] = field(default_factory=dict)  # per micro-batch, forward: what each device sends
    coll_steps: int = 0  # latency-bound ring steps of the forward per micro-batch
    sync_bytes: float = 0.0  # gradient bytes all-reduced once per step (0: no sync)
    sync_s: float = 0.0
    coll_send_bytes_bwd: dict[str, float] = field(default_factory=dict)  # per micro-batch, backward
    coll_steps_bwd: int = 0
    coll_airtime_fwd_s: float = 0.0  # the forward's part of coll_airtime_s
    # The sync overlapped with the backward (``runtime.overlap``): its gradients are summed
    # in buckets, launched in order as they become final during the last micro-batch's
    # backward (``sync_buckets``, the runtime's own layout, ``buckets_of``); see
    # ``exposed_sync_s``.
    sync_buckets: tuple[SyncBucket, ...] = ()
    # compressing the sync's gradients per step (``train.wire.gradients``, PowerSGD:
    # ``LayerProfile.sync_flops``, ``sync_traffic_bytes``), on the reference device's terms
    sync_flops: float = 0.0
    sync_traffic_bytes: float = 0.0

    def exposed_sync_s(self, left_s) -> float:
        """The sync's seconds on the step's critical path, after the backward ends.

        ``left_s[r]``: the backward seconds left when the stage's first ``r`` blocks'
        backward remains (the slowest device's, ``DeviceWork.bwd_left_s``; ``left_s[0]
        = 0``). Bucket ``k`` is final ``left_s[blocks_left_k]`` before the backward
        ends and its all-reduce starts once it is final and bucket ``k - 1``'s is done
        (gloo matches collectives in issue order; the runtime launches them in order):
        ``t_k = max(t_{k-1}, -left_k) + ar_k``, and ``max(t_K, 0)`` is exposed. With a
        block per bucket and identical blocks this is the fluid model's ``max(lead -
        hide, 0) + tail`` plus a ring latency per bucket; with the runtime's 1 MiB
        minimum a small model's last bucket holds several blocks, all of them on the path.
        """
        t = float("-inf")
        for bk in self.sync_buckets:
            t = max(t, -left_s[bk.blocks_left]) + bk.seconds
        return max(t, 0.0) if self.sync_buckets else 0.0


@dataclass(frozen=True)
class SyncBucket:
    """One bucket of the overlapped gradient sync (``runtime.overlap``): the bytes its
    all-reduce sums (as the wire sends them), its seconds (``cost.network.allreduce_time``)
    and how many of the stage's blocks still have their backward to run when its
    gradients are final (its lowest block's index in the stage; 0 for the bucket with the
    stage's first block or the embed: final at the backward's end)."""

    nbytes: float
    seconds: float
    blocks_left: int


# The runtime's bucket layout (``runtime.overlap.GradSync``), here so that the cost model
# and the planner price the buckets the runtime launches: DDP's ``bucket_cap_mb`` default,
# and a bucket ends with its unit once it holds 1 MiB (DDP's first bucket,
# ``dist._DEFAULT_FIRST_BUCKET_BYTES``): fewer, larger all-reduces for tiny blocks.
DEFAULT_BUCKET_BYTES = 25 * 2**20
MIN_UNIT_BUCKET_BYTES = 2**20


def buckets_of(sizes_bytes: list[float], cap_bytes: float, units: list[object] | None = None,
               min_bytes: float = 0) -> list[list[int]]:
    """Indices of ``sizes_bytes`` (parameters in registration order) cut into buckets of
    at most ``cap_bytes`` (a larger parameter alone), in reverse registration order.

    ``units``: each parameter's unit (the embed, a block, the head); a bucket then also
    ends where a unit ends once it holds ``min_bytes``, so that a block's gradients go
    out as soon as its backward is done rather than waiting for the next blocks'."""
    out: list[list[int]] = []
    cur: list[int] = []
    size = 0.0
    for i in reversed(range(len(sizes_bytes))):
        if cur and (size + sizes_bytes[i] > cap_bytes
                    or (units is not None and units[i] != units[i + 1] and size >= min_bytes)):
            out.append(cur)
            cur, size = [], 0.0
        cur.append(i)
        size += sizes_bytes[i]
    if cur:
        out.append(cur)
    return out


def synced_units(prof: "ModelProfile", a: int, b: int, owner: bool) -> list[tuple["LayerProfile", int]]:
    """A stage's units whose gradients its group syncs, blocks ``[a, b)`` (and on a data
    owner the embed and head), in registration order (embed, blocks, head), each with how
    many of the stage's blocks still have their backward to run when its gradients are final."""
    units = [(lp, j - a) for j, lp in enumerate(prof.blocks[a:b], start=a)]
    if owner:
        units = [(prof.embed, 0)] + units + [(prof.head, b - a)]
    return units


def bucket_layout(units: list[tuple["LayerProfile", int]]) -> list[tuple[float, int]]:
    """The runtime's buckets over ``synced_units``, each as (the bytes its all-reduce sends,
    ``LayerProfile.sync_at``; its ``blocks_left``), cut by the trainable bytes the runtime
    cuts at unit granularity (the runtime cuts parameters, so a unit over the 25 MiB cap is
    one bucket here: all of its gradients are final at once, and only the latency of the
    extra all-reduces is missed)."""
    cut = buckets_of([lp.trainable_at() for lp, _ in units], DEFAULT_BUCKET_BYTES, list(range(len(units))),
                     MIN_UNIT_BUCKET_BYTES)
    return [(sum(units[i][0].sync_at() for i in b), min(units[i][1] for i in b)) for b in cut]


def sync_buckets(units: list[tuple["LayerProfile", int]], names: list[str], net) -> tuple[SyncBucket, ...]:
    """``bucket_layout`` priced: each bucket's ring all-reduce over ``names``."""
    return tuple(SyncBucket(nbytes=nb, seconds=net.allreduce_time(names, nb), blocks_left=r)
                 for nb, r in bucket_layout(units))


@dataclass(frozen=True)
class StageWork:
    """What a mode's cost hooks need to know about one stage (built by ``cost.model``).

    ``block_params``: the stage's blocks' parameter bytes at full size, one per block;
    ``owner_params``: the embed and head bytes on a data owner (0 elsewhere).
    """

    stage: int
    names: tuple[str, ...]
    split: StageSplit
    microbatch: int
    shape: Shape
    profile: "ModelProfile"
    layers: tuple[int, int]
    owns_data: tuple[bool, ...]

    @property
    def num_devices(self) -> int:
        return len(self.names)

    @property
    def num_blocks(self) -> int:
        return self.layers[1] - self.layers[0]


@dataclass(frozen=True)
class BoundInputs:
    """Whole-model aggregates the planner's single-stage lower bound uses (one per search).

    ``comp``: the blocks' forward plus backward seconds per token, by part; ``fix``: their
    fixed seconds per call; ``p_rep``/``p_split`` parameter bytes (repeated, split by
    tp); ``a_rep``/``a_split`` activation bytes per token (kept per micro-batch);
    ``opt_f``: bytes per parameter byte for parameters, gradients and optimizer state
    (``1 + (1 + opt_state_factor) * f`` with ``f`` the least trainable fraction of any
    unit, so that it stays a lower bound under fine-tuning); ``p_train``: the blocks'
    trainable bytes (what dp and sp sync).
    """

    seq_len: int
    num_layers: int
    fix: float
    comp: dict[str, float]
    own_fix: float  # a data owner's embed and head: fixed seconds per call
    own_tok: float  # and seconds per token
    p_rep: float
    p_split: float
    a_rep: float
    a_split: float
    max_block_params: float
    owner_params: float  # embed + head
    owner_unit_params: float  # the larger of embed and head
    opt_f: float
    act_elem_bytes: int
    kv_row_bytes: float
    p_train: float = -1.0  # -1: all of p_rep + p_split
    wire_row_bytes: float = -1.0  # a boundary row on the wire (``ModelProfile.wire_row_bytes``); -1: act_elem_bytes
    p_sync: float = -1.0  # the blocks' bytes a replica's sync sends (``LayerProfile.sync_at``); -1: p_train

    @property
    def blocks_trainable(self) -> float:
        return self.blocks_params if self.p_train < 0 else self.p_train

    @property
    def blocks_synced(self) -> float:
        return self.blocks_trainable if self.p_sync < 0 else self.p_sync

    @property
    def boundary_row_bytes(self) -> float:
        return self.act_elem_bytes if self.wire_row_bytes < 0 else self.wire_row_bytes

    @property
    def blocks_params(self) -> float:
        return self.p_rep + self.p_split


class Mode:
    """The base of every mode module's ``MODE``. Defaults are dp's replicated shape."""

    name: ClassVar[str] = ""
    owns_data: ClassVar[bool] = False  # every first-stage device owns its samples
    replicated_io: ClassVar[bool] = False  # every device holds the stage's whole input and output
    group_ops: ClassVar[bool] = False  # fwd/bwd wait for the whole group (collectives inside)
    syncs_grads: ClassVar[bool] = False  # one gradient all-reduce per step (sync_grads)
    in_pipelines: ClassVar[bool] = False  # the planner's pipeline search places it in pipelines
    builds_per_unit: ClassVar[bool] = False  # ``apply`` builds each unit itself (``StageModel(deferred=True)``)
    # every device of a group holds the stage's whole state, the same bits (parameters and
    # optimizer state): a group member is a free replica of another (``specs.layout.backups``)
    replicated_state: ClassVar[bool] = False
    # the blocks' own forward collectives run again when a stage recomputes its
    # activations in the backward (``StagePlan.recompute``: tp, sp; fsdp's all-gathers are
    # its hooks', already there for the backward)
    recompute_repeats_collectives: ClassVar[bool] = False

    # -- split ------------------------------------------------------------------------
    def num_items(self, microbatch: int, shape: Shape) -> int:
        """How many whole items the group shares out (the planner's minimax unit)."""
        return microbatch

    def split(self, weights: tuple[float, ...], microbatch: int, shape: Shape) -> StageSplit:
        n = len(weights)
        full = lambda v: tuple(v for _ in range(n))  # noqa: E731
        return StageSplit(batch=split_counts(microbatch, weights), seq=full(shape.seq_len),
                          heads=full(shape.num_heads), ffn=full(shape.ffn))

    def region(self, split: StageSplit, index: int, microbatch: int, shape: Shape) -> Region:
        b0 = offsets(split.batch)[index]
        return (b0, b0 + split.batch[index], 0, shape.seq_len)

    # -- work and memory ----------------------------------------------------------------
    def block_part(self, split: StageSplit, index: int, microbatch: int, shape: Shape) -> tuple[float, float, float]:
        """(query tokens, head fraction, FFN fraction) of every block this device computes."""
        return (split.batch[index] * shape.seq_len, 1.0, 1.0)

    def state_bytes(self, num_devices: int, params: Any, whole: Any, opt_state_factor: float,
                    trainable: Any = None) -> dict[str, Any]:
        """Parameter, gradient and optimizer bytes of a device of a group of
        ``num_devices`` whose part of the stage holds ``params`` bytes at full size, of
        which ``trainable`` bytes train (default: all; ``cost.profile.with_tuning``),
        the largest unit of it ``whole`` bytes. Only trainable bytes have gradients and
        optimizer state. Plain arithmetic: floats (the cost model) and numpy matrices
        over layer ranges (``planner.tables``) alike."""
        trainable = params if trainable is None else trainable
        return {"params": params, "grads": trainable, "optimizer": opt_state_factor * trainable}

    def memory(self, w: StageWork, index: int, params_bytes: float,
               trainable_bytes: float | None = None) -> dict[str, float]:
        """``state_bytes`` of device ``index`` holding ``params_bytes`` of parameters at
        full size (its blocks' part, plus embed and head on a data owner), of which
        ``trainable_bytes`` train (default: all), and what the mode's own libraries add
        (``libraries_bytes``) where they do."""
        parts = self.state_bytes(w.num_devices, params_bytes, self.largest_unit(w, index), w.profile.opt_state_factor,
                                 trainable_bytes)
        extra = self.libraries_bytes(w.profile, w.num_devices)
        return {**parts, "libraries": extra} if extra else parts

    def libraries_bytes(self, profile: "ModelProfile", num_devices: int) -> float:
        """Resident bytes the mode's libraries add to a rank of a group of ``num_devices``
        (``ModelProfile.mode_runtime_bytes``, measured; ``apply`` runs, and imports
        them, only for groups of two or more)."""
        return profile.mode_runtime(self.name) if num_devices >= 2 else 0.0

    def largest_unit(self, w: StageWork, index: int) -> float:
        """The largest unit of parameters the mode gathers whole at once (0: none)."""
        return 0.0

    def optim_fraction(self, num_devices: int) -> float:
        """The fraction of a device's parameters its optimizer steps on."""
        return 1.0

    def unit_collectives_s(self, names: list[str], net: "Network", unit_bytes: float) -> tuple[float, float]:
        """Forward and backward collective seconds per micro-batch for one unit of
        ``unit_bytes`` parameters (modes that gather parameters: fsdp). Affine in
        ``unit_bytes``, which ``planner.tables`` relies on."""
        return 0.0, 0.0

    def comm(self, w: StageWork, net: "Network") -> GroupComm:
        return GroupComm(coll_send_bytes={x: 0.0 for x in w.names}, coll_send_bytes_bwd={x: 0.0 for x in w.names})

    def owner_work(self, b: BoundInputs, tokens: float, speed: float, ref_speed: float) -> float:
        """A data owner's embed and head seconds per micro-batch for ``tokens`` of its own."""
        return (b.own_fix + tokens * b.own_tok) * ref_speed / speed

    def single_stage_bound(self, b: BoundInputs, counts: tuple[int, ...], speeds: list[float], names: list[str],
                           caps: dict[str, float], microbatch: int, net: "Network",
                           ref_speed: float) -> tuple[list[float], float, float, tuple[float, str] | None]:
        """The planner's cheap bound for a single stage of this mode over ``names``.

        Returns (per-device compute seconds per micro-batch, the owners' embed and head
        included; communication seconds per micro-batch; seconds once per step;
        the first memory miss as (bytes needed, device) or None). The cost model charges
        at least ``M * (max compute + per micro-batch) + once``: exact compute of the
        split, the group's collectives, no pipeline bubbles.
        """
        raise NotImplementedError(f"mode {self.name} has no single-stage bound")

    # -- engine (torch) ---------------------------------------------------------------
    def apply(self, model: Any, *, group: Any, split: StageSplit, index: int, ctx: Any,
              owner: bool, device: Any, state: dict | None = None) -> dict[str, tuple[int, int, int]]:
        """Make ``model`` (this device's stage parts on ``device``, a
        ``runtime.device.TorchDevice``: at full size with their state loaded, or, for a
        mode that ``builds_per_unit``, placeholders that it builds with ``state``
        itself) this mode's part of the stage. Returns the shard spec ``name -> (dim, start, stop)`` of every tensor that
        holds a slice of the full tensor (``runtime.engine.stitch``)."""
        return {}

    def shard_of(self, key: str, full_shape: tuple[int, ...], split: StageSplit, index: int,
                 shape: Shape) -> tuple[int, int, int] | None:
        """Where device ``index``'s part of the stage tensor ``key`` (its name in the full
        model, e.g. ``blocks.3.attn.q_proj.weight``; ``full_shape`` its full shape) sits:
        ``(dim, start, stop)`` of the full tensor, or None for a whole copy. Pure (no
        torch): ``apply`` cuts by it and ``runtime.reshard`` routes state by it, so a
        checkpoint or a survivor's state can be cut anew for any plan."""
        return None

    def sync_params(self, model: Any, *, owner: bool) -> list:
        """Parameters whose gradients the group all-reduces once per step."""
        return []

    def partial_grad_params(self, model: Any) -> list:
        """Parameters every device holds whole but whose gradients are each device's
        partial sums, to be summed over the group before the optimizer steps (tp: the
        LoRA factors its slicing leaves whole, ``models.lora``)."""
        return []

    def local_state(self, model: Any, keep=None) -> dict:
        """This device's tensors (its shards where the mode shards), detached copies;
        ``keep(name)``: only those it accepts (the others are not copied)."""
        return {k: v.detach().clone() for k, v in model.state_dict().items() if keep is None or keep(k)}

    def load_local_state(self, model: Any, state: dict) -> None:
        model.load_state_dict(state)


def check_split(mode: Mode, stage: int, devices: tuple[str, ...], split: StageSplit, microbatch: int,
                shape: Shape) -> None:
    """Every device gets at least one of every item its mode shares out."""
    for what, counts, total in (("samples of a micro-batch", split.batch, microbatch), ("tokens", split.seq, shape.seq_len),
                                ("heads", split.heads, shape.num_heads), ("FFN columns", split.ffn, shape.ffn)):
        if min(counts) < 1:
            dev = devices[counts.index(min(counts))]
            raise PlanError(
                f"stage {stage} ({mode.name}) gives device {dev!r} 0 of {total} {what} (split {list(counts)}); "
                "raise its share, use fewer devices in this stage, or fewer micro-batches"
            )
