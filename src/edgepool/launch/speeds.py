"""Device speeds in the seconds a run will take: one answer for ``plan``,
``simulate``, ``train --parallelism auto`` (``launch.prepare``), ``serve`` (which plans
through ``prepare``) and the study.

A pool with no ``host: emulated`` device: nothing changes. The profile is the given one
(``--profile``) or the analytic one (the catalog reference device's seconds), as the job
trains it (``cost.profile.for_job``).

An emulated pool runs in the testbed, where a device of relative speed ``s`` computes
on ``s * cores_per_speed`` cores of this host (``testbed.caps``) while its links carry
the pool's rates. Prices in catalog seconds would then put compute and network in the
wrong ratio, and the planner would choose for another pool. So on an emulated pool:

- the scale is the caps of a testbed that is up for the pool (whatever options brought
  it up), else the caps' own arithmetic (``testbed.caps.cpu_scale``) over this host's
  CPUs less the testbed's reserve (``testbed.cgroups.device_cpus``) with the default
  fit. Nothing is brought up. ASSUMED: the run gets those caps. Where the testbed is
  unavailable (no root, no tc) the devices run uncapped, and ``train`` says so;
- the profile is the model measured on one core of this host
  (``profiler.layers.cached_profile``: measured once, then cached), with reference speed
  ``1 / cores_per_speed`` (``CpuScale.reference_speed``). A device of speed ``s`` then
  takes the one-core time divided by its cap ``s * cores_per_speed``, as in the testbed;
- a profile file measured on this host (``source: measured``, reference kind
  ``host-cpu``; ``edgepool profile`` measures on one thread) gets the same reference
  speed. Any other profile file is kept as it is, and the speeds line says that its
  predictions are not in the testbed's seconds.

In a pool that mixes emulated and local devices, the local ones run uncapped; the scale
is applied to every device all the same (the study did so before this module).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from edgepool.cost.profile import ModelProfile
from edgepool.specs.pool import PoolSpec
from edgepool.testbed.caps import CpuScale

HOST_KIND = "host-cpu"  # the reference kind of a profile measured on this host (``profiler``)
_FROM_HOST = object()  # run_profile's default: the scale from ``host_scale``


@dataclass(frozen=True)
class Speeds:
    """The profile to plan and predict with, and what speeds it prices.

    ``scale``: the testbed's CPU scale applied to the profile (None: not applied);
    ``line``: one line that says so, for an emulated pool (None for any other pool)."""

    profile: ModelProfile
    scale: CpuScale | None
    line: str | None


def host_scale(pool: PoolSpec) -> CpuScale | None:
    """The CPU scale the testbed gives ``pool`` on this host (module docstring); None when
    no device is emulated, or when the testbed that is up for it has no CPU caps."""
    if not any(d.host == "emulated" for d in pool.devices):
        return None
    from edgepool.testbed import Testbed, cgroups, cpu_scale

    state = Testbed.attach(pool)
    if state is not None and state.emulated:
        return state.caps.scale(f"the caps of testbed {state.tag}, which is up") if state.caps else None
    return cpu_scale(pool.devices, host_cpus=cgroups.device_cpus(),
                     source=f"computed for this host's {cgroups.host_cpus():g} cores less "
                            f"{cgroups.HOST_RESERVE_CPUS:g} for the host")


def measured_profile(job, log=print) -> ModelProfile:
    """The job's model measured on one core of this host (cached; measured when missing)."""
    from edgepool.models.config import job_model_config
    from edgepool.profiler.layers import cached_profile

    t = job.train
    prof, path, cached = cached_profile(job_model_config(job), seq_len=t.seq_len, optimizer=t.optimizer,
                                        precision=t.precision)
    log(f"profile: {prof.model} measured on this host ({'cached' if cached else 'now'}: {path})")
    return prof


def on_this_host(profile: ModelProfile) -> bool:
    """Whether ``profile`` was measured on this host's CPU (``profiler.measure_profile``)."""
    return profile.source == "measured" and profile.reference_kind == HOST_KIND


def run_profile(pool: PoolSpec, job, path: str | None = None, *, scale=_FROM_HOST, log=print) -> Speeds:
    """The profile to plan and predict ``job`` on ``pool`` with, as the run will train it
    (``for_job``) and at the speeds the run will get (module docstring).

    ``path``: a profile file, else the analytic profile, or the measured one on an
    emulated pool. ``scale``: the CPU scale (default ``host_scale(pool)``; None: none)."""
    from edgepool.cost.profile import for_job
    from edgepool.planner.search import job_profile

    if scale is _FROM_HOST:
        scale = host_scale(pool)
    emulated = any(d.host == "emulated" for d in pool.devices)
    if path is not None:
        prof = ModelProfile.load(path)
    elif scale is not None:
        prof = measured_profile(job, log=log)
    else:
        prof = job_profile(job)
    if scale is not None and on_this_host(prof):
        prof = replace(prof, reference_speed_value=scale.reference_speed())
        line = (f"speeds: {scale.describe()}; the profile is one core of this host, so a device of relative speed "
                f"s computes on s x {scale.cores_per_speed:.3f} cores, in this host's seconds")
        return Speeds(for_job(prof, job), scale, line)
    line = None
    if emulated and scale is None:
        line = ("speeds: catalog relative speeds: no CPU caps apply to these devices (the testbed that is up for "
                "this pool has none, or the run falls back to plain processes)")
    elif emulated:
        line = (f"speeds: catalog relative speeds, not the testbed's CPU scale: the profile ({prof.source}, reference "
                f"{prof.reference_kind}) was not measured on this host, so predictions are in its reference "
                f"device's seconds, not the testbed's")
    return Speeds(prof if path is None else for_job(prof, job), None, line)
