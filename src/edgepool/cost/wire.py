"""What compression on the wire (``train.wire``) sends and computes: the pure facts.

The runtime's codecs (``runtime.compress``) and the cost model price the same things
from here, so what is measured and what is predicted cannot drift apart:

- **boundary activations and their gradients** (``wire.activations``): ``ELEM_BYTES``
  per element on the wire, plus ``HEADER_BYTES`` per transfer (int8's fp32 scale, in
  the same message). A transfer to the rank itself is never encoded (it does not cross
  the network);
- **dp/sp gradients** (``wire.gradients: powersgd``, rank ``r``): a gradient viewed as
  an ``n x m`` matrix (``n`` its first dimension) is sent as ``P`` (``n x r``) and
  ``Q`` (``m x r``) when ``r (n + m) < n m`` (``powersgd_compresses``); 1-D tensors and
  matrices that would not shrink are summed whole (``powersgd_elements``).

**Compute added** (what the cost model charges; derivations):

- a boundary codec makes a few passes over the tensor: ``CODEC_TRAFFIC_BYTES`` are the
  bytes read and written per element by its torch ops (counted from
  ``runtime.compress``: a cast reads 4 and writes 2 bytes, its decode the reverse;
  int8's encode reads the fp32 tensor for its absmax (4), divides (4 + 4), rounds in
  place (4 + 4), clamps in place (4 + 4) and narrows (4 + 1); its decode widens (1 + 4)
  and multiplies in place (4 + 4)). Each byte costs the device's memory-traffic time,
  the profile's ``optim_s_per_param_byte / OPT_TRAFFIC_FACTOR`` (measured where the
  profiler timed the optimizer step, else the catalog's memory bandwidth);
- PowerSGD per compressed ``n x m`` matrix and step: three matmuls of ``2 n m r`` FLOPs
  (``P = M Q``, ``Q = M^T P``, ``M ~ P Q^T``) and a QR of ``P`` (``2 n r^2``, Householder
  ``~ 2 n r^2 - 2 r^3 / 3``, taken at its leading term), at the profile's matmul rate
  (a block's attention projections: seconds per FLOP of ``fwd_s.head``, measured or
  analytic), plus ``POWERSGD_TRAFFIC_BYTES`` per element of elementwise passes (error
  added before, residual kept after). APPROXIMATION: small rank-r matmuls run below the
  rate of a block's big ones, so this is optimistic for them.

Units: bytes, FLOPs, elements.
"""

from __future__ import annotations

import math

ELEM_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1}
HEADER_BYTES = {"fp32": 0, "fp16": 0, "bf16": 0, "int8": 4}
# bytes read and written per element, (encode, decode); fp32 is sent as it is
CODEC_TRAFFIC_BYTES = {"fp32": (0, 0), "fp16": (6, 6), "bf16": (6, 6), "int8": (33, 13)}
# PowerSGD's elementwise passes per compressed element and step: the error added to the
# gradient (read 2, write 1: 12 bytes) and the residual kept (12), the result copied back (8)
POWERSGD_TRAFFIC_BYTES = 32


def matrix_of(shape: tuple[int, ...]) -> tuple[int, int]:
    """The ``n x m`` matrix PowerSGD sees a gradient as: its first dimension by the rest."""
    n = shape[0] if shape else 1
    return n, (math.prod(shape) // n if n else 0)


def powersgd_compresses(shape: tuple[int, ...], rank: int) -> bool:
    """Whether a gradient of ``shape`` is sent as rank-``rank`` factors: a matrix (2-D
    or more) whose factors are smaller than it. Else it is summed whole (exactly)."""
    if len(shape) < 2:
        return False
    n, m = matrix_of(shape)
    return rank * (n + m) < n * m


def powersgd_elements(shape: tuple[int, ...], rank: int) -> int:
    """Elements a gradient of ``shape`` puts into the sync's all-reduces."""
    if not powersgd_compresses(shape, rank):
        return math.prod(shape)
    n, m = matrix_of(shape)
    return rank * (n + m)


def powersgd_flops(shape: tuple[int, ...], rank: int) -> float:
    """FLOPs PowerSGD spends on a gradient of ``shape`` per step (0 when sent whole)."""
    if not powersgd_compresses(shape, rank):
        return 0.0
    n, m = matrix_of(shape)
    return 3 * 2.0 * n * m * rank + 2.0 * n * rank * rank


def with_wire(profile, wire, lora=None, freeze: tuple[str, ...] = ()):
    """``profile`` (a ``cost.profile.ModelProfile``) for a job whose ``train.wire`` is
    ``wire`` (a ``specs.job.WireSpec``), fine-tuned as ``lora``/``freeze`` say (the
    tensors that train are the ones synced). Unchanged when the wire is off.

    Sets the boundary codec (``ModelProfile.wire_activations``: ``wire_row_bytes`` and
    the codec's passes, priced by ``cost.model``) and, with PowerSGD, per unit the
    fraction of its trainable bytes that the sync sends (``LayerProfile.sync_frac``:
    ``powersgd_elements`` over the trainable elements) and the FLOPs and elementwise
    bytes of compressing them (``sync_flops``, ``sync_traffic_bytes``; module docstring).
    APPROXIMATION: the fraction is taken by element count from the model's shapes and
    applied to the profile's trainable bytes (equal for an analytic profile)."""
    from dataclasses import replace

    from edgepool.cost.profile import unit_tensors

    if wire.is_off:
        return profile
    rank = wire.rank if wire.gradients == "powersgd" else 0
    out = replace(profile, wire_activations=wire.activations, powersgd_rank=rank)
    out = replace(out, notes=out.notes + (f"wire: activations {wire.activations}, gradients {wire.gradients}"
                                          + (f" rank {rank}" if rank else "") + " (with_wire)",))
    if not rank:
        return out
    elems: dict[str, list[float]] = {}  # unit -> [trainable, sent, flops, compressed]
    for t in unit_tensors(profile.dims, lora, freeze):
        if not t.trainable:
            continue
        e = elems.setdefault(t.unit, [0.0, 0.0, 0.0, 0.0])
        e[0] += math.prod(t.shape)
        e[1] += powersgd_elements(t.shape, rank)
        e[2] += powersgd_flops(t.shape, rank)
        e[3] += math.prod(t.shape) if powersgd_compresses(t.shape, rank) else 0

    def tune(unit: str, lp):
        total, sent, flops, comp = elems.get(unit, (0.0, 0.0, 0.0, 0.0))
        return replace(lp, sync_frac=sent / total if total else 1.0, sync_flops=flops,
                       sync_traffic_bytes=POWERSGD_TRAFFIC_BYTES * comp)

    return replace(out, blocks=tuple(tune(f"blocks.{i}", lp) for i, lp in enumerate(profile.blocks)),
                   embed=tune("embed", profile.embed), head=tune("head", profile.head))
