"""Time, peak memory and energy of one training step of any Plan (pure functions).

Inputs: the ``Plan``, the ``PoolSpec`` (devices, power modes, network), a
``ModelProfile`` (per-layer costs on a reference device) and the ``Shape`` (global
batch, sequence length, heads, FFN). Splits, regions and the transfers between stages
come from ``specs.layout.Layout``, and everything that depends on a stage's mode (its
part of every block, its memory, its collectives) from that mode's module
(``edgepool.modes``); nothing here re-derives who sends what or branches on a mode.

**Compute.** Device i of a stage computes its part of every block of the stage for
every micro-batch (see ``cost.profile``): dp gives it ``batch_i`` samples, sp
``seq_i`` query tokens against the whole sequence, tp the fraction ``heads_i / heads``
of the attention and ``ffn_i / ffn`` of the MLP. Its time is the reference time times
``speed_ref / speed_i`` (catalog speed in its power mode, or ``compute_scale``). The
data owners of stage 0 also embed their own samples, and compute head, loss and its
backward on them (``Layout.owners``). A stage's per-micro-batch forward
``F_s`` is the slowest device's forward plus the group's own collectives (the mode's
``comm``: tp two all-reduces of the activation per block; sp all-gathers of K and of V
per block; fsdp an all-gather of every unit's parameters), ``B_s`` likewise for the
backward (tp two all-reduces; sp all-reduces of the whole K and V gradients; fsdp an
all-gather and a reduce-scatter per unit, which gloo runs as an all-reduce; the owners'
head is part of it), as the
runtime runs them (``group_comm``).

**Boundaries.** Boundary k carries a micro-batch's activations into stage k (k = 0:
from the owners' embedding; k = S: back to the owners' head) and their gradients the
other way; ``cost.network`` turns the transfers into time ``c_k``. Boundary 0 (non-local
only when a tp or sp stage 0 has one owner feeding its group) and, with a single
stage, boundary 1, happen inside stage 0's synchronous group work and are added to its
machine time rather than pipelined beside it.

**Step time (planning model).** Treat every stage and every non-local boundary as a
machine that each micro-batch visits once forward and once backward, with per-
micro-batch work ``W_m`` (``F_s + B_s`` for a stage, ``c_fwd + c_bwd`` for a
boundary). Then

    1f1b:   A = sum_m W_m + (M - 1) * max_m W_m
    gpipe:  A = sum F + (M - 1) max F + sum B + (M - 1) max B

Derivation: the first micro-batch's forward and backward traverse every machine
(``sum W``, the fill); after it, one micro-batch leaves per period of the slowest
machine. For GPipe this is the exact makespan of a flow shop with M identical jobs (the
forward phase, then the backward phase; Johnson 1954, Huang et al. 2019 "GPipe"). For
1F1B it is the standard estimate (Narayanan et al. 2021, PipeDream-Flush): exact for
balanced stages and small boundaries, optimistic when boundary round trips exceed the
warm-up work (the simulator shows those bubbles). The owners' head is part of stage 0's
machine (in ``B_0``), and the first micro-batch's fill goes through it between the last
stage's forward and backward; the estimate assumes no micro-batch then waits for it,
which is what the 1F1B order does (``sim.lower.timeline``: each head runs before stage
0's next pass once its micro-batch can be back, and the last stage's next forward
covers that round trip). The order before it had the last stage wait for each head
(11% over this estimate on a 2-stage GPT of issue 14, within 2% now:
``tests/unit/test_sim.py``).

On a shared medium the channel is one resource that every micro-batch visits at every
boundary (and inside tp/sp stages), with per-micro-batch work ``chan``, the airtime of
everything that crosses it. A flow shop's fill would count it once per visit and then
(M - 1) more periods, which is what the runtime beats: while one micro-batch computes
on stage s, the channel carries another one's transfers. What the channel cannot
overlap is stage 0's own work on the first micro-batch's forward (before the first
transfer) and the last one's backward (after the last), so with two or more stages

    T_pipe = max(A, W_0 - chan_0 + M * chan)

(``W_0`` stage 0's machine time, ``chan_0`` the channel time already inside it). The
second term is a lower bound that ignores the channel's idle gaps: at the turn from
forward to backward, and where a micro-batch's round trip through the data owners'
head waits behind other transfers (1F1B, with few micro-batches in flight, most). On
the testbed's fast links such pipelines measure slower than this
(``docs/results/cost-model.md``, its cost-model column), and on large Wi-Fi pools the
simulator finds them much slower; the planner therefore takes its final prediction from
the simulator (``planner.search``, finalists). With one stage
the channel is used only inside stage 0's synchronous work, already in ``W_0``.

Then the gradient all-reduces of dp/sp groups (ring, ``cost.network``) and the
optimizer step: ``T = T_pipe + sum_s exposed_s + max_{i in stage 0} optim_i``. A
group's sync overlaps its last micro-batch's backward (``runtime.overlap``: buckets
launched in order as their gradients become final), so only what outlasts the backward
is on the path (``GroupComm.exposed_sync_s``): the runtime's own buckets
(``modes.base.sync_buckets``: a bucket ends with a block once it holds 1 MiB), each
all-reduced from when its lowest block's backward is done on the slowest device
(``DeviceWork.bwd_left_s``) or the bucket before it is summed, whichever is later; the
bucket with the first block (and a dp owner's embed) follows the backward. Stage 0
finishes its backward last, so its optimizer step is on the critical path; later
stages' optimizer steps overlap the pipeline drain. The exposed syncs are added up: on a
shared channel they share it; on a switched network this is conservative (a later
stage's sync also overlaps the drain of the stages before it).

**Memory** of device i (bytes): the framework's own resident memory
(``profile.runtime_bytes``: interpreter, torch, gloo) + parameters + gradients + optimizer state
as the mode holds them (the mode's ``memory``: ``(2 + opt_state_factor) * params_i`` for
replicas and tp slices in full training, gradients and optimizer state of the trainable
bytes only when fine-tuning; fsdp shards them and keeps one unit whole, and adds its
libraries' measured resident bytes) + activations of the micro-batches in flight
(``act_i * n_inflight``, ``specs.plan.inflight_limit``: M for gpipe, one per stage to the
end plus the owners' head for 1f1b) + the owners' transient head activations (logits and
their gradient). On the owners this assumes the head runs while the most micro-batches
are in flight, which the schedule does not always do: an upper bound by at most the
smaller of one micro-batch's activations and the transient (the simulator is exact). A
run that recovers in memory adds its backups as the runtime holds them through a step
(``BackupCost.held_bytes``: the first round, taken before the first optimizer step,
without optimizer state; two full rounds in a long run). Not modelled: what the C
allocator keeps resident after a free (glibc's heap keeps freed activation chunks that it
cannot always reuse, so a rank's peak RSS creeps above its live bytes over the first
steps).

**Fine-tuning** (``train.lora``, ``train.freeze``; ``cost.profile.with_tuning``, which
``for_job`` applies). Each unit carries the fraction of its parameter bytes that train
(``LayerProfile.trainable_frac``; LoRA's adapters are added to its bytes). Modelled:
gradients and optimizer state are held for the trainable bytes only (a replica:
``params + (1 + opt_state_factor) * trainable``; fsdp shards the trainable state and still
counts its gathered unit whole), the optimizer step is priced per trainable byte, dp and
sp all-reduce the trainable gradients only, the backups carry the trainable parameters and
their optimizer state (``DeviceWork.backup_bytes``: the frozen base comes from the run's
initial state), and the backward of a frozen matmul skips its weight gradient, a frozen
embed's backward is 0 (the profile's times). Approximated: the backward as
``(1 + trainable share) / 2`` of a part's matmul work, the adapters' forward at the base
weights' rate per parameter, one trainable fraction for every tp slice of a unit, and
fsdp's reduce-scatter at the whole unit's bytes; the adapters' own kept activations are
left out (``with_tuning`` says each).

**Compression on the wire** (``train.wire``; ``cost.wire``, which ``for_job`` applies
through ``with_wire``). A boundary row is ``ModelProfile.wire_row_bytes`` on the wire,
plus int8's scale per transfer (``boundary_flows``); every device encodes what it sends
off itself and decodes what it receives (``boundary_codec``: the codec's bytes read and
written per element at the profile's ``traffic_s_per_byte``), counted in its blocks'
forward or backward by the op that runs it. A dp/sp sync sends ``LayerProfile.sync_at``
(PowerSGD's factors) and its slowest member's compression (``sync_codec_s``: the factors'
matmuls at ``matmul_s_per_flop``, the elementwise passes) is added to the exposed sync
and to each member's busy time. Not modelled: PowerSGD's error buffers in memory, its
second all-reduce's latency (one ring latency per bucket).

**Energy** of device i over the step: ``busy_w * busy_i + idle_w * (T - busy_i) +
radio_j_per_mb * MB_i``, with ``busy_i = M * (compute F_i + B_i) + optim_i`` (waiting
on the network counts as idle) and ``MB_i`` the megabytes it sends and receives.
Power figures come from the catalog mode (``plan.power_modes``, else the pool's pinned
mode, else the kind's maximum mode). Only devices in the plan are counted. Energy is
modelled, never measured, and says so (``energy_source``).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace

from edgepool import catalog
from edgepool.cost.network import Network
from edgepool.cost.profile import ModelProfile
from edgepool.cost.wire import CODEC_TRAFFIC_BYTES, HEADER_BYTES
from edgepool import modes
from edgepool.errors import PlanError
from edgepool.modes import GroupComm, StageWork
from edgepool.specs.layout import Layout
from edgepool.specs.plan import EMPTY, Plan, Shape, inflight_limit
from edgepool.specs.pool import DeviceSpec, PoolSpec

GB = 1e9
MB = 1e6


# -- devices -----------------------------------------------------------------------------
def power_mode_of(plan: Plan | None, dev: DeviceSpec) -> str:
    """The power mode a device runs in: the plan's, else the pool's pin, else the max."""
    kind = catalog.get(dev.kind)
    if plan is not None and dev.name in plan.power_modes:
        return kind.power_mode(plan.power_modes[dev.name]).name
    return kind.power_mode(dev.power_mode).name


def device_speed(dev: DeviceSpec, mode: str | None = None) -> float:
    """Relative speed of a device in a power mode.

    ``compute_scale`` (if given) is the device's speed at its kind's maximum mode; a
    lower mode scales it by the modes' ``compute_fraction`` ratio.
    """
    kind = catalog.get(dev.kind)
    m = kind.power_mode(mode if mode is not None else dev.power_mode)
    if dev.compute_scale is not None:
        return dev.compute_scale * m.compute_fraction / kind.max_mode.compute_fraction
    return kind.relative_speed(m.name)


def memory_cap_bytes(dev: DeviceSpec) -> float:
    """Memory free for training (``DeviceSpec.resolved_memory_gb``): the pool's
    ``memory_gb`` when given, else the kind's memory less its reserved share."""
    return dev.resolved_memory_gb() * GB


