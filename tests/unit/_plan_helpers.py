"""Small pools, profiles and random cases for the cost model, planner and simulator tests."""

from __future__ import annotations

from hypothesis import strategies as st

from edgepool.cost.model import shape_for
from edgepool.cost.profile import ModelDims, analytic_profile
from edgepool.specs import PoolSpec

KINDS = ["jetson-nano", "jetson-orin-nano", "jetson-xavier-nx", "jetson-tx2", "rpi5", "host-cpu"]


def make_pool(kinds, medium="shared", bandwidth_mbps=100.0, latency_ms=2.0, extra=None):
    """Devices d0, d1, ... of the given kinds; ``extra`` maps a DeviceSpec field to a
    list with one value (or None) per device."""
    devs = []
    for i, k in enumerate(kinds):
        d = {"name": f"d{i}", "kind": k}
        for key, values in (extra or {}).items():
            if values[i] is not None:
                d[key] = values[i]
        devs.append(d)
    return PoolSpec.model_validate({"devices": devs, "network": {"medium": medium, "bandwidth_mbps": bandwidth_mbps,
                                                                 "latency_ms": latency_ms}})


def bert_base():
    return analytic_profile(ModelDims(family="bert", vocab_size=30522, hidden=768, num_layers=12, num_heads=12,
                                      ffn=3072))


def tiny(num_layers=4, family="gpt", hidden=64, vocab=260, optimizer="adamw"):
    return analytic_profile(ModelDims(family=family, vocab_size=vocab, hidden=hidden, num_layers=num_layers,
                                      num_heads=4, ffn=4 * hidden), optimizer=optimizer)


@st.composite
def cases(draw, max_devices=3, max_layers=4, memory=True):
    """A random small pool, model and shape (sizes where exhaustive enumeration is quick)."""
    n = draw(st.integers(1, max_devices))
    kinds = [draw(st.sampled_from(KINDS)) for _ in range(n)]
    extra = {
        "compute_scale": [draw(st.one_of(st.none(), st.floats(0.2, 5.0))) for _ in range(n)],
        "memory_gb": [draw(st.one_of(st.none(), st.floats(0.8, 4.0))) if memory else None for _ in range(n)],
        "bandwidth_mbps": [draw(st.one_of(st.none(), st.sampled_from([20.0, 300.0, 1000.0]))) for _ in range(n)],
        "latency_ms": [draw(st.one_of(st.none(), st.sampled_from([0.5, 10.0]))) for _ in range(n)],
    }
    pool = make_pool(kinds, medium=draw(st.sampled_from(["shared", "switched"])),
                     bandwidth_mbps=draw(st.sampled_from([50.0, 100.0, 1000.0])),
                     latency_ms=draw(st.sampled_from([0.2, 2.0])), extra=extra)
    prof = tiny(num_layers=draw(st.integers(1, max_layers)), family=draw(st.sampled_from(["gpt", "bert", "llama"])),
                hidden=draw(st.sampled_from([64, 256])), vocab=draw(st.sampled_from([260, 5000])),
                optimizer=draw(st.sampled_from(["adamw", "sgd"])))
    shape = shape_for(prof, draw(st.sampled_from([1, 2, 4, 6])), draw(st.sampled_from([16, 64])))
    return pool, prof, shape
