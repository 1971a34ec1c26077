"""Export our full-model tensors as a Hugging Face folder (the inverse of ``models.hf``).

``write_hf_folder(cfg, state, out, ...)`` writes ``config.json`` (``config.to_hf_config``)
and ``model.safetensors`` in the names of the family's task-head class (BertForMaskedLM,
GPT2LMHeadModel, LlamaForCausalLM) through the same tables ``load_pretrained`` reads with
(``hf.hf_state``), so a folder written here loads back into edgepool unchanged, and into
``transformers.AutoModelFor{CausalLM,MaskedLM}.from_pretrained``. Tokenizer files are
copied from the pretrained folder the run started from, when it has them.

LoRA adapters (``specs.job.LoraSpec``): in full-model names the adapters of linear
``blocks.3.attn.q_proj`` are ``blocks.3.attn.q_proj.lora_A.weight`` ([rank, in]) and
``...lora_B.weight`` ([out, rank]), and the effective weight is ``W + scaling * B @ A``
with ``scaling = alpha / rank``. Two ways out:

- ``merge=True``: the adapters are folded into the weights (in float64, then float32);
  the folder is a plain model.
- ``merge=False``: the base weights as they are, and the adapters in peft's format beside
  them (``adapter_config.json`` + ``adapter_model.safetensors``, keys
  ``base_model.model.<module path>.lora_{A,B}.weight``), so
  ``peft.PeftModel.from_pretrained(base, out)`` computes the same model. GPT-2 keeps q,
  k and v in one ``Conv1D`` (``c_attn``); adapters on n of them become one adapter of
  rank n * r on ``c_attn``: the A's stacked, B block-diagonal (zeros where a projection
  has none), exact. peft scales a module by ``lora_alpha / r`` of that module
  (``peft/tuners/lora/layer.py``, ``update_layer``), so ``rank_pattern`` gives c_attn rank
  n * r and ``alpha_pattern`` alpha n * alpha: the same scaling. ``fan_in_fan_out`` is
  true for GPT-2 (every target there is a ``Conv1D``; peft transposes only the merged
  delta, A and B keep nn.Linear's layout). Target modules, rank and alpha patterns use
  full module paths: GPT-2 names two modules of a block ``c_proj``.

Invariants: only safetensors and JSON are written or read; every tensor is float32 and
contiguous; the folder is written under a temporary name and renamed into place, so a
failed export leaves no half-written folder; an existing non-empty ``out`` is refused.
No torch-free promise: this module imports torch (it is under ``models``).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from edgepool.errors import SpecError
from edgepool.models.config import ModelConfig, to_hf_config
from edgepool.models.hf import ARCHITECTURE, expected_shapes, hf_linear, hf_state

LORA_A, LORA_B = ".lora_A.weight", ".lora_B.weight"
# Files of a Hugging Face tokenizer (fast and slow) that an export copies along; all are
# JSON, plain text or sentencepiece protobuf, none a pickle.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model", "generation_config.json")
# peft's task type per family (it picks the PeftModel subclass); none for a masked LM.
_TASK = {"gpt": "CAUSAL_LM", "llama": "CAUSAL_LM", "bert": None}


@dataclass(frozen=True)
class Lora:
    """The adapters' hyper-parameters (``specs.job.LoraSpec``'s values)."""

    rank: int
    alpha: float
    dropout: float = 0.0

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


@dataclass
class Written:
    """What ``write_hf_folder`` wrote."""

    out: Path
    files: list[str] = field(default_factory=list)
    tied: bool = False
    merged: int = 0  # adapters folded into their weights
    adapters: int = 0  # adapters written in peft's format
    tokenizer: list[str] = field(default_factory=list)  # tokenizer files copied


def split_adapters(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """(the base tensors, ``{linear: (A, B)}``) of a full-model state."""
    base = {k: v for k, v in state.items() if not k.endswith((LORA_A, LORA_B))}
    adapters: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for k in state:
        if k.endswith(LORA_A):
            linear = k[: -len(LORA_A)]
            if linear + LORA_B not in state:
                raise SpecError(f"{k} has no {linear + LORA_B}; the checkpoint holds half an adapter")
            adapters[linear] = (state[k], state[linear + LORA_B])
        elif k.endswith(LORA_B) and k[: -len(LORA_B)] + LORA_A not in state:
            raise SpecError(f"{k} has no {k[: -len(LORA_B)] + LORA_A}; the checkpoint holds half an adapter")
    return base, adapters


def check_adapters(cfg: ModelConfig, adapters: dict[str, tuple[torch.Tensor, torch.Tensor]], rank: int) -> None:
    """Every adapter sits on a linear of ``cfg``'s blocks with A [rank, in] and B [out, rank]."""
    shapes = expected_shapes(cfg)
    for linear, (a, b) in adapters.items():
        w = shapes.get(linear + ".weight")
        if w is None or not linear.startswith("blocks.") or len(w) != 2:
            raise SpecError(f"adapter {linear}{LORA_A} is not on a linear of the model's blocks")
        out_f, in_f = w
        if tuple(a.shape) != (rank, in_f) or tuple(b.shape) != (out_f, rank):
            raise SpecError(f"adapter of {linear} has A {tuple(a.shape)} and B {tuple(b.shape)}, but train.lora.rank "
                            f"{rank} and the weight {tuple(w)} need A {(rank, in_f)} and B {(out_f, rank)}")