def shape_for(profile: ModelProfile, global_batch: int, seq_len: int) -> Shape:
    d = profile.dims
    return Shape(global_batch=global_batch, seq_len=seq_len, num_heads=d.num_heads, ffn=d.ffn,
                 num_kv_heads=d.num_kv_heads)


# -- results -----------------------------------------------------------------------------
@dataclass(frozen=True)
class EnergyParts:
    """A device's energy over one step, by part (shared by the cost model and simulator)."""

    busy_energy_j: float
    idle_energy_j: float
    radio_energy_j: float

    @property
    def energy_j(self) -> float:
        return self.busy_energy_j + self.idle_energy_j + self.radio_energy_j

    @staticmethod
    def of(*, busy_w: float, idle_w: float, radio_j_per_mb: float, wall_s: float, busy_s: float,
           radio_bytes: float) -> dict[str, float]:
        """The one energy formula (cost model, simulator, modelled meter): busy power while
        busy, idle power the rest of the window, radio energy per megabyte (10^6 bytes)."""
        return {"busy_energy_j": busy_w * busy_s, "idle_energy_j": idle_w * max(0.0, wall_s - busy_s),
                "radio_energy_j": radio_j_per_mb * max(0.0, radio_bytes) / MB}


@dataclass(frozen=True)
class DeviceCost(EnergyParts):
    name: str
    kind: str
    power_mode: str
    stage: int
    speed: float
    fwd_s: float  # compute per micro-batch (owner parts included), no communication
    bwd_s: float
    busy_s: float  # per step
    memory_bytes: float
    memory_cap_bytes: float
    memory_parts: dict[str, float]
    bytes_moved: float  # sent + received per step

    @property
    def fits(self) -> bool:
        return self.memory_bytes <= self.memory_cap_bytes


