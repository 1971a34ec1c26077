"""The cost model: profiles, network formulas, and time/memory/energy of plans."""

from __future__ import annotations

import json

import pytest

from _plan_helpers import bert_base, make_pool, tiny
from edgepool.cost import (ModelDims, ModelProfile, Network, analytic_profile, device_speed, estimate,
                           memory_cap_bytes, shape_for)
from edgepool.cost.model import boundary_flows, device_work, group_comm
from edgepool import modes
from edgepool.cost.network import PAYLOAD_FRACTION
from edgepool.errors import PlanError, SpecError
from edgepool.specs import Plan, StagePlan
from edgepool.specs.layout import Layout


def single(name, L=12, M=1):
    return Plan(num_layers=L, stages=[StagePlan(layers=(0, L), devices=(name,))], num_microbatches=M)


def test_profile_json_round_trip(tmp_path):
    prof = bert_base()
    path = tmp_path / "p.json"
    path.write_text(prof.dumps())
    back = ModelProfile.load(path)
    assert back == prof
    data = json.loads(path.read_text())
    del data["blocks"]
    with pytest.raises(SpecError, match="blocks"):
        ModelProfile.from_json(data)


def test_analytic_profile_counts_parameters_like_the_model():
    # BERT-base: 110M parameters in the usual count (embeddings, 12 blocks, MLM head).
    prof = bert_base()
    params = sum(b.params_at() for b in prof.blocks) + prof.embed.params_at() + prof.head.params_at()
    assert 105e6 * 4 < params < 140e6 * 4
    per_block = prof.blocks[0].params_at() / 4
    assert per_block == pytest.approx(12 * 768 ** 2 + 13 * 768, rel=0.01)
    # Backward costs twice the forward; a faster reference kind gives shorter times.
    b = prof.blocks[0]
    assert b.bwd_s.total(128) == pytest.approx(2 * b.fwd_s.total(128))
    fast = analytic_profile(prof.dims, reference_kind="jetson-agx-orin")
    assert fast.blocks[0].fwd_s.total(128) < b.fwd_s.total(128)
    assert fast.reference_speed > prof.reference_speed


def test_network_point_to_point_and_shared():
    pool = make_pool(["jetson-nano"] * 3, medium="switched", bandwidth_mbps=80, latency_ms=1)
    net = Network.of(pool)
    mb = 10e6  # bytes
    # 80 Mbit/s of link rate carries 80 * 1448/1514 Mbit/s of TCP payload.
    rate = 10e6 * PAYLOAD_FRACTION
    assert net.channel_Bps == pytest.approx(rate)
    # Two transfers between different pairs run in parallel on a switch...
    t = net.transfer_time([("d0", "d1", mb), ("d2", "d0", mb)])
    assert t == pytest.approx(1e-3 + mb / rate)
    shared = Network.of(make_pool(["jetson-nano"] * 3, medium="shared", bandwidth_mbps=80, latency_ms=1))
    # ...and share the one channel on a shared medium.
    assert shared.transfer_time([("d0", "d1", mb), ("d2", "d0", mb)]) == pytest.approx(1e-3 + 2 * mb / rate)
    assert shared.airtime([("d0", "d1", mb)]) == pytest.approx(mb / rate)
    assert net.transfer_time([("d0", "d0", mb)]) == 0.0
    # Ring all-reduce: 2 (p-1)/p of the bytes through every device, 2 (p-1) steps.
    assert net.allreduce_time(["d0", "d1", "d2"], mb) == pytest.approx(4e-3 + (4 / 3) * mb / rate)
    assert shared.allreduce_time(["d0", "d1", "d2"], mb) == pytest.approx(4e-3 + 4 * mb / rate)


def test_single_device_time_is_its_compute():
    prof = bert_base()
    pool = make_pool(["jetson-orin-nano"])
    shape = shape_for(prof, 8, 128)
    c = estimate(single("d0", M=2), pool, prof, shape)
    w = device_work(single("d0", M=2), pool, prof, shape)["d0"]
    assert c.step_time_s == pytest.approx(2 * (w.fwd_s + w.bwd_s) + w.optim_s)
    assert c.devices["d0"].busy_s == pytest.approx(c.step_time_s)
    assert not c.links and c.sync_s == 0
    # Energy: busy power the whole step, no idle, no radio.
    kind_busy = 25.0  # catalog MAXN_SUPER busy_w
    assert c.energy_j == pytest.approx(kind_busy * c.step_time_s)


def test_faster_device_and_lower_power_mode():
    prof = bert_base()
    shape = shape_for(prof, 8, 128)
    t_nano = estimate(single("d0"), make_pool(["jetson-nano"]), prof, shape).step_time_s
    t_orin = estimate(single("d0"), make_pool(["jetson-orin-nano"]), prof, shape).step_time_s
    assert t_orin < t_nano
    slow = Plan(num_layers=12, stages=[StagePlan(layers=(0, 12), devices=("d0",))], power_modes={"d0": "5W"})
    c5 = estimate(slow, make_pool(["jetson-nano"]), prof, shape)
    assert c5.step_time_s > t_nano
    assert c5.devices["d0"].power_mode == "5W"
    pool = make_pool(["jetson-nano"], extra={"compute_scale": [2.0]})
    assert device_speed(pool.devices[0], "5W") == pytest.approx(2.0 * 0.694)


