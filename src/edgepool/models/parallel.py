"""Intra-stage parallel context for Transformer blocks: TP and SP, uneven shares.

A block reads its ``ParallelCtx`` to know which heads and FFN columns it holds (tp) and
which tokens of each sequence it holds (sp). The collectives are differentiable
``torch.autograd.Function``s over ``torch.distributed`` calls on the stage group:

- ``tp_copy`` (Megatron's *f*): identity forward, all-reduce backward.
- ``tp_reduce`` (Megatron's *g*): all-reduce forward, identity backward.
- ``sp_gather``: all-gather of uneven token slices forward (padded to the longest
  slice, then trimmed); backward is the matching reduce-scatter, done as an all-reduce
  and a slice because gloo has no uneven reduce-scatter.

Every call uses the process group's timeout (set when the group is made), so a dead
peer raises instead of hanging.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class ParallelCtx:
    tp_group: object | None = None
    sp_group: object | None = None
    sp_lens: tuple[int, ...] = ()  # tokens per sp rank
    sp_index: int = 0
    wire: object | None = None  # counts collective bytes (runtime.wire.Wire)

    def count(self, tensor: torch.Tensor, group, kind: str) -> None:
        if self.wire is not None:
            self.wire.count_collective(tensor, dist.get_world_size(group), kind)

    @property
    def seq_offset(self) -> int:
        return sum(self.sp_lens[: self.sp_index])


SERIAL = ParallelCtx()


class _TPCopy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, pctx):
        ctx.pctx = pctx
        return x

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous().clone()
        ctx.pctx.count(g, ctx.pctx.tp_group, "all_reduce")
        dist.all_reduce(g, group=ctx.pctx.tp_group)
        return g, None


class _TPReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, pctx):
        x = x.contiguous().clone()
        pctx.count(x, pctx.tp_group, "all_reduce")
        dist.all_reduce(x, group=pctx.tp_group)
        return x

    @staticmethod
    def backward(ctx, g):
        return g, None


class _SPGather(torch.autograd.Function):
    """Gather [b, t_i, ...] slices along dim 1 into [b, sum t_i, ...]."""

    @staticmethod
    def forward(ctx, x, pctx):
        ctx.pctx = pctx
        group, lens = pctx.sp_group, pctx.sp_lens
        longest = max(lens)
        pad = [0] * (2 * (x.dim() - 2)) + [0, longest - x.shape[1]]
        padded = torch.nn.functional.pad(x.contiguous(), pad)
        parts = [torch.empty_like(padded) for _ in lens]
        pctx.count(padded, group, "all_gather")
        dist.all_gather(parts, padded, group=group)
        return torch.cat([p[:, :n] for p, n in zip(parts, lens)], dim=1)

    @staticmethod
    def backward(ctx, g):
        pctx = ctx.pctx
        g = g.contiguous().clone()
        pctx.count(g, pctx.sp_group, "all_reduce")
        dist.all_reduce(g, group=pctx.sp_group)
        start = pctx.seq_offset
        return g[:, start : start + pctx.sp_lens[pctx.sp_index]], None


def tp_copy(x: torch.Tensor, ctx: ParallelCtx) -> torch.Tensor:
    return x if ctx.tp_group is None else _TPCopy.apply(x, ctx)


def tp_reduce(x: torch.Tensor, ctx: ParallelCtx) -> torch.Tensor:
    return x if ctx.tp_group is None else _TPReduce.apply(x, ctx)


def sp_gather(x: torch.Tensor, ctx: ParallelCtx) -> torch.Tensor:
    return x if ctx.sp_group is None else _SPGather.apply(x, ctx)