@dataclass(frozen=True)
class StageCost:
    fwd_s: float  # machine time per micro-batch, collectives included
    bwd_s: float
    coll_fwd_s: float
    coll_bwd_s: float
    coll_airtime_s: float  # per micro-batch, fwd + bwd
    sync_s: float  # the gradient all-reduces' own time (0: no sync)
    inflight: int
    sync_exposed_s: float = 0.0  # what of it the backward does not hide: on the step's path
    # compressing the sync's gradients (PowerSGD), the slowest member's, in ``sync_exposed_s``
    sync_codec_s: float = 0.0


@dataclass(frozen=True)
class LinkCost:
    k: int
    fwd_s: float
    bwd_s: float
    airtime_s: float  # fwd + bwd
    fwd_bytes: float
    bwd_bytes: float
    in_stage: bool = False  # serial with stage 0's own work (see estimate)


@dataclass(frozen=True)
class PlanCost:
    """Everything the cost model predicts for one step of a plan."""

    plan_id: str
    schedule: str
    num_microbatches: int
    step_time_s: float
    pipe_s: float
    fill_s: float  # sum of machine work: one micro-batch through the whole pipeline
    period_s: float  # the slowest machine per micro-batch (the channel is not a machine; see chan_s)
    chan_s: float  # shared-channel airtime per micro-batch (0 when switched)
    sync_s: float  # the gradient syncs' exposed seconds (``StageCost.sync_exposed_s``), summed over stages
    optim_s: float
    backup_s: float  # the in-memory backups per step (``BackupCost``)
    backup_every: int  # steps between two rounds of backups (0: none)
    bottleneck: str
    stages: tuple[StageCost, ...]
    links: tuple[LinkCost, ...]
    devices: dict[str, DeviceCost] = field(default_factory=dict)

    @property
    def energy_j(self) -> float:
        return sum(d.energy_j for d in self.devices.values())

    def to_estimate(self, objective: str | None = None) -> "Estimate":
        from edgepool.specs.plan import Estimate

        return Estimate(step_time_s=self.step_time_s, energy_j=self.energy_j, peak_memory_bytes=self.peak_memory_bytes,
                        source="cost-model", objective=objective, energy_source="modelled (catalog power figures)")

    @property
    def peak_memory_bytes(self) -> dict[str, int]:
        return {n: int(round(d.memory_bytes)) for n, d in self.devices.items()}

    @property
    def feasible(self) -> bool:
        return all(d.fits for d in self.devices.values())

    def memory_violations(self) -> list[str]:
        out = []
        for d in self.devices.values():
            if not d.fits:
                out.append(f"needs {d.memory_bytes / GB:.2f} GB on {d.name}, which has {d.memory_cap_bytes / GB:.2f} GB "
                           f"free for training ({d.kind})")
        return out


