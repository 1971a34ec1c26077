"""The testbed on real namespaces, links and cgroups (needs root; skipped otherwise).

Each test brings up its own small testbed under a random tag and takes it down again;
the last test checks that nothing with those tags is left. Traffic only flows between
the namespaces the tests create (and their bridge).
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time

import pytest

from edgepool.specs.pool import PoolSpec
from edgepool.testbed import Testbed, TestbedError, is_available, measure_throughput
from edgepool.testbed import cgroups as cg_mod
from edgepool.testbed import net
from edgepool.testbed.core import state_path

_AVAIL = is_available()
pytestmark = [pytest.mark.root, pytest.mark.skipif(not _AVAIL, reason=f"testbed unavailable: {_AVAIL.reason}")]

_TAGS: list[str] = []


def _tag() -> str:
    t = "t" + secrets.token_hex(2)[:3]
    _TAGS.append(t)
    return t


def _pool(medium: str = "switched", mbps: float = 40.0, devices: list[dict] | None = None) -> PoolSpec:
    devices = devices or [
        {"name": "a", "kind": "jetson-nano", "host": "emulated", "compute_scale": 1.0, "memory_gb": 0.5},
        {"name": "b", "kind": "jetson-nano", "host": "emulated", "compute_scale": 3.0, "memory_gb": 1.0},
    ]
    return PoolSpec.model_validate(
        {"name": f"test-{medium}", "network": {"medium": medium, "bandwidth_mbps": mbps}, "devices": devices}
    )


def _leftovers(tag: str) -> list[str]:
    pfx = f"ep-{tag}-"
    out = [f"netns {n}" for n in os.listdir("/run/netns") if n.startswith(pfx)] if os.path.isdir("/run/netns") else []
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    out += [f"link {line.split(':')[1].strip()}" for line in links.splitlines() if f" {pfx}" in line]
    info, _ = cg_mod.detect()
    if info is not None:
        out += [f"cgroup {p}" for p in cg_mod.find_device_cgroups(info, pfx)]
    if state_path(tag).exists():
        out.append(f"state {state_path(tag)}")
    return out


def test_up_down_leaves_nothing():
    tag = _tag()
    pool = _pool(medium="shared")
    state = Testbed.up(pool, tag=tag)
    try:
        assert state.emulated and state.devices == ["a", "b"]
        left = _leftovers(tag)
        assert any(x.startswith("netns") for x in left) and any("ifb" in x for x in left)
        assert any(x.startswith("cgroup") for x in left) and state_path(tag).exists()
        # A second up with the same tag refuses rather than clobbering.
        with pytest.raises(TestbedError, match="already up"):
            Testbed.up(pool, tag=tag)
        # attach() reads the same state back from disk.
        again = Testbed.attach(tag=tag)
        assert again is not None and again.env("a") == state.env("a") and again.command_prefix("b") == state.command_prefix("b")
        # The devices' TCP is Linux's default, not whatever this host is tuned to.
        if state.layout.tcp_congestion:
            cc = subprocess.run(["ip", "netns", "exec", state.netns("a"), "sysctl", "-n",
                                 "net.ipv4.tcp_congestion_control"], capture_output=True, text=True, check=True)
            assert cc.stdout.strip() == net.TCP_CONGESTION
    finally:
        reports = Testbed.down(tag=tag)
    assert reports[0].ok, reports[0].problems
    assert _leftovers(tag) == []


def test_down_cleans_up_after_a_crash():
    """A process that brought the testbed up dies by SIGKILL; down (even without the
    state file) finds everything by its prefix, kills a rank still running inside, and
    removes the rest."""
    tag = _tag()
    code = (
        "import os, subprocess, sys\n"
        "from edgepool.specs.pool import PoolSpec\n"
        "from edgepool.testbed import Testbed\n"
        f"pool = PoolSpec.model_validate({_pool().model_dump()!r})\n"
        f"st = Testbed.up(pool, tag={tag!r})\n"
        "subprocess.Popen(st.command_prefix('a') + ['sleep', '60'], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
        "import time\n"
        "while not st.cgroup('a').pids(): time.sleep(0.01)\n"
        "print('up', flush=True)\n"
        "os.kill(os.getpid(), 9)\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert "up" in p.stdout, p.stderr
    assert _leftovers(tag), "the crashed run should have left its testbed behind"
    state_path(tag).unlink()  # the worst case: the journal is gone too
    reports = Testbed.down(tag=tag)
    assert reports[0].ok, reports[0].problems
    assert reports[0].killed_pids, "the sleeping rank inside the namespace should have been killed"
    assert _leftovers(tag) == []


def test_switched_links_measure_within_10_percent_of_configured_rate():
    tag = _tag()
    pool = _pool(
        devices=[
            {"name": "a", "kind": "jetson-nano", "host": "emulated"},
            {"name": "b", "kind": "jetson-nano", "host": "emulated", "bandwidth_mbps": 20.0},
        ],
        mbps=60.0,
    )
    with Testbed.running(pool, tag=tag, caps=False) as state:
        up, down = measure_throughput(state, [("a", "b")], duration_s=1.0) + measure_throughput(
            state, [("b", "a")], duration_s=1.0
        )
    # a -> b is limited by b's 20 Mbit/s downlink, b -> a by b's 20 Mbit/s uplink.
    for r in (up, down):
        assert r.configured_bps == 20_000_000
        assert 0.90 <= r.ratio <= 1.02, f"{r.src}->{r.dst}: {r.bps / 1e6:.1f} Mbit/s vs 20 configured"
    assert _leftovers(tag) == []


def test_shared_medium_is_one_bottleneck():
    tag = _tag()
    devices = [{"name": n, "kind": "jetson-nano", "host": "emulated"} for n in "abcd"]
    pool = _pool(medium="shared", mbps=40.0, devices=devices)
    with Testbed.running(pool, tag=tag, caps=False) as state:
        (single,) = measure_throughput(state, [("a", "b")], duration_s=1.0)
        pair = measure_throughput(state, [("a", "b"), ("c", "d")], duration_s=1.5)
    assert 0.90 <= single.bps / 40e6 <= 1.02, single
    total = sum(r.bps for r in pair)
    # Two disjoint pairs share one 40 Mbit/s channel: together they get ~40, not ~80.
    assert 0.85 <= total / 40e6 <= 1.05, [r.bps / 1e6 for r in pair]


def test_rank_over_its_memory_cap_is_oom_killed_and_reported():
    tag = _tag()
    pool = _pool(
        devices=[{"name": "small", "kind": "jetson-nano", "host": "emulated", "memory_gb": 0.064}]
    )
    with Testbed.running(pool, tag=tag) as state:
        before = state.oom_kills("small")
        p = subprocess.run(
            state.command_prefix("small") + [sys.executable, "-c", "x = bytearray(300 * 10**6)"],
            env={**os.environ, **state.env("small")},
            capture_output=True,
            timeout=30,
        )
        assert p.returncode == -9, (p.returncode, p.stderr[-300:])
        assert state.oom_killed("small", before)
        cause = state.exit_cause("small", p.returncode, before)
        assert cause is not None and cause.startswith("out of memory") and "0.06 GB" in cause
        # A rank within its cap is untouched.
        ok = subprocess.run(
            state.command_prefix("small") + [sys.executable, "-c", "x = bytearray(10 * 10**6)"],
            env={**os.environ, **state.env("small")},
            timeout=30,
        )
        assert ok.returncode == 0 and state.exit_cause("small", 0) is None


def test_cpu_caps_keep_the_speed_ratio():
    tag = _tag()
    pool = _pool()  # speeds 1 and 3
    burn = "import time\nt = time.time()\nwhile time.time() - t < 0.8: pass"
    with Testbed.running(pool, tag=tag, host_cpus=1.0) as state:
        assert state.caps is not None
        assert state.caps.of("a").cpu_cores == pytest.approx(0.25)
        assert state.caps.of("b").cpu_cores == pytest.approx(0.75)
        assert state.env("a")["OMP_NUM_THREADS"] == "1"
        used, wall = {}, {}
        for d in ("a", "b"):  # one after the other: the host's other load is not ours to control
            t0 = time.monotonic()
            subprocess.run(state.command_prefix(d) + [sys.executable, "-c", burn], env={**os.environ, **state.env(d)}, check=True, timeout=30)
            wall[d] = time.monotonic() - t0
            used[d] = state.cpu_usage_s(d)
    # The cap is a ceiling: never more than cores x wall time (CFS may overrun a period slightly).
    assert used["a"] <= 0.25 * wall["a"] * 1.15 + 0.02, (used, wall)
    assert used["b"] <= 0.75 * wall["b"] * 1.15 + 0.02, (used, wall)
    # And a busy device uses its cap: a burns ~0.2 s in 0.8 s; b about three times that,
    # unless other work on this host steals its CPU (hence the loose lower bound).
    assert used["a"] >= 0.15, (used, wall)
    assert used["b"] >= 1.5 * used["a"], (used, wall)


def test_rank_reaches_the_rendezvous_address_and_binds_its_own():
    """What gloo needs: MASTER_ADDR reachable from inside, GLOO_SOCKET_IFNAME present."""
    tag = _tag()
    with Testbed.running(_pool(), tag=tag) as state:
        srv = socket.socket()
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind((state.master_addr, 0))
        srv.listen(1)
        srv.settimeout(10)
        port = srv.getsockname()[1]
        env = {**os.environ, **state.env("a")}
        code = (
            "import os, socket\n"
            "s = socket.socket(); s.bind((os.environ['EDGEPOOL_DEVICE_ADDR'], 0))\n"
            "s.connect((os.environ['MASTER_ADDR'], int(os.environ['PORT']))); s.sendall(open('/proc/self/cgroup').read().encode())\n"
        )
        p = subprocess.Popen(state.command_prefix("a") + [sys.executable, "-c", code], env={**env, "PORT": str(port)})
        conn, peer = srv.accept()
        data = conn.recv(4096).decode()
        conn.close()
        srv.close()
        assert p.wait(timeout=10) == 0
        assert peer[0] == state.address("a")
        assert f"ep-{tag}-a" in data  # the rank ran inside the device's cgroups
        routes = subprocess.run(["ip", "-n", state.netns("a"), "route"], capture_output=True, text=True).stdout
        assert "default" not in routes  # nothing can leave the testbed's subnet
        links = subprocess.run(["ip", "-n", state.netns("a"), "-o", "link"], capture_output=True, text=True).stdout
        assert f" {env['GLOO_SOCKET_IFNAME']}@" in links


def test_enter_moves_a_forked_child_into_the_device():
    tag = _tag()
    with Testbed.running(_pool(), tag=tag) as state:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child
            try:
                os.close(r)
                state.enter("b")
                s = socket.socket()
                s.bind((state.address("b"), 0))  # only possible inside b's namespace
                msg = open("/proc/self/cgroup").read()
                os.write(w, msg.encode())
            finally:
                os._exit(0)
        os.close(w)
        with os.fdopen(r) as f:
            data = f.read()
        os.waitpid(pid, 0)
        assert f"ep-{tag}-b" in data


def test_no_leftovers_from_this_module():
    for tag in _TAGS:
        assert _leftovers(tag) == [], tag
