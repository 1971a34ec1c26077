"""The testbed's pure parts: caps, link plan, tc commands, presets, cgroup detection,
state round trip, and the fallback without root. None of this needs root."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgepool.specs.pool import DeviceSpec, NetworkSpec, PoolSpec
from edgepool.testbed import NETWORK_PRESETS, Testbed, TestbedError, network_preset, plan_caps
from edgepool.testbed import cgroups, core, net
from edgepool.testbed.probe import Features


def _dev(name, **kw):
    return DeviceSpec(name=name, kind=kw.pop("kind", "jetson-nano"), host="emulated", **kw)


# -- caps ---------------------------------------------------------------------------------------


def test_cpu_caps_keep_ratios_and_fit_the_host():
    devs = [_dev("fast", compute_scale=4), _dev("slow1", compute_scale=1), _dev("slow2", compute_scale=1), _dev("mid", compute_scale=2)]
    plan = plan_caps(devs, host_cpus=2.0, host_memory_bytes=16 * 10**9)
    cores = {c.device: c.cpu_cores for c in plan.devices}
    assert cores == pytest.approx({"fast": 1.0, "slow1": 0.25, "slow2": 0.25, "mid": 0.5})
    assert plan.cores_per_speed == pytest.approx(0.25) and plan.total_cores == pytest.approx(2.0)
    assert plan.of("mid").cpu_quota_us == 5_000 and plan.of("mid").cpu_period_us == 10_000
    assert plan.of("fast").num_threads == 1 and plan.warnings == ()
    assert "1.0 relative speed = 0.250 host cores" in plan.describe()


def test_sum_fit_gives_no_device_more_than_one_core():
    # A rank computes on one thread: 1.5 cores for the fast device would go unused, and it
    # would compute slower than its share of the pool says. The ratios hold; the caps sum under the host.
    plan = plan_caps([_dev("fast", compute_scale=3), _dev("slow", compute_scale=1)], host_cpus=2.0,
                     host_memory_bytes=10**10)
    assert plan.of("fast").cpu_cores == pytest.approx(1.0) and plan.of("slow").cpu_cores == pytest.approx(1 / 3)
    assert plan.of("fast").num_threads == 1 and plan.warnings == ()


def test_fastest_fit_warns_when_caps_exceed_the_host():
    devs = [_dev("fast", compute_scale=4), _dev("slow", compute_scale=1)]
    plan = plan_caps(devs, host_cpus=2.0, host_memory_bytes=10**10, cpu_fit="fastest")
    assert plan.of("fast").cpu_cores == pytest.approx(2.0) and plan.of("slow").cpu_cores == pytest.approx(0.5)
    assert plan.of("fast").num_threads == 2
    assert any("add up to 2.50 cores but this host has 2" in w for w in plan.warnings)


def test_catalog_speed_is_used_without_compute_scale():
    devs = [_dev("orin", kind="jetson-orin-nano"), _dev("nano")]
    plan = plan_caps(devs, host_cpus=2.0, host_memory_bytes=10**10)
    assert plan.of("orin").cpu_cores / plan.of("nano").cpu_cores == pytest.approx(devs[0].speed() / devs[1].speed())


def test_tiny_devices_get_a_floor_and_a_warning():
    devs = [_dev("big", compute_scale=1000), _dev("tiny", compute_scale=1)]
    plan = plan_caps(devs, host_cpus=1.0, host_memory_bytes=10**10)
    assert plan.of("tiny").cpu_cores == 0.05
    # 0.05 cores of a 10 ms period would be under the kernel's 1 ms minimum quota: the period grows instead.
    assert plan.of("tiny").cpu_quota_us == 1_000 and plan.of("tiny").cpu_period_us == 20_000
    assert any(w.startswith("tiny:") for w in plan.warnings)


def test_devices_are_pinned_to_cpus_with_room():
    from edgepool.testbed.caps import pin_cpus

    # Largest first, each on the CPU with the most room left.
    assert pin_cpus({"orin": 0.55, "tx2": 0.41, "nano": 0.27, "rpi": 0.27}, [0, 1]) == {
        "orin": (0,), "tx2": (1,), "nano": (1,), "rpi": (0,)}
    assert pin_cpus({"big": 2.0, "small": 0.5}, [0, 1, 2]) == {"big": (0, 1), "small": (2,)}
    plan = plan_caps([_dev("a", compute_scale=3), _dev("b", compute_scale=1)], host_cpus=2.0,
                     host_memory_bytes=10**10, cpu_ids=[4, 5], cpu_fit="fastest")
    assert plan.of("a").cpus == (4, 5) and plan.of("b").cpus == (4,)
    assert "a on CPU 4,5; b on CPU 4" in plan.describe()
    assert plan_caps([_dev("a")], host_cpus=1.0, host_memory_bytes=10**10).of("a").cpus == ()


def test_memory_caps_exact_or_scaled():
    devs = [_dev("a", memory_gb=4), _dev("b", memory_gb=4)]
    exact = plan_caps(devs, host_cpus=2, host_memory_bytes=6 * 10**9)
    assert [c.memory_bytes for c in exact.devices] == [4 * 10**9, 4 * 10**9]
    assert any("memory caps add up to 8.0 GB" in w for w in exact.warnings)
    fit = plan_caps(devs, host_cpus=2, host_memory_bytes=6 * 10**9, memory_fit="fit")
    assert fit.memory_scale == pytest.approx(0.6)  # 0.8 * 6 / 8
    assert [c.memory_bytes for c in fit.devices] == [2_400_000_000, 2_400_000_000]
    # Without memory_gb a device gets its kind's memory less what the OS keeps.
    default = plan_caps([_dev("c")], host_cpus=2, host_memory_bytes=64 * 10**9)
    assert default.devices[0].memory_bytes == int(round((4.0 - 1.2) * 1e9))
    with pytest.raises(ValueError):
        plan_caps(devs, host_cpus=2, host_memory_bytes=1, cpu_fit="all")


# -- network plan --------------------------------------------------------------------------------


def _layout(network: NetworkSpec, devices, netem=False, shared_ok=True):
    return net.plan_network(network, devices, tag="ab1", subnet="10.213.7.0/24", netem=netem, shared_ok=shared_ok)


def test_switched_links_per_device_rate():
    lay = _layout(NetworkSpec(medium="switched", bandwidth_mbps=100), [_dev("a"), _dev("b", bandwidth_mbps=20)])
    assert lay.ifb is None and lay.shared_bps is None
    assert (lay.of("a").up_bps, lay.of("a").down_bps) == (100_000_000, 100_000_000)
    assert lay.of("b").up_bps == 20_000_000
    assert lay.bridge_addr == "10.213.7.1" and lay.of("a").address == "10.213.7.10" and lay.of("b").address == "10.213.7.11"
    assert lay.of("a").netns == "ep-ab1-a" and lay.of("b").host_if == "ep-ab1-v1" and lay.of("a").ns_if == "ep0"
    # No netem: rate only, and the layout says so.
    assert lay.of("a").delay_ms == 0 and any("NOT emulated" in u and "no netem" in u for u in lay.unshaped)


def test_shared_medium_is_one_ifb_bottleneck():
    lay = _layout(NetworkSpec(medium="shared", bandwidth_mbps=70), [_dev("a"), _dev("b", bandwidth_mbps=10)])
    assert lay.ifb == "ep-ab1-ifb" and lay.shared_bps == 70_000_000
    assert lay.of("a").up_bps is None and lay.of("b").up_bps == 10_000_000  # own radio cap only
    steps = [" ".join(s.argv) for s in net.setup_steps(lay)]
    redirects = [s for s in steps if "mirred egress redirect dev ep-ab1-ifb" in s]
    assert len(redirects) == 2  # every device's transmissions go through the one IFB
    assert any("class add dev ep-ab1-ifb parent 1: classid 1:1 htb rate 70000000bit" in s for s in steps)
    assert any("match ip src 10.213.7.11/32 flowid 1:3" in s for s in steps)


def test_shared_without_ifb_degrades_to_switched_and_says_so():
    lay = _layout(NetworkSpec(medium="shared", bandwidth_mbps=70), [_dev("a")], shared_ok=False)
    assert lay.medium == "switched" and lay.ifb is None and lay.of("a").up_bps == 70_000_000
    assert any("shared medium NOT emulated" in u for u in lay.unshaped)


def test_netem_where_the_kernel_has_it():
    network = NetworkSpec(medium="switched", bandwidth_mbps=50, latency_ms=4, jitter_ms=2, loss_pct=1)
    lay = _layout(network, [_dev("a"), _dev("b", latency_ms=10)], netem=True)
    assert (lay.of("a").delay_ms, lay.of("a").jitter_ms, lay.of("a").loss_pct) == (2, 1, 1)
    assert lay.of("b").delay_ms == 5 and lay.unshaped == ()
    steps = [" ".join(s.argv) for s in net.setup_steps(lay)]
    up = [s for s in steps if s.startswith("tc -n ep-ab1-a qdisc add dev ep0 parent 1:1")]
    assert up == ["tc -n ep-ab1-a qdisc add dev ep0 parent 1:1 handle 10: netem limit 1000 delay 2ms 1ms loss 1%"]
    down = [s for s in steps if s.startswith("tc qdisc add dev ep-ab1-v0 parent 1:1")]
    assert down == ["tc qdisc add dev ep-ab1-v0 parent 1:1 handle 10: netem limit 1000 delay 2ms 1ms"]  # loss once, on the uplink
    no_netem = [" ".join(s.argv) for s in net.setup_steps(_layout(network, [_dev("a")]))]
    assert not any("netem" in s for s in no_netem)


def test_every_created_resource_carries_the_prefix_and_fits_ifnamsiz():
    lay = _layout(NetworkSpec(medium="shared"), [_dev(f"device-with-a-long-name-{i}") for i in range(12)])
    created = [s.creates for s in net.setup_steps(lay) if s.creates]
    assert created and all(c.split(":", 1)[1].startswith("ep-ab1-") for c in created)
    assert all(len(c.split(":", 1)[1]) <= 15 for c in created if c.startswith("link:"))
    # Queues are bytes (GSO super-packets would make a packet limit megabytes deep).
    assert net.queue_bytes(50_000_000) == 312_500 and net.queue_bytes(1_000_000) == 4 * 65536


def test_tags_and_subnets():
    assert net.tag_for("home-lab") == net.tag_for("home-lab") and len(net.tag_for("x")) == 4
    a = net.default_subnet("abcd")
    b = net.default_subnet("abcd", taken=[a])
    assert a != b and a.startswith("10.213.") and b.endswith(".0/24")
    with pytest.raises(ValueError, match="tag"):
        net.plan_network(NetworkSpec(), [_dev("a")], tag="TOO-LONG", subnet="10.213.1.0/24", netem=False)
    with pytest.raises(ValueError, match="private"):
        net.plan_network(NetworkSpec(), [_dev("a")], tag="ab", subnet="8.8.8.0/24", netem=False)


def test_presets():
    assert set(NETWORK_PRESETS) >= {"802.11n", "802.11ac", "802.11ax", "ethernet"}
    assert network_preset("wifi4") == NETWORK_PRESETS["802.11n"] and network_preset("802.11n").medium == "shared"
    assert network_preset("ethernet").medium == "switched"
    assert network_preset("802.11n").bandwidth_mbps < network_preset("802.11ac").bandwidth_mbps < network_preset("802.11ax").bandwidth_mbps
    with pytest.raises(ValueError, match="known presets: 802.11n"):
        network_preset("lte")


# -- cgroup detection ------------------------------------------------------------------------------

V1 = """\
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
V1_COMOUNT = """\
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime shared:1 - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime shared:2 - cgroup cgroup rw,memory
"""


