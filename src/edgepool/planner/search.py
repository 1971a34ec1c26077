"""``plan(pool, job, profile, objective)``: the best Plan, the Pareto frontier and baselines.

**Time.** The step time of a pipeline of dp or fsdp groups is
``T = max(tau + (M-1) * period, beta + M * chan)`` (``dp`` module docstring): a
flow-shop term, and on a shared medium a channel term. For every micro-batch count M:

1. the DP (``dp.solve``) with ``kind="max"`` gives the smallest achievable period
   ``X_lo`` of a pipeline of such groups, and with no cap the least ``tau``;
2. the flow-shop term ``tau + (M-1) * period`` is minimised over the cap ``X`` by
   descending the staircase of Pareto-optimal (tau, period) pairs: a plan found under
   cap X (least tau ``t``, period ``p <= X``) settles every cap in ``[p, X]``, so the
   next cap is just below ``p`` (1e-9 relative). Every plan with a period below the
   cap has ``tau >= t``, and ``T`` is at least the flow-shop term, so the descent stops
   when ``t + (M-1) X_lo >= T_best`` or when the cap falls below
   ``(T_best - t) / (M - 1)``. Where the flow-shop term decides, the optimum is exact
   up to that 1e-9 relative step;
3. on a shared medium, where the channel term grows with the number of stages, the
   least-tau plan with at most S stages for every S below the best plan's, and then,
   if the channel decides the best plan, a local search that moves single layer
   boundaries (``shift_boundaries``). This part is not exact: it trades tau against
   stage 0's work, which the DP does not see, and on rare pools it misses the optimum
   by a few percent. Checked against exhaustive enumeration on seeded pools where the
   channel decides (``tests/unit/test_planner.py``);
4. single-stage plans of the other modes (sp, tp; every run of the canonical order)
   are evaluated with the cost model when the mode's lower bound
   (``single_stage_bound``: exact compute of the split plus its collectives) does not
   already exceed the best time.

**Energy, energy under a deadline, energy-delay product.** Structures (groups, layer
ranges, M) come from the time search: every plan the branch and bound produced for
every M (each is the least-tau plan for some period cap, so together they span the
time side), the family baselines, and the time-optimal plans on the canonical pool
with its slowest kinds removed (so using fewer devices is considered). For each
structure ``modes.mode_choices`` finds every Pareto-optimal power-mode assignment
exactly. The result is the best by the objective; the time-energy frontier is the
Pareto set of everything evaluated. This is exact over power modes for those
structures, not over all structures (``PlanResult.exact`` says which search ran).

**Finalists.** The cost model is a closed form: on a shared channel it counts no
queueing of the pipeline's round trips through the data owners' head, and it adds the
dp groups' gradient all-reduces up, so it differs from the discrete-event simulator
(``sim.engine``, which runs every rank's ops on the pool and tracks measured steps more
closely: ``docs/results/cost-model.md``) by tens of percent on pipelines, in both
directions. So the plans the search produced are ranked by the cost model, and its
best (``FINALISTS`` of them meeting the deadline in the simulator, at most
``MAX_SIMULATED`` runs; ``_finalists``), the GPipe twin of each 1F1B pipeline among them
(where its M micro-batches fit), and up to ``FRONTIER_SIMS`` points of the cost model's
frontier run in the simulator, whose step time and energy decide. A 1F1B pipeline is
simulated in two pass orders, laid out with unit durations or with its own costs
(``sim.engine.best_order``), and keeps the shorter (then its ``pass_times``, which the
runtime's order follows). The time objective's
finalists run for every objective, so the energy objective under a deadline set from
the fastest plan's predicted step always has that plan to fall back on. The chosen plan's
estimate is the simulator's (``source="simulator"``); ``PlanResult.model_best`` is the
cost model's own optimum, which is what the exactness claims above are about. A plan
outside the finalists that the simulator would rank first is missed.

**Baselines.** The best plan of each plain family (dp, sp, tp over any run of devices,
and uniform pp: every device one stage, blocks split evenly) is evaluated with the
cost model, simulated when it is within ``BASELINE_SIM_FACTOR`` of the chosen plan's
time, and compared with the chosen plan; ``explain`` says why it lost.

Infeasible pools raise ``InfeasibleError`` with the closest candidates and what broke
each ("needs 3.1 GB on nano-1, which has 2.0 GB free for training").
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

from edgepool import catalog
from edgepool import modes as modes_mod
from edgepool.modes import BoundInputs
from edgepool.cost.model import PlanCost, estimate, memory_cap_bytes, shape_for
from edgepool.cost.network import Network
from edgepool.cost.profile import ModelProfile
from edgepool.errors import InfeasibleError, PlanError
from edgepool.planner import dp as dpmod
from edgepool.planner.modes import frontier, mode_choices
from edgepool.planner.space import PIPELINE_MODE, PIPELINE_MODES, Space, group_mode_assignments, mode_options
from edgepool.planner.tables import INF, Tables
from edgepool.sim.engine import MAX_SIM_OPS, SimResult, best_order, sim_size
from edgepool.specs.plan import Plan, Shape, StagePlan, split_counts
from edgepool.specs.pool import PoolSpec

OBJECTIVES = ("time", "energy", "edp")
FINALISTS = 6  # the cost model's best plans that the simulator ranks
MAX_SIMULATED = 24  # simulator runs for finalists, at most (deadlines skip plans)
FRONTIER_SIMS = 24  # frontier points simulated (evenly spread)
BASELINE_SIM_FACTOR = 2.0  # baselines within this factor of the chosen plan are simulated
FAMILIES = modes_mod.NAMES + ("pp",)


@dataclass(frozen=True)
class Candidate:
    """A plan with the cost model's estimate and, for finalists, the simulator's step."""

    plan: Plan
    cost: PlanCost
    sim: SimResult | None = None

    @property
    def step_time_s(self) -> float:
        return self.sim.step_time_s if self.sim is not None else self.cost.step_time_s

    @property
    def energy_j(self) -> float:
        return self.sim.energy_j if self.sim is not None else self.cost.energy_j


@dataclass(frozen=True)
class Baseline:
    family: str  # dp, sp, tp, pp-uniform
    candidate: Candidate | None
    why: str


@dataclass(frozen=True)
class PlanResult:
    plan: Plan  # the best plan, with its estimate (the simulator's)
    cost: PlanCost  # the cost model's breakdown of the best plan
    objective: str
    deadline_s: float | None
    frontier: tuple[Candidate, ...]
    baselines: dict[str, Baseline]
    exact: bool  # model_best is the cost model's optimum (time objective), not a heuristic's
    model_best: Candidate | None  # the best plan by the cost model alone (what the search optimises);
    # None when the cost model puts no plan within the deadline but the simulator does
    stats: dict = field(default_factory=dict)


# -- helpers ------------------------------------------------------------------------------
def score(objective: str, T: float, E: float) -> float:
    if objective == "time":
        return T
    if objective == "energy":
        return E
    if objective == "edp":
        return E * T
    raise PlanError(f"unknown objective {objective!r}; known: {', '.join(OBJECTIVES)}")


def _better(objective: str, a: Candidate, b: Candidate | None) -> bool:
    if b is None:
        return True
    ka = (score(objective, a.step_time_s, a.energy_j), a.step_time_s, a.energy_j)
    kb = (score(objective, b.step_time_s, b.energy_j), b.step_time_s, b.energy_j)
    return ka < kb


# The search's work is bounded by the problem's size (issue 10): the tables hold
# (L+1)^2 cells for each of the N^2/2 runs of devices, and each DP run touches them all,
# so the search refuses up front past MAX_TABLE_CELLS = N^2 (L+1)^2 and stops past
# MAX_SEARCH_CELLS summed over its DP runs, with a one-line PlanError naming the limit
# and the fix.
MAX_TABLE_CELLS = 1 << 24
MAX_SEARCH_CELLS = 5 * 10**8
_TOO_BIG = ("plan with fewer micro-batch counts (edgepool plan --max-microbatches N), fewer devices or layers, "
            "or give a plan file (--plan)")


class _Search:
    def __init__(self, pool: PoolSpec, profile: ModelProfile, shape: Shape, *, max_microbatches: int | None,
                 network: Network | None, family: str | None, recompute: bool = False, without: tuple[str, ...] = ()):
        n, L = len(pool.devices), profile.num_layers
        if n * n * (L + 1) ** 2 > MAX_TABLE_CELLS:
            raise PlanError(f"{n} devices x {L} layers is past the planner's limit of N^2 (L+1)^2 <= {MAX_TABLE_CELLS} "
                            f"table cells (here {n * n * (L + 1) ** 2}); plan for fewer devices or layers, or give a plan file (--plan)")
        self.cells = 0
        self.pool, self.profile, self.shape = pool, profile, shape
        self.net = network or Network.of(pool)
        self.space = Space.build(pool, profile, shape, schedule="1f1b", objective="time", family=family,
                                 max_microbatches=max_microbatches, recompute=recompute, without=without)
        self.tables = Tables(self.space, self.net)
        self.max_modes = {d.name: mode_options(d, "time")[0] for d in pool.devices}
        self.full_params = sum(lp.params_at() for lp in profile.blocks) + profile.embed.params_at() + \
            profile.head.params_at()
        self.dp_runs = 0
        self.coarse = False  # a DP run merged boundary classes (``dp.MAX_DP_CELLS``): not exact
        self.evaluated = 0
        self.explored: list[Candidate] = []
        self.infeasible: list[Candidate] = []
        self._prefix_tables: dict[int, Tables] = {}
        self.family_short: dict[str, tuple[float, str]] = {}  # closest memory miss per family
        self._sims: dict[str, tuple[Plan, SimResult]] = {}
        self.sim_s = 0.0

    # -- evaluation ----------------------------------------------------------------------
    def evaluate(self, plan: Plan) -> Candidate:
        self.evaluated += 1
        return Candidate(plan, estimate(plan, self.pool, self.profile, self.shape, network=self.net))

    def simulated(self, c: Candidate) -> Candidate:
        """``c`` with the simulator's step (cached by plan id), its plan with the shorter
        pass order (``sim.engine.best_order``: a 1F1B plan may come back with
        ``pass_times``); as it is when the plan is past the simulator's size limit
        (``sim.engine.MAX_SIM_OPS``)."""
        if c.sim is None and sim_size(c.plan) <= MAX_SIM_OPS:
            got = self._sims.get(c.plan.plan_id)
            if got is None:
                t0 = time.perf_counter()
                got = self._sims[c.plan.plan_id] = best_order(c.plan, self.pool, self.profile, self.shape,
                                                              network=self.net)
                self.sim_s += time.perf_counter() - t0
            c = replace(c, plan=got[0], sim=got[1])
        return c

    def from_dp(self, res: dpmod.DPResult, M: int, modes: dict[str, str]) -> Plan:
        sp = self.space
        stages = []
        for st in res.stages:
            s = sp.stage((st.l0, st.l1), st.mode, list(sp.order[st.a:st.b]), modes, M)
            assert s is not None
            stages.append(s)
        return sp.make_plan(stages, M, {n: modes[n] for s in stages for n in s.devices})

    # -- pipelines of dp/fsdp groups: DP + branch and bound over the period cap ----------
    def best_for_m(self, M: int, incumbent: float, *, pp_only: bool = False, min_stages: int = 1,
                   n_devices: int | None = None, modes: dict[str, str] | None = None) -> Candidate | None:
        """The least step time over pipelines of dp/fsdp groups with M micro-batches (exact),
        with every device in ``modes`` (default: maximum modes)."""
        modes = modes or self.max_modes
        tables = self.tables
        if n_devices is not None and n_devices < len(self.space.order):
            if n_devices not in self._prefix_tables:
                sub = replace(self.space, order=self.space.order[:n_devices])
                self._prefix_tables[n_devices] = Tables(sub, self.net)
            tables = self._prefix_tables[n_devices]

        def run(X: float, kind: str = "sum", bound: float = INF, relaxed: bool = False,
                max_stages: int | None = None) -> dpmod.DPResult | None:
            self.dp_runs += 1
            self.cells += len(tables.space.order) ** 2 * (self.profile.num_layers + 1) ** 2
            if self.cells > MAX_SEARCH_CELLS:
                raise PlanError(f"the planner's search passed its work limit of {MAX_SEARCH_CELLS:.0e} table cells "
                                f"after {self.dp_runs} DP runs over {len(self.pool.devices)} devices, "
                                f"{self.profile.num_layers} layers and {len(self.space.microbatches)} micro-batch "
                                f"counts; {_TOO_BIG}")
            res = dpmod.solve(tables, M, modes, X=X, kind=kind, pp_only=pp_only, min_stages=min_stages,
                              max_stages=max_stages, bound=bound, relaxed=relaxed)
            self.coarse = self.coarse or (res is not None and res.coarse)
            return res

        if incumbent < INF:  # a cheap lower bound first: can this M beat the incumbent at all?
            lb = run(INF, bound=incumbent, relaxed=True)
            if lb is None or lb.value >= incumbent * (1 - 1e-12):
                return None
        r0 = run(INF, bound=incumbent)
        if r0 is None:
            return None
        best = self.evaluate(self.from_dp(r0, M, modes))
        self.explored.append(best)
        best_T = min(incumbent, best.step_time_s)
        flow_min = _flow_shop_s(best.cost)
        if M == 1 or r0.value >= best_T * (1 - 1e-12):
            return best
        lo = run(INF, "max")
        x_lo = lo.value if lo is not None else best.cost.period_s
        # Descend the (tau, period) staircase: the next cap is just below the period of
        # the last plan found, so every run finds a new Pareto point (a plan with a
        # shorter period and a larger tau). Stop when no plan with a period in
        # [x_lo, cap) can beat the best time: tau + (M-1) x_lo >= best_T.
        t, b = r0.value, best.cost.period_s
        while True:
            b = min(b, (best_T - t) / (M - 1))
            if b <= x_lo or t + (M - 1) * x_lo >= best_T * (1 - 1e-12):
                break
            cap = b * (1 - 1e-9)
            r = run(cap, bound=best_T)
            if r is None:
                break
            cand = self.evaluate(self.from_dp(r, M, modes))
            self.explored.append(cand)
            flow_min = min(flow_min, _flow_shop_s(cand.cost))
            if cand.step_time_s < best.step_time_s:
                best = cand
                best_T = min(best_T, cand.step_time_s)
            t, b = r.value, min(cand.cost.period_s, cap)
        # Every plan takes at least its flow-shop term, and the descent saw the least
        # one that could matter: if the best time equals it, the channel term decides
        # nothing and the best plan is optimal.
        if best_T <= flow_min * (1 + 1e-12):
            return best
        # On a shared medium the channel term M * chan grows with the number of stages S
        # (chan = 2 S base), so the least-tau plan with at most S stages is a candidate
        # for every S whose channel term alone does not already exceed the best time.
        # Fewer stages only raise the least tau, so the caps go down from the best plan's
        # stage count until the flow-shop bound of the least tau reaches the best time.
        base = tables.base(M)
        if base > 0:
            for s_cap in range(len(best.plan.stages) - 1, max(2, min_stages) - 1, -1):
                if M * 2 * s_cap * base >= best_T * (1 - 1e-12):
                    continue
                r = run(INF, bound=best_T, max_stages=s_cap)
                if r is None or r.value + (M - 1) * x_lo >= best_T * (1 - 1e-12):
                    break
                cand = self.evaluate(self.from_dp(r, M, modes))
                self.explored.append(cand)
                if cand.step_time_s < best.step_time_s:
                    best, best_T = cand, min(best_T, cand.step_time_s)
        if best.cost.bottleneck == "shared channel":
            best = self.shift_boundaries(best, M, modes)
        return best

    def shift_boundaries(self, best: Candidate, M: int, modes: dict[str, str]) -> Candidate:
        """Local search for a channel-bound pipeline: move one layer boundary between
        two stages by one block while that lowers the step time.

        The DP minimises ``tau`` for a period cap; when the channel term decides, the
        best plan trades ``tau`` against stage 0's work (``dp`` module docstring), which
        the DP does not see, and the optimum sits next to the DP's plan.
        """
        index = {d.name: i for i, d in enumerate(self.space.order)}
        if any(st.mode not in PIPELINE_MODES for st in best.plan.stages):
            return best
        stages = [dpmod.DPStage(index[st.devices[0]], index[st.devices[-1]] + 1, st.layers[0], st.layers[1], st.mode)
                  for st in best.plan.stages]
        improved = True
        while improved:
            improved = False
            for i in range(len(stages) - 1):
                for step in (-1, 1):
                    cut = stages[i].l1 + step
                    if not stages[i].l0 < cut < stages[i + 1].l1:
                        continue
                    moved = list(stages)
                    moved[i] = replace(stages[i], l1=cut)
                    moved[i + 1] = replace(stages[i + 1], l0=cut)
                    built = [self.space.stage((st.l0, st.l1), st.mode, list(self.space.order[st.a:st.b]), modes, M)
                             for st in moved]
                    if any(b is None for b in built):
                        continue
                    cand = self.evaluate(self.space.make_plan(built, M, {n: modes[n] for b in built for n in b.devices}))
                    self.explored.append(cand)
                    if cand.cost.feasible and cand.step_time_s < best.step_time_s * (1 - 1e-12):
                        best, stages, improved = cand, moved, True
        return best

    # -- single-stage plans ----------------------------------------------------------------
    def single_stage(self, modes_allowed: tuple[str, ...]) -> dict[str, Candidate | None]:
        """Best single-stage plan per family: "single" (one device), and each allowed mode
        (2+ devices).

        The pipeline mode (dp) uses the closed form of ``tables``; every other mode is
        evaluated with the cost model unless its lower bound (the mode's
        ``single_stage_bound``: exact compute of the split, plus the group's collectives
        and sync) exceeds the family's best.
        """
        sp, prof, shape, net = self.space, self.profile, self.shape, self.net
        order = list(sp.order)
        N, L, T = len(order), prof.num_layers, shape.seq_len
        best: dict[str, Candidate | None] = {m: None for m in ("single",) + modes_allowed}
        best_t: dict[str, tuple[float, int, int, int] | None] = {m: None for m in ("single",) + PIPELINE_MODES}
        bound_in = bound_inputs(prof, T, sp.recompute)
        # What the model may use: the cap less the framework's own resident memory.
        caps = {d.name: memory_cap_bytes(d) - prof.runtime_bytes for d in order}
        speed = {d.name: sp.speed(d, self.max_modes[d.name]) for d in order}
        for M in sp.microbatches:
            mb = shape.global_batch // M
            for a in range(N):
                for b in range(a + 1, N + 1):
                    n = b - a
                    names = [d.name for d in order[a:b]]
                    # Pipeline modes (dp, fsdp) have the closed form of ``tables``.
                    for fam, mode_name in ([("single", PIPELINE_MODE)] if n == 1 else
                                           [(m, m) for m in PIPELINE_MODES if m in modes_allowed]):
                        g = self.tables.group(a, b, M, {x: self.max_modes[x] for x in names}, mode_name)
                        if g is not None:
                            t_, _, fits = self.tables.single(g, M)
                            if fits and (best_t[fam] is None or t_ < best_t[fam][0]):
                                best_t[fam] = (t_, a, b, M)
                    if n == 1:
                        continue
                    speeds = [speed[x] for x in names]
                    for name in modes_allowed:
                        mode = modes_mod.get(name)
                        if mode.in_pipelines:
                            continue
                        counts = sp.shares(name, order[a:b], self.max_modes, M)
                        if counts is None:
                            continue
                        per, per_mb, once, miss = mode.single_stage_bound(bound_in, counts, speeds, names, caps, mb,
                                                                          net, prof.reference_speed)
                        if miss is not None:
                            need, x = miss
                            short = (need / max(caps[x], 1.0), f"needs at least {need / 1e9:.2f} GB on {x}, which has "
                                                               f"{caps[x] / 1e9:.2f} GB free for training")
                            prev = self.family_short.get(name)
                            if prev is None or short[0] < prev[0]:
                                self.family_short[name] = short
                            continue
                        lb = M * (max(per) + per_mb) + once
                        cur = best[name]
                        if cur is not None and lb >= cur.step_time_s:
                            continue
                        st = sp.stage((0, L), name, order[a:b], self.max_modes, M)
                        if st is None:
                            continue
                        cand = self.evaluate(sp.make_plan([st], M, {x: self.max_modes[x] for x in names}))
                        if not cand.cost.feasible:
                            self.infeasible.append(cand)
                            continue
                        if cur is None or cand.step_time_s < cur.step_time_s:
                            best[name] = cand
        for fam, bt in best_t.items():
            if bt is not None:
                _, a, b, M = bt
                st = sp.stage((0, L), PIPELINE_MODE if fam == "single" else fam, order[a:b], self.max_modes, M)
                best[fam] = self.evaluate(sp.make_plan([st], M, {x.name: self.max_modes[x.name] for x in order[a:b]}))
        for m in PIPELINE_MODES:
            if m not in modes_allowed:
                best.pop(m, None)
        return best

    def uniform_pp(self) -> Candidate | None:
        """Galaxy's baseline: every device one stage, blocks split evenly, best M."""
        sp = self.space
        order = list(sp.order)
        L = self.profile.num_layers
        S = min(len(order), L)
        if S < 2:
            return None
        counts = split_counts(L, [1.0] * S)
        best = None
        for M in sp.microbatches:
            stages, start = [], 0
            for d, c in zip(order[:S], counts):
                stages.append(StagePlan(layers=(start, start + c), devices=(d.name,)))
                start += c
            cand = self.evaluate(sp.make_plan(stages, M, {}))
            if not cand.cost.feasible:
                self.infeasible.append(cand)
                continue
            if best is None or cand.step_time_s < best.step_time_s:
                best = cand
        return best


