"""The device catalog: device kinds as data, each figure with its public source.

The data lives in ``devices.yaml`` beside this module; this module only loads and
queries it. Units: ``_gflops`` is 10^9 floating-point operations per second (peak),
``_gb`` is 10^9 bytes, ``_gbps`` is 10^9 bytes per second, ``_w`` is watts.

``relative_speed`` is the kind's effective training throughput relative to the
reference kind ``jetson-nano`` at its maximum power mode; the runtime uses it to share
work in proportion to speed, and the testbed to keep speed ratios between emulated
devices.
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
        gpu = self.gpu_fp16_gflops if dtype == "fp16" else self.gpu_fp32_gflops
        return max(gpu, self.cpu_fp32_gflops) * self.power_mode(power_mode).compute_fraction

    def relative_speed(self, power_mode: str | None = None) -> float:
        return self.peak_gflops(power_mode) / get(REFERENCE_KIND).peak_gflops()


@lru_cache(maxsize=1)
def _load() -> dict[str, DeviceKind]:
    raw = yaml.safe_load((Path(__file__).with_name("devices.yaml")).read_text())
    out: dict[str, DeviceKind] = {}
    for entry in raw["kinds"]:
        modes = tuple(PowerMode(**m) for m in entry.pop("power_modes"))
        out[entry["id"]] = DeviceKind(power_modes=modes, **entry)
    return out


def kinds() -> list[DeviceKind]:
    return list(_load().values())


def get(kind: str) -> DeviceKind:
    table = _load()
    if kind not in table:
        raise SpecError(f"unknown device kind {kind!r}; known kinds: {', '.join(table)} (see `edgepool devices`)")
    return table[kind]
