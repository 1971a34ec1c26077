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

# The largest model edgepool plans for, per dimension (far beyond any edge pool). Every
# config, from a preset, the job's overrides or a pretrained config.json, is checked
# against these before anything is built or planned: the planner's tables grow with
# num_layers squared, and a model is allocated whole before it is split.
LIMITS: dict[str, int] = {
    "vocab_size": 1 << 20, "hidden": 1 << 16, "num_layers": 256, "num_heads": 1024, "ffn": 1 << 18,
    "max_seq_len": 1 << 17, "num_kv_heads": 1024, "type_vocab_size": 1024, "mask_token_id": 1 << 20,
}
MAX_PARAMS = 10**12


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
        for name, top in LIMITS.items():
            v = getattr(self, name)
            if name == "num_kv_heads" and v is None:
                continue
            low = 0 if name == "mask_token_id" else 1
            if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= top:
                raise SpecError(f"model {name} {v!r} is not a whole number in {low}..{top}; fix the model's size")
        for name in ("norm_eps", "rope_theta", "dropout", "mlm_fraction"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1e9 or v != v:
                raise SpecError(f"model {name} {v!r} is not a finite number >= 0; fix the model's config")
        if not self.dropout < 1 or not 0 < self.mlm_fraction < 1:
            raise SpecError(f"model dropout {self.dropout} and mlm_fraction {self.mlm_fraction} must be below 1")
        if self.num_heads % self.kv_heads:
            raise SpecError(f"model num_heads {self.num_heads} is not a multiple of num_kv_heads {self.kv_heads}")
        if self.num_params() > MAX_PARAMS:
            raise SpecError(f"the model has {self.num_params():.3g} parameters, more than edgepool's limit of "
                            f"{MAX_PARAMS:.0e}; make it smaller")
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


SIZES = tuple(_SIZES)


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
    except (OSError, ValueError, RecursionError) as exc:  # ValueError: bad JSON or not UTF-8
        raise SpecError(f"cannot read {path}: {str(exc)[:200]}; point pretrained at a Hugging Face-format folder") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: not a JSON object; point pretrained at a Hugging Face-format folder")
    try:
        return _from_raw(raw, path)
    except KeyError as exc:
        raise SpecError(f"{path}: field {exc.args[0]!r} is missing; the config.json is incomplete") from None
    except (TypeError, ValueError, ZeroDivisionError, AttributeError) as exc:
        raise SpecError(f"{path}: a field has the wrong type or value ({exc}); the config.json is damaged") from None


def _from_raw(raw: dict, path: Path) -> ModelConfig:
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
        # Our GPT block is GPT-2's: pre-LN, tanh GELU, attention scaled by 1/sqrt(head_dim).
        act = raw.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
            raise SpecError(f"{path}: activation_function {act!r} is not supported; only the tanh GELU (gelu_new)")
        if not raw.get("scale_attn_weights", True) or raw.get("scale_attn_by_inverse_layer_idx", False):
            raise SpecError(f"{path}: only GPT-2 attention scaled by 1/sqrt(head_dim) is supported "
                            "(scale_attn_weights true, scale_attn_by_inverse_layer_idx false)")
        return ModelConfig(
            family="gpt", vocab_size=raw["vocab_size"], hidden=raw["n_embd"], num_layers=raw["n_layer"],
            num_heads=raw["n_head"], ffn=raw.get("n_inner") or 4 * raw["n_embd"],
            max_seq_len=raw["n_positions"], norm_eps=raw.get("layer_norm_epsilon", 1e-5),
        )
    if kind == "llama":
        _check_llama(raw, path)
        rope = raw.get("rope_parameters") or {}  # transformers >= 5 keeps rope_theta here
        return ModelConfig(
            family="llama", vocab_size=raw["vocab_size"], hidden=raw["hidden_size"],
            num_layers=raw["num_hidden_layers"], num_heads=raw["num_attention_heads"],
            num_kv_heads=raw.get("num_key_value_heads"), ffn=raw["intermediate_size"],
            max_seq_len=raw.get("max_position_embeddings", 2048), norm_eps=raw.get("rms_norm_eps", 1e-6),
            rope_theta=float(raw.get("rope_theta", rope.get("rope_theta", 10000.0))),
        )
    raise SpecError(f"{path}: model_type {kind!r} is not supported; supported: bert, gpt2, llama")


def to_hf_config(cfg: ModelConfig, base: dict | None = None) -> dict:
    """The Hugging Face ``config.json`` of ``cfg``: the inverse of ``_from_raw`` (a unit
    test keeps ``_from_raw(to_hf_config(cfg))`` equal to ``cfg``), for the family's
    task-head class (BertForMaskedLM, GPT2LMHeadModel, LlamaForCausalLM), float32.

    ``base``: the pretrained folder's own config.json, whose other fields (token ids,
    ``transformers_version``, ...) are kept; every field edgepool's model depends on is
    written from ``cfg``. ``tie_word_embeddings`` is false here (our head is a parameter of
    its own); the export sets it true when the head equals the embedding."""
    out = {k: v for k, v in (base or {}).items() if k not in ("auto_map", "quantization_config", "_name_or_path")}
    p = cfg.dropout
    if cfg.family == "bert":
        out.update(model_type="bert", architectures=["BertForMaskedLM"], vocab_size=cfg.vocab_size,
                   hidden_size=cfg.hidden, num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                   intermediate_size=cfg.ffn, max_position_embeddings=cfg.max_seq_len, layer_norm_eps=cfg.norm_eps,
                   type_vocab_size=cfg.type_vocab_size, hidden_act="gelu", position_embedding_type="absolute",
                   hidden_dropout_prob=p, attention_probs_dropout_prob=p)
    elif cfg.family == "gpt":
        out.update(model_type="gpt2", architectures=["GPT2LMHeadModel"], vocab_size=cfg.vocab_size,
                   n_embd=cfg.hidden, n_layer=cfg.num_layers, n_head=cfg.num_heads, n_inner=cfg.ffn,
                   n_positions=cfg.max_seq_len, n_ctx=cfg.max_seq_len, layer_norm_epsilon=cfg.norm_eps,
                   activation_function="gelu_new", scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False,
                   reorder_and_upcast_attn=False, resid_pdrop=p, embd_pdrop=p, attn_pdrop=p)
    else:
        out.pop("rope_scaling", None)
        out.update(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=cfg.vocab_size,
                   hidden_size=cfg.hidden, num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                   num_key_value_heads=cfg.kv_heads, head_dim=cfg.head_dim, intermediate_size=cfg.ffn,
                   max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
                   # transformers >= 5 reads rope_parameters, older ones rope_theta
                   rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta}, hidden_act="silu", attention_bias=False, mlp_bias=False, attention_dropout=p)
    if base is None:  # no tokenizer of the model's own (the byte vocabulary): no special token ids
        out.update(bos_token_id=None, eos_token_id=None, pad_token_id=None)
    # transformers >= 4.56 writes and reads ``dtype`` (it wins over ``torch_dtype``), older ones ``torch_dtype``
    out.update(torch_dtype="float32", dtype="float32", tie_word_embeddings=False)
    return out


