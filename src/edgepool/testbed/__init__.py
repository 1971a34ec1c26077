"""An emulated pool of edge devices on one machine: namespaces, shaped links, cgroups.

Each ``host: emulated`` device of a pool runs its rank in its own network namespace,
joined to the others through a bridge by a veth link shaped like the pool's network
(rate with htb; delay, jitter and loss with netem where the kernel has it), and in its
own cgroups, with a CPU quota that keeps the pool's speed ratios and a memory cap that
makes it really run out of memory. See ``docs/testbed.md``.

Public API:

- ``Testbed.up(pool) -> TestbedState``, ``Testbed.down(pool | tag= | all=True)``,
  ``Testbed.status()``, ``Testbed.attach(pool)``, ``Testbed.running(pool)``;
- ``TestbedState.command_prefix(device)``, ``.env(device)``, ``.master_addr``,
  ``.enter(device)``, ``.exit_cause(device, returncode)``, ``.cpu_usage_s(device)``;
- ``is_available()`` and ``probe()`` (what this machine offers);
- ``network_preset(name)`` (802.11n/ac/ax, Ethernet);
- ``measure_throughput(state, pairs)``.

Importing this package is cheap: standard library and the pool spec only, no torch.
"""

from __future__ import annotations

from edgepool.testbed.caps import CapsPlan, CpuScale, DeviceCaps, cpu_scale, plan_caps
from edgepool.testbed.core import DownReport, Testbed, TestbedError, TestbedState, TestbedStatus
from edgepool.testbed.presets import NETWORK_PRESETS, network_preset
from edgepool.testbed.probe import Availability, Features, is_available, probe

__all__ = [
    "Availability",
    "CapsPlan",
    "CpuScale",
    "DeviceCaps",
    "DownReport",
    "Features",
    "NETWORK_PRESETS",
    "Testbed",
    "TestbedError",
    "TestbedState",
    "TestbedStatus",
    "cpu_scale",
    "is_available",
    "measure_throughput",
    "network_preset",
    "plan_caps",
    "probe",
]


def measure_throughput(*args, **kwargs):  # noqa: D103 - re-exported lazily (spawns processes)
    from edgepool.testbed.measure import measure_throughput as _m

    return _m(*args, **kwargs)


measure_throughput.__doc__ = "See ``edgepool.testbed.measure.measure_throughput``."
