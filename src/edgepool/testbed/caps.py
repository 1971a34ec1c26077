"""How much host CPU and memory each emulated device gets (pure functions).

CPU. Every emulated device has a relative speed: its ``compute_scale`` or the
catalog's ``relative_speed`` for its kind and power mode (1.0 = a Jetson Nano at MAXN).
The testbed keeps the *ratios* between devices and chooses one scale factor,
``cores_per_speed`` (host CPU cores per unit of relative speed), so that

- ``fit="sum"`` (default): the caps of all emulated devices add up to the host's CPUs,
  or less where that would give a device more than one core (``MAX_SUM_CORES``): a rank
  computes on one thread (``RunSpec.threads``), so a cap over one core would go unused
  and the device would compute slower than its share says. No two devices ever compete
  for a core, so the ratios hold even when every device computes at once (data, tensor
  and sequence parallelism).
- ``fit="fastest"``: the fastest device gets the whole host. Faster absolute times, but
  the caps add up to more than the host has whenever two or more devices are busy at
  once; the plan then carries a warning, because the pool would lie.

``cap_cores = speed * cores_per_speed``, never below ``min_cores``. Absolute times on
the testbed are this host's; only the ratios are the pool's.

``cores_per_speed`` is the one place that arithmetic lives: ``plan_caps`` uses it to
set the caps, and ``cpu_scale`` uses it to say, without bringing a testbed up, what
scale the testbed will give a pool (``launch.speeds``: what plan, simulate, train and
the study predict with on an emulated pool).

Memory. ``DeviceSpec.resolved_memory_gb()`` (the pool's ``memory_gb``, else the
catalog's memory less its OS reserve) is what the device gives to training; the cap is
that many bytes (1 GB = 10^9 bytes). ``memory_fit="exact"`` (default) keeps every cap exact, which
is what makes out-of-memory results faithful, and warns if the caps add up to more than
the host has available. ``memory_fit="fit"`` scales every cap by one factor so that the
caps add up to at most ``memory_headroom`` of the available memory; a model that fits
a device then needs the same scale, so use it only for smoke runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Literal, Sequence

from edgepool.specs.pool import DeviceSpec
from edgepool.testbed.cgroups import CFS_PERIOD_US, MIN_QUOTA_US

CpuFit = Literal["sum", "fastest"]
MemoryFit = Literal["exact", "fit"]

MIN_CORES = 0.05  # the smallest cap plan_caps gives a device
MAX_SUM_CORES = 1.0  # the largest cap fit="sum" gives a device: a rank computes on one thread


def cores_per_speed(speeds: Sequence[float], *, host_cpus: float, cpu_fit: CpuFit = "sum") -> float:
    """Host CPU cores per unit of relative speed for devices of ``speeds`` sharing
    ``host_cpus`` cores (the module docstring: ``sum``, at most one core a device, or
    ``fastest``); 0 for none."""
    if cpu_fit not in ("sum", "fastest"):
        raise ValueError(f"cpu_fit must be 'sum' or 'fastest', got {cpu_fit!r}")
    if host_cpus <= 0:
        raise ValueError(f"host_cpus must be > 0, got {host_cpus}")
    if not speeds:
        return 0.0
    if cpu_fit == "fastest":
        return host_cpus / max(speeds)
    return min(host_cpus / sum(speeds), MAX_SUM_CORES / max(speeds))


@dataclass(frozen=True)
class CpuScale:
    """The CPU scale a testbed gives a pool: a device of relative speed ``s`` computes
    on ``s * cores_per_speed`` host cores (``plan_caps``; never below its floor).

    ``host_cpus``: the cores the caps share; ``source``: where the figures come from
    (computed from the pool and this host, or the caps of a testbed that is up)."""

    cores_per_speed: float
    host_cpus: float
    cpu_fit: CpuFit
    source: str

    def reference_speed(self, threads: int = 1) -> float:
        """The relative speed of ``threads`` host cores: the reference speed of a profile
        measured on this host with that many threads (``ModelProfile.reference_speed_value``)."""
        return threads / self.cores_per_speed

    def describe(self) -> str:
        return (f"the testbed's CPU scale, 1.0 relative speed = {self.cores_per_speed:.3f} host cores "
                f"(the caps share {self.host_cpus:g} host cores, fit={self.cpu_fit}; {self.source})")


def cpu_scale(devices: Sequence[DeviceSpec], *, host_cpus: float, cpu_fit: CpuFit = "sum",
              source: str = "computed from the pool") -> CpuScale | None:
    """The scale ``plan_caps`` gives ``devices`` (the ``host: emulated`` ones are taken;
    None when there are none): pure, no testbed needed."""
    emulated = [d for d in devices if d.host == "emulated"]
    if not emulated:
        return None
    cps = cores_per_speed([d.speed() for d in emulated], host_cpus=host_cpus, cpu_fit=cpu_fit)
    return CpuScale(cores_per_speed=cps, host_cpus=host_cpus, cpu_fit=cpu_fit, source=source)


@dataclass(frozen=True)
class DeviceCaps:
    device: str
    speed: float
    cpu_cores: float
    cpu_quota_us: int
    cpu_period_us: int
    memory_bytes: int
    cpus: tuple[int, ...] = ()  # host CPUs the device is pinned to (empty: not pinned)

    @property
    def num_threads(self) -> int:
        """Threads a rank should use: enough to consume its cap, at least one."""
        return max(1, math.ceil(self.cpu_cores - 1e-9))


@dataclass(frozen=True)
class CapsPlan:
    devices: tuple[DeviceCaps, ...]
    host_cpus: float
    host_memory_bytes: int
    cores_per_speed: float
    memory_scale: float
    cpu_fit: CpuFit
    memory_fit: MemoryFit
    warnings: tuple[str, ...] = field(default_factory=tuple)

    def of(self, device: str) -> DeviceCaps:
        for c in self.devices:
            if c.device == device:
                return c
        raise KeyError(device)

    @property
    def total_cores(self) -> float:
        return sum(c.cpu_cores for c in self.devices)

    def scale(self, source: str) -> CpuScale:
        """These caps' CPU scale (``cpu_scale``'s type)."""
        return CpuScale(cores_per_speed=self.cores_per_speed, host_cpus=self.host_cpus, cpu_fit=self.cpu_fit,
                        source=source)

    def describe(self) -> str:
        pinned = "; ".join(f"{c.device} on CPU {','.join(map(str, c.cpus))}" for c in self.devices if c.cpus)
        return (
            f"CPU scale: 1.0 relative speed = {self.cores_per_speed:.3f} host cores "
            f"({self.total_cores:.2f} of {self.host_cpus:g} host cores capped, fit={self.cpu_fit}); "
            f"memory scale {self.memory_scale:.3f} (fit={self.memory_fit})" + (f"; pinned: {pinned}" if pinned else "")
        )


def plan_caps(
    devices: Sequence[DeviceSpec],
    *,
    host_cpus: float,
    host_memory_bytes: int,
    cpu_fit: CpuFit = "sum",
    memory_fit: MemoryFit = "exact",
    min_cores: float = MIN_CORES,
    memory_headroom: float = 0.8,
    period_us: int = CFS_PERIOD_US,
    cpu_ids: Sequence[int] = (),
) -> CapsPlan:
    """Caps for ``devices`` (the emulated ones) on a host with ``host_cpus`` CPUs."""
    if memory_fit not in ("exact", "fit"):
        raise ValueError(f"memory_fit must be 'exact' or 'fit', got {memory_fit!r}")
    speeds = [d.speed() for d in devices]
    cps = cores_per_speed(speeds, host_cpus=host_cpus, cpu_fit=cpu_fit)  # checks cpu_fit and host_cpus
    warnings: list[str] = []
    if not devices:
        return CapsPlan((), host_cpus, host_memory_bytes, 0.0, 1.0, cpu_fit, memory_fit, ())
    mems = [int(round(d.resolved_memory_gb() * 1e9)) for d in devices]
    memory_scale = 1.0
    total_mem = sum(mems)
    if memory_fit == "fit" and host_memory_bytes > 0 and total_mem > memory_headroom * host_memory_bytes:
        memory_scale = memory_headroom * host_memory_bytes / total_mem
    caps = []
    for d, s, m in zip(devices, speeds, mems):
        raw = s * cps
        cores = max(min_cores, raw)
        # A short period keeps the cap a rate, not a burst budget (see cgroups.CFS_PERIOD_US);
        # a small cap gets a longer period, because the kernel refuses quotas under 1 ms.
        dev_period = max(period_us, math.ceil(MIN_QUOTA_US / cores))
        if cores > raw + 1e-12:
            warnings.append(
                f"{d.name}: relative speed {s:g} would get {raw:.3f} cores; raised to the "
                f"floor of {cores:.3f} cores, so it runs relatively faster than the pool says"
            )
        caps.append(
            DeviceCaps(
                device=d.name,
                speed=s,
                cpu_cores=cores,
                cpu_quota_us=int(round(cores * dev_period)),
                cpu_period_us=dev_period,
                memory_bytes=int(m * memory_scale),
            )
        )
    if cpu_ids:
        pins = pin_cpus({c.device: c.cpu_cores for c in caps}, cpu_ids)
        caps = [replace(c, cpus=pins[c.device]) for c in caps]
    total_cores = sum(c.cpu_cores for c in caps)
    if total_cores > host_cpus * 1.001:
        warnings.append(
            f"CPU caps add up to {total_cores:.2f} cores but this host has {host_cpus:g}: devices that compute "
            f"at the same time slow each other down and the measured ratios lie; use cpu_fit='sum' or fewer devices"
        )
    if memory_fit == "exact" and host_memory_bytes > 0 and total_mem > host_memory_bytes:
        warnings.append(
            f"memory caps add up to {total_mem / 1e9:.1f} GB but the host has {host_memory_bytes / 1e9:.1f} GB "
            f"available: the host may run out of memory before a device does; use memory_fit='fit' for a smoke run"
        )
    return CapsPlan(
        devices=tuple(caps),
        host_cpus=host_cpus,
        host_memory_bytes=host_memory_bytes,
        cores_per_speed=cps,
        memory_scale=memory_scale,
        cpu_fit=cpu_fit,
        memory_fit=memory_fit,
        warnings=tuple(warnings),
    )


def pin_cpus(cores: dict[str, float], cpu_ids: Sequence[int]) -> dict[str, tuple[int, ...]]:
    """Host CPUs for each device: the caps placed largest first, each on the CPU with
    the most room left (worst fit, so the room left for the launcher is spread).

    A device capped at c cores gets ``ceil(c)`` CPUs. Pinned, a device's thread stays on
    its CPU; unpinned, the scheduler moved the devices' threads between this host's
    CPUs, and the cache refills made a device spend more CPU time per step than the
    same work alone (the figures are in the commit that added pinning).
    """
    room = {cpu: 1.0 for cpu in cpu_ids}
    out: dict[str, tuple[int, ...]] = {}
    for name, c in sorted(cores.items(), key=lambda kv: (-kv[1], kv[0])):
        k = max(1, math.ceil(c - 1e-9))
        pick = sorted(sorted(room, key=lambda cpu: (-room[cpu], cpu))[:k])
        share = c / len(pick)
        for cpu in pick:
            room[cpu] -= share
        out[name] = tuple(pick)
    return out
