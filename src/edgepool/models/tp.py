"""Megatron-style tensor parallelism with uneven per-device shares.

``shard_block`` slices a full block in place to one device's heads and FFN columns:
q/k/v and the MLP's up/gate are column-parallel (their output rows are sliced), o_proj
and down are row-parallel (their input columns are sliced); norms and the separate
output biases stay whole. A linear with a LoRA adapter (``models.lora``) has its adapter
sliced with it: ``B``'s rows with a column-parallel linear, ``A``'s columns with a
row-parallel one; the other factor stays whole. It returns the shard spec of every sliced parameter,
``name -> (dim, start, stop)`` in the full parameter (``modes.tp.block_slice``, the
pure cut ``runtime.reshard`` routes checkpoints and state by).
"""

from __future__ import annotations

from torch import nn

from edgepool.models.layers import Block


def _slice_(linear: nn.Linear, dim: int, start: int, stop: int, bias: bool = True) -> None:
    """Keep ``[start, stop)`` of the linear's weight along ``dim`` (and of its bias when
    the output rows are sliced); ``requires_grad`` stays as it was (frozen stays frozen)."""
    w = linear.weight
    linear.weight = nn.Parameter(w.data.narrow(dim, start, stop - start).clone(), requires_grad=w.requires_grad)
    if dim == 0 and bias and linear.bias is not None:
        b = linear.bias
        linear.bias = nn.Parameter(b.data[start:stop].clone(), requires_grad=b.requires_grad)
    if dim == 0:
        linear.out_features = stop - start
    else:
        linear.in_features = stop - start


def _slice_adapted_(lin: nn.Module, dim: int, start: int, stop: int) -> None:
    """A linear and its LoRA adapter (``models.lora``): column-parallel (dim 0) slices
    the base's rows and ``B``'s rows, ``A`` stays whole; row-parallel (dim 1) slices the
    base's columns and ``A``'s columns, ``B`` stays whole."""
    from edgepool.models.lora import ADAPTER

    _slice_(lin.base_layer, dim, start, stop)
    _slice_(lin.lora_B[ADAPTER] if dim == 0 else lin.lora_A[ADAPTER], dim, start, stop, bias=False)
    if dim == 0:
        lin.out_features = stop - start
    else:
        lin.in_features = stop - start


def shard_block(block: Block, *, heads: tuple[int, int], ffn: tuple[int, int]) -> dict[str, tuple[int, int, int]]:
    """Keep heads [h0, h1) and FFN columns [f0, f1). Returns the shard spec
    (``modes.tp.block_slice`` says where each slice sits)."""
    from edgepool.modes.tp import block_slice

    attn, mlp = block.attn, block.mlp
    spec: dict[str, tuple[int, int, int]] = {}
    for name, lin in (("attn.q_proj", attn.q_proj), ("attn.k_proj", attn.k_proj), ("attn.v_proj", attn.v_proj),
                      ("attn.o_proj", attn.o_proj), ("mlp.up", mlp.up), ("mlp.down", mlp.down),
                      ("mlp.gate", mlp.gate)):
        if lin is None:
            continue
        adapted = hasattr(lin, "lora_A")
        tensors = [("weight", lin.weight), ("bias", lin.bias)]
        if adapted:
            from edgepool.models.lora import ADAPTER

            tensors += [("lora_A.weight", lin.lora_A[ADAPTER].weight), ("lora_B.weight", lin.lora_B[ADAPTER].weight)]
        where = {what: block_slice(f"{name}.{what}", tuple(t.shape), heads, ffn, attn.cfg.num_heads, attn.cfg.kv_heads)
                 for what, t in tensors if t is not None}
        (_slice_adapted_ if adapted else _slice_)(lin, *where["weight"])
        spec.update({f"{name}.{what}": s for what, s in where.items() if s is not None})
    h0, h1 = heads
    rep = attn.cfg.num_heads // attn.cfg.kv_heads
    attn.num_heads, attn.num_kv_heads = h1 - h0, h1 // rep - h0 // rep
    return spec
