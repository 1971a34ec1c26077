"""A description of the machine a measurement ran on, for every results file."""

from __future__ import annotations

import ipaddress
import os
import platform
import re
import socket
from datetime import datetime, timezone


def peak_rss_bytes() -> int:
    """This process's peak resident memory: Linux's ``VmHWM`` (its own address space's
    high-water mark), else ``getrusage``'s ``ru_maxrss``, which on Linux carries the
    parent's peak across fork and exec (a rank started by a big launcher would report
    the launcher's)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def cpu_name() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return cpu


def machine_info() -> dict:
    cpu = cpu_name()
    mem_gb = None
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                mem_gb = round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    info = {
        "cpu": cpu, "cores": os.cpu_count(), "memory_gib": mem_gb, "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(), "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:
        pass
    return info


def machine_line(info: dict | None = None) -> str:
    i = info or machine_info()
    parts = [f"{i['cpu']}", f"{i['cores']} cores", f"{i['memory_gib']} GiB", i["os"], f"Python {i['python']}"]
    if "torch" in i:
        parts.append(f"torch {i['torch']}")
    return ", ".join(parts) + f"; measured {i['date']}"


def free_port() -> int:
    """A TCP port free on this machine's loopback now (for a local rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")
_IFACE = re.compile(r"^[A-Za-z0-9_.:-]{1,15}$")


def is_address(addr: str) -> bool:
    """An IP address (v4 or v6) or a host name."""
    try:
        ipaddress.ip_address(addr)
        return True
    except ValueError:
        return bool(_HOSTNAME.match(addr))


def parse_endpoint(value: str, what: str = "--master") -> tuple[str, int]:
    """``ADDR:PORT`` (``[v6]:PORT`` for IPv6) as (address, port), or a one-line ``SpecError``.
    The address is an IP address or a host name; the port is 1-65535."""
    from edgepool.errors import SpecError

    example = f"{what} must be ADDR:PORT, e.g. 192.168.1.10:29500"
    addr, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise SpecError(f"{example} (got {value!r}; the port must be 1-65535)")
    if addr.startswith("[") and addr.endswith("]"):
        addr = addr[1:-1]
    if not is_address(addr):
        raise SpecError(f"{example} (got {value!r}; {addr!r} is neither an IP address nor a host name)")
    return addr, int(port)


def check_iface(name: str) -> str:
    """A network interface name (as Linux allows: 1-15 of letters, digits, ``_.:-``), or a one-line error."""
    from edgepool.errors import SpecError

    if not _IFACE.match(name):
        raise SpecError(f"--iface {name!r} is not a network interface name (1-15 letters, digits, '_', '.', ':', '-'); "
                        "see `ip link` on the host")
    return name


def iface_of(addr: str) -> str | None:
    """The network interface that holds the IPv4 address ``addr`` (gloo binds to it), or None."""
    import fcntl
    import struct

    SIOCGIFADDR = 0x8915
    try:
        want = socket.inet_aton(addr)
    except OSError:
        return None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                got = fcntl.ioctl(s.fileno(), SIOCGIFADDR, struct.pack("256s", name[:15].encode()))[20:24]
            except OSError:
                continue
            if got == want:
                return name
    return None
