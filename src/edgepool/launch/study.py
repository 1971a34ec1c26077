"""The four-parallelism study (the paper's case study) for any pool, and the demo.

For the same model and global batch, run DP, SP, TP, PP and the planner's choice on the
pool (inside the testbed for ``host: emulated`` devices, each run through a coordinator
and one ``edgepool join`` agent per device, ``cluster.coordinator.launch_pool``), and for each measure step
time, samples/s, energy per step and per sample, per-device peak memory and busy %,
and bytes on the wire, beside the cost model's prediction. A run that dies (out of
memory under its cap, a timeout, a crash) is kept with its cause.

Energy: no device here has a power sensor, so energy is *modelled* from measured
quantities (``energy.model_energy_j``): the catalog's busy and idle power of each
device's kind and power mode, its measured CPU time per step divided by the CPU it may
use (its testbed cap) as busy time, the rest of the step as idle, and the catalog's
radio energy per byte it sent. Times are this host's (the testbed keeps the pool's
speed *ratios*, not Jetson absolute speeds), so energies are too. Every energy figure
carries its source.
"""

from __future__ import annotations

import json
import shutil
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edgepool import catalog, modes
from edgepool.errors import EdgepoolError, InfeasibleError, PlanError
from edgepool.cluster.coordinator import launch_pool
from edgepool.launch.local import Placement, RankFailed, launch_local, pool_placement
from edgepool.specs.job import JobSpec
from edgepool.specs.layout import check_plan
from edgepool.specs.metrics import STEP_TIME_STAT, Summary
from edgepool.specs.plan import Plan, Shape
from edgepool.specs.pool import PoolSpec

FAMILIES = modes.NAMES + ("pp",)  # a single stage in each mode, and pipelines


@dataclass
class StudyRow:
    name: str  # dp, sp, tp, pp or planner
    status: str  # ok | out of memory | timeout | failed | infeasible
    cause: str = ""
    plan_id: str = ""
    parallelism: str = ""
    plan: dict | None = None
    step_time_s: float | None = None
    samples_per_s: float | None = None
    energy_per_step_j: float | None = None
    energy_per_sample_j: float | None = None
    energy_source: str = "modelled"
    bytes_per_step: float | None = None
    final_loss: float | None = None
    devices: dict[str, dict] = field(default_factory=dict)  # peak_memory_bytes, busy_pct, energy_j, bytes_sent
    predicted_step_time_s: float | None = None
    predicted_energy_j: float | None = None
    prediction_source: str = ""
    predicted_fits: bool | None = None  # the cost model's memory check
    run_dir: str = ""


def device_figures(pool: PoolSpec, plan: Plan, summary: Summary, placement: Placement,
                   threads: int) -> dict[str, dict]:
    """Per device of a finished run: its meter's mean energy per timed step with the
    source label (``runtime.train.step_meter``), its busy % (CPU time over its CPU cap
    over the step time), power mode, cores, peak memory and bytes sent per step."""
    out: dict[str, dict] = {}
    for name in plan.devices:
        dev = pool.device(name)
        mode = catalog.get(dev.kind).power_mode(plan.power_modes.get(name, dev.power_mode))
        cores = placement.cores(name) or float(threads)
        d = summary.devices[name]
        busy = min(1.0, d.mean_cpu_s / cores / summary.step_time_s) if summary.step_time_s else 0.0
        out[name] = {"energy_j": d.mean_energy_j, "energy_source": d.energy_source, "busy_pct": 100.0 * busy,
                     "power_mode": mode.name, "cores": cores, "peak_memory_bytes": d.peak_memory_bytes,
                     "bytes_sent_per_step": d.bytes_sent / summary.steps}
    return out


