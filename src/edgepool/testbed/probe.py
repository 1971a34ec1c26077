"""What this machine offers the testbed: root, ip/tc, namespaces, qdiscs, cgroups.

Every feature is found by *trying* it, inside a throwaway network namespace
(``ep-probe-<pid>``) that is deleted afterwards, so probing never touches the root
namespace's links or qdiscs. Reading the kernel config would miss modules that load on
demand and would trust a config that a container may not honour.

The result is cached for the process (``probe(refresh=True)`` redoes it).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field

from edgepool.energy.base import Availability
from edgepool.testbed import cgroups


@dataclass(frozen=True)
class Features:
    """Which testbed features work here; ``notes`` says why a missing one is missing."""

    root: bool = False
    ip: bool = False
    tc: bool = False
    netns: bool = False
    veth: bool = False
    bridge: bool = False
    tbf: bool = False
    htb: bool = False
    ifb: bool = False
    redirect: bool = False  # ingress qdisc + u32 filter + mirred redirect
    netem: bool = False
    cgroup: cgroups.CgroupInfo | None = None
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def network(self) -> Availability:
        """Namespaces with rate-shaped links (the minimum the testbed needs)."""
        if not self.root:
            return Availability(False, self.notes.get("root", "not running as root"))
        for name in ("ip", "tc", "netns", "veth", "bridge", "htb"):
            if not getattr(self, name):
                return Availability(False, self.notes.get(name, f"{name} does not work here"))
        return Availability(True, "")

    @property
    def shared_medium(self) -> Availability:
        if self.ifb and self.redirect:
            return Availability(True, "")
        why = self.notes.get("ifb") or self.notes.get("redirect") or "IFB or ingress redirect missing"
        return Availability(False, why)

    @property
    def caps(self) -> Availability:
        if not self.root:
            return Availability(False, self.notes.get("root", "not running as root"))
        if self.cgroup is None:
            return Availability(False, self.notes.get("cgroup", "no usable cgroup controllers"))
        return Availability(True, "")

    def rows(self) -> list[tuple[str, bool, str]]:
        """(feature, available, detail) for ``edgepool env``."""
        cg = self.cgroup.describe() if self.cgroup else self.notes.get("cgroup", "")
        return [
            ("root", self.root, self.notes.get("root", "")),
            ("ip / tc (iproute2)", self.ip and self.tc, self.notes.get("ip", "") or self.notes.get("tc", "")),
            ("network namespaces", self.netns, self.notes.get("netns", "")),
            ("veth + bridge", self.veth and self.bridge, self.notes.get("veth", "") or self.notes.get("bridge", "")),
            ("rate shaping (htb/tbf)", self.htb and self.tbf, self.notes.get("htb", "") or self.notes.get("tbf", "")),
            ("shared medium (IFB redirect)", bool(self.shared_medium), "" if self.shared_medium else self.shared_medium.reason),
            (
                "delay/jitter/loss (netem)",
                self.netem,
                "" if self.netem else self.notes.get("netem", "no netem: only rate is shaped; latency, jitter and loss are not emulated"),
            ),
            ("CPU/memory caps (cgroups)", self.cgroup is not None, cg),
        ]


def _run(argv: list[str], timeout_s: float = 5.0) -> tuple[bool, str]:
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, str(exc)
    msg = (p.stderr or p.stdout).strip().splitlines()
    return p.returncode == 0, (msg[0] if msg else "")


_CACHE: Features | None = None


def probe(refresh: bool = False) -> Features:
    """Try every feature once (about 0.2 s as root) and cache the answer."""
    global _CACHE
    if _CACHE is not None and not refresh:
        return _CACHE
    _CACHE = _probe()
    return _CACHE


def _probe() -> Features:
    notes: dict[str, str] = {}
    f: dict[str, object] = {}
    f["root"] = os.geteuid() == 0
    if not f["root"]:
        notes["root"] = f"not running as root (uid {os.geteuid()}); namespaces, tc and cgroups need root"
    f["ip"] = shutil.which("ip") is not None
    f["tc"] = shutil.which("tc") is not None
    if not f["ip"]:
        notes["ip"] = "the `ip` command (iproute2) is not installed"
    if not f["tc"]:
        notes["tc"] = "the `tc` command (iproute2) is not installed"
    info, why = cgroups.detect()
    if info is not None and f["root"]:
        f["cgroup"] = info
    else:
        notes["cgroup"] = why or notes.get("root", "")
    if not (f["root"] and f["ip"]):
        for k in ("netns", "veth", "bridge", "tbf", "htb", "ifb", "redirect", "netem"):
            notes.setdefault(k, notes.get("root") or notes.get("ip", ""))
        return Features(**f, notes=notes)  # type: ignore[arg-type]

    ns = f"ep-probe-{os.getpid()}"
    ok, msg = _run(["ip", "netns", "add", ns])
    f["netns"] = ok
    if not ok:
        notes["netns"] = f"cannot create a network namespace: {msg}"
        return Features(**f, notes=notes)  # type: ignore[arg-type]
    try:
        ipn = ["ip", "-n", ns]
        ok, msg = _run(ipn + ["link", "add", "pv0", "type", "veth", "peer", "name", "pv1"])
        f["veth"] = ok
        if not ok:
            notes["veth"] = f"veth links do not work: {msg}"
        ok, msg = _run(ipn + ["link", "add", "pbr", "type", "bridge"])
        f["bridge"] = ok
        if not ok:
            notes["bridge"] = f"bridges do not work: {msg}"
        ok, msg = _run(ipn + ["link", "add", "pifb", "type", "ifb"])
        f["ifb"] = ok
        if not ok:
            notes["ifb"] = f"IFB devices do not work ({msg}); a shared medium cannot be emulated"
        if f["tc"] and f["veth"]:
            _run(ipn + ["link", "set", "pv0", "up"])
            tcn = ["tc", "-n", ns]
            for name, args in (
                ("tbf", ["root", "tbf", "rate", "1mbit", "burst", "32kb", "latency", "50ms"]),
                ("htb", ["root", "handle", "1:", "htb", "default", "1"]),
                ("netem", ["root", "netem", "delay", "1ms"]),
            ):
                ok, msg = _run(tcn + ["qdisc", "add", "dev", "pv0"] + args)
                f[name] = ok
                if ok:
                    _run(tcn + ["qdisc", "del", "dev", "pv0", "root"])
                elif name == "netem":
                    notes[name] = "the kernel has no netem qdisc: only rate is shaped; latency, jitter and loss are not emulated"
                else:
                    notes[name] = f"the {name} qdisc does not work: {msg}"
            if f["ifb"]:
                ok1, msg1 = _run(tcn + ["qdisc", "add", "dev", "pv1", "handle", "ffff:", "ingress"])
                ok2, msg2 = (False, msg1)
                if ok1:
                    ok2, msg2 = _run(
                        tcn
                        + ["filter", "add", "dev", "pv1", "parent", "ffff:", "protocol", "all", "u32", "match", "u32", "0", "0"]
                        + ["action", "mirred", "egress", "redirect", "dev", "pifb"]
                    )
                f["redirect"] = ok2
                if not ok2:
                    notes["redirect"] = f"ingress redirect (u32 + mirred) does not work: {msg2}"
        else:
            for k in ("tbf", "htb", "netem", "redirect"):
                notes.setdefault(k, notes.get("tc") or notes.get("veth", ""))
    finally:
        _run(["ip", "netns", "del", ns])
    return Features(**f, notes=notes)  # type: ignore[arg-type]


def is_available() -> Availability:
    """Whether ``Testbed.up`` can emulate devices here, and if not, why."""
    return probe().network