def bound_inputs(prof: ModelProfile, seq_len: int, recompute: bool = False) -> BoundInputs:
    """The whole-model aggregates of the modes' single-stage bounds (``modes.base``).
    With ``recompute`` a block keeps its input only and runs its forward twice (the
    block rebuilt in the backward is left out: still a lower bound)."""
    T, blocks = seq_len, prof.blocks
    emb, head = prof.embed, prof.head
    r = int(recompute)
    kept = {"a_rep": prof.num_layers * prof.act_elem_bytes, "a_split": 0.0} if recompute else {
        "a_rep": sum(lp.act_bytes.rep for lp in blocks),
        "a_split": sum(lp.act_bytes.head + lp.act_bytes.ffn + lp.act_bytes.quad * T for lp in blocks)}
    return BoundInputs(
        seq_len=T, num_layers=prof.num_layers,
        fix=sum((1 + r) * lp.fixed_fwd_s + lp.fixed_bwd_s for lp in blocks),
        comp={k: sum((1 + r) * getattr(lp.fwd_s, k) + getattr(lp.bwd_s, k) for lp in blocks)
              for k in ("rep", "head", "ffn", "quad")},
        own_fix=emb.fixed_fwd_s + emb.fixed_bwd_s + head.fixed_fwd_s + head.fixed_bwd_s,
        own_tok=emb.fwd_s.total(T) + emb.bwd_s.total(T) + head.fwd_s.total(T) + head.bwd_s.total(T),
        p_rep=sum(lp.params_bytes.rep for lp in blocks),
        p_split=sum(lp.params_bytes.head + lp.params_bytes.ffn for lp in blocks), **kept,
        max_block_params=max(lp.params_at() for lp in blocks),
        owner_params=emb.params_at() + head.params_at(), owner_unit_params=max(emb.params_at(), head.params_at()),
        # parameters, and gradients and optimizer state of the trainable share: with the
        # least trainable fraction of any unit, a lower bound on every device's state
        opt_f=1 + (1 + prof.opt_state_factor) * min(lp.trainable_frac for lp in (emb, head, *blocks)),
        act_elem_bytes=prof.act_elem_bytes, kv_row_bytes=prof.dims.kv_dim * prof.dtype_bytes,
        p_train=sum(lp.trainable_at() for lp in blocks), wire_row_bytes=prof.wire_row_bytes,
        p_sync=sum(lp.sync_at() for lp in blocks))


