"""``fsdp``: sharded data parallelism (ZeRO-3) inside a stage's group, uneven batch shares.

As in ``dp``, every device computes its share of each micro-batch's samples and, on a
first stage, owns them (embeds them, computes head and loss with its own labels). But
no device holds the whole stage: parameters, gradients and optimizer state are sharded
over the group, and each unit (every block, and the embed and head on a first stage) is
all-gathered just before it computes and freed again after.

**Engine.** ``torch.distributed.fsdp.fully_shard`` (FSDP2) does the work: each block,
the embed and the head are one FSDP unit each, and the blocks' container is the root the
stage's forward goes through, on a CPU ``DeviceMesh`` made from the stage group. The
stage is built on ``meta`` and each unit is built (seeded as in a single-device model,
with its given state), sharded and freed before the next (``StageModel.materialize``),
so a device never holds its whole stage, not even at start. FSDP2's own meta-device
path (``to_empty`` after sharding, then an init) would need the shards' values without
the whole tensor; the seeded init that keeps parity with single-device training draws the
whole tensor, one unit at a time is its price. FSDP2
shards every parameter on dim 0 (``torch.chunk``: the first devices take
``ceil(rows / n)`` rows). Two settings are ours:

- the reduce-scatter **sums** (``set_gradient_divide_factor(1.0)`` with
  ``set_force_sum_reduction_for_comms``; gloo has no ``PREMUL_SUM``): every device's
  loss is already divided by the whole global batch's target count
  (``runtime.engine``), so the sum is the full-batch gradient for any uneven shares;
- every unit reshards after its forward (``reshard_after_forward=True``, also on the
  embed and head, which FSDP2 would otherwise keep whole as roots), so at most one
  unit's parameters are whole at a time.

Each micro-batch's backward reduce-scatters its gradients into the sharded gradient,
which accumulates over micro-batches; nothing is synced at the end of the step.
**Overlap:** FSDP2 issues each unit's reduce-scatter in the unit's post-backward hook
with ``async_op=False``; on an accelerator it runs on a separate stream and overlaps
the next unit's backward, but on CPU with gloo (no streams) it is synchronous, so the
backward waits for every unit's reduce-scatter: no overlap here, and the cost model
charges the collectives serially with the backward, as they run (unlike dp's and sp's
bucketed sync, ``runtime.overlap``).

**Cost.** Per micro-batch and unit of ``u`` bytes: one ring all-gather in the forward
(``(n-1)/n * u`` per device, ``cost.network.allgather_time``), and in the backward an
all-gather and a reduce-scatter. gloo runs ``reduce_scatter_tensor`` as an all-reduce of
the whole unit followed by taking the device's slice: measured on the testbed (3
devices, 3.1 MB, the devices' own NIC counters), every device sent ``2 (n-1)/n * u``
bytes and took as long as an all-reduce of the unit, twice a ring all-gather. So the
backward's reduce-scatter is priced as ``cost.network.allreduce_time`` of the unit (one
collective call per unit and its latency-bound steps). The embed's
and head's collectives run inside the owners' embed and head ops; the cost model and the
simulator charge them with the stage's forward and backward, which adds up the same.

**Memory.** ``P / n + (P_t / n) * (1 + opt_state)`` for the shards of parameters,
gradients and optimizer state (``P_t``: the trainable bytes; ``P`` in full training),
plus the largest unit whole twice (its gathered parameters and their
unsharded gradient before the reduce-scatter), plus what FSDP2's and DTensor's modules
add to the rank's resident memory (``libraries``: measured by the profiler,
``ModelProfile.mode_runtime_bytes``; for a small model more than sharding saves, see
``docs/results/runtime-modes.md``). Rows that do not divide evenly leave the first
devices a row more; the model counts the even ``P / n``.
"""

from __future__ import annotations

from edgepool.modes.base import BoundInputs, GroupComm, Mode, StageWork


def _units(w: StageWork, index: int) -> list[float]:
    """Bytes of every FSDP unit device ``index`` takes part in, at full size."""
    a, b = w.layers
    units = [lp.params_at() for lp in w.profile.blocks[a:b]]
    if w.owns_data[index]:
        units += [w.profile.embed.params_at(), w.profile.head.params_at()]
    return units


