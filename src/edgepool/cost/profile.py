"""Per-layer cost profiles of a model on a reference device (JSON-serialisable).

A ``ModelProfile`` says how long each part of the model takes and how much memory it
holds on one reference device kind (in one power mode). The cost model scales it to
any other device by catalog speed: a device ``r`` times faster than the reference runs
every part ``r`` times faster (a speed-ratio model; memory-bound parts are assumed to
scale like compute, which is the simplification a measured profile corrects).

Each layer's cost is split by how it divides under the three intra-stage modes, so one
profile serves dp, sp and tp stages:

- ``rep``: work per token that every tp rank repeats (norms, residuals, biases);
- ``head``: work per token split by attention heads (q, k, v and output projections);
- ``ffn``: work per token split by FFN columns;
- ``quad``: work per token *per context token*, split by heads (scores, softmax,
  attention-weighted values). This is what makes attention quadratic in the sequence.

So a device that computes ``tokens`` query tokens against ``ctx`` context tokens with a
fraction ``h`` of the heads and ``f`` of the FFN columns spends
``tokens * (rep + head*h + ffn*f + quad*ctx*h)`` plus a fixed per-call overhead. dp
gives it fewer samples, sp fewer query tokens (the context stays the whole sequence,
because K and V are all-gathered), tp fewer heads and columns.

Units: seconds (``_s``) on the reference device, bytes (``_bytes``), FLOPs (``_flops``).
A profile is shape-free: batch and sequence enter only through ``tokens`` and ``ctx``.

``analytic_profile`` builds a profile from model dimensions when nothing was measured:
FLOPs per token per part (the usual 2 FLOPs per multiply-accumulate count, backward =
2 x forward, after Kaplan et al. 2020 and Narayanan et al. 2021), divided by the
reference kind's effective rate from the catalog. Activation memory kept for backward
follows the per-layer count of Korthikanti et al. 2022 ("Reducing Activation
Recomputation in Large Transformer Models", arXiv 2205.05198), adapted to fp32 and no
dropout. Fixed per-call overheads are an estimate (kernel launches), documented on the
parameters.

**Precision** (``ModelProfile.precision``, the job's ``train.precision``). Under bf16 or
fp16 autocast the parameters, gradients, optimizer state and the boundary rows stay
fp32 (``dtype_bytes`` is still 4); what changes is what autocast keeps for backward. By
part of the count above (``AUTOCAST_ACT``): ``head``, ``ffn`` and ``quad`` tensors are
matmul inputs and outputs, kept at half size (0.5); of ``rep``'s four h-vectors, the
norms' inputs stay fp32 (norms run in fp32) and their outputs are kept as the half-size
copies the next matmul casts (0.75). Autocast also keeps, for every micro-batch in
flight until its backward, a half-size copy of each weight it casts
(``LayerProfile.cast_bytes``: 2 bytes per matmul parameter of the block, per call):
for GPT-2 124M that is about 0.17 GB per micro-batch, as much as its kept activations
at 512 tokens. Measured on tiny GPT, LLaMA and BERT blocks (``_saved_bytes`` of the
profiler, bf16): 0.55-0.63 of the fp32 bytes per token, against 0.58-0.6 here. The
head's transient (logits and their gradient) is left at its fp32 size: the loss is
computed in fp32 on an fp32 copy of the half-size logits, so its peak hardly falls.
APPROXIMATIONS: the analytic *times* are not changed by precision (the catalog's fp16
peaks are GPU tensor-core figures, while the runtime computes on the CPU, where bf16
autocast can be slower than fp32); a measured profile (``edgepool profile``) times the
parts under autocast. Collectives inside tp and sp groups carry autocast's half-size
partial sums and K/V, but are priced at ``dtype_bytes`` (an overestimate, by 2x, of
those bytes).

**Fine-tuning** (``train.lora``, ``train.freeze``): ``with_tuning`` (applied by
``for_job``) adds LoRA's adapter bytes to the blocks, sets each unit's trainable
fraction (``LayerProfile.trainable_frac``) and takes the frozen weights' gradients out of
the backward times; its docstring says what is modelled and what is approximated.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from edgepool import catalog
from edgepool.errors import SpecError

PROFILE_SCHEMA_VERSION = 1
PRECISIONS = ("fp32", "bf16", "fp16")
HALF_BYTES = 2  # bytes of a bf16 or fp16 element
OPT_STATE_FACTOR = {"adamw": 2.0, "sgd": 0.0}  # optimizer state bytes per parameter byte
# Bytes of memory traffic per parameter byte in one optimizer step: AdamW reads p, g, m,
# v and writes p, m, v (7 fp32 tensors); SGD reads p, g and writes p (3).
OPT_TRAFFIC_FACTOR = {"adamw": 7.0, "sgd": 3.0}


@dataclass(frozen=True)
class Parts:
    """A cost split by how it divides under tp (see the module docstring)."""

    rep: float = 0.0
    head: float = 0.0
    ffn: float = 0.0
    quad: float = 0.0

    def at(self, tokens: float, ctx: float, head_frac: float = 1.0, ffn_frac: float = 1.0) -> float:
        return tokens * (self.rep + self.head * head_frac + self.ffn * ffn_frac + self.quad * ctx * head_frac)

    def total(self, ctx: float) -> float:
        """Per token with all heads and columns."""
        return self.rep + self.head + self.ffn + self.quad * ctx

    def scaled(self, k: float) -> "Parts":
        return Parts(self.rep * k, self.head * k, self.ffn * k, self.quad * k)

    def times(self, k: "Parts") -> "Parts":
        """Part by part product."""
        return Parts(self.rep * k.rep, self.head * k.head, self.ffn * k.ffn, self.quad * k.quad)


# The fraction of each part's kept activation bytes that remains under bf16/fp16
# autocast (see the module docstring; fp32: all of it).
AUTOCAST_ACT = Parts(rep=0.75, head=0.5, ffn=0.5, quad=0.5)


@dataclass(frozen=True)
class LayerProfile:
    """One part of the model on the reference device.

    ``fwd_s``/``bwd_s``: seconds per token (quad: per token per context token);
    ``fixed_fwd_s``/``fixed_bwd_s``: seconds per call, whatever the size;
    ``params_bytes``: parameter bytes by part (quad unused);
    ``act_bytes``: activation bytes per token kept from forward to backward;
    ``cast_bytes``: bytes kept per call (per micro-batch in flight), whatever the
    tokens: the half-size weight copies autocast makes (zero in fp32);
    ``trainable_frac``: the fraction of ``params_bytes`` that trains (gets gradients and
    optimizer state; ``with_tuning``): 1 in full training, the adapters' share under
    LoRA, 0 for a frozen unit;
    ``sync_frac``: the fraction of the trainable bytes a dp/sp gradient sync sends
    (``cost.wire.with_wire``: PowerSGD's factors; 1 uncompressed), ``sync_flops`` and
    ``sync_traffic_bytes`` what compressing them costs per step (0 uncompressed).
    """

    name: str
    fwd_s: Parts
    bwd_s: Parts
    params_bytes: Parts
    act_bytes: Parts
    fixed_fwd_s: float = 0.0
    fixed_bwd_s: float = 0.0
    cast_bytes: Parts = Parts()
    trainable_frac: float = 1.0
    sync_frac: float = 1.0
    sync_flops: float = 0.0
    sync_traffic_bytes: float = 0.0

    def cast_at(self, head_frac: float = 1.0, ffn_frac: float = 1.0) -> float:
        c = self.cast_bytes
        return c.rep + c.head * head_frac + c.ffn * ffn_frac

    def params_at(self, head_frac: float = 1.0, ffn_frac: float = 1.0) -> float:
        p = self.params_bytes
        return p.rep + p.head * head_frac + p.ffn * ffn_frac

    def trainable_at(self, head_frac: float = 1.0, ffn_frac: float = 1.0) -> float:
        """The trainable bytes of ``params_at``: the unit's ``trainable_frac`` of them
        (under tp every slice is taken to hold the same fraction: see ``with_tuning``)."""
        return self.trainable_frac * self.params_at(head_frac, ffn_frac)

    def sync_at(self) -> float:
        """The bytes a replica's gradient sync of the whole unit puts into its
        all-reduces: its trainable bytes, PowerSGD's factors where compressed."""
        return self.sync_frac * self.trainable_at()


@dataclass(frozen=True)
class ModelDims:
    """The model dimensions the cost model needs (duck-compatible with ModelConfig)."""

    family: str
    vocab_size: int
    hidden: int
    num_layers: int
    num_heads: int
    ffn: int
    num_kv_heads: int | None = None
    max_seq_len: int = 512

    @property
    def kv_dim(self) -> int:
        return (self.num_kv_heads or self.num_heads) * (self.hidden // self.num_heads)

    @classmethod
    def of(cls, cfg: Any) -> "ModelDims":
        """From a ``ModelConfig`` (or anything with the same attributes)."""
        return cls(family=cfg.family, vocab_size=cfg.vocab_size, hidden=cfg.hidden, num_layers=cfg.num_layers,
                   num_heads=cfg.num_heads, ffn=cfg.ffn, num_kv_heads=cfg.num_kv_heads,
                   max_seq_len=getattr(cfg, "max_seq_len", 512))


@dataclass(frozen=True)
class ModelProfile:
    """Costs of every part of a model on ``reference_kind`` in ``reference_mode``.

    ``blocks[i]`` is Transformer block i; ``embed`` and ``head`` run on the data owners
    (see ``specs.layout.Layout.owners``). ``head.act_bytes`` is a transient peak (logits
    and their gradient live only during the head's own forward and backward).
    ``optim_s_per_param_byte`` is the optimizer step's time per parameter byte on the
    reference device; ``opt_state_factor`` the optimizer state bytes per parameter byte.
    """

    model: str
    dims: ModelDims
    blocks: tuple[LayerProfile, ...]
    embed: LayerProfile
    head: LayerProfile
    reference_kind: str = catalog.REFERENCE_KIND
    reference_mode: str | None = None
    dtype_bytes: int = 4
    # The compute precision the profile prices (``train.precision``; module docstring):
    # kept activations and, in a measured profile, times.
    precision: str = "fp32"
    optimizer: str = "adamw"
    opt_state_factor: float = 2.0
    optim_s_per_param_byte: float = 0.0
    source: str = "analytic"
    # Resident memory of a rank before any model exists (interpreter, torch, gloo). The
    # default is an ESTIMATE from ranks measured on an x86 host with torch 2.13 CPU
    # (about 0.3 GB); the profiler measures it. A CUDA runtime on a Jetson adds more.
    runtime_bytes: float = 0.3e9
    # What a mode's own libraries add to a rank's resident memory, measured by the
    # profiler as (mode, bytes) pairs: fsdp imports FSDP2 and DTensor. Not in an analytic
    # profile (nothing measured there).
    mode_runtime_bytes: tuple[tuple[str, float], ...] = ()
    # The reference device's speed in the pool's speed units, when it is not a catalog
    # figure: a profile measured on one host core, for devices that the testbed gives
    # ``speed * cores_per_speed`` cores, has speed ``1 / cores_per_speed``.
    reference_speed_value: float | None = None
    # How the job keeps its state safe, beyond the optimizer: every this many steps each
    # rank backs its state up in a peer's memory (``train.replicate_every`` of a run that
    # recovers: a count or "auto"; 0: never). ``for_job`` sets it; the cost model charges
    # the backups (``cost.model.BackupCost``).
    backup_every: int | str = 0
    # The fine-tuning the profile prices (``with_tuning``: LoRA adapters, frozen
    # parameters), as a one-line key; "" for full training.
    tuning: str = ""
    # Compression on the wire (``train.wire``; ``cost.wire.with_wire``): the boundary
    # codec, and PowerSGD's rank (0: gradients summed whole).
    wire_activations: str = "fp32"
    powersgd_rank: int = 0
    notes: tuple[str, ...] = field(default_factory=tuple)
    schema_version: int = PROFILE_SCHEMA_VERSION

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    def mode_runtime(self, mode: str) -> float:
        """``mode_runtime_bytes`` of ``mode`` (0 when not measured)."""
        return dict(self.mode_runtime_bytes).get(mode, 0.0)

    @property
    def reference_speed(self) -> float:
        """Relative speed of the device the profile was taken on (catalog, unless given)."""
        if self.reference_speed_value is not None:
            return self.reference_speed_value
        return catalog.get(self.reference_kind).relative_speed(self.reference_mode)

    @property
    def act_elem_bytes(self) -> int:
        """Bytes of one hidden-size activation vector of one token (in memory)."""
        return self.dims.hidden * self.dtype_bytes

    @property
    def wire_row_bytes(self) -> int:
        """Bytes of one token's boundary row on the wire (``wire_activations``'s codec;
        int8's scale, ``cost.wire.HEADER_BYTES``, comes once per transfer on top)."""
        from edgepool.cost.wire import ELEM_BYTES

        return self.dims.hidden * (ELEM_BYTES[self.wire_activations] if self.wire_activations != "fp32"
                                   else self.dtype_bytes)

    @property
    def traffic_s_per_byte(self) -> float:
        """Seconds per byte read or written by an elementwise pass on the reference
        device: the optimizer step's time per byte of its memory traffic
        (``OPT_TRAFFIC_FACTOR``), measured where the profiler timed it."""
        return self.optim_s_per_param_byte / OPT_TRAFFIC_FACTOR[self.optimizer]

    def compress_s(self, flops: float, traffic_bytes: float) -> float:
        """Reference seconds of ``flops`` of matmuls and ``traffic_bytes`` of elementwise
        passes (PowerSGD's compression of a sync: ``LayerProfile.sync_flops``, ``sync_traffic_bytes``)."""
        return flops * self.matmul_s_per_flop + traffic_bytes * self.traffic_s_per_byte

    @property
    def matmul_s_per_flop(self) -> float:
        """Seconds per matmul FLOP on the reference device: a block's attention
        projections' forward time over their FLOPs (``block_flops``), measured where the
        profile was (0 for a model without blocks)."""
        flops = block_flops(self.dims)[0].head
        return self.blocks[0].fwd_s.head / flops if self.blocks and flops > 0 else 0.0

    def scaled(self, time_factor: float) -> "ModelProfile":
        """Every time multiplied by ``time_factor`` (calibrating against a measurement)."""

        def s(lp: LayerProfile) -> LayerProfile:
            return replace(lp, fwd_s=lp.fwd_s.scaled(time_factor), bwd_s=lp.bwd_s.scaled(time_factor),
                           fixed_fwd_s=lp.fixed_fwd_s * time_factor, fixed_bwd_s=lp.fixed_bwd_s * time_factor)

        return replace(self, blocks=tuple(s(b) for b in self.blocks), embed=s(self.embed), head=s(self.head),
                       optim_s_per_param_byte=self.optim_s_per_param_byte * time_factor)

    def to_json(self) -> dict:
        return asdict(self)

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2)

    @classmethod
    def from_json(cls, data: dict) -> "ModelProfile":
        try:
            if data.get("schema_version", PROFILE_SCHEMA_VERSION) != PROFILE_SCHEMA_VERSION:
                raise SpecError(f"profile schema_version {data.get('schema_version')} is not {PROFILE_SCHEMA_VERSION}; "
                                "re-run the profiler")

            def lp(d: dict) -> LayerProfile:
                return LayerProfile(name=d["name"], fwd_s=Parts(**d["fwd_s"]), bwd_s=Parts(**d["bwd_s"]),
                                    params_bytes=Parts(**d["params_bytes"]), act_bytes=Parts(**d["act_bytes"]),
                                    fixed_fwd_s=d.get("fixed_fwd_s", 0.0), fixed_bwd_s=d.get("fixed_bwd_s", 0.0),
                                    cast_bytes=Parts(**d.get("cast_bytes", {})),
                                    trainable_frac=d.get("trainable_frac", 1.0), sync_frac=d.get("sync_frac", 1.0),
                                    sync_flops=d.get("sync_flops", 0.0),
                                    sync_traffic_bytes=d.get("sync_traffic_bytes", 0.0))

            rest = {k: v for k, v in data.items()
                    if k not in ("dims", "blocks", "embed", "head", "notes", "mode_runtime_bytes")}
            return cls(dims=ModelDims(**data["dims"]), blocks=tuple(lp(b) for b in data["blocks"]),
                       embed=lp(data["embed"]), head=lp(data["head"]), notes=tuple(data.get("notes", ())),
                       mode_runtime_bytes=tuple((str(m), float(b)) for m, b in data.get("mode_runtime_bytes", ())),
                       **rest)
        except KeyError as exc:
            raise SpecError(f"profile is missing field {exc.args[0]!r}; re-run the profiler or rebuild it") from None

    @classmethod
    def load(cls, path: str | Path) -> "ModelProfile":
        p = Path(path)
        try:
            return cls.from_json(json.loads(p.read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise SpecError(f"cannot read profile {p}: {exc}") from None


def for_job(profile: ModelProfile, job) -> ModelProfile:
    """``profile`` as ``job`` trains: its fine-tuning (``train.lora``, ``train.freeze``:
    ``with_tuning``), its compression on the wire (``train.wire``: ``cost.wire.with_wire``)
    and its in-memory backups (``backup_every``): what the runtime
    will do for a ``train`` run that recovers from a lost device. A profile of another
    precision than the job's is refused (its activations and times are not the run's)."""
    want = job.train.precision
    if profile.precision != want:
        raise SpecError(f"the profile prices {profile.precision} but the job trains in {want} (train.precision); "
                        f"measure one for {want} with `edgepool profile`, or leave --profile out for the analytic one")
    from edgepool.cost.wire import with_wire

    profile = with_tuning(profile, lora=job.train.lora, freeze=job.train.freeze)
    profile = with_wire(profile, job.train.wire, lora=job.train.lora, freeze=job.train.freeze)
    every = job.train.replicate_every if job.train.recover else 0
    return profile if profile.backup_every == every else replace(profile, backup_every=every)


def tuning_key(lora=None, freeze: tuple[str, ...] = ()) -> str:
    """A one-line name of a fine-tuning (``ModelProfile.tuning``); "" for full training."""
    if lora is not None:
        return f"lora rank {lora.rank} on {','.join(lora.targets)}"
    return f"freeze {','.join(freeze)}" if freeze else ""


_PARTS = ("rep", "head", "ffn")


def _part_of(unit: str, inner: str) -> str:
    """The ``Parts`` field a parameter's bytes belong to (``block_flops``'s split):
    attention linears (and their biases but o's) by heads, the MLP's by FFN columns,
    norms and o's bias repeated; all of embed and head is ``rep``."""
    if not unit.startswith("blocks."):
        return "rep"
    if inner.startswith("attn.") and not inner.startswith("attn.o_bias"):
        return "head"
    return "ffn" if inner.startswith("mlp.") else "rep"


def _unit_of(name: str) -> tuple[str, str]:
    top, _, rest = name.partition(".")
    if top == "blocks":
        i, _, inner = rest.partition(".")
        return f"blocks.{i}", inner
    return top, rest


# What importing peft (and the transformers and accelerate it imports) adds to a rank's
# resident memory: MEASURED on an x86 host (peft 0.21.2, transformers 5.25, torch 2.13
# CPU: 183 MB over a rank that has imported torch). A LoRA run's ranks all pay it;
# ``benchmarks/big_models.py`` found the demo pool's laptop out of memory where the
# memory model without it said the plan fit.
LORA_LIBRARIES_BYTES = 0.183e9


@dataclass(frozen=True)
class UnitTensor:
    """A parameter of the model by the unit (``embed``, ``blocks.<i>``, ``head``) and
    ``Parts`` field it belongs to; ``adapter``: a LoRA factor (trainable)."""

    unit: str
    part: str
    shape: tuple[int, ...]
    trainable: bool
    adapter: bool = False


def unit_tensors(dims: ModelDims, lora=None, freeze: tuple[str, ...] = ()) -> list[UnitTensor]:
    """Every parameter of the model (``models.config.expected_shapes``, no torch) and
    the LoRA adapters of ``lora``, with whether it trains (``models.lora.Tuning``)."""
    from edgepool.models.config import expected_shapes
    from edgepool.models.lora import Tuning, adapter_shapes

    tuning = Tuning(lora=lora, freeze=tuple(freeze or ()))
    shapes = expected_shapes(dims)
    out = []
    for name, shp in shapes.items():
        unit, inner = _unit_of(name)
        out.append(UnitTensor(unit, _part_of(unit, inner), tuple(shp), tuning.trainable(name)))
    for name, shp in (adapter_shapes(shapes, lora.rank, tuple(lora.targets)) if lora is not None else {}).items():
        unit, inner = _unit_of(name)
        out.append(UnitTensor(unit, _part_of(unit, inner), tuple(shp), True, adapter=True))
    return out


def with_tuning(profile: ModelProfile, lora=None, freeze: tuple[str, ...] = ()) -> ModelProfile:
    """``profile`` for fine-tuning a part of the model (``models.lora.Tuning``): LoRA
    adapters (``lora``, a ``specs.job.LoraSpec``; everything else frozen) or frozen
    parameters (``freeze``, fnmatch patterns on full-model names). Unchanged for full
    training; a profile already tuned the same way is returned as it is.

    What is modelled, per unit (``embed``, ``blocks.<i>``, ``head``), from the model's
    parameter names and shapes (``models.config.expected_shapes``, no torch):

    - **libraries**: a LoRA run's ranks import peft: ``LORA_LIBRARIES_BYTES`` more
      resident memory (``runtime_bytes``);
    - **bytes**: LoRA adds ``A`` [rank, in] and ``B`` [out, rank] per adapted linear,
      ``rank * (in + out) * dtype_bytes``, to the part its linear belongs to
      (attention: ``head``, MLP: ``ffn``); ``trainable_frac`` is the unit's trainable
      bytes over all its bytes (LoRA: the adapters'; embed and head frozen: 0; freeze:
      the bytes no pattern matches). The cost model and the planner give gradients,
      optimizer state and its step time, gradient syncs and backups only to trainable
      bytes (``cost.model``, ``modes.base.Mode.state_bytes``);
    - **forward**: an adapter's two matmuls cost 2 FLOPs per adapter parameter per
      token, as the base weights do per weight: a block part's forward seconds grow by
      its bytes' growth (APPROXIMATION: small rank-r matmuls run below the rate of big
      ones, so this is optimistic for them);
    - **backward**: the backward of a matmul is its input gradient plus its weight
      gradient, each about its forward's work; a frozen weight skips the second. So a
      block's ``head`` and ``ffn`` backward seconds are scaled by ``(1 + f) / 2`` with
      ``f`` that part's trainable share of its bytes, the head's (its decoder matmul
      dominates) and every unit's fixed backward seconds by ``(1 + trainable_frac) / 2``
      (APPROXIMATION: ``rep`` (norms, residuals) and ``quad`` (attention scores) are
      weight-free and unchanged, the head's softmax and loss are scaled with its
      matmul, and the kernel launches are taken to fall like the work). The embed's
      backward is its weight gradient only: scaled by ``trainable_frac``, 0 when frozen
      (the runtime skips it).

    APPROXIMATIONS: under tp, every slice of a block is taken to hold its unit's
    trainable fraction (the adapters' whole factors are not priced apart); the
    adapters' kept activations (``A x``: ``rank`` values per token) and autocast's
    copies of them are left out; a frozen block before the first trainable one still
    pays its input gradient's backward, which autograd skips on stage 0 when the embed
    is frozen too (an overestimate there); fsdp's backward reduce-scatter is priced at
    the whole unit's bytes, though it carries only trainable gradients.
    """
    freeze = tuple(freeze or ())
    key = tuning_key(lora, freeze)
    if not key:
        return profile
    if profile.tuning:
        if profile.tuning == key:
            return profile
        raise SpecError(f"the profile already prices {profile.tuning!r}, not {key!r}; start from an untuned profile")

    zero = lambda: dict.fromkeys(_PARTS, 0.0)  # noqa: E731
    base: dict[str, dict[str, float]] = {}  # unit -> part -> elements, by name
    train: dict[str, dict[str, float]] = {}
    added: dict[str, dict[str, float]] = {}  # the adapters' elements
    for t in unit_tensors(profile.dims, lora, freeze):
        n = math.prod(t.shape)
        if t.adapter:
            added.setdefault(t.unit, zero())[t.part] += n
            continue
        base.setdefault(t.unit, zero())[t.part] += n
        if t.trainable:
            train.setdefault(t.unit, zero())[t.part] += n
    e = profile.dtype_bytes
    half = profile.precision != "fp32"

    def tune(unit: str, lp: LayerProfile) -> LayerProfile:
        p = asdict(lp.params_bytes)
        b, t, a = base.get(unit, zero()), train.get(unit, zero()), added.get(unit, zero())
        # the profile's bytes of each part (measured or analytic), split as the names split them
        tot = {k: p[k] + e * a[k] for k in _PARTS}
        tr = {k: (p[k] * t[k] / b[k] if b[k] else 0.0) + e * a[k] for k in _PARTS}
        frac = sum(tr.values()) / sum(tot.values()) if sum(tot.values()) > 0 else 0.0
        fwd, bwd = asdict(lp.fwd_s), asdict(lp.bwd_s)
        if unit.startswith("blocks."):
            for k in ("head", "ffn"):
                grow = tot[k] / p[k] if p[k] > 0 else 1.0
                f = tr[k] / tot[k] if tot[k] > 0 else 0.0
                fwd[k] *= grow
                bwd[k] *= grow * (1 + f) / 2
            fixed_bwd = lp.fixed_bwd_s * (1 + frac) / 2
        elif unit == "embed":  # its backward is its weight gradient only
            bwd = {k: v * frac for k, v in bwd.items()}
            fixed_bwd = lp.fixed_bwd_s if frac > 0 else 0.0
        else:
            bwd = {k: v * (1 + frac) / 2 for k, v in bwd.items()}
            fixed_bwd = lp.fixed_bwd_s * (1 + frac) / 2
        cast = lp.cast_bytes
        if half and unit.startswith("blocks."):  # autocast's copies of the adapters too
            cast = Parts(cast.rep, cast.head + HALF_BYTES * a["head"], cast.ffn + HALF_BYTES * a["ffn"], cast.quad)
        return replace(lp, fwd_s=Parts(**fwd), bwd_s=Parts(**bwd), fixed_bwd_s=fixed_bwd, cast_bytes=cast,
                       params_bytes=Parts(tot["rep"], tot["head"], tot["ffn"], lp.params_bytes.quad),
                       trainable_frac=frac)

    out = replace(profile, blocks=tuple(tune(f"blocks.{i}", lp) for i, lp in enumerate(profile.blocks)),
                  embed=tune("embed", profile.embed), head=tune("head", profile.head), tuning=key,
                  runtime_bytes=profile.runtime_bytes + (LORA_LIBRARIES_BYTES if lora is not None else 0.0))
    share = sum(lp.trainable_at() for lp in (out.embed, out.head, *out.blocks)) / \
        max(1.0, sum(lp.params_at() for lp in (out.embed, out.head, *out.blocks)))
    return replace(out, notes=out.notes + (f"{key}: {100 * share:.2g}% of the parameter bytes train (with_tuning)",))


def block_flops(dims: ModelDims) -> tuple[Parts, Parts]:
    """Forward FLOPs of one block per token (quad: per token per context token), and
    the parameter counts by part.

    Matmul FLOPs are 2 per multiply-accumulate. Elementwise work (norms, residuals,
    activation function, softmax) is counted as a few FLOP-equivalents per element; it
    is small next to the matmuls for hidden >= 256 and is memory-bound in practice.
    """
    h, f, kv = dims.hidden, dims.ffn, dims.kv_dim
    gated = dims.family == "llama"
    flops = Parts(
        rep=20.0 * h,  # two norms and two residual adds
        head=2.0 * (2 * h * h + 2 * h * kv),  # q and o projections (h x h), k and v (h x kv)
        ffn=2.0 * (3 if gated else 2) * h * f + 8.0 * f,  # up/down (and gate) matmuls + activation
        quad=4.0 * h + 5.0 * dims.num_heads,  # q.k^T and p.v (2h each) + softmax per head
    )
    norms = 2 * h if gated else 4 * h
    if gated:
        params = Parts(rep=norms, head=2 * h * h + 2 * h * kv, ffn=3 * h * f)
    else:
        # q, o: 2hh; k, v: 2h*kv; biases of q, k, v split with heads, o's bias repeated.
        params = Parts(rep=norms + h, head=2 * h * h + 2 * h * kv + h + 2 * kv, ffn=2 * h * f + f + h)
    return flops, params


def analytic_profile(dims: ModelDims | Any, *, optimizer: str = "adamw", reference_kind: str = catalog.REFERENCE_KIND,
                     reference_mode: str | None = None, dtype_bytes: int = 4, fixed_block_s: float = 3e-4,
                     fixed_part_s: float = 1e-4, precision: str = "fp32") -> ModelProfile:
    """A FLOPs-based profile on ``reference_kind`` (see the module docstring).

    ``precision``: bf16 and fp16 keep fewer activation bytes (``AUTOCAST_ACT``) plus the
    weight copies autocast makes (``cast_bytes``); times are the same as fp32's.

    ``fixed_block_s``: per-call overhead of one block's forward on the reference device
    (an ESTIMATE: about 15 kernel launches at about 20 us on a Jetson Nano); backward
    is twice that. ``fixed_part_s``: the same for embed and head.
    """
    if not isinstance(dims, ModelDims):
        dims = ModelDims.of(dims)
    if optimizer not in OPT_STATE_FACTOR:
        raise SpecError(f"unknown optimizer {optimizer!r}; known: {', '.join(OPT_STATE_FACTOR)}")
    if precision not in PRECISIONS:
        raise SpecError(f"unknown precision {precision!r}; known: {', '.join(PRECISIONS)}")
    half = precision != "fp32"
    kind = catalog.get(reference_kind)
    rate_flops = kind.effective_gflops(reference_mode) * 1e9
    e = float(dtype_bytes)
    h, f, v = dims.hidden, dims.ffn, dims.vocab_size
    flops, params = block_flops(dims)
    gated = dims.family == "llama"
    fwd = flops.scaled(1.0 / rate_flops)
    act = Parts(
        rep=e * 4 * h,  # the two norms' inputs and outputs feed matmuls and residuals
        head=e * (2 * h + 2 * dims.kv_dim),  # q, k, v and the attention output
        ffn=e * (3 if gated else 2) * f,  # up (and gate) outputs and the activation output
        quad=e * 2 * dims.num_heads,  # scores and softmax probabilities
    )
    # under autocast: fewer bytes kept per token, and a half-size copy of every matmul
    # weight (and bias) per call; the norms' weights are not cast
    cast = Parts(head=HALF_BYTES * params.head, ffn=HALF_BYTES * params.ffn) if half else Parts()
    block = LayerProfile(name="block", fwd_s=fwd, bwd_s=fwd.scaled(2.0), params_bytes=params.scaled(e),
                         act_bytes=act.times(AUTOCAST_ACT) if half else act, fixed_fwd_s=fixed_block_s,
                         fixed_bwd_s=2 * fixed_block_s, cast_bytes=cast)
    emb_params = v * h + (0 if gated else dims.max_seq_len * h) + (3 * h if dims.family == "bert" else 0)
    embed = LayerProfile(
        name="embed", fwd_s=Parts(rep=4.0 * h / rate_flops), bwd_s=Parts(rep=8.0 * h / rate_flops),
        params_bytes=Parts(rep=e * emb_params), act_bytes=Parts(), fixed_fwd_s=fixed_part_s, fixed_bwd_s=fixed_part_s,
    )
    head_extra = (h * h + h + 2 * h) if dims.family == "bert" else 0  # bert's transform + norm
    head_flops = 2.0 * h * v + 2.0 * head_extra + 10.0 * v  # projection (+ transform) + softmax/loss
    head = LayerProfile(
        name="head", fwd_s=Parts(rep=head_flops / rate_flops), bwd_s=Parts(rep=2.0 * head_flops / rate_flops),
        params_bytes=Parts(rep=e * (h * v + v + 2 * h + head_extra)),
        act_bytes=Parts(rep=e * (2 * v + 2 * h)),  # logits and their gradient, norm input/output
        fixed_fwd_s=fixed_part_s, fixed_bwd_s=2 * fixed_part_s,
    )
    mem_rate = kind.mem_bandwidth_gbps * 1e9 * kind.power_mode(reference_mode).compute_fraction
    return ModelProfile(
        model=f"{dims.family}-h{h}-l{dims.num_layers}-a{dims.num_heads}-f{f}-v{v}",
        dims=dims, blocks=tuple(block for _ in range(dims.num_layers)), embed=embed, head=head,
        reference_kind=reference_kind, reference_mode=reference_mode, dtype_bytes=dtype_bytes, precision=precision,
        optimizer=optimizer,
        opt_state_factor=OPT_STATE_FACTOR[optimizer],
        optim_s_per_param_byte=OPT_TRAFFIC_FACTOR[optimizer] / mem_rate,
        source="analytic",
        notes=(f"FLOPs / ({kind.id} effective {kind.effective_gflops(reference_mode):.1f} GFLOPS, catalog estimate)",)
        + ((f"{precision} autocast: kept activations scaled by part (AUTOCAST_ACT) plus weight copies; times as "
            "fp32 (not priced analytically)",) if half else ()),
    )