# -- the model ---------------------------------------------------------------------------
@dataclass(frozen=True)
class DeviceWork:
    """Durations (seconds, this device's speed) and sizes (bytes) of one device's ops.

    ``embed_fwd_s``, ``head_s`` (head forward and backward with the loss) and
    ``embed_bwd_s`` are zero on devices that own no data. Per micro-batch except
    ``optim_s``.
    """

    blocks_fwd_s: float
    blocks_bwd_s: float
    embed_fwd_s: float
    head_s: float
    embed_bwd_s: float
    optim_s: float
    params_bytes: float  # at full size: this device's part of its blocks, plus embed and head on an owner
    act_bytes: float  # kept per micro-batch in flight
    transient_bytes: float  # the head's logits and their gradient
    state_bytes: dict[str, float] = field(default_factory=dict)  # params, grads, optimizer as the mode holds them
    # a stage that recomputes (``StagePlan.recompute``): the largest block's activations,
    # rebuilt one block at a time in the backward (``act_bytes`` then holds the blocks' inputs only)
    recompute_bytes: float = 0.0
    # the trainable part of ``params_bytes`` (``cost.profile.with_tuning``; -1: all of it)
    trainable_bytes: float = -1.0
    # ``bwd_left_s[r]``: the backward per micro-batch left when the stage's first r
    # blocks' remains (their backward, and their forward again where the stage
    # recomputes): what a gradient bucket final then can hide behind
    # (``GroupComm.exposed_sync_s``); ``bwd_left_s[0] = 0``
    bwd_left_s: tuple[float, ...] = (0.0,)
    # the boundary codec's passes per micro-batch (``train.wire.activations``), counted in
    # ``blocks_fwd_s`` and ``blocks_bwd_s`` (``boundary_codec``)
    codec_s: float = 0.0
    # reference seconds to this device's: its slowness against the profile's device
    slow: float = 1.0

    @property
    def backup_bytes(self) -> float:
        """What a backup of this device carries: its trainable parameters as its mode
        holds them, and their optimizer state. The frozen base is never backed up (it
        comes from the run's initial state); for a mode that shards (fsdp), the held
        parameters are taken to be trainable in the device's overall proportion."""
        held = self.state_bytes.get("params", 0.0)
        if 0 <= self.trainable_bytes < self.params_bytes:
            held *= self.trainable_bytes / self.params_bytes
        return held + self.state_bytes.get("optimizer", 0.0)

    @property
    def static_bytes(self) -> float:
        """Parameters, gradients and optimizer state (without the runtime's own)."""
        return sum(self.state_bytes.values())

    @property
    def fwd_s(self) -> float:
        return self.embed_fwd_s + self.blocks_fwd_s

    @property
    def bwd_s(self) -> float:
        return self.head_s + self.blocks_bwd_s + self.embed_bwd_s


def block_costs(blocks, tokens: float, ctx: float, head_frac: float = 1.0,
                ffn_frac: float = 1.0) -> tuple[list[float], list[float], list[float]]:
    """Per block, on the reference device: forward seconds, backward seconds and the
    activation bytes kept for backward, for ``tokens`` query tokens against ``ctx``
    context tokens with a fraction of the heads and FFN columns (``cost.profile``). The
    one source of a block's compute: ``device_work`` sums it, ``planner.tables`` takes
    its prefix sums. Under bf16/fp16 the kept bytes include the weight copies autocast
    keeps per micro-batch (``LayerProfile.cast_bytes``; zero in fp32)."""
    return ([lp.fixed_fwd_s + lp.fwd_s.at(tokens, ctx, head_frac, ffn_frac) for lp in blocks],
            [lp.fixed_bwd_s + lp.bwd_s.at(tokens, ctx, head_frac, ffn_frac) for lp in blocks],
            [lp.act_bytes.at(tokens, ctx, head_frac, ffn_frac) + lp.cast_at(head_frac, ffn_frac) for lp in blocks])


