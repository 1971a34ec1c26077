"""Bring an emulated pool up and down on this machine, and run ranks inside it.

``Testbed.up(pool)`` gives every ``host: emulated`` device of the pool its own network
namespace, a shaped veth link to one bridge (see ``edgepool.testbed.net``) and its own
cgroups with a CPU quota and a memory cap (see ``edgepool.testbed.caps``). It returns a
``TestbedState`` that the launcher asks how to start each device's rank:

    state = Testbed.up(pool)
    argv = state.command_prefix("nano-1") + [sys.executable, "-m", "..."]
    env = {**os.environ, **state.env("nano-1")}
    ...
    Testbed.down(tag=state.tag)

Invariants:

- Everything the testbed makes is named with the prefix ``ep-<tag>-`` (namespaces,
  links, cgroups) and journalled, *before* it is made, in a state file
  ``/run/edgepool/testbed-<tag>.json``. ``down`` removes the union of the journal and
  what a prefix scan finds, so it also cleans up after a crash or a ``kill -9``.
- Qdiscs and filters are only ever attached to links the testbed made, so deleting
  those links removes them; no qdisc of another link is touched.
- Addresses live in one private /24 on the testbed's own bridge and namespaces. The
  namespaces have no default route and nothing is forwarded or NATed out of them.
- Without root, ``ip``/``tc`` or namespaces, ``up`` returns a state with
  ``emulated=False`` and one ``notice`` that says why; its ``command_prefix`` is empty,
  so the ranks run as plain local processes. ``fallback=False`` raises instead.

Units: rates in bit/s (``_bps``), CPU in host cores, memory in bytes.
"""

from __future__ import annotations

import ctypes
import json
import os
import shlex
import signal
import subprocess
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from edgepool.errors import EdgepoolError
from edgepool.specs.pool import PoolSpec
from edgepool.testbed import cgroups, net
from edgepool.testbed.caps import CapsPlan, CpuFit, DeviceCaps, MemoryFit, plan_caps
from edgepool.testbed.probe import Availability, Features, probe

RUN_DIR = Path(os.environ.get("EDGEPOOL_RUN_DIR", "/run/edgepool"))
NETNS_DIR = Path("/run/netns")
STATE_VERSION = 1


class TestbedError(EdgepoolError, RuntimeError):
    """The testbed could not be brought up (or down); the message names the step."""

    __test__ = False  # not a pytest test class, despite the name


# --------------------------------------------------------------------------------------
# helpers


# ``ip`` and ``tc`` wait on the kernel's rtnl lock, which the asynchronous teardown of an
# earlier testbed's namespaces can hold for seconds (an ``ip link add`` took over 10 s
# once in a full suite here, right after the recovery root tests): a hang is still
# reported, later.
RUN_TIMEOUT_S = 30.0


def _run(argv: Sequence[str], check: bool = True, timeout_s: float = RUN_TIMEOUT_S) -> subprocess.CompletedProcess:
    try:
        p = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired) as exc:
        if check:
            raise TestbedError(f"`{shlex.join(argv)}` failed: {exc}") from None
        return subprocess.CompletedProcess(list(argv), 1, "", str(exc))
    if check and p.returncode != 0:
        err = (p.stderr or p.stdout).strip().splitlines()
        raise TestbedError(f"`{shlex.join(argv)}` failed: {err[0] if err else f'exit {p.returncode}'}")
    return p


def state_path(tag: str) -> Path:
    return RUN_DIR / f"testbed-{tag}.json"


def _list_netns() -> list[str]:
    try:
        return sorted(os.listdir(NETNS_DIR))
    except OSError:
        return []


def _list_links() -> list[tuple[str, str]]:
    """(name, kind) of every link in the root namespace."""
    p = _run(["ip", "-j", "-d", "link", "show"], check=False)
    try:
        data = json.loads(p.stdout or "[]")
    except json.JSONDecodeError:
        return []
    return [(x.get("ifname", ""), (x.get("linkinfo") or {}).get("info_kind", "")) for x in data]


_SYSCTL_TCP = Path("/proc/sys/net/ipv4")


