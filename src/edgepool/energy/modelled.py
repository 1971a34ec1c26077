"""Modelled energy for devices without a power sensor (emulated or unsensored).

For each device and window of wall time ``T``:

    busy_s  = min(T, cpu_s / cores)
    E       = busy_w * busy_s + idle_w * (T - busy_s) + radio_j_per_mb * tx_bytes / 1e6

- ``busy_w`` and ``idle_w`` are the catalog's figures for the device's kind and power
  mode (its whole-board power when training and when idle);
- ``cpu_s`` is the CPU time the device's processes used in the window, measured: a
  cgroup's CPU accounting (``cpuacct.usage`` on v1, ``cpu.stat usage_usec`` on v2) or a
  process's own CPU time;
- ``cores`` is the CPU the device may use (its testbed CPU cap, or the host's cores):
  ``cpu_s / cores`` is the time it would take at full use, i.e. the device's busy time;
- ``tx_bytes`` is what the device sent in the window (its link's counter), and
  ``radio_j_per_mb`` the catalog's radio energy per megabyte (10^6 bytes) sent.

This is a linear utilisation model (energy = idle power all the time, plus the
busy-idle difference while busy); it ignores DVFS and memory-bound phases. The source
of every figure is ``"modelled"``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from edgepool import catalog
from edgepool.energy.base import SOURCE_MODELLED, Availability, EnergyReading, WindowedMeter

Counter = Callable[[], float]


def cgroup_cpu_seconds(cgroup_dir: str | Path) -> Counter:
    """A counter of CPU seconds used in a cgroup (v1 cpuacct dir or v2 dir)."""
    d = Path(cgroup_dir)

    def read() -> float:
        v1 = d / "cpuacct.usage"
        if v1.exists():
            return int(v1.read_text()) / 1e9
        for line in (d / "cpu.stat").read_text().splitlines():
            k, _, v = line.partition(" ")
            if k == "usage_usec":
                return int(v) / 1e6
        raise KeyError(f"no usage_usec in {d / 'cpu.stat'}")

    return read


def process_cpu_seconds(pid: int | None = None, children: bool = True) -> Counter:
    """A counter of CPU seconds of a process (this one if ``pid`` is None).

    Reads ``/proc/<pid>/stat`` (utime + stime, plus waited-for children if
    ``children``); for this process without /proc, ``os.times()``.
    """
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def read() -> float:
        p = Path(f"/proc/{pid if pid is not None else 'self'}/stat")
        try:
            raw = p.read_text()
        except OSError:
            if pid is not None:
                raise
            t = os.times()
            return t.user + t.system + ((t.children_user + t.children_system) if children else 0.0)
        fields = raw[raw.rindex(")") + 2 :].split()
        # fields[11..14] are utime, stime, cutime, cstime (stat fields 14-17).
        total = int(fields[11]) + int(fields[12])
        if children:
            total += int(fields[13]) + int(fields[14])
        return total / tick

    return read


def interface_tx_bytes(ifname: str, direction: str = "tx") -> Counter:
    """A counter of bytes sent (``tx``) or received (``rx``) on a link of this namespace."""
    path = Path("/sys/class/net") / ifname / "statistics" / f"{direction}_bytes"
    return lambda: float(path.read_text())


@dataclass(frozen=True)
class ModelledDevice:
    """Power figures and measured counters of one device."""

    name: str
    busy_w: float
    idle_w: float
    radio_j_per_mb: float
    cores: float
    cpu_s: Counter
    tx_bytes: Counter | None = None

    @classmethod
    def from_catalog(
        cls,
        name: str,
        kind: str,
        *,
        power_mode: str | None = None,
        cores: float,
        cpu_s: Counter,
        tx_bytes: Counter | None = None,
    ) -> "ModelledDevice":
        k = catalog.get(kind)
        mode = k.power_mode(power_mode)
        return cls(name, mode.busy_w, mode.idle_w, k.radio_j_per_mb, cores, cpu_s, tx_bytes)

    @classmethod
    def from_spec(cls, device, *, cores: float, cpu_s: Counter, tx_bytes: Counter | None = None) -> "ModelledDevice":
        """From a ``DeviceSpec`` (its kind and power mode)."""
        return cls.from_catalog(device.name, device.kind, power_mode=device.power_mode, cores=cores, cpu_s=cpu_s, tx_bytes=tx_bytes)


def model_energy_j(
    *, busy_w: float, idle_w: float, radio_j_per_mb: float, wall_s: float, cpu_s: float, cores: float, tx_bytes: float
) -> dict[str, float]:
    """The model above as a pure function; returns energy_j and its parts."""
    if cores <= 0:
        raise ValueError(f"cores must be > 0, got {cores}")
    from edgepool.cost.model import EnergyParts

    busy_s = min(wall_s, max(0.0, cpu_s) / cores)
    e = EnergyParts.of(busy_w=busy_w, idle_w=idle_w, radio_j_per_mb=radio_j_per_mb, wall_s=wall_s, busy_s=busy_s,
                       radio_bytes=tx_bytes)
    return {
        "energy_j": sum(e.values()),
        "busy_s": busy_s,
        "idle_s": max(0.0, wall_s - busy_s),
        "cpu_s": cpu_s,
        "tx_bytes": tx_bytes,
        "compute_j": e["busy_energy_j"],
        "idle_j": e["idle_energy_j"],
        "radio_j": e["radio_energy_j"],
    }


class ModelledMeter(WindowedMeter):
    """Modelled energy of several devices at once (see the module docstring)."""

    name = "modelled"

    def __init__(self, devices: Sequence[ModelledDevice], clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(clock)
        if not devices:
            raise ValueError("ModelledMeter needs at least one device")
        self.devices = tuple(devices)

    @classmethod
    def for_this_process(cls, device, *, cores: float | None = None) -> "ModelledMeter":
        """This process as ``device`` (a DeviceSpec): its CPU time, no radio counter."""
        if cores is None:
            try:
                cores = float(len(os.sched_getaffinity(0)))
            except (AttributeError, OSError):
                cores = float(os.cpu_count() or 1)
        return cls([ModelledDevice.from_spec(device, cores=cores, cpu_s=process_cpu_seconds())])

    def is_available(self) -> Availability:
        for d in self.devices:
            try:
                d.cpu_s()
                if d.tx_bytes is not None:
                    d.tx_bytes()
            except (OSError, KeyError, ValueError) as exc:
                return Availability(False, f"cannot read the counters of {d.name}: {exc}")
        return Availability(True)

    def _snapshot(self) -> object:
        return {d.name: (d.cpu_s(), d.tx_bytes() if d.tx_bytes else 0.0) for d in self.devices}

    def _readings(self, start: object, start_s: float, end_s: float) -> dict[str, EnergyReading]:
        assert isinstance(start, dict)
        out = {}
        wall_s = end_s - start_s
        for d in self.devices:
            cpu0, tx0 = start[d.name]
            parts = model_energy_j(
                busy_w=d.busy_w,
                idle_w=d.idle_w,
                radio_j_per_mb=d.radio_j_per_mb,
                wall_s=wall_s,
                cpu_s=d.cpu_s() - cpu0,
                cores=d.cores,
                tx_bytes=(d.tx_bytes() - tx0) if d.tx_bytes else 0.0,
            )
            energy = parts.pop("energy_j")
            out[d.name] = EnergyReading(d.name, energy, wall_s, SOURCE_MODELLED, parts)
        return out