def test_dp_sync_and_boundaries_use_the_plan_functions():
    prof = tiny(num_layers=4, hidden=256)
    pool = make_pool(["jetson-nano", "jetson-nano", "jetson-orin-nano"], medium="switched", bandwidth_mbps=100)
    shape = shape_for(prof, 4, 64)
    dp = Plan(num_layers=4, stages=[StagePlan(layers=(0, 4), mode="dp", devices=("d0", "d1"))])
    c = estimate(dp, pool, prof, shape)
    params = sum(b.params_at() for b in prof.blocks) + prof.embed.params_at() + prof.head.params_at()
    net = Network.of(pool)
    assert c.stages[0].sync_s == pytest.approx(net.allreduce_time(["d0", "d1"], params))
    # overlapped with the backward in the runtime's buckets, which hold every synced byte once
    gc = group_comm(dp, 0, prof, shape, net)
    assert sum(bk.nbytes for bk in gc.sync_buckets) == pytest.approx(params)
    assert gc.sync_buckets[-1].blocks_left == 0 and gc.sync_buckets[0].blocks_left > 0
    assert c.stages[0].sync_exposed_s == c.sync_s and 0 < c.sync_s < c.stages[0].sync_s
    pp = Plan(num_layers=4, num_microbatches=2, schedule="1f1b",
              stages=[StagePlan(layers=(0, 2), devices=("d0", "d1")), StagePlan(layers=(2, 4), devices=("d2",))])
    c = estimate(pp, pool, prof, shape)
    assert [lk.k for lk in c.links] == [1, 2]  # boundary 0 is local for a dp first stage
    for lk in c.links:
        expect = sum((t.region[1] - t.region[0]) * (t.region[3] - t.region[2]) for t in Layout.of(pp, shape).boundary(lk.k))
        assert lk.fwd_bytes == expect * prof.act_elem_bytes
        assert lk.fwd_bytes == sum(f[2] for f in boundary_flows(pp, shape, prof, lk.k, False))
    # 1f1b keeps fewer micro-batches in flight than gpipe on the first stage.
    g = estimate(pp.model_copy(update={"schedule": "gpipe"}), pool, prof, shape)
    assert c.stages[0].inflight == 2 and c.stages[1].inflight == 2  # M = 2 caps both
    c4 = estimate(pp.model_copy(update={"num_microbatches": 4}), pool, prof, shape_for(prof, 8, 64))
    assert c4.stages[0].inflight == 3 and c4.stages[1].inflight == 2  # S - s, plus the owners' head
    assert g.devices["d0"].memory_bytes >= c.devices["d0"].memory_bytes
    assert g.step_time_s >= c.step_time_s - 1e-12


def test_tp_and_sp_collectives_and_owner():
    prof = tiny(num_layers=2, hidden=256)
    pool = make_pool(["jetson-orin-nano", "jetson-orin-nano"], medium="switched", bandwidth_mbps=1000)
    shape = shape_for(prof, 2, 32)
    tp = Plan(num_layers=2, stages=[StagePlan(layers=(0, 2), mode="tp", devices=("d0", "d1"))])
    c = estimate(tp, pool, prof, shape)
    assert c.stages[0].coll_fwd_s > 0 and c.sync_s == 0
    # Only the first device owns the data: it alone pays for embed and head.
    w = device_work(tp, pool, prof, shape)
    assert w["d0"].head_s > 0 and w["d1"].head_s == 0
    assert w["d0"].params_bytes > w["d1"].params_bytes
    sp = Plan(num_layers=2, stages=[StagePlan(layers=(0, 2), mode="sp", devices=("d0", "d1"))])
    c = estimate(sp, pool, prof, shape)
    assert c.stages[0].coll_fwd_s > 0 and c.sync_s > 0


def test_sp_collectives_are_the_runtimes():
    """Per block: K and V all-gathered separately, slices padded to the longest (gloo's
    all-gather takes equal parts); backward all-reduces the whole K and V gradients."""
    prof = tiny(num_layers=2, hidden=256)
    pool = make_pool(["jetson-orin-nano", "jetson-nano"], medium="shared", bandwidth_mbps=100, latency_ms=0)
    shape = shape_for(prof, 4, 30)
    sp = Plan(num_layers=2, stages=[StagePlan(layers=(0, 2), mode="sp", devices=("d0", "d1"), shares=(2, 1))])
    gc = group_comm(sp, 0, prof, shape, Network.of(pool))
    kv_row = prof.dims.kv_dim * prof.dtype_bytes
    part, full = 4 * 20 * kv_row, 4 * 30 * kv_row  # 30 tokens split 20 + 10: slices padded to 20
    rate = 100 / 8 * 1e6 * PAYLOAD_FRACTION
    assert gc.coll_send_bytes == {"d0": 2 * 2 * part, "d1": 2 * 2 * part}
    assert gc.coll_send_bytes_bwd == {"d0": 2 * 2 * full, "d1": 2 * 2 * full}
    # Shared channel: every device's sends cross it.
    assert gc.coll_fwd_s == pytest.approx(2 * 2 * 2 * part / rate)
    assert gc.coll_bwd_s == pytest.approx(2 * 2 * 2 * full / rate)
    assert gc.coll_steps == 4 and gc.coll_steps_bwd == 8


def test_more_bandwidth_is_never_slower():
    prof = tiny(num_layers=4, hidden=256)
    shape = shape_for(prof, 4, 64)
    pp = Plan(num_layers=4, num_microbatches=2,
              stages=[StagePlan(layers=(0, 1), devices=("d0",)), StagePlan(layers=(1, 4), devices=("d1", "d2"))])
    times = [estimate(pp, make_pool(["jetson-nano"] * 3, bandwidth_mbps=bw), prof, shape).step_time_s
             for bw in (10, 100, 1000)]
    assert times[0] > times[1] > times[2]