def study_profile(pool: PoolSpec, job: JobSpec, placement: Placement, log=print):
    """The profile the study plans and predicts with, and a note saying what it is.

    ``launch.speeds.run_profile``, as plan, simulate and train use it. In the testbed
    with CPU caps: the model measured on this host (one core; cached), with its reference
    speed set from the testbed's CPU caps, so predictions are in this host's seconds like
    the measurements. Otherwise (no emulated device, or the testbed fell back to plain
    processes): the analytic profile (catalog seconds). Either as the job trains
    (``cost.profile.for_job``: its fine-tuning and backups).
    """
    from edgepool.launch.speeds import run_profile

    capped = placement.emulated and any(placement.cores(d.name) for d in pool.devices)
    speeds = run_profile(pool, job, log=log) if capped else run_profile(pool, job, scale=None, log=log)
    if speeds.scale is not None:
        return (speeds.profile,
                f"simulator (memory: cost model), profile measured on this host, testbed CPU caps "
                f"({speeds.scale.cores_per_speed:.3f} cores per unit speed)")
    return speeds.profile, "simulator (memory: cost model), analytic profile (catalog reference-device seconds)"


def study_plans(pool: PoolSpec, job: JobSpec, num_layers: int, families, profile) -> list[tuple[str, Plan | str]]:
    """(name, plan) per entry; a string instead of a plan says why there is none.

    The plain families are the paper's setting: every device takes part, with shares
    in proportion to speed (``proportional_plan``), so a family that cannot fit shows
    as a measured failure. The last entry is the planner's choice for step time.
    """
    from edgepool.launch.prepare import proportional_plan
    from edgepool.planner import plan as search

    out: list[tuple[str, Plan | str]] = []
    for fam in families:
        try:
            out.append((fam, proportional_plan(pool, job, num_layers, fam)))
        except PlanError as exc:
            out.append((fam, str(exc)))
    try:
        out.append(("planner", search(pool, job, profile, objective="time").plan))
    except (PlanError, InfeasibleError) as exc:
        out.append(("planner", str(exc)))
    return out


def run_study(pool: PoolSpec, job: JobSpec, *, out_dir: Path, steps: int, console=None, families=FAMILIES,
              deadline_s: float = 240.0, progress_bar=None) -> dict:
    """Measure every family's plan and the planner's on the pool, beside the predictions.

    ``progress_bar(plan, steps)``: a context manager with ``update(StepRecord)`` shown
    while a run trains (the CLI's progress bar); None shows nothing. The study holds
    ``out_dir``'s lock (``launch.folder``) while it runs; its ``runs/`` are its own and
    made anew each time.
    """
    from edgepool.launch import folder

    log = console.print if console is not None else print
    with folder.hold(out_dir, "edgepool study", log=log) as out:
        return _run_study(pool, job, out_dir=out, steps=steps, console=console, families=families,
                          deadline_s=deadline_s, progress_bar=progress_bar)