def owner_costs(profile: ModelProfile, tokens: float, ctx: float) -> tuple[float, float, float, float]:
    """A data owner's parts for ``tokens`` of its own, on the reference device: embed
    forward, head (forward and backward with the loss) and embed backward seconds, and
    the head's transient bytes (logits and their gradient)."""
    emb, head = profile.embed, profile.head
    return (emb.fixed_fwd_s + emb.fwd_s.at(tokens, ctx),
            head.fixed_fwd_s + head.fixed_bwd_s + head.fwd_s.at(tokens, ctx) + head.bwd_s.at(tokens, ctx),
            emb.fixed_bwd_s + emb.bwd_s.at(tokens, ctx), head.act_bytes.at(tokens, ctx))


def stage_work(plan: Plan, s: int, profile: ModelProfile, shape: Shape) -> StageWork:
    """What stage s's mode needs to price its memory and collectives (``modes.base``)."""
    lay = Layout.of(plan, shape)
    st = plan.stages[s]
    owns = tuple(s == 0 and lay.owners[i] != EMPTY for i in range(len(st.devices)))
    return StageWork(stage=s, names=st.devices, split=lay.splits[s], microbatch=lay.microbatch, shape=shape,
                     profile=profile, layers=st.layers, owns_data=owns)


def device_work(plan: Plan, pool: PoolSpec, profile: ModelProfile, shape: Shape) -> dict[str, DeviceWork]:
    """Every device's compute durations and memory sizes (see the module docstring)."""
    if plan.num_layers != profile.num_layers:
        raise PlanError(f"plan has {plan.num_layers} layers but the profile's model has {profile.num_layers}; "
                        "re-plan for this model")
    devs = {d.name: d for d in pool.devices}
    for name in plan.devices:
        if name not in devs:
            raise PlanError(f"plan uses device {name!r}, which is not in the pool ({', '.join(devs)})")
    T_seq = shape.seq_len
    ref = profile.reference_speed
    lay = Layout.of(plan, shape)
    owners = lay.owners
    codec = boundary_codec(plan, shape, profile)
    out: dict[str, DeviceWork] = {}
    for s, st in enumerate(plan.stages):
        a, b = st.layers
        blocks = profile.blocks[a:b]
        mode = modes.get(st.mode)
        sw = stage_work(plan, s, profile, shape)
        for i, name in enumerate(st.devices):
            slow = ref / device_speed(devs[name], power_mode_of(plan, devs[name]))
            tokens, hf, ff = mode.block_part(lay.splits[s], i, lay.microbatch, shape)
            fs, bs, acts = block_costs(blocks, tokens, T_seq, hf, ff)
            f, bw, act = sum(fs), sum(bs), sum(acts)
            # the backward left when the first r blocks' remains (r = 0 .. number of blocks)
            per = [bb + (ff_ if st.recompute else 0.0) for bb, ff_ in zip(bs, fs)]
            left = list(itertools.accumulate(per, initial=0.0))
            redo = 0.0
            if st.recompute:  # keep each block's input; its forward runs again in the backward
                bw, redo = bw + f, max(acts)
                act = len(blocks) * tokens * profile.dims.hidden * profile.dtype_bytes
            params = sum(lp.params_at(hf, ff) for lp in blocks)
            trainable = sum(lp.trainable_at(hf, ff) for lp in blocks)
            ef = hd = eb = transient = 0.0
            if s == 0:
                b0, b1, t0, t1 = owners[i]
                own = (b1 - b0) * (t1 - t0)
                if own > 0:
                    ef, hd, eb, transient = owner_costs(profile, own, T_seq)
                    params += profile.embed.params_at() + profile.head.params_at()
                    trainable += profile.embed.trainable_at() + profile.head.trainable_at()
            # the optimizer steps on the trainable parameters only (``cost.profile.with_tuning``)
            optim_params = trainable * mode.optim_fraction(len(st.devices))
            # the boundary codec's passes, counted with the blocks (APPROXIMATION: the
            # runtime runs them in the send and receive ops around them)
            cf, cb = codec.get(name, (0.0, 0.0))
            f, bw = f + cf, bw + cb
            out[name] = DeviceWork(
                codec_s=(cf + cb) * slow, slow=slow,
                blocks_fwd_s=f * slow, blocks_bwd_s=bw * slow, embed_fwd_s=ef * slow, head_s=hd * slow,
                embed_bwd_s=eb * slow, optim_s=slow * profile.optim_s_per_param_byte * optim_params,
                params_bytes=params, act_bytes=act, transient_bytes=transient,
                state_bytes=mode.memory(sw, i, params, trainable), recompute_bytes=redo, trainable_bytes=trainable,
                bwd_left_s=tuple(slow * h for h in left))
    return out


def group_comm(plan: Plan, s: int, profile: ModelProfile, shape: Shape, net: Network) -> GroupComm:
    """Stage s's collectives per micro-batch and its gradient sync, as the runtime runs
    them: its mode's ``comm`` (``edgepool.modes``); a stage that recomputes runs its
    forward collectives again in the backward where its mode's are in its blocks."""
    mode = modes.get(plan.stages[s].mode)
    gc = mode.comm(stage_work(plan, s, profile, shape), net)
    if not (plan.stages[s].recompute and mode.recompute_repeats_collectives):
        return gc
    bwd = dict(gc.coll_send_bytes_bwd)
    for n, b in gc.coll_send_bytes.items():
        bwd[n] = bwd.get(n, 0.0) + b
    return replace(gc, coll_bwd_s=gc.coll_bwd_s + gc.coll_fwd_s,
                   coll_airtime_s=gc.coll_airtime_s + gc.coll_airtime_fwd_s,
                   coll_send_bytes_bwd=bwd, coll_steps_bwd=gc.coll_steps_bwd + gc.coll_steps)


