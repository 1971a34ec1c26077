"""Timing and memory of a model's parts on this host (see the package docstring).

Timing is the *CPU time* (``time.process_time``) of the *fastest* of several calls
after warm-up calls (``_best_time``), not the median wall time: the profile stands for
this host's uncontended speed, which the testbed's CPU caps then scale (a device capped
at c cores spends CPU time / c of wall time on the work). On a machine shared with
other work, wall time absorbs that work's load (a profile measured here during a
concurrent test run came out up to 4x slow, and the error was cached with the
profile); CPU time does not count the time the process waited for a core, and the
minimum drops the calls that other work's cache traffic slowed down. Under heavy
oversubscription (4 busy processes on 2 cores) the result still came out up to 1.4x
slow, against 4x before. A backward pass is timed on its own (forward outside the
timer), not as (forward + backward) - forward, which doubled the noise of a small
difference. Ranks run one thread (``torch.set_num_threads(1)``), so CPU time is the
compute time. ``PROFILE_METHOD`` is part of the cache key, so profiles measured the
old way are measured again.

**Calibration.** Each part is timed alone (the fastest of several calls), while a run
takes the parts one after another, typical calls rather than the fastest. Single-device
runs of hidden 384-768 took 10-16% more CPU time than the parts added up to on this
host (``docs/results/cost-model.md``'s first widened run); timed in one process, whole
steps came out at 0.91-1.15 of the parts' sum depending on the model (so the gap is
not caches alone; its cause is not established). The profiler therefore also times whole training steps (embed, blocks, head and loss, backward,
optimizer; median CPU time of at least ``CALIBRATION_STEPS`` and ``CALIBRATION_MIN_S``
of steps after ``CALIBRATION_WARMUP_S`` of warm-up: a tiny model's three steps after one
warm-up step gave factors from 0.97 to 1.54 between profiles) of a model of the
same shape with as many blocks as fit ``CALIBRATION_MAX_PARAM_BYTES``, and scales
every part's times by measured / summed parts (``calibrate``; the factor is in the
profile's notes).

``precision`` (``train.precision``): under bf16 or fp16 every part runs under
``torch.autocast`` as the engine runs it (the head's loss in fp32 on
``logits.float()``), so times and kept activation bytes are autocast's. The weight
copies autocast keeps per call come from the analytic count (``cost.profile``), not
from the fit's intercept. An fp32 profile's cache key is unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import contextlib
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from edgepool.cost.profile import ModelDims, ModelProfile, Parts, analytic_profile, block_flops
from edgepool.models.stage import StageModel
from edgepool.models.config import ModelConfig
from edgepool.machine import cpu_name

# gloo's buffers and threads once a group is up: the resident memory of a rank with a
# tiny model (about 350 MB here) less that of a bare `import torch` (about 220 MB), less
# the profiler's own imports. An estimate, measured once on this kind of machine.
GLOO_ALLOWANCE_BYTES = 100e6
# Bump when the measurement changes, so cached profiles are measured again.
# 5: the rank baseline measured in a fresh interpreter (rank_baseline_bytes);
# 6: that interpreter imports what a rank imports (``RANK_MODULES``), not torch alone;
# 7: and the parts' times are calibrated by whole-model steps (``calibrate``)
# 8: ...timed over at least half a second of steps after a warm-up (was: 3 steps)
PROFILE_METHOD = 8
# What every rank imports before it builds a model (``python -m edgepool.runtime.rank``:
# the training loop, its engine, checkpoints, backups, the specs; pydantic, safetensors,
# numpy): 14 MB of resident memory over torch and torch.distributed on an x86 host
# (torch 2.13 CPU), which the baseline left out, so every rank measured above its
# prediction by about that much.
RANK_MODULES = ("edgepool.runtime.rank", "edgepool.runtime.train")
# The calibration step's model holds at most this many parameter bytes (and at least two
# blocks): far more than a CPU's caches, so the blocks' weights stream from memory as in
# a run, while a large model's profile stays measurable where the model does not fit.
CALIBRATION_MAX_PARAM_BYTES = 256e6
CALIBRATION_STEPS = 3
# ...and at least this much CPU time of them (at most CALIBRATION_MAX_STEPS), after at
# least one step and CALIBRATION_WARMUP_S of warm-up
CALIBRATION_MIN_S, CALIBRATION_MAX_STEPS, CALIBRATION_WARMUP_S = 0.5, 200, 0.2
CACHE_DIR = Path(os.environ.get("EDGEPOOL_CACHE", Path.home() / ".cache" / "edgepool")) / "profiles"


def host_id() -> str:
    return cpu_name()


def cache_key(cfg: ModelConfig, seq_len: int, optimizer: str, threads: int, precision: str = "fp32") -> str:
    key = {"model": cfg.to_dict(), "seq_len": seq_len, "optimizer": optimizer, "threads": threads,
           "host": host_id(), "torch": torch.__version__, "method": PROFILE_METHOD}
    if precision != "fp32":  # named only when set: fp32 profiles keep their keys
        key["precision"] = precision
    body = json.dumps(key, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()[:16]


def _best_time(fn, repeats: int, setup=None, warmup: int = 2) -> float:
    """CPU seconds of the fastest of ``repeats`` timed calls of ``fn`` after ``warmup``
    untimed ones.

    ``setup`` (untimed) runs before every call and its result is passed to ``fn``.
    """
    times = []
    for i in range(warmup + repeats):
        arg = setup() if setup is not None else None
        t0 = time.process_time()
        fn(arg) if setup is not None else fn()
        if i >= warmup:
            times.append(time.process_time() - t0)
    return min(times)


def _saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd saves while ``fn`` runs."""
    seen: dict[int, int] = {}

    def pack(t):
        try:
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def _fit(rows: list[tuple[float, float]], ys: list[float], quad: bool) -> tuple[float, float, float]:
    """Least squares of y = c0 + tokens * a (+ tokens * ctx * q); negatives clipped to 0."""
    x = np.array([[1.0, t, t * c] if quad else [1.0, t] for t, c in rows])
    coef, *_ = np.linalg.lstsq(x, np.array(ys), rcond=None)
    coef = [max(0.0, float(v)) for v in coef]
    return coef[0], coef[1], coef[2] if quad else 0.0


