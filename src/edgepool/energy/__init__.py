"""Energy meters: measured where a sensor exists, modelled where not, and always labelled.

The ``EnergyMeter`` protocol (``begin``/``end`` of a named window, or ``measure()`` as
a context manager) returns an ``EnergyWindow`` with one ``EnergyReading`` per device;
each reading carries ``source``: ``"measured:<sensor>"``, ``"modelled"`` or ``"none"``.

Meters (registry ``METERS``, name -> factory):

- ``zeus``: Zeus (NVML GPUs, CPU RAPL, Jetson INA3221 rails); optional extra
  ``edgepool[zeus]``, imported lazily;
- ``tegrastats``: a Jetson's ``tegrastats`` rails, live or replayed;
- ``modelled``: catalog busy/idle power times measured busy time, plus radio energy
  per byte sent;
- ``replay``: recorded windows or constant power, for tests;
- ``null``: no figure at all (``energy_j=None``, source ``none``).

Every meter has ``is_available()`` (truthy, with a ``reason`` when not);
``select_meter`` picks the first available sensor meter and falls back to a modelled or
the null meter. ``meter_report()`` lists what this machine has, for ``edgepool env``.

Importing this package is cheap: no torch, no zeus.
"""

from __future__ import annotations

import shutil
from typing import Callable, Sequence

from edgepool.energy.base import (
    SOURCE_MODELLED,
    SOURCE_NONE,
    Availability,
    EnergyMeter,
    EnergyReading,
    EnergyWindow,
    NullMeter,
    WindowedMeter,
    is_valid_source,
    measured,
)
from edgepool.energy.modelled import (
    ModelledDevice,
    ModelledMeter,
    cgroup_cpu_seconds,
    interface_tx_bytes,
    model_energy_j,
    process_cpu_seconds,
)
from edgepool.energy.replay import ReplayMeter
from edgepool.energy.tegrastats import TegrastatsMeter
from edgepool.energy.zeus_meter import ZeusMeter, zeus_importable

METERS: dict[str, Callable[..., EnergyMeter]] = {
    "zeus": ZeusMeter,
    "tegrastats": TegrastatsMeter,
    "modelled": ModelledMeter,
    "replay": ReplayMeter,
    "null": NullMeter,
}


def make_meter(name: str, *args, **kwargs) -> EnergyMeter:
    """Build the meter registered as ``name``; an unknown name lists the known ones."""
    if name not in METERS:
        raise ValueError(f"unknown energy meter {name!r}; known meters: {', '.join(METERS)}")
    return METERS[name](*args, **kwargs)


def select_meter(
    device: str,
    *,
    prefer: Sequence[str] = ("zeus", "tegrastats"),
    modelled: EnergyMeter | None = None,
) -> tuple[EnergyMeter, list[str]]:
    """The first available sensor meter for this machine, else ``modelled``, else null.

    Returns the meter and one line per meter that was skipped, saying why.
    """
    skipped: list[str] = []
    for name in prefer:
        meter = make_meter(name, device)
        ok = meter.is_available()
        if ok:
            return meter, skipped
        skipped.append(f"{name}: {ok.reason}")
    if modelled is not None:
        ok = modelled.is_available()
        if ok:
            return modelled, skipped
        skipped.append(f"modelled: {ok.reason}")
    return NullMeter([device]), skipped


def meter_report() -> list[tuple[str, bool, str]]:
    """(meter, available here, detail) for every registered meter."""
    rows: list[tuple[str, bool, str]] = []
    z = ZeusMeter("local")
    ok = z.is_available()
    rows.append(("zeus", bool(ok), "measured: NVML/RAPL/Jetson rails" if ok else ok.reason))
    tg = shutil.which("tegrastats")
    rows.append(("tegrastats", tg is not None, f"measured: {tg}" if tg else "`tegrastats` not on PATH (not a Jetson)"))
    try:
        process_cpu_seconds()()
        rows.append(("modelled", True, "catalog busy/idle power x measured busy time (+ radio J/MB)"))
    except (OSError, ValueError) as exc:
        rows.append(("modelled", False, f"cannot read CPU time: {exc}"))
    rows.append(("replay", True, "recorded windows or constant power (tests)"))
    rows.append(("null", True, "no figure (source 'none')"))
    return rows


__all__ = [
    "Availability",
    "EnergyMeter",
    "EnergyReading",
    "EnergyWindow",
    "METERS",
    "ModelledDevice",
    "ModelledMeter",
    "NullMeter",
    "ReplayMeter",
    "SOURCE_MODELLED",
    "SOURCE_NONE",
    "TegrastatsMeter",
    "WindowedMeter",
    "ZeusMeter",
    "cgroup_cpu_seconds",
    "interface_tx_bytes",
    "is_valid_source",
    "make_meter",
    "measured",
    "meter_report",
    "model_energy_j",
    "process_cpu_seconds",
    "select_meter",
    "zeus_importable",
]