def boundary_flows(plan: Plan, shape: Shape, profile: ModelProfile, k: int, backward: bool) -> list[tuple[str, str, float]]:
    """Non-local transfers ``(src device, dst device, bytes)`` across boundary k, as the
    wire sends them (``ModelProfile.wire_row_bytes`` a row, and the codec's header)."""
    unit, header = profile.wire_row_bytes, HEADER_BYTES[profile.wire_activations]
    out = []
    for t in Layout.of(plan, shape).boundary(k, backward=backward):
        src, dst = plan.devices[t.src], plan.devices[t.dst]
        if src != dst:
            out.append((src, dst, (t.region[1] - t.region[0]) * (t.region[3] - t.region[2]) * unit + header))
    return out


def boundary_codec(plan: Plan, shape: Shape, profile: ModelProfile) -> dict[str, tuple[float, float]]:
    """Each device's boundary codec seconds per micro-batch on the reference device, as
    (forward side, backward side): the sender encodes and the receiver decodes every
    non-local transfer (``cost.wire.CODEC_TRAFFIC_BYTES`` at the profile's
    ``traffic_s_per_byte``). A pass is on the side of the op that runs it: a forward
    transfer's encode and decode forward, except the owners' decode of the last stage's
    output (their ``head``, in the backward); a gradient's both backward. Empty when
    the boundaries are sent as they are (fp32)."""
    enc_b, dec_b = CODEC_TRAFFIC_BYTES[profile.wire_activations]
    if not enc_b and not dec_b:
        return {}
    per = profile.traffic_s_per_byte * profile.dims.hidden  # seconds per byte-per-element, a row
    out: dict[str, list[float]] = {}
    S = len(plan.stages)
    for k in range(S + 1):
        for bw in (False, True):
            for t in Layout.of(plan, shape).boundary(k, backward=bw):
                src, dst = plan.devices[t.src], plan.devices[t.dst]
                if src == dst:
                    continue
                rows = (t.region[1] - t.region[0]) * (t.region[3] - t.region[2])
                out.setdefault(src, [0.0, 0.0])[int(bw)] += rows * per * enc_b
                out.setdefault(dst, [0.0, 0.0])[int(bw or k == S)] += rows * per * dec_b
    return {n: (f, b) for n, (f, b) in out.items()}


def sync_codec_s(gc: GroupComm, profile: ModelProfile, slow: float) -> float:
    """Seconds a member of a group compresses its sync's gradients per step (PowerSGD:
    ``GroupComm.sync_flops`` at the profile's ``matmul_s_per_flop``, its elementwise
    passes at ``traffic_s_per_byte``), ``slow`` times the reference device's; 0 without."""
    return slow * profile.compress_s(gc.sync_flops, gc.sync_traffic_bytes)


BACKUP_SHARE = 0.1  # ``replicate_every: auto`` keeps the backups under this share of the training time


@dataclass(frozen=True)
class BackupCost:
    """What the in-memory backups (``runtime.regroup``, every ``every`` steps) add to a
    step of a plan.

    Every rank copies its state (its trainable parameters and their optimizer state as
    its mode holds them, ``DeviceWork.backup_bytes``: ``state_bytes`` less gradients in
    full training; the frozen base of a fine-tuning is never backed up) and sends it to the rank that backs it up
    (``specs.layout.backups``; a dp twin needs none); the sends of a round take their
    ``Network.transfer_time`` and run in the background while the next ``every`` steps
    go on, in the time the network is idle (each step's own transfers keep it busy
    ``busy_s``). What does not fit there delays the next round's boundary, so the steps
    grow by it over ``every`` (``time_s``). ``auto`` (``train.replicate_every``) picks the
    smallest ``every`` that keeps that under ``BACKUP_SHARE`` of the step. The copy and
    its serialization on the CPU are not counted.

    Memory, as ``runtime.regroup.Regroup.keep_state`` holds it (``held_bytes``): a
    round's own copy plus the replicas kept (``steady_bytes``) are held through the
    steps that follow, next to the activations. The first round is taken when a fresh
    run starts, before any optimizer step: the optimizer's state (AdamW's moments) is
    created lazily at the first step, so that round carries parameters only
    (``first_bytes``). A later round's copies join the previous round's, which go only
    at the next round's boundary (once every rank confirmed the round in flight), so
    from the third round on two full rounds are held through every step."""

    time_s: float
    bytes_moved: dict[str, float]
    steady_bytes: dict[str, float]  # one round with optimizer state: own copy + replicas
    every: int = 0  # steps between two rounds (0: no backups)
    first_bytes: dict[str, float] = field(default_factory=dict)  # the first round: parameters only

    def held_bytes(self, name: str, steps: int | None = None) -> float:
        """The backups' bytes ``name`` holds through a step, at the most, over a fresh run of
        ``steps`` steps (None: a long run). Rounds are taken when the run starts and after
        every ``every``-th step but the last (``runtime.train``): the start's alone
        (``steps <= every``) holds parameters only; with a second round both are held;
        from a third on, two rounds with optimizer state."""
        one = self.steady_bytes.get(name, 0.0)
        if not one or not self.every:
            return 0.0
        first = self.first_bytes.get(name, one)
        if steps is not None and steps <= self.every:
            return first
        if steps is not None and steps <= 2 * self.every:
            return first + one
        return 2 * one


