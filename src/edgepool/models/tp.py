"""Megatron-style tensor parallelism with uneven per-device shares.

``shard_block`` slices a full block in place to one device's heads and FFN columns:
q/k/v and the MLP's up/gate are column-parallel (their output rows are sliced), o_proj
and down are row-parallel (their input columns are sliced); norms and the separate
output biases stay whole. It returns the shard spec of every sliced parameter,
``name -> (dim, start, stop)`` in the full parameter, which checkpoints use to stitch
shards back into full tensors under any plan.
"""

from __future__ import annotations

from torch import nn

from edgepool.models.layers import Block


def _slice_(linear: nn.Linear, dim: int, start: int, stop: int) -> None:
    w = linear.weight.data.narrow(dim, start, stop - start).clone()
    linear.weight = nn.Parameter(w)
    if dim == 0 and linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias.data[start:stop].clone())
    if dim == 0:
        linear.out_features = stop - start
    else:
        linear.in_features = stop - start


def shard_block(block: Block, *, heads: tuple[int, int], ffn: tuple[int, int]) -> dict[str, tuple[int, int, int]]:
    """Keep heads [h0, h1) and FFN columns [f0, f1). Returns the shard spec."""
    attn, mlp = block.attn, block.mlp
    d = attn.cfg.head_dim
    rep = attn.cfg.num_heads // attn.cfg.kv_heads
    h0, h1 = heads
    if h0 % rep or h1 % rep:
        raise ValueError(f"head range {heads} must align to groups of {rep} query heads per kv head")
    k0, k1 = h0 // rep, h1 // rep
    spec: dict[str, tuple[int, int, int]] = {}
    for name, lin, dim, a, b in (
        ("attn.q_proj", attn.q_proj, 0, h0 * d, h1 * d),
        ("attn.k_proj", attn.k_proj, 0, k0 * d, k1 * d),
        ("attn.v_proj", attn.v_proj, 0, k0 * d, k1 * d),
        ("attn.o_proj", attn.o_proj, 1, h0 * d, h1 * d),
        ("mlp.up", mlp.up, 0, *ffn),
        ("mlp.down", mlp.down, 1, *ffn),
    ) + ((("mlp.gate", mlp.gate, 0, *ffn),) if mlp.gate is not None else ()):
        _slice_(lin, dim, a, b)
        spec[f"{name}.weight"] = (dim, a, b)
        if dim == 0 and lin.bias is not None:
            spec[f"{name}.bias"] = (0, a, b)
    attn.num_heads, attn.num_kv_heads = h1 - h0, k1 - k0
    return spec


