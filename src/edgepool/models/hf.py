"""Pretrained weights from a local Hugging Face-format folder (bert, gpt2, llama), and
the same name tables run backwards for the export (``models.export``).

A folder holds ``config.json`` and one or more ``*.safetensors`` files (sharded ones
listed in ``model.safetensors.index.json``). ``load_pretrained`` reads them with
``safetensors`` alone (transformers is never imported here) and renames every tensor to
our full-model names (``embed.*``, ``blocks.<i>.*``, ``head.*``), so the result loads
into any plan through ``Engine(state_dict=...)``.

Invariants:

- Every tensor of ``embed.*`` and ``blocks.*`` must be in the checkpoint, with the shape
  our config gives; otherwise a one-line ``SpecError`` names the tensor and the folder.
- ``head.*`` tensors the checkpoint lacks (a bare ``BertModel`` such as MiniLM has no
  MLM head) are listed as missing; ``with_seeded_init`` fills them from the job seed,
  exactly as a freshly built model would hold them.
- Tied output embeddings follow the checkpoint's ``tie_word_embeddings`` (transformers'
  default: true for bert and gpt2, false for llama): when no output matrix is stored,
  ``head.decoder.weight`` is a copy of the token embedding. Our model keeps the two
  as separate parameters, so they drift apart during fine-tuning.
- Tensors we have no use for (BERT's pooler, ``position_ids``, GPT-2's causal-mask
  buffers, ...) are ignored.
- Everything is returned as contiguous float32 tensors (the dtype our model trains in).

Layout conversions:

- GPT-2 stores ``Conv1D`` weights as ``[in, out]``, the transpose of ``nn.Linear``;
  ``c_attn`` holds q, k and v side by side and is split into our three projections.
- LLaMA checkpoints in Hugging Face format already use the half-split rotary layout
  that ``layers.rope`` computes, so q and k are copied as they are.
- BERT's separate output biases (``attention.output.dense.bias``, ``output.dense.bias``)
  become our ``attn.o_bias`` and ``mlp.down_bias``.

One table per family (``_bert``, ``_gpt2``, ``_llama``: our name -> stored names and
layout) serves both directions: ``load_pretrained`` reads through it, ``hf_state`` and
``hf_linear`` write through it, so a name fixed in one direction is fixed in both.
"""

from __future__ import annotations

import json
from dataclasses import replace
from functools import lru_cache
from pathlib import Path

import torch

from edgepool.errors import SpecError
from edgepool.models.stage import StageModel
from edgepool.models.config import ModelConfig, expected_shapes, from_hf_config

# Prefixes of the task-head classes (BertForMaskedLM, GPT2LMHeadModel, LlamaForCausalLM).
_PREFIX = {"bert": "bert.", "gpt": "transformer.", "llama": "model."}

class _Source:
    """Where one of our tensors comes from: the first present of ``names`` (stored names:
    ``lm_head.*`` and ``cls.*`` at the top level, the rest under the family's prefix),
    transposed when ``transpose`` (GPT-2's ``Conv1D``), then part ``part = (index, count)``
    of equal slices along the output dimension (GPT-2's ``c_attn`` -> q, k, v).

    The layout is data, not a function, so the same table also runs backwards
    (``hf_state``, ``hf_linear``: the export to Hugging Face names). The first name is
    the tensor's own; later ones are aliases the load falls back to (a tied embedding, a
    second copy of BERT's decoder bias)."""

    __slots__ = ("names", "transpose", "part")

    def __init__(self, *names: str, transpose: bool = False, part: tuple[int, int] | None = None):
        self.names, self.transpose, self.part = names, transpose, part

    def apply(self, t: torch.Tensor) -> torch.Tensor:
        """Our tensor from the stored one."""
        t = t.t() if self.transpose else t
        return t.chunk(self.part[1], dim=0)[self.part[0]] if self.part is not None else t