@pytest.mark.parametrize("schedule", ["1f1b", "gpipe"])
def test_shared_channel_term_bounds_channel_bound_pipelines(schedule):
    """A slow shared channel: the channel carries M * chan while stages other than the
    first compute beside it, so the step is W_0 + M chan, below the flow shop's fill plus
    (M - 1) channel periods; a fast channel leaves the flow-shop term."""
    prof = tiny(num_layers=4, hidden=256)
    shape = shape_for(prof, 8, 128)
    pp = Plan(num_layers=4, num_microbatches=4, schedule=schedule,
              stages=[StagePlan(layers=(0, 1), devices=("d0",)), StagePlan(layers=(1, 3), devices=("d1",)),
                      StagePlan(layers=(3, 4), devices=("d2",))])
    slow = estimate(pp, make_pool(["jetson-nano"] * 3, bandwidth_mbps=5), prof, shape)
    s0 = slow.stages[0]
    assert slow.bottleneck == "shared channel"
    assert slow.pipe_s == pytest.approx(s0.fwd_s + s0.bwd_s + 4 * slow.chan_s)
    assert slow.pipe_s < slow.fill_s + 3 * slow.chan_s
    assert slow.chan_s == pytest.approx(sum(lk.airtime_s for lk in slow.links))
    fast = estimate(pp, make_pool(["jetson-nano"] * 3, bandwidth_mbps=10_000), prof, shape)
    assert fast.bottleneck.startswith("stage")
    assert fast.pipe_s == pytest.approx(fast.fill_s + 3 * fast.period_s)


def test_memory_cap_and_violation_message():
    prof = bert_base()
    pool = make_pool(["jetson-nano"], extra={"memory_gb": [2.0]})
    assert memory_cap_bytes(pool.devices[0]) == pytest.approx(2.0e9)  # the pool's memory_gb is what training gets
    assert memory_cap_bytes(make_pool(["jetson-nano"]).devices[0]) == pytest.approx((4.0 - 1.2) * 1e9)  # else less the OS
    c = estimate(single("d0"), pool, prof, shape_for(prof, 8, 128))
    assert not c.feasible
    msg = c.memory_violations()[0]
    assert msg.startswith("needs ") and "GB on d0, which has 2.00 GB" in msg


def test_plan_for_another_model_is_refused():
    with pytest.raises(PlanError, match="layers"):
        estimate(single("d0", L=3), make_pool(["jetson-nano"]), tiny(4), shape_for(tiny(4), 2, 16))


def test_dims_from_a_config_object():
    class Cfg:
        family, vocab_size, hidden, num_layers, num_heads, ffn, num_kv_heads, max_seq_len = "llama", 100, 64, 2, 4, 128, 2, 64

    d = ModelDims.of(Cfg())
    assert d.kv_dim == 32
    assert analytic_profile(d).num_layers == 2


def _pp3(n: int = 3) -> Plan:
    return Plan(num_layers=n, stages=[StagePlan(layers=(i, i + 1), devices=(f"d{i}",)) for i in range(n)])


def _round_s(plan: Plan, pool, prof, shape) -> tuple[float, dict[str, float]]:
    """A round of backups by hand: each stage's parameters and optimizer state to the next."""
    work = device_work(plan, pool, prof, shape)
    state = {n: w.state_bytes["params"] + w.state_bytes["optimizer"] for n, w in work.items()}
    n = plan.world_size
    flows = [(f"d{i}", f"d{(i + 1) % n}", state[f"d{i}"]) for i in range(n)]
    return Network.of(pool).transfer_time(flows), state


def _busy_s(c) -> float:
    """The cost model's network time in a step: the pipeline's airtime and the syncs."""
    pipe = c.step_time_s - c.backup_s - c.sync_s - c.optim_s  # PlanCost.sync_s: the exposed syncs
    return min(pipe, c.num_microbatches * c.chan_s) + sum(sc.sync_s for sc in c.stages)  # all of their airtime


@pytest.mark.parametrize("every,mbps", [(1, 1.0), (3, 1.0), (1, 1000.0)])
def test_backups_are_charged_their_time_memory_and_bytes(every, mbps):
    """In-memory backups (``cost.model.BackupCost``): a 3-stage pipeline backs each
    stage's parameters and optimizer state up on the next stage, in the background. The
    step grows by what of a round does not fit in the network's idle time over
    ``every`` steps (on a slow link; on a fast one nothing here), in the cost model and the
    simulator alike (each by its own idle time); each device holds its own copy and its
    neighbour's, two rounds of them in a long run; the
    bytes are counted both ways. A dp group's ranks are each other's backups: they send
    nothing."""
    from dataclasses import replace

    from edgepool.cost.model import backup_cost
    from edgepool.sim import simulate
    from edgepool.specs.plan import Shape

    pool = make_pool(["host-cpu"] * 3, medium="switched", bandwidth_mbps=mbps)
    prof = tiny(num_layers=3)
    shape = Shape(global_batch=4, seq_len=16, num_heads=4, ffn=256)
    pp = _pp3()
    base, with_b = estimate(pp, pool, prof, shape), estimate(pp, pool, replace(prof, backup_every=every), shape)
    round_s, state = _round_s(pp, pool, prof, shape)
    want_s = max(0.0, round_s - every * (base.step_time_s - _busy_s(base))) / every
    assert want_s < round_s / every  # some of the round hides in the idle time
    assert (want_s > 0) == (mbps < 10), (want_s, round_s, base.step_time_s)
    assert with_b.backup_s == pytest.approx(want_s, abs=1e-12)
    assert with_b.step_time_s == pytest.approx(base.step_time_s + want_s)
    for n, prev in (("d0", "d2"), ("d1", "d0"), ("d2", "d1")):
        held = state[n] + state[prev]
        # a long run holds two rounds through every step (``BackupCost.held_bytes``)
        assert with_b.devices[n].memory_parts["backups"] == pytest.approx(2 * held)
        assert with_b.devices[n].bytes_moved == pytest.approx(base.devices[n].bytes_moved + (state[n] + state[prev]) / every)
    sim0, sim1 = simulate(pp, pool, prof, shape), simulate(pp, pool, replace(prof, backup_every=every), shape)
    assert 0 < sim0.network_busy_s <= sim0.step_time_s
    sim_want = max(0.0, round_s - every * (sim0.step_time_s - sim0.network_busy_s)) / every
    assert sim1.step_time_s == pytest.approx(sim0.step_time_s + sim_want)
    assert all(sim1.devices[n].peak_memory_bytes > sim0.devices[n].peak_memory_bytes for n in state)
    dp = Plan(num_layers=3, stages=[StagePlan(layers=(0, 3), mode="dp", devices=("d0", "d1", "d2"))])
    b = backup_cost(dp, device_work(dp, pool, prof, shape), Network.of(pool), every)
    assert b.time_s == 0 and not any(b.bytes_moved.values())


