"""Lower precision (``train.precision``): bf16 and fp16 autocast over fp32 master weights.

bf16 under dp, pp and tp (uneven shares) against a single-device bf16 run, with the
tolerance said on ``test_bf16_parity``; activation recomputation under autocast; fp16
against a single-device fp16 run; and fp16's loss scaler skipping a step on every rank
when one rank's gradients overflow. fp32 is covered, bit for bit, by ``test_parity``.
"""

from __future__ import annotations

import math

import pytest
import torch

from edgepool.data import ByteTokenizer, Sampler
from edgepool.models.config import preset
from edgepool.runtime.engine import Engine, LossScaler, gather_full_state
from edgepool.runtime.groups import StageGroups
from edgepool.testing import CORPUS
from edgepool.testing.dist import run_distributed

from test_parity import BATCH, LAYERS, SEQ, SINGLE, STEPS, TWO_RANK, _recomputing

LR = 0.5  # sgd, as in test_parity: large enough that rounding differences show in the parameters
_refs: dict[str, tuple] = {}


def _train(rank, world, plan, precision, inject_inf_at=None):
    """Per-step losses, the stitched parameters, the steps skipped and the final loss
    scale; checks the master weights stay fp32 and the head computes in the precision's
    dtype (``inject_inf_at``: rank 1 makes one of its gradients inf before that step's
    optimizer, and checks its parameters did not move in that step)."""
    cfg = preset("gpt", "tiny", vocab_size=ByteTokenizer.vocab_size, num_layers=LAYERS)
    groups = StageGroups.build(plan, rank, 20)
    sampler = Sampler(path=str(CORPUS), seq_len=SEQ, family="gpt", seed=0, mask_token_id=ByteTokenizer.mask_token_id)
    eng = Engine(plan, cfg, rank=rank, sampler=sampler, global_batch=BATCH, seq_len=SEQ, groups=groups, lr=LR,
                 optimizer="sgd", timeout_s=20, precision=precision)
    if inject_inf_at is not None and rank == 1:
        optim = eng._op_optim

        def poisoned(mb):
            if eng._step == inject_inf_at:
                next(p for p in eng.model.parameters() if p.grad is not None).grad.view(-1)[0] = math.inf
            optim(mb)

        eng._op_optim = poisoned
    dtypes = set()  # what the head computes in (autocast is really on)
    if eng.model.head is not None:
        eng.model.head.register_forward_hook(lambda m, args, out: dtypes.add(out.dtype))
    losses, skipped = [], []
    for s in range(STEPS):
        before = {k: v.clone() for k, v in eng.local_state().items()}
        res = eng.step(s)
        losses.append(res.loss)
        if res.skipped:
            skipped.append(s)
            assert all(torch.equal(before[k], v) for k, v in eng.local_state().items())
    assert all(p.dtype == torch.float32 for p in eng.model.parameters())  # master weights stay fp32
    if precision != "fp32" and eng.model.head is not None:
        assert dtypes == {{"bf16": torch.bfloat16, "fp16": torch.float16}[precision]}, dtypes
    scale = eng.scaler.scale if eng.scaler is not None else None
    return losses, gather_full_state(eng), skipped, scale


def reference(precision: str):
    return trained(SINGLE, precision)


def trained(plan, precision: str):
    """Rank 0's result of a plain run (cached: the tests share runs)."""
    key = (plan.plan_id, precision)
    if key not in _refs:
        _refs[key] = run_distributed(_train, plan.world_size, plan, precision)[0]
    return _refs[key]


def max_deviation(ref, got) -> tuple[float, float]:
    """(largest relative loss difference over the steps, largest absolute parameter difference)."""
    loss = max(abs(a - b) / abs(a) for a, b in zip(ref[0], got[0]))
    assert set(ref[1]) == set(got[1])
    param = max((ref[1][k] - got[1][k]).abs().max().item() for k in ref[1])
    return loss, param


# bf16 keeps 8 significant bits (relative rounding up to 2**-9, about 2e-3). A split run
# rounds differently from one device: dp and pp round each device's weight-gradient
# partial sums to bf16 before adding them in fp32, tp all-reduces bf16 partial sums of
# the projections. Measured here (gpt tiny, 3 sgd steps at lr 0.5): losses within 2.3e-4
# relative (pp-1f1b), parameters within 2.2e-3 absolute (tp), which is as far as the
# single-device bf16 run is from the fp32 one (2.0e-3). Asserted with headroom:
LOSS_RTOL, PARAM_ATOL = 1e-3, 5e-3


