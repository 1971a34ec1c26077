"""The device catalog: device kinds as data, each figure with its public source.

The data lives in ``devices.yaml`` beside this module; this module only loads and
queries it. Units: ``_gflops`` is 10^9 floating-point operations per second (peak),
``_gb`` is 10^9 bytes, ``_gbps`` is 10^9 bytes per second, ``_w`` is watts, ``_mhz``
megahertz, ``radio_j_per_mb`` joules per 10^6 bytes sent or received.

``relative_speed`` is the kind's effective training throughput relative to the
reference kind ``jetson-nano`` at its maximum power mode: peak fp32 of the unit that
trains (GPU if the kind has one, else CPU) times the mode's ``compute_fraction`` times
the kind's ``train_efficiency``. The runtime uses it to share work in proportion to
speed, the testbed to keep speed ratios between emulated devices, and the cost model
to scale a profile measured on one kind to another.

Invariants: every kind has at least one power mode; ``compute_fraction`` is in (0, 1]
and the maximum mode (the largest fraction) is the default; figures are never typed
into code, only into ``devices.yaml`` with a source.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import yaml

from edgepool.errors import SpecError

REFERENCE_KIND = "jetson-nano"


@dataclass(frozen=True)
class PowerMode:
    name: str
    budget_w: float
    idle_w: float
    busy_w: float
    # Fraction of the kind's peak compute available in this mode (clock caps).
    compute_fraction: float
    cpu_max_mhz: float | None = None
    gpu_max_mhz: float | None = None
    cpu_online: int | None = None

    @property
    def joules_per_unit_work(self) -> float:
        """Busy watts per unit of compute fraction: lower means more work per joule."""
        return self.busy_w / self.compute_fraction


@dataclass(frozen=True)
class DeviceKind:
    id: str
    name: str
    memory_gb: float
    mem_bandwidth_gbps: float
    cpu_fp32_gflops: float
    gpu_fp32_gflops: float
    gpu_fp16_gflops: float
    power_modes: tuple[PowerMode, ...]
    radio_j_per_mb: float
    sources: dict[str, str] = field(default_factory=dict)
    accelerator: str = "gpu"
    cpu_fp16_gflops: float | None = None
    reserved_gb: float = 0.0
    train_efficiency: float = 1.0

    @property
    def max_mode(self) -> PowerMode:
        return max(self.power_modes, key=lambda m: m.compute_fraction)

    def power_mode(self, name: str | None) -> PowerMode:
        if name is None:
            return self.max_mode
        for m in self.power_modes:
            if m.name == name:
                return m
        known = ", ".join(m.name for m in self.power_modes)
        raise SpecError(f"unknown power_mode {name!r} for kind {self.id!r}; known modes: {known}")

    def peak_gflops(self, power_mode: str | None = None, dtype: str = "fp32") -> float:
        if dtype == "fp16":
            gpu, cpu = self.gpu_fp16_gflops, (self.cpu_fp16_gflops or self.cpu_fp32_gflops)
        else:
            gpu, cpu = self.gpu_fp32_gflops, self.cpu_fp32_gflops
        return max(gpu, cpu) * self.power_mode(power_mode).compute_fraction

    def effective_gflops(self, power_mode: str | None = None, dtype: str = "fp32") -> float:
        """Peak times ``train_efficiency``: the rate training reaches (an estimate)."""
        return self.peak_gflops(power_mode, dtype) * self.train_efficiency

    def relative_speed(self, power_mode: str | None = None) -> float:
        return self.effective_gflops(power_mode) / get(REFERENCE_KIND).effective_gflops()

    @property
    def usable_memory_gb(self) -> float:
        return self.memory_gb - self.reserved_gb


def _check(kind: DeviceKind) -> None:
    if not kind.power_modes:
        raise SpecError(f"catalog kind {kind.id!r} has no power modes")
    for m in kind.power_modes:
        if not 0 < m.compute_fraction <= 1:
            raise SpecError(f"catalog kind {kind.id!r} mode {m.name!r}: compute_fraction {m.compute_fraction} not in (0, 1]")
        if m.idle_w > m.busy_w:
            raise SpecError(f"catalog kind {kind.id!r} mode {m.name!r}: idle_w {m.idle_w} exceeds busy_w {m.busy_w}")


@lru_cache(maxsize=1)
def _load() -> dict[str, DeviceKind]:
    raw = yaml.safe_load((Path(__file__).with_name("devices.yaml")).read_text())
    out: dict[str, DeviceKind] = {}
    for entry in raw["kinds"]:
        entry = dict(entry)
        modes = tuple(PowerMode(**m) for m in entry.pop("power_modes"))
        kind = DeviceKind(power_modes=modes, **entry)
        _check(kind)
        out[kind.id] = kind
    return out


def kinds() -> list[DeviceKind]:
    return list(_load().values())


def get(kind: str) -> DeviceKind:
    table = _load()
    if kind not in table:
        raise SpecError(f"unknown device kind {kind!r}; known kinds: {', '.join(table)} (see `edgepool devices`)")
    return table[kind]