class ShardedDataParallel(Mode):
    name = "fsdp"
    owns_data = True
    group_ops = True
    in_pipelines = True
    builds_per_unit = True

    def state_bytes(self, num_devices, params, whole, opt_state_factor, trainable=None):
        if num_devices < 2:
            return super().state_bytes(num_devices, params, whole, opt_state_factor, trainable)
        trainable = params if trainable is None else trainable
        shard, tshard = params / num_devices, trainable / num_devices
        # the whole unit's gradient is counted at the unit's full bytes (an upper bound
        # when part of it is frozen)
        return {"params": shard + whole, "grads": tshard + whole, "optimizer": opt_state_factor * tshard}

    def largest_unit(self, w: StageWork, index: int) -> float:
        return max(_units(w, index)) if w.num_devices >= 2 else 0.0

    def optim_fraction(self, num_devices: int) -> float:
        return 1.0 / num_devices

    def unit_collectives_s(self, names, net, unit_bytes):
        n = len(names)
        if n < 2:
            return 0.0, 0.0
        ag = net.allgather_time(names, [unit_bytes / n] * n)
        # forward: all-gather; backward: all-gather and the reduce-scatter, an all-reduce on gloo
        return ag, ag + net.allreduce_time(names, unit_bytes)

    def comm(self, w: StageWork, net) -> GroupComm:
        names, n = list(w.names), w.num_devices
        zero = {x: 0.0 for x in names}
        if n < 2:
            return GroupComm(coll_send_bytes=zero, coll_send_bytes_bwd=dict(zero))
        # Every device of a dp-like first stage owns data, so all take part in every unit.
        units = _units(w, 0)
        per_unit = [self.unit_collectives_s(names, net, u) for u in units]
        fwd, bwd = sum(c[0] for c in per_unit), sum(c[1] for c in per_unit)
        air = sum(net.allgather_airtime(names, [u / n] * n) for u in units)
        air_rs = sum(net.allreduce_airtime(names, u) for u in units)  # the reduce-scatter: an all-reduce
        send = sum((n - 1) * u / n for u in units)
        steps = len(units) * (n - 1)
        return GroupComm(coll_fwd_s=fwd, coll_bwd_s=bwd, coll_airtime_s=2 * air + air_rs,
                         coll_send_bytes={x: send for x in names}, coll_steps=steps,
                         coll_send_bytes_bwd={x: 3 * send for x in names}, coll_steps_bwd=3 * steps,
                         coll_airtime_fwd_s=air)

    def single_stage_bound(self, b: BoundInputs, counts, speeds, names, caps, microbatch, net, ref_speed):
        T, c = b.seq_len, b.comp
        n = len(names)
        P = b.blocks_params + b.owner_params
        whole = max(b.max_block_params, b.owner_unit_params)
        per = []
        for cnt, s_, x in zip(counts, speeds, names):
            t_ = b.fix + cnt * T * (c["rep"] + c["head"] + c["ffn"] + c["quad"] * T)
            need = b.opt_f * P / n + 2 * whole + cnt * T * (b.a_rep + b.a_split)
            if need > caps[x]:
                return per, 0.0, 0.0, (need, x)
            per.append(t_ * ref_speed / s_ + self.owner_work(b, cnt * T, s_, ref_speed))  # every device owns data
        # One collective of everything costs no more than one per unit (fewer latencies);
        # the backward's reduce-scatter is an all-reduce on gloo.
        coll = 2 * net.allgather_time(names, [P / n] * n) + net.allreduce_time(names, P)
        return per, coll, 0.0, None

    # -- engine -------------------------------------------------------------------------
    def shard_of(self, key, full_shape, split, index, shape):
        rows, n = full_shape[0], len(split.batch)
        chunk = -(-rows // n)  # FSDP2 shards dim 0 like torch.chunk
        start = min(index * chunk, rows)
        return (0, start, min(start + chunk, rows))

    def apply(self, model, *, group, split, index, ctx, owner, device, state=None):
        from torch.distributed.device_mesh import DeviceMesh
        from torch.distributed.fsdp import fully_shard

        mesh = DeviceMesh.from_group(group, device.type)
        n = mesh.size()
        spec: dict[str, tuple[int, int, int]] = {}
        units = []
        # One unit at a time: build it (seeded, with its state), shard it, free the whole
        # tensors, then the next; at most one unit is whole on this device.
        for name in model.units():
            unit = model.materialize(name, state, device=device.device, dtype=device.dtype)
            for key, t in unit.state_dict().items():
                spec[f"{name}.{key}"] = self.shard_of(f"{name}.{key}", tuple(t.shape), split, index, None)
            if ctx.wire is not None:  # count what FSDP2 sends, as the cost model does
                _count_traffic(unit, ctx.wire, n)
            fully_shard(unit, mesh=mesh, reshard_after_forward=True)
            units.append(unit)
        fully_shard(model.blocks, mesh=mesh, reshard_after_forward=True)
        for m in [model.blocks] + units:
            m.set_gradient_divide_factor(1.0)  # sum: losses are already global means
            m.set_force_sum_reduction_for_comms(True)
        return spec

    def local_state(self, model, keep=None) -> dict:
        return {k: _local(v).detach().clone() for k, v in model.state_dict().items() if keep is None or keep(k)}

    def load_local_state(self, model, state: dict) -> None:
        import torch

        with torch.no_grad():
            for k, v in model.state_dict().items():
                _local(v).copy_(state[k])


def _count_traffic(unit, wire, n: int) -> None:
    """Add a ring all-gather's bytes per forward and an all-gather's and a
    reduce-scatter's per backward of ``unit`` to ``wire.bytes_sent`` (gloo's
    reduce-scatter sends an all-reduce's bytes, twice an all-gather's)."""
    per = int((n - 1) / n * sum(p.numel() * p.element_size() for p in unit.parameters()))

    def fwd(module, args, output):
        import torch

        if torch._C._current_graph_task_id() != -1:  # a forward run again in the backward (recomputation)
            return
        wire.bytes_sent += per
        if output.requires_grad:  # its backward all-gathers and reduce-scatters
            output.register_hook(bwd)

    def bwd(grad):
        wire.bytes_sent += 3 * per

    unit.register_forward_hook(fwd)


def _local(t):
    """A DTensor's local shard (FSDP2 parameters), else the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


MODE = ShardedDataParallel()