@pytest.mark.parametrize("mode", ["dp", "pp-1f1b", "tp"])
def test_bf16_parity(mode):
    """bf16 on two ranks with uneven shares agrees with bf16 on one device: every step's
    loss within LOSS_RTOL (1e-3) relative, every parameter within PARAM_ATOL (5e-3)
    absolute after 3 steps. Autocast is really on: the head computes in bf16 (``_train``)."""
    ref = reference("bf16")
    got = trained(TWO_RANK[mode], "bf16")
    loss_dev, param_dev = max_deviation(ref, got)
    assert loss_dev <= LOSS_RTOL, (mode, loss_dev)
    assert param_dev <= PARAM_ATOL, (mode, param_dev)


def test_bf16_recomputation_changes_no_number():
    """Non-reentrant checkpointing restores the autocast state when it runs a block
    again, so recomputation under bf16 gives the same numbers, bit for bit."""
    plan = TWO_RANK["pp-1f1b"]
    kept = trained(plan, "bf16")
    redone = run_distributed(_train, 2, _recomputing(plan), "bf16")[0]
    assert kept[0] == redone[0]
    assert all(torch.equal(kept[1][k], redone[1][k]) for k in kept[1])


def test_fp16_trains_like_one_device():
    """fp16 with loss scaling through a 1f1b pipeline: finite losses, no step skipped,
    the scale unchanged on both ranks, and within the bf16 tolerance of one device in
    fp16 (fp16 keeps 11 significant bits; measured 1.5e-5 and 1.1e-4)."""
    ref = reference("fp16")
    got = run_distributed(_train, 2, TWO_RANK["pp-1f1b"], "fp16")
    for losses, _, skipped, scale in got:
        assert all(math.isfinite(v) for v in losses) and skipped == [] and scale == 2.0**16
    loss_dev, param_dev = max_deviation(ref, got[0])
    assert loss_dev <= LOSS_RTOL and param_dev <= PARAM_ATOL, (loss_dev, param_dev)


def test_fp16_scaler_skips_the_same_step_on_every_rank():
    """An inf gradient on rank 1 only (the pipeline's last stage, not a data owner) at
    step 1: the inf flag is all-reduced over the world, so both ranks skip step 1
    (their parameters do not move in it, checked on each rank), both halve the scale,
    and the losses stay finite and unscaled (about ln(vocab) at the start)."""
    got = run_distributed(_train, 2, TWO_RANK["pp-1f1b"], "fp16", 1)
    for losses, _, skipped, scale in got:
        assert skipped == [1], got
        assert scale == 2.0**15
        assert all(math.isfinite(v) for v in losses) and 3.0 < losses[0] < 10.0
    assert got[0][0] == got[1][0]


def _roundtrip(rank, world, plan):
    cfg = preset("gpt", "tiny", vocab_size=ByteTokenizer.vocab_size, num_layers=LAYERS)
    groups = StageGroups.build(plan, rank, 20)
    sampler = Sampler(path=str(CORPUS), seq_len=SEQ, family="gpt", seed=0, mask_token_id=ByteTokenizer.mask_token_id)
    eng = Engine(plan, cfg, rank=rank, sampler=sampler, global_batch=BATCH, seq_len=SEQ, groups=groups, lr=LR,
                 optimizer="sgd", timeout_s=20, precision="fp16")
    eng.scaler.scale, eng.scaler.good_steps = 2.0**10, 7  # as a run that has halved it a few times
    eng.step(0)
    tensors, scalars = eng.pieces()
    assert scalars[LossScaler.KEY] == {"scale": 2.0**10, "good_steps": 8}
    if rank == 1:
        del scalars[LossScaler.KEY]  # a rank whose new state came without it (regrouping)
    eng.load_pieces(tensors, scalars)
    eng.scaler.synced = False  # what a new engine starts with
    eng.step(1)
    return eng.scaler.state()


def test_loss_scale_travels_with_the_optimizer_scalars():
    """The scale is one of the optimizer scalars of ``Engine.pieces`` (so checkpoints,
    resharding and in-memory recovery keep it); a rank whose state came without it
    learns it from the others at its engine's first step."""
    got = run_distributed(_roundtrip, 2, TWO_RANK["dp"])
    assert got == [{"scale": 2.0**10, "good_steps": 9}] * 2
