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

    @property
    def seq_offset(self) -> int:
        return sum(self.sp_lens[: self.sp_index])


SERIAL = ParallelCtx()


class _TPCopy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous().clone()
        dist.all_reduce(g, group=ctx.group)
        return g, None


class _TPReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, g):
        return g, None


class _SPGather(torch.autograd.Function):
    """Gather [b, t_i, ...] slices along dim 1 into [b, sum t_i, ...]."""

    @staticmethod
    def forward(ctx, x, group, lens, index):
        ctx.group, ctx.lens, ctx.index = group, lens, index
        longest = max(lens)
        pad = [0] * (2 * (x.dim() - 2)) + [0, longest - x.shape[1]]
        padded = torch.nn.functional.pad(x.contiguous(), pad)
        parts = [torch.empty_like(padded) for _ in lens]
        dist.all_gather(parts, padded, group=group)
        return torch.cat([p[:, :n] for p, n in zip(parts, lens)], dim=1)

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous().clone()
        dist.all_reduce(g, group=ctx.group)
        start = sum(ctx.lens[: ctx.index])
        return g[:, start : start + ctx.lens[ctx.index]], None, None, None


def tp_copy(x: torch.Tensor, ctx: ParallelCtx) -> torch.Tensor:
    return x if ctx.tp_group is None else _TPCopy.apply(x, ctx.tp_group)


def tp_reduce(x: torch.Tensor, ctx: ParallelCtx) -> torch.Tensor:
    return x if ctx.tp_group is None else _TPReduce.apply(x, ctx.tp_group)


def sp_gather(x: torch.Tensor, ctx: ParallelCtx) -> torch.Tensor:
    return x if ctx.sp_group is None else _SPGather.apply(x, ctx.sp_group, ctx.sp_lens, ctx.sp_index)
