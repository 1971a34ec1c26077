"""The energy-meter protocol, its result types, and the null meter.

A meter measures *windows*: ``begin(name)`` ... ``end(name)`` (or ``with
meter.measure(name) as w:``), and returns an ``EnergyWindow`` with one
``EnergyReading`` per device it covers. Windows may nest or overlap if their names
differ.

Every reading says where its number comes from, in ``source``:

- ``"measured:<sensor>"``: read from a power sensor, e.g. ``measured:tegrastats/VDD_IN``
  or ``measured:zeus/nvml+rapl``;
- ``"modelled"``: computed from catalog power figures and measured busy time;
- ``"none"``: no figure (``energy_j`` is None), from the null meter.

Units: energy in joules (``_j``), time in seconds (``_s``), power in watts (``_w``).
"""

from __future__ import annotations

import time
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, Protocol, Sequence, runtime_checkable

SOURCE_MODELLED = "modelled"
SOURCE_NONE = "none"


def measured(sensor: str) -> str:
    """The source string of a figure read from ``sensor``."""
    return f"measured:{sensor}"


def is_valid_source(source: str) -> bool:
    return source in (SOURCE_MODELLED, SOURCE_NONE) or (source.startswith("measured:") and len(source) > 9)


@dataclass(frozen=True)
class Availability:
    """A yes/no answer with the reason; truthy when ``ok``."""

    ok: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.ok


@dataclass(frozen=True)
class EnergyReading:
    """Energy of one device over one window."""

    device: str
    energy_j: float | None
    elapsed_s: float
    source: str
    detail: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not is_valid_source(self.source):
            raise ValueError(f"energy source must be 'measured:<sensor>', 'modelled' or 'none', got {self.source!r}")

    @property
    def avg_power_w(self) -> float | None:
        if self.energy_j is None or self.elapsed_s <= 0:
            return None
        return self.energy_j / self.elapsed_s

    def to_json(self) -> dict:
        return {
            "device": self.device,
            "energy_j": self.energy_j,
            "elapsed_s": self.elapsed_s,
            "source": self.source,
            "detail": dict(self.detail),
        }

    @classmethod
    def from_json(cls, d: Mapping) -> "EnergyReading":
        return cls(d["device"], d["energy_j"], float(d["elapsed_s"]), d["source"], dict(d.get("detail", {})))


@dataclass
class EnergyWindow:
    """One measurement window; ``readings`` is filled when the window ends."""

    name: str
    readings: dict[str, EnergyReading] = field(default_factory=dict)

    @property
    def total_j(self) -> float | None:
        """Sum over devices; None if any device has no figure."""
        if not self.readings or any(r.energy_j is None for r in self.readings.values()):
            return None
        return sum(r.energy_j for r in self.readings.values())  # type: ignore[misc]

    @property
    def sources(self) -> dict[str, str]:
        return {d: r.source for d, r in self.readings.items()}

    @property
    def source(self) -> str:
        """One source for the total: the common one, or 'mixed(a,b)' naming them all."""
        s = sorted(set(self.sources.values()))
        return s[0] if len(s) == 1 else f"mixed({','.join(s)})"

    def to_json(self) -> dict:
        return {"name": self.name, "total_j": self.total_j, "readings": [r.to_json() for r in self.readings.values()]}


@runtime_checkable
class EnergyMeter(Protocol):
    """What every meter offers (see the module docstring)."""

    name: str

    def is_available(self) -> Availability: ...

    def begin(self, window: str = "default") -> None: ...

    def end(self, window: str = "default") -> EnergyWindow: ...

    def measure(self, window: str = "default") -> AbstractContextManager[EnergyWindow]: ...


class WindowedMeter:
    """Base for meters: keeps named windows and builds ``measure`` on begin/end.

    A subclass implements ``_snapshot()`` (the state at a window's start, any value)
    and ``_readings(start, start_s, end_s)``.
    """

    name = "base"

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._open: dict[str, tuple[float, object]] = {}

    def is_available(self) -> Availability:
        return Availability(True)

    def _snapshot(self) -> object:
        return None

    def _readings(self, start: object, start_s: float, end_s: float) -> dict[str, EnergyReading]:
        raise NotImplementedError

    def begin(self, window: str = "default") -> None:
        if window in self._open:
            raise ValueError(f"energy window {window!r} is already open; end it first or use another name")
        self._open[window] = (self._clock(), self._snapshot())

    def end(self, window: str = "default") -> EnergyWindow:
        if window not in self._open:
            known = ", ".join(self._open) or "none"
            raise ValueError(f"energy window {window!r} was never begun (open windows: {known})")
        start_s, snap = self._open.pop(window)
        return EnergyWindow(window, self._readings(snap, start_s, self._clock()))

    @contextmanager
    def measure(self, window: str = "default") -> Iterator[EnergyWindow]:
        """``with meter.measure() as w: ...``; ``w.readings`` is filled on exit."""
        result = EnergyWindow(window)
        self.begin(window)
        try:
            yield result
        finally:
            result.readings = self.end(window).readings


class NullMeter(WindowedMeter):
    """No sensor, no model: every reading has ``energy_j=None`` and source ``none``."""

    name = "null"

    def __init__(self, devices: Sequence[str] = ("local",), clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(clock)
        self.devices = tuple(devices)

    def _readings(self, start: object, start_s: float, end_s: float) -> dict[str, EnergyReading]:
        return {d: EnergyReading(d, None, end_s - start_s, SOURCE_NONE) for d in self.devices}