def test_backups_held_follow_the_rounds_a_run_takes():
    """``BackupCost.held_bytes`` as ``runtime.regroup`` holds them: the round taken when a
    fresh run starts carries parameters only (AdamW's moments are created at the first
    optimizer step), and is all a run of at most ``every`` steps holds; a second round
    (after step ``every``) joins it; from a third on, two full rounds are held, each
    dropped only at the next round's boundary. ``estimate(steps=)`` prices a run of that
    length; without it, a long run."""
    from dataclasses import replace

    from edgepool.specs.plan import Shape

    pool = make_pool(["host-cpu"] * 3, medium="switched", bandwidth_mbps=1000.0)
    prof = replace(tiny(num_layers=3), backup_every=2)
    shape = Shape(global_batch=4, seq_len=16, num_heads=4, ffn=256)
    pp = _pp3()
    work = device_work(pp, pool, prof, shape)
    p = {n: w.state_bytes["params"] for n, w in work.items()}
    full = {n: w.state_bytes["params"] + w.state_bytes["optimizer"] for n, w in work.items()}
    assert all(full[n] == pytest.approx(3 * p[n]) for n in p)  # adamw: two moments per parameter
    for n, prev in (("d0", "d2"), ("d1", "d0"), ("d2", "d1")):
        first, one = p[n] + p[prev], full[n] + full[prev]
        got = {steps: estimate(pp, pool, prof, shape, steps=steps).devices[n].memory_parts["backups"]
               for steps in (1, 2, 3, 4, 5, None)}
        assert got[1] == got[2] == pytest.approx(first)
        assert got[3] == got[4] == pytest.approx(first + one)
        assert got[5] == got[None] == pytest.approx(2 * one)
        assert estimate(pp, pool, prof, shape).devices[n].memory_bytes == \
            pytest.approx(estimate(pp, pool, prof, shape, steps=5).devices[n].memory_bytes)
    from edgepool.sim import simulate

    # the simulator prices a long run's, as the cost model does (d1, d2: no head transient)
    sim, c = simulate(pp, pool, prof, shape), estimate(pp, pool, prof, shape)
    for n in ("d1", "d2"):
        assert sim.devices[n].peak_memory_bytes == pytest.approx(c.devices[n].memory_bytes)


def test_a_job_that_does_not_recover_is_charged_no_backups():
    from edgepool.cost.profile import for_job
    from edgepool.specs.job import JobSpec

    job = {"model": {"family": "gpt", "size": "tiny"}, "data": {"path": "x.txt"}}
    prof = tiny()
    assert for_job(prof, JobSpec.model_validate(job)).backup_every == "auto"
    assert for_job(prof, JobSpec.model_validate({**job, "train": {"recover": False}})).backup_every == 0
    assert for_job(prof, JobSpec.model_validate({**job, "train": {"replicate_every": 4}})).backup_every == 4


@pytest.mark.parametrize("mbps", [20.0, 1000.0])
def test_auto_backups_stay_under_a_tenth_of_the_step(mbps):
    """``replicate_every: auto``: the smallest interval whose rounds cost at most
    BACKUP_SHARE of the step beyond the network's idle time; on a slow link the interval
    grows, on a fast one it is 1."""
    import math
    from dataclasses import replace

    from edgepool.cost.model import BACKUP_SHARE
    from edgepool.specs.plan import Shape

    pool = make_pool(["host-cpu"] * 2, medium="shared", bandwidth_mbps=mbps)
    prof = tiny(num_layers=2, hidden=256, vocab=5000)
    shape = Shape(global_batch=4, seq_len=16, num_heads=4, ffn=1024)
    pp = _pp3(2)
    base = estimate(pp, pool, prof, shape)
    auto = estimate(pp, pool, replace(prof, backup_every="auto"), shape)
    round_s, _ = _round_s(pp, pool, prof, shape)
    step_s, idle_s = base.step_time_s, base.step_time_s - _busy_s(base)
    assert auto.backup_every == max(1, math.ceil(round_s / (idle_s + BACKUP_SHARE * step_s)))
    assert auto.backup_s == pytest.approx(max(0.0, round_s - auto.backup_every * idle_s) / auto.backup_every)
    assert auto.backup_s <= BACKUP_SHARE * step_s * (1 + 1e-9)
    if mbps == 20.0:
        assert auto.backup_every > 1