def _flow_shop_s(c: PlanCost) -> float:
    """The step time without the shared channel's term (``cost.model``): a lower bound."""
    return c.fill_s + (c.num_microbatches - 1) * c.period_s + c.sync_s + c.optim_s


# -- explanations ------------------------------------------------------------------------------
def explain(c: Candidate, best: Candidate, objective: str) -> str:
    """Why a baseline lost to the chosen plan, in one line with the numbers.

    The baseline's step time is split into gradient all-reduce, per-block collectives,
    boundary transfers (including the shared channel when it is the bottleneck) and the
    rest (compute and pipeline bubbles); the largest part is named.
    """
    k = c.cost
    M = k.num_microbatches
    ratio = score(objective, c.step_time_s, c.energy_j) / max(1e-30, score(objective, best.step_time_s, best.energy_j))
    coll = M * sum(sc.coll_fwd_s + sc.coll_bwd_s for sc in k.stages)
    links = sum(lk.fwd_s + lk.bwd_s for lk in k.links)
    if k.bottleneck == "shared channel":
        links = M * k.chan_s
    elif k.bottleneck.startswith("boundary"):
        links += (M - 1) * k.period_s
    parts = {"gradient all-reduce": k.sync_s, "per-block tp/sp collectives": coll,
             "activation transfers between stages": links}
    T = c.step_time_s
    parts["compute and pipeline bubbles"] = max(0.0, T - sum(parts.values()))
    main, main_s = max(parts.items(), key=lambda kv: kv[1])
    what = {"time": "step time", "energy": "energy", "edp": "energy x time"}[objective]
    src = "" if c.sim is not None else f"; cost model, not simulated: over {BASELINE_SIM_FACTOR:g}x behind"
    return (f"{what} x{ratio:.2f} the chosen plan's ({T:.3g} s, {c.energy_j:.3g} J per step{src}); "
            f"{main} take {main_s:.3g} s ({100 * main_s / T:.0f}% of its step)")