def congestion_controls() -> tuple[str, list[str], list[str]] | None:
    """The host's TCP congestion control, the available ones and the ones a namespace
    may set (``net.ipv4.tcp_*congestion_control``), or None where unreadable."""
    try:
        return ((_SYSCTL_TCP / "tcp_congestion_control").read_text().strip(),
                (_SYSCTL_TCP / "tcp_available_congestion_control").read_text().split(),
                (_SYSCTL_TCP / "tcp_allowed_congestion_control").read_text().split())
    except OSError:
        return None


def _allow_congestion(name: str) -> tuple[str, bool, str]:
    """(the host's congestion control, whether ``name`` can be set in a namespace, note).

    A namespace may set only the congestion controls the host allows; if ``name`` is
    available but not allowed, it is added to the host's allowed list (a permission:
    the host's own default is unchanged), and the note says so.
    """
    cc = congestion_controls()
    if cc is None:
        return "unknown", False, ""
    host, available, allowed = cc
    if name == host or name in allowed:
        return host, True, ""
    if name not in available:
        return host, False, ""
    try:
        (_SYSCTL_TCP / "tcp_allowed_congestion_control").write_text(" ".join(allowed + [name]))
    except OSError:
        return host, False, ""
    return host, True, (f"added {name} to the host's allowed TCP congestion controls (net.ipv4."
                        f"tcp_allowed_congestion_control; the host's own stays {host})")


def _taken_subnets() -> list[str]:
    out = []
    p = _run(["ip", "-j", "-4", "addr", "show"], check=False)
    try:
        for link in json.loads(p.stdout or "[]"):
            for a in link.get("addr_info", []):
                out.append(f"{a['local']}/{a['prefixlen']}")
    except (json.JSONDecodeError, KeyError):
        pass
    p = _run(["ip", "-j", "-4", "route", "show"], check=False)
    try:
        for r in json.loads(p.stdout or "[]"):
            if r.get("dst") and r["dst"] != "default":
                out.append(r["dst"] if "/" in r["dst"] else r["dst"] + "/32")
    except json.JSONDecodeError:
        pass
    for f in RUN_DIR.glob("testbed-*.json") if RUN_DIR.is_dir() else []:
        try:
            layout = json.loads(f.read_text()).get("layout")
            if layout:
                out.append(layout["subnet"])
        except (OSError, json.JSONDecodeError, KeyError):
            pass
    return out


def _setns(netns: str) -> None:
    fd = os.open(NETNS_DIR / netns, os.O_RDONLY)
    try:
        if hasattr(os, "setns"):
            os.setns(fd, os.CLONE_NEWNET)  # type: ignore[attr-defined]
            return
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(fd, 0x40000000) != 0:  # CLONE_NEWNET
            err = ctypes.get_errno()
            raise OSError(err, f"setns({netns}): {os.strerror(err)}")
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------
# state


