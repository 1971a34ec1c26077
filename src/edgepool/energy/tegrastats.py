"""Energy of a Jetson board from ``tegrastats`` power rails, live or replayed.

``tegrastats`` prints one line per interval; each power rail appears as
``NAME current/average`` in milliwatts, in two spellings:

    ... POM_5V_IN 2345/2400 POM_5V_GPU 0/0 POM_5V_CPU 456/480          (Nano, JetPack 4)
    ... VDD_IN 5000mW/5000mW VDD_CPU_GPU_CV 598mW/598mW VDD_SOC 1437mW  (Orin, JetPack 5+)

Newer versions start the line with a timestamp (``03-21-2024 10:21:33``). Other fields
with a slash (``RAM 1234/3964MB``, ``IRAM 0/252kB``) carry a unit suffix and are not
rails.

The energy of a window is the mean of the rail's instantaneous power over the samples
taken inside the window, times the window's length: the method of the Galaxy-LM
testbed (board input power from tegrastats times elapsed time). The default rail is the
board's input rail (``VDD_IN``, ``POM_5V_IN``, ``VIN_SYS_5V0``, ``VIN``), so the figure
covers the whole board, as a wall meter would.

Units: power in mW as printed, converted to W; energy in J; time in s.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Callable, Iterable, Sequence

from edgepool.energy.base import Availability, EnergyReading, WindowedMeter, measured

INPUT_RAILS = ("VDD_IN", "POM_5V_IN", "VIN_SYS_5V0", "VIN")

_RAIL = re.compile(r"(?<![A-Za-z0-9_])([A-Z][A-Z0-9_]*)\s+(\d+)(?:mW)?/(\d+)(?:mW)?(?![A-Za-z0-9])")
_STAMP = re.compile(r"^\s*(\d\d-\d\d-\d{4} \d\d:\d\d:\d\d)\s")


@dataclass(frozen=True)
class TegraSample:
    """One tegrastats line: wall-clock stamp (None if not printed) and rails in mW."""

    stamp_s: float | None
    rails_mw: dict[str, tuple[int, int]]  # name -> (current, average)

    def power_w(self, rail: str) -> float | None:
        v = self.rails_mw.get(rail)
        return None if v is None else v[0] / 1000.0


def parse_line(line: str) -> TegraSample | None:
    """Parse one tegrastats line; None if it holds no power rail."""
    rails = {m.group(1): (int(m.group(2)), int(m.group(3))) for m in _RAIL.finditer(line)}
    if not rails:
        return None
    stamp = None
    m = _STAMP.match(line)
    if m:
        stamp = datetime.strptime(m.group(1), "%m-%d-%Y %H:%M:%S").timestamp()
    return TegraSample(stamp, rails)


def parse(text: str | Iterable[str]) -> list[TegraSample]:
    lines = text.splitlines() if isinstance(text, str) else text
    return [s for s in (parse_line(x) for x in lines) if s is not None]


def pick_rail(samples: Sequence[TegraSample], rail: str | None = None) -> str:
    """``rail`` if given (must appear), else the board input rail the samples carry."""
    names: set[str] = set()
    for s in samples:
        names.update(s.rails_mw)
    if rail is not None:
        if rail not in names:
            raise ValueError(f"rail {rail!r} not in tegrastats output; rails seen: {', '.join(sorted(names)) or 'none'}")
        return rail
    for r in INPUT_RAILS:
        if r in names:
            return r
    raise ValueError(
        f"no board input rail ({', '.join(INPUT_RAILS)}) in tegrastats output; rails seen: "
        f"{', '.join(sorted(names)) or 'none'}; pass rail= explicitly"
    )


def mean_power_energy_j(timed: Sequence[tuple[float, float]], start_s: float, end_s: float) -> tuple[float | None, int]:
    """Energy over [start_s, end_s] from (time_s, power_w) samples; (None, 0) without any.

    Uses the samples inside the window; if there are none (a window shorter than the
    interval), the last sample before the window, else the first after it.
    """
    inside = [p for t, p in timed if start_s <= t <= end_s]
    if not inside:
        before = [p for t, p in timed if t < start_s]
        after = [p for t, p in timed if t > end_s]
        inside = before[-1:] or after[:1]
    if not inside:
        return None, 0
    return sum(inside) / len(inside) * (end_s - start_s), len(inside)


class TegrastatsMeter(WindowedMeter):
    """Board energy of this Jetson from a running ``tegrastats`` (or replayed lines).

    Live: ``TegrastatsMeter("nano-1")`` starts ``tegrastats --interval <ms>`` in a
    thread on first use and stamps each line with ``clock()`` as it arrives.
    Replay: ``TegrastatsMeter.replay("nano-1", text, interval_ms=...)`` gives line ``i``
    the time ``origin_s + i * interval`` (or its printed stamp, shifted so the first
    line sits at ``origin_s``); the window times come from ``clock``.
    """

    name = "tegrastats"

    def __init__(
        self,
        device: str,
        *,
        rail: str | None = None,
        interval_ms: int = 100,
        command: Sequence[str] = ("tegrastats",),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(clock)
        self.device = device
        self.rail = rail
        self.interval_ms = interval_ms
        self.command = tuple(command)
        self._samples: list[tuple[float, TegraSample]] = []
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._replay = False

    @classmethod
    def replay(
        cls,
        device: str,
        text: str | Iterable[str],
        *,
        interval_ms: int = 1000,
        origin_s: float = 0.0,
        rail: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> "TegrastatsMeter":
        m = cls(device, rail=rail, interval_ms=interval_ms, clock=clock)
        m._replay = True
        samples = parse(text)
        first_stamp = next((s.stamp_s for s in samples if s.stamp_s is not None), None)
        for i, s in enumerate(samples):
            if s.stamp_s is not None and first_stamp is not None:
                t = origin_s + (s.stamp_s - first_stamp)
            else:
                t = origin_s + i * interval_ms / 1000.0
            m._samples.append((t, s))
        return m

    def is_available(self) -> Availability:
        if self._replay:
            return Availability(True)
        if shutil.which(self.command[0]) is None:
            return Availability(False, f"`{self.command[0]}` is not on PATH (not a Jetson, or JetPack tools missing)")
        return Availability(True)

    # -- live sampling -------------------------------------------------------------
    def start(self) -> None:
        if self._replay or self._proc is not None:
            return
        argv = list(self.command) + ["--interval", str(self.interval_ms)]
        try:
            self._proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except OSError as exc:
            raise RuntimeError(f"cannot start {argv[0]}: {exc}") from None
        threading.Thread(target=self._pump, name="tegrastats", daemon=True).start()

    def _pump(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            s = parse_line(line)
            if s is not None:
                with self._lock:
                    self._samples.append((self._clock(), s))

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                self._proc.kill()
            self._proc = None

    def __del__(self) -> None:
        try:
            self.stop()
        except Exception:
            pass

    # -- windows ---------------------------------------------------------------------
    def begin(self, window: str = "default") -> None:
        self.start()
        super().begin(window)

    def _readings(self, start: object, start_s: float, end_s: float) -> dict[str, EnergyReading]:
        if not self._replay:
            # Let the sample that covers the window's end arrive (at most one interval).
            deadline = time.monotonic() + self.interval_ms / 1000.0 * 1.5
            while time.monotonic() < deadline:
                with self._lock:
                    if self._samples and self._samples[-1][0] >= end_s:
                        break
                time.sleep(self.interval_ms / 4000.0)
        with self._lock:
            samples = list(self._samples)
        try:
            rail = pick_rail([s for _, s in samples], self.rail)
        except ValueError:
            return {self.device: EnergyReading(self.device, None, end_s - start_s, "none", {"samples": 0.0})}
        timed = [(t, p) for t, s in samples if (p := s.power_w(rail)) is not None]
        energy_j, n = mean_power_energy_j(timed, start_s, end_s)
        detail = {"samples": float(n)}
        if energy_j is None:
            return {self.device: EnergyReading(self.device, None, end_s - start_s, "none", detail)}
        return {self.device: EnergyReading(self.device, energy_j, end_s - start_s, measured(f"tegrastats/{rail}"), detail)}
