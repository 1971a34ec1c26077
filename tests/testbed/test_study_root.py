"""The study on a real emulated pool: real memory caps decide what trains (needs root).

Two emulated devices with small memory caps and a model whose full replica (with
AdamW state) does not fit under them: DP must die out of memory, reported with its
cause, and PP must train. Every energy figure names its source; the table and plots
are written; the testbed is gone afterwards.
"""

from __future__ import annotations

import json

import pytest

from edgepool.launch.study import run_study
from edgepool.specs import JobSpec, PoolSpec
from edgepool.testbed import Testbed, is_available
from edgepool.testing import CORPUS

_AVAIL = is_available()
pytestmark = [pytest.mark.root, pytest.mark.skipif(not _AVAIL, reason=f"testbed unavailable: {_AVAIL.reason}")]


def test_study_dp_runs_out_of_memory_and_pp_trains(tmp_path):
    pool = PoolSpec(name="study-t", network={"medium": "shared", "bandwidth_mbps": 200}, devices=[
        {"name": "big", "kind": "host-cpu", "host": "emulated", "compute_scale": 2.0, "memory_gb": 0.55},
        {"name": "small", "kind": "jetson-nano", "host": "emulated", "compute_scale": 1.0, "memory_gb": 0.55},
    ])
    job = JobSpec(model={"family": "gpt", "size": "small", "hidden": 512, "num_layers": 8, "num_heads": 8, "ffn": 2048},
                  data={"path": str(CORPUS)},
                  train={"global_batch": 4, "seq_len": 16, "steps": 2, "lr": 1e-4},
                  parallelism={"mode": "auto", "num_microbatches": 2, "schedule": "1f1b"})
    result = run_study(pool, job, out_dir=tmp_path, steps=2, families=("dp", "pp"), deadline_s=120)
    rows = {r["name"]: r for r in result["rows"]}
    assert rows["dp"]["status"] == "out of memory", rows["dp"]
    assert "OOM killer" in rows["dp"]["cause"]
    assert rows["pp"]["status"] == "ok", rows["pp"]
    assert rows["pp"]["energy_per_step_j"] > 0 and rows["pp"]["energy_source"] == "modelled"
    assert rows["pp"]["predicted_step_time_s"] > 0 and "measured on this host" in rows["pp"]["prediction_source"]
    for name in ("big", "small"):
        d = rows["pp"]["devices"][name]
        assert 0 < d["busy_pct"] <= 100 and d["peak_memory_bytes"] > 0
    assert result["emulated"] is True
    for f in ("study.json", "study.md", "study-bars.png", "study-timeline.png"):
        assert (tmp_path / f).stat().st_size > 0
    md = (tmp_path / "study.md").read_text()
    assert "modelled" in md and "out of memory" in md
    assert json.loads((tmp_path / "study.json").read_text())["rows"][0]["name"] == "dp"
    assert not [s for s in Testbed.status() if s.tag and "study" in (s.pool_name or "")]
