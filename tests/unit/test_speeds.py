"""One truth about device speed (``launch.speeds``): on an emulated pool, plan, simulate
and ``train --parallelism auto`` price the plan at the testbed's CPU scale, the one the
caps will give (``testbed.caps.cores_per_speed``), computed without a testbed. No root,
no testbed, no measuring: the measured profile is a stand-in."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from edgepool.cli.main import main
from edgepool.cost.model import estimate, shape_for
from edgepool.launch import speeds
from edgepool.planner import plan as search
from edgepool.planner.search import job_profile
from edgepool.sim.engine import simulate
from edgepool.specs.job import JobSpec
from edgepool.specs.plan import Plan, StagePlan
from edgepool.specs.pool import PoolSpec
from edgepool.testbed import Testbed, cgroups, cpu_scale, plan_caps

HOST_CPUS = 1.5  # what the caps share (this host's CPUs less the reserve), as the tests fix it
DEVICES = [("laptop", "host-cpu", 4.0), ("orin", "jetson-orin-nano", 2.0), ("nano-1", "jetson-nano", 1.0),
           ("nano-2", "jetson-nano", 1.0)]
JOB = {"model": {"family": "gpt", "size": "tiny"}, "data": {"path": "x"}, "train": {"global_batch": 8, "seq_len": 64}}


def _pool(host: str) -> PoolSpec:
    return PoolSpec.model_validate({
        "name": "speeds", "network": {"medium": "shared", "bandwidth_mbps": 70, "latency_ms": 3},
        "devices": [{"name": n, "kind": k, "host": host, "compute_scale": s} for n, k, s in DEVICES]})


@pytest.fixture
def host(monkeypatch):
    """No testbed is up; the caps share HOST_CPUS cores; the 'measured' profile is the
    analytic one relabelled as measured on this host (no torch, no timing)."""
    monkeypatch.setattr(Testbed, "attach", classmethod(lambda cls, pool=None, *, tag=None: None))
    monkeypatch.setattr(cgroups, "device_cpus", lambda: HOST_CPUS)
    monkeypatch.setattr(cgroups, "host_cpus", lambda: HOST_CPUS + cgroups.HOST_RESERVE_CPUS)
    job = JobSpec.model_validate(JOB)
    measured = replace(job_profile(job), source="measured", reference_kind=speeds.HOST_KIND, backup_every=0)
    monkeypatch.setattr(speeds, "measured_profile", lambda job, log=print: measured)
    return job, measured


def test_the_scale_is_the_caps_arithmetic():
    pool = _pool("emulated")
    scale = cpu_scale(pool.devices, host_cpus=HOST_CPUS)
    caps = plan_caps(pool.devices, host_cpus=HOST_CPUS, host_memory_bytes=10**10)
    assert scale.cores_per_speed == caps.cores_per_speed == pytest.approx(HOST_CPUS / 8)
    assert caps.scale("x") == replace(scale, source="x")
    assert scale.reference_speed() == pytest.approx(8 / HOST_CPUS)
    fastest = cpu_scale(pool.devices, host_cpus=HOST_CPUS, cpu_fit="fastest")
    assert fastest.cores_per_speed == plan_caps(pool.devices, host_cpus=HOST_CPUS, host_memory_bytes=10**10,
                                                cpu_fit="fastest").cores_per_speed == pytest.approx(HOST_CPUS / 4)
    mixed = pool.model_copy(update={"devices": (pool.devices[0].model_copy(update={"host": "local"}),
                                                *pool.devices[1:])})
    assert cpu_scale(mixed.devices, host_cpus=HOST_CPUS).cores_per_speed == pytest.approx(HOST_CPUS / 4)
    assert cpu_scale(_pool("local").devices, host_cpus=HOST_CPUS) is None


def test_an_emulated_pool_is_priced_at_the_scale_and_its_twin_is_not(host, tmp_path):
    job, measured = host
    emulated, twin = _pool("emulated"), _pool("local")
    got = speeds.run_profile(emulated, job)
    assert got.profile.reference_speed_value == pytest.approx(8 / HOST_CPUS)
    assert "1.0 relative speed = 0.188 host cores" in got.line and "share 1.5 host cores" in got.line
    # Nothing changes without emulated devices: the analytic profile, no line.
    plain = speeds.run_profile(twin, job)
    assert plain.profile == job_profile(job) and plain.scale is None and plain.line is None
    # The same measured profile file: at the testbed's scale on the emulated pool, at
    # the catalog's host-cpu speed on the twin. One device alone (no network): the step
    # differs by exactly the ratio of the reference speeds.
    path = tmp_path / "measured.json"
    path.write_text(measured.dumps())
    on_testbed = speeds.run_profile(emulated, job, str(path)).profile
    on_catalog = speeds.run_profile(twin, job, str(path)).profile
    assert on_catalog.reference_speed_value is None
    ratio = (8 / HOST_CPUS) / on_catalog.reference_speed
    alone = Plan(num_layers=measured.num_layers, stages=[StagePlan(layers=(0, measured.num_layers), devices=("orin",))])
    shape = shape_for(measured, job.train.global_batch, job.train.seq_len)
    for f in (simulate, estimate):
        assert (f(alone, emulated, on_testbed, shape).step_time_s / f(alone, twin, on_catalog, shape).step_time_s
                == pytest.approx(ratio, rel=1e-9))
    # The speed-1 device at one core's share: the one-core time over its 0.1875 cores.
    assert ratio == pytest.approx(1 / (HOST_CPUS / 8) / on_catalog.reference_speed)


def test_a_profile_not_measured_here_is_kept_and_the_line_says_so(host, tmp_path):
    job, _ = host
    path = tmp_path / "analytic.json"
    path.write_text(job_profile(job).dumps())
    got = speeds.run_profile(_pool("emulated"), job, str(path))
    assert got.scale is None and got.profile.reference_speed_value is None
    assert got.line.startswith("speeds: catalog relative speeds, not the testbed's CPU scale")


def test_plan_simulate_and_train_auto_use_the_same_speeds(host, tmp_path, capsys):
    from edgepool.launch.prepare import family_plan

    job, measured = host
    pool = _pool("emulated")
    (tmp_path / "pool.json").write_text(pool.model_dump_json())
    (tmp_path / "job.json").write_text(json.dumps(JOB))
    files = ["--pool", str(tmp_path / "pool.json"), "--job", str(tmp_path / "job.json")]
    assert main(["plan", *files, "-o", str(tmp_path / "plan.json")]) == 0
    flat = " ".join(capsys.readouterr().out.split())  # the console wraps long lines
    line = speeds.run_profile(pool, job).line
    assert " ".join(line.split()) in flat
    assert "speeds: the testbed's CPU scale, 1.0 relative speed = 0.188 host cores" in flat
    planned = Plan.model_validate_json((tmp_path / "plan.json").read_text())
    expected = search(pool, job, speeds.run_profile(pool, job).profile).plan
    assert planned.plan_id == expected.plan_id
    assert planned.estimate.step_time_s == pytest.approx(expected.estimate.step_time_s, rel=1e-12)
    # The twin would be priced otherwise (the point of all this).
    assert search(_pool("local"), job, job_profile(job)).plan.estimate.step_time_s != pytest.approx(
        planned.estimate.step_time_s, rel=1e-3)
    assert main(["simulate", "--plan", str(tmp_path / "plan.json"), *files]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert " ".join(line.split()) in out
    sim = simulate(planned, pool, speeds.run_profile(pool, job).profile, shape_for(measured, 8, 64))
    assert f"simulated step {sim.step_time_s:.4g} s" in out
    logged: list[str] = []
    auto = family_plan(pool, job, measured.num_layers, "auto", log=logged.append)
    assert auto.plan_id == planned.plan_id and line in logged


def test_the_study_keeps_its_numbers_on_the_shared_scale(host):
    from edgepool.launch.local import Placement
    from edgepool.launch.study import study_profile

    job, _ = host
    pool = _pool("emulated")
    speed = {d.name: d.speed() for d in pool.devices}
    # In the testbed: the caps' cores, which the study used to divide by the speed.
    capped = Placement(emulated=True, cores=lambda d: speed[d] * HOST_CPUS / 8)
    prof, note = study_profile(pool, job, capped, log=lambda m: None)
    assert prof.reference_speed_value == pytest.approx(1 / capped.cores("orin") * speed["orin"])
    assert note.endswith("testbed CPU caps (0.188 cores per unit speed)")
    prof, note = study_profile(pool, job, Placement(), log=lambda m: None)  # fell back: plain processes
    assert prof == job_profile(job) and "analytic profile" in note


def test_a_testbed_that_is_up_gives_its_own_caps(host, monkeypatch):
    """``serve`` plans for the devices that joined (a sub-pool): the scale is the caps of
    the testbed that is up for the whole pool, with the options it was brought up with."""
    from edgepool.testbed import core

    job, _ = host
    pool = _pool("emulated")
    caps = plan_caps(pool.devices, host_cpus=1.0, host_memory_bytes=10**10, cpu_fit="fastest")
    state = core.TestbedState(tag="ab1", pool_name=pool.name, emulated=True, caps=caps)
    monkeypatch.setattr(Testbed, "attach", classmethod(lambda cls, pool=None, *, tag=None: state))
    joined = pool.model_copy(update={"devices": pool.devices[2:]})  # the two Nanos
    got = speeds.run_profile(joined, job)
    assert got.scale.cores_per_speed == caps.cores_per_speed == pytest.approx(0.25)
    assert got.profile.reference_speed_value == pytest.approx(4.0) and "testbed ab1, which is up" in got.line
    state = core.TestbedState(tag="ab1", pool_name=pool.name, emulated=True, caps=None)  # up without CPU caps
    got = speeds.run_profile(joined, job)
    assert got.scale is None and got.profile == job_profile(job) and "no CPU caps" in got.line
