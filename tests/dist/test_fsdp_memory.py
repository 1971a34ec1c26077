"""fsdp holds less than dp: each device's peak resident memory, measured.

Each rank resets its peak resident set (``/proc/self/clear_refs``) and reads its
resident set just before it builds its engine; after two AdamW steps it reads the peak
(``VmHWM``). The peak covers the build (fsdp builds and shards one unit at a time), the
steps and the optimizer's state. A 4-block GPT of hidden 512 holds about 13M parameters
(52 MB in fp32; with gradients and AdamW's two moments about 210 MB on a dp replica).
Under fsdp over two devices each holds half of that, plus one unit whole.
"""

from __future__ import annotations

import ctypes
import os


from edgepool.data import ByteTokenizer, Sampler
from edgepool.models.config import preset
from edgepool.runtime.engine import Engine
from edgepool.runtime.groups import StageGroups
from edgepool.specs.plan import Plan, StagePlan
from edgepool.testing import CORPUS
from edgepool.testing.dist import run_distributed

LAYERS, BATCH, SEQ = 4, 4, 16


def _rss_bytes() -> int:
    _LIBC.malloc_trim(0)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set


def _peak_bytes() -> int:
    with open("/proc/self/status") as f:
        line = next(ln for ln in f if ln.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


_LIBC = ctypes.CDLL("libc.so.6")
M_MMAP_THRESHOLD = -3


def _growth(rank, world, plan):
    cfg = preset("gpt", "tiny", vocab_size=ByteTokenizer.vocab_size, num_layers=LAYERS, hidden=512, num_heads=8,
                 ffn=2048)
    # glibc raises its mmap threshold after large frees, after which freed tensors stay
    # resident; a fixed threshold returns every large tensor to the system when freed.
    _LIBC.mallopt(M_MMAP_THRESHOLD, 256 * 1024)
    groups = StageGroups.build(plan, rank, 20)
    sampler = Sampler(path=str(CORPUS), seq_len=SEQ, family="gpt", seed=0, mask_token_id=ByteTokenizer.mask_token_id)
    before = _rss_bytes()
    _reset_peak()
    eng = Engine(plan, cfg, rank=rank, sampler=sampler, global_batch=BATCH, seq_len=SEQ, groups=groups, lr=1e-3,
                 optimizer="adamw", timeout_s=20)
    for s in range(2):
        eng.step(s)
    peak = _peak_bytes() - before
    params = sum(p.numel() for p in cfg_params(eng)) * 4
    return peak, params


def cfg_params(eng):
    return [p.to_local() if hasattr(p, "to_local") else p for p in eng.model.parameters()]


def _plan(mode):
    return Plan(num_layers=LAYERS, stages=[StagePlan(layers=(0, LAYERS), mode=mode, devices=("a", "b"), shares=(1, 1))])


def test_fsdp_peak_memory_is_below_dp_on_every_device():
    dp = run_distributed(_growth, 2, _plan("dp"))
    fsdp = run_distributed(_growth, 2, _plan("fsdp"))
    for rank, ((dp_grow, dp_params), (fs_grow, fs_params)) in enumerate(zip(dp, fsdp)):
        assert fs_params < 0.6 * dp_params, (rank, fs_params, dp_params)  # the local parameters are shards
        # dp holds about 4x its parameters; fsdp about 4x half of them plus one whole unit.
        print(f"rank {rank}: peak resident growth dp {dp_grow / 2**20:.0f} MiB, fsdp {fs_grow / 2**20:.0f} MiB")
        assert fs_grow < 0.8 * dp_grow, (rank, fs_grow / 2**20, dp_grow / 2**20)
