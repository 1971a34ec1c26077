"""``tp``: Megatron-style tensor parallelism inside a stage's group, uneven shares.

Each device holds a slice of every block: its attention heads (whole KV-head groups
under grouped-query attention) and FFN columns (``models.tp.shard_block``), and every
device holds the stage's whole input and output (replicas). Per block the forward
all-reduces the attention and MLP outputs (Megatron's *g*) and the backward their input
gradients (*f*): four all-reduces of a micro-batch's activations per block
(``models.parallel``). Only the group's first device owns data on a first stage.
"""

from __future__ import annotations

from edgepool.errors import PlanError
from edgepool.modes.base import BoundInputs, GroupComm, Mode, StageWork
from edgepool.specs.plan import Region, Shape, StageSplit, offsets, split_counts


class TensorParallel(Mode):
    name = "tp"
    replicated_io = True
    group_ops = True
    recompute_repeats_collectives = True

    def num_items(self, microbatch: int, shape: Shape) -> int:
        return shape.num_kv_heads or shape.num_heads

    def split(self, weights, microbatch: int, shape: Shape) -> StageSplit:
        n = len(weights)
        heads = split_counts(shape.num_heads, weights)
        ffn = split_counts(shape.ffn, weights)
        kv = shape.num_kv_heads or shape.num_heads
        if kv != shape.num_heads:
            if shape.num_heads % kv:
                raise PlanError(f"num_heads {shape.num_heads} is not a multiple of num_kv_heads {kv}")
            grp = shape.num_heads // kv
            heads = tuple(h * grp for h in split_counts(kv, weights))
        return StageSplit(batch=tuple(microbatch for _ in range(n)), seq=tuple(shape.seq_len for _ in range(n)),
                          heads=heads, ffn=ffn)

    def region(self, split: StageSplit, index: int, microbatch: int, shape: Shape) -> Region:
        return (0, microbatch, 0, shape.seq_len)

    def block_part(self, split: StageSplit, index: int, microbatch: int, shape: Shape):
        return (microbatch * shape.seq_len, split.heads[index] / shape.num_heads, split.ffn[index] / shape.ffn)

    def comm(self, w: StageWork, net) -> GroupComm:
        names, n = list(w.names), w.num_devices
        zero = {x: 0.0 for x in names}
        if n < 2:
            return GroupComm(coll_send_bytes=zero, coll_send_bytes_bwd=dict(zero))
        nblk = w.num_blocks
        act_bytes = w.microbatch * w.shape.seq_len * w.profile.act_elem_bytes
        coll = 2 * nblk * net.allreduce_time(names, act_bytes)
        air = 2 * nblk * net.allreduce_airtime(names, act_bytes)
        send = {x: 2 * nblk * 2.0 * (n - 1) / n * act_bytes for x in names}
        steps = 2 * nblk * 2 * (n - 1)
        return GroupComm(coll_fwd_s=coll, coll_bwd_s=coll, coll_airtime_s=2 * air, coll_send_bytes=send,
                         coll_steps=steps, coll_send_bytes_bwd=dict(send), coll_steps_bwd=steps,
                         coll_airtime_fwd_s=air)

    def single_stage_bound(self, b: BoundInputs, counts, speeds, names, caps, microbatch, net, ref_speed):
        T, mb = b.seq_len, microbatch
        c = b.comp
        total = sum(counts)
        per = []
        for cnt, s_, x in zip(counts, speeds, names):
            hf = cnt / total
            t_ = b.fix + mb * T * (c["rep"] + (c["head"] + c["quad"] * T + c["ffn"]) * hf)
            need = b.opt_f * (b.p_rep + b.p_split * hf) + mb * T * (b.a_rep + b.a_split * hf)
            if need > caps[x]:
                return per, 0.0, 0.0, (need, x)
            per.append(t_ * ref_speed / s_)
        per[0] += self.owner_work(b, mb * T, speeds[0], ref_speed)  # the group's first device owns the data
        full = mb * T * b.act_elem_bytes
        L = b.num_layers
        coll = 4 * L * net.allreduce_time(names, full)
        # the owner sends the embedded input and the head's gradient to every replica, as the wire sends them
        edge = 2 * net.transfer_time([(names[0], x, mb * T * b.boundary_row_bytes) for x in names[1:]])
        return per, coll + edge, 0.0, None

    # -- engine -------------------------------------------------------------------------
    def shard_of(self, key, full_shape, split, index, shape):
        if not key.startswith("blocks."):
            return None  # embed and head stay whole on the group's first device
        _, _, inner = key.split(".", 2)
        return block_slice(inner, full_shape, *self._ranges(split, index), shape.num_heads,
                           shape.num_kv_heads or shape.num_heads)

    @staticmethod
    def _ranges(split: StageSplit, index: int) -> tuple[tuple[int, int], tuple[int, int]]:
        h0, f0 = offsets(split.heads)[index], offsets(split.ffn)[index]
        return (h0, h0 + split.heads[index]), (f0, f0 + split.ffn[index])

    def apply(self, model, *, group, split, index, ctx, owner, device, state=None):
        from edgepool.models.tp import shard_block

        heads, ffn = self._ranges(split, index)
        ctx.tp_group = group
        spec: dict[str, tuple[int, int, int]] = {}
        for name, block in model.blocks.items():
            part = shard_block(block, heads=heads, ffn=ffn)
            spec.update({f"blocks.{name}.{k}": v for k, v in part.items()})
        return spec

    def partial_grad_params(self, model):
        from edgepool.models.lora import tp_whole_factors

        return tp_whole_factors(model)


# A block's sliced linears: (dim sliced, what the slice counts). q/k/v and the MLP's
# up/gate are column-parallel (output rows), o_proj and down row-parallel (input columns).
_SLICED = {"attn.q_proj": (0, "heads"), "attn.k_proj": (0, "kv"), "attn.v_proj": (0, "kv"),
           "attn.o_proj": (1, "heads"), "mlp.up": (0, "ffn"), "mlp.gate": (0, "ffn"), "mlp.down": (1, "ffn")}


def block_slice(key: str, full_shape: tuple[int, ...], heads: tuple[int, int], ffn: tuple[int, int], num_heads: int,
                kv_heads: int) -> tuple[int, int, int] | None:
    """The slice ``(dim, start, stop)`` of block tensor ``key`` (``attn.q_proj.weight``...)
    that keeps query heads ``heads`` (whole KV groups) and FFN columns ``ffn``; None when
    the tensor stays whole (norms, the biases of row-parallel layers, and the LoRA factor
    that the linear's slicing leaves whole: ``A`` of a column-parallel one, ``B`` of a
    row-parallel one)."""
    linear, _, what = key.rpartition(".")
    factor = None
    if linear.endswith((".lora_A", ".lora_B")):
        linear, _, factor = linear.rpartition(".")
    if linear not in _SLICED:
        return None
    dim, unit = _SLICED[linear]
    if what == "bias" and dim == 1 or factor == ("lora_A" if dim == 0 else "lora_B"):
        return None
    if unit == "ffn":
        return (dim, *ffn)
    rep = num_heads // kv_heads
    if heads[0] % rep or heads[1] % rep:
        raise ValueError(f"head range {heads} must align to groups of {rep} query heads per kv head")
    count, (a, b) = (num_heads, heads) if unit == "heads" else (kv_heads, (heads[0] // rep, heads[1] // rep))
    width = full_shape[dim] // count
    return (dim, a * width, b * width)


MODE = TensorParallel()
