"""``edgepool export``: a run's checkpoint as a Hugging Face folder that transformers (and
peft, for LoRA adapters) loads to the same logits as edgepool's own model.

Each family (GPT-2, BERT-MLM, LLaMA with grouped-query heads) starts from a tiny random
pretrained folder written by transformers; a fake run dir holds its ``RunSpec`` and a
checkpoint written through ``runtime.checkpoint.save`` (a stand-in engine and comm:
the file format, manifest and checksums are the real ones). LoRA runs' checkpoints hold
only the adapters (random, nonzero), as a frozen base needs; the base comes from the
pretrained folder. The reference is edgepool's forward with ``W + s * B @ A`` merged
by hand.

transformers and peft are imported once per module (seconds); without them these
tests skip with the reason.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from edgepool.errors import SpecError
from edgepool.models import build_model, load_pretrained, with_seeded_init
from edgepool.models.config import _from_raw, preset, to_hf_config
from edgepool.runtime import checkpoint
from edgepool.runtime.train import RunSpec
from edgepool.specs import JobSpec, Plan, PoolSpec, StagePlan
from edgepool.testing import CORPUS

ATOL = 1e-5
VOCAB = 272  # at least the byte vocabulary (260): these pretrained folders have no tokenizer.json
POOL = PoolSpec(devices=[{"name": "a", "kind": "host-cpu"}, {"name": "b", "kind": "host-cpu"}])
# Targets per family: GPT-2 leaves k out (a zero block in c_attn's fused adapter) and adapts
# both of a block's c_proj modules (attn.c_proj = o_proj, mlp.c_proj = down).
TARGETS = {"gpt2": ["q_proj", "v_proj", "o_proj", "down"], "bert": ["q_proj", "k_proj", "v_proj", "o_proj", "up", "down"],
           "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "up", "gate", "down"]}
AUTO = {"gpt2": "AutoModelForCausalLM", "bert": "AutoModelForMaskedLM", "llama": "AutoModelForCausalLM"}


@pytest.fixture(scope="module")
def tf():
    os.environ["HF_HUB_OFFLINE"] = "1"  # never reach the network, even by mistake
    return pytest.importorskip("transformers", reason="transformers (a test-only dependency) is not installed")


@pytest.fixture(scope="module")
def peft(tf):
    return pytest.importorskip("peft", reason="peft (the lora extra, a test dependency) is not installed")


@pytest.fixture(scope="module")
def pretrained(tf, tmp_path_factory):
    """kind -> a tiny random pretrained folder (transformers' save_pretrained; GPT-2 tied)."""
    out = {}
    for kind in ("gpt2", "bert", "llama"):
        common = dict(vocab_size=VOCAB, tie_word_embeddings=kind == "gpt2")
        if kind == "gpt2":
            model = tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
                                                     eos_token_id=0, **common))
        elif kind == "llama":
            model = tf.LlamaForCausalLM(tf.LlamaConfig(
                hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=48, max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=500.0, **common))
        else:
            model = tf.BertForMaskedLM(tf.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                     intermediate_size=48, max_position_embeddings=64, **common))
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, p in model.named_parameters():
                noise = torch.randn(p.shape, generator=g) * 0.2
                p.copy_(noise + 1.0 if p.dim() == 1 and name.endswith("weight") else noise)
        folder = tmp_path_factory.mktemp(f"pre-{kind}")
        model.save_pretrained(str(folder))
        (folder / "vocab.txt").write_text("a stand-in tokenizer file, copied along\n")
        out[kind] = folder
    return out


class _Engine:
    """What ``checkpoint.save`` reads of an engine: its pieces, plan and shard spec."""

    def __init__(self, plan: Plan, tensors: dict[str, torch.Tensor], shard_spec=None):
        self.plan, self.tensors, self.shard_spec = plan, tensors, shard_spec or {}

    def pieces(self):
        return {f"model/{k}": v.contiguous() for k, v in self.tensors.items()}, {}


class _Comm:
    """The ranks' gathers, run one rank after another in one process (rank 0 last)."""

    def __init__(self):
        self.got = []

    def gather_json(self, value, what):
        self.got.append(value)
        return list(self.got)

    def barrier(self, what):
        pass


