"""What a run measures, as typed records: written by the runtime, read by the launcher,
the progress bar, the study, the benchmarks and the reports.

- ``StepRecord``: one line of ``DIR/metrics.jsonl`` per step, with one ``DeviceStep``
  per device (peak resident memory, bytes sent, CPU time, joules and their source);
- ``Summary``: ``DIR/summary.json``;
- ``Trace``: ``DIR/trace.json``, every rank's timed ops of one step, named as in
  ``sim.lower``.

**Timed steps.** ``timed_steps`` is the one definition every figure of a run uses:
the steps after the first (which pays for start-up: allocation, gloo connections, a
GPipe pipeline's warm-up), or the only one. The run's step time is their **median**
(``STEP_TIME_STAT``): the host is shared, and a median keeps one slow step from moving
the figure. Per-device CPU time and energy are means over the same steps (they add up
over a run).

Units: seconds, bytes, joules.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from edgepool.errors import SpecError

STEP_TIME_STAT = "median of the steps after the first (all steps when only one ran)"


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DeviceStep(_Record):
    peak_memory_bytes: int  # peak resident set of the rank's process so far (VmHWM, machine.peak_rss_bytes)
    bytes_sent: int  # point-to-point exact; collectives as a ring algorithm sends them
    cpu_s: float  # CPU time of the rank's process in the step
    energy_j: float | None = None  # the rank's meter over the step (None: no figure)
    energy_source: str = "none"  # measured:<sensor>, modelled or none


class StepRecord(_Record):
    step: int
    loss: float
    step_time_s: float
    samples_per_s: float
    tokens_per_s: float
    plan_id: str
    devices: dict[str, DeviceStep]


class RankTrace(_Record):
    rank: int
    device: str
    events: list[tuple[str, float, float]]  # (op, start_s, end_s) from the step's start


class Trace(_Record):
    plan_id: str
    step: int
    ranks: list[RankTrace]


class DeviceSummary(_Record):
    peak_memory_bytes: int
    bytes_sent: int  # over the whole run
    mean_cpu_s: float  # per timed step
    mean_energy_j: float | None  # per timed step
    energy_source: str


class Summary(_Record):
    plan_id: str
    parallelism: str
    schedule: str = ""
    num_microbatches: int = 0
    steps: int
    resumed_from: int = 0
    final_loss: float | None = None
    step_time_s: float | None = None  # STEP_TIME_STAT
    samples_per_s: float | None = None
    step_time_stat: str = STEP_TIME_STAT
    memory_source: str = "peak resident set of each rank's process (VmHWM)"
    bytes_source: str = "point-to-point exact; collectives as ring-algorithm bytes"
    devices: dict[str, DeviceSummary] = {}
    # Devices lost during the run and how it went on (``launch.recover``): one dict each.
    events: list[dict] = []


def timed_steps(records: list[StepRecord]) -> list[StepRecord]:
    """The steps a measurement uses: every step after the first, or the only one."""
    return records[1:] if len(records) > 1 else list(records)


def step_time_s(records: list[StepRecord]) -> float:
    """The run's step time (``STEP_TIME_STAT``)."""
    return statistics.median(r.step_time_s for r in timed_steps(records))


def read_metrics(path: str | Path, *, log=None) -> list[StepRecord]:
    """Every complete record of a ``metrics.jsonl``; a last line cut short (a run that
    was killed while writing) is left out, with a warning to ``log``; any other bad
    line is an error."""
    lines = [ln for ln in Path(path).read_text().splitlines() if ln.strip()]
    out = []
    for i, ln in enumerate(lines):
        try:
            out.append(StepRecord.model_validate_json(ln))
        except ValueError:
            if i == len(lines) - 1:
                if log is not None:
                    log(f"warning: the last line of {path} is cut short (a run stopped while writing it); left out")
                break
            raise SpecError(f"{path}:{i + 1}: not a step record; move the file away or start over with --fresh") from None
    return out


def summarize(records: list[StepRecord], *, plan_id: str, parallelism: str, schedule: str, num_microbatches: int,
              resumed_from: int = 0) -> Summary:
    if not records:
        return Summary(plan_id=plan_id, parallelism=parallelism, schedule=schedule, num_microbatches=num_microbatches,
                       steps=0, resumed_from=resumed_from)
    # Times, memory and energy are the final plan's (a run resumed or recovered under
    # another plan has records of both); bytes sent are over the whole run.
    current = [r for r in records if r.plan_id == plan_id] or records
    timed = timed_steps(current)
    t = step_time_s(current)
    global_batch = records[0].samples_per_s * records[0].step_time_s
    devices = {}
    for name in records[-1].devices:
        energy = [r.devices[name].energy_j for r in timed]
        sources = sorted({r.devices[name].energy_source for r in timed})
        devices[name] = DeviceSummary(
            peak_memory_bytes=max(r.devices[name].peak_memory_bytes for r in current),
            bytes_sent=sum(r.devices[name].bytes_sent for r in records if name in r.devices),
            mean_cpu_s=sum(r.devices[name].cpu_s for r in timed) / len(timed),
            mean_energy_j=sum(energy) / len(energy) if all(e is not None for e in energy) else None,
            energy_source=sources[0] if len(sources) == 1 else f"mixed({','.join(sources)})",
        )
    return Summary(plan_id=plan_id, parallelism=parallelism, schedule=schedule, num_microbatches=num_microbatches,
                   steps=len(records), resumed_from=resumed_from, final_loss=records[-1].loss, step_time_s=t,
                   samples_per_s=global_batch / t, devices=devices)


def read_summary(path: str | Path) -> Summary:
    return Summary.model_validate_json(Path(path).read_text())


def append_record(path: str | Path, record: StepRecord) -> None:
    with open(path, "a") as f:
        f.write(record.model_dump_json() + "\n")
        f.flush()


def write_json(path: str | Path, obj: BaseModel) -> None:
    Path(path).write_text(json.dumps(obj.model_dump(mode="json"), indent=2))