def backup_cost(plan: Plan, work: dict[str, DeviceWork], net: Network, every: int | str,
                step_s: float = 0.0, busy_s: float = 0.0) -> BackupCost:
    """``BackupCost`` of ``plan``; ``step_s``: its step without backups, ``busy_s`` the
    time its own transfers keep the network busy in it."""
    import math

    from edgepool.specs.layout import backups

    if not every or plan.world_size < 2:
        return BackupCost(0.0, {}, {})
    state = {n: w.backup_bytes for n, w in work.items()}
    # the run's first round, before the first optimizer step: no optimizer state yet
    first = {n: w.backup_bytes - w.state_bytes.get("optimizer", 0.0) for n, w in work.items()}
    flows = [(plan.devices[r], plan.devices[b], state[plan.devices[r]]) for r, b in backups(plan).items()]
    round_s = net.transfer_time(flows)
    idle_s = max(0.0, step_s - busy_s)
    if every == "auto":  # (round_s - every * idle_s) / every <= BACKUP_SHARE * step_s
        every = max(1, math.ceil(round_s / (idle_s + BACKUP_SHARE * step_s))) if step_s > 0 else 1
    held, held_first = dict(state), dict(first)
    moved = {n: 0.0 for n in plan.devices}
    for src, dst, nb in flows:
        held[dst] += nb
        held_first[dst] += first[src]
        moved[src] += nb / every
        moved[dst] += nb / every
    return BackupCost(time_s=max(0.0, round_s - every * idle_s) / every, bytes_moved=moved, steady_bytes=held,
                      every=int(every), first_bytes=held_first)