def _split(total: float, shares: Parts, quad: float) -> Parts:
    lin = shares.rep + shares.head + shares.ffn
    return Parts(rep=total * shares.rep / lin, head=total * shares.head / lin, ffn=total * shares.ffn / lin, quad=quad)


def _shapes(seq_len: int, max_seq: int) -> list[tuple[int, int]]:
    t = seq_len
    return sorted({(1, max(2, t // 2)), (2, t), (4, t), (8, t), (2, min(max_seq, 2 * t))})


# A fresh process computes slower for its first half second or so (allocator growth,
# page faults, library initialisation): the same block's fastest call was slower in a
# new process's first calls than after, every time, so profiles measured cold came out
# slow depending on which shapes fell into that window (figures in the commit that
# added the warm-up).
WARM_UP_CPU_S = 1.0


def _warm_up(block, cfg: ModelConfig, seq_len: int) -> None:
    """Run the block forward and backward for ``WARM_UP_CPU_S`` of CPU time, untimed."""
    x = torch.randn(2, seq_len, cfg.hidden, requires_grad=True)
    g = torch.randn(2, seq_len, cfg.hidden)
    t0 = time.process_time()
    while time.process_time() - t0 < WARM_UP_CPU_S:
        block(x).backward(g)


_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _autocast(precision: str):
    """The engine's compute context for ``precision`` (``runtime.engine``)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision not in _DTYPES:
        raise ValueError(f"unknown precision {precision!r}; known: fp32, {', '.join(_DTYPES)}")
    return torch.autocast("cpu", dtype=_DTYPES[precision])


def _under(module, precision: str):
    """``module``'s forward under autocast (its output cast back to fp32, as the engine
    casts what crosses a boundary)."""
    if precision == "fp32":
        return module

    def run(x):
        with _autocast(precision):
            y = module(x)
        return y.float()

    return run


_BASELINE = """
import importlib, sys
import torch, torch.distributed
for mod in sys.argv[1:]:
    importlib.import_module(mod)
from edgepool.machine import peak_rss_bytes
a = peak_rss_bytes()
for lib in ("torch.distributed.device_mesh", "torch.distributed.fsdp", "torch.distributed.tensor"):
    importlib.import_module(lib)
print(a, peak_rss_bytes())
"""


def rank_baseline_bytes() -> tuple[float, float]:
    """(a rank's resident memory before any model: the interpreter, torch,
    torch.distributed and edgepool's rank modules (``RANK_MODULES``), plus
    ``GLOO_ALLOWANCE_BYTES``; what fsdp's libraries add), measured
    in a fresh interpreter: this process's own peak holds whatever it did before (a
    study or a benchmark that built models), which no rank carries."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _BASELINE, *RANK_MODULES], capture_output=True, text=True,
                         timeout=120, check=True)
    before, after = (float(v) for v in out.stdout.split())
    return before + GLOO_ALLOWANCE_BYTES, after - before


def measure_profile(cfg: ModelConfig, *, seq_len: int, optimizer: str = "adamw", repeats: int = 15,
                    threads: int = 1, progress=None, precision: str = "fp32") -> ModelProfile:
    """Measure a profile of ``cfg`` on this host (see the package docstring), computing
    in ``precision`` as the engine does (module docstring)."""
    torch.set_num_threads(threads)
    runtime_bytes, fsdp_bytes = rank_baseline_bytes()
    dims = ModelDims.of(cfg)
    base = analytic_profile(dims, optimizer=optimizer, reference_kind="host-cpu", precision=precision)
    flops, _ = block_flops(dims)
    stage = StageModel(cfg, (0, 1), embed=True, head=True, seed=0)
    block, embed, head = (_under(m, precision) for m in (stage.blocks["0"], stage.embed, stage.head))
    _warm_up(block, cfg, seq_len)
    rows, fwd, bwd, act = [], [], [], []
    for b, t in _shapes(seq_len, cfg.max_seq_len):
        x = torch.randn(b, t, cfg.hidden, requires_grad=True)
        g = torch.randn(b, t, cfg.hidden)
        fwd.append(_best_time(lambda: block(x), repeats))
        bwd.append(_best_time(lambda y: y.backward(g), repeats, setup=lambda: block(x)))
        act.append(_saved_bytes(lambda: block(x)))
        rows.append((b * t, t))
        if progress:
            progress(f"block at batch {b}, sequence {t}")
    f0, fa, fq = _fit(rows, fwd, quad=True)
    b0, ba, bq = _fit(rows, bwd, quad=True)
    _, aa, aq = _fit(rows, [float(v) for v in act], quad=True)
    act_split = base.blocks[0].act_bytes
    block_lp = replace(
        base.blocks[0], fwd_s=_split(fa, flops, fq), bwd_s=_split(ba, flops, bq), fixed_fwd_s=f0, fixed_bwd_s=b0,
        act_bytes=_split(aa, act_split, aq),
    )
    # Embedding and head (with the loss): per token, no quadratic part.
    e_rows, e_f, e_b, h_t = [], [], [], []
    for b, t in _shapes(seq_len, cfg.max_seq_len):
        ids = torch.randint(0, cfg.vocab_size, (b, t))
        hx = torch.randn(b, t, cfg.hidden, requires_grad=True)
        labels = torch.randint(0, cfg.vocab_size, (b * t,))
        e_f.append(_best_time(lambda: embed(ids), repeats))
        e_b.append(_best_time(lambda y: y.sum().backward(), repeats, setup=lambda: embed(ids)))

        def head_step():
            logits = head(hx)  # fp32 (``_under``), as the engine's loss takes ``logits.float()``
            torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels).backward()

        h_t.append(_best_time(head_step, repeats))
        e_rows.append((b * t, t))
    ef0, efa, _ = _fit(e_rows, e_f, quad=False)
    eb0, eba, _ = _fit(e_rows, e_b, quad=False)
    h0, ha, _ = _fit(e_rows, h_t, quad=False)
    embed_lp = replace(base.embed, fwd_s=Parts(rep=efa), bwd_s=Parts(rep=eba), fixed_fwd_s=ef0, fixed_bwd_s=eb0)
    # The head's time is one forward+backward call: keep the cost model's 1:2 split.
    head_lp = replace(base.head, fwd_s=Parts(rep=ha / 3), bwd_s=Parts(rep=2 * ha / 3), fixed_fwd_s=h0 / 3,
                      fixed_bwd_s=2 * h0 / 3)
    # Optimizer step per parameter byte, on one block's parameters.
    params = [p for p in stage.blocks["0"].parameters()]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = torch.optim.AdamW(params, lr=1e-4) if optimizer == "adamw" else torch.optim.SGD(params, lr=1e-4)
    opt_s = _best_time(opt.step, repeats)
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    prof = replace(
        base, blocks=tuple(block_lp for _ in range(cfg.num_layers)), embed=embed_lp, head=head_lp,
        optim_s_per_param_byte=opt_s / param_bytes, source="measured", runtime_bytes=float(runtime_bytes),
        mode_runtime_bytes=(("fsdp", float(fsdp_bytes)),),
    )
    factor, n_blocks = calibrate(prof, cfg, seq_len=seq_len, optimizer=optimizer, precision=precision)
    if progress:
        progress(f"whole steps of {n_blocks} block(s): x{factor:.3f}")
    return replace(
        prof.scaled(factor),
        notes=(f"measured on {host_id()} with {threads} thread(s), torch {torch.__version__}"
               + (f", under {precision} autocast" if precision != "fp32" else "")
               + "; per-part split of the linear time by analytic FLOPs"
               + f"; calibrated by whole steps of {n_blocks} block(s): parts' times x{factor:.3f}",),
    )


def calibrate(prof: ModelProfile, cfg: ModelConfig, *, seq_len: int, optimizer: str,
              precision: str) -> tuple[float, int]:
    """Measured / predicted CPU time of a whole training step (module docstring), and
    the number of blocks it ran. Batch 2 of ``seq_len`` tokens."""
    block_bytes = prof.blocks[0].params_at()
    n = max(2, min(cfg.num_layers, int(CALIBRATION_MAX_PARAM_BYTES // max(1.0, block_bytes))))
    model = StageModel(replace(cfg, num_layers=n), (0, n), embed=True, head=True, seed=0)
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4) if optimizer == "adamw" else torch.optim.SGD(params, lr=1e-4)
    b, t = 2, min(seq_len, cfg.max_seq_len)
    ids = torch.randint(0, cfg.vocab_size, (b, t))
    labels = torch.randint(0, cfg.vocab_size, (b * t,))
    parts = [_under(m, precision) for m in (model.embed, *model.blocks.values(), model.head)]

    def step():
        x = ids
        for m in parts:
            x = m(x)
        torch.nn.functional.cross_entropy(x.float().reshape(-1, x.shape[-1]), labels).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    # warm-up, then at least CALIBRATION_STEPS timed steps and CALIBRATION_MIN_S of them
    # (a small model's few-millisecond steps: three of them varied by 1.5x between profiles)
    warm = time.process_time()
    while True:
        step()
        if time.process_time() - warm >= CALIBRATION_WARMUP_S:
            break
    times: list[float] = []
    while len(times) < CALIBRATION_STEPS or (sum(times) < CALIBRATION_MIN_S and len(times) < CALIBRATION_MAX_STEPS):
        t0 = time.process_time()
        step()
        times.append(time.process_time() - t0)
    tokens = b * t
    pred = sum(lp.fwd_s.at(tokens, t) + lp.bwd_s.at(tokens, t) + lp.fixed_fwd_s + lp.fixed_bwd_s
               for lp in (prof.embed, *prof.blocks[:n], prof.head))
    pred += prof.optim_s_per_param_byte * sum(p.numel() * p.element_size() for p in params)
    return float(np.median(times)) / pred, n


def cached_profile(cfg: ModelConfig, *, seq_len: int, optimizer: str = "adamw", threads: int = 1,
                   refresh: bool = False, progress=None, precision: str = "fp32") -> tuple[ModelProfile, Path, bool]:
    """A measured profile from the cache, measuring it first when missing.

    Returns (profile, cache path, whether it came from the cache)."""
    path = CACHE_DIR / f"{cache_key(cfg, seq_len, optimizer, threads, precision)}.json"
    if path.is_file() and not refresh:
        return ModelProfile.load(path), path, True
    prof = measure_profile(cfg, seq_len=seq_len, optimizer=optimizer, threads=threads, progress=progress,
                           precision=precision)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(prof.dumps())
    os.replace(tmp, path)
    return prof, path, False
