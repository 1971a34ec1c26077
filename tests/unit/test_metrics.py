"""The typed run records: one definition of the timed steps, and files read back safely."""

from __future__ import annotations

import pytest

from edgepool.specs.metrics import (STEP_TIME_STAT, DeviceStep, StepRecord, append_record, read_metrics, summarize,
                                    timed_steps)


def _rec(step: int, t: float, energy: float | None = 1.0) -> StepRecord:
    dev = DeviceStep(peak_memory_bytes=100 + step, bytes_sent=10, cpu_s=0.5, energy_j=energy, energy_source="modelled")
    return StepRecord(step=step, loss=5.0 - step, step_time_s=t, samples_per_s=8 / t, tokens_per_s=8 * 16 / t,
                      plan_id="p", devices={"a": dev})


def test_summary_takes_the_median_of_the_steps_after_the_first():
    recs = [_rec(0, 9.0), _rec(1, 1.0), _rec(2, 5.0), _rec(3, 2.0)]
    assert [r.step for r in timed_steps(recs)] == [1, 2, 3]
    s = summarize(recs, plan_id="p", parallelism="dp", schedule="gpipe", num_microbatches=1)
    assert s.step_time_s == 2.0 and s.step_time_stat == STEP_TIME_STAT
    assert s.samples_per_s == pytest.approx(8 / 2.0)
    assert s.devices["a"].peak_memory_bytes == 103 and s.devices["a"].bytes_sent == 40
    assert s.devices["a"].mean_energy_j == 1.0 and s.devices["a"].energy_source == "modelled"
    assert summarize([_rec(0, 3.0)], plan_id="p", parallelism="dp", schedule="gpipe", num_microbatches=1).step_time_s == 3.0
    no_meter = summarize([_rec(0, 1.0), _rec(1, 1.0, energy=None)], plan_id="p", parallelism="dp", schedule="gpipe",
                         num_microbatches=1)
    assert no_meter.devices["a"].mean_energy_j is None


def test_a_cut_last_line_is_left_out_and_a_bad_middle_line_is_an_error(tmp_path):
    path = tmp_path / "metrics.jsonl"
    for r in (_rec(0, 1.0), _rec(1, 1.0)):
        append_record(path, r)
    with open(path, "a") as f:
        f.write('{"step": 2, "loss": 3.')  # a run killed while writing
    assert [r.step for r in read_metrics(path)] == [0, 1]
    path.write_text(path.read_text().replace('"step":1', '"step":"x"', 1) + "\n")
    with pytest.raises(ValueError):
        read_metrics(path)
