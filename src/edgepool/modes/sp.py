"""``sp``: sequence parallelism inside a stage's group, uneven token shares.

Each device holds a replica of the stage's parameters and a slice of every sequence's
tokens (``split.seq``). Per block, K and V are all-gathered separately, each device's
slice padded to the longest (gloo's all-gather takes equal parts); the backward
all-reduces the whole gathered K and V gradients (gloo has no uneven reduce-scatter)
and each device keeps its slice (``models.parallel.sp_gather``). The replicas'
gradients are summed once per step, in buckets overlapped with the last micro-batch's
backward as in ``dp`` (``runtime.overlap``; the bucket with the first block's gradients
follows the backward). Only the group's first device owns data on a first stage.
"""

from __future__ import annotations

from edgepool.modes.base import BoundInputs, GroupComm, Mode, StageWork, sync_buckets, synced_units
from edgepool.specs.plan import Region, Shape, StageSplit, offsets, split_counts


class SequenceParallel(Mode):
    name = "sp"
    group_ops = True
    recompute_repeats_collectives = True
    syncs_grads = True

    def num_items(self, microbatch: int, shape: Shape) -> int:
        return shape.seq_len

    def split(self, weights, microbatch: int, shape: Shape) -> StageSplit:
        n = len(weights)
        return StageSplit(batch=tuple(microbatch for _ in range(n)), seq=split_counts(shape.seq_len, weights),
                          heads=tuple(shape.num_heads for _ in range(n)), ffn=tuple(shape.ffn for _ in range(n)))

    def region(self, split: StageSplit, index: int, microbatch: int, shape: Shape) -> Region:
        t0 = offsets(split.seq)[index]
        return (0, microbatch, t0, t0 + split.seq[index])

    def block_part(self, split: StageSplit, index: int, microbatch: int, shape: Shape):
        return (microbatch * split.seq[index], 1.0, 1.0)

    def comm(self, w: StageWork, net) -> GroupComm:
        names, n = list(w.names), w.num_devices
        zero = {x: 0.0 for x in names}
        if n < 2:
            return GroupComm(coll_send_bytes=zero, coll_send_bytes_bwd=dict(zero))
        nblk, mb, prof = w.num_blocks, w.microbatch, w.profile
        kv_row = prof.dims.kv_dim * prof.dtype_bytes  # K (or V) bytes of one token
        part = mb * max(w.split.seq) * kv_row  # one padded slice of K (or V)
        full = mb * w.shape.seq_len * kv_row  # the gathered K (or V)
        air_f = 2 * nblk * net.allgather_airtime(names, [part] * n)
        air_b = 2 * nblk * net.allreduce_airtime(names, full)
        a, b = w.layers
        sync_bytes = sum(lp.sync_at() for lp in prof.blocks[a:b])  # trainable gradients only, as the wire sends them
        return GroupComm(
            coll_fwd_s=2 * nblk * net.allgather_time(names, [part] * n), coll_bwd_s=2 * nblk * net.allreduce_time(names, full),
            coll_airtime_s=air_f + air_b,
            # Ring all-gather: every device forwards the n - 1 slices that are not its own.
            coll_send_bytes={x: 2 * nblk * (n - 1) * part for x in names}, coll_steps=2 * nblk * (n - 1),
            sync_bytes=sync_bytes, sync_s=net.allreduce_time(names, sync_bytes),
            sync_buckets=sync_buckets(synced_units(prof, a, b, owner=False), names, net),
            sync_flops=sum(lp.sync_flops for lp in prof.blocks[a:b]),
            sync_traffic_bytes=sum(lp.sync_traffic_bytes for lp in prof.blocks[a:b]),
            coll_send_bytes_bwd={x: 2 * nblk * 2.0 * (n - 1) / n * full for x in names},
            coll_steps_bwd=2 * nblk * 2 * (n - 1), coll_airtime_fwd_s=air_f)

    def single_stage_bound(self, b: BoundInputs, counts, speeds, names, caps, microbatch, net, ref_speed):
        T, mb, c = b.seq_len, microbatch, b.comp
        per = []
        for cnt, s_, x in zip(counts, speeds, names):
            t_ = b.fix + mb * cnt * (c["rep"] + c["head"] + c["ffn"] + c["quad"] * T)
            need = b.opt_f * b.blocks_params + mb * cnt * (b.a_rep + b.a_split)
            if need > caps[x]:
                return per, 0.0, 0.0, (need, x)
            per.append(t_ * ref_speed / s_)
        per[0] += self.owner_work(b, mb * T, speeds[0], ref_speed)  # the group's first device owns the data
        L = b.num_layers
        sizes = [2.0 * mb * cnt * b.kv_row_bytes for cnt in counts]
        coll = 2 * L * net.allgather_time(names, sizes)
        # the sync overlaps the backward (``GroupComm.exposed_sync_s``); what it hides is
        # at most a device's whole compute per micro-batch, so this stays a lower bound
        sync = max(0.0, net.allreduce_time(names, b.blocks_synced) - max(per))
        part = [(names[0], x, mb * cnt * b.boundary_row_bytes) for x, cnt in zip(names[1:], counts[1:])]
        edge = 4 * net.transfer_time(part)
        return per, coll + edge, sync, None

    # -- engine -------------------------------------------------------------------------
    def apply(self, model, *, group, split, index, ctx, owner, device, state=None):
        ctx.sp_group, ctx.sp_lens, ctx.sp_index = group, split.seq, index
        return {}

    def sync_params(self, model, *, owner: bool) -> list:
        return list(model.blocks.parameters())


MODE = SequenceParallel()
