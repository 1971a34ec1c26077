"""Network models: how long a set of concurrent transfers or a collective takes.

Two media, chosen by the pool's ``network.medium``:

- ``switched`` (point-to-point links): every device has its own full-duplex link of
  ``bandwidth_mbps`` (its override, else the network's) to a switch. Transfers between
  different pairs do not slow each other down; a device's concurrent sends share its
  uplink and its receives share its downlink. A set of concurrent transfers therefore
  ends when the busiest link is drained:

      t = latency + max over devices d of max(out_d / bw_d, in_d / bw_d)

  (the lower bound, reached when no link idles while it has data to move).

- ``shared`` (one wireless channel, as on Wi-Fi): every byte of every transfer crosses
  the one channel of ``network.bandwidth_mbps``, so concurrent transfers share it. A
  device's own rate (its ``bandwidth_mbps`` override, e.g. a far station) also bounds
  its transfers:

      t = latency + max(sum of bytes / B_channel, max over d of max(out_d, in_d) / bw_d)

  Channel time ("airtime") is counted at the channel rate; ``airtime`` returns it so the
  cost model can add up everything that must cross the channel in one period.

Collectives are rings (what gloo runs): an all-reduce of ``n`` bytes over ``p`` devices
moves ``2 (p-1)/p * n`` bytes in and out of every device in ``2 (p-1)`` latency-bound
steps; an all-gather in which device i contributes ``s_i`` bytes moves
``total - s_i`` bytes into device i (and as many out) in ``p - 1`` steps; a
reduce-scatter is its mirror image. On the shared channel every device's sends cross
it, so the airtime of a ring all-reduce is ``2 (p-1) n / B``.

Latency of a transfer between devices a and b is ``max(lat_a, lat_b)``, where a
device's latency is its ``latency_ms`` override, else the network's.

**Rates are payload rates.** A pool's ``bandwidth_mbps`` is a link rate: what a NIC or
a Wi-Fi station reports, and what the testbed's tc shapes (tc counts link-layer bytes).
Tensors travel as TCP payload, and a full 1514-byte Ethernet frame carries 1448 bytes
of it (20 IP + 32 TCP-with-timestamps + 14 Ethernet header bytes), so the bytes of a
tensor move at ``PAYLOAD_FRACTION = 1448 / 1514`` (95.6%) of the link rate. Measured on
the testbed (``docs/results/testbed-links.md``): 95.6-97% of the configured rate.
``Network.of`` applies it, so every rate of a ``Network`` (``channel_Bps``,
``dev_Bps``) is bytes of payload per second.

Units: bytes, seconds, bytes per second (``_Bps``). 1 Mbit/s = 125000 bytes/s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from edgepool.specs.pool import PoolSpec

MBPS_TO_BPS = 1e6 / 8  # bytes per second in one megabit per second
# TCP payload bytes per link-layer byte of a full Ethernet frame (see the module docstring).
PAYLOAD_FRACTION = 1448 / 1514


@dataclass(frozen=True)
class Network:
    medium: str  # "shared" or "switched"
    channel_Bps: float
    latency_s: float
    dev_Bps: dict[str, float]
    dev_latency_s: dict[str, float]

    @classmethod
    def of(cls, pool: PoolSpec) -> "Network":
        net = pool.network
        rate = MBPS_TO_BPS * PAYLOAD_FRACTION
        return cls(
            medium=net.medium,
            channel_Bps=net.bandwidth_mbps * rate,
            latency_s=net.latency_ms / 1e3,
            dev_Bps={d.name: (d.bandwidth_mbps or net.bandwidth_mbps) * rate for d in pool.devices},
            dev_latency_s={d.name: (d.latency_ms if d.latency_ms is not None else net.latency_ms) / 1e3
                           for d in pool.devices},
        )

    @property
    def shared(self) -> bool:
        return self.medium == "shared"

    def lat(self, devices: Iterable[str]) -> float:
        return max((self.dev_latency_s[d] for d in devices), default=0.0)

    # -- point-to-point transfers ---------------------------------------------------
    def transfer_time(self, flows: list[tuple[str, str, float]]) -> float:
        """Time for concurrent transfers ``(src, dst, bytes)`` (local ones are free)."""
        out: dict[str, float] = {}
        inn: dict[str, float] = {}
        total = 0.0
        for s, d, b in flows:
            if s == d or b <= 0:
                continue
            out[s] = out.get(s, 0.0) + b
            inn[d] = inn.get(d, 0.0) + b
            total += b
        if total == 0:
            return 0.0
        nic = max(max(v / self.dev_Bps[k] for k, v in out.items()), max(v / self.dev_Bps[k] for k, v in inn.items()))
        busy = max(nic, total / self.channel_Bps) if self.shared else nic
        return self.lat(set(out) | set(inn)) + busy

    def airtime(self, flows: list[tuple[str, str, float]]) -> float:
        """Channel time of the transfers on a shared medium (0 on a switched one)."""
        if not self.shared:
            return 0.0
        return sum(b for s, d, b in flows if s != d and b > 0) / self.channel_Bps

    # -- collectives ------------------------------------------------------------------
    def allreduce_time(self, devices: list[str], nbytes: float) -> float:
        p = len(devices)
        if p < 2 or nbytes <= 0:
            return 0.0
        per_dev = 2.0 * (p - 1) / p * nbytes
        nic = per_dev / min(self.dev_Bps[d] for d in devices)
        busy = max(nic, p * per_dev / self.channel_Bps) if self.shared else nic
        return 2 * (p - 1) * self.lat(devices) + busy

    def allreduce_airtime(self, devices: list[str], nbytes: float) -> float:
        p = len(devices)
        if not self.shared or p < 2:
            return 0.0
        return 2.0 * (p - 1) * nbytes / self.channel_Bps

    def allgather_time(self, devices: list[str], sizes: list[float]) -> float:
        """Ring all-gather (or reduce-scatter) where device i contributes ``sizes[i]``."""
        p = len(devices)
        if p < 2:
            return 0.0
        total = sum(sizes)
        nic = max((total - s) / self.dev_Bps[d] for d, s in zip(devices, sizes))
        busy = max(nic, (p - 1) * total / self.channel_Bps) if self.shared else nic
        return (p - 1) * self.lat(devices) + busy

    def allgather_airtime(self, devices: list[str], sizes: list[float]) -> float:
        p = len(devices)
        if not self.shared or p < 2:
            return 0.0
        return (p - 1) * sum(sizes) / self.channel_Bps