def _closest_infeasible(search: _Search, deadline: float | None, cands: list[Candidate]) -> list[tuple[str, str]]:
    out = []
    seen = set()
    pool = sorted(search.infeasible, key=lambda c: max(
        d.memory_bytes / max(d.memory_cap_bytes, 1.0) for d in c.cost.devices.values()))
    for c in pool:
        if c.plan.plan_id in seen:
            continue
        seen.add(c.plan.plan_id)
        out.append((f"{c.plan.parallelism} over {', '.join(c.plan.devices)} (M={c.plan.num_microbatches})",
                    "; ".join(c.cost.memory_violations())))
        if len(out) >= 3:
            break
    if deadline is not None:
        for c in sorted(cands, key=lambda c: c.step_time_s)[:2]:
            out.append((f"{c.plan.parallelism} over {', '.join(c.plan.devices)} (M={c.plan.num_microbatches})",
                        f"takes {c.step_time_s:.3g} s per step, over the deadline of {deadline:.3g} s"))
    return out


def _probe_memory(search: _Search) -> None:
    """When nothing fits, build the lightest plans so the error can name the numbers."""
    sp = search.space
    order = list(sp.order)
    L = search.profile.num_layers
    M = max(sp.microbatches)
    for d in order:
        st = StagePlan(layers=(0, L), devices=(d.name,))
        search.infeasible.append(search.evaluate(sp.make_plan([st], M, {})))
    S = min(len(order), L)
    if S >= 2:
        counts = split_counts(L, [1.0] * S)
        stages, start = [], 0
        for d, c in zip(order[:S], counts):
            stages.append(StagePlan(layers=(start, start + c), devices=(d.name,)))
            start += c
        search.infeasible.append(search.evaluate(sp.make_plan(stages, M, {})))