def _run_dir(tmp: Path, job: JobSpec, plan: Plan, ranks: list[tuple[dict, dict]], step: int = 4) -> tuple[Path, RunSpec]:
    """A run folder: run.json, and checkpoint ``step`` with one rank file per (tensors, shard spec)."""
    run = RunSpec(pool=POOL, job=job, plan=plan, out_dir=str(tmp), steps=job.train.steps)
    tmp.mkdir(parents=True, exist_ok=True)
    run.dump(tmp / "run.json")
    comm = _Comm()
    for rank in reversed(range(len(ranks))):
        tensors, spec = ranks[rank]
        checkpoint.save(tmp / "checkpoints", step, _Engine(plan, tensors, spec), rank, run.identity(), comm)
    return tmp, run


def _job(folder: Path, lora: list[str] | None = None) -> JobSpec:
    train = {"seq_len": 16, "steps": 4, "checkpoint_every": 2}
    if lora is not None:
        train["lora"] = {"rank": 2, "alpha": 6.0, "targets": lora}
    return JobSpec(model={"pretrained": str(folder)}, data={"path": str(CORPUS)}, train=train)


def _adapters(cfg, targets: list[str], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = {k: v for k, v in build_model(cfg).state_dict().items()}
    out = {}
    for i in range(cfg.num_layers):
        for t in targets:
            linear = f"blocks.{i}.{'attn' if t.endswith('_proj') else 'mlp'}.{t}"
            out_f, in_f = shapes[linear + ".weight"].shape
            out[linear + ".lora_A.weight"] = torch.randn(2, in_f, generator=g) * 0.3
            out[linear + ".lora_B.weight"] = torch.randn(out_f, 2, generator=g) * 0.3
    return out


def _reference(cfg, state: dict[str, torch.Tensor], scaling: float = 0.0) -> torch.nn.Module:
    """edgepool's model holding ``state`` with every adapter merged by hand, in float64:
    transformers' float32 forward with the adapters merged and peft's with them apart
    round differently (about 1e-5 apart on these logits), and each is within 1e-5 of
    the exact value."""
    base = {k: v.double() for k, v in state.items() if ".lora_" not in k}
    for k in state:
        if k.endswith(".lora_A.weight"):
            linear = k[: -len(".lora_A.weight")]
            delta = state[linear + ".lora_B.weight"].double() @ state[k].double()
            base[linear + ".weight"] = base[linear + ".weight"] + scaling * delta
    model = build_model(cfg).double()
    model.load_state_dict(base)
    return model.eval()


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids)
    return (out if isinstance(out, torch.Tensor) else out.logits).double()


IDS = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))


def _export(run_dir: Path, out: Path, *args: str) -> None:
    from edgepool.cli.main import main

    assert main(["export", "--run", str(run_dir), "--out", str(out), *args]) == 0


# -- LoRA runs: merged and in peft's format ---------------------------------------------------