def estimate(plan: Plan, pool: PoolSpec, profile: ModelProfile, shape: Shape, *, network: Network | None = None,
             steps: int | None = None) -> PlanCost:
    """The cost model's prediction for one step of ``plan`` (see the module docstring).
    ``steps``: the length of the run whose peak memory is wanted, when known (it sets which
    rounds of in-memory backups it holds, ``BackupCost.held_bytes``); None: a long run."""
    net = network or Network.of(pool)
    devs = {d.name: d for d in pool.devices}
    work = device_work(plan, pool, profile, shape)
    S, M = len(plan.stages), plan.num_microbatches
    mode_of = {n: power_mode_of(plan, devs[n]) for n in plan.devices}
    dev_bytes: dict[str, float] = {n: 0.0 for n in plan.devices}
    stage_costs: list[StageCost] = []
    group_comms: dict[int, GroupComm] = {}
    chan_f = chan_b = 0.0
    for s, st in enumerate(plan.stages):
        names = list(st.devices)
        n = len(names)
        gc = group_comms[s] = group_comm(plan, s, profile, shape, net)
        for x in names:
            # A ring sends and receives the same volume on every device.
            dev_bytes[x] += M * 2 * (gc.coll_send_bytes[x] + gc.coll_send_bytes_bwd[x])
            if gc.sync_bytes:
                dev_bytes[x] += 2 * (2.0 * (n - 1) / n * gc.sync_bytes)
        chan_f += gc.coll_airtime_fwd_s
        chan_b += gc.coll_airtime_s - gc.coll_airtime_fwd_s
        inflight = inflight_limit(S, s, M, plan.schedule)
        codec_s = max(sync_codec_s(gc, profile, work[x].slow) for x in names)
        stage_costs.append(StageCost(
            fwd_s=max(work[x].fwd_s for x in names) + gc.coll_fwd_s,
            bwd_s=max(work[x].bwd_s for x in names) + gc.coll_bwd_s,
            coll_fwd_s=gc.coll_fwd_s, coll_bwd_s=gc.coll_bwd_s, coll_airtime_s=gc.coll_airtime_s, sync_s=gc.sync_s,
            inflight=inflight, sync_exposed_s=gc.exposed_sync_s(
                [max(work[x].bwd_left_s[r] for x in names) for r in range(len(work[names[0]].bwd_left_s))]) + codec_s,
            sync_codec_s=codec_s))

    links: list[LinkCost] = []
    for k in range(S + 1):
        flows = {bw: boundary_flows(plan, shape, profile, k, bw) for bw in (False, True)}
        if not flows[False] and not flows[True]:
            continue
        for fl in flows.values():
            for src, dst, nb in fl:
                dev_bytes[src] += M * nb
                dev_bytes[dst] += M * nb
        air_f, air_b = net.airtime(flows[False]), net.airtime(flows[True])
        chan_f += air_f
        chan_b += air_b
        # Boundary 0 (the data owner feeding its own tp/sp group) and, in a single stage,
        # boundary 1 (the group returning to its owner) run inside stage 0's synchronous
        # group work, one micro-batch at a time: serial with it, not a pipelined machine.
        in_stage = k == 0 or (k == S and S == 1)
        links.append(LinkCost(k=k, fwd_s=net.transfer_time(flows[False]), bwd_s=net.transfer_time(flows[True]),
                              airtime_s=air_f + air_b, fwd_bytes=sum(x[2] for x in flows[False]),
                              bwd_bytes=sum(x[2] for x in flows[True]), in_stage=in_stage))

    # -- step time ---------------------------------------------------------------------
    own_f = sum(lk.fwd_s for lk in links if lk.in_stage and lk.k == 0)
    own_b = sum(lk.bwd_s + (lk.fwd_s if lk.k != 0 else 0.0) for lk in links if lk.in_stage)
    machines = [(f"stage {s}", sc.fwd_s + (own_f if s == 0 else 0.0), sc.bwd_s + (own_b if s == 0 else 0.0))
                for s, sc in enumerate(stage_costs)]
    machines += [(f"boundary {lk.k}", lk.fwd_s, lk.bwd_s) for lk in links if not lk.in_stage]
    chan = chan_f + chan_b
    fill = sum(f + b for _, f, b in machines)
    worst = max(machines, key=lambda m: m[1] + m[2])
    if plan.schedule == "gpipe":
        period = max(f for _, f, _ in machines) + max(b for _, _, b in machines)
    else:
        period = worst[1] + worst[2]
    pipe = fill + (M - 1) * period
    bottleneck = worst[0]
    if S >= 2 and chan > 0:
        chan_0 = stage_costs[0].coll_airtime_s + sum(lk.airtime_s for lk in links if lk.in_stage)
        channel_bound = machines[0][1] + machines[0][2] - chan_0 + M * chan
        if channel_bound > pipe:
            pipe, bottleneck = channel_bound, "shared channel"
    sync_total = sum(sc.sync_exposed_s for sc in stage_costs)
    optim_first = max(work[n].optim_s for n in plan.stages[0].devices)
    # the network's busy time in a step: every micro-batch's boundary and collective airtime, and the syncs
    backup = backup_cost(plan, work, net, profile.backup_every, step_s=pipe + sync_total + optim_first,
                         busy_s=min(pipe, M * chan) + sum(sc.sync_s for sc in stage_costs))
    step = pipe + sync_total + optim_first + backup.time_s
    for n, b in backup.bytes_moved.items():
        dev_bytes[n] += b

    # -- per device: memory and energy ---------------------------------------------------
    out: dict[str, DeviceCost] = {}
    for s, st in enumerate(plan.stages):
        for name in st.devices:
            dev = devs[name]
            kind = catalog.get(dev.kind)
            pm = kind.power_mode(mode_of[name])
            w = work[name]
            busy = M * (w.fwd_s + w.bwd_s) + w.optim_s + sync_codec_s(group_comms[s], profile, w.slow)
            act = w.act_bytes * stage_costs[s].inflight
            # the head's logits and a recomputed block's activations are never live at once
            transient = max(w.transient_bytes, w.recompute_bytes)
            mem_parts = {"runtime": profile.runtime_bytes, **w.state_bytes, "activations": act,
                         "transient": transient}
            if backup.steady_bytes:
                mem_parts["backups"] = backup.held_bytes(name, steps)
            out[name] = DeviceCost(
                name=name, kind=dev.kind, power_mode=pm.name, stage=s, speed=device_speed(dev, pm.name),
                fwd_s=w.fwd_s, bwd_s=w.bwd_s, busy_s=busy,
                memory_bytes=sum(mem_parts.values()), memory_cap_bytes=memory_cap_bytes(dev), memory_parts=mem_parts,
                bytes_moved=dev_bytes[name],
                **EnergyParts.of(busy_w=pm.busy_w, idle_w=pm.idle_w, radio_j_per_mb=kind.radio_j_per_mb, wall_s=step,
                                 busy_s=busy, radio_bytes=dev_bytes[name]),
            )
    return PlanCost(
        plan_id=plan.plan_id, schedule=plan.schedule, num_microbatches=M, step_time_s=step, pipe_s=pipe, fill_s=fill,
        period_s=period, chan_s=chan, sync_s=sync_total, optim_s=optim_first, backup_s=backup.time_s,
        backup_every=backup.every,
        bottleneck=bottleneck,
        stages=tuple(stage_costs), links=tuple(links), devices=out,
    )