# -- the entry point -----------------------------------------------------------------------------
def plan(pool: PoolSpec, job, profile: ModelProfile, objective: str = "time", deadline_s: float | None = None,
         family: str | None = None, *, max_microbatches: int | None = None, network: Network | None = None,
         shape: Shape | None = None, explore_modes: bool | None = None, recompute: bool = True,
         without: tuple[str, ...] = ()) -> PlanResult:
    """The best plan for ``objective`` (see the module docstring).

    ``recompute``: the search may turn activation recomputation on where no plan fits
    without it; ``without``: modes to leave out of the search (``("fsdp",)``).

    ``job``: a ``JobSpec`` (global batch and sequence length come from ``job.train``);
    ``shape`` overrides it. ``family``: restrict to one plain family (dp, sp, tp, pp).
    ``explore_modes``: also search power modes for the frontier (default: only for the
    energy objectives and deadlines; the time objective needs maximum modes only).
    """
    t_start = time.perf_counter()
    if objective not in OBJECTIVES:
        raise PlanError(f"unknown objective {objective!r}; known: {', '.join(OBJECTIVES)}")
    if family is not None and family not in FAMILIES:
        raise PlanError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    if deadline_s is not None and not 0 < deadline_s < 1e9:
        raise PlanError(f"deadline {deadline_s} must be a finite number of seconds > 0")
    if max_microbatches is not None and max_microbatches < 1:
        raise PlanError(f"--max-microbatches {max_microbatches} must be at least 1")
    if shape is None:
        shape = shape_for(profile, job.train.global_batch, job.train.seq_len)
    notes: list[str] = []
    if job is not None and getattr(job.train, "optimizer", profile.optimizer) != profile.optimizer:
        notes.append(f"profile assumes optimizer {profile.optimizer}, the job uses {job.train.optimizer}")

    # 1. Time search; when nothing fits, again with every stage recomputing its
    # activations (``Space.recompute``), and the rest of the planning in that space.
    if family is not None and family in without:
        raise PlanError(f"family {family!r} is left out of the search (without={list(without)})")
    search = _Search(pool, profile, shape, max_microbatches=max_microbatches, network=network, family=family,
                     without=without)
    fastest, singles = _time_search(search, family)
    recomputed = False
    if fastest is None and recompute:
        again = _Search(pool, profile, shape, max_microbatches=max_microbatches, network=network, family=family,
                        recompute=True, without=without)
        fastest, singles = _time_search(again, family)
        if fastest is not None:
            search, recomputed = again, True
    sp = search.space

    # 2. Baselines.
    baselines: dict[str, Baseline] = {}
    if family is None:
        fam_best = {k: v for k, v in singles.items() if k != "single"}
        fam_best["pp-uniform"] = search.uniform_pp()
        for fam, c in fam_best.items():
            baselines[fam] = Baseline(fam, c, "")

    if fastest is None:
        _probe_memory(search)
        raise InfeasibleError(
            f"no plan fits this pool for {profile.model} at global batch {shape.global_batch}, seq {shape.seq_len}"
            f"{f' (family {family})' if family else ''}{', even with activation recomputation' if recompute else ''}; "
            "add memory or devices, or lower the batch or sequence.",
            _closest_infeasible(search, None, []))

    # 3. Energy objectives (and the frontier): power modes over candidate structures.
    exact = objective == "time" and not search.coarse
    if search.coarse:
        notes.append(f"the pool has more boundary classes than the planner's tables hold ({dpmod.MAX_DP_CELLS} cells); "
                     "some were merged, pricing their links at the worst of each merged set: the plan is feasible "
                     "but may not be the cost model's optimum")
    cands: list[Candidate] = [c for c in search.explored if c.cost.feasible] + [fastest]
    cands += [b.candidate for b in baselines.values() if b.candidate is not None]
    if recomputed:  # a stage that fits without recomputing does not (each its own choice)
        cands = [_relax(search, c) for c in cands]
    time_cands = _dedupe(cands)  # what the time objective ranks (below: its finalists run for every objective)
    if explore_modes if explore_modes is not None else objective != "time" or deadline_s is not None:
        cands += _energy_candidates(search, fastest, family, objective, deadline_s)
    cands = _dedupe(cands)

    model_best = _best(objective, cands, deadline_s)

    # 4. Finalists: the cost model's best plans (and its frontier) run in the simulator,
    # whose step decides, deadline included. The time objective's finalists run for
    # every objective, so a deadline set from the fastest plan's simulated time is met.
    simulated = _finalists(search, time_cands, "time", None)
    simulated += [search.simulated(c) for c in _spread(frontier(time_cands), FRONTIER_SIMS)]
    if objective != "time" or deadline_s is not None or len(cands) > len(time_cands):
        simulated += _finalists(search, cands, objective, deadline_s)
        simulated += [search.simulated(c) for c in _spread(frontier(cands), FRONTIER_SIMS)]
    simulated = _dedupe(simulated)
    pick = _best(objective, simulated, deadline_s)
    if pick is None:
        raise InfeasibleError(f"no plan meets the deadline of {deadline_s:.3g} s per step; the fastest plan takes "
                              f"{min(c.step_time_s for c in simulated):.3g} s (simulated). Relax the deadline or add "
                              "devices.", _closest_infeasible(search, deadline_s, simulated))
    front = frontier(simulated)
    for fam, bl in list(baselines.items()):
        c = bl.candidate
        if c is None:
            baselines[fam] = Baseline(fam, None, _no_family_reason(search, fam))
            continue
        if c.step_time_s <= BASELINE_SIM_FACTOR * pick.step_time_s:
            c = search.simulated(c)
        if c.plan.plan_id == pick.plan.plan_id:
            baselines[fam] = Baseline(fam, c, "this is the chosen plan")
        else:
            baselines[fam] = Baseline(fam, c, explain(c, pick, objective))
    final = pick.plan.with_estimate((pick.sim or pick.cost).to_estimate(objective))
    if recomputed:
        on = [str(i) for i, st in enumerate(final.stages) if st.recompute]
        notes.append(f"activation recomputation on in stage(s) {', '.join(on)}: no plan fits this pool's memory "
                     "without it; stages that fit without it keep their activations (faster)")
    if pick.sim is None:
        notes.append(f"the plan is past the simulator's limit of {MAX_SIM_OPS} devices x micro-batches; "
                     "its estimate is the cost model's")
    stats = {"elapsed_s": time.perf_counter() - t_start, "dp_runs": search.dp_runs, "plans_evaluated": search.evaluated,
             "plans_simulated": len(search._sims), "simulate_s": search.sim_s,
             "microbatch_counts": list(sp.microbatches), "devices": len(pool.devices), "layers": profile.num_layers,
             "notes": notes}
    return PlanResult(plan=final, cost=pick.cost, objective=objective, deadline_s=deadline_s, frontier=tuple(front),
                      baselines=baselines, exact=exact, model_best=model_best, stats=stats)