@pytest.mark.parametrize("kind", ["gpt2", "bert", "llama"])
def test_lora_run_exports_merged_and_as_peft_adapters(tf, peft, pretrained, tmp_path, kind):
    from edgepool.models.config import job_model_config

    job = _job(pretrained[kind], TARGETS[kind])
    cfg = job_model_config(job)
    plan = Plan(num_layers=cfg.num_layers, stages=[StagePlan(layers=(0, cfg.num_layers), devices=("a",))])
    adapters = _adapters(cfg, TARGETS[kind], seed=2)
    run_dir, _ = _run_dir(tmp_path / "run", job, plan, [(adapters, {})])  # the frozen base is not in it
    _, base, _ = load_pretrained(pretrained[kind])
    want = _logits(_reference(cfg, {**with_seeded_init(cfg, base), **adapters}, 6.0 / 2), IDS)
    auto = getattr(tf, AUTO[kind])

    _export(run_dir, tmp_path / "merged", "--merge")
    merged = tmp_path / "merged"
    assert not (merged / "adapter_config.json").exists() and (merged / "vocab.txt").is_file()
    hf_cfg = json.loads((merged / "config.json").read_text())
    assert hf_cfg["torch_dtype"] == hf_cfg["dtype"] == "float32" and hf_cfg["tie_word_embeddings"] == (kind == "gpt2")
    err = (_logits(auto.from_pretrained(str(merged)).eval(), IDS) - want).abs().max().item()
    assert err <= ATOL, f"{kind} merged: max abs difference {err:.2e}"

    _export(run_dir, tmp_path / "adapters")
    folder = tmp_path / "adapters"
    model = peft.PeftModel.from_pretrained(auto.from_pretrained(str(folder)), str(folder)).eval()
    err = (_logits(model, IDS) - want).abs().max().item()
    # peft adds B(A x) beside W x in float32: on BERT (post-norm) that rounds to 1.5e-5 off
    # the exact logits; the weights it merges to are checked exactly below
    assert err <= 2 * ATOL, f"{kind} peft adapters: max abs difference {err:.2e}"
    folded = model.merge_and_unload().state_dict()
    exact = auto.from_pretrained(str(merged)).state_dict()
    assert set(exact) <= set(folded), sorted(set(exact) - set(folded))[:3]
    err = max((folded[k] - v).abs().max().item() for k, v in exact.items())
    assert err <= 1e-6, f"{kind}: peft's merged weights differ from --merge's by {err:.2e}"
    if kind == "gpt2":  # q and v share c_attn: one adapter of rank 2 * 2, scaling kept
        conf = json.loads((folder / "adapter_config.json").read_text())
        assert conf["rank_pattern"]["transformer.h.0.attn.c_attn"] == 4
        assert conf["alpha_pattern"]["transformer.h.0.attn.c_attn"] == 12.0
    # the folder loads back into edgepool as the base it was exported from
    _, again, missing = load_pretrained(folder)
    assert missing == [] and all(torch.equal(again[k], v) for k, v in base.items())


# -- a tp checkpoint: shards stitched from two rank files ------------------------------------


def test_tp_shards_are_stitched_and_match_transformers(tf, pretrained, tmp_path):
    from edgepool.models.config import job_model_config

    job = _job(pretrained["gpt2"])
    cfg = job_model_config(job)
    g = torch.Generator().manual_seed(3)
    _, base, _ = load_pretrained(pretrained["gpt2"])
    trained = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in with_seeded_init(cfg, base).items()}
    ranks = [({}, {}), ({}, {})]
    for k, v in trained.items():
        if k.startswith("blocks.") and v.dim() == 2:  # each rank half the rows, as a column split holds them
            half = v.shape[0] // 2
            for r, (a, b) in enumerate(((0, half), (half, v.shape[0]))):
                ranks[r][0][k], ranks[r][1][k] = v[a:b].clone(), (0, a, b)
        elif k.startswith("blocks."):  # whole on both ranks
            ranks[0][0][k] = ranks[1][0][k] = v
        else:  # embed and head whole on the first rank only
            ranks[0][0][k] = v
    plan = Plan(num_layers=cfg.num_layers, stages=[StagePlan(layers=(0, cfg.num_layers), mode="tp", devices=("a", "b"))])
    run_dir, _ = _run_dir(tmp_path / "run", job, plan, ranks)
    _export(run_dir, tmp_path / "hf", "--merge")  # no LoRA: --merge changes nothing
    hf_cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf_cfg["tie_word_embeddings"] is False  # the trained head differs from the embedding
    got = _logits(tf.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval(), IDS)
    err = (got - _logits(_reference(cfg, trained), IDS)).abs().max().item()
    assert err <= ATOL, f"max abs difference {err:.2e}"


# -- refusals: one line each -------------------------------------------------------------------


