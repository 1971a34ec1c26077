"""Model configs for the three Transformer families, with size presets.

Pure Python (no torch), so the planner and cost model can read model dimensions.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

from edgepool.errors import SpecError

Family = Literal["gpt", "bert", "llama"]


@dataclass(frozen=True)
class ModelConfig:
    family: Family
    vocab_size: int
    hidden: int
    num_layers: int
    num_heads: int
    ffn: int
    max_seq_len: int = 512
    num_kv_heads: int | None = None  # llama grouped-query attention; None = num_heads
    norm_eps: float = 1e-5
    dropout: float = 0.0
    type_vocab_size: int = 2  # bert
    rope_theta: float = 10000.0  # llama
    mask_token_id: int = 0  # bert MLM; set from the tokenizer or the byte vocabulary
    mlm_fraction: float = 0.15  # bert: masked positions per sequence

    def __post_init__(self) -> None:
        if self.hidden % self.num_heads:
            raise SpecError(f"model hidden {self.hidden} is not a multiple of num_heads {self.num_heads}")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.num_heads

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    def to_dict(self) -> dict:
        return asdict(self)

    def num_params(self) -> int:
        """Parameter count (analytic; used by the cost model)."""
        h, f, v = self.hidden, self.ffn, self.vocab_size
        kv = self.kv_heads * self.head_dim
        if self.family == "llama":
            block = h * h * 2 + 2 * h * kv + 3 * h * f + 2 * h
            return v * h + self.num_layers * block + h + h * v
        # q, o: 2hh; k, v: 2h*kv; biases q, o, down: 3h; k, v biases: 2kv; up/down: 2hf + f; norms: 4h
        block = 2 * h * h + 2 * h * kv + 3 * h + 2 * kv + 2 * h * f + f + 4 * h
        emb = v * h + self.max_seq_len * h + (self.type_vocab_size * h + 2 * h if self.family == "bert" else 0)
        head = (h * h + h + 2 * h + h * v + v) if self.family == "bert" else (2 * h + h * v)
        return emb + self.num_layers * block + head


# (hidden, num_layers, num_heads, ffn) per size; vocab comes from the tokenizer.
_SIZES: dict[str, tuple[int, int, int, int]] = {
    "tiny": (64, 4, 4, 256),
    "small": (256, 6, 8, 1024),
    "base": (768, 12, 12, 3072),  # GPT-2 124M / BERT-base shape
    "medium": (1024, 24, 16, 4096),
}


def preset(family: Family, size: str, vocab_size: int, **overrides) -> ModelConfig:
    if size not in _SIZES:
        raise SpecError(f"unknown model size {size!r}; known sizes: {', '.join(_SIZES)}")
    h, n, a, f = _SIZES[size]
    cfg = ModelConfig(
        family=family, vocab_size=vocab_size, hidden=h, num_layers=n, num_heads=a, ffn=f,
        norm_eps=1e-12 if family == "bert" else 1e-5,
    )
    return replace(cfg, **{k: v for k, v in overrides.items() if v is not None})


def from_hf_config(folder: str | Path) -> ModelConfig:
    """A ModelConfig from a Hugging Face ``config.json`` (bert, gpt2 or llama)."""
    path = Path(folder) / "config.json"
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SpecError(f"cannot read {path}: {exc}; point pretrained at a Hugging Face-format folder") from None
    kind = raw.get("model_type")
    if kind == "bert":
        if raw.get("hidden_act", "gelu") != "gelu" or raw.get("position_embedding_type", "absolute") != "absolute":
            raise SpecError(f"{path}: only gelu BERT with absolute positions is supported")
        return ModelConfig(
            family="bert", vocab_size=raw["vocab_size"], hidden=raw["hidden_size"],
            num_layers=raw["num_hidden_layers"], num_heads=raw["num_attention_heads"],
            ffn=raw["intermediate_size"], max_seq_len=raw["max_position_embeddings"],
            norm_eps=raw.get("layer_norm_eps", 1e-12), type_vocab_size=raw.get("type_vocab_size", 2),
        )
    if kind == "gpt2":
        return ModelConfig(
            family="gpt", vocab_size=raw["vocab_size"], hidden=raw["n_embd"], num_layers=raw["n_layer"],
            num_heads=raw["n_head"], ffn=raw.get("n_inner") or 4 * raw["n_embd"],
            max_seq_len=raw["n_positions"], norm_eps=raw.get("layer_norm_epsilon", 1e-5),
        )
    if kind == "llama":
        return ModelConfig(
            family="llama", vocab_size=raw["vocab_size"], hidden=raw["hidden_size"],
            num_layers=raw["num_hidden_layers"], num_heads=raw["num_attention_heads"],
            num_kv_heads=raw.get("num_key_value_heads"), ffn=raw["intermediate_size"],
            max_seq_len=raw.get("max_position_embeddings", 2048), norm_eps=raw.get("rms_norm_eps", 1e-6),
            rope_theta=raw.get("rope_theta", 10000.0),
        )
    raise SpecError(f"{path}: model_type {kind!r} is not supported; supported: bert, gpt2, llama")