def _time_search(search: _Search, family: str | None) -> tuple[Candidate | None, dict[str, Candidate | None]]:
    """The fastest plan of the search's space by the cost model (pipelines of dp/fsdp
    groups for every M, then single stages of every mode), and the best of each family."""
    sp = search.space
    best: Candidate | None = None
    if family in (None, "pp"):
        for M in sorted(sp.microbatches, reverse=True):  # deep pipelines first: a good incumbent early
            c = search.best_for_m(M, best.step_time_s if best else INF, pp_only=family == "pp",
                                  min_stages=2 if family == "pp" else 1)
            if c is not None and c.cost.feasible and (best is None or c.step_time_s < best.step_time_s):
                best = c
    single_modes = modes_mod.NAMES if family is None else ((family,) if family in modes_mod.NAMES else ())
    single_modes = tuple(m for m in single_modes if m not in sp.without)
    singles = search.single_stage(single_modes) if single_modes else {}
    if family is not None:
        singles.pop("single", None)
    for c in singles.values():
        if c is not None and (best is None or c.step_time_s < best.step_time_s):
            best = c
    return best, singles


def _relax(search: _Search, c: Candidate) -> Candidate:
    """``c`` with recomputation turned off, stage by stage, wherever the plan still fits
    and the cost model's step gets no slower."""
    for s, st in enumerate(c.plan.stages):
        if not st.recompute:
            continue
        stages = list(c.plan.stages)
        stages[s] = st.model_copy(update={"recompute": False})
        t = search.evaluate(c.plan.model_copy(update={"stages": tuple(stages)}))
        if t.cost.feasible and t.step_time_s <= c.step_time_s:
            c = t
    return c


