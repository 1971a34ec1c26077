"""The profiler: measured per-part costs of a tiny model, the cache, the link fit."""

from __future__ import annotations

import pytest

from edgepool.cost import ModelDims, analytic_profile
from edgepool.models.config import preset
from edgepool.profiler import layers
from edgepool.profiler.link import fit_link


def test_measured_profile_is_positive_and_cached(tmp_path, monkeypatch):
    monkeypatch.setattr(layers, "CACHE_DIR", tmp_path)
    cfg = preset("gpt", "tiny", vocab_size=260, num_layers=2)
    prof, path, cached = layers.cached_profile(cfg, seq_len=16)
    assert not cached and path.parent == tmp_path and prof.source == "measured"
    block = prof.blocks[0]
    assert block.fwd_s.total(16) > 0 and block.bwd_s.total(16) > 0
    assert block.act_bytes.total(16) > 0 and prof.optim_s_per_param_byte > 0
    assert prof.runtime_bytes > 50e6  # torch alone is resident
    # Shape-free: the parameter bytes are the analytic ones, whatever was timed.
    assert block.params_bytes == analytic_profile(ModelDims.of(cfg)).blocks[0].params_bytes
    again, path2, cached2 = layers.cached_profile(cfg, seq_len=16)
    assert cached2 and path2 == path and again == prof
    _, path3, _ = layers.cached_profile(cfg, seq_len=32)  # another shape, another key
    assert path3 != path


def test_the_profile_is_calibrated_by_whole_steps(monkeypatch):
    """The parts' times are scaled so that they add up to a whole step's measured time
    (``layers.calibrate``): scaling is exact, and the factor is recorded."""
    monkeypatch.setattr(layers, "WARM_UP_CPU_S", 0.0)
    cfg = preset("gpt", "tiny", vocab_size=260, num_layers=3)
    prof = layers.measure_profile(cfg, seq_len=16, repeats=1)
    assert "calibrated by whole steps of 3 block(s)" in prof.notes[0]
    factor = float(prof.notes[0].rsplit("x", 1)[1])
    assert 0.3 < factor < 3.0  # a measured ratio of the same work, not a runaway
    doubled = prof.scaled(2.0)
    assert doubled.blocks[1].fwd_s.total(16) == pytest.approx(2 * prof.blocks[1].fwd_s.total(16))
    assert doubled.head.fixed_bwd_s == pytest.approx(2 * prof.head.fixed_bwd_s)
    assert doubled.optim_s_per_param_byte == pytest.approx(2 * prof.optim_s_per_param_byte)
    assert doubled.blocks[0].act_bytes == prof.blocks[0].act_bytes  # memory is not time


def test_fit_recovers_a_linear_model():
    rows = [(t, c) for t, c in [(8, 8), (16, 16), (32, 16), (64, 32), (8, 32)]]
    ys = [1e-3 + 2e-6 * t + 3e-8 * t * c for t, c in rows]
    fixed, a, q = layers._fit(rows, ys, quad=True)
    assert fixed == pytest.approx(1e-3, rel=1e-6) and a == pytest.approx(2e-6, rel=1e-6)
    assert q == pytest.approx(3e-8, rel=1e-6)


def test_link_fit_gives_latency_and_bandwidth():
    # 2 ms one way plus 100 Mbit/s.
    points = [(n, 2e-3 + n * 8 / 100e6) for n in (1_000, 100_000, 1_000_000, 4_000_000)]
    link = fit_link(points)
    assert link["latency_ms"] == pytest.approx(2.0, rel=1e-6)
    assert link["bandwidth_mbps"] == pytest.approx(100.0, rel=1e-6)


def test_a_bf16_profile_is_measured_under_autocast(tmp_path, monkeypatch):
    """``precision`` runs every part under autocast, as the engine does: the block keeps
    fewer bytes per token than in fp32, and the profile has its own cache key (an fp32
    profile's key is unchanged)."""
    monkeypatch.setattr(layers, "CACHE_DIR", tmp_path)
    monkeypatch.setattr(layers, "WARM_UP_CPU_S", 0.0)
    cfg = preset("gpt", "tiny", vocab_size=260, num_layers=1)
    fp32 = layers.measure_profile(cfg, seq_len=32, repeats=1)
    bf16 = layers.measure_profile(cfg, seq_len=32, repeats=1, precision="bf16")
    assert bf16.precision == "bf16" and fp32.precision == "fp32" and "bf16 autocast" in bf16.notes[0]
    assert bf16.blocks[0].act_bytes.total(32) < 0.8 * fp32.blocks[0].act_bytes.total(32)
    assert bf16.blocks[0].cast_at() > 0 == fp32.blocks[0].cast_at()
    assert layers.cache_key(cfg, 32, "adamw", 1, "bf16") != layers.cache_key(cfg, 32, "adamw", 1)
    assert layers.cache_key(cfg, 32, "adamw", 1, "fp32") == layers.cache_key(cfg, 32, "adamw", 1)


def test_rank_baseline_imports_what_a_rank_imports(monkeypatch):
    """The baseline's fresh interpreter imports the rank's own modules (a rank runs
    ``python -m edgepool.runtime.rank``, which imports the training loop and everything it
    uses), not torch alone: those left out made every rank measure above its prediction."""
    import importlib.util
    import subprocess

    from edgepool.profiler import layers

    assert "edgepool.runtime.rank" in layers.RANK_MODULES and "edgepool.runtime.train" in layers.RANK_MODULES
    assert all(importlib.util.find_spec(m) is not None for m in layers.RANK_MODULES)
    seen = {}

    class Done:
        stdout = "300000000 350000000"

    def fake_run(cmd, **kw):
        seen["cmd"] = cmd
        return Done()

    monkeypatch.setattr(subprocess, "run", fake_run)
    base, fsdp = layers.rank_baseline_bytes()
    assert seen["cmd"][-len(layers.RANK_MODULES):] == list(layers.RANK_MODULES)
    assert "importlib.import_module(mod)" in seen["cmd"][2]
    assert base == 300e6 + layers.GLOO_ALLOWANCE_BYTES and fsdp == 50e6
