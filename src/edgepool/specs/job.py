"""The job spec: which model to train, on which local data, and how.

``parallelism`` is either a family name (``single|dp|sp|tp|pp|hybrid|auto``) or a
mapping ``{mode: ..., plan: FILE, num_microbatches: N, schedule: gpipe|1f1b}``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Family = Literal["gpt", "bert", "llama"]
Mode = Literal["single", "dp", "sp", "tp", "fsdp", "pp", "hybrid", "auto"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Strict):
    family: Family | None = None
    size: str | None = None
    pretrained: str | None = None
    # Optional overrides of the size preset.
    num_layers: int | None = Field(None, gt=0)
    hidden: int | None = Field(None, gt=0)
    num_heads: int | None = Field(None, gt=0)
    ffn: int | None = Field(None, gt=0)
    vocab_size: int | None = Field(None, gt=0)
    max_seq_len: int | None = Field(None, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)

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
    paths: dict[str, str] = {}
    format: Literal["text", "jsonl"] | None = None
    text_field: str = "text"

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


class TrainSpec(_Strict):
    global_batch: int = Field(8, gt=0)
    seq_len: int = Field(32, gt=1)
    steps: int = Field(10, gt=0)
    lr: float = Field(1e-3, gt=0)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    weight_decay: float = Field(0.0, ge=0)
    seed: int = 0
    checkpoint_every: int = Field(0, ge=0)
    timeout_s: float = Field(60.0, gt=0)


class ParallelismSpec(_Strict):
    """``num_microbatches`` and ``schedule`` apply to pipelines (pp, hybrid)."""

    mode: Mode = "auto"
    plan: str | None = None
    num_microbatches: int | None = Field(None, gt=0)
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