def _error(capsys, run_dir: Path, out: Path, *args: str) -> str:
    from edgepool.cli.main import main

    assert main(["export", "--run", str(run_dir), "--out", str(out), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert not out.exists()
    return err


def test_no_corrupt_or_incomplete_checkpoint_is_exported(pretrained, tmp_path, capsys):
    from edgepool.models.config import job_model_config

    job = _job(pretrained["llama"])
    cfg = job_model_config(job)
    plan = Plan(num_layers=cfg.num_layers, stages=[StagePlan(layers=(0, cfg.num_layers), devices=("a",))])
    run = RunSpec(pool=POOL, job=job, plan=plan, out_dir=str(tmp_path), steps=4)
    (tmp_path / "empty").mkdir()
    run.dump(tmp_path / "empty" / "run.json")
    assert "train.checkpoint_every" in _error(capsys, tmp_path / "empty", tmp_path / "out")

    _, base, _ = load_pretrained(pretrained["llama"])
    state = with_seeded_init(cfg, base)
    run_dir, _ = _run_dir(tmp_path / "run", job, plan, [(state, {})])
    f = run_dir / "checkpoints" / "step-000004" / "rank-0.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    assert "does not match its checksum" in _error(capsys, run_dir, tmp_path / "out", "--step", "4")
    assert "no usable checkpoint" in _error(capsys, run_dir, tmp_path / "out")
    assert "no checkpoint of step 2" in _error(capsys, run_dir, tmp_path / "out", "--step", "2")

    # a tensor the run trains (no LoRA, nothing frozen) missing from the checkpoint
    partial = {k: v for k, v in state.items() if k != "blocks.1.mlp.up.weight"}
    run_dir, _ = _run_dir(tmp_path / "partial", job, plan, [(partial, {})])
    assert "blocks.1.mlp.up.weight" in _error(capsys, run_dir, tmp_path / "out")


# -- pure helpers --------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["gpt", "bert", "llama"])
def test_hf_config_is_the_inverse_of_reading_it(family):
    cfg = preset(family, "tiny", vocab_size=50, num_layers=2, num_kv_heads=2 if family == "llama" else None,
                 rope_theta=500.0 if family == "llama" else 10000.0)
    again = _from_raw(to_hf_config(cfg), Path("config.json"))
    assert again == cfg


def test_hf_config_keeps_the_pretrained_fields_it_does_not_own():
    cfg = preset("llama", "tiny", vocab_size=50, num_layers=2)
    base = {"model_type": "llama", "dtype": "bfloat16", "torch_dtype": "bfloat16", "bos_token_id": 5,
            "auto_map": {"AutoModel": "remote.Code"}, "rope_scaling": {"rope_type": "yarn"}, "hidden_size": 8}
    out = to_hf_config(cfg, base)
    assert (out["dtype"], out["torch_dtype"], out["bos_token_id"], out["hidden_size"]) == ("float32", "float32", 5, 64)
    assert "auto_map" not in out and "rope_scaling" not in out  # no remote code; our rotary is the default one
    assert to_hf_config(cfg)["bos_token_id"] is None  # the byte vocabulary has no special tokens


def test_a_fine_tuning_run_names_its_frozen_base(tmp_path):
    """A LoRA (or freeze) run from pretrained weights carries their digest in its identity,
    so its checkpoints (which hold only what trains) resume only on the same base."""
    from safetensors.torch import save_file

    from edgepool.models.hf import weights_digest

    folder = tmp_path / "base"
    folder.mkdir()
    save_file({"w": torch.ones(3)}, str(folder / "model.safetensors"))
    first = weights_digest(folder)
    assert first == weights_digest(folder) and len(first) == 16
    save_file({"w": torch.tensor([1.0, 1.0, 1.5])}, str(folder / "model.safetensors"))
    assert weights_digest(folder) != first
    with pytest.raises(SpecError, match="no \\*.safetensors"):
        weights_digest(tmp_path)


def test_the_run_identity_names_the_base_of_a_lora_run(pretrained, tmp_path):
    """``prepare_run`` digests the pretrained weights of a LoRA run (not of a full
    fine-tuning, whose checkpoints hold every weight), and the identity carries it."""
    import yaml

    from edgepool.launch.prepare import prepare_run
    from edgepool.models.hf import weights_digest

    pool = tmp_path / "pool.yaml"
    pool.write_text("devices:\n  - {name: a, kind: host-cpu, host: local}\n")
    runs = {}
    for name, train in (("full", {}), ("lora", {"lora": {"rank": 2}})):
        job = tmp_path / f"{name}.yaml"
        job.write_text(yaml.safe_dump({"model": {"pretrained": str(pretrained["llama"])},
                                       "data": {"path": str(CORPUS)}, "train": {"seq_len": 16, **train},
                                       "parallelism": "single"}))
        runs[name] = prepare_run(pool, job, out_dir=tmp_path / name, log=lambda m: None)
    assert runs["full"].base == "" and "base" not in runs["full"].identity()
    assert runs["lora"].identity()["base"] == runs["lora"].base == weights_digest(pretrained["llama"])