class _Checkpoint:
    """The tensors of a folder, read lazily from its safetensors files."""

    def __init__(self, folder: Path, prefix: str):
        from safetensors import safe_open

        self.folder, self.prefix = folder, prefix
        index = folder / "model.safetensors.index.json"
        self.where: dict[str, Path] = {}
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
                raise SpecError(f"cannot read {index}: {exc!r}; the shard index is damaged") from None
            self.where = {name: folder / file for name, file in weight_map.items()}
            absent = sorted({str(p.name) for p in self.where.values() if not p.is_file()})
            if absent:
                raise SpecError(f"{folder}: shard {absent[0]} listed in {index.name} is missing; copy the whole checkpoint")
        else:
            files = sorted(folder.glob("*.safetensors"))
            if not files:
                raise SpecError(f"{folder} has no *.safetensors file; only safetensors checkpoints are supported")
            for path in files:
                with safe_open(str(path), framework="pt") as handle:
                    for name in handle.keys():
                        self.where.setdefault(name, path)
        self._open = safe_open
        self._handles: dict[Path, object] = {}

    def find(self, name: str) -> str | None:
        """The stored name of ``name``: as is, with the family's prefix, or old BERT gamma/beta."""
        alts = [name]
        if name.endswith("LayerNorm.weight"):
            alts.append(name[: -len("weight")] + "gamma")
        elif name.endswith("LayerNorm.bias"):
            alts.append(name[: -len("bias")] + "beta")
        for alt in alts:
            for stored in (alt, self.prefix + alt):
                if stored in self.where:
                    return stored
        return None

    def get(self, stored: str) -> torch.Tensor:
        path = self.where[stored]
        if path not in self._handles:
            self._handles[path] = self._open(str(path), framework="pt")
        return self._handles[path].get_tensor(stored)


def _bert(cfg: ModelConfig, tie: bool) -> dict[str, _Source]:
    m: dict[str, _Source] = {
        "embed.tokens.weight": _Source("embeddings.word_embeddings.weight"),
        "embed.positions.weight": _Source("embeddings.position_embeddings.weight"),
        "embed.token_types.weight": _Source("embeddings.token_type_embeddings.weight"),
        "embed.norm.weight": _Source("embeddings.LayerNorm.weight"),
        "embed.norm.bias": _Source("embeddings.LayerNorm.bias"),
        "head.transform.weight": _Source("cls.predictions.transform.dense.weight"),
        "head.transform.bias": _Source("cls.predictions.transform.dense.bias"),
        "head.norm.weight": _Source("cls.predictions.transform.LayerNorm.weight"),
        "head.norm.bias": _Source("cls.predictions.transform.LayerNorm.bias"),
        "head.decoder.weight": _Source("cls.predictions.decoder.weight",
                                       *(("embeddings.word_embeddings.weight",) if tie else ())),
        # The bias the decoder adds. transformers ties it to cls.predictions.bias and then
        # stores only that one; with untied embeddings (transformers 5) both are stored
        # and the decoder's own is the one used.
        "head.decoder.bias": _Source("cls.predictions.decoder.bias", "cls.predictions.bias"),
    }
    for i in range(cfg.num_layers):
        o, hf = f"blocks.{i}.", f"encoder.layer.{i}."
        for ours, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
            m[f"{o}attn.{theirs}.weight"] = _Source(f"{hf}attention.self.{ours}.weight")
            m[f"{o}attn.{theirs}.bias"] = _Source(f"{hf}attention.self.{ours}.bias")
        m.update({
            f"{o}attn.o_proj.weight": _Source(f"{hf}attention.output.dense.weight"),
            f"{o}attn.o_bias": _Source(f"{hf}attention.output.dense.bias"),
            f"{o}norm1.weight": _Source(f"{hf}attention.output.LayerNorm.weight"),
            f"{o}norm1.bias": _Source(f"{hf}attention.output.LayerNorm.bias"),
            f"{o}mlp.up.weight": _Source(f"{hf}intermediate.dense.weight"),
            f"{o}mlp.up.bias": _Source(f"{hf}intermediate.dense.bias"),
            f"{o}mlp.down.weight": _Source(f"{hf}output.dense.weight"),
            f"{o}mlp.down_bias": _Source(f"{hf}output.dense.bias"),
            f"{o}norm2.weight": _Source(f"{hf}output.LayerNorm.weight"),
            f"{o}norm2.bias": _Source(f"{hf}output.LayerNorm.bias"),
        })
    return m


