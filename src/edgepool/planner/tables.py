"""Stage and link costs of every candidate group, in the form the search needs.

For a fixed micro-batch count M, a fixed power-mode assignment and a pipeline mode
(``dp`` or ``fsdp``, the modes with ``in_pipelines``), the cost of a group ``[a, b)``
of the canonical order serving layers ``[l0, l)`` is a closed form of prefix sums over
layers; this module computes those prefix sums once per group, and turns them into
``(l0, l)`` matrices on demand. The formulas are those of ``cost.model`` specialised to
a pipeline of such groups (the search's space), and everything that depends on the
mode comes from the mode's own functions (``edgepool.modes``):

- device i with ``x_i`` samples per micro-batch computes ``x_i * seq_len`` tokens of
  every block; a stage's machine time is ``max_i F_i + max_i B_i`` plus the mode's
  collectives per micro-batch (fsdp: ``unit_collectives_s`` of every unit, affine in
  the unit's bytes, so ``coll_lat_s * units + coll_per_byte * params``, read off the
  mode's function at two sizes); stage 0's devices also embed their samples and run
  the head on them (they own the data);
- a group-to-group boundary (and the boundary from the last stage back to the data
  owners of stage 0) moves each sample row once, so device i sends and receives ``x_i``
  rows of ``hidden`` values each way. With ``a_g = max_i x_i * row_bytes / bw_i`` and
  ``lam_g = max_i latency_i``, the boundary between groups P and Q takes
  ``max(lam_P, lam_Q) + max(base, a_P, a_Q)`` each way, where ``base`` is the channel
  time of one micro-batch's activations on a shared medium (0 on a switched one);
  ``cost.network.transfer_time`` reduces to this when every device of P sends to some
  device of Q and every device of Q receives;
- the gradient all-reduce of a group of n >= 2 devices whose mode syncs (dp) is
  ``ar(bytes) = 2 (n-1) lam_g + kappa_g * bytes`` (0 for no bytes), read off
  ``cost.network.allreduce_time`` (affine in the bytes) at two sizes; it overlaps the
  last micro-batch's backward in the runtime's buckets (``modes.base.sync_buckets`` over
  blocks ``[l0, l)``, with the embed and head on stage 0; ``_bucket_mats``), so the step
  pays ``max(t_K, 0)`` with ``t_k = max(t_{k-1}, -hide_k) + ar(bytes_k)``
  (``GroupComm.exposed_sync_s``), ``hide_k`` the largest row's backward over the blocks
  of the range below bucket k's lowest one;
- with a boundary codec (``train.wire.activations``) every device of a pipeline of two
  or more stages encodes and decodes its ``x_i`` rows once each way per micro-batch
  (``cost.model.boundary_codec``): stage 0 encodes forward and decodes twice and encodes
  once backward (its head receives the last stage's output), the others encode and
  decode once each way; a single stage has no boundary off the device;
- PowerSGD (``train.wire.gradients``): the sync sends ``LayerProfile.sync_at`` bytes
  and its slowest device adds ``sync_flops`` and ``sync_traffic_bytes`` of the range
  (``cost.model.sync_codec_s``) to the exposed sync;
- memory of device i: the mode's ``state_bytes`` of the range's parameters and their
  trainable part (``train_mat``; ``cost.profile.with_tuning``, all of them in full
  training) (dp: ``params + (1 + opt_state) * trainable``; fsdp: a 1/n shard of that
  plus the largest unit whole twice) ``+ act_i * inflight (+ transient on stage 0)``;
  ``kmax`` is the largest in-flight count that fits every device; the optimizer steps
  on the mode's share of the trainable bytes;
- in a space that recomputes (``Space.recompute``, every stage's ``StagePlan.recompute``)
  a block keeps only its input (``hidden`` values a token), its backward adds its
  forward, and the largest block of the range is rebuilt at a time beside the kept
  activations (on stage 0 instead of the head's logits when larger), as ``cost.model``
  counts it.

``tests/unit/test_planner.py`` checks that these closed forms equal ``cost.model`` on
every plan of small spaces.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from edgepool.cost.model import block_costs, memory_cap_bytes, owner_costs
from edgepool.cost.wire import CODEC_TRAFFIC_BYTES
from edgepool.cost.network import Network
from edgepool import modes as modes_mod
from edgepool.cost.profile import ModelProfile
from edgepool.modes.base import bucket_layout, synced_units
from edgepool.planner.space import PIPELINE_MODES, PIPELINE_MODE, Space
from edgepool.specs.plan import StageSplit

INF = float("inf")


@dataclass
class GroupMats:
    """(L+1, L+1) matrices of one group for one M (rows l0, columns l)."""

    W: np.ndarray  # machine time per micro-batch; inf where l0 >= l
    C: np.ndarray  # W + sync
    kmax: np.ndarray  # int: most micro-batches in flight that fit, capped at M; -1 if nothing fits
    optim: np.ndarray  # (L+1,): optimizer time as stage 0 over [0, l)
    min_sync: float  # the group's smallest possible sync (one block)
    t_small: int  # the largest in-flight count below M that fits some layer range (0: none)
    min_step: float  # a lower bound on the step time of any plan using the group: min of M W + sync


@dataclass
class GroupTable:
    a: int
    b: int
    modes: dict[str, str]
    counts: tuple[int, ...]
    mode: str  # the group's stage mode (one with ``in_pipelines``)
    # per distinct device row (r): prefix sums over layers (length L+1)
    fwd_pre: np.ndarray  # (r, L+1) seconds
    bwd_pre: np.ndarray
    act_pre: np.ndarray  # (r, L+1) bytes per micro-batch
    first_fwd: np.ndarray  # (r,) embed forward (stage 0 only)
    first_bwd: np.ndarray  # (r,) head fwd+bwd and embed backward
    transient: np.ndarray  # (r,) head logits
    cap: np.ndarray  # (r,) bytes free for training
    optim_rate: np.ndarray  # (r,) seconds per parameter byte
    a_s: float  # boundary time per direction (the NIC side), see the module docstring
    lam_s: float
    sync_lat_s: float
    kappa: float  # sync seconds per parameter byte (0 for one device)
    idle_w: float  # sum over devices (energy search)
    busy_minus_idle: np.ndarray  # (r,) busy_w - idle_w per row, times multiplicity
    mult: np.ndarray  # (r,) devices per row
    radio_j_per_byte: np.ndarray  # (r,) per row (per device)
    rows_x: np.ndarray  # (r,) samples per micro-batch of the row's devices
    coll_lat_s: float = 0.0  # per unit gathered, per micro-batch (fwd + bwd): the mode's unit collectives
    coll_per_byte: float = 0.0  # per parameter byte gathered, per micro-batch
    optim_frac: float = 1.0  # share of its parameters a device's optimizer steps on
    # (r, L+1, L+1) with recomputation: the largest block's activations over [l0, l),
    # rebuilt one block at a time in the backward (None without)
    redo: np.ndarray | None = None
    slow: np.ndarray | None = None  # (r,) reference seconds to the row's
    codec_enc: np.ndarray | None = None  # (r,) seconds per micro-batch encoding the row's boundary rows (None: fp32)
    codec_dec: np.ndarray | None = None


@functools.lru_cache(maxsize=8)
def _bucket_mats(prof: ModelProfile) -> tuple[np.ndarray, np.ndarray]:
    """The runtime's sync buckets (``modes.base.bucket_layout``) over every layer range
    [l0, l), with the embed and head on l0 = 0 (the pipeline modes own data): (K, L+1,
    L+1) arrays of each bucket's bytes as the wire sends them and the range's blocks whose
    backward is left when it is final (-1: no such bucket), K the most buckets a range has."""
    L = prof.num_layers
    out: dict[tuple[int, int], list[tuple[float, int]]] = {}
    for l0 in range(L):
        for l in range(l0 + 1, L + 1):
            out[l0, l] = bucket_layout(synced_units(prof, l0, l, owner=l0 == 0))
    K = max((len(v) for v in out.values()), default=0)
    nbytes, left = np.zeros((K, L + 1, L + 1)), np.full((K, L + 1, L + 1), -1, dtype=int)
    for (l0, l), bks in out.items():
        for k, (b, r) in enumerate(bks):
            nbytes[k, l0, l], left[k, l0, l] = b, r
    return nbytes, left


class Tables:
    """Per (M, power modes) group tables, plus the layer prefix sums they share."""

    def __init__(self, space: Space, net: Network):
        self.space = space
        self.net = net
        prof = space.profile
        self.L = prof.num_layers
        T = space.shape.seq_len
        self.T = T
        self.row_bytes = T * prof.wire_row_bytes  # one sample's boundary activations, on the wire
        blocks = prof.blocks
        params = np.array([lp.params_at() for lp in blocks])
        self.param_pre = np.concatenate([[0.0], np.cumsum(params)])
        self.first_params = prof.embed.params_at() + prof.head.params_at()
        L = self.L
        # Parameter bytes of [l0, l) (+ embed/head on row 0), an (L+1, L+1) matrix.
        pm = self.param_pre[None, :] - self.param_pre[:, None]
        pm[0, :] += self.first_params
        self.param_mat = pm
        # The same for the trainable bytes (``cost.profile.with_tuning``; equal to
        # ``param_mat`` in full training): gradients, optimizer state and its step, syncs.
        train = np.array([lp.trainable_at() for lp in blocks])
        self.train_pre = np.concatenate([[0.0], np.cumsum(train)])
        self.first_train = prof.embed.trainable_at() + prof.head.trainable_at()
        tm = self.train_pre[None, :] - self.train_pre[:, None]
        tm[0, :] += self.first_train
        self.train_mat = tm
        # The overlapped sync's buckets over [l0, l) (``GroupComm.sync_buckets``): the
        # runtime's layout, as the wire sends them (``LayerProfile.sync_at``)
        self.bk_bytes, self.bk_left = _bucket_mats(prof)
        synced = np.array([lp.sync_at() for lp in blocks])
        # compressing them (PowerSGD) over [l0, l), reference seconds (``cost.model.sync_codec_s``)
        per = np.array([prof.compress_s(lp.sync_flops, lp.sync_traffic_bytes) for lp in blocks])
        per_pre = np.concatenate([[0.0], np.cumsum(per)])
        cm = per_pre[None, :] - per_pre[:, None]
        cm[0, :] += sum(prof.compress_s(lp.sync_flops, lp.sync_traffic_bytes) for lp in (prof.embed, prof.head))
        self.valid = np.triu(np.ones((L + 1, L + 1), dtype=bool), k=1)
        self.sync_codec_mat = np.where(self.valid, cm, 0.0)
        # Units a gathering mode (fsdp) gathers over [l0, l): every block, plus embed and
        # head on stage 0; and the largest of them.
        lo, hi = np.meshgrid(np.arange(L + 1), np.arange(L + 1), indexing="ij")
        self.units_mat = np.maximum(hi - lo, 0) + np.where(lo == 0, 2, 0)
        whole = np.zeros((L + 1, L + 1))
        for l0 in range(L):
            whole[l0, l0 + 1:] = np.maximum.accumulate(params[l0:])
        whole[0, :] = np.maximum(whole[0, :], max(prof.embed.params_at(), prof.head.params_at()))
        self.whole_mat = whole
        self.ref = prof.reference_speed
        self.opt_f = prof.opt_state_factor
        self.runtime_bytes = prof.runtime_bytes
        self._cache: dict[tuple, GroupTable | None] = {}
        self._mats: dict[tuple, GroupMats] = {}
        self._groups: dict[tuple, list] = {}
        self._dev_cache: dict[tuple, tuple] = {}
        self._row_cache: dict[tuple, tuple] = {}
        self._block_cache: dict[tuple, tuple] = {}
        self.min_block_params = float(params.min()) if len(params) else 0.0
        self.min_block_sync = float(synced.min()) if len(synced) else 0.0
        enc_b, dec_b = CODEC_TRAFFIC_BYTES[prof.wire_activations]
        # seconds per sample row per micro-batch on the reference device, (encode, decode)
        self.codec_row_s = (T * prof.dims.hidden * prof.traffic_s_per_byte * enc_b,
                            T * prof.dims.hidden * prof.traffic_s_per_byte * dec_b) if enc_b or dec_b else None
        self._mat_bytes = 0

    def _device(self, d, mode: str) -> tuple:
        """(speed, cap, busy - idle, radio J/MB, idle W, bandwidth, latency) of a device in a mode."""
        key = (d.name, mode)
        hit = self._dev_cache.get(key)
        if hit is None:
            from edgepool import catalog

            kind = catalog.get(d.kind)
            pm = kind.power_mode(mode)
            # What the model may use: the cap less the framework's own resident memory.
            cap = memory_cap_bytes(d) - self.runtime_bytes
            hit = (self.space.speed(d, mode), cap, pm.busy_w - pm.idle_w, kind.radio_j_per_mb,
                   pm.idle_w, self.net.dev_Bps[d.name], self.net.dev_latency_s[d.name])
            self._dev_cache[key] = hit
        return hit

    def _row(self, speed: float, x: int, mode: str) -> tuple:
        """Prefix sums and stage-0 extras of a device of ``speed`` with ``x`` samples of
        each micro-batch in ``mode``: its part of every block (``Mode.block_part``) priced
        by ``cost.model.block_costs``, its own data's embed and head by ``owner_costs``."""
        key = (speed, x, mode)
        hit = self._row_cache.get(key)
        if hit is None:
            prof, shape = self.space.profile, self.space.shape
            T = shape.seq_len
            slow = self.ref / speed
            one = StageSplit(batch=(x,), seq=(T,), heads=(shape.num_heads,), ffn=(shape.ffn,))
            part = modes_mod.get(mode).block_part(one, 0, x, shape)
            costs = self._block_cache.get(part)
            if costs is None:  # the reference device's; devices of every speed share them
                costs = self._block_cache[part] = tuple(np.array(c) for c in block_costs(prof.blocks, part[0], T, *part[1:]))
            fs, bs, acts = costs
            redo = None
            if self.space.recompute:  # keep each block's input, run its forward again in the backward
                bs, redo = bs + fs, acts
                acts = np.full(len(acts), part[0] * prof.dims.hidden * prof.dtype_bytes)
            zero = np.zeros(1)
            fwd = np.concatenate([zero, np.cumsum(fs * slow)])
            bwd = np.concatenate([zero, np.cumsum(bs * slow)])
            act = np.concatenate([zero, np.cumsum(acts)])
            # Stage 0's devices own their samples (the pipeline modes own data).
            e_f, head_s, e_b, transient = owner_costs(prof, x * T, T)
            hit = (fwd, bwd, act, e_f * slow, (e_b + head_s) * slow, transient, redo)
            self._row_cache[key] = hit
        return hit

    def group(self, a: int, b: int, M: int, modes: dict[str, str], mode: str = PIPELINE_MODE) -> GroupTable | None:
        key = (a, b, M, tuple(modes[d.name] for d in self.space.order[a:b]), mode)
        if key in self._cache:
            return self._cache[key]
        sp = self.space
        devs = sp.order[a:b]
        counts = sp.shares(mode, devs, modes, M)
        if counts is None:
            self._cache[key] = None
            return None
        prof = sp.profile
        rows: dict[tuple, int] = {}
        bws, lam, idle = [], 0.0, 0.0
        for d, x in zip(devs, counts):
            speed, cap, bmi, radio, idle_w, bw, lat = self._device(d, modes[d.name])
            rk = (speed, x, cap, bmi, radio)
            rows[rk] = rows.get(rk, 0) + 1
            bws.append(bw)
            lam = max(lam, lat)
            idle += idle_w
        keys = list(rows)
        parts = [self._row(k[0], k[1], mode) for k in keys]
        n = len(devs)
        a_s = max(x * self.row_bytes / bw for x, bw in zip(counts, bws))
        m = modes_mod.get(mode)
        names = [d.name for d in devs]
        if n >= 2 and m.syncs_grads:
            # The ring all-reduce is affine in its bytes (``cost.network.allreduce_time``,
            # the cost model's own): read off at 1 and 2 GB.
            s1, s2 = (self.net.allreduce_time(names, u) for u in (1e9, 2e9))
            kappa = (s2 - s1) / 1e9
            sync_lat = s1 - kappa * 1e9
        else:
            kappa = sync_lat = 0.0
        # The mode's unit collectives are affine in the unit's bytes: read off at 1 and 2 GB
        # (not at 0, where an all-reduce costs nothing rather than its latency).
        c1, c2 = (sum(m.unit_collectives_s(names, self.net, u)) for u in (1e9, 2e9))
        c0 = c1 - (c2 - c1)
        gt = GroupTable(
            a=a, b=b, modes={d.name: modes[d.name] for d in devs}, counts=counts, mode=mode,
            coll_lat_s=c0, coll_per_byte=(c2 - c1) / 1e9, optim_frac=m.optim_fraction(n),
            fwd_pre=np.stack([p[0] for p in parts]), bwd_pre=np.stack([p[1] for p in parts]),
            act_pre=np.stack([p[2] for p in parts]), first_fwd=np.array([p[3] for p in parts]),
            first_bwd=np.array([p[4] for p in parts]), transient=np.array([p[5] for p in parts]),
            cap=np.array([k[2] for k in keys]),
            optim_rate=np.array([self.ref / k[0] * prof.optim_s_per_param_byte for k in keys]),
            a_s=a_s, lam_s=lam, sync_lat_s=sync_lat, kappa=kappa, idle_w=idle,
            busy_minus_idle=np.array([k[3] for k in keys]), mult=np.array([rows[k] for k in keys]),
            radio_j_per_byte=np.array([k[4] / 1e6 for k in keys]), rows_x=np.array([k[1] for k in keys]),
            redo=None if parts[0][6] is None else np.stack([self._running_max(p[6]) for p in parts]),
            slow=np.array([self.ref / k[0] for k in keys]),
        )
        if self.codec_row_s is not None:
            gt.codec_enc = gt.slow * gt.rows_x * self.codec_row_s[0]
            gt.codec_dec = gt.slow * gt.rows_x * self.codec_row_s[1]
        self._cache[key] = gt
        return gt

    # -- (l0, l) matrices -----------------------------------------------------------------
    def _span(self, pre: np.ndarray, first: np.ndarray | None) -> np.ndarray:
        """(r, L+1, L+1): pre[:, l] - pre[:, l0] (+ first on row l0 = 0)."""
        m = pre[:, None, :] - pre[:, :, None]
        if first is not None:
            m[:, 0, :] += first[:, None]
        return m

    def fwd_bwd(self, g: GroupTable) -> tuple[np.ndarray, np.ndarray]:
        """Per-micro-batch max forward and max backward of the group, (L+1, L+1), the
        boundary codec's passes included (module docstring)."""
        L = self.L
        f = self._span(g.fwd_pre, g.first_fwd)
        b = self._span(g.bwd_pre, g.first_bwd)
        if g.codec_enc is not None:  # every range but the whole model's is a stage of a pipeline
            enc, dec = g.codec_enc[:, None], g.codec_dec[:, None]
            f[:, 1:, :] += enc[:, :, None] + dec[:, :, None]
            b[:, 1:, :] += enc[:, :, None] + dec[:, :, None]
            f[:, 0, :L] += enc
            b[:, 0, :L] += enc + 2 * dec
        return f.max(axis=0), b.max(axis=0)

    def coll(self, g: GroupTable) -> np.ndarray:
        """The mode's collectives per micro-batch over [l0, l) (0 unless it gathers units)."""
        if not g.coll_lat_s and not g.coll_per_byte:
            return np.zeros((self.L + 1, self.L + 1))
        return g.coll_lat_s * self.units_mat + g.coll_per_byte * self.param_mat

    def static_bytes(self, g: GroupTable) -> np.ndarray:
        """Parameters, gradients and optimizer state over [l0, l), the mode's ``state_bytes``."""
        mode = modes_mod.get(g.mode)
        parts = mode.state_bytes(g.b - g.a, self.param_mat, self.whole_mat, self.opt_f, self.train_mat)
        return sum(parts.values()) + mode.libraries_bytes(self.space.profile, g.b - g.a)

    def machine(self, g: GroupTable) -> np.ndarray:
        """Stage machine time ``max F + max B`` (+ the mode's collectives) per micro-batch;
        inf where l0 >= l."""
        f, b = self.fwd_bwd(g)
        return np.where(self.valid, f + b + self.coll(g), INF)

    def _allreduce(self, g: GroupTable, nbytes: np.ndarray) -> np.ndarray:
        """``cost.network.allreduce_time`` of the group, elementwise (0 for no bytes)."""
        return np.where(nbytes > 0, g.sync_lat_s + g.kappa * nbytes, 0.0)

    def sync(self, g: GroupTable) -> np.ndarray:
        """The sync's exposed seconds over [l0, l) (``GroupComm.exposed_sync_s``): bucket
        by bucket, ``t = max(t, -hide_k) + ar_k`` with ``hide_k`` the largest row's
        backward over the blocks of the range before the bucket's lowest one."""
        if g.kappa == 0:
            return np.zeros((self.L + 1, self.L + 1))
        l0 = np.arange(self.L + 1)[:, None]
        start = g.bwd_pre[:, :, None]  # (r, L+1, 1): each row's backward before block l0
        t = np.full((self.L + 1, self.L + 1), -INF)
        for nbytes, left in zip(self.bk_bytes, self.bk_left):
            there = left >= 0
            hide = (g.bwd_pre[:, np.minimum(l0 + np.maximum(left, 0), self.L)] - start).max(axis=0)
            t = np.where(there, np.maximum(t, -hide) + self._allreduce(g, nbytes), t)
        exposed = np.where(self.valid & (self.bk_left[0] >= 0), np.maximum(t, 0.0), 0.0)
        return exposed + float(g.slow.max()) * self.sync_codec_mat

    def optim_first(self, g: GroupTable) -> np.ndarray:
        """(L+1,): optimizer time of the group as stage 0 covering [0, l) (per trainable byte)."""
        p = (self.train_pre + self.first_train) * g.optim_frac
        return (g.optim_rate[:, None] * p[None, :]).max(axis=0)

    def _running_max(self, v: np.ndarray) -> np.ndarray:
        """(L+1, L+1): the largest of ``v[l0:l]`` (0 where l0 >= l)."""
        L = self.L
        out = np.zeros((L + 1, L + 1))
        for l0 in range(L):
            out[l0, l0 + 1:] = np.maximum.accumulate(v[l0:])
        return out

    def transient(self, g: GroupTable) -> np.ndarray:
        """(r, L+1, L+1): bytes live beside the kept activations: stage 0's head logits,
        and with recomputation one rebuilt block (never live at once: the larger)."""
        t = np.zeros((len(g.cap), self.L + 1, self.L + 1)) if g.redo is None else g.redo.copy()
        t[:, 0, :] = np.maximum(t[:, 0, :], g.transient[:, None])
        return t

    def kmax(self, g: GroupTable, M: int) -> np.ndarray:
        """Largest number of micro-batches in flight that fits every device (int, capped at M)."""
        static = self.static_bytes(g)  # (L+1, L+1)
        act = g.act_pre[:, None, :] - g.act_pre[:, :, None]  # (r, L+1, L+1)
        room = g.cap[:, None, None] - static[None] - self.transient(g)
        with np.errstate(divide="ignore", invalid="ignore"):
            k = np.where(act > 0, np.floor(room / np.where(act > 0, act, 1.0)), np.where(room >= 0, M, -1))
        k = np.where(room < 0, -1, k)
        return np.minimum(k.min(axis=0), M).astype(np.int32)

    def cheap_bound(self, g: GroupTable, M: int) -> float:
        """A lower bound on the step time of any plan using the group, without matrices:
        M times its fastest one-block machine time, plus its smallest sync."""
        one = (g.fwd_pre[:, 1:] - g.fwd_pre[:, :-1]) + (g.bwd_pre[:, 1:] - g.bwd_pre[:, :-1])
        w = float(one.max(axis=0).min())
        # the exposed sync is at least the last bucket's all-reduce, which holds block l0:
        # at least one block's synced bytes
        return M * w + (g.sync_lat_s + g.kappa * self.min_block_sync if g.kappa and self.min_block_sync > 0 else 0.0)

    def groups_for(self, M: int, modes: dict[str, str], pp_only: bool = False) -> list[GroupTable]:
        """Every valid group of the canonical order for M, in every pipeline mode (one
        device: the plain one), cached."""
        names = [d.name for d in self.space.order]
        key = (M, tuple(modes[n] for n in names), pp_only)
        if key not in self._groups:
            out = []
            N = len(names)
            for a in range(N):
                for b in range(a + 1, N + 1):
                    if pp_only and b - a != 1:
                        continue
                    for mode in (PIPELINE_MODES if b - a > 1 else (PIPELINE_MODE,)):
                        if mode in self.space.without:
                            continue
                        g = self.group(a, b, M, modes, mode)
                        if g is not None:
                            out.append(g)
            self._groups[key] = out
        return self._groups[key]

    def mats(self, g: GroupTable, M: int, budget_bytes: float = 3e8) -> GroupMats:
        """The group's matrices, cached while the cache stays under ``budget_bytes``."""
        key = (g.a, g.b, M, tuple(g.modes[d.name] for d in self.space.order[g.a:g.b]), g.mode)
        hit = self._mats.get(key)
        if hit is not None:
            return hit
        W = self.machine(g)
        sync = self.sync(g)
        min_sync = float(np.min(np.where(self.valid, sync, INF))) if g.kappa else 0.0
        kmax = self.kmax(g, M)
        tight = kmax[self.valid & (kmax >= 1) & (kmax < M)]
        fits = self.valid & (kmax >= 1)
        min_step = float(np.min(np.where(fits, M * W + sync, INF))) if fits.any() else INF
        m = GroupMats(W=W, C=W + sync, kmax=kmax, optim=self.optim_first(g), min_sync=min_sync,
                      t_small=int(tight.max()) if tight.size else 0, min_step=min_step)
        size = W.nbytes * 2 + m.kmax.nbytes
        if self._mat_bytes + size <= budget_bytes:
            self._mats[key] = m
            self._mat_bytes += size
        return m

    def single(self, g: GroupTable, M: int) -> tuple[float, float, bool]:
        """A single-stage plan of the group: (step time, period, fits in memory), closed form."""
        L = self.L
        f = (g.fwd_pre[:, L] + g.first_fwd).max()
        b = (g.bwd_pre[:, L] + g.first_bwd).max()
        W = float(f + b + self.coll(g)[0, L])
        trained = float(self.train_mat[0, L])
        sync = float(self.sync(g)[0, L])
        optim = float((g.optim_rate * trained * g.optim_frac).max())
        mem = float(self.static_bytes(g)[0, L]) + g.act_pre[:, L] + self.transient(g)[:, 0, L]
        return M * W + sync + optim, W, bool(np.all(mem <= g.cap))

    def link(self, gp: GroupTable, gq: GroupTable, base: float) -> float:
        """One direction of the boundary between two dp groups."""
        return max(gp.lam_s, gq.lam_s) + max(base, gp.a_s, gq.a_s)

    def base(self, M: int) -> float:
        """Channel time of one micro-batch's boundary activations (0 when switched)."""
        if not self.net.shared:
            return 0.0
        mb = self.space.shape.global_batch // M
        return mb * self.row_bytes / self.net.channel_Bps