@pytest.mark.parametrize("mode", ["dp", "tp", "sp"])
def test_recomputation_trades_activations_for_a_second_forward(mode):
    """A stage that recomputes (``StagePlan.recompute``) keeps each block's input only
    (tokens x hidden x 4 bytes a block) and rebuilds one block's activations at a time in
    the backward, which runs the blocks' forward again, with their collectives where the
    mode has them in the blocks (tp, sp); the cost model and the simulator agree on the
    memory it saves."""
    from edgepool.sim import simulate
    from edgepool.specs.plan import Shape

    pool = make_pool(["host-cpu"] * 3, medium="switched", bandwidth_mbps=100.0)
    prof = tiny(num_layers=4, hidden=128)
    shape = Shape(global_batch=8, seq_len=64, num_heads=4, ffn=512)

    def plan(on: bool) -> Plan:
        return Plan(num_layers=4, num_microbatches=2, schedule="1f1b",
                    stages=[StagePlan(layers=(0, 1), devices=("d0",)),
                            StagePlan(layers=(1, 4), mode=mode, devices=("d1", "d2"), recompute=on)])

    off, on = plan(False), plan(True)
    w_off, w_on = device_work(off, pool, prof, shape)["d1"], device_work(on, pool, prof, shape)["d1"]
    tokens, _, _ = modes.get(mode).block_part(Layout.of(on, shape).splits[1], 0, Layout.of(on, shape).microbatch, shape)
    assert w_on.act_bytes == pytest.approx(3 * tokens * 128 * 4) and w_on.act_bytes < w_off.act_bytes
    assert w_on.blocks_bwd_s == pytest.approx(w_off.blocks_bwd_s + w_off.blocks_fwd_s)
    assert 0 < w_on.recompute_bytes < w_off.act_bytes and w_off.recompute_bytes == 0
    g_off, g_on = (group_comm(p, 1, prof, shape, Network.of(pool)) for p in (off, on))
    if mode == "dp":
        assert g_on == g_off
    else:
        assert g_on.coll_bwd_s == pytest.approx(g_off.coll_bwd_s + g_off.coll_fwd_s) and g_off.coll_fwd_s > 0
        assert g_on.coll_steps_bwd == g_off.coll_steps_bwd + g_off.coll_steps
    c_off, c_on = estimate(off, pool, prof, shape), estimate(on, pool, prof, shape)
    assert c_on.step_time_s > c_off.step_time_s
    assert c_on.devices["d1"].memory_parts["transient"] == pytest.approx(w_on.recompute_bytes)
    assert c_on.devices["d1"].memory_bytes < c_off.devices["d1"].memory_bytes
    s_off, s_on = simulate(off, pool, prof, shape), simulate(on, pool, prof, shape)
    assert s_on.step_time_s > s_off.step_time_s
    assert s_on.peak_memory_bytes["d1"] < s_off.peak_memory_bytes["d1"]


def test_lower_precision_keeps_fewer_activation_bytes(tmp_path):
    """bf16/fp16 autocast (``train.precision``): a block keeps 0.5-0.75 of its fp32
    activation bytes per token (``cost.profile.AUTOCAST_ACT``) plus a half-size copy of
    its matmul weights per micro-batch; parameters, boundary rows and times are fp32's.
    At BERT-base's 128-token sequences the activations a device holds fall, and so does
    its peak memory; a profile of another precision than the job's is refused."""
    from dataclasses import replace

    from edgepool.cost.profile import AUTOCAST_ACT, for_job
    from edgepool.specs.job import JobSpec
    from edgepool.specs.plan import Shape

    fp32, bf16 = bert_base(), analytic_profile(bert_base().dims, precision="bf16")
    b32, b16 = fp32.blocks[0], bf16.blocks[0]
    assert b16.act_bytes == b32.act_bytes.times(AUTOCAST_ACT)
    assert 0.5 < b16.act_bytes.total(128) / b32.act_bytes.total(128) < 0.75
    assert b32.cast_at() == 0 and b16.cast_at() == pytest.approx(b16.params_at() / 2, rel=0.01)
    assert (b16.params_bytes, b16.fwd_s, b16.bwd_s) == (b32.params_bytes, b32.fwd_s, b32.bwd_s)
    assert bf16.act_elem_bytes == fp32.act_elem_bytes and bf16.precision == "bf16"
    path = tmp_path / "p.json"
    path.write_text(bf16.dumps())
    assert ModelProfile.load(path) == bf16

    pool = make_pool(["jetson-agx-orin"] * 2, medium="switched")
    shape = Shape(global_batch=16, seq_len=128, num_heads=12, ffn=3072)
    pp = Plan(num_layers=12, num_microbatches=2, stages=[StagePlan(layers=(0, 6), devices=("d0",)),
                                                         StagePlan(layers=(6, 12), devices=("d1",))])
    w32, w16 = device_work(pp, pool, fp32, shape), device_work(pp, pool, bf16, shape)
    for d in ("d0", "d1"):
        # 0.78 here: 0.58 per token, plus the weight copies (a fifth of it at 1024 tokens)
        assert w16[d].act_bytes < 0.8 * w32[d].act_bytes
        assert w16[d].params_bytes == w32[d].params_bytes
    m32, m16 = estimate(pp, pool, fp32, shape), estimate(pp, pool, bf16, shape)
    assert all(m16.devices[d].memory_bytes < m32.devices[d].memory_bytes for d in ("d0", "d1"))

    job = {"model": {"family": "bert", "size": "tiny"}, "data": {"path": "x.txt"}}
    with pytest.raises(SpecError, match="prices fp32 but the job trains in bf16"):
        for_job(fp32, JobSpec.model_validate({**job, "train": {"precision": "bf16"}}))
    assert for_job(bf16, JobSpec.model_validate({**job, "train": {"precision": "bf16"}})).precision == "bf16"
    with pytest.raises(SpecError, match="unknown precision"):
        analytic_profile(fp32.dims, precision="fp8")