def _gpt2(cfg: ModelConfig, tie: bool) -> dict[str, _Source]:
    m: dict[str, _Source] = {
        "embed.tokens.weight": _Source("wte.weight"),
        "embed.positions.weight": _Source("wpe.weight"),
        "head.norm.weight": _Source("ln_f.weight"),
        "head.norm.bias": _Source("ln_f.bias"),
        "head.decoder.weight": _Source("lm_head.weight", *(("wte.weight",) if tie else ())),
    }
    for i in range(cfg.num_layers):
        o, hf = f"blocks.{i}.", f"h.{i}."
        for k, proj in enumerate(("q_proj", "k_proj", "v_proj")):
            m[f"{o}attn.{proj}.weight"] = _Source(f"{hf}attn.c_attn.weight", transpose=True, part=(k, 3))
            m[f"{o}attn.{proj}.bias"] = _Source(f"{hf}attn.c_attn.bias", part=(k, 3))
        m.update({
            f"{o}attn.o_proj.weight": _Source(f"{hf}attn.c_proj.weight", transpose=True),
            f"{o}attn.o_bias": _Source(f"{hf}attn.c_proj.bias"),
            f"{o}norm1.weight": _Source(f"{hf}ln_1.weight"),
            f"{o}norm1.bias": _Source(f"{hf}ln_1.bias"),
            f"{o}norm2.weight": _Source(f"{hf}ln_2.weight"),
            f"{o}norm2.bias": _Source(f"{hf}ln_2.bias"),
            f"{o}mlp.up.weight": _Source(f"{hf}mlp.c_fc.weight", transpose=True),
            f"{o}mlp.up.bias": _Source(f"{hf}mlp.c_fc.bias"),
            f"{o}mlp.down.weight": _Source(f"{hf}mlp.c_proj.weight", transpose=True),
            f"{o}mlp.down_bias": _Source(f"{hf}mlp.c_proj.bias"),
        })
    return m


def _llama(cfg: ModelConfig, tie: bool) -> dict[str, _Source]:
    m: dict[str, _Source] = {
        "embed.tokens.weight": _Source("embed_tokens.weight"),
        "head.norm.weight": _Source("norm.weight"),
        "head.decoder.weight": _Source("lm_head.weight", *(("embed_tokens.weight",) if tie else ())),
    }
    for i in range(cfg.num_layers):
        o, hf = f"blocks.{i}.", f"layers.{i}."
        m.update({
            f"{o}norm1.weight": _Source(f"{hf}input_layernorm.weight"),
            f"{o}norm2.weight": _Source(f"{hf}post_attention_layernorm.weight"),
            f"{o}mlp.gate.weight": _Source(f"{hf}mlp.gate_proj.weight"),
            f"{o}mlp.up.weight": _Source(f"{hf}mlp.up_proj.weight"),
            f"{o}mlp.down.weight": _Source(f"{hf}mlp.down_proj.weight"),
        })
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            m[f"{o}attn.{proj}.weight"] = _Source(f"{hf}self_attn.{proj}.weight")
    return m


_MAPPINGS = {"bert": _bert, "gpt": _gpt2, "llama": _llama}
_TIE_DEFAULT = {"bert": True, "gpt": True, "llama": False}


def _mask_token_id(folder: Path, cfg: ModelConfig) -> int:
    if cfg.family != "bert" or not (folder / "tokenizer.json").is_file():
        return cfg.mask_token_id
    from edgepool.data import HFTokenizer

    return HFTokenizer(folder / "tokenizer.json").mask_token_id


def load_pretrained(folder: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor], list[str]]:
    """Config, tensors in our full-model names, and our names the checkpoint does not cover.

    Raises ``SpecError`` (one line, naming the tensor and the folder) when a tensor of
    ``embed.*`` or ``blocks.*`` is missing or has the wrong shape.
    """
    folder = Path(folder)
    cfg = from_hf_config(folder)
    cfg = replace(cfg, mask_token_id=_mask_token_id(folder, cfg))
    raw_cfg = json.loads((folder / "config.json").read_text())
    tie = bool(raw_cfg.get("tie_word_embeddings", _TIE_DEFAULT[cfg.family]))
    mapping = _MAPPINGS[cfg.family](cfg, tie)
    ckpt = _Checkpoint(folder, _PREFIX[cfg.family])
    state: dict[str, torch.Tensor] = {}
    missing: list[str] = []
    for name, shape in expected_shapes(cfg).items():
        assert name in mapping, f"no checkpoint mapping for our tensor {name}"
        src = mapping[name]
        stored = next((s for s in map(ckpt.find, src.names) if s is not None), None)
        if stored is None:
            if name.startswith(("embed.", "blocks.")):
                raise SpecError(
                    f"pretrained folder {folder} has no tensor {src.names[0]!r} (needed for our {name}); "
                    f"the checkpoint is incomplete or not a {raw_cfg.get('model_type')} model"
                )
            missing.append(name)
            continue
        tensor = src.apply(ckpt.get(stored)).to(torch.float32).contiguous().clone()
        if tuple(tensor.shape) != shape:
            raise SpecError(
                f"pretrained folder {folder}: tensor {stored!r} gives shape {tuple(tensor.shape)} for our {name}, "
                f"but config.json implies {tuple(shape)}; the weights do not match the config"
            )
        state[name] = tensor
    return cfg, state, missing