def test_detect_cgroup_v1_layouts():
    info, _ = cgroups.detect(V1)
    assert info is not None and info.version == 1
    assert info.roots == (Path("/sys/fs/cgroup/cpu"), Path("/sys/fs/cgroup/cpuacct"), Path("/sys/fs/cgroup/memory"))
    co, _ = cgroups.detect(V1_COMOUNT)
    assert co is not None and co.cpu_root == co.cpuacct_root and len(co.roots) == 2
    cg = cgroups.DeviceCgroup(co, "ep-ab1-a")
    assert cg.procs_files == (
        Path("/sys/fs/cgroup/cpu,cpuacct/edgepool/ep-ab1-a/cgroup.procs"),
        Path("/sys/fs/cgroup/memory/edgepool/ep-ab1-a/cgroup.procs"),
    )


def test_detect_cgroup_v2(tmp_path):
    (tmp_path / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    info, _ = cgroups.detect(f"30 1 0:26 / {tmp_path} rw - cgroup2 cgroup2 rw\n")
    assert info is not None and info.version == 2 and info.roots == (tmp_path,)
    (tmp_path / "cgroup.controllers").write_text("pids\n")
    none, why = cgroups.detect(f"30 1 0:26 / {tmp_path} rw - cgroup2 cgroup2 rw\n")
    assert none is None and "cpu, memory" in why


def test_v2_cgroup_files(tmp_path):
    """The v2 writes and reads, on a fake directory tree."""
    info = cgroups.CgroupInfo(2, tmp_path, tmp_path, tmp_path)
    cg = cgroups.DeviceCgroup(info, "ep-ab1-a")
    cg.create()
    assert (tmp_path / "edgepool" / "ep-ab1-a").is_dir()
    assert cg.set_cpu_cores(0.25) == 2_500
    assert (cg.cpu_dir / "cpu.max").read_text() == "2500 10000"
    (cg.cpu_dir / "cpu.weight").write_text("100")
    (cg.cpu_dir.parent / "cpu.weight").write_text("100")
    cg.set_cpu_priority()
    assert (cg.cpu_dir / "cpu.weight").read_text() == (cg.cpu_dir.parent / "cpu.weight").read_text() == "10000"
    (cg.memory_dir / "memory.swap.max").write_text("max")
    cg.set_memory_bytes(10**9)
    assert (cg.memory_dir / "memory.max").read_text() == str(10**9)
    assert (cg.memory_dir / "memory.swap.max").read_text() == "0"
    (cg.memory_dir / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n")
    (cg.cpu_dir / "cpu.stat").write_text("usage_usec 2000000\n")
    assert cg.oom_kills() == 1 and cg.cpu_usage_s() == 2.0


# -- state, prefix, fallback ---------------------------------------------------------------------


def _fake_state() -> core.TestbedState:
    info, _ = cgroups.detect(V1)
    devs = [_dev("a", compute_scale=1), _dev("b", compute_scale=3)]
    lay = _layout(NetworkSpec(), devs)
    caps = plan_caps(devs, host_cpus=2, host_memory_bytes=10**10, cpu_ids=[0, 1], cpu_fit="fastest")
    return core.TestbedState(tag="ab1", pool_name="p", emulated=True, layout=lay, caps=caps, cgroup_info=info, local_devices=["me"])


def test_command_prefix_joins_cgroups_before_the_namespace():
    st = _fake_state()
    p = st.command_prefix("a")
    assert p[:2] == ["sh", "-c"] and p[-4:] == ["ip", "netns", "exec", "ep-ab1-a"]
    assert "echo $$ > /sys/fs/cgroup/memory/edgepool/ep-ab1-a/cgroup.procs" in p[2] and p[2].endswith('exec "$@"')
    assert p[4:7] == ["taskset", "-c", "0"] and st.command_prefix("b")[4:7] == ["taskset", "-c", "0,1"]
    env = st.env("a")
    assert env["GLOO_SOCKET_IFNAME"] == "ep0" and env["MASTER_ADDR"] == "10.213.7.1" == st.master_addr
    assert env["EDGEPOOL_DEVICE_ADDR"] == "10.213.7.10" and env["OMP_NUM_THREADS"] == "1"
    # A plain local device runs as is but talks to the namespaces over the bridge.
    assert st.command_prefix("me") == [] and st.env("me")["GLOO_SOCKET_IFNAME"] == "ep-ab1-br"


def test_state_json_round_trip():
    st = _fake_state()
    back = core.TestbedState.from_json(st.to_json())
    assert back == st
    assert back.command_prefix("b") == st.command_prefix("b")


def test_exit_cause_without_oom():
    st = core.TestbedState(tag="ab1", pool_name="p", emulated=False)
    assert st.exit_cause("a", 0) is None
    assert st.exit_cause("a", -9) == "killed by signal SIGKILL"
    assert st.exit_cause("a", 3) == "exited with status 3"


def test_without_root_the_testbed_falls_back_to_plain_processes(monkeypatch):
    feats = Features(notes={"root": "not running as root (uid 1000); namespaces, tc and cgroups need root"})
    monkeypatch.setattr(core, "probe", lambda refresh=False: feats)
    pool = PoolSpec(devices=(_dev("a"), _dev("b"), DeviceSpec(name="me", kind="host-cpu")))
    st = Testbed.up(pool)
    assert not st.emulated and st.devices == []
    assert "testbed unavailable: not running as root" in st.notice and "plain local processes" in st.notice
    assert st.command_prefix("a") == [] and st.env("a") == {"MASTER_ADDR": "127.0.0.1"}
    assert st.describe() == [st.notice]
    with pytest.raises(TestbedError, match="not running as root"):
        Testbed.up(pool, fallback=False)


def test_pool_without_emulated_devices_needs_nothing():
    st = Testbed.up(PoolSpec(devices=(DeviceSpec(name="me", kind="host-cpu"),)))
    assert not st.emulated and "no device with host: emulated" in st.notice


def test_every_namespace_gets_the_devices_tcp_congestion_control():
    lay = _layout(NetworkSpec(medium="shared", bandwidth_mbps=70), [_dev("a"), _dev("b")])
    steps = [" ".join(s.argv) for s in net.setup_steps(lay)]
    for ns in ("ep-ab1-a", "ep-ab1-b"):
        assert f"ip netns exec {ns} sysctl -q -w net.ipv4.tcp_congestion_control={net.TCP_CONGESTION}" in steps
    assert any(net.TCP_CONGESTION in line for line in lay.describe())
    # Where the kernel cannot set it, the namespaces keep the host's, and the layout says so.
    lay = net.plan_network(NetworkSpec(medium="shared"), [_dev("a")], tag="ab1", subnet="10.213.7.0/24",
                           netem=False, host_congestion="bbr", congestion_ok=False)
    assert not any("tcp_congestion_control" in " ".join(s.argv) for s in net.setup_steps(lay))
    assert any("host's bbr, NOT cubic" in u for u in lay.unshaped)


def test_env_reports_meters_testbed_features_and_tcp(capsys):
    from edgepool.cli.main import main
    from edgepool.testbed.core import congestion_controls

    assert main(["env", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["meters"] and rep["testbed"] and rep["summary"]
    assert any(line.startswith("energy:") for line in rep["summary"])
    testbed_up = any("shaped links" in line for line in rep["summary"])
    if testbed_up and congestion_controls() is not None:
        assert any("TCP congestion control" in line for line in rep["summary"])
