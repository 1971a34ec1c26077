"""The job spec: which model to train, on which local data, and how.

``parallelism`` is either a family name (``single|dp|sp|tp|pp|hybrid|auto``) or a
mapping ``{mode: ..., plan: FILE, num_microbatches: N, schedule: gpipe|1f1b}``.

Every number is finite and bounded (``specs.values``); the model's sizes are bounded
again, whatever their source, by ``models.config.LIMITS``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from edgepool.models.config import LIMITS, SIZES
from edgepool.specs.values import MAX_MICROBATCHES, Count, Name, Real

Family = Literal["gpt", "bert", "llama"]
Mode = Literal["single", "dp", "sp", "tp", "fsdp", "pp", "hybrid", "auto"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Strict):
    family: Family | None = None
    size: str | None = None
    pretrained: str | None = None
    # Optional overrides of the size preset.
    num_layers: Count(ge=1, le=LIMITS["num_layers"]) | None = None
    hidden: Count(ge=1, le=LIMITS["hidden"]) | None = None
    num_heads: Count(ge=1, le=LIMITS["num_heads"]) | None = None
    ffn: Count(ge=1, le=LIMITS["ffn"]) | None = None
    vocab_size: Count(ge=1, le=LIMITS["vocab_size"]) | None = None
    max_seq_len: Count(ge=1, le=LIMITS["max_seq_len"]) | None = None
    dropout: Real(ge=0.0, le=0.9) = 0.0

    @field_validator("size")
    @classmethod
    def _known_size(cls, v: str | None) -> str | None:
        if v is not None and v not in SIZES:
            raise ValueError(f"unknown model size {v!r}; known sizes: {', '.join(SIZES)} (or leave it out for tiny)")
        return v

    @model_validator(mode="after")
    def _family_or_pretrained(self) -> "ModelSpec":
        if self.pretrained is None and self.family is None:
            raise ValueError("give either family (gpt|bert|llama) with a size, or pretrained: DIR")
        if self.pretrained is not None and not (Path(self.pretrained) / "config.json").is_file():
            raise ValueError(f"pretrained folder {self.pretrained!r} has no config.json; point it at a Hugging Face-format folder")
        return self


class DataSpec(_Strict):
    # ``{device}`` in the path is replaced by each device's name: each device reads only
    # its own file. ``paths`` maps device names to files and wins over ``path``.
    path: str | None = None
    paths: dict[Name, str] = {}
    format: Literal["text", "jsonl"] | None = None
    text_field: str = Field("text", min_length=1, max_length=256)

    @model_validator(mode="after")
    def _some_path(self) -> "DataSpec":
        if self.path is None and not self.paths:
            raise ValueError("give path (may contain {device}) or paths: {device: file}")
        return self

    def path_for(self, device: str) -> str:
        if device in self.paths:
            return self.paths[device]
        if self.path is None:
            raise KeyError(device)
        return self.path.replace("{device}", device)


MAX_GLOBAL_BATCH = 1 << 16
MAX_STEPS = 10**7


# The linears a LoRA adapter can wrap, by their name inside a block (``models.layers``):
# attention's projections and the MLP's (``gate`` only in LLaMA's SwiGLU).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "up", "gate", "down")


class LoraSpec(_Strict):
    """Low-rank adapters (``peft``) on the blocks' linears named in ``targets``: a linear
    ``W`` becomes ``W + (alpha / rank) * B @ A`` with ``A`` [rank, in] and ``B`` [out,
    rank] (``B`` starts at zero), and only the adapters train. In full-model names the
    adapters of ``blocks.3.attn.q_proj`` are ``blocks.3.attn.q_proj.lora_A.weight`` and
    ``...lora_B.weight``."""

    rank: Count(ge=1, le=4096) = 8
    alpha: Real(gt=0.0, le=1e6) = 16.0
    dropout: Real(ge=0.0, le=0.9) = 0.0
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")

    @field_validator("targets")
    @classmethod
    def _known(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError(f"name at least one linear to adapt, of {', '.join(LORA_TARGETS)}")
        bad = [t for t in v if t not in LORA_TARGETS]
        if bad:
            raise ValueError(f"unknown LoRA target(s) {bad}; a block's linears are {', '.join(LORA_TARGETS)}")
        return tuple(dict.fromkeys(v))

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


# The largest PowerSGD rank: past the smaller side of a gradient matrix a rank-r pair
# carries more than the matrix, and such a matrix is sent whole (``runtime.compress``).
MAX_POWERSGD_RANK = 1024
DEFAULT_POWERSGD_RANK = 4


class WireSpec(_Strict):
    """What crosses the network, compressed. Lossy and opt-in: the default (``fp32``,
    ``none``) sends every tensor as it is, bit for bit as before this setting existed.

    ``activations``: the activations and their gradients that cross a stage boundary,
    as ``fp16`` or ``bf16`` (a cast) or ``int8`` (symmetric, one fp32 scale per
    transfer). ``gradients: powersgd``: a dp or sp group sums its gradients as PowerSGD's
    rank-``powersgd_rank`` factors (Vogels et al. 2019), with error feedback; 1-D
    tensors (biases, norms) and matrices too small to gain are summed whole.
    ``runtime.compress`` has the codecs and their error bounds."""

    activations: Literal["fp32", "fp16", "bf16", "int8"] = "fp32"
    gradients: Literal["none", "powersgd"] = "none"
    # None: ``DEFAULT_POWERSGD_RANK`` (``rank``); left out of the file unless PowerSGD is on
    powersgd_rank: Count(ge=1, le=MAX_POWERSGD_RANK) | None = None

    @model_validator(mode="after")
    def _rank_needs_powersgd(self) -> "WireSpec":
        if self.powersgd_rank is not None and self.gradients != "powersgd":
            raise ValueError(f"powersgd_rank {self.powersgd_rank} is set but gradients is {self.gradients!r}; "
                             "set gradients: powersgd, or leave powersgd_rank out")
        return self

    @property
    def rank(self) -> int:
        """PowerSGD's rank (the given one, else ``DEFAULT_POWERSGD_RANK``)."""
        return self.powersgd_rank or DEFAULT_POWERSGD_RANK

    @property
    def is_off(self) -> bool:
        return self.activations == "fp32" and self.gradients == "none"