def _best(objective: str, cands: list[Candidate], deadline_s: float | None) -> Candidate | None:
    pick = None
    for c in cands:
        if deadline_s is None or c.step_time_s <= deadline_s * (1 + 1e-12):
            if _better(objective, c, pick):
                pick = c
    return pick


def _spread(items: list, n: int) -> list:
    """At most ``n`` of ``items``, evenly spaced, the first and last included."""
    if len(items) <= n:
        return list(items)
    return [items[round(i * (len(items) - 1) / (n - 1))] for i in range(n)]


def _gpipe_twin(search: _Search, c: Candidate) -> Candidate | None:
    """The same structure under GPipe, when it fits (it keeps all M micro-batches)."""
    if len(c.plan.stages) < 2 or c.plan.schedule != "1f1b" or c.plan.num_microbatches < 2:
        return None
    twin = search.evaluate(Plan.model_validate({**c.plan.model_dump(exclude={"estimate"}), "schedule": "gpipe"}))
    return twin if twin.cost.feasible else None


def _finalists(search: _Search, cands: list[Candidate], objective: str, deadline_s: float | None) -> list[Candidate]:
    """Simulate the cost model's best plans by the objective, and the GPipe twin of each
    1F1B pipeline among them, until ``FINALISTS`` of them meet the deadline in the
    simulator (or ``MAX_SIMULATED`` have run).

    Under a deadline, a plan whose structure (stages, M, schedule) was simulated in
    another power-mode assignment is skipped without a run when that structure's
    simulator/cost-model ratio puts it over the deadline: the two models differ by tens
    of percent on pipelines, in both directions, but alike across power modes. If no
    simulated plan meets the deadline, the ``FINALISTS`` fastest plans by the cost model
    run as well.
    """
    def key(c: Candidate):
        return score(objective, c.cost.step_time_s, c.cost.energy_j), c.cost.step_time_s, c.cost.energy_j

    def meets(c: Candidate) -> bool:
        return deadline_s is None or c.step_time_s <= deadline_s * (1 + 1e-12)

    ratio: dict[tuple, float] = {}
    finals: list[Candidate] = []

    def run(c: Candidate) -> None:
        for x in (c, _gpipe_twin(search, c)):
            if x is not None:
                sx = search.simulated(x)
                ratio.setdefault((x.plan.stages, x.plan.num_microbatches, x.plan.schedule),
                                 sx.step_time_s / x.cost.step_time_s)
                finals.append(sx)

    for c in sorted(cands, key=key):
        if sum(map(meets, finals)) >= FINALISTS or len(finals) >= MAX_SIMULATED:
            break
        r = ratio.get((c.plan.stages, c.plan.num_microbatches, c.plan.schedule))
        if deadline_s is not None and r is not None and c.cost.step_time_s * r > deadline_s * (1 + 1e-12):
            continue
        run(c)
    if not any(map(meets, finals)):
        for c in sorted(cands, key=lambda c: c.cost.step_time_s)[:FINALISTS]:
            run(c)
    return _dedupe(finals)


def _dedupe(cands: list[Candidate]) -> list[Candidate]:
    seen, out = set(), []
    for c in cands:
        if c.plan.plan_id not in seen and c.cost.feasible:
            seen.add(c.plan.plan_id)
            out.append(c)
    return out


def _no_family_reason(search: _Search, fam: str) -> str:
    n = len(search.pool.devices)
    if fam in modes_mod.NAMES and n < 2:
        return f"{fam} needs at least 2 devices"
    if fam == "pp-uniform" and min(n, search.profile.num_layers) < 2:
        return "pp needs at least 2 devices and 2 blocks"
    if fam in search.family_short:
        return "no plan of this family fits: " + search.family_short[fam][1]
    bad = [c for c in search.infeasible if (c.plan.parallelism == fam or (fam == "pp-uniform" and c.plan.parallelism == "pp"))]
    if bad:
        worst = min(bad, key=lambda c: max(d.memory_bytes / max(d.memory_cap_bytes, 1.0) for d in c.cost.devices.values()))
        return "no plan of this family fits: " + "; ".join(worst.cost.memory_violations()[:2])
    return "no plan of this family fits the pool"


