"""Energy meters: sources, windows, the tegrastats parser, the model, zeus (faked), replay."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field

import pytest

from edgepool import catalog
from edgepool.energy import (
    METERS,
    SOURCE_MODELLED,
    EnergyMeter,
    EnergyReading,
    EnergyWindow,
    ModelledDevice,
    ModelledMeter,
    NullMeter,
    ReplayMeter,
    TegrastatsMeter,
    ZeusMeter,
    cgroup_cpu_seconds,
    make_meter,
    meter_report,
    model_energy_j,
    process_cpu_seconds,
    select_meter,
    zeus_importable,
)
from edgepool.energy import tegrastats as tg
from edgepool.energy.zeus_meter import energy_of


class FakeClock:
    def __init__(self, t: float = 0.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


# -- sources and windows ------------------------------------------------------------------


def test_every_reading_names_a_valid_source():
    EnergyReading("a", 1.0, 1.0, "measured:tegrastats/VDD_IN")
    EnergyReading("a", 1.0, 1.0, SOURCE_MODELLED)
    EnergyReading("a", None, 1.0, "none")
    for bad in ("", "measured:", "guess", "Modelled"):
        with pytest.raises(ValueError, match="energy source"):
            EnergyReading("a", 1.0, 1.0, bad)


def test_window_total_and_mixed_source():
    w = EnergyWindow(
        "step",
        {
            "a": EnergyReading("a", 2.0, 1.0, "measured:zeus/jetson"),
            "b": EnergyReading("b", 3.0, 1.0, SOURCE_MODELLED),
        },
    )
    assert w.total_j == 5.0
    assert w.source == "mixed(measured:zeus/jetson,modelled)"
    assert w.to_json()["readings"][1]["source"] == "modelled"
    w.readings["c"] = EnergyReading("c", None, 1.0, "none")
    assert w.total_j is None  # a total that silently dropped a device would lie


def test_null_meter_and_window_bookkeeping():
    clock = FakeClock(10.0)
    m = NullMeter(["a", "b"], clock=clock)
    assert isinstance(m, EnergyMeter) and m.is_available()
    with m.measure("step") as w:
        clock.t = 12.5
    assert set(w.readings) == {"a", "b"}
    assert w.readings["a"].energy_j is None and w.readings["a"].source == "none"
    assert w.readings["a"].elapsed_s == 2.5 and w.total_j is None
    m.begin("x")
    with pytest.raises(ValueError, match="already open"):
        m.begin("x")
    with pytest.raises(ValueError, match="never begun"):
        m.end("y")
    m.end("x")


# -- tegrastats ------------------------------------------------------------------------------

NANO = "RAM 1234/3964MB (lfb 10x4MB) SWAP 0/1982MB (cached 0MB) IRAM 0/252kB(lfb 252kB) CPU [12%@1479,5%@1479,off,off] EMC_FREQ 3%@1600 GR3D_FREQ 0%@76 APE 25 PLL@31C CPU@34.5C PMIC@100C GPU@32C AO@40.5C thermal@33.5C POM_5V_IN 2345/2400 POM_5V_GPU 0/0 POM_5V_CPU 456/480"
ORIN = "03-21-2024 10:21:33 RAM 2125/7620MB (lfb 1x4MB) SWAP 0/3810MB (cached 0MB) CPU [1%@729,0%@729] GR3D_FREQ 0% cpu@47.5C soc2@45.8C VDD_IN 4975mW/5012mW VDD_CPU_GPU_CV 598mW/600mW VDD_SOC 1437mW/1440mW"


def test_parse_nano_line():
    s = tg.parse_line(NANO)
    assert s is not None and s.stamp_s is None
    assert s.rails_mw == {"POM_5V_IN": (2345, 2400), "POM_5V_GPU": (0, 0), "POM_5V_CPU": (456, 480)}
    assert s.power_w("POM_5V_IN") == pytest.approx(2.345)


def test_parse_orin_line_with_mw_suffix_and_timestamp():
    s = tg.parse_line(ORIN)
    assert s is not None and s.stamp_s is not None
    assert set(s.rails_mw) == {"VDD_IN", "VDD_CPU_GPU_CV", "VDD_SOC"}  # not RAM/SWAP (they carry MB)
    assert s.rails_mw["VDD_IN"] == (4975, 5012)
    assert tg.parse_line("RAM 1234/3964MB SWAP 0/1982MB") is None


def test_pick_rail_prefers_board_input():
    assert tg.pick_rail(tg.parse(NANO)) == "POM_5V_IN"
    assert tg.pick_rail(tg.parse(ORIN)) == "VDD_IN"
    assert tg.pick_rail(tg.parse(ORIN), "VDD_SOC") == "VDD_SOC"
    with pytest.raises(ValueError, match="rails seen: VDD_CPU_GPU_CV, VDD_IN, VDD_SOC"):
        tg.pick_rail(tg.parse(ORIN), "POM_5V_IN")


def _rail_lines(watts, fmt="VDD_IN {mw}mW/{mw}mW"):
    return "\n".join("RAM 1/2MB " + fmt.format(mw=int(w * 1000)) for w in watts)


def test_replayed_tegrastats_energy_is_mean_power_times_time():
    clock = FakeClock()
    m = TegrastatsMeter.replay("nano-1", _rail_lines([2, 4, 6, 8]), interval_ms=1000, clock=clock)
    assert m.is_available()
    clock.t = 0.5
    m.begin()
    clock.t = 3.5
    w = m.end()
    r = w.readings["nano-1"]
    # Samples at t = 1, 2, 3 s lie in [0.5, 3.5]: mean 6 W over 3 s.
    assert r.energy_j == pytest.approx(18.0)
    assert r.source == "measured:tegrastats/VDD_IN" and r.detail["samples"] == 3


def test_short_window_uses_the_last_sample_before_it():
    clock = FakeClock()
    m = TegrastatsMeter.replay("n", _rail_lines([2, 4], fmt="POM_5V_IN {mw}/{mw}"), interval_ms=1000, clock=clock)
    clock.t = 1.2
    m.begin()
    clock.t = 1.7
    r = m.end().readings["n"]
    assert r.energy_j == pytest.approx(4.0 * 0.5) and r.source == "measured:tegrastats/POM_5V_IN"


def test_tegrastats_without_rails_gives_no_figure():
    m = TegrastatsMeter.replay("n", "RAM 1/2MB", clock=FakeClock())
    m.begin()
    r = m.end().readings["n"]
    assert r.energy_j is None and r.source == "none"


def test_live_tegrastats_from_a_fake_binary(tmp_path):
    fake = tmp_path / "fake_tegrastats.py"
    fake.write_text(
        textwrap.dedent(
            """
            import sys, time
            while True:
                print("RAM 1/2MB POM_5V_IN 3000/3000 POM_5V_CPU 1000/1000", flush=True)
                time.sleep(0.02)
            """
        )
    )
    m = TegrastatsMeter("nano-1", interval_ms=20, command=(sys.executable, str(fake)))
    assert m.is_available()
    try:
        with m.measure() as w:
            time.sleep(0.3)
    finally:
        m.stop()
    r = w.readings["nano-1"]
    assert r.source == "measured:tegrastats/POM_5V_IN"
    assert r.energy_j == pytest.approx(3.0 * r.elapsed_s, rel=1e-6) and r.detail["samples"] >= 3


def test_tegrastats_missing_is_unavailable_with_reason():
    ok = TegrastatsMeter("n", command=("no-such-tegrastats-binary",)).is_available()
    assert not ok and "not on PATH" in ok.reason


# -- modelled ----------------------------------------------------------------------------------


def test_model_formula():
    parts = model_energy_j(busy_w=10, idle_w=2, radio_j_per_mb=0.05, wall_s=2.0, cpu_s=0.5, cores=0.5, tx_bytes=2e6)
    # busy 0.5 / 0.5 = 1 s at 10 W, idle 1 s at 2 W, 2 MB at 0.05 J/MB.
    assert parts["busy_s"] == 1.0 and parts["idle_s"] == 1.0
    assert parts["energy_j"] == pytest.approx(10 + 2 + 0.1)
    # Busy time never exceeds the wall time (CFS may overrun a period slightly).
    assert model_energy_j(busy_w=10, idle_w=2, radio_j_per_mb=0, wall_s=2, cpu_s=5, cores=1, tx_bytes=0)["busy_s"] == 2
    with pytest.raises(ValueError):
        model_energy_j(busy_w=1, idle_w=1, radio_j_per_mb=0, wall_s=1, cpu_s=1, cores=0, tx_bytes=0)


def test_modelled_meter_uses_catalog_power_and_counters():
    clock = FakeClock()
    cpu = {"v": 100.0}
    tx = {"v": 5e6}
    dev = ModelledDevice.from_catalog(
        "nano-1", "jetson-nano", cores=0.25, cpu_s=lambda: cpu["v"], tx_bytes=lambda: tx["v"]
    )
    mode = catalog.get("jetson-nano").max_mode
    assert (dev.busy_w, dev.idle_w) == (mode.busy_w, mode.idle_w)
    m = ModelledMeter([dev], clock=clock)
    assert m.is_available()
    m.begin("step")
    clock.t, cpu["v"], tx["v"] = 4.0, 100.5, 7e6  # 0.5 CPU-s at 0.25 cores = 2 s busy
    r = m.end("step").readings["nano-1"]
    expected = mode.busy_w * 2 + mode.idle_w * 2 + catalog.get("jetson-nano").radio_j_per_mb * 2
    assert r.source == SOURCE_MODELLED and r.energy_j == pytest.approx(expected)
    assert r.detail["busy_s"] == pytest.approx(2.0) and r.detail["tx_bytes"] == 2e6


def test_modelled_meter_with_unreadable_counter_is_unavailable():
    def broken() -> float:
        raise OSError("no such file")

    m = ModelledMeter([ModelledDevice("x", 1, 1, 0, 1, broken)])
    ok = m.is_available()
    assert not ok and "x" in ok.reason


def test_counters_read_cgroup_files_and_process_time(tmp_path):
    (tmp_path / "v1").mkdir()
    (tmp_path / "v1" / "cpuacct.usage").write_text("2500000000\n")
    assert cgroup_cpu_seconds(tmp_path / "v1")() == 2.5
    (tmp_path / "v2").mkdir()
    (tmp_path / "v2" / "cpu.stat").write_text("usage_usec 1500000\nuser_usec 1000000\n")
    assert cgroup_cpu_seconds(tmp_path / "v2")() == 1.5
    read = process_cpu_seconds()
    t0, c0 = time.process_time(), read()
    while time.process_time() - t0 < 0.1:
        pass
    assert read() - c0 >= 0.05


def test_for_this_process_measures_own_cpu():
    from edgepool.specs.pool import DeviceSpec

    m = ModelledMeter.for_this_process(DeviceSpec(name="me", kind="host-cpu"), cores=1.0)
    with m.measure() as w:
        t0 = time.process_time()
        while time.process_time() - t0 < 0.1:
            pass
    assert w.readings["me"].detail["busy_s"] >= 0.05 and w.readings["me"].source == SOURCE_MODELLED


# -- zeus (faked; the real package is an optional extra) --------------------------------------


@dataclass
class _Jetson:
    cpu_energy_mj: float | None = None
    gpu_energy_mj: float | None = None
    total_energy_mj: float | None = None


@dataclass
class _Measurement:
    time: float
    gpu_energy: dict = field(default_factory=dict)
    cpu_energy: dict | None = None
    dram_energy: dict | None = None
    soc_energy: object | None = None


class _FakeMonitor:
    def __init__(self, result, gpu=(), cpu=(), soc=False, **kwargs):
        self.result, self.gpu_indices, self.cpu_indices, self.soc_is_present = result, list(gpu), list(cpu), soc
        self.kwargs = kwargs
        self.open = set()

    def begin_window(self, key):
        self.open.add(key)

    def end_window(self, key):
        self.open.remove(key)
        return self.result


def test_zeus_jetson_total_rail():
    m = _Measurement(2.0, soc_energy=_Jetson(cpu_energy_mj=1000, gpu_energy_mj=500, total_energy_mj=9000))
    meter = ZeusMeter("orin", monitor_factory=lambda **kw: _FakeMonitor(m, soc=True, **kw))
    assert meter.is_available()
    with meter.measure() as w:
        pass
    r = w.readings["orin"]
    assert r.energy_j == 9.0 and r.source == "measured:zeus/jetson" and r.elapsed_s == 2.0
    assert r.detail == {"cpu_energy_j": 1.0, "gpu_energy_j": 0.5}


def test_zeus_gpu_plus_rapl():
    m = _Measurement(1.0, gpu_energy={0: 100.0}, cpu_energy={0: 20.0}, dram_energy={0: 5.0})
    meter = ZeusMeter("laptop", monitor_factory=lambda **kw: _FakeMonitor(m, gpu=[0], cpu=[0], **kw))
    with meter.measure() as w:
        pass
    assert w.readings["laptop"].energy_j == 125.0
    assert w.readings["laptop"].source == "measured:zeus/nvml+rapl"
    assert energy_of(_Measurement(1.0))[0] is None


def test_zeus_without_sensors_is_unavailable_and_selection_falls_back():
    meter = ZeusMeter("vm", monitor_factory=lambda **kw: _FakeMonitor(_Measurement(1.0), **kw))
    ok = meter.is_available()
    assert not ok and "time only" in ok.reason
    broken = ZeusMeter("vm", monitor_factory=lambda **kw: (_ for _ in ()).throw(ValueError("no RAPL")))
    assert "no RAPL" in broken.is_available().reason


@pytest.mark.skipif(bool(zeus_importable()), reason="zeus is installed here")
def test_zeus_not_installed_says_how_to_get_it():
    ok = ZeusMeter("x").is_available()
    assert not ok and "edgepool[zeus]" in ok.reason


def test_select_meter_falls_back_to_modelled_then_null():
    modelled = ModelledMeter([ModelledDevice("d", 5, 1, 0, 1, lambda: 0.0)])
    meter, skipped = select_meter("d", prefer=("tegrastats",), modelled=modelled)
    if not TegrastatsMeter("d").is_available():
        assert meter is modelled and skipped and skipped[0].startswith("tegrastats:")
    meter, _ = select_meter("d", prefer=())
    assert isinstance(meter, NullMeter)


# -- replay and registry ---------------------------------------------------------------------


def test_replay_meter_keeps_recorded_sources():
    rec = EnergyWindow("s", {"a": EnergyReading("a", 7.0, 1.0, "measured:tegrastats/VDD_IN")})
    m = ReplayMeter.from_windows([rec, rec.to_json()])
    for _ in range(2):
        with m.measure() as w:
            pass
        assert w.readings["a"].energy_j == 7.0 and w.readings["a"].source == "measured:tegrastats/VDD_IN"
    m.begin()
    with pytest.raises(IndexError):
        m.end()


def test_replay_constant_power():
    clock = FakeClock()
    m = ReplayMeter.constant_power({"a": 5.0, "b": 2.0}, source="modelled", clock=clock)
    m.begin()
    clock.t = 3.0
    w = m.end()
    assert w.total_j == 21.0 and w.source == "modelled"
    with pytest.raises(ValueError):
        ReplayMeter.constant_power({"a": 1.0}, source="bogus")


def test_registry_and_report():
    with pytest.raises(ValueError, match="known meters: zeus, tegrastats, modelled, replay, null"):
        make_meter("rapl")
    assert isinstance(make_meter("null", ["x"]), NullMeter)
    names = [n for n, _, _ in meter_report()]
    assert names == list(METERS)
    assert dict((n, ok) for n, ok, _ in meter_report())["modelled"] is True


def test_energy_and_testbed_import_without_torch_or_zeus():
    code = "import sys, edgepool.energy, edgepool.testbed, edgepool.cli.env, edgepool.cli.testbed; print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'zeus')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
