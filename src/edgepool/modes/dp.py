"""``dp``: data parallelism inside a stage's group, with uneven batch shares.

Every device holds a replica of the stage's parameters and computes its share of
each micro-batch's samples (``split.batch``). On the first stage every device owns its
samples: it embeds them and computes head and loss with its own labels, so embed and
head are replicas too. The group sums the replicas' gradients once per step (ring
all-reduces: ``cost.network.allreduce_time``), in buckets launched as the last
micro-batch's backward makes them final and waited for in ``sync_grads``
(``runtime.overlap``): only what the remaining backward cannot hide is on the step's
path (``GroupComm.exposed_sync_s``, over the runtime's own buckets; the first block's
and the embed's gradients are final last).

This is the mode the planner's pipeline search composes (``planner.tables`` is its
closed form over layer ranges).
"""

from __future__ import annotations

from edgepool.modes.base import GroupComm, Mode, StageWork, sync_buckets, synced_units


class DataParallel(Mode):
    name = "dp"
    owns_data = True
    syncs_grads = True
    in_pipelines = True
    replicated_state = True

    def comm(self, w: StageWork, net) -> GroupComm:
        zero = {x: 0.0 for x in w.names}
        if w.num_devices < 2:
            return GroupComm(coll_send_bytes=zero, coll_send_bytes_bwd=dict(zero))
        a, b = w.layers
        # only trainable parameters have gradients to sync (``cost.profile.with_tuning``),
        # as the wire sends them (``LayerProfile.sync_at``: PowerSGD's factors), in the
        # runtime's buckets (registration order: embed, blocks, head; each unit with the
        # stage's blocks whose backward is left once its gradients are final)
        units = synced_units(w.profile, a, b, owner=w.stage == 0)  # every dp owner holds an embed/head replica
        sync_bytes = sum(lp.sync_at() for lp, _ in units)
        names = list(w.names)
        return GroupComm(coll_send_bytes=zero, coll_send_bytes_bwd=dict(zero), sync_bytes=sync_bytes,
                         sync_s=net.allreduce_time(names, sync_bytes),
                         sync_buckets=sync_buckets(units, names, net),
                         sync_flops=sum(lp.sync_flops for lp, _ in units),
                         sync_traffic_bytes=sum(lp.sync_traffic_bytes for lp, _ in units))

    def sync_params(self, model, *, owner: bool) -> list:
        params = list(model.blocks.parameters())
        if owner:
            params += [p for m in (model.embed, model.head) if m is not None for p in m.parameters()]
        return params


MODE = DataParallel()
