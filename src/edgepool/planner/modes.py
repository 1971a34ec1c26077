"""Per-device power modes for a fixed pipeline structure (exact over the mode space).

Given a pipeline of dp groups (groups, layer ranges, micro-batch count), choose each
group's power-mode assignment (devices of one kind in a group share a mode; see
``space``) to trade step time against energy. Lower modes run a device slower but
usually spend fewer joules per unit of work (``busy_w / compute_fraction`` falls with
the clock, the DVFS effect Perseus and EnvPipe exploit); they also shift the shares of
a group towards its faster devices.

With every group's option fixed, the cost model gives (``cost.model``)

    T = max(tau + (M - 1) * X, beta + M * chan),   E = eps + P * T,

where ``tau`` (sums of stage work, boundaries, syncs, stage 0's optimizer step),
``beta`` (stage 0's work and optimizer step plus every sync: what the shared channel
cannot overlap; ``chan = 2 S base``, 0 on a switched medium or with one stage), ``eps``
(``(busy_w - idle_w) * busy`` plus radio energy, per device) and ``P`` (idle watts of
the plan's devices) are sums over groups, ``X`` a maximum. A label-setting DP over the
stages in order keeps, per (option of stage 0, option of the previous stage), the
labels ``(tau, X, eps, P, beta)`` that no other label beats in all five; every objective
(time, energy, energy under a deadline, energy-delay product) is non-decreasing in each
of them, so the Pareto labels contain every optimum. The option of stage 0 is part of
the state because the last stage's boundary goes back to stage 0's data owners.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgepool.planner.space import Space, group_mode_assignments
from edgepool.planner.tables import INF, GroupTable, Tables
from edgepool.specs.plan import inflight_limit


@dataclass(frozen=True)
class Option:
    modes: dict[str, str]
    g: GroupTable
    W: float
    sync: float
    optim0: float
    eps: float  # (busy - idle) energy + radio, joules
    idle_w: float


@dataclass(frozen=True)
class ModeChoice:
    modes: dict[str, str]
    step_time_s: float
    energy_j: float


def _options(tables: Tables, a: int, b: int, l0: int, l1: int, M: int, S: int, s: int,
             objective: str) -> list[Option]:
    sp: Space = tables.space
    devs = list(sp.order[a:b])
    out = []
    for modes in group_mode_assignments(devs, objective):
        g = tables.group(a, b, M, modes)
        if g is None:
            continue
        inflight = inflight_limit(S, s, M, "1f1b")
        if tables.kmax(g, M)[l0, l1] < inflight:
            continue
        f = g.fwd_pre[:, l1] - g.fwd_pre[:, l0]
        bw = g.bwd_pre[:, l1] - g.bwd_pre[:, l0]
        if l0 == 0:
            f = f + g.first_fwd
            bw = bw + g.first_bwd
        W = float(f.max() + bw.max())
        params = float(tables.train_mat[l0, l1])  # trainable bytes: synced and stepped
        n = b - a
        sync = float(tables.sync(g)[l0, l1]) if n >= 2 else 0.0  # exposed: overlapped with the backward
        optim_dev = g.optim_rate * params
        busy = M * (f + bw) + optim_dev
        nbytes = (M * 4 * g.rows_x * tables.row_bytes if S >= 2 else 0.0) + (
            2 * 2.0 * (n - 1) / n * params if n >= 2 else 0.0)
        eps = float(np.sum(g.mult * (g.busy_minus_idle * busy + g.radio_j_per_byte * nbytes)))
        out.append(Option(modes=modes, g=g, W=W, sync=sync, optim0=float(optim_dev.max()) if l0 == 0 else 0.0,
                          eps=eps, idle_w=g.idle_w))
    return out


def _pareto(labels: list[tuple]) -> list[tuple]:
    """Labels (tau, X, eps, P, beta, ...) not dominated in the first five fields."""
    labels = sorted(labels, key=lambda t: t[:5])
    keep: list[tuple] = []
    for lab in labels:
        if any(all(k[i] <= lab[i] for i in range(5)) for k in keep):
            continue
        keep.append(lab)
    return keep


def mode_choices(tables: Tables, stages: list[tuple[int, int, int, int]], M: int, objective: str,
                 max_labels: int = 64) -> list[ModeChoice]:
    """Pareto-optimal (time, energy) mode assignments of a pipeline of dp groups.

    ``stages``: (a, b, l0, l1) in stage order. ``max_labels`` bounds each state's label
    set (keeping the fastest and the most frugal labels) for very long pipelines; below
    the bound the result is exact.
    """
    S = len(stages)
    base = tables.base(M)
    opts = [_options(tables, a, b, l0, l1, M, S, s, objective) for s, (a, b, l0, l1) in enumerate(stages)]
    if any(not o for o in opts):
        return []

    def link(o1: Option, o2: Option) -> float:
        return 2.0 * tables.link(o1.g, o2.g, base)

    chan = 2 * S * base if S >= 2 else 0.0

    def time(tau: float, X: float, beta: float) -> float:
        return max(tau + (M - 1) * X, beta + M * chan) if chan > 0 else tau + (M - 1) * X

    # state: (first option index, previous option index) -> labels (tau, X, eps, P, beta, choice tuple)
    states: dict[tuple[int, int], list[tuple]] = {}
    for i, o in enumerate(opts[0]):
        states[(i, i)] = [(o.W + o.sync + o.optim0, o.W, o.eps, o.idle_w, o.W + o.sync + o.optim0, (i,))]
    for s in range(1, S):
        nxt: dict[tuple[int, int], list[tuple]] = {}
        for (f, p), labs in states.items():
            op = opts[s - 1][p]
            for j, o in enumerate(opts[s]):
                lk = link(op, o)
                for tau, X, eps, P, beta, ch in labs:
                    nxt.setdefault((f, j), []).append(
                        (tau + o.W + o.sync + lk, max(X, o.W, lk), eps + o.eps, P + o.idle_w, beta + o.sync, ch + (j,)))
        states = {}
        for key, labs in nxt.items():
            labs = _pareto(labs)
            if len(labs) > max_labels:
                labs = sorted(labs, key=lambda t: time(t[0], t[1], t[4]))[: max_labels // 2] + \
                    sorted(labs, key=lambda t: t[2] + t[3] * time(t[0], t[1], t[4]))[: max_labels // 2]
            states[key] = labs
    out = []
    for (f, p), labs in states.items():
        lk = link(opts[S - 1][p], opts[0][f]) if S >= 2 else 0.0
        for tau, X, eps, P, beta, ch in labs:
            T = time(tau + lk, max(X, lk), beta)
            modes = {k: v for s, j in enumerate(ch) for k, v in opts[s][j].modes.items()}
            out.append(ModeChoice(modes=modes, step_time_s=T, energy_j=eps + P * T))
    return out


def frontier(points: list, key_t=lambda c: c.step_time_s, key_e=lambda c: c.energy_j) -> list:
    """The time-energy Pareto frontier, sorted by time."""
    pts = sorted(points, key=lambda c: (key_t(c), key_e(c)))
    out, best_e = [], INF
    for c in pts:
        if key_e(c) < best_e - 1e-12 * max(1.0, abs(best_e) if best_e < INF else 1.0):
            out.append(c)
            best_e = key_e(c)
    return out