def _refine(search: _Search, c: Candidate, etables: Tables, energy_space: Space) -> list[Candidate]:
    """Every Pareto-optimal power-mode assignment of a candidate's structure."""
    sp = search.space
    plan = c.plan
    index = {d.name: i for i, d in enumerate(sp.order)}
    out: list[Candidate] = []
    contiguous = all([index[n] for n in st.devices] == list(range(index[st.devices[0]], index[st.devices[0]] + len(st.devices)))
                     for st in plan.stages)
    if all(st.mode == PIPELINE_MODE for st in plan.stages) and contiguous:
        stages = [(index[st.devices[0]], index[st.devices[0]] + len(st.devices), st.layers[0], st.layers[1])
                  for st in plan.stages]
        for ch in frontier(mode_choices(etables, stages, plan.num_microbatches, "energy")):
            stplans = [energy_space.stage((l0, l1), PIPELINE_MODE, list(sp.order[a:b]), ch.modes, plan.num_microbatches)
                       for a, b, l0, l1 in stages]
            out.append(search.evaluate(energy_space.make_plan(stplans, plan.num_microbatches, ch.modes)))
    elif len(plan.stages) == 1:
        st = plan.stages[0]
        devs = [d for d in sp.order if d.name in st.devices]
        for modes in group_mode_assignments(devs, "energy"):
            s2 = energy_space.stage(st.layers, st.mode, devs, modes, plan.num_microbatches)
            if s2 is not None:
                out.append(search.evaluate(energy_space.make_plan([s2], plan.num_microbatches, modes)))
    return [x for x in out if x.cost.feasible]


def _energy_candidates(search: _Search, fastest: Candidate, family: str | None, objective: str,
                       deadline_s: float | None, rounds: int = 2) -> list[Candidate]:
    """Structures from the time search, with every Pareto-optimal power-mode assignment.

    Then a descent over kind-level modes: lower one kind's mode everywhere, re-run the
    time search (so blocks move away from the slowed devices), refine modes per group,
    keep the change if the objective improves; at most ``rounds`` passes.
    """
    sp = search.space
    structures: dict[str, Candidate] = {}
    for c in search.explored + [fastest]:
        if c.cost.feasible:
            structures[c.plan.plan_id] = c
    pipelines = family in (None, "pp")
    M0 = fastest.plan.num_microbatches
    ms = [m for m in sp.microbatches if m in (M0 // 2, M0, 2 * M0)] or list(sp.microbatches)
    if pipelines:  # fewer devices: the fastest plan without the slowest kinds
        kinds_in_order: list[str] = []
        for d in sp.order:
            if d.kind not in kinds_in_order:
                kinds_in_order.append(d.kind)
        for keep in range(1, len(kinds_in_order)):
            n_dev = sum(1 for d in sp.order if d.kind in kinds_in_order[:keep])
            for M in ms:
                c = search.best_for_m(M, INF, pp_only=family == "pp", min_stages=2 if family == "pp" else 1,
                                      n_devices=n_dev)
                if c is not None and c.cost.feasible:
                    structures[c.plan.plan_id] = c
    energy_space = replace(sp, objective="energy", _speeds=sp._speeds)
    etables = Tables(energy_space, search.net)
    out: list[Candidate] = []
    for c in structures.values():
        out += _refine(search, c, etables, energy_space)
    if not pipelines or not out:
        return out

    def ok(c: Candidate) -> bool:
        return deadline_s is None or c.step_time_s <= deadline_s * (1 + 1e-12)

    def best_of(cs: list[Candidate]) -> Candidate | None:
        pick = None
        for c in cs:
            if ok(c) and _better(objective, c, pick):
                pick = c
        return pick

    current = best_of(out)
    if current is None:
        return out
    assign = dict(search.max_modes)
    used = {d.kind for d in sp.order if d.name in fastest.plan.devices}
    for _ in range(rounds):
        trials: list[tuple[dict[str, str], Candidate]] = []
        for kind in sorted(used):
            devs = [d for d in sp.order if d.kind == kind and d.power_mode is None]
            if not devs:
                continue
            modes_k = sorted(catalog.get(kind).power_modes, key=lambda m: -m.compute_fraction)
            for m in modes_k:
                if m.name == assign[devs[0].name]:
                    continue
                trial = dict(assign)
                trial.update({d.name: m.name for d in devs})
                for M in ms:
                    c = search.best_for_m(M, INF, pp_only=family == "pp", min_stages=2 if family == "pp" else 1,
                                          modes=trial)
                    if c is not None and c.cost.feasible:
                        for r in _refine(search, c, etables, energy_space) + [c]:
                            out.append(r)
                            trials.append((trial, r))
        pick = best_of([r for _, r in trials])
        if pick is None or not _better(objective, pick, current):
            break
        current = pick
        assign = next(t for t, r in trials if r is pick)
    return out


# -- used by the launcher -------------------------------------------------------------------------
def job_model_dims(job):
    """The job's model dimensions (reads its tokenizer; no torch)."""
    from edgepool.cost.profile import ModelDims
    from edgepool.models.config import job_model_config

    return ModelDims.of(job_model_config(job))


def job_profile(job):
    """The analytic profile ``train`` plans ``job`` with: its model, optimizer and
    precision, and its in-memory backups (``cost.profile.for_job``)."""
    from edgepool.cost.profile import analytic_profile, for_job

    return for_job(analytic_profile(job_model_dims(job), optimizer=job.train.optimizer,
                                    precision=job.train.precision), job)


def plan_for_run(pool: PoolSpec, job, family: str | None = None, objective: str = "time",
                 profile: ModelProfile | None = None) -> Plan:
    """The planner's best plan for a run (used by ``launch.prepare`` for ``--parallelism auto``),
    priced with ``profile`` (``launch.speeds.run_profile``; default the analytic ``job_profile``)."""
    return plan(pool, job, profile if profile is not None else job_profile(job), objective=objective,
                family=family).plan
