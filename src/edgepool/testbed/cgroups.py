"""CPU and memory caps for emulated devices through Linux cgroups (v1 and v2).

One emulated device gets one cgroup per controller it needs, all named
``<parent>/<name>`` where ``<parent>`` is ``edgepool`` directly under each controller's
mount point (or ``$EDGEPOOL_CGROUP_PARENT``) and ``<name>`` starts with ``ep-``:

- cgroup v1 (this machine): ``cpu`` (CFS quota), ``cpuacct`` (CPU usage) and ``memory``
  (limit, OOM count). Those controllers may be mounted together (``cpu,cpuacct``) or
  apart; a directory shared by two controllers is created once.
- cgroup v2: one directory under the unified mount, with ``cpu.max``, ``memory.max``,
  ``memory.swap.max`` and ``memory.events``. The ``edgepool`` parent holds no process, so
  the v2 "no internal processes" rule is kept.

The parent sits at the top of each hierarchy rather than under the caller's own
cgroup: under v2 the caller's own cgroup already holds processes (so it cannot enable
controllers for children), and a leaked child under a cgroup that belongs to someone
else would stop them from removing theirs.

Units: CPU in cores (``cores``; 1.0 = one host CPU for the whole period), CFS times in
microseconds (``_us``), CPU usage in seconds (``_s``), memory in bytes (``_bytes``).
A process joins a cgroup by writing its pid to ``cgroup.procs``; membership passes to
children and survives ``exec``.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

# A CFS quota is a budget per period, not a rate: a device idle for part of a period
# (waiting on the network) may then run at full host speed until its budget is spent.
# With 100 ms (the kernel's default) a capped device ran short pipeline steps faster
# than its cap (measured with benchmarks/validate_cost_model.py; figures in the commit
# that set 10 ms); 10 ms keeps the cap close to a rate at the scale of one micro-batch.
CFS_PERIOD_US = 10_000
# The kernel refuses a CFS quota under 1 ms.
MIN_QUOTA_US = 1_000
MAX_SHARES_V1, MAX_WEIGHT_V2 = 262_144, 10_000
PARENT_NAME = os.environ.get("EDGEPOOL_CGROUP_PARENT", "edgepool")


@dataclass(frozen=True)
class CgroupInfo:
    """Where the cpu, cpuacct and memory controllers are mounted on this machine."""

    version: Literal[1, 2]
    cpu_root: Path
    cpuacct_root: Path
    memory_root: Path

    @property
    def roots(self) -> tuple[Path, ...]:
        """The distinct controller roots, in a fixed order (cpu, cpuacct, memory)."""
        out: list[Path] = []
        for p in (self.cpu_root, self.cpuacct_root, self.memory_root):
            if p not in out:
                out.append(p)
        return tuple(out)

    def describe(self) -> str:
        if self.version == 2:
            return f"cgroup v2 at {self.cpu_root}"
        return f"cgroup v1 (cpu at {self.cpu_root}, cpuacct at {self.cpuacct_root}, memory at {self.memory_root})"


def _mounts(mountinfo: str) -> list[tuple[str, str, set[str]]]:
    """(mount point, fs type, super options) for every cgroup mount in a mountinfo text."""
    out = []
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields = left.split()
        rfields = right.split()
        if len(fields) < 5 or len(rfields) < 3:
            continue
        fstype = rfields[0]
        if fstype not in ("cgroup", "cgroup2"):
            continue
        point = fields[4].replace("\\040", " ")
        out.append((point, fstype, set(rfields[2].split(","))))
    return out


def detect(mountinfo: str | None = None) -> tuple[CgroupInfo | None, str]:
    """Find usable cpu+memory controllers; return (info, why-not) with info None if absent.

    v1 is preferred when its cpu, cpuacct and memory controllers are all mounted (a
    hybrid system mounts an empty v2 tree beside them, as this machine does).
    """
    if mountinfo is None:
        try:
            mountinfo = Path("/proc/self/mountinfo").read_text()
        except OSError as exc:
            return None, f"cannot read /proc/self/mountinfo ({exc})"
    mounts = _mounts(mountinfo)
    v1: dict[str, Path] = {}
    v2: Path | None = None
    for point, fstype, opts in mounts:
        if fstype == "cgroup":
            for ctrl in ("cpu", "cpuacct", "memory"):
                if ctrl in opts and ctrl not in v1:
                    v1[ctrl] = Path(point)
        elif v2 is None:
            v2 = Path(point)
    if all(c in v1 for c in ("cpu", "cpuacct", "memory")):
        return CgroupInfo(1, v1["cpu"], v1["cpuacct"], v1["memory"]), ""
    if v2 is not None:
        try:
            ctrls = set((v2 / "cgroup.controllers").read_text().split())
        except OSError:
            ctrls = set()
        if {"cpu", "memory"} <= ctrls:
            return CgroupInfo(2, v2, v2, v2), ""
        missing = sorted({"cpu", "memory"} - ctrls)
        return None, f"cgroup v2 at {v2} lacks the {', '.join(missing)} controller(s) and v1 has no cpu+cpuacct+memory"
    have = ", ".join(sorted(v1)) or "none"
    return None, f"no cgroup v2 mount and cgroup v1 controllers incomplete (found: {have}; need cpu, cpuacct, memory)"


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _read(path: Path) -> str:
    return path.read_text()


@dataclass(frozen=True)
class DeviceCgroup:
    """The cgroup directories of one emulated device (one per distinct controller root)."""

    info: CgroupInfo
    name: str
    parent: str = PARENT_NAME

    def dir(self, root: Path) -> Path:
        return root / self.parent / self.name

    @property
    def cpu_dir(self) -> Path:
        return self.dir(self.info.cpu_root)

    @property
    def cpuacct_dir(self) -> Path:
        return self.dir(self.info.cpuacct_root)

    @property
    def memory_dir(self) -> Path:
        return self.dir(self.info.memory_root)

    @property
    def dirs(self) -> tuple[Path, ...]:
        return tuple(self.dir(r) for r in self.info.roots)

    @property
    def procs_files(self) -> tuple[Path, ...]:
        """Files a process writes its pid to, to join every cgroup of this device."""
        return tuple(d / "cgroup.procs" for d in self.dirs)

    # -- creation -----------------------------------------------------------------
    def create(self) -> list[Path]:
        """Create the directories (and the parents); return the ones this call made."""
        made: list[Path] = []
        for root in self.info.roots:
            parent = root / self.parent
            if not parent.is_dir():
                parent.mkdir()
                made.append(parent)
            if self.info.version == 2:
                _enable_v2_controllers(root, parent)
            d = parent / self.name
            if not d.is_dir():
                d.mkdir()
                made.append(d)
        return made

    def set_cpu_cores(self, cores: float, period_us: int = CFS_PERIOD_US) -> int:
        """Cap CPU time at ``cores`` host CPUs per period; return the quota in us."""
        quota_us = max(MIN_QUOTA_US, int(round(cores * period_us)))
        if self.info.version == 1:
            _write(self.cpu_dir / "cpu.cfs_period_us", str(period_us))
            _write(self.cpu_dir / "cpu.cfs_quota_us", str(quota_us))
        else:
            _write(self.cpu_dir / "cpu.max", f"{quota_us} {period_us}")
        return quota_us

    def set_cpu_priority(self) -> None:
        """Give this device's cgroup and the shared parent the largest CPU weight.

        A CFS quota caps a device; it does not guarantee it. With the default weight,
        the parent (all devices together) competes with every busy process of the root
        cgroup as one process would, so other work on the host takes CPU the caps
        promise. The caps add up to less than the host (``caps.plan_caps``), so other
        work keeps the rest. The parent is this module's own (``PARENT_NAME``).
        """
        for d in (self.cpu_dir.parent, self.cpu_dir):
            if self.info.version == 1:
                _write(d / "cpu.shares", str(MAX_SHARES_V1))
            elif (d / "cpu.weight").exists():
                _write(d / "cpu.weight", str(MAX_WEIGHT_V2))

    def set_memory_bytes(self, limit_bytes: int) -> None:
        """Cap memory (and swap, so the cap cannot be escaped by swapping)."""
        limit_bytes = int(limit_bytes)
        if self.info.version == 1:
            d = self.memory_dir
            # memsw must stay >= limit: raise memsw first if it is lower, then set both.
            _write(d / "memory.limit_in_bytes", str(limit_bytes))
            memsw = d / "memory.memsw.limit_in_bytes"
            if memsw.exists():
                try:
                    _write(memsw, str(limit_bytes))
                except OSError:
                    pass
        else:
            _write(self.memory_dir / "memory.max", str(limit_bytes))
            swap = self.memory_dir / "memory.swap.max"
            if swap.exists():
                try:
                    _write(swap, "0")
                except OSError:
                    pass

    # -- use ------------------------------------------------------------------------
    def add_pid(self, pid: int) -> None:
        for f in self.procs_files:
            _write(f, str(pid))

    def pids(self) -> list[int]:
        out: set[int] = set()
        for f in self.procs_files:
            try:
                out.update(int(x) for x in _read(f).split())
            except OSError:
                pass
        return sorted(out)

    def cpu_usage_s(self) -> float:
        """CPU time used by every process ever in this cgroup, in seconds (parsed by
        ``energy.modelled.cgroup_cpu_seconds``, the one reader of cgroup CPU time)."""
        from edgepool.energy.modelled import cgroup_cpu_seconds

        return cgroup_cpu_seconds(self.cpuacct_dir if self.info.version == 1 else self.cpu_dir)()

    def oom_kills(self) -> int:
        """How many processes the kernel OOM-killed in this cgroup (0 if unknown)."""
        try:
            if self.info.version == 1:
                return int(_stat_value(self.memory_dir / "memory.oom_control", "oom_kill"))
            return int(_stat_value(self.memory_dir / "memory.events", "oom_kill"))
        except (OSError, KeyError, ValueError):
            return 0

    # -- removal ----------------------------------------------------------------------
    def kill_all(self, timeout_s: float = 3.0) -> int:
        """SIGKILL every process left in these cgroups; return how many were signalled."""
        return kill_cgroup_dirs(self.dirs, timeout_s=timeout_s)

    def remove(self, timeout_s: float = 10.0) -> list[str]:
        """Kill what is left, remove the directories; return problems (empty if none)."""
        self.kill_all(min(timeout_s, 3.0))
        return remove_dirs(self.dirs, timeout_s=timeout_s)


def _stat_value(path: Path, key: str) -> float:
    for line in _read(path).splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == key:
            return float(parts[1])
    raise KeyError(f"{key} not in {path}")


def _enable_v2_controllers(root: Path, parent: Path) -> None:
    """Let the children of ``parent`` use cpu and memory (v2 delegates top-down)."""
    for d in (root, parent):
        try:
            _write(d / "cgroup.subtree_control", "+cpu +memory")
        except OSError:
            # Already enabled, or the root refuses it because it has processes: the
            # later writes to cpu.max / memory.max then fail with a clear error.
            pass


def kill_cgroup_dirs(dirs: tuple[Path, ...] | list[Path], timeout_s: float = 3.0) -> int:
    pids: set[int] = set()
    for d in dirs:
        try:
            pids.update(int(x) for x in _read(d / "cgroup.procs").split())
        except OSError:
            pass
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout_s
    while pids and time.monotonic() < deadline:
        left = set()
        for d in dirs:
            try:
                left.update(int(x) for x in _read(d / "cgroup.procs").split())
            except OSError:
                pass
        if not left:
            break
        time.sleep(0.02)
    return len(pids)


def remove_dirs(dirs: tuple[Path, ...] | list[Path], timeout_s: float = 10.0, kill: bool = True) -> list[str]:
    """rmdir each cgroup directory; return problems (empty if none).

    ``rmdir`` fails with EBUSY while a task is in the cgroup, including one that joined
    after the last kill (a rank still starting) or a killed one its parent has not
    reaped yet. So it retries until ``timeout_s``, killing what it finds (``kill``).
    """
    problems = []
    for d in dirs:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                d.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError as exc:
                if time.monotonic() > deadline:
                    left = ""
                    try:
                        left = " (tasks: " + (" ".join(_read(d / "cgroup.procs").split()) or "none listed") + ")"
                    except OSError:
                        pass
                    problems.append(f"cannot remove cgroup {d}: {exc.strerror}{left}")
                    break
                if kill:
                    kill_cgroup_dirs([d], timeout_s=0.2)
                time.sleep(0.05)
    return problems


def find_device_cgroups(info: CgroupInfo, prefix: str, parent: str = PARENT_NAME) -> list[Path]:
    """Every cgroup directory under ``<root>/<parent>`` whose name starts with ``prefix``."""
    out = []
    for root in info.roots:
        base = root / parent
        if base.is_dir():
            out.extend(sorted(p for p in base.iterdir() if p.is_dir() and p.name.startswith(prefix)))
    return out


def remove_empty_parent(info: CgroupInfo, parent: str = PARENT_NAME) -> None:
    """Remove ``<root>/<parent>`` where it has no children left (shared by testbeds)."""
    for root in info.roots:
        base = root / parent
        if base.is_dir() and not any(p.is_dir() for p in base.iterdir()):
            try:
                base.rmdir()
            except OSError:
                pass


# CPUs the testbed leaves outside the devices' caps, for the launcher, the kernel's
# network work (htb, IFB, TCP) and the rest of the host. Without it the caps add up to
# the whole host, and the devices compete with that work.
HOST_RESERVE_CPUS = 0.5


def device_cpus() -> float:
    """CPUs the emulated devices' caps add up to by default: the host's, less the reserve."""
    return max(HOST_RESERVE_CPUS, host_cpus() - HOST_RESERVE_CPUS)


def host_cpus() -> float:
    """CPUs this process may use: affinity count, lowered by its own cgroup CPU quota."""
    try:
        n = float(len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        n = float(os.cpu_count() or 1)
    quota = _own_cpu_quota_cores()
    return min(n, quota) if quota else n


def _own_cpu_quota_cores() -> float | None:
    info, _ = detect()
    if info is None:
        return None
    own = _own_cgroup_path(info)
    if own is None or own == info.cpu_root:
        return None
    try:
        if info.version == 1:
            q = int(_read(own / "cpu.cfs_quota_us"))
            p = int(_read(own / "cpu.cfs_period_us"))
        else:
            qs, ps = _read(own / "cpu.max").split()
            if qs == "max":
                return None
            q, p = int(qs), int(ps)
    except (OSError, ValueError):
        return None
    return None if q < 0 else q / p


def _own_cgroup_path(info: CgroupInfo) -> Path | None:
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        hid, ctrls, path = line.split(":", 2)
        if (info.version == 2 and hid == "0") or (info.version == 1 and "cpu" in ctrls.split(",")):
            return info.cpu_root / path.lstrip("/")
    return None


def host_memory_available_bytes() -> int:
    """MemAvailable from /proc/meminfo, in bytes (0 if unknown)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