class TrainSpec(_Strict):
    global_batch: Count(ge=1, le=MAX_GLOBAL_BATCH) = 8
    seq_len: Count(ge=2, le=LIMITS["max_seq_len"]) = 32
    steps: Count(ge=1, le=MAX_STEPS) = 10
    lr: Real(gt=0.0, le=10.0) = 1e-3
    optimizer: Literal["adamw", "sgd"] = "adamw"
    weight_decay: Real(ge=0.0, le=10.0) = 0.0
    seed: Count(ge=0, le=2**32 - 1) = 0
    # a checkpoint every this many steps, and at the last step (0: none)
    checkpoint_every: Count(ge=0, le=MAX_STEPS) = 0
    timeout_s: Real(ge=1.0, le=86_400.0) = 60.0
    # A rank whose heartbeat stops for this long is lost (the launcher stops it and names it).
    # 2.5 s: with beats 0.5 s apart and the launcher's 0.2 s poll, a device is named within 3 s.
    detect_s: Real(ge=1.0, le=3600.0) = 2.5
    # On a lost device, go on on the others: a new plan, in memory (the survivors keep their
    # processes), else from the last checkpoint.
    recover: bool = True
    # With recover: every this many steps each rank backs its state up in a peer's memory
    # (``specs.layout.backups``), so a lost device's state need not come from disk.
    # auto: as often as keeps the backups under a tenth of the training time (the cost
    # model's figure for the plan); 0: no backups (the lost state comes from the last
    # checkpoint).
    replicate_every: Count(ge=0, le=MAX_STEPS) | Literal["auto"] = "auto"
    # With recover: a lost device is offered back to the run this many seconds after it
    # was lost (0: never); it is taken in at a step boundary when the planner predicts
    # a faster step with it, else kept as a standby.
    rejoin_s: Real(ge=0.0, le=86_400.0) = 0.0
    # LoRA adapters on the blocks' linears; the rest of the model is frozen.
    lora: LoraSpec | None = None
    # Parameters to freeze, by full-model name pattern (``fnmatch``: ``embed.*``,
    # ``blocks.[0-3].*``): no gradients, no collectives, no optimizer state.
    freeze: tuple[Annotated[str, Field(min_length=1, max_length=256)], ...] = ()
    # Compute precision: autocast to bf16 or fp16 (with loss scaling) over fp32 master
    # weights; fp32 computes in fp32.
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    # Compression on the wire (lossy, opt-in; ``WireSpec``): boundary activations and
    # their gradients in fp16, bf16 or int8; dp/sp gradients as PowerSGD factors.
    wire: WireSpec = WireSpec()


class ParallelismSpec(_Strict):
    """``num_microbatches`` and ``schedule`` apply to pipelines (pp, hybrid)."""

    mode: Mode = "auto"
    plan: str | None = None
    num_microbatches: Count(ge=1, le=MAX_MICROBATCHES) | None = None
    schedule: Literal["gpipe", "1f1b"] | None = None


class JobSpec(_Strict):
    model: ModelSpec
    data: DataSpec
    train: TrainSpec = TrainSpec()
    parallelism: ParallelismSpec = ParallelismSpec()

    @field_validator("parallelism", mode="before")
    @classmethod
    def _short_form(cls, v):
        return {"mode": v} if isinstance(v, str) else v


def load_job(path) -> JobSpec:
    """Load a job file; relative paths inside it are taken from the file's folder."""
    from edgepool.specs.files import parse, read_mapping

    p = Path(path)
    raw = read_mapping(p, "job")
    base = p.resolve().parent

    def rebase(s: str) -> str:
        return s if Path(s).is_absolute() or Path(s).exists() else str(base / s)

    model = raw.get("model")
    if isinstance(model, dict) and isinstance(model.get("pretrained"), str):
        model["pretrained"] = rebase(model["pretrained"])
    data = raw.get("data")
    if isinstance(data, dict):
        if isinstance(data.get("path"), str):
            data["path"] = rebase(data["path"])
        if isinstance(data.get("paths"), dict):
            data["paths"] = {k: rebase(v) if isinstance(v, str) else v for k, v in data["paths"].items()}
    par = raw.get("parallelism")
    if isinstance(par, dict) and isinstance(par.get("plan"), str):
        par["plan"] = rebase(par["plan"])
    return parse(JobSpec, raw, str(p))