def merge_adapters(base: dict[str, torch.Tensor], adapters: dict[str, tuple[torch.Tensor, torch.Tensor]],
                   scaling: float) -> dict[str, torch.Tensor]:
    """``base`` with ``W + scaling * B @ A`` in place of every adapted ``W`` (computed in
    float64, so the fold adds no error beyond float32's rounding of the result)."""
    out = dict(base)
    for linear, (a, b) in adapters.items():
        w = base[linear + ".weight"]
        out[linear + ".weight"] = (w.double() + scaling * (b.double() @ a.double())).to(w.dtype)
    return out


def peft_adapters(cfg: ModelConfig, adapters: dict[str, tuple[torch.Tensor, torch.Tensor]], lora: Lora,
                  base_path: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(``adapter_config.json``, ``adapter_model.safetensors`` tensors) of ``adapters`` for
    the family's task-head class: one adapter per module, fused ones block-structured."""
    by_module: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
    count: dict[str, int] = {}
    for linear, (a, b) in sorted(adapters.items()):
        module, part, _ = hf_linear(cfg, linear)
        index, n = part if part is not None else (0, 1)
        by_module.setdefault(module, {})[index] = (a, b)
        count[module] = n
    tensors: dict[str, torch.Tensor] = {}
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    for module, parts in by_module.items():
        order = sorted(parts)
        a = torch.cat([parts[i][0] for i in order], dim=0)
        if count[module] == 1:
            b = parts[0][1]
        else:
            rows = parts[order[0]][1].shape[0]  # each slice's output rows (q, k, v: equal in GPT-2)
            b = torch.zeros(rows * count[module], lora.rank * len(order), dtype=a.dtype)
            for j, i in enumerate(order):
                b[i * rows:(i + 1) * rows, j * lora.rank:(j + 1) * lora.rank] = parts[i][1]
            if len(order) > 1:
                # rank n*r with alpha n*alpha: peft's alpha/r per module stays the run's scaling
                rank_pattern[module] = lora.rank * len(order)
                alpha_pattern[module] = lora.alpha * len(order)
        key = f"base_model.model.{module}"
        tensors[key + LORA_A] = a.to(torch.float32).contiguous()
        tensors[key + LORA_B] = b.to(torch.float32).contiguous()
    config = {
        "peft_type": "LORA", "task_type": _TASK[cfg.family], "base_model_name_or_path": base_path,
        "r": lora.rank, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout, "bias": "none",
        "target_modules": sorted(by_module), "fan_in_fan_out": cfg.family == "gpt", "use_rslora": False,
        "use_dora": False, "init_lora_weights": True, "modules_to_save": None, "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern, "inference_mode": True,
    }
    return config, tensors


def write_hf_folder(cfg: ModelConfig, state: dict[str, torch.Tensor], out: str | Path, *,
                    lora: Lora | None = None, merge: bool = False, pretrained: str | Path | None = None) -> Written:
    """Write ``state`` (our full-model names, adapters included) as a Hugging Face folder
    at ``out`` (see the module docstring). ``pretrained``: the folder the run started
    from; its config.json's other fields and its tokenizer files come along."""
    from safetensors.torch import save_file

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SpecError(f"{out} already exists and is not an empty folder; export into a new folder")
    base, adapters = split_adapters(state)
    missing = [k for k in expected_shapes(cfg) if k not in base]
    if missing:
        raise SpecError(f"the state lacks {len(missing)} of the model's tensors, e.g. {missing[0]}")
    if adapters and lora is None:
        raise SpecError(f"the state holds {len(adapters)} LoRA adapters (e.g. on {next(iter(adapters))}) but the "
                        "run sets no train.lora, so their scaling is unknown")
    if adapters:
        check_adapters(cfg, adapters, lora.rank)
    written = Written(out=out)
    if adapters and merge:
        base = merge_adapters(base, adapters, lora.scaling)
        written.merged, adapters = len(adapters), {}
    raw = None
    if pretrained is not None and (Path(pretrained) / "config.json").is_file():
        raw = json.loads((Path(pretrained) / "config.json").read_text())
    hf_cfg = to_hf_config(cfg, raw)
    written.tied = bool(torch.equal(base["head.decoder.weight"], base["embed.tokens.weight"]))
    hf_cfg["tie_word_embeddings"] = written.tied
    tensors = hf_state(cfg, base, tie=written.tied)
    assert hf_cfg["architectures"] == [ARCHITECTURE[cfg.family]]

    tmp = out.parent / f".tmp-export-{out.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2, sort_keys=True) + "\n")
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        written.files += ["config.json", "model.safetensors"]
        if adapters:
            config, lora_tensors = peft_adapters(cfg, adapters, lora, str(out.resolve()))
            (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            save_file(lora_tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
            written.files += ["adapter_config.json", "adapter_model.safetensors"]
            written.adapters = len(adapters)
        if pretrained is not None:
            for name in TOKENIZER_FILES:
                src = Path(pretrained) / name
                if src.is_file():
                    shutil.copyfile(src, tmp / name)
                    written.tokenizer.append(name)
        written.files += written.tokenizer
        umask = os.umask(0)
        os.umask(umask)
        for f in tmp.iterdir():  # safetensors creates its files 0600; an export is for sharing
            os.chmod(f, 0o666 & ~umask)
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return written


__all__ = ["LORA_A", "LORA_B", "Lora", "TOKENIZER_FILES", "Written", "check_adapters", "merge_adapters",
           "peft_adapters", "split_adapters", "write_hf_folder"]