def _check_llama(raw: dict, path: Path) -> None:
    """Refuse LLaMA variants our block does not compute (they would load but not match)."""
    h, a = raw["hidden_size"], raw["num_attention_heads"]
    if raw.get("head_dim") not in (None, h // a):
        raise SpecError(f"{path}: head_dim {raw['head_dim']} != hidden_size / num_attention_heads = {h // a}; not supported")
    if raw.get("hidden_act", "silu") != "silu":
        raise SpecError(f"{path}: hidden_act {raw['hidden_act']!r} is not supported; only silu (SwiGLU)")
    if raw.get("attention_bias") or raw.get("mlp_bias"):
        raise SpecError(f"{path}: attention_bias/mlp_bias are not supported; only bias-free LLaMA")
    for key in ("rope_scaling", "rope_parameters"):
        kind = (raw.get(key) or {}).get("rope_type", (raw.get(key) or {}).get("type", "default"))
        if kind != "default":
            raise SpecError(f"{path}: {key} type {kind!r} is not supported; only default rotary embeddings")


def job_model_config(job) -> ModelConfig:
    """The job's model config (a ``specs.JobSpec``); vocabulary and [MASK] come from
    its tokenizer. No torch: the planner resolves models through this."""
    from edgepool.data import load_tokenizer

    m = job.model
    tok = load_tokenizer(m.pretrained)
    if m.pretrained is not None:
        cfg = from_hf_config(m.pretrained)
    else:
        cfg = preset(m.family, m.size or "tiny", vocab_size=m.vocab_size or tok.vocab_size, num_layers=m.num_layers,
                     hidden=m.hidden, num_heads=m.num_heads, ffn=m.ffn, max_seq_len=m.max_seq_len)
    cfg = cfg.__class__(**{**cfg.to_dict(), "dropout": m.dropout, "mask_token_id": tok.mask_token_id})
    if job.train.seq_len > cfg.max_seq_len:
        raise SpecError(f"train.seq_len {job.train.seq_len} exceeds the model's max_seq_len {cfg.max_seq_len}; lower it")
    if tok.vocab_size > cfg.vocab_size:
        raise SpecError(f"the tokenizer has {tok.vocab_size} tokens but model vocab_size is {cfg.vocab_size}; raise model.vocab_size")
    return cfg


def expected_shapes(cfg) -> dict[str, tuple[int, ...]]:
    """Our full model's tensor names and shapes, from the config alone (a ``ModelConfig``,
    or anything with its dimensions: ``cost.profile.ModelDims``; BERT's
    ``type_vocab_size`` defaults to 2 where it is absent).

    Computed, not built, and without torch (the cost model prices frozen parameters by
    name through it): even a ``meta`` build costs about 1.5 s on the first call of a
    process (torch's meta kernels load lazily). A unit test keeps this equal to
    ``build_model(cfg).state_dict()`` for every family.
    """
    h, v, f = cfg.hidden, cfg.vocab_size, cfg.ffn
    head_dim = h // cfg.num_heads
    q, kv = cfg.num_heads * head_dim, (cfg.num_kv_heads or cfg.num_heads) * head_dim
    biased = cfg.family != "llama"  # llama: RMSNorm without bias, bias-free linears

    def norm(name: str) -> dict[str, tuple[int, ...]]:
        return {f"{name}.weight": (h,), **({f"{name}.bias": (h,)} if biased else {})}

    def linear(name: str, out: int, inp: int, bias: bool) -> dict[str, tuple[int, ...]]:
        return {f"{name}.weight": (out, inp), **({f"{name}.bias": (out,)} if bias else {})}

    shapes: dict[str, tuple[int, ...]] = {"embed.tokens.weight": (v, h)}
    if cfg.family != "llama":
        shapes["embed.positions.weight"] = (cfg.max_seq_len, h)
    if cfg.family == "bert":
        shapes["embed.token_types.weight"] = (getattr(cfg, "type_vocab_size", 2), h)
        shapes.update(norm("embed.norm"))
    for i in range(cfg.num_layers):
        b = f"blocks.{i}."
        shapes.update({**norm(b + "norm1"), **norm(b + "norm2")})
        shapes.update(linear(b + "attn.q_proj", q, h, biased))
        shapes.update(linear(b + "attn.k_proj", kv, h, biased))
        shapes.update(linear(b + "attn.v_proj", kv, h, biased))
        shapes.update(linear(b + "attn.o_proj", h, q, False))
        shapes.update(linear(b + "mlp.up", f, h, biased))
        if cfg.family == "llama":
            shapes.update(linear(b + "mlp.gate", f, h, False))
        shapes.update(linear(b + "mlp.down", h, f, False))
        if biased:
            shapes.update({b + "attn.o_bias": (h,), b + "mlp.down_bias": (h,)})
    if cfg.family == "bert":
        shapes.update(linear("head.transform", h, h, True))
    shapes.update(norm("head.norm"))
    shapes.update(linear("head.decoder", v, h, cfg.family == "bert"))
    return shapes