def _run_study(pool: PoolSpec, job: JobSpec, *, out_dir: Path, steps: int, console, families, deadline_s: float,
               progress_bar) -> dict:
    from edgepool.machine import machine_info
    from edgepool.report.study import write_study
    from edgepool.models.config import job_model_config
    from edgepool.runtime.train import RunSpec

    log = console.print if console is not None else print
    cfg = job_model_config(job)
    shape = Shape(global_batch=job.train.global_batch, seq_len=job.train.seq_len, num_heads=cfg.num_heads,
                  ffn=cfg.ffn, num_kv_heads=cfg.num_kv_heads)
    rows: list[StudyRow] = []
    notes: list[str] = []
    from edgepool.cost import estimate
    from edgepool.sim.engine import simulate

    with pool_placement(pool, log=log) as placement:
        notes += placement.notes
        # On the testbed, every run takes the real path of a pool across hosts: a
        # coordinator here and an `edgepool join` agent per device (``cluster``).
        launch = launch_pool if placement.emulated else launch_local
        if placement.emulated:
            notes.append("each run went through `edgepool serve`'s coordinator and one `edgepool join` agent per "
                         "device (pool token, TLS, the coordinator's store)")
        profile, prediction_source = study_profile(pool, job, placement, log=log)
        for name, plan in study_plans(pool, job, cfg.num_layers, families, profile):
            if isinstance(plan, str):
                rows.append(StudyRow(name=name, status="infeasible", cause=plan))
                continue
            row = StudyRow(name=name, status="ok", plan_id=plan.plan_id, parallelism=plan.parallelism,
                           plan=json.loads(plan.dumps()))
            run_dir = out_dir / "runs" / name
            row.run_dir = str(run_dir)
            try:
                check_plan(plan, shape, pool=pool, num_layers=cfg.num_layers)
                # The prediction is the simulator's (as the planner's estimate); the cost
                # model checks memory (an upper bound on the data owners).
                cost = estimate(plan, pool, profile, shape)
                sim = simulate(plan, pool, profile, shape)
                row.predicted_step_time_s, row.predicted_energy_j = sim.step_time_s, sim.energy_j
                row.prediction_source = prediction_source
                row.predicted_fits = cost.feasible
                shutil.rmtree(run_dir, ignore_errors=True)
                spec = RunSpec(pool=pool, job=job, plan=plan, out_dir=str(run_dir), steps=steps)
                log(f"[bold]{name}[/bold]: plan {plan.plan_id} ({plan.parallelism}, {len(plan.stages)} stage(s))")
                bar = progress_bar(plan, steps) if progress_bar is not None else None
                with bar if bar is not None else nullcontext():
                    summary = launch(spec, placement=placement, on_step=bar.update if bar is not None else None,
                                           deadline_s=deadline_s)
            except RankFailed as exc:
                row.status = ("out of memory" if "out of memory" in exc.reason
                              else "timeout" if exc.reason.startswith("timeout") else "failed")
                row.cause = exc.reason if exc.rank < 0 else f"rank {exc.rank} ({exc.device}): {exc.reason}"
                log(f"  {name}: {row.status}: {row.cause}")
                rows.append(row)
                continue
            except PlanError as exc:  # the plan cannot be built on this pool (e.g. a share rounds to zero)
                row.status, row.cause = "infeasible", str(exc)
                rows.append(row)
                continue
            except EdgepoolError as exc:
                row.status, row.cause = "failed", str(exc)
                rows.append(row)
                continue
            except Exception as exc:  # noqa: BLE001 - one run's failure, whatever it is, never ends the study
                row.status, row.cause = "failed", f"{type(exc).__name__}: {exc}"
                log(f"  {name}: failed: {row.cause}")
                rows.append(row)
                continue
            if not summary.steps or summary.step_time_s is None:  # one run's missing metrics never end the study
                row.status, row.cause = "failed", f"no usable metrics in {run_dir / 'metrics.jsonl'}"
                rows.append(row)
                continue
            # The run's step time (``specs.metrics.STEP_TIME_STAT``): a step can still be
            # warming up (the second of a GPipe plan often is), and the host is shared.
            row.step_time_s = summary.step_time_s
            row.samples_per_s = job.train.global_batch / row.step_time_s
            row.final_loss = summary.final_loss
            row.devices = device_figures(pool, plan, summary, placement, spec.threads)
            if all(d["energy_j"] is not None for d in row.devices.values()):
                row.energy_per_step_j = sum(d["energy_j"] for d in row.devices.values())
                row.energy_per_sample_j = row.energy_per_step_j / job.train.global_batch
            labels = sorted({d["energy_source"] for d in row.devices.values()})
            row.energy_source = labels[0] if len(labels) == 1 else f"mixed({','.join(labels)})"
            row.bytes_per_step = sum(d["bytes_sent_per_step"] for d in row.devices.values())
            rows.append(row)
    result = {
        "pool": pool.name, "machine": machine_info(), "steps": steps,
        "model": {"family": cfg.family, "hidden": cfg.hidden, "num_layers": cfg.num_layers, "num_params": cfg.num_params()},
        "global_batch": job.train.global_batch, "seq_len": job.train.seq_len,
        "testbed": notes, "emulated": placement.emulated,
        "prediction_source": prediction_source,
        "step_time_stat": STEP_TIME_STAT,
        "energy_note": "each rank's meter around each step: a sensor where one exists, else modelled (catalog busy/idle "
                       "power x measured busy time (CPU time / CPU cap) + radio energy per byte); rows say which",
        "rows": [asdict(r) for r in rows],
    }
    write_study(result, out_dir)
    return result
