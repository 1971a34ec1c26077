"""The device catalog: required kinds, sourced figures, power modes, and `edgepool devices`."""

from __future__ import annotations

import pytest

from edgepool import catalog
from edgepool.cli.main import main
from edgepool.errors import SpecError
from edgepool.specs import PoolSpec

REQUIRED = ["jetson-nano", "jetson-tx2", "jetson-xavier-nx", "jetson-agx-xavier", "jetson-orin-nano",
            "jetson-orin-nx", "jetson-agx-orin", "rpi4", "rpi5", "host-cpu"]
SOURCED = ["memory_gb", "mem_bandwidth_gbps", "cpu_fp32_gflops", "power_modes", "idle_w", "busy_w",
           "radio_j_per_mb", "reserved_gb", "train_efficiency"]


def test_required_kinds_present():
    ids = [k.id for k in catalog.kinds()]
    for kind in REQUIRED:
        assert kind in ids


@pytest.mark.parametrize("kind_id", REQUIRED)
def test_every_figure_has_a_source(kind_id):
    kind = catalog.get(kind_id)
    for key in SOURCED:
        assert kind.sources.get(key), f"{kind_id}: no source for {key}"
    if kind.gpu_fp32_gflops > 0:
        assert kind.sources.get("gpu_fp32_gflops") and kind.sources.get("gpu_fp16_gflops")
    # Estimates say so.
    assert "ESTIMATE" in kind.sources["busy_w"]
    for text in kind.sources.values():
        assert text.isascii()


@pytest.mark.parametrize("kind_id", REQUIRED)
def test_power_modes_are_consistent(kind_id):
    kind = catalog.get(kind_id)
    assert kind.max_mode.compute_fraction == 1.0
    assert kind.power_mode(None) is kind.max_mode
    for m in kind.power_modes:
        assert 0 < m.compute_fraction <= 1
        assert m.idle_w < m.busy_w <= m.budget_w
    assert kind.usable_memory_gb > 0


def test_relative_speed_is_relative_to_the_reference():
    assert catalog.get(catalog.REFERENCE_KIND).relative_speed() == pytest.approx(1.0)
    nano = catalog.get("jetson-nano")
    assert nano.relative_speed("5W") == pytest.approx(nano.power_mode("5W").compute_fraction)
    assert catalog.get("jetson-agx-orin").relative_speed() > catalog.get("jetson-orin-nano").relative_speed() > 1


def test_pool_specs_use_the_catalog():
    pool = PoolSpec.model_validate({"devices": [{"name": "a", "kind": "jetson-orin-nano", "power_mode": "15W"},
                                                {"name": "b", "kind": "rpi5", "compute_scale": 0.5}]})
    assert pool.device("a").speed() == pytest.approx(catalog.get("jetson-orin-nano").relative_speed("15W"))
    assert pool.device("b").speed() == 0.5
    with pytest.raises(ValueError, match="known modes"):
        PoolSpec.model_validate({"devices": [{"name": "a", "kind": "jetson-nano", "power_mode": "50W"}]})


def test_unknown_kind_lists_the_known_ones():
    with pytest.raises(SpecError, match="jetson-nano"):
        catalog.get("jetson-banana")


def test_devices_cli(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    assert main(["devices"]) == 0
    out = capsys.readouterr().out
    assert "jetson-agx-orin" in out and "MAXN" in out
    assert main(["devices", "rpi5", "--json"]) == 0
    assert '"relative_speed"' in capsys.readouterr().out