@dataclass
class TestbedState:
    """A running testbed (or the plain-process fallback): what the launcher needs.

    JSON-serialisable; ``Testbed.attach`` reads it back from the state file.
    """

    __test__ = False

    tag: str
    pool_name: str
    emulated: bool
    notice: str = ""
    layout: net.NetLayout | None = None
    caps: CapsPlan | None = None
    cgroup_info: cgroups.CgroupInfo | None = None
    resources: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    local_devices: list[str] = field(default_factory=list)
    created_unix_s: float = 0.0
    setup_s: float = 0.0

    # -- queries ---------------------------------------------------------------------
    @property
    def devices(self) -> list[str]:
        """Names of the devices that are emulated (own namespace and caps)."""
        return [d.device for d in self.layout.devices] if (self.emulated and self.layout) else []

    def is_emulated(self, device: str) -> bool:
        return device in self.devices

    @property
    def master_addr(self) -> str:
        """Rendezvous address reachable from every namespace: the bridge's address."""
        if self.emulated and self.layout:
            return self.layout.bridge_addr
        return "127.0.0.1"

    def address(self, device: str) -> str:
        """The device's own address (its rank binds here; torchrun ``--local-addr``)."""
        if self.is_emulated(device):
            assert self.layout is not None
            return self.layout.of(device).address
        return self.master_addr

    def netns(self, device: str) -> str | None:
        if self.is_emulated(device):
            assert self.layout is not None
            return self.layout.of(device).netns
        return None

    def ifname(self, device: str) -> str | None:
        """The interface gloo must use for ``device`` (None: leave gloo's default)."""
        if self.is_emulated(device):
            return net.NS_IFNAME
        if self.emulated and self.layout:
            return self.layout.bridge  # a local process talks to the namespaces via the bridge
        return None

    def device_caps(self, device: str) -> DeviceCaps | None:
        if self.caps is None or not self.is_emulated(device):
            return None
        return self.caps.of(device)

    def cgroup(self, device: str) -> cgroups.DeviceCgroup | None:
        if self.cgroup_info is None or not self.is_emulated(device):
            return None
        return cgroups.DeviceCgroup(self.cgroup_info, name=self.netns(device) or "")

    # -- launching ---------------------------------------------------------------------
    def command_prefix(self, device: str) -> list[str]:
        """argv to put before a rank's command so it runs inside ``device``'s sandbox.

        The process first joins the device's cgroups (``sh`` writes its pid, then
        ``exec``s, so the pid and the membership carry over), then enters the network
        namespace with ``ip netns exec``. The cgroups are joined first because ``ip netns
        exec`` remounts ``/sys``, which hides ``/sys/fs/cgroup``. Empty for devices that
        are not emulated.
        """
        ns = self.netns(device)
        if ns is None:
            return []
        prefix: list[str] = []
        cg = self.cgroup(device)
        if cg is not None:
            writes = " && ".join(f"echo $$ > {shlex.quote(str(f))}" for f in cg.procs_files)
            prefix = ["sh", "-c", f'{writes} && exec "$@"', "edgepool-enter"]
        caps = self.device_caps(device)
        if caps is not None and caps.cpus:
            prefix += ["taskset", "-c", ",".join(map(str, caps.cpus))]
        return prefix + ["ip", "netns", "exec", ns]

    def env(self, device: str) -> dict[str, str]:
        """Environment variables for ``device``'s rank (merge over ``os.environ``)."""
        out = {"MASTER_ADDR": self.master_addr}
        ifname = self.ifname(device)
        if ifname:
            out["GLOO_SOCKET_IFNAME"] = ifname
            out["TP_SOCKET_IFNAME"] = ifname
        if self.is_emulated(device):
            out["EDGEPOOL_DEVICE"] = device
            out["EDGEPOOL_NETNS"] = self.netns(device) or ""
            out["EDGEPOOL_DEVICE_ADDR"] = self.address(device)
            caps = self.device_caps(device)
            if caps is not None:
                # A rank with more threads than its cap just thrashes the CFS quota.
                out["OMP_NUM_THREADS"] = str(caps.num_threads)
                out["EDGEPOOL_CPU_CORES"] = f"{caps.cpu_cores:.4f}"
                out["EDGEPOOL_MEMORY_BYTES"] = str(caps.memory_bytes)
        return out

    def enter(self, device: str) -> None:
        """Move *this* process into ``device``'s cgroups and network namespace.

        For launchers that fork their ranks: call it in the child right after the fork,
        before any socket is opened and before threads are started. A no-op for devices
        that are not emulated.
        """
        if not self.is_emulated(device):
            return
        cg = self.cgroup(device)
        if cg is not None:
            cg.add_pid(os.getpid())
        caps = self.device_caps(device)
        if caps is not None and caps.cpus:
            os.sched_setaffinity(0, caps.cpus)
        _setns(self.netns(device) or "")

    # -- accounting --------------------------------------------------------------------
    def cpu_usage_s(self, device: str) -> float | None:
        cg = self.cgroup(device)
        try:
            return cg.cpu_usage_s() if cg else None
        except (OSError, KeyError, ValueError):
            return None

    def oom_kills(self, device: str) -> int:
        cg = self.cgroup(device)
        return cg.oom_kills() if cg else 0

    def oom_killed(self, device: str, since: int = 0) -> bool:
        """Whether the kernel OOM-killed a process of ``device`` (more kills than ``since``)."""
        return self.oom_kills(device) > since

    def exit_cause(self, device: str, returncode: int | None, oom_kills_before: int = 0) -> str | None:
        """A one-line cause for a rank's exit, or None when it exited cleanly."""
        if returncode == 0:
            return None
        if self.oom_killed(device, oom_kills_before):
            caps = self.device_caps(device)
            cap = f" of {caps.memory_bytes / 1e9:.2f} GB" if caps else ""
            return f"out of memory: {device}'s rank was killed by the kernel OOM killer at its memory cap{cap}"
        if returncode is None:
            return "still running"
        if returncode < 0:
            return f"killed by signal {signal.Signals(-returncode).name}" if -returncode in signal.valid_signals() else f"killed by signal {-returncode}"
        return f"exited with status {returncode}"

    def _counter(self, device: str, name: str) -> int | None:
        if not self.is_emulated(device):
            return None
        assert self.layout is not None
        try:
            return int((Path("/sys/class/net") / self.layout.of(device).host_if / "statistics" / name).read_text())
        except (OSError, ValueError):
            return None

    def tx_bytes(self, device: str) -> int | None:
        """Bytes ``device`` has sent on its link (link layer), from the host-side veth."""
        return self._counter(device, "rx_bytes")

    def rx_bytes(self, device: str) -> int | None:
        """Bytes ``device`` has received on its link (link layer)."""
        return self._counter(device, "tx_bytes")

    def describe(self) -> list[str]:
        if not self.emulated:
            return [self.notice] if self.notice else []
        assert self.layout is not None
        lines = [
            f"testbed {self.tag} for pool {self.pool_name!r}: {len(self.devices)} emulated device(s) on bridge "
            f"{self.layout.bridge} ({self.layout.subnet}), rendezvous address {self.master_addr}"
        ]
        lines.extend(self.layout.describe())
        if self.caps is not None:
            lines.append(self.caps.describe())
            for c in self.caps.devices:
                lines.append(
                    f"{c.device}: relative speed {c.speed:g} -> {c.cpu_cores:.3f} cores "
                    f"({c.cpu_quota_us}/{c.cpu_period_us} us), memory cap {c.memory_bytes / 1e9:.2f} GB"
                )
            lines.append("absolute times are this host's; only the ratios between devices are the pool's")
        if self.local_devices:
            lines.append(f"not emulated (plain local processes on the bridge): {', '.join(self.local_devices)}")
        if self.notice:
            lines.append(self.notice)
        lines.extend(f"warning: {w}" for w in self.warnings)
        return lines

    def to_json(self) -> dict:
        d = asdict(self)
        if self.cgroup_info is not None:
            d["cgroup_info"] = {
                "version": self.cgroup_info.version,
                "cpu_root": str(self.cgroup_info.cpu_root),
                "cpuacct_root": str(self.cgroup_info.cpuacct_root),
                "memory_root": str(self.cgroup_info.memory_root),
            }
        d["state_version"] = STATE_VERSION
        return d

    @classmethod
    def from_json(cls, d: dict) -> "TestbedState":
        d = dict(d)
        d.pop("state_version", None)
        if d.get("layout"):
            lay = dict(d["layout"])
            lay["devices"] = tuple(net.DeviceNet(**x) for x in lay["devices"])
            lay["unshaped"] = tuple(lay["unshaped"])
            d["layout"] = net.NetLayout(**lay)
        if d.get("caps"):
            c = dict(d["caps"])
            c["devices"] = tuple(DeviceCaps(**{**x, "cpus": tuple(x.get("cpus", ()))}) for x in c["devices"])
            c["warnings"] = tuple(c["warnings"])
            d["caps"] = CapsPlan(**c)
        if d.get("cgroup_info"):
            g = d["cgroup_info"]
            d["cgroup_info"] = cgroups.CgroupInfo(
                g["version"], Path(g["cpu_root"]), Path(g["cpuacct_root"]), Path(g["memory_root"])
            )
        return cls(**d)

    def save(self) -> None:
        RUN_DIR.mkdir(parents=True, exist_ok=True)
        path = state_path(self.tag)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1))
        os.replace(tmp, path)


