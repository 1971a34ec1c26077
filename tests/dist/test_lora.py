"""LoRA and freezing (``models.lora``): every mode equals single-device LoRA.

Same seed, same batch, dropout off. Adapters on all seven linears of every block (rank
4), so tp slices column- and row-parallel adapters both. One forked run trains with SGD
and then with AdamW; each must give the single-device run's per-step losses and
adapters: SGD to 1e-5, AdamW to 1e-4 (AdamW's steps move every factor by ~1e-2). As
in the full-model AdamW test, AdamW divides by sqrt(v): where an adapter's gradient is
near zero (A's, while B is still near its zero start), float-reduction noise in it
moves an element by up to lr a step, so at most 1% of a tensor's elements may be off by
more than 1e-4, none by more than lr times the steps (measured: one element of 256 in
gpt tp's blocks.3.attn.k_proj.lora_A.weight, 1.1e-4 off). The frozen base
must not move, and only the adapters are in the optimizer and the checkpoint pieces.
"""

from __future__ import annotations

import pytest
import torch

from test_parity import LAYERS, SEQ, TWO_RANK, BATCH, SINGLE, _stage  # noqa: F401 - the full-model parity set-up
from edgepool.data import ByteTokenizer, Sampler
from edgepool.models.config import preset
from edgepool.models.lora import Tuning, is_adapter
from edgepool.runtime.engine import Engine, gather_full_state
from edgepool.runtime.groups import StageGroups
from edgepool.specs.job import LORA_TARGETS, LoraSpec
from edgepool.specs.plan import Plan
from edgepool.testing import CORPUS
from edgepool.testing.dist import run_distributed

pytest.importorskip("peft", reason="peft (LoRA's library, the lora extra) is not installed")

STEPS = 3
TUNING = Tuning(lora=LoraSpec(rank=4, alpha=8.0, targets=LORA_TARGETS))
RUNS = (("sgd", 0.5), ("adamw", 1e-2))


def _train(rank, world, plan, family, tuning=TUNING):
    cfg = preset(family, "tiny", vocab_size=ByteTokenizer.vocab_size, num_layers=LAYERS)
    out = {}
    for optimizer, lr in RUNS:
        groups = StageGroups.build(plan, rank, 20)
        sampler = Sampler(path=str(CORPUS), seq_len=SEQ, family=family, seed=0,
                          mask_token_id=ByteTokenizer.mask_token_id)
        eng = Engine(plan, cfg, rank=rank, sampler=sampler, global_batch=BATCH, seq_len=SEQ, groups=groups, lr=lr,
                     optimizer=optimizer, timeout_s=20, tuning=tuning)
        start = gather_full_state(eng)
        losses = [eng.step(s).loss for s in range(STEPS)]
        pieces, _ = eng.pieces()
        optimized = sum(len(g["params"]) for g in eng.optim.param_groups)
        trainable = sum(p.requires_grad for p in eng.model.parameters())
        out[optimizer] = (losses, start, gather_full_state(eng), sorted(pieces), optimized, trainable)
    return out


_reference: dict[str, dict] = {}


def reference(family: str):
    if family not in _reference:
        _reference[family] = run_distributed(_train, 1, SINGLE, family)[0]
    return _reference[family]


def _check(ref, got, family):
    for optimizer, tol in (("sgd", 1e-5), ("adamw", 1e-4)):
        r_losses, r_start, r_end, _, _, _ = ref[optimizer]
        losses, start, end, pieces, optimized, trainable = got[optimizer]
        for a, b in zip(r_losses, losses):
            assert abs(a - b) <= tol * abs(a), (optimizer, r_losses, losses)
        assert set(end) == set(r_end)
        adapters = [k for k in r_end if is_adapter(k)]
        assert len(adapters) == 2 * LAYERS * (7 if family == "llama" else 6)  # A and B of every linear (gate: llama)
        for k in r_end:
            if optimizer == "adamw":  # see the module docstring: a few elements may be off by up to lr a step
                off = (end[k] - r_end[k]).abs() > tol + tol * r_end[k].abs()
                assert off.float().mean().item() <= 0.01, (k, int(off.sum()), off.numel())
                torch.testing.assert_close(end[k], r_end[k], atol=STEPS * dict(RUNS)["adamw"], rtol=tol, msg=k)
            else:
                torch.testing.assert_close(end[k], r_end[k], atol=tol, rtol=tol, msg=f"{optimizer} {k}")
            if not is_adapter(k):  # the base never moves
                assert torch.equal(end[k], start[k]), k
        # the adapters trained. B starts at zero, so A's first gradient is zero and SGD
        # moves it by ~1e-7 in three steps (which its 1e-5 check cannot see), the B's by
        # 1e-5 (q, k) to 1e-2; AdamW's normalised steps move every factor (~1e-2), so its
        # run checks the A's
        moved = {k: (r_end[k] - r_start[k]).abs().max().item() for k in adapters
                 if optimizer == "adamw" or ".lora_B." in k}
        assert all(m > (1e-3 if optimizer == "adamw" else 0.0) for m in moved.values()) and max(moved.values()) > 1e-3
        # only adapters are optimised and checkpointed
        assert optimized == trainable and all(is_adapter(k.split("/")[1]) for k in pieces)


LORA_PLANS = {**{m: TWO_RANK[m] for m in ("dp", "tp", "sp", "fsdp", "pp-1f1b")}}


@pytest.mark.parametrize("family, mode", [(f, m) for f in ("gpt", "llama") for m in LORA_PLANS]
                         + [("bert", "dp"), ("bert", "pp-1f1b")])
def test_lora_two_rank_parity(family, mode):
    got = run_distributed(_train, 2, LORA_PLANS[mode], family)[0]
    _check(reference(family), got, family)


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_lora_hybrid_parity(family):
    """A tp pair feeding a one-device stage: sliced adapters, a pipeline boundary."""
    plan = Plan(num_layers=LAYERS, stages=[_stage((0, 2), ("a", "b"), "tp", (3, 1)), _stage((2, 4), ("c",))],
                num_microbatches=2, schedule="1f1b")
    got = run_distributed(_train, 3, plan, family)[0]
    _check(reference(family), got, family)


def test_freeze_patterns_train_only_the_rest():
    """``train.freeze`` without LoRA: matching parameters keep their init, the rest train
    as in a single-device run with the same patterns (dp over two ranks)."""
    tuning = Tuning(freeze=("embed.*", "blocks.[01].*"))
    ref = run_distributed(_train, 1, SINGLE, "gpt", tuning)[0]
    got = run_distributed(_train, 2, TWO_RANK["dp"], "gpt", tuning)[0]
    for optimizer, tol in (("sgd", 1e-5), ("adamw", 1e-4)):
        _, start, end, pieces, _, _ = got[optimizer]
        for k in end:
            frozen = k.startswith(("embed.", "blocks.0.", "blocks.1."))
            assert torch.equal(end[k], start[k]) == frozen, k
            torch.testing.assert_close(end[k], ref[optimizer][2][k], atol=tol, rtol=tol, msg=k)
        assert not any(k.split("/")[1].startswith(("embed.", "blocks.0.", "blocks.1.")) for k in pieces)
