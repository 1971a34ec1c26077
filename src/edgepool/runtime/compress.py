"""Compression on the wire (``train.wire``): boundary codecs and PowerSGD.

Lossy and opt-in. With the default (``activations: fp32``, ``gradients: none``) nothing
here runs: the wire sends the tensors themselves and the gradient sync sums them whole,
bit for bit as before (``tests/dist/test_compress.py``).

**Boundary codecs** (``Codec``), for the activations and activation gradients that
cross a stage boundary (``runtime.wire``). Each transfer is one message whose size the
receiver knows in advance (it posts its receive when the step starts):

- ``fp16``/``bf16``: a cast; decoded back to the device dtype. Relative error per
  element at most 2^-11 (fp16) or 2^-8 (bf16) of its value, for fp16 only within its
  range: magnitudes above 65504 become inf, and below 2^-14 lose relative precision
  (subnormals; absolute error at most 2^-25);
- ``int8``: symmetric quantisation with one fp32 scale per transfer, ``scale =
  absmax / 127``, ``q = round(x / scale)`` clamped to [-127, 127]; the message is a
  uint8 buffer of the 4 scale bytes then the ``numel`` values. Error per element at
  most ``scale / 2`` (up to fp32 rounding of the division). A zero tensor has scale 0
  and decodes to zeros.
- A non-finite input (inf, NaN) is not an error: int8 decodes it to all NaN and the
  casts keep it, so it shows where it would have shown uncompressed (fp16 training's
  loss scaler sees it and skips the step, ``runtime.engine.LossScaler``).

**PowerSGD** (``PowerSGD``; Vogels, Karimireddy and Jaggi, "PowerSGD: Practical Low-Rank
Gradient Compression for Distributed Optimization", NeurIPS 2019, Algorithm 1 with
error feedback and warm start). For each bucket of ``runtime.overlap.GradSync``, every
gradient ``M`` that ``cost.wire.powersgd_compresses`` (seen as an ``n x m`` matrix) gets
the error left from the last step added, then:

1. ``P = M Q`` with this step's ``Q`` (``m x r``; the last step's, warm start; at the
   first step random from a generator seeded the same on every rank); the Ps of the
   bucket and its uncompressed tensors (1-D tensors, matrices that would not shrink)
   are summed in one all-reduce, launched where the bucket launches (in the backward);
2. in the ``sync_grads`` op: ``P`` orthonormalised (reduced QR), ``Q = M^T P``, the Qs
   summed in a second all-reduce (every bucket's launched before any is waited for);
3. the sum is taken as ``P Q^T``, and each rank keeps ``M - P Q^T / n`` as its error
   (``n`` the group's size), so that the ranks' errors add up to the whole residual of
   the sum: what the compression left out is sent in later steps.

The sums are sums, not means (the losses are already global means,
``runtime.engine``): the all-reduces add, and the result is the low-rank projection
``P P^T G`` of the summed gradient ``G`` onto the span of ``G Q``. It is exact when
``G`` has rank at most ``r`` (tested); a matrix with ``r >= min(n, m)`` is sent whole.
When a step's sum is not finite (fp16's overflows) the error and ``Q`` start afresh.

**Why not torch's ``powerSGD_hook``.** It takes a ``dist.GradBucket``, which has no
Python constructor in torch 2.13 ("No constructor defined"); a stand-in object would
lean on the hook's private use of the bucket. It averages (divides by the world size)
where edgepool sums. And it chains its second all-reduce in a ``Future.then`` callback,
which runs on gloo's completion thread: with several buckets in flight, the ranks could
issue bucket k's second all-reduce and bucket k+1's first in different orders, and gloo
matches collectives by the order they are issued in. Here every collective is issued by
the rank's own thread, in bucket order, on every rank.

Not kept across a checkpoint or a regroup: the error and ``Q`` (a resumed run starts
them afresh, so its trajectory differs from an uninterrupted one). Under fp16 the error
is kept in the loss scale of the step that left it (a scale change, rare, rescales it
by a power of two). Replicas on devices whose QR rounds differently (another BLAS) would
drift apart by rounding.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from edgepool.cost.wire import HEADER_BYTES, matrix_of, powersgd_compresses
from edgepool.runtime.device import TorchDevice
from edgepool.runtime.overlap import AllReduce

# The dtype each boundary codec casts to (int8 packs its own message; fp32: the tensor itself).
CAST = {"fp16": torch.float16, "bf16": torch.bfloat16}
INT8_MAX = 127


class Codec:
    """Encode a boundary tensor (in the device dtype) for the wire and decode it back."""

    def __init__(self, name: str, device: TorchDevice):
        if name not in ("fp32", *CAST, "int8"):
            raise ValueError(f"unknown wire codec {name!r}; known: fp32, {', '.join(CAST)}, int8")
        self.name, self.device = name, device

    def buffer(self, shape: tuple[int, ...]) -> torch.Tensor:
        """The receive buffer of a transfer of a tensor of ``shape``."""
        if self.name == "int8":
            return torch.empty(HEADER_BYTES["int8"] + math.prod(shape), dtype=torch.uint8, device=self.device.device)
        if self.name in CAST:
            return torch.empty(shape, dtype=CAST[self.name], device=self.device.device)
        return self.device.empty(shape)

    def encode(self, t: torch.Tensor) -> torch.Tensor:
        if self.name == "int8":
            return _int8_encode(t)
        if self.name in CAST:
            return t.to(CAST[self.name])
        return t

    def decode(self, buf: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        if self.name == "int8":
            return _int8_decode(buf, shape, self.device.dtype)
        if self.name in CAST:
            return buf.to(self.device.dtype)
        return buf


def _int8_encode(t: torch.Tensor) -> torch.Tensor:
    x = t.detach().reshape(-1)
    out = torch.empty(HEADER_BYTES["int8"] + x.numel(), dtype=torch.uint8, device=x.device)
    q = out[HEADER_BYTES["int8"]:].view(torch.int8)
    scale = torch.zeros(1, dtype=torch.float32, device=x.device)
    if x.numel():
        lo, hi = torch.aminmax(x)
        amax = torch.maximum(-lo, hi).float()
        if not torch.isfinite(amax):
            scale.fill_(float("nan"))  # decodes to NaN everywhere (module docstring)
            q.zero_()
        elif amax > 0:
            scale.copy_(amax / INT8_MAX)
            q.copy_((x / scale).round_().clamp_(-INT8_MAX, INT8_MAX))
        else:
            q.zero_()
    out[:HEADER_BYTES["int8"]] = scale.view(torch.uint8)
    return out


def _int8_decode(buf: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    scale = buf[:HEADER_BYTES["int8"]].view(torch.float32)
    return buf[HEADER_BYTES["int8"]:].view(torch.int8).to(dtype).mul_(scale.to(dtype)).reshape(shape)


class PowerSGD:
    """Rank-``rank`` PowerSGD over a group's buckets, with error feedback and warm
    start (module docstring). One instance per ``GradSync``; its state (each compressed
    gradient's error and ``Q``) lives across steps, keyed by bucket and position."""

    def __init__(self, rank: int, *, group, wire=None, seed: int = 0):
        if rank < 1:
            raise ValueError(f"PowerSGD rank must be at least 1, got {rank}")
        self.rank, self.group, self.wire, self.seed = rank, group, wire, seed
        self.world = dist.get_world_size(group)
        self.errors: dict[tuple[int, int], torch.Tensor] = {}
        self.qs: dict[tuple[int, int], torch.Tensor] = {}

    def start(self, k: int, grads: list[torch.Tensor]):
        """Bucket ``k``'s first all-reduce (its Ps and uncompressed gradients)."""
        comp = [i for i, g in enumerate(grads) if powersgd_compresses(tuple(g.shape), self.rank)]
        if not comp:
            return AllReduce(grads, self.group, self.wire, self.world)
        return _PowerRound(self, k, grads, comp)

    def q_of(self, key: tuple[int, int], m: int) -> torch.Tensor:
        q = self.qs.get(key)
        if q is None:  # the same numbers on every rank: a generator seeded by the run's seed and the position
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + key[0] * 10_007 + key[1])
            q = self.qs[key] = torch.randn(m, self.rank, generator=gen)
        return q


