"""Replay meters for tests and re-analysis: scripted windows or constant power.

- ``ReplayMeter.from_windows(windows)`` returns the recorded windows one after the
  other (e.g. the ``energy`` entries of an earlier run's JSON), keeping each reading's
  original source. Past the end it raises, so a test notices a surplus window.
- ``ReplayMeter.constant_power({"nano-1": 5.0}, source="measured:bench")`` returns
  power times the window's elapsed time.
"""

from __future__ import annotations

import time
from typing import Callable, Mapping, Sequence

from edgepool.energy.base import EnergyReading, EnergyWindow, WindowedMeter, is_valid_source


class ReplayMeter(WindowedMeter):
    name = "replay"

    def __init__(
        self,
        *,
        windows: Sequence[Mapping[str, EnergyReading]] | None = None,
        power_w: Mapping[str, float] | None = None,
        source: str = "measured:replay",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(clock)
        if (windows is None) == (power_w is None):
            raise ValueError("ReplayMeter needs exactly one of windows= or power_w=")
        if not is_valid_source(source):
            raise ValueError(f"energy source must be 'measured:<sensor>', 'modelled' or 'none', got {source!r}")
        self._windows = list(windows) if windows is not None else None
        self._power_w = dict(power_w) if power_w is not None else None
        self._source = source
        self._next = 0

    @classmethod
    def from_windows(cls, windows: Sequence[EnergyWindow | Mapping], **kw) -> "ReplayMeter":
        """From ``EnergyWindow`` objects or their ``to_json()`` dicts."""
        out = []
        for w in windows:
            if isinstance(w, EnergyWindow):
                out.append(dict(w.readings))
            else:
                out.append({r["device"]: EnergyReading.from_json(r) for r in w["readings"]})
        return cls(windows=out, **kw)

    @classmethod
    def constant_power(cls, power_w: Mapping[str, float], source: str = "measured:replay", **kw) -> "ReplayMeter":
        return cls(power_w=power_w, source=source, **kw)

    def _readings(self, start: object, start_s: float, end_s: float) -> dict[str, EnergyReading]:
        if self._power_w is not None:
            dt = end_s - start_s
            return {d: EnergyReading(d, p * dt, dt, self._source) for d, p in self._power_w.items()}
        assert self._windows is not None
        if self._next >= len(self._windows):
            raise IndexError(f"ReplayMeter has only {len(self._windows)} recorded window(s)")
        w = self._windows[self._next]
        self._next += 1
        return dict(w)
