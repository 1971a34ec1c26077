"""The gradient sync overlapped with the backward (``runtime.overlap``).

With a bucket cap far below a block's gradients, a dp or sp group sums its gradients
in several uneven buckets, launched in order while the last micro-batch's backward
runs; the numbers equal single-device training (the parity set-up of
``test_parity``), and the launches come before that backward has ended.
"""

from __future__ import annotations

import time

import pytest

from test_parity import LAYERS, SEQ, BATCH, _LR, _stage, assert_parity, reference  # noqa: F401
from edgepool.data import ByteTokenizer, Sampler
from edgepool.models.config import preset
from edgepool.runtime.engine import Engine, gather_full_state
from edgepool.runtime.groups import StageGroups
from edgepool.runtime.overlap import buckets_of, unit_of
from edgepool.specs.plan import Plan, StagePlan
from edgepool.testing import CORPUS
from edgepool.testing.dist import run_distributed

STEPS = 3
SMALL_BUCKET = 10_000  # bytes: a tiny block's gradients make several buckets of it, of uneven sizes

PLANS = {
    "dp-gpipe": Plan(num_layers=LAYERS, stages=[_stage((0, 4), ("a", "b"), "dp", (2, 1))], num_microbatches=2),
    "dp-1f1b-recompute": Plan(num_layers=LAYERS, stages=[StagePlan(layers=(0, 4), devices=("a", "b"), mode="dp",
                                                                   shares=(1, 3), recompute=True)],
                              num_microbatches=2, schedule="1f1b"),
    "sp": Plan(num_layers=LAYERS, stages=[_stage((0, 4), ("a", "b"), "sp", (5, 3))]),
    "dp-after-a-stage": Plan(num_layers=LAYERS, stages=[_stage((0, 1), ("a",)), _stage((1, 4), ("b", "c"), "dp", (1, 1))],
                             num_microbatches=2),
}


def _train(rank, world, plan, family, bucket_bytes):
    cfg = preset(family, "tiny", vocab_size=ByteTokenizer.vocab_size, num_layers=LAYERS)
    groups = StageGroups.build(plan, rank, 20)
    sampler = Sampler(path=str(CORPUS), seq_len=SEQ, family=family, seed=0, mask_token_id=ByteTokenizer.mask_token_id)
    eng = Engine(plan, cfg, rank=rank, sampler=sampler, global_batch=BATCH, seq_len=SEQ, groups=groups,
                 lr=_LR["sgd"], optimizer="sgd", timeout_s=20, bucket_bytes=bucket_bytes)
    ends: list[float] = []  # when the stage input's gradient is computed: its blocks' backward has ended
    run = eng.model.run_blocks

    def run_blocks(x):
        if x.requires_grad:
            x.register_hook(lambda g: ends.append(time.perf_counter()))
        return run(x)

    eng.model.run_blocks = run_blocks
    losses = []
    for s in range(STEPS):
        ends.clear()
        losses.append(eng.step(s).loss)
    gs = eng.grad_sync
    info = None
    if gs is not None:
        info = {"sizes": [sum(p.numel() * p.element_size() for p in b) for b in gs.buckets],
                "shared": [sum(p.numel() * p.element_size() for p in b) for b in gs.buckets if len(b) > 1],
                "launches": list(gs.launches), "last_bwd_end": ends[-1]}
    return (losses, gather_full_state(eng)), info


@pytest.mark.parametrize("name", list(PLANS))
def test_small_uneven_buckets_keep_parity_and_launch_in_the_backward(name):
    plan = PLANS[name]
    out = run_distributed(_train, plan.world_size, plan, "gpt", SMALL_BUCKET)
    assert_parity(reference("gpt", "sgd"), out[0][0])
    last = plan.num_microbatches - 1
    synced = [info for _, info in out if info is not None]
    assert len(synced) == 2
    for info in synced:
        sizes, launches = info["sizes"], info["launches"]
        # several buckets, uneven; a bucket of several parameters stays under the cap (a
        # larger parameter is a bucket of its own)
        assert len(sizes) >= 4 and len(set(sizes)) > 1 and info["shared"] and max(info["shared"]) <= SMALL_BUCKET, sizes
        assert [k for k, _, _ in launches] == list(range(len(sizes)))  # every bucket once, in order
        # only the last micro-batch's backward launches buckets (or the sync op, for what is left)
        assert {w for _, w, _ in launches} <= {f"head[{last}]", f"bwd[{last}]", f"embed_bwd[{last}]", "sync_grads"}
        # several buckets went out before the stage's backward had ended
        early = [t for _, w, t in launches if w == f"bwd[{last}]" and t < info["last_bwd_end"]]
        assert len(early) >= 3, launches
    # the replicas launched the same buckets
    assert synced[0]["sizes"] == synced[1]["sizes"]


def test_default_buckets_hold_a_tiny_stage_in_one_piece():
    """DDP's 25 MiB cap: a tiny model's gradients are one bucket, launched when the last
    of them (the embed's, on an owner) is final; still equal to one device."""
    plan = PLANS["dp-gpipe"]
    out = run_distributed(_train, 2, plan, "gpt", 25 * 2**20)
    assert_parity(reference("gpt", "sgd"), out[0][0])
    for _, info in out:
        assert len(info["sizes"]) == 1 and [w for _, w, _ in info["launches"]] == ["embed_bwd[1]"]


def test_buckets_of_cuts_in_reverse_order():
    assert buckets_of([4, 4, 4, 10, 1], 8) == [[4], [3], [2, 1], [0]]  # a parameter over the cap: alone
    assert buckets_of([4, 4, 4, 10, 1], 12) == [[4, 3], [2, 1, 0]]
    assert buckets_of([], 8) == []


def test_buckets_end_with_their_unit_once_big_enough():
    units = ["embed", "blocks.0", "blocks.0", "blocks.1", "blocks.1", "head"]
    # every unit ends a bucket once it holds 4 bytes: a block's gradients go out when its backward is done
    assert buckets_of([4, 2, 2, 2, 2, 4], 100, units, min_bytes=4) == [[5], [4, 3], [2, 1], [0]]
    # a unit smaller than min_bytes joins the next one (fewer, larger all-reduces)
    assert buckets_of([4, 1, 1, 1, 1, 4], 100, units, min_bytes=4) == [[5], [4, 3, 2, 1], [0]]
    # the cap still cuts inside a unit
    assert buckets_of([4, 2, 2, 2, 2, 4], 3, units, min_bytes=1) == [[5], [4], [3], [2], [1], [0]]
    assert [unit_of(n) for n in ("embed.tokens.weight", "blocks.11.attn.q_proj.base_layer.weight", "head.norm.bias")] \
        == ["embed", "blocks.11", "head"]