# -- fine-tuning (``cost.profile.with_tuning``) ---------------------------------------------
def _gpt2_small():
    return analytic_profile(ModelDims(family="gpt", vocab_size=50257, hidden=768, num_layers=12, num_heads=12,
                                      ffn=3072, max_seq_len=1024))


def test_lora_prices_adapters_and_freezes_the_rest():
    """Adapter bytes rank * (in + out) per adapted linear, by part; embed and head
    frozen; the blocks' trainable fraction is the adapters' share; frozen weights skip
    their weight gradient in the backward, a frozen embed has none."""
    from edgepool.cost.profile import with_tuning
    from edgepool.specs.job import LoraSpec

    prof = _gpt2_small()
    lora = with_tuning(prof, lora=LoraSpec(rank=8, targets=("q_proj", "v_proj", "up")))
    b0, b1 = prof.blocks[0], lora.blocks[0]
    h, f, e = 768, 3072, 4
    assert b1.params_bytes.head - b0.params_bytes.head == pytest.approx(2 * 8 * (h + h) * e)  # q, v
    assert b1.params_bytes.ffn - b0.params_bytes.ffn == pytest.approx(8 * (h + f) * e)  # up
    assert b1.params_bytes.rep == b0.params_bytes.rep
    assert b1.trainable_frac == pytest.approx(8 * (4 * h + h + f) * e / b1.params_at())
    assert b1.trainable_at() == pytest.approx(8 * (4 * h + h + f) * e)
    assert lora.embed.trainable_frac == lora.head.trainable_frac == 0.0
    assert lora.embed.bwd_s.total(64) == 0 and lora.embed.fixed_bwd_s == 0
    assert lora.head.bwd_s.rep == pytest.approx(prof.head.bwd_s.rep / 2)
    # a block's matmul backward: about its forward (input gradients) plus the adapters' weight gradients
    assert b1.bwd_s.ffn == pytest.approx(b1.fwd_s.ffn * (1 + 8 * (h + f) * e / b1.params_bytes.ffn))
    assert b0.bwd_s.ffn / 2 < b1.bwd_s.ffn < 0.51 * b0.bwd_s.ffn
    assert b1.bwd_s.quad == b0.bwd_s.quad and b1.bwd_s.rep == b0.bwd_s.rep
    assert lora.tuning and with_tuning(lora, lora=LoraSpec(rank=8, targets=("q_proj", "v_proj", "up"))) is lora
    with pytest.raises(SpecError, match="already prices"):
        with_tuning(lora, lora=LoraSpec(rank=4))


def test_freeze_patterns_give_each_unit_its_unmatched_share():
    from edgepool.cost.profile import with_tuning

    prof = tiny(num_layers=4, family="llama", hidden=64)
    fr = with_tuning(prof, freeze=("embed.*", "blocks.[0-1].*", "blocks.3.mlp.*"))
    assert [lp.trainable_frac for lp in fr.blocks[:3]] == [0.0, 0.0, 1.0]
    b = prof.blocks[3]
    assert fr.blocks[3].trainable_frac == pytest.approx((b.params_bytes.rep + b.params_bytes.head) / b.params_at())
    assert fr.blocks[3].bwd_s.ffn == pytest.approx(b.bwd_s.ffn / 2) and fr.blocks[3].bwd_s.head == b.bwd_s.head
    assert fr.blocks[0].params_bytes == b.params_bytes and fr.embed.trainable_frac == 0 and fr.head.trainable_frac == 1
    assert fr.embed.bwd_s.total(16) == 0 and fr.blocks[2] == prof.blocks[2]


def test_old_profile_json_without_tuning_loads_as_full_training():
    from edgepool.cost.profile import with_tuning
    from edgepool.specs.job import LoraSpec

    prof = tiny()
    data = json.loads(prof.dumps())
    for lp in [*data["blocks"], data["embed"], data["head"]]:
        del lp["trainable_frac"]
    del data["tuning"]
    old = ModelProfile.from_json(data)
    assert old == prof and all(lp.trainable_frac == 1.0 for lp in old.blocks) and old.tuning == ""
    tuned = with_tuning(prof, lora=LoraSpec())
    assert ModelProfile.from_json(json.loads(tuned.dumps())) == tuned


def test_for_job_applies_the_jobs_tuning():
    from edgepool.cost.profile import for_job
    from edgepool.specs.job import JobSpec

    job = {"model": {"family": "gpt", "size": "tiny"}, "data": {"path": "x.txt"}}
    prof = tiny()
    assert for_job(prof, JobSpec.model_validate(job)).tuning == ""
    lora = for_job(prof, JobSpec.model_validate({**job, "train": {"lora": {"rank": 4}}}))
    assert lora.tuning.startswith("lora rank 4") and lora.head.trainable_frac == 0
    fr = for_job(prof, JobSpec.model_validate({**job, "train": {"freeze": ["embed.*"]}}))
    assert fr.embed.trainable_frac == 0 and fr.blocks[0].trainable_frac == 1


