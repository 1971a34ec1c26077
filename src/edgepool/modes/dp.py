"""``dp``: data parallelism inside a stage's group, with uneven batch shares.

Every device holds a replica of the stage's parameters and computes its share of
each micro-batch's samples (``split.batch``). On the first stage every device owns its
samples: it embeds them and computes head and loss with its own labels, so embed and
head are replicas too. The group all-reduces the replicas' gradients once per step
(``sync_grads``, a ring all-reduce: ``cost.network.allreduce_time``).

This is the mode the planner's pipeline search composes (``planner.tables`` is its
closed form over layer ranges).
"""

from __future__ import annotations

from edgepool.modes.base import GroupComm, Mode, StageWork


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
        # only trainable parameters have gradients to sync (``cost.profile.with_tuning``)
        sync_bytes = sum(lp.trainable_at() for lp in w.profile.blocks[a:b])
        if w.stage == 0:  # every dp owner holds an embed/head replica
            sync_bytes += w.profile.embed.trainable_at() + w.profile.head.trainable_at()
        return GroupComm(coll_send_bytes=zero, coll_send_bytes_bwd=dict(zero), sync_bytes=sync_bytes,
                         sync_s=net.allreduce_time(list(w.names), sync_bytes))

    def sync_params(self, model, *, owner: bool) -> list:
        params = list(model.blocks.parameters())
        if owner:
            params += [p for m in (model.embed, model.head) if m is not None for p in m.parameters()]
        return params


MODE = DataParallel()