@dataclass(frozen=True)
class DownReport:
    tag: str
    removed: tuple[str, ...]
    killed_pids: tuple[int, ...]
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass(frozen=True)
class TestbedStatus:
    __test__ = False
    tag: str
    pool_name: str | None  # None: no state file (left over from a crash)
    netns: tuple[str, ...]
    links: tuple[tuple[str, str], ...]  # (name, kind)
    qdiscs: tuple[str, ...]
    cgroups: tuple[str, ...]

    @property
    def empty(self) -> bool:
        return not (self.netns or self.links or self.cgroups)


# --------------------------------------------------------------------------------------
# the testbed


class Testbed:
    """Bring emulated pools up and down. All methods are class methods; state is on disk."""

    __test__ = False

    @staticmethod
    def is_available() -> Availability:
        """Whether namespaces with shaped links can be made here, with the reason if not."""
        return probe().network

    @staticmethod
    def features() -> Features:
        return probe()

    @classmethod
    def up(
        cls,
        pool: PoolSpec,
        *,
        tag: str | None = None,
        subnet: str | None = None,
        cpu_fit: CpuFit = "sum",
        memory_fit: MemoryFit = "exact",
        host_cpus: float | None = None,
        caps: bool = True,
        fallback: bool = True,
        replace: bool = False,
    ) -> TestbedState:
        """Give every ``host: emulated`` device of ``pool`` a namespace, a link and caps.

        ``tag`` (1-4 lower-case letters/digits) names the testbed; by default it is
        derived from the pool's name, so ``down(pool)`` finds it again. ``replace``
        first removes a testbed (or crash leftovers) with the same tag; without it an
        existing one is an error. ``caps=False`` skips the cgroups.
        """
        tag = tag or net.tag_for(pool.name)
        emulated = [d for d in pool.devices if d.host == "emulated"]
        local = [d.name for d in pool.devices if d.host != "emulated"]
        if not emulated:
            return TestbedState(
                tag=tag,
                pool_name=pool.name,
                emulated=False,
                notice=f"pool {pool.name!r} has no device with host: emulated; nothing to set up",
                local_devices=local,
            )
        features = probe()
        avail = features.network
        if not avail:
            msg = (
                f"testbed unavailable: {avail.reason}. The {len(emulated)} emulated device(s) run as plain "
                f"local processes: no network shaping, no CPU or memory caps."
            )
            if not fallback:
                raise TestbedError(msg)
            return TestbedState(tag=tag, pool_name=pool.name, emulated=False, notice=msg, local_devices=local)

        existing = Testbed.status(tag=tag)
        if existing and not existing[0].empty or state_path(tag).exists():
            if not replace:
                raise TestbedError(
                    f"a testbed with tag {tag} (pool {pool.name!r}) is already up or was left behind; run "
                    f"`edgepool testbed down --pool <file>`, or up with --replace (replace=True)"
                )
            Testbed.down(tag=tag)

        t0 = time.monotonic()
        notices: list[str] = []
        host_cc, cc_ok, cc_note = _allow_congestion(net.TCP_CONGESTION)
        if cc_note:
            notices.append(cc_note)
        layout = net.plan_network(
            pool.network,
            emulated,
            tag=tag,
            subnet=subnet or net.default_subnet(tag, _taken_subnets()),
            netem=features.netem,
            shared_ok=bool(features.shared_medium),
            host_congestion=host_cc,
            congestion_ok=cc_ok,
        )
        cap_plan: CapsPlan | None = None
        if caps and features.caps:
            cap_plan = plan_caps(
                emulated,
                host_cpus=host_cpus or cgroups.device_cpus(),
                cpu_ids=sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (),
                host_memory_bytes=cgroups.host_memory_available_bytes(),
                cpu_fit=cpu_fit,
                memory_fit=memory_fit,
            )
        elif caps:
            notices.append(f"CPU and memory caps NOT applied: {features.caps.reason}")
        state = TestbedState(
            tag=tag,
            pool_name=pool.name,
            emulated=True,
            notice="; ".join(notices),
            layout=layout,
            caps=cap_plan,
            cgroup_info=features.cgroup if cap_plan else None,
            warnings=list(cap_plan.warnings if cap_plan else ()),
            local_devices=local,
            created_unix_s=time.time(),
        )
        state.save()
        try:
            for step in net.setup_steps(layout):
                if step.creates:
                    state.resources.append(step.creates)
                    state.save()
                _run(step.argv)
            if cap_plan is not None:
                for c in cap_plan.devices:
                    cg = state.cgroup(c.device)
                    assert cg is not None
                    state.resources.extend(f"cgroup:{d}" for d in cg.dirs)
                    state.save()
                    try:
                        cg.create()
                        cg.set_cpu_cores(c.cpu_cores, c.cpu_period_us)
                        cg.set_cpu_priority()
                        cg.set_memory_bytes(c.memory_bytes)
                    except OSError as exc:
                        raise TestbedError(f"cannot set up cgroup {cg.name} for {c.device}: {exc}") from None
        except BaseException:
            Testbed.down(tag=tag)
            raise
        state.setup_s = time.monotonic() - t0
        state.save()
        return state

    @classmethod
    def attach(cls, pool: PoolSpec | None = None, *, tag: str | None = None) -> TestbedState | None:
        """The state of a testbed that is up (by pool or tag), or None."""
        tag = tag or (net.tag_for(pool.name) if pool is not None else None)
        if tag is None:
            raise ValueError("attach needs a pool or a tag")
        try:
            return TestbedState.from_json(json.loads(state_path(tag).read_text()))
        except FileNotFoundError:
            return None
        except (OSError, json.JSONDecodeError, TypeError, KeyError) as exc:
            raise TestbedError(f"state file {state_path(tag)} is unreadable ({exc}); run `edgepool testbed down --all`") from None

    @classmethod
    @contextmanager
    def running(cls, pool: PoolSpec, **kwargs) -> Iterator[TestbedState]:
        """``with Testbed.running(pool) as state:`` brings it up, and always down."""
        state = cls.up(pool, **kwargs)
        try:
            yield state
        finally:
            if state.emulated:
                cls.down(tag=state.tag)

    # -- down / status -------------------------------------------------------------------
    @classmethod
    def _tags(cls) -> list[str]:
        tags: set[str] = set()
        if RUN_DIR.is_dir():
            tags.update(p.stem.removeprefix("testbed-") for p in RUN_DIR.glob("testbed-*.json"))
        names = _list_netns() + [n for n, _ in _list_links()]
        info, _ = cgroups.detect()
        if info is not None:
            names += [p.name for p in cgroups.find_device_cgroups(info, net.PREFIX)]
        for n in names:
            if n.startswith(net.PREFIX):
                t = n[len(net.PREFIX) :].split("-", 1)[0]
                if 1 <= len(t) <= 4 and t.isalnum():
                    tags.add(t)
        return sorted(tags)

    @classmethod
    def down(
        cls, pool: PoolSpec | None = None, *, tag: str | None = None, all: bool = False, kill: bool = True
    ) -> list[DownReport]:
        """Remove a testbed (by pool or tag), or every edgepool testbed with ``all=True``.

        Processes still inside its namespaces or cgroups are killed first (``kill``),
        because a namespace or cgroup with a live process cannot be removed cleanly.
        """
        if all:
            tags = cls._tags()
            _remove_stale_probes()
        else:
            tag = tag or (net.tag_for(pool.name) if pool is not None else None)
            if tag is None:
                raise ValueError("down needs a pool, a tag or all=True")
            tags = [tag]
        return [cls._down_one(t, kill=kill) for t in tags]

    @classmethod
    def _down_one(cls, tag: str, kill: bool) -> DownReport:
        pfx = f"{net.PREFIX}{tag}-"
        removed: list[str] = []
        problems: list[str] = []
        killed: list[int] = []
        recorded: list[str] = []
        info, _ = cgroups.detect()
        try:
            recorded = json.loads(state_path(tag).read_text()).get("resources", [])
        except (OSError, json.JSONDecodeError):
            pass
        netns = sorted({r.split(":", 1)[1] for r in recorded if r.startswith("netns:")} | {n for n in _list_netns() if n.startswith(pfx)})
        live_links = dict(_list_links())
        links = {r.split(":", 1)[1] for r in recorded if r.startswith("link:")}
        links |= {n for n, kind in live_links.items() if n.startswith(pfx) and kind in ("veth", "bridge", "ifb")}
        cg_dirs = {Path(r.split(":", 1)[1]) for r in recorded if r.startswith("cgroup:")}
        if info is not None:
            cg_dirs |= set(cgroups.find_device_cgroups(info, pfx))
        # 1. processes
        if kill:
            for ns in netns:
                p = _run(["ip", "netns", "pids", ns], check=False)
                for pid in (int(x) for x in p.stdout.split() if x.isdigit()):
                    try:
                        os.kill(pid, signal.SIGKILL)
                        killed.append(pid)
                    except ProcessLookupError:
                        pass
            if cg_dirs:
                for d in cg_dirs:
                    try:
                        killed.extend(int(x) for x in (d / "cgroup.procs").read_text().split())
                    except OSError:
                        pass
                cgroups.kill_cgroup_dirs(sorted(cg_dirs))
        # 2. links: veths first (their peers and qdiscs go with them), then IFB, bridge
        order = {"veth": 0, "ifb": 1, "bridge": 2}
        for name in sorted(links, key=lambda n: (order.get(live_links.get(n, ""), 0), n)):
            if name not in live_links:
                continue
            p = _run(["ip", "link", "del", name], check=False)
            if p.returncode == 0:
                removed.append(f"link {name}")
            elif name in dict(_list_links()):
                problems.append(f"cannot delete link {name}: {p.stderr.strip()}")
        # 3. namespaces
        for ns in netns:
            if not (NETNS_DIR / ns).exists():
                continue
            p = _run(["ip", "netns", "del", ns], check=False)
            if p.returncode == 0:
                removed.append(f"netns {ns}")
            else:
                problems.append(f"cannot delete netns {ns}: {p.stderr.strip()}")
        # 4. cgroups (children before the shared parent)
        for d in sorted(cg_dirs, key=lambda p: len(p.parts), reverse=True):
            if d.is_dir():
                probs = cgroups.remove_dirs([d], kill=kill)
                problems.extend(probs)
                if not probs:
                    removed.append(f"cgroup {d}")
        if info is not None:
            cgroups.remove_empty_parent(info)
        if not problems:
            try:
                state_path(tag).unlink()
                removed.append(f"state {state_path(tag)}")
            except FileNotFoundError:
                pass
        return DownReport(tag, tuple(removed), tuple(sorted(set(killed))), tuple(problems))

    @classmethod
    def status(cls, tag: str | None = None) -> list[TestbedStatus]:
        """What each testbed (or the one with ``tag``) has on this machine right now."""
        tags = [tag] if tag else cls._tags()
        all_ns = _list_netns()
        all_links = _list_links()
        info, _ = cgroups.detect()
        out = []
        for t in tags:
            pfx = f"{net.PREFIX}{t}-"
            pool_name = None
            try:
                pool_name = json.loads(state_path(t).read_text()).get("pool_name")
            except (OSError, json.JSONDecodeError):
                pass
            links = tuple((n, k) for n, k in all_links if n.startswith(pfx))
            qdiscs = []
            for n, _k in links:
                p = _run(["tc", "qdisc", "show", "dev", n], check=False)
                qdiscs += [f"{n}: {line.strip()}" for line in p.stdout.splitlines() if line.strip() and "noqueue" not in line]
            cgs = tuple(str(p) for p in cgroups.find_device_cgroups(info, pfx)) if info else ()
            out.append(
                TestbedStatus(
                    tag=t,
                    pool_name=pool_name,
                    netns=tuple(n for n in all_ns if n.startswith(pfx)),
                    links=links,
                    qdiscs=tuple(qdiscs),
                    cgroups=cgs,
                )
            )
        return out


def _remove_stale_probes() -> None:
    """Delete ``ep-probe-<pid>`` namespaces whose probing process is gone."""
    for ns in _list_netns():
        if ns.startswith("ep-probe-"):
            pid = ns.rsplit("-", 1)[-1]
            if pid.isdigit() and not Path(f"/proc/{pid}").exists():
                _run(["ip", "netns", "del", ns], check=False)
