"""Measured energy of this machine through Zeus (NVML GPUs, CPU RAPL, Jetson rails).

Zeus is an optional extra (``pip install edgepool[zeus]``) and is imported only when the
meter is first used. One meter covers the device it runs on (one rank per device), so
each rank reports its own device.

What counts as the device's energy, by what Zeus found:

- a Jetson (``soc_energy.total_energy_mj``, the INA3221 board input rail): that
  total alone, source ``measured:zeus/jetson``;
- another SoC (Apple silicon): the sum of its CPU, GPU, DRAM and ANE fields, source
  ``measured:zeus/soc``;
- otherwise: GPU energy (NVML) + CPU package energy + DRAM energy (RAPL), source e.g.
  ``measured:zeus/nvml+rapl``. This misses the rest of the board (fans, disks, NIC),
  so it is lower than a wall meter would read.

Zeus without any sensor (a VM without RAPL, as on the project's build machine) measures
time only; the meter then reports itself unavailable, so ``select_meter`` falls back
to the modelled or the null meter instead of reporting 0 J.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

from edgepool.energy.base import Availability, EnergyReading, WindowedMeter, measured

_APPLE_FIELDS = ("cpu_total_mj", "gpu_mj", "gpu_sram_mj", "dram_mj", "ane_mj")


def zeus_importable() -> Availability:
    try:
        import zeus.monitor  # noqa: F401
    except ImportError as exc:
        missing = f" (missing module {exc.name})" if exc.name and exc.name != "zeus" else ""
        return Availability(False, f"zeus is not installed{missing}; pip install 'edgepool[zeus]'")
    except Exception as exc:  # zeus probes hardware at import on some versions
        return Availability(False, f"zeus failed to import: {type(exc).__name__}: {exc}")
    return Availability(True)


def energy_of(measurement) -> tuple[float | None, str, dict[str, float]]:
    """(energy_j, sensor, detail) of a ``zeus.monitor.energy.Measurement``."""
    detail: dict[str, float] = {}
    soc = getattr(measurement, "soc_energy", None)
    if soc is not None:
        total_mj = getattr(soc, "total_energy_mj", None)
        if total_mj is not None:
            for f in ("cpu_energy_mj", "gpu_energy_mj"):
                v = getattr(soc, f, None)
                if v is not None:
                    detail[f.replace("_mj", "_j")] = v / 1000.0
            return total_mj / 1000.0, "zeus/jetson", detail
        parts = {f: getattr(soc, f, None) for f in _APPLE_FIELDS}
        parts = {f: v for f, v in parts.items() if isinstance(v, (int, float))}
        if parts:
            detail = {f.replace("_mj", "_j"): v / 1000.0 for f, v in parts.items()}
            return sum(parts.values()) / 1000.0, "zeus/soc", detail
    sensors = []
    total = 0.0
    for attr, sensor in (("gpu_energy", "nvml"), ("cpu_energy", "rapl"), ("dram_energy", "rapl-dram")):
        values = getattr(measurement, attr, None) or {}
        if values:
            s = float(sum(values.values()))
            detail[f"{attr}_j"] = s
            total += s
            if sensor.split("-")[0] not in sensors:
                sensors.append(sensor.split("-")[0])
    if not sensors:
        return None, "zeus", detail
    return total, "zeus/" + "+".join(sensors), detail


class ZeusMeter(WindowedMeter):
    """This machine's energy through ``zeus.monitor.ZeusMonitor`` (see module docstring)."""

    name = "zeus"

    def __init__(
        self,
        device: str,
        *,
        gpu_indices: Sequence[int] | None = None,
        cpu_indices: Sequence[int] | None = None,
        monitor_factory: Callable[..., object] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(clock)
        self.device = device
        self.gpu_indices = None if gpu_indices is None else list(gpu_indices)
        self.cpu_indices = None if cpu_indices is None else list(cpu_indices)
        self._factory = monitor_factory
        self._monitor = None
        self._why: str | None = None
        self._count = 0

    def _get_monitor(self):
        if self._monitor is None and self._why is None:
            factory = self._factory
            if factory is None:
                ok = zeus_importable()
                if not ok:
                    self._why = ok.reason
                    return None
                from zeus.monitor import ZeusMonitor

                factory = ZeusMonitor
            try:
                kwargs = {"approx_instant_energy": True}
                if self.gpu_indices is not None:
                    kwargs["gpu_indices"] = self.gpu_indices
                if self.cpu_indices is not None:
                    kwargs["cpu_indices"] = self.cpu_indices
                self._monitor = factory(**kwargs)
            except Exception as exc:  # zeus raises ValueError/RuntimeError on missing sensors
                self._why = f"zeus could not start: {type(exc).__name__}: {exc}"
        return self._monitor

    def is_available(self) -> Availability:
        mon = self._get_monitor()
        if mon is None:
            return Availability(False, self._why or "zeus unavailable")
        has_gpu = bool(getattr(mon, "gpu_indices", None))
        has_cpu = bool(getattr(mon, "cpu_indices", None))
        has_soc = bool(getattr(mon, "soc_is_present", False))
        if not (has_gpu or has_cpu or has_soc):
            return Availability(False, "zeus found no GPU, RAPL or SoC power sensor here (it would measure time only)")
        return Availability(True)

    def _snapshot(self) -> object:
        mon = self._get_monitor()
        if mon is None:
            raise RuntimeError(f"ZeusMeter unavailable: {self._why}")
        self._count += 1
        key = f"edgepool-{id(self)}-{self._count}"
        mon.begin_window(key)  # type: ignore[attr-defined]
        return key

    def _readings(self, start: object, start_s: float, end_s: float) -> dict[str, EnergyReading]:
        m = self._monitor.end_window(start)  # type: ignore[union-attr]
        energy_j, sensor, detail = energy_of(m)
        elapsed = float(getattr(m, "time", end_s - start_s))
        if energy_j is None:
            return {self.device: EnergyReading(self.device, None, elapsed, "none", detail)}
        return {self.device: EnergyReading(self.device, energy_j, elapsed, measured(sensor), detail)}