@pytest.mark.parametrize("mode", ["dp", "fsdp", "tp", "sp"])
def test_lora_memory_optimizer_and_sync_fall(mode):
    """AdamW: about 4x the parameter bytes per replica in full training, about 1x plus
    the adapters' state under LoRA; the optimizer steps and dp/sp sync only the adapters."""
    from edgepool.cost.profile import with_tuning
    from edgepool.specs.job import LoraSpec

    prof = _gpt2_small()
    lora = with_tuning(prof, lora=LoraSpec(rank=8))
    pool = make_pool(["host-cpu"] * 2, medium="switched", bandwidth_mbps=1000.0)
    shape = shape_for(prof, 4, 128)
    plan = Plan(num_layers=12, stages=[StagePlan(layers=(0, 12), mode=mode, devices=("d0", "d1"))])
    full, tuned = estimate(plan, pool, prof, shape), estimate(plan, pool, lora, shape)
    wf, wt = device_work(plan, pool, prof, shape)["d0"], device_work(plan, pool, lora, shape)["d0"]
    if mode == "dp":
        assert wf.static_bytes == pytest.approx(4 * wf.params_bytes)
        adapters = wt.params_bytes - wf.params_bytes
        assert wt.static_bytes == pytest.approx(wt.params_bytes + 3 * adapters)
    assert wt.static_bytes < 0.5 * wf.static_bytes if mode != "fsdp" else wt.static_bytes < 0.7 * wf.static_bytes
    assert tuned.optim_s < 0.02 * full.optim_s
    assert tuned.devices["d0"].memory_bytes < full.devices["d0"].memory_bytes
    if mode in ("dp", "sp"):
        gf, gt = (group_comm(plan, 0, p, shape, Network.of(pool)) for p in (prof, lora))
        assert 0 < gt.sync_bytes < 0.02 * gf.sync_bytes and gt.sync_s < gf.sync_s
    assert tuned.stages[0].bwd_s < full.stages[0].bwd_s


def test_lora_backups_carry_only_the_trainable_state():
    from dataclasses import replace

    from edgepool.cost.profile import with_tuning
    from edgepool.specs.job import LoraSpec

    pool = make_pool(["host-cpu"] * 3, medium="switched", bandwidth_mbps=10.0)
    prof = replace(tiny(num_layers=3, hidden=256), backup_every=1)
    lora = with_tuning(prof, lora=LoraSpec(rank=4))
    shape = shape_for(prof, 4, 16)
    pp = _pp3()
    full, tuned = estimate(pp, pool, prof, shape), estimate(pp, pool, lora, shape)
    w = device_work(pp, pool, lora, shape)["d1"]
    assert w.backup_bytes == pytest.approx(w.trainable_bytes * (1 + lora.opt_state_factor))
    assert tuned.devices["d1"].memory_parts["backups"] < 0.1 * full.devices["d1"].memory_parts["backups"]


@pytest.mark.parametrize("mode", ["dp", "sp"])
def test_the_sync_hides_behind_the_backward(mode):
    """``GroupComm.exposed_sync_s``: on a fast link the backward hides every bucket but
    those final at its end (the first block's, and a dp owner's embed); on a slow one the
    buckets' all-reduces, one after another from the first's being final, outlast the
    backward by the rest. The simulator runs them beside the last backward and agrees."""
    from edgepool.sim.engine import simulate

    prof = tiny(num_layers=4, hidden=256)
    shape = shape_for(prof, 32, 128)
    plan = Plan(num_layers=4, stages=[StagePlan(layers=(0, 4), mode=mode, devices=("d0", "d1"))])
    for mbps in (100_000.0, 10.0):
        pool = make_pool(["jetson-orin-nano", "jetson-orin-nano"], medium="switched", bandwidth_mbps=mbps)
        net = Network.of(pool)
        c = estimate(plan, pool, prof, shape)
        work = device_work(plan, pool, prof, shape)
        bks = group_comm(plan, 0, prof, shape, net).sync_buckets
        late = sum(bk.seconds for bk in bks if bk.blocks_left == 0)
        first_hide = max(w.bwd_left_s[bks[0].blocks_left] for w in work.values())
        assert late > 0 and first_hide > 0
        if mbps > 1000:
            assert c.sync_s == pytest.approx(late)
        else:  # the queue of all-reduces never drains
            assert c.sync_s == pytest.approx(sum(bk.seconds for bk in bks) - first_hide)
        r = simulate(plan, pool, prof, shape)
        assert r.step_time_s == pytest.approx(c.step_time_s, rel=0.02)
        lead = [sg for sg in r.segments if sg.label == "sync_grads:lead"]
        last_bwd = max(sg.end_s for sg in r.segments if sg.label.startswith("bwd"))
        assert lead and min(sg.start_s for sg in lead) < last_bwd


