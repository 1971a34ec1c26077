"""Dynamic programming over (layer suffix, device suffix) for pipelines of dp and fsdp groups.

For a fixed micro-batch count M, power modes and a cap ``X`` on the period, the cost
model's step time of a pipeline of dp groups is

    T = max(tau + (M - 1) * period, W_0 + optim_0 + sum_s sync_s + M * chan),
    tau = sum_s (W_s + sync_s) + sum_k 2 c_k + optim_0

(``cost.model``: machine work ``W_s = max F + max B`` per micro-batch, boundaries
``c_k`` each way, gradient syncs, stage 0's optimizer step; ``period`` is the slowest
machine; the second term, on a shared medium with two or more stages, is the channel's
``chan = 2 S base`` per micro-batch). ``tau`` is a sum over stages and boundaries, so
with every machine constrained to ``<= X`` it is minimised exactly by a DP; the period
term is handled outside by searching over ``X`` (``search.best_for_m``), which also
caps the number of stages (``max_stages``) to find the plans the channel term favours.

The DP goes backwards (from the last block), prepending one stage at a time. A state
``(l, e, k, rho, sigma)`` means: blocks ``[l, L)`` and canonical devices ``[e, N)`` are
decided; the suffix has ``k`` stages (capped: the memory of a 1f1b stage depends on the
number of stages after it, ``specs.plan.inflight_limit``); its first stage
(the next boundary's receiver) has boundary class ``rho`` and its last stage (the one
that sends back to the data owners) class ``sigma``. A boundary's time depends on both
of its groups only through their classes (``tables`` module docstring). Devices between
two groups are left out. Prepending group ``[a, b)`` over blocks ``[l0, l)``:

    V[l0, a, k+1, cls(g), sigma] = min over l, e >= b, rho of
        V[l, e, k, rho, sigma] + W_g(l0, l) + sync_g(l0, l) + 2 c(g, rho)
        (+ optim_g(l) + 2 c(g, sigma) when l0 = 0: g is stage 0)

subject to memory (``kmax_g(l0, l) >= min(k+2, M)``; ``min(2, M)`` for a last stage, 1 for
a single one), every machine ``<= X`` and at most
``max_stages`` stages. ``kind="max"`` replaces sums by maxima
and yields the smallest achievable period (a lower bound for the ``X`` search).

A run of devices may serve a stage in either pipeline mode (``Tables.groups_for``:
dp replicas or fsdp shards). Both variants have the same shares and so the same
boundary class; for every in-flight count and layer range the DP takes the cheaper
variant that fits and remembers which (``bp_v``), so the mode is chosen exactly,
entry by entry, at the cost of one more ``where`` per group.

The work per group is a handful of numpy operations on ``(L+1) x (L+1)`` matrices, so
one run costs O(N^2 L^2 K R) element operations with small constants.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from edgepool.planner.tables import INF, GroupTable, Tables


@dataclass(frozen=True)
class DPStage:
    a: int
    b: int
    l0: int
    l1: int
    mode: str = "dp"  # the group's stage mode (``Tables.groups_for``)


@dataclass(frozen=True)
class DPResult:
    value: float  # tau (kind "sum") or the period (kind "max")
    stages: tuple[DPStage, ...]
    coarse: bool = False  # boundary classes were merged to fit MAX_DP_CELLS: an upper bound, not exact


# The DP's tables hold (L+1)(N+1)K(R+1)^2 cells (about 33 bytes each, over seven arrays).
# A pool of many uneven devices has as many boundary classes R as distinct (lambda, a)
# pairs: 42 devices x 35 layers reached R = 124, 8.8 GB in one run (issue 10's fuzz).
# Past MAX_DP_CELLS, classes are merged into at most as many as fit: contiguous runs of
# the sorted keys, each represented by the largest lambda and a of its members, so
# every boundary is priced at or above its true cost (the plan found is feasible and its
# value an upper bound; the search is then no longer exact, and says so).
MAX_DP_CELLS = 1 << 24


def _classes(groups: list[GroupTable], base: float, max_classes: int | None = None
             ) -> tuple[list[tuple[float, float]], dict]:
    keys = sorted({(g.lam_s, max(base, g.a_s)) for g in groups})
    if max_classes is None or len(keys) <= max_classes:
        return keys, {k: i for i, k in enumerate(keys)}
    chunks = np.array_split(np.arange(len(keys)), max_classes)
    reps, index = [], {}
    for c in chunks:
        members = [keys[i] for i in c]
        reps.append((max(k[0] for k in members), max(k[1] for k in members)))
        index.update({k: len(reps) - 1 for k in members})
    return reps, index


def _cheapest(costs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
    """Elementwise least cost over variants and which variant gives it (None: one variant)."""
    if len(costs) == 1:
        return costs[0], None
    best, which = costs[0], np.zeros(costs[0].shape, dtype=np.int8)
    for i, c in enumerate(costs[1:], start=1):
        lower = c < best
        best = np.where(lower, c, best)
        which[lower] = i
    return best, which


def solve(tables: Tables, M: int, modes: dict[str, str], X: float = INF, kind: str = "sum",
          pp_only: bool = False, min_stages: int = 1, max_stages: int | None = None, bound: float = INF,
          relaxed: bool = False) -> DPResult | None:
    """The best pipeline (``kind="sum"``: least tau with every machine <= X;
    ``kind="max"``: least period). None if nothing fits.

    ``bound``: groups that cannot be part of a plan faster than ``bound`` are skipped
    (every use of a group costs at least ``M W + sync`` on some layer range).

    ``relaxed``: charge each boundary only its prepended group's side,
    ``lam_g + max(base, a_g) <= max(lam_P, lam_Q) + max(base, a_P, a_Q)``, so one
    boundary class suffices; the value is then a lower bound on tau (cheap pruning of a
    micro-batch count before the exact runs).
    """
    sp = tables.space
    N, L = len(sp.order), tables.L
    base = tables.base(M)
    # Every (a, b) may have one variant per pipeline mode (dp, fsdp); they share their
    # boundary class (same shares, same links) and differ in W, sync, memory, optim.
    groups: dict[tuple[int, int], list[tuple[GroupTable, object]]] = {}
    t_small = 0
    for g in tables.groups_for(M, modes, pp_only):
        # Every plan using the group takes at least M W + sync on some layer range: its
        # stage's work per micro-batch enters the fill once and the period M - 1 times.
        if kind == "sum" and bound < INF and tables.cheap_bound(g, M) >= bound:
            continue
        m = tables.mats(g, M)
        if kind == "sum" and m.min_step >= bound:
            continue
        groups.setdefault((g.a, g.b), []).append((g, m))
        t_small = max(t_small, m.t_small)

    if not groups:
        return None
    use_cap = max_stages is not None and max_stages < min(N, L)
    # Suffix stage counts that memory can tell apart: beyond t_small + 1 every tight
    # entry is infeasible and every ample one feasible. A stage cap needs exact counts
    # up to it.
    kcap = min(N, L, t_small + 1)
    if use_cap:
        kcap = max(kcap, max_stages)
    kcap = max(kcap, 1)
    K = kcap + 1
    if relaxed:
        cls_keys, cls_index = [(0.0, 0.0)], {}
    else:
        fit = max(1, int(math.isqrt(MAX_DP_CELLS // ((L + 1) * (N + 1) * K))) - 1)
        cls_keys, cls_index = _classes([g for v in groups.values() for g, _ in v], base, fit)
    coarse = len(cls_index) > len(cls_keys)
    R = len(cls_keys)
    NONE = R
    lam = np.array([k[0] for k in cls_keys])
    aa = np.array([k[1] for k in cls_keys])
    shape = (L + 1, N + 1, K, R + 1, R + 1)
    V = np.full(shape, INF)
    bp_b = np.full(shape, -1, dtype=np.int32)
    bp_l = np.full(shape, -1, dtype=np.int32)
    bp_k = np.full(shape, -1, dtype=np.int32)
    bp_v = np.full(shape, -1, dtype=np.int8)  # which variant of the group
    V[L, :, 0, NONE, NONE] = 0.0
    SV = np.full(shape, INF)
    SVarg = np.full(shape, -1, dtype=np.int32)
    SV[:, N] = V[:, N]
    SVarg[:, N] = N
    comb = np.add if kind == "sum" else np.maximum
    ks = np.arange(1, K)  # source suffix lengths of the pipeline transitions
    # specs.plan.inflight_limit for 1f1b: a stage prepended to k >= 1 stages is in a
    # pipeline of two or more, so it keeps k + 1, plus one for the owners' head.
    inflight = np.minimum(ks + 2, M)
    k_target = np.minimum(ks + 1, kcap)
    stage_ok = np.ones(K - 1, dtype=bool)
    if use_cap:
        stage_ok = ks + 1 <= max_stages
    first_ok = (ks + 1) >= min_stages

    for a in range(N - 1, -1, -1):
        for b in range(a + 1, N + 1):
            variants = groups.get((a, b))
            if not variants:
                continue
            g = variants[0][0]  # the variants share shares, links and so the boundary class
            cg = 0 if relaxed else cls_index[(g.lam_s, max(base, g.a_s))]
            # Per variant: the stage's cost (stage 0's optimizer step folded into row 0)
            # and where it is feasible (every machine <= X).
            costs, feas = [], []
            for gv, m in variants:
                C = (m.C if kind == "sum" else m.W).copy()
                if kind == "sum":
                    C[0] += m.optim
                costs.append(C)
                feas.append(m.W <= X)
            ga = max(base, g.a_s)
            if relaxed:
                link = np.array([2.0 * (g.lam_s + ga)])
            else:
                link = 2.0 * (np.maximum(g.lam_s, lam) + np.maximum(ga, aa))  # to each class, (R,)
            link = np.where(link <= X, link, INF)
            SVb = SV[:, b]
            # k = 0: g becomes the last stage (and, at l0 = 0, the only one).
            src = SVb[L, 0, NONE, NONE]
            if np.isfinite(src):
                # A last stage keeps min(2, M) (itself and the owners' head), the only one 1.
                need = np.full(L + 1, min(2, M))
                need[0] = 1
                c0, vsel0 = _cheapest([np.where(f[:, L] & (m.kmax[:, L] >= need), C[:, L], INF)
                                       for C, f, (_, m) in zip(costs, feas, variants)])  # (l0,)
                cand = comb(c0, src)
                if pp_only or min_stages > 1:
                    cand[0] = INF
                tgt = V[:, a, 1, cg, cg]
                better = cand < tgt
                if better.any():
                    tgt[better] = cand[better]
                    bp_b[:, a, 1, cg, cg][better] = b
                    bp_l[:, a, 1, cg, cg][better] = L
                    bp_k[:, a, 1, cg, cg][better] = 0
                    bp_v[:, a, 1, cg, cg][better] = vsel0[better] if vsel0 is not None else 0
            # k >= 1: g is prepended to a suffix of k stages.
            live = stage_ok & np.isfinite(SVb[:, 1:]).any(axis=(0, 2, 3))
            if not live.any():
                continue
            kk = np.nonzero(live)[0]  # indices into ks
            # The cheapest variant that fits each in-flight count, per layer range.
            Ck, vsel = _cheapest([np.where(f[None] & (m.kmax[None] >= inflight[kk][:, None, None]), C[None], INF)
                                  for C, f, (_, m) in zip(costs, feas, variants)])  # (k, l0, l)
            U = comb(SVb[:, kk + 1, :R, :], link[None, None, :, None]).min(axis=2)  # (l, k, sigma)
            M3 = comb(Ck[:, :, :, None], U.transpose(1, 0, 2)[:, None, :, :])  # (k, l0, l, sigma)
            lbest = M3.argmin(axis=2)  # (k, l0, sigma)
            cand = np.take_along_axis(M3, lbest[:, :, None, :], axis=2)[:, :, 0, :]
            link_s = np.full(R + 1, INF)
            link_s[:R] = link
            cand[:, 0] = comb(cand[:, 0], link_s[None, :])
            cand[~first_ok[kk], 0] = INF
            for j, ki in enumerate(kk):
                k, k2 = int(ks[ki]), int(k_target[ki])
                tgt = V[:, a, k2, cg, :]
                better = cand[j] < tgt
                if better.any():
                    tgt[better] = cand[j][better]
                    bp_b[:, a, k2, cg, :][better] = b
                    bp_l[:, a, k2, cg, :][better] = lbest[j][better]
                    bp_k[:, a, k2, cg, :][better] = k
                    bp_v[:, a, k2, cg, :][better] = (0 if vsel is None else
                                                     np.take_along_axis(vsel[j], lbest[j], axis=1)[better])
        # Devices [a, e) may be left out before a group starting at e.
        cur, nxt = V[:, a], SV[:, a + 1]
        take = cur <= nxt
        SV[:, a] = np.where(take, cur, nxt)
        SVarg[:, a] = np.where(take, a, SVarg[:, a + 1])

    final = SV[0, 0, 1:]  # at least one stage
    idx = np.unravel_index(np.argmin(final), final.shape)
    best = float(final[idx])
    if not np.isfinite(best):
        return None
    if relaxed:
        return DPResult(value=best, stages=())
    k, rho, sigma = idx[0] + 1, idx[1], idx[2]
    e = int(SVarg[0, 0, k, rho, sigma])
    l = 0
    stages = []
    while True:
        b, l1, kso = int(bp_b[l, e, k, rho, sigma]), int(bp_l[l, e, k, rho, sigma]), int(bp_k[l, e, k, rho, sigma])
        assert b > e and l1 > l, "broken back-pointer"
        g = groups[(e, b)][int(bp_v[l, e, k, rho, sigma])][0]
        stages.append(DPStage(e, b, l, l1, g.mode))
        if kso == 0:
            break
        ga = max(base, g.a_s)
        link = 2.0 * (np.maximum(g.lam_s, lam) + np.maximum(ga, aa))
        link = np.where(link <= X, link, INF)
        row = comb(SV[l1, b, kso, :R, sigma], link)
        rho = int(np.argmin(row))
        e = int(SVarg[l1, b, kso, rho, sigma])
        l, k = l1, kso
    return DPResult(value=best, stages=tuple(stages), coarse=coarse)