# Stored names of the task heads' own modules; everything else sits under ``_PREFIX``.
_TOP_LEVEL = ("lm_head.", "cls.")
# The architecture an export writes (the task-head class ``_PREFIX`` names).
ARCHITECTURE = {"bert": "BertForMaskedLM", "gpt": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}


def _qualified(family: str, stored: str) -> str:
    return stored if stored.startswith(_TOP_LEVEL) else _PREFIX[family] + stored


def hf_state(cfg: ModelConfig, state: dict[str, torch.Tensor], *, tie: bool) -> dict[str, torch.Tensor]:
    """Our full-model tensors in the names and layouts of the family's task-head class
    (``ARCHITECTURE``): the load's table run backwards. Slices of one stored tensor
    (GPT-2's q, k, v) are concatenated in order, then transposed back; an alias gets a
    copy too (BERT's ``cls.predictions.bias`` beside the decoder's own). With ``tie``
    the output matrix is left out: transformers ties it to the token embedding."""
    mapping = _MAPPINGS[cfg.family](cfg, False)
    parts: dict[str, list[tuple[int, torch.Tensor]]] = {}
    layout: dict[str, _Source] = {}
    for name in expected_shapes(cfg):
        src = mapping[name]
        for stored in src.names:
            parts.setdefault(stored, []).append((src.part[0] if src.part else 0, state[name]))
            layout[stored] = src
    out: dict[str, torch.Tensor] = {}
    for stored, pieces in parts.items():
        src = layout[stored]
        count = src.part[1] if src.part else 1
        assert sorted(i for i, _ in pieces) == list(range(count)), f"{stored}: parts {[i for i, _ in pieces]}"
        t = torch.cat([t for _, t in sorted(pieces, key=lambda p: p[0])], dim=0) if count > 1 else pieces[0][1]
        out[_qualified(cfg.family, stored)] = (t.t() if src.transpose else t).to(torch.float32).contiguous().clone()
    if tie:
        out.pop(_qualified(cfg.family, mapping["head.decoder.weight"].names[0]))
    return out


def hf_linear(cfg: ModelConfig, linear: str) -> tuple[str, tuple[int, int] | None, bool]:
    """Where our linear ``linear`` (``blocks.3.attn.q_proj``) lives in the task-head class:
    (its module path, ``(index, count)`` when it is a slice of that module's output, as
    q is of GPT-2's ``c_attn``, or None; whether the module stores its weight
    transposed, as ``Conv1D`` does)."""
    src = _MAPPINGS[cfg.family](cfg, False).get(linear + ".weight")
    if src is None or not src.names[0].endswith(".weight"):
        raise SpecError(f"{linear} is not a linear of a {cfg.family} model")
    return _qualified(cfg.family, src.names[0][: -len(".weight")]), src.part, src.transpose


def with_seeded_init(cfg: ModelConfig, state: dict[str, torch.Tensor], *, seed: int = 0) -> dict[str, torch.Tensor]:
    """``state`` completed with the seeded init of every tensor it lacks (e.g. a new MLM head).

    The filled tensors equal those of ``build_model(cfg, seed)``, because every part is
    seeded on its own; only the parts that lack something are built.
    """
    need = [name for name in expected_shapes(cfg) if name not in state]
    if not need:
        return dict(state)
    blocks = sorted({int(n.split(".")[1]) for n in need if n.startswith("blocks.")})
    layers = (blocks[0], blocks[-1] + 1) if blocks else (0, 0)
    part = StageModel(cfg, layers, embed=any(n.startswith("embed.") for n in need),
                      head=any(n.startswith("head.") for n in need), seed=seed).state_dict()
    return {**state, **{n: part[n].detach().clone() for n in need}}


__all__ = ["ARCHITECTURE", "expected_shapes", "hf_linear", "hf_state", "load_pretrained", "with_seeded_init"]


def weights_digest(folder: str | Path) -> str:
    """A SHA-256 over a Hugging Face folder's safetensors files (names and bytes, in name
    order): what names the frozen base of a fine-tuning run in its checkpoints
    (``RunSpec.identity``). Reads every weight byte once per process while the files'
    names, sizes and modification times stay the same (``serve`` plans again on every
    regroup)."""
    files = sorted(Path(folder).resolve().glob("*.safetensors"))
    if not files:
        raise SpecError(f"{folder} holds no *.safetensors weights")
    return _digest(tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files))


@lru_cache(maxsize=16)
def _digest(files: tuple[tuple[str, int, int], ...]) -> str:
    import hashlib

    h = hashlib.sha256()
    for path, _, _ in files:
        h.update(Path(path).name.encode() + b"\0")
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()[:16]