def test_the_sync_buckets_are_the_runtimes():
    """The cost model prices the buckets ``runtime.overlap.GradSync`` launches: the same
    layout rule (``modes.base.buckets_of``) over the model's own parameters groups the same
    units (the runtime cuts parameters, the cost model units), for a model of small blocks
    (several per bucket) and one of large ones (a bucket each)."""
    import math

    from edgepool.models.config import expected_shapes, preset
    from edgepool.modes.base import DEFAULT_BUCKET_BYTES, MIN_UNIT_BUCKET_BYTES, buckets_of
    from edgepool.runtime.overlap import unit_of

    for hidden, layers in ((64, 8), (256, 4)):
        cfg = preset("gpt", "small", vocab_size=260, hidden=hidden, num_layers=layers, num_heads=2, ffn=4 * hidden)
        shapes = expected_shapes(cfg)
        names = list(shapes)
        units = [unit_of(k) for k in names]
        got = buckets_of([4 * math.prod(shapes[k]) for k in names], DEFAULT_BUCKET_BYTES, units, MIN_UNIT_BUCKET_BYTES)
        runtime = [sorted({units[i] for i in b}) for b in got]
        prof = analytic_profile(ModelDims.of(cfg))
        pool = make_pool(["jetson-orin-nano", "jetson-orin-nano"], medium="switched", bandwidth_mbps=100)
        plan = Plan(num_layers=layers, stages=[StagePlan(layers=(0, layers), mode="dp", devices=("d0", "d1"))])
        bks = group_comm(plan, 0, prof, shape_for(prof, 4, 32), Network.of(pool)).sync_buckets
        assert len(bks) == len(runtime)
        for bk, us in zip(bks, runtime):  # a bucket's lowest block is what it waits for
            blocks = [int(u.split(".")[1]) for u in us if u.startswith("blocks.")]
            expect = min(blocks) if blocks else (0 if "embed" in us else layers)
            assert bk.blocks_left == expect
        assert len(runtime) < layers + 2 if hidden == 64 else len(runtime) >= layers
        # the simulator runs the same buckets beside the backward and agrees with the closed form
        from edgepool.sim.engine import simulate

        shape = shape_for(prof, 16, 64)
        for mbps in (10.0, 1000.0):
            slow = make_pool(["jetson-orin-nano", "jetson-nano"], medium="switched", bandwidth_mbps=mbps)
            assert simulate(plan, slow, prof, shape).step_time_s == pytest.approx(
                estimate(plan, slow, prof, shape).step_time_s, rel=0.02)


# -- compression on the wire (``train.wire``, ``cost.wire``) --------------------------------------
def _wired(prof, **wire):
    from edgepool.cost.wire import with_wire
    from edgepool.specs.job import WireSpec

    return with_wire(prof, WireSpec(**wire))


PP2 = Plan(num_layers=4, stages=[StagePlan(layers=(0, 2), devices=("d0",)), StagePlan(layers=(2, 4), devices=("d1",))],
           num_microbatches=2)


def test_int8_boundaries_make_a_pp_step_on_a_slow_link_faster():
    pool = make_pool(["host-cpu"] * 2, medium="switched", bandwidth_mbps=10, latency_ms=1)
    prof = tiny(hidden=256)
    shape = shape_for(prof, 8, 64)
    plain, int8 = estimate(PP2, pool, prof, shape), estimate(PP2, pool, _wired(prof, activations="int8"), shape)
    lk, lk8 = plain.links[-1], int8.links[-1]
    rows = 4 * 64  # one micro-batch's rows across the boundary
    assert lk.fwd_bytes == rows * 256 * 4 and lk8.fwd_bytes == rows * 256 + 4  # a byte a value, and the scale
    assert int8.step_time_s < 0.5 * plain.step_time_s  # the link decides the step here
    assert int8.devices["d0"].busy_s > plain.devices["d0"].busy_s  # and the codec's passes are charged


def test_codecs_cost_compute_that_a_fast_link_does_not_pay_back():
    pool = make_pool(["host-cpu"] * 2, medium="switched", bandwidth_mbps=100_000, latency_ms=0.01)
    prof = tiny(hidden=64, num_layers=4)
    shape = shape_for(prof, 2, 16)
    plain = estimate(PP2, pool, prof, shape)
    for codec in ("fp16", "bf16", "int8"):
        c = estimate(PP2, pool, _wired(prof, activations=codec), shape)
        work = device_work(PP2, pool, _wired(prof, activations=codec), shape)
        for d in ("d0", "d1"):
            assert work[d].codec_s > 0 and c.devices[d].busy_s > plain.devices[d].busy_s
        assert c.step_time_s > plain.step_time_s, codec  # the bytes saved are worth less than the passes
    # a single device sends nothing off itself: nothing encoded, nothing charged
    one = single("d0", L=4)
    assert estimate(one, pool, _wired(prof, activations="int8"), shape).step_time_s == \
        estimate(one, pool, prof, shape).step_time_s


def test_powersgd_prices_factors_and_their_matmuls():
    from edgepool.cost.wire import powersgd_elements
    from edgepool.models.config import expected_shapes

    prof = tiny(hidden=256, num_layers=2)
    dp = Plan(num_layers=2, stages=[StagePlan(layers=(0, 2), devices=("d0", "d1"), mode="dp")])
    pool = make_pool(["host-cpu"] * 2, medium="switched", bandwidth_mbps=100, latency_ms=1)
    shape = shape_for(prof, 4, 64)
    net = Network.of(pool)
    for rank in (1, 4):
        wired = _wired(prof, gradients="powersgd", powersgd_rank=rank)
        gc, gc0 = group_comm(dp, 0, wired, shape, net), group_comm(dp, 0, prof, shape, net)
        # the factors of every matrix, the 1-D tensors whole, of the whole model (dp owners
        # sync embed and head); to the analytic profile's bytes, which count the head's
        # parameters a little apart from the model's names (``with_wire``: by element share)
        want = 4 * sum(powersgd_elements(tuple(s), rank) for s in expected_shapes(prof.dims).values())
        assert gc.sync_bytes == pytest.approx(want, rel=1e-3) and gc.sync_bytes < gc0.sync_bytes / 10
        assert gc.sync_flops > 0 and gc0.sync_flops == 0
        c, c0 = estimate(dp, pool, wired, shape), estimate(dp, pool, prof, shape)
        assert c.stages[0].sync_codec_s > 0 and c.stages[0].sync_s < c0.stages[0].sync_s
    # the off setting changes nothing
    assert _wired(prof, activations="fp32", gradients="none") == prof
