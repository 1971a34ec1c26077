"""Gradient sync overlapped with the backward: bucketed all-reduces, as DDP does them.

A dp or sp group's replicas sum their gradients once per step (``Mode.syncs_grads``).
Instead of one flat all-reduce after the whole backward, ``GradSync`` cuts the synced
parameters into buckets of at most ``bucket_bytes`` (DDP's 25 MiB by default), in reverse
registration order (the head, the last block, ..., the first block, the embed: roughly
the order their gradients become final), a bucket ending with its unit (a block, the
head, the embed) once it holds 1 MiB, so that each block's gradients leave as soon as
its backward is done (the layout, ``modes.base.buckets_of``, is the cost model's too:
``GroupComm.exposed_sync_s`` prices these buckets), and launches each bucket's all-reduce
(``async_op=True``; gloo runs it on its own threads) as soon as every gradient in it is
final, while the backward goes on. The ``sync_grads`` op then launches what is left
(parameters that got no gradient: zeros, as before), waits for every bucket and copies
the sums back. Uncompressed, the sum is the same as the one-piece sum element by
element (a collective over the same values), so parity with one device is unchanged.
With ``train.wire.gradients: powersgd`` a bucket's round is
``runtime.compress.PowerSGD``'s instead (an approximation of the sum): its first
all-reduce (the low-rank factors ``P``) launches in the same place, and its second
(``Q``) in ``sync_grads``.

**When a gradient is final.** Only the last micro-batch's backward ops arm the hooks
(``armed``; the engine's ``head``, ``bwd`` and ``embed_bwd`` of micro-batch ``M - 1``).
Every module's gradients accumulate over micro-batches taken in order, and each of
those ops runs the backward of one part only (the head, the blocks, the embed), so a
gradient accumulated while armed is the step's last contribution to it: DDP's
``no_sync`` for the other micro-batches. The hook is
``Tensor.register_post_accumulate_grad_hook`` on each synced parameter (it fires once
per backward, after accumulation, also when a block recomputes its forward in the
backward).

**Order.** gloo matches collectives by the order they are issued in, so every rank
launches the buckets in the same order, bucket 0 first: a bucket that is complete
waits until those before it are launched (DDP does the same). The bucket layout
depends only on the parameters' shapes, the same on every replica of a group.

**Why not DDP itself.** DDP wraps one module whose ``forward`` starts each backward's
bookkeeping (``prepare_for_backward``). Here forward and backward are separate ops of
the engine's schedule, a data owner's embed and head are modules of their own that
also sync, and under 1F1B the forward of the last micro-batch runs before the backward
of earlier ones, whose gradients DDP would then reduce too early (its ``no_sync`` is
read at forward time). Recomputation (``torch.utils.checkpoint``) would also need
DDP's ``static_graph``. The hooks here do what DDP's reducer does for this schedule,
with sums rather than means (the losses are already global means, so the sum is the
full-batch gradient for any uneven shares), only for parameters that train (LoRA: the
adapters), and leave the fp16 loss scaler's unscaling to the optimizer op, after the
sync, as before.

Units: bytes.
"""

from __future__ import annotations

import contextlib
import time

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from edgepool.modes.base import DEFAULT_BUCKET_BYTES, MIN_UNIT_BUCKET_BYTES, buckets_of

__all__ = ["DEFAULT_BUCKET_BYTES", "AllReduce", "GradSync", "buckets_of", "grads_of", "unit_of"]


def unit_of(name: str) -> str:
    """The unit a stage model's parameter belongs to, by its name: ``blocks.3`` for
    ``blocks.3.attn.q_proj.weight``, else its first part (``embed``, ``head``)."""
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] == "blocks" else parts[0]