class _PowerRound:
    def __init__(self, ps: PowerSGD, k: int, grads: list[torch.Tensor], comp: list[int]):
        self.ps, self.k, self.grads, self.comp = ps, k, grads, comp
        self.whole = [g for i, g in enumerate(grads) if i not in comp]
        self.mats: list[torch.Tensor] = []
        self.ps_: list[torch.Tensor] = []
        for i in comp:
            g = grads[i]
            n, m = matrix_of(tuple(g.shape))
            mat = g.reshape(n, m)
            err = ps.errors.get((k, i))
            if err is not None:
                mat = mat + err
            else:
                mat = mat.clone()
            self.mats.append(mat)
            self.ps_.append(mat @ ps.q_of((k, i), m))
        # the uncompressed gradients and the Ps in one all-reduce, summed in place
        self.first = AllReduce(self.whole + self.ps_, ps.group, ps.wire, ps.world)

    def exchange(self) -> None:
        """Wait for the Ps, orthonormalise them, and launch the Qs' all-reduce."""
        self.first.exchange()
        self.ps_ = [torch.linalg.qr(p, mode="reduced").Q for p in self.ps_]
        self.qs = [mat.T @ p for mat, p in zip(self.mats, self.ps_)]
        self.second = AllReduce(self.qs, self.ps.group, self.ps.wire, self.ps.world)

    def finish(self) -> None:
        """Wait for the Qs; the sum is ``P Q^T``; keep the residual and ``Q``."""
        self.second.exchange()
        ps, world = self.ps, self.ps.world
        for i, mat, p, q in zip(self.comp, self.mats, self.ps_, self.qs):
            approx = p @ q.T
            key = (self.k, i)
            if torch.isfinite(approx).all():
                ps.errors[key] = mat - approx / world
                ps.qs[key] = q
            else:  # an overflow (fp16): the step is skipped; start the error and Q afresh
                ps.errors.pop(key, None)
                ps.qs.pop(key, None)
            self.grads[i].copy_(approx.view_as(self.grads[i]))
