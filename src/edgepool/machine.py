"""A description of the machine a measurement ran on, for every results file."""

from __future__ import annotations

import os
import platform
import socket
from datetime import datetime, timezone


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
