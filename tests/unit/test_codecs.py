"""The wire's codecs (``runtime.compress.Codec``) and what the cost model reads of them
(``cost.wire``): error bounds, message sizes, zero and non-finite input, and the spec."""

from __future__ import annotations

import math

import pytest
import torch

from edgepool.cost.wire import ELEM_BYTES, HEADER_BYTES, powersgd_compresses, powersgd_elements
from edgepool.runtime.compress import Codec
from edgepool.runtime.device import CPU
from edgepool.specs.job import TrainSpec, WireSpec

SHAPE = (3, 16, 32)


def _x(scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    # a spread of magnitudes, as activations have: most small, a few large
    return torch.randn(SHAPE, generator=g) * scale * torch.exp(torch.randn(SHAPE, generator=g))


def _round_trip(name: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    codec = Codec(name, CPU)
    msg = codec.encode(x)
    buf = codec.buffer(tuple(x.shape))
    assert buf.dtype == msg.dtype and buf.shape == msg.shape  # the receive posted early fits the message
    buf.copy_(msg)
    out = codec.decode(buf, tuple(x.shape))
    assert out.dtype == torch.float32 and out.shape == x.shape
    return msg, out


@pytest.mark.parametrize("name", ["fp32", "fp16", "bf16", "int8"])
def test_message_size_is_the_cost_models(name):
    x = _x()
    msg, _ = _round_trip(name, x)
    assert msg.numel() * msg.element_size() == x.numel() * ELEM_BYTES[name] + HEADER_BYTES[name]


def test_fp32_is_the_tensor_itself():
    x = _x()
    msg, out = _round_trip("fp32", x)
    assert msg is x and torch.equal(out, x)


@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
def test_int8_error_is_at_most_half_a_step(scale):
    x = _x(scale)
    _, out = _round_trip("int8", x)
    step = x.abs().max() / 127
    err = (out - x).abs()
    assert err.max() <= step / 2 * (1 + 1e-5), (err.max().item(), step.item())
    assert err.max() > step / 4  # really quantised (a step of 1/127 of the largest value)
    assert (out.abs().max() - x.abs().max()).abs() <= step * 1e-5  # the largest value survives


@pytest.mark.parametrize("name,rel", [("fp16", 2.0**-11), ("bf16", 2.0**-8)])
def test_casts_keep_relative_error(name, rel):
    x = _x()
    x = x[x.abs() > 2.0**-14]  # fp16's normal range (module docstring: subnormals lose relative precision)
    _, out = _round_trip(name, x)
    r = ((out - x).abs() / x.abs()).max().item()
    assert r <= rel * (1 + 1e-6) and r > rel / 8, r


def test_fp16_overflows_to_inf_bf16_does_not():
    x = torch.tensor([1e5, -1.0])
    assert torch.isinf(_round_trip("fp16", x)[1][0])
    assert torch.isfinite(_round_trip("bf16", x)[1]).all()


@pytest.mark.parametrize("name", ["fp16", "bf16", "int8"])
def test_zero_tensor_and_empty_tensor(name):
    assert torch.equal(_round_trip(name, torch.zeros(SHAPE))[1], torch.zeros(SHAPE))
    assert _round_trip(name, torch.zeros((0, 4)))[1].shape == (0, 4)


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_int8_non_finite_input_decodes_to_nan(bad):
    x = _x()
    x.view(-1)[5] = bad
    out = _round_trip("int8", x)[1]
    assert torch.isnan(out).all()  # seen downstream, as uncompressed (fp16's scaler skips the step)


def test_unknown_codec_is_refused():
    with pytest.raises(ValueError, match="known: fp32, fp16, bf16, int8"):
        Codec("int4", CPU)


def test_powersgd_sends_factors_only_where_smaller():
    assert powersgd_elements((64, 32), 4) == 4 * (64 + 32)
    assert powersgd_elements((64, 2, 16), 4) == 4 * (64 + 32)  # a matrix of its first dimension by the rest
    assert not powersgd_compresses((64,), 1) and powersgd_elements((64,), 1) == 64  # 1-D: whole
    # r >= min(n, m): the factors would be larger; sent whole (exact)
    assert not powersgd_compresses((8, 4), 4) and powersgd_elements((8, 4), 4) == 32


def test_wire_spec_defaults_off_and_validates():
    assert TrainSpec().wire == WireSpec(activations="fp32", gradients="none") and TrainSpec().wire.is_off
    assert WireSpec(gradients="powersgd").rank == 4 and WireSpec(gradients="powersgd", powersgd_rank=2).rank == 2
    for w in (WireSpec(), WireSpec(gradients="powersgd", powersgd_rank=2)):  # a file written back reads the same
        assert TrainSpec.model_validate_json(TrainSpec(wire=w).model_dump_json()).wire == w
    with pytest.raises(ValueError, match="powersgd_rank 2 is set but gradients is 'none'"):
        WireSpec(powersgd_rank=2)
    with pytest.raises(ValueError):
        WireSpec(activations="int4")
    with pytest.raises(ValueError):
        WireSpec(gradients="powersgd", powersgd_rank=0)