def grads_of(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """The gradients of ``params``; a parameter that got none this step (unused)
    contributes zeros, as one flat all-reduce of every gradient did."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    return [p.grad for p in params]


class AllReduce:
    """One bucket summed whole: one asynchronous all-reduce of its flattened gradients.
    ``exchange`` waits and puts the sums in place; ``finish`` has nothing left to do (a
    compressed round, ``runtime.compress``, has the same two steps)."""

    def __init__(self, grads: list[torch.Tensor], group, wire, world: int):
        self.grads = grads
        self.flat = _flatten_dense_tensors(grads)
        if wire is not None:
            wire.count_collective(self.flat, world, "all_reduce")
        self.work = dist.all_reduce(self.flat, group=group, async_op=True)

    def exchange(self) -> None:
        self.work.wait()
        for g, synced in zip(self.grads, _unflatten_dense_tensors(self.flat, self.grads)):
            g.copy_(synced)

    def finish(self) -> None:
        pass


class GradSync:
    """Sum the gradients of ``params`` (registration order) over ``group`` in buckets
    launched during the last micro-batch's backward (see the module docstring).

    ``launches`` records every launch of the current and last step as
    ``(bucket, where, perf_counter time)``: ``where`` is the label ``armed`` was given
    (a backward op) or ``"sync_grads"`` for a bucket launched by ``finish``.
    """

    def __init__(self, params: list[torch.Tensor], *, group, wire=None, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                 units: list[object] | None = None, compressor=None):
        if bucket_bytes < 1:
            raise ValueError(f"bucket_bytes must be at least 1, got {bucket_bytes}")
        self.params = list(params)
        self.group, self.wire = group, wire
        # ``runtime.compress.PowerSGD`` (``train.wire.gradients``), or None: every bucket summed whole
        self.compressor = compressor
        self.world = dist.get_world_size(group)
        sizes = [p.numel() * p.element_size() for p in self.params]
        self.buckets = [[self.params[i] for i in b]
                        for b in buckets_of(sizes, bucket_bytes, units, min(MIN_UNIT_BUCKET_BYTES, bucket_bytes))]
        self._bucket_of = {id(p): k for k, b in enumerate(self.buckets) for p in b}
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for p in self.params]
        self._label: str | None = None
        self.launches: list[tuple[int, str, float]] = []
        self._reset()

    def _reset(self) -> None:
        self._missing = [len(b) for b in self.buckets]
        self._seen: set[int] = set()
        self._next = 0  # the next bucket to launch: buckets go out in index order on every rank
        self._works: list = []  # one round per launched bucket (``AllReduce`` or a compressed one)

    @contextlib.contextmanager
    def armed(self, label: str):
        """Run the last micro-batch's backward of one part: gradients accumulated inside
        are final, and complete buckets launch."""
        if self._next == 0 and not self._seen:  # the step's first armed op
            self.launches = []
        prev, self._label = self._label, label
        try:
            yield
        finally:
            self._label = prev

    def _on_grad(self, p: torch.Tensor) -> None:
        if self._label is None or id(p) in self._seen:
            return
        self._seen.add(id(p))
        self._missing[self._bucket_of[id(p)]] -= 1
        while self._next < len(self.buckets) and self._missing[self._next] == 0:
            self._launch(self._label)

    def _launch(self, where: str) -> None:
        k = self._next
        grads = grads_of(self.buckets[k])
        if self.compressor is not None:
            self._works.append(self.compressor.start(k, grads))
        else:
            self._works.append(AllReduce(grads, self.group, self.wire, self.world))
        self.launches.append((k, where, time.perf_counter()))
        self._next += 1

    def finish(self) -> None:
        """The ``sync_grads`` op: launch the buckets still waiting, wait for all, and put
        the sums in place."""
        if self._next == 0 and not self._seen:
            self.launches = []
        try:
            while self._next < len(self.buckets):
                self._launch("sync_grads")
            # every round's first wait before any second step: a compressed round's second
            # all-reduce is launched in ``exchange``, in bucket order on every rank
            for r in self._works:
                r.exchange()
            for r in self._works:
                r.finish()
        finally:
            self._reset()

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
