"""Everything checked before any process starts, and the plan a run executes.

``prepare_run`` loads and validates pool, job and plan, resolves the model config,
checks every data owner's local file (it exists, is readable, is text or JSONL with the
field, and holds at least one sample: ``data.check_file``; one line per bad file) and
the plan's splits, and returns a ``RunSpec``.
Any problem is a one-line ``EdgepoolError``.

Without a plan file, ``--parallelism M`` takes the planner's best plan of that family
(``family_plan``). ``proportional_plan`` is the plain family plan over every device,
with shares in proportion to speed (``compute_scale`` or the catalog's figure); the
study runs it, and ``train`` falls back to it when the planner finds nothing that fits.
"""

from __future__ import annotations

from pathlib import Path

from edgepool.errors import InfeasibleError, PlanError, SpecError
from edgepool.specs.job import MAX_STEPS, JobSpec, load_job
from edgepool.specs.layout import check_plan
from edgepool.specs.plan import Plan, Shape, StagePlan, load_plan, split_counts
from edgepool.specs.pool import PoolSpec, load_pool

from edgepool import modes

# Plan families: one device, a single stage in each mode, pipelines.
FAMILIES = ("single",) + modes.NAMES + ("pp", "hybrid")


def _microbatches(global_batch: int, target: int) -> int:
    """The largest divisor of the global batch that is at most ``target``."""
    return max(d for d in range(1, min(global_batch, max(1, target)) + 1) if global_batch % d == 0)


def proportional_plan(pool: PoolSpec, job: JobSpec, num_layers: int, family: str) -> Plan:
    devices = list(pool.devices)
    speed = {d.name: d.speed() for d in devices}
    by_speed = sorted(devices, key=lambda d: -speed[d.name])
    par = job.parallelism
    mbs = par.num_microbatches
    schedule = par.schedule or "1f1b"
    if family == "single":
        return Plan(num_layers=num_layers, stages=[StagePlan(layers=(0, num_layers), devices=(by_speed[0].name,))])
    if family in modes.NAMES:
        names = tuple(d.name for d in devices)
        # One stage: micro-batches would only be gradient accumulation; they are for pipelines.
        return Plan(num_layers=num_layers, num_microbatches=1, schedule="gpipe",
                    stages=[StagePlan(layers=(0, num_layers), devices=names, mode=family,
                                      shares=tuple(speed[n] for n in names))])
    if family == "pp":
        groups = [(d.name,) for d in devices]
    elif family == "hybrid":
        if len(devices) < 3:
            raise PlanError("a hybrid plan needs at least 3 devices (a dp group and another stage); use pp or dp")
        # Asteroid-style: the slower devices form a dp group for the first stage, the
        # fastest device serves the second stage alone.
        groups = [tuple(d.name for d in by_speed[1:]), (by_speed[0].name,)]
    else:
        raise PlanError(f"unknown parallelism {family!r}; known: {', '.join(FAMILIES)}, auto")
    if len(groups) > num_layers:
        raise PlanError(f"{family} over {len(groups)} stages needs at least {len(groups)} layers; the model has {num_layers}")
    group_speed = [sum(speed[n] for n in g) for g in groups]
    counts = list(split_counts(num_layers, group_speed))
    for i, c in enumerate(counts):  # every stage needs a layer: take one from the largest
        if c == 0:
            j = counts.index(max(counts))
            counts[j] -= 1
            counts[i] = 1
    stages, start = [], 0
    for g, c in zip(groups, counts):
        stages.append(StagePlan(layers=(start, start + c), devices=g,
                                shares=tuple(speed[n] for n in g) if len(g) > 1 else None))
        start += c
    return Plan(num_layers=num_layers, stages=stages, schedule=schedule,
                num_microbatches=mbs or _microbatches(job.train.global_batch, 2 * len(stages)))


def family_plan(pool: PoolSpec, job: JobSpec, num_layers: int, family: str, log=print) -> Plan:
    """The plan for ``--parallelism family``.

    ``auto``: the planner's best plan. A mode (``dp|sp|tp|fsdp``) or ``pp``: the planner's best plan of that
    family; when none fits, the proportional plan of that family over every device,
    with a warning (the user asked for it; it may run out of memory). ``single`` and
    ``hybrid``: the proportional plan.

    The planner prices the plans at the speeds the run will get (``launch.speeds``: on
    an emulated pool, the testbed's CPU scale), and says which when it applies.
    """
    from edgepool.launch.speeds import run_profile
    from edgepool.planner import plan_for_run

    if family == "auto" or family in modes.NAMES + ("pp",):
        speeds = run_profile(pool, job, log=log)
        if speeds.line:
            log(speeds.line)
    if family == "auto":
        return plan_for_run(pool, job, profile=speeds.profile)
    if family in modes.NAMES + ("pp",):
        try:
            return plan_for_run(pool, job, family=family, profile=speeds.profile)
        except InfeasibleError as exc:
            log(f"warning: the planner finds no {family} plan that fits ({str(exc)[:300]}); "
                f"running the proportional {family} plan over every device instead")
    return proportional_plan(pool, job, num_layers, family)


def prepare_run(pool_path: str | Path | PoolSpec, job_path: str | Path | JobSpec, *, out_dir: str | Path,
                plan_path: str | None = None, parallelism: str | None = None, steps: int | None = None,
                resume: bool = False, any_host: bool = False, log=print):
    """``any_host``: allow real hosts (their data files are checked on their own host).
    The pool and job are files, or specs already loaded (``serve`` plans for the devices that joined)."""
    from edgepool.data import check_file
    from edgepool.models.config import job_model_config
    from edgepool.models.lora import Tuning
    from edgepool.runtime.train import RunSpec

    pool = pool_path if isinstance(pool_path, PoolSpec) else load_pool(pool_path)
    job = job_path if isinstance(job_path, JobSpec) else load_job(job_path)
    cfg = job_model_config(job)
    need, have = 4 * cfg.num_params(), sum(d.resolved_memory_gb() for d in pool.devices) * 1e9
    if need > have:  # before anything is built: no split of the weights alone fits the pool
        raise SpecError(f"the model's {cfg.num_params():.3g} parameters need {need / 1e9:.3g} GB in fp32 but the pool's "
                        f"devices hold {have / 1e9:.3g} GB together; choose a smaller model or add devices")
    plan_file = plan_path or job.parallelism.plan
    if plan_file is not None and parallelism is not None:
        raise SpecError("give either --plan or --parallelism, not both")
    if plan_file is not None:
        plan = load_plan(plan_file)
    else:
        plan = family_plan(pool, job, cfg.num_layers, parallelism or job.parallelism.mode, log=log)
    shape = Shape(global_batch=job.train.global_batch, seq_len=job.train.seq_len, num_heads=cfg.num_heads, ffn=cfg.ffn,
                  num_kv_heads=cfg.num_kv_heads)
    check_plan(plan, shape, pool=pool, num_layers=cfg.num_layers)
    from edgepool.sim.lower import is_data_owner

    problems = []
    for rank, name in enumerate(plan.devices):
        dev = pool.device(name)
        if not dev.is_local and any_host:
            continue
        if not dev.is_local:
            raise SpecError(f"device {name!r} is on host {dev.host!r}; `edgepool train` starts local devices only; "
                            "for real hosts run `edgepool serve` here and `edgepool join` on each host")
        if is_data_owner(plan, rank):
            try:
                check_file(job.data.path_for(name), seq_len=job.train.seq_len, fmt=job.data.format,
                           text_field=job.data.text_field, pretrained=job.model.pretrained)
            except SpecError as exc:
                problems.append(f"device {name!r}: {exc}")
    if problems:  # one line per bad file, all of them at once
        raise SpecError("\n".join(problems))
    n_steps = steps if steps is not None else job.train.steps
    if not 0 < n_steps <= MAX_STEPS:
        raise SpecError(f"--steps must be 1..{MAX_STEPS}, got {n_steps}")
    base = ""
    if job.model.pretrained is not None and Tuning.of(job.train) is not None:
        from edgepool.models.hf import weights_digest

        base = weights_digest(job.model.pretrained)
    return RunSpec(pool=pool, job=job, plan=plan, out_dir=str(Path(out_dir).resolve()), steps=n_steps, resume=resume,
                   base=base)
