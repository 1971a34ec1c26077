"""The emulated network: namespaces, veths, one bridge, and the tc shaping (pure).

This module only *plans*: ``plan_network`` turns a pool into a ``NetLayout`` and
``setup_steps`` turns a layout into the ``ip``/``tc`` commands that build it. Running
them is ``edgepool.testbed.core``'s job, so the plan is testable without root.

Topology (one testbed, tag ``T``):

    root namespace                         namespace ep-T-<device>
    bridge ep-T-br (10.x.y.1/24) --- veth ep-T-v<i> <=====> ep0 (10.x.y.<10+i>/24)
    [shared medium: IFB ep-T-ifb]

Shaping (rates in bit/s; tc counts link-layer bytes, so TCP payload reaches about
1448/1514 = 96% of the configured rate):

- ``switched``: each device has its own full-duplex link at ``bandwidth_mbps`` (the
  device's, else the network's): uplink shaped on ``ep0`` egress inside the namespace,
  downlink shaped on the host-side veth's egress.
- ``shared``: every frame an emulated device transmits is redirected from the
  host-side veth's ingress to one IFB device shaped at the network's
  ``bandwidth_mbps``: the channel carries at most that rate, summed over all senders,
  as one Wi-Fi channel does. A device that names its own ``bandwidth_mbps`` also gets
  its own link capped both ways at that rate.
- Latency, jitter, loss (netem, only where the kernel has it): half the device's
  ``latency_ms`` (else the network's) and half the network's ``jitter_ms`` on each
  direction of its link, so one-way latency between two devices is the mean of their
  latencies; ``loss_pct`` on the uplink only, so each packet meets it once. Without
  netem these are not emulated, and ``NetLayout.unshaped`` says so.

Addresses come from one private /24 (``10.213.<n>.0/24`` unless given) that exists only
on the testbed's own bridge and namespaces; no route or forwarding leaves them.
"""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass
from typing import Sequence

from edgepool.specs.pool import DeviceSpec, NetworkSpec

NS_IFNAME = "ep0"
PREFIX = "ep-"
# Link names are limited to 15 characters (IFNAMSIZ - 1).
MAX_IFNAME = 15
# Queue of a shaped class, as time at its rate. The queue is counted in bytes (bfifo),
# not packets: veth hands GSO super-packets of up to 64 KiB to the qdisc, so a packet
# limit would allow queues of many megabytes, and the ACKs of a reverse flow would wait
# behind them for hundreds of milliseconds.
QUEUE_S = 0.05
MIN_QUEUE_BYTES = 4 * 65536
NETEM_LIMIT_PACKETS = 1000
# TCP congestion control inside every namespace: Linux's default, which Jetson's L4T and
# Ubuntu ship. A new namespace inherits the host's, and hosts tuned for the data centre
# often run BBR, whose minimum RTT taken on the unshaped veth (microseconds) keeps its
# window at a few segments, so a shaped link's queueing starves it: a 2-stage hybrid on
# a shaped link stalled in most steps under BBR and not under CUBIC (figures in the
# commit that set this).
TCP_CONGESTION = "cubic"


@dataclass(frozen=True)
class DeviceNet:
    device: str
    index: int
    netns: str
    host_if: str
    ns_if: str
    address: str
    up_bps: int | None  # device -> network; None = unshaped
    down_bps: int | None  # network -> device
    delay_ms: float  # one-way, applied per direction (half the device latency)
    jitter_ms: float
    loss_pct: float


@dataclass(frozen=True)
class NetLayout:
    tag: str
    medium: str
    subnet: str
    bridge: str
    bridge_addr: str
    ifb: str | None
    shared_bps: int | None
    netem: bool
    devices: tuple[DeviceNet, ...]
    unshaped: tuple[str, ...]
    tcp_congestion: str | None = None  # set in every namespace; None: the host's

    def of(self, device: str) -> DeviceNet:
        for d in self.devices:
            if d.device == device:
                return d
        raise KeyError(device)

    @property
    def prefix_len(self) -> int:
        return ipaddress.ip_network(self.subnet).prefixlen

    def describe(self) -> list[str]:
        lines = []
        if self.medium == "shared" and self.shared_bps:
            lines.append(f"shared medium: all devices' transmissions share {self.shared_bps / 1e6:g} Mbit/s (IFB {self.ifb})")
        for d in self.devices:
            if d.up_bps or d.down_bps:
                up = f"{d.up_bps / 1e6:g}" if d.up_bps else "unshaped"
                down = f"{d.down_bps / 1e6:g}" if d.down_bps else "unshaped"
                link = f"own link up/down {up}/{down} Mbit/s"
            elif self.medium == "shared":
                link = "no own cap (only the shared channel)"
            else:
                link = "unshaped link"
            extra = ""
            if self.netem and (d.delay_ms or d.jitter_ms or d.loss_pct):
                extra = f", netem {d.delay_ms:g}+-{d.jitter_ms:g} ms per direction, loss {d.loss_pct:g}% up"
            lines.append(f"{d.device}: netns {d.netns}, {d.address} on {d.ns_if}, {link}{extra}")
        if self.tcp_congestion:
            lines.append(f"TCP congestion control in every namespace: {self.tcp_congestion}")
        lines.extend(self.unshaped)
        return lines


def tag_for(pool_name: str) -> str:
    """A short, stable tag for a pool name (4 hex digits)."""
    return hashlib.sha1(pool_name.encode()).hexdigest()[:4]


def default_subnet(tag: str, taken: Sequence[str] = ()) -> str:
    """A /24 in 10.213.0.0/16 chosen from the tag, skipping ``taken`` networks."""
    start = int(hashlib.sha1(tag.encode()).hexdigest()[:4], 16) % 250 + 1
    taken_nets = [ipaddress.ip_network(t, strict=False) for t in taken]
    for k in range(250):
        n = (start + k - 1) % 250 + 1
        net = ipaddress.ip_network(f"10.213.{n}.0/24")
        if not any(net.overlaps(t) for t in taken_nets):
            return str(net)
    raise RuntimeError("no free /24 left in 10.213.0.0/16; pass subnet= explicitly")


def _bps(mbps: float | None) -> int | None:
    return None if mbps is None else int(round(mbps * 1e6))


def plan_network(
    network: NetworkSpec,
    devices: Sequence[DeviceSpec],
    *,
    tag: str,
    subnet: str,
    netem: bool,
    shared_ok: bool = True,
    host_congestion: str = TCP_CONGESTION,
    congestion_ok: bool = True,
) -> NetLayout:
    """Plan links for the emulated ``devices``; ``netem``/``shared_ok``/``congestion_ok``
    say what the kernel has (``congestion_ok``: ``TCP_CONGESTION`` can be set in a
    namespace; else the namespaces keep ``host_congestion``)."""
    if not tag or len(tag) > 4 or not tag.isalnum() or tag.lower() != tag:
        raise ValueError(f"tag must be 1-4 lower-case letters or digits, got {tag!r}")
    net = ipaddress.ip_network(subnet)
    if net.prefixlen > 24 or not net.is_private:
        raise ValueError(f"subnet must be a private network of at least /24, got {subnet}")
    hosts = list(net.hosts())
    if len(devices) + 10 > len(hosts):
        raise ValueError(f"{len(devices)} devices do not fit in {subnet}")
    unshaped: list[str] = []
    medium = network.medium
    if medium == "shared" and not shared_ok:
        unshaped.append(
            "shared medium NOT emulated (no IFB redirect here): each device gets its own link at the "
            "network's rate, so devices do not compete for airtime"
        )
        medium = "switched"
    out = []
    for i, d in enumerate(devices):
        if medium == "switched":
            rate = _bps(d.bandwidth_mbps if d.bandwidth_mbps is not None else network.bandwidth_mbps)
        else:
            rate = _bps(d.bandwidth_mbps)  # own radio cap; the channel is the IFB
        latency_ms = d.latency_ms if d.latency_ms is not None else network.latency_ms
        host_if = f"{PREFIX}{tag}-v{i}"
        assert len(host_if) <= MAX_IFNAME
        out.append(
            DeviceNet(
                device=d.name,
                index=i,
                netns=f"{PREFIX}{tag}-{d.name}",
                host_if=host_if,
                ns_if=NS_IFNAME,
                address=str(hosts[9 + i]),
                up_bps=rate,
                down_bps=rate,
                delay_ms=latency_ms / 2 if netem else 0.0,
                jitter_ms=network.jitter_ms / 2 if netem else 0.0,
                loss_pct=network.loss_pct if netem else 0.0,
            )
        )
    if not netem:
        lat = sorted({d.latency_ms if d.latency_ms is not None else network.latency_ms for d in devices})
        if any(lat) or network.jitter_ms or network.loss_pct:
            unshaped.append(
                f"only rate is shaped: latency ({', '.join(f'{x:g}' for x in lat)} ms), jitter "
                f"({network.jitter_ms:g} ms) and loss ({network.loss_pct:g}%) are NOT emulated, because this "
                f"kernel has no netem"
            )
    if not congestion_ok and host_congestion != TCP_CONGESTION:
        unshaped.append(f"TCP congestion control is the host's {host_congestion}, NOT {TCP_CONGESTION} (the "
                        f"devices' usual): this kernel cannot set {TCP_CONGESTION} in a namespace")
    return NetLayout(
        tag=tag,
        medium=medium,
        subnet=str(net),
        bridge=f"{PREFIX}{tag}-br",
        bridge_addr=str(hosts[0]),
        ifb=f"{PREFIX}{tag}-ifb" if medium == "shared" else None,
        shared_bps=_bps(network.bandwidth_mbps) if medium == "shared" else None,
        netem=netem,
        devices=tuple(out),
        unshaped=tuple(unshaped),
        tcp_congestion=TCP_CONGESTION if congestion_ok else None,
    )


@dataclass(frozen=True)
class Step:
    """One command; ``creates`` names the resource it makes ('netns:x' or 'link:x')."""

    argv: tuple[str, ...]
    creates: str | None = None


def _burst_bytes(rate_bps: int) -> int:
    # At least 32 KiB (a few GSO segments), else 1 ms worth of the rate: small enough
    # that a short transfer cannot exceed the rate by more than a few percent.
    return max(32 * 1024, rate_bps // 8 // 1000)


def queue_bytes(rate_bps: int) -> int:
    """Byte limit of a shaped queue: ``QUEUE_S`` worth of the rate, at least 256 KiB."""
    return max(MIN_QUEUE_BYTES, int(rate_bps * QUEUE_S / 8))


def shaping_steps(
    prefix: tuple[str, ...], dev: str, rate_bps: int | None, delay_ms: float, jitter_ms: float, loss_pct: float
) -> list[Step]:
    """An htb class at ``rate_bps`` with a netem (or pfifo) leaf on ``dev``'s egress.

    ``prefix`` is ``("tc",)`` or ``("tc", "-n", netns)``.
    """
    tc = prefix + ("qdisc", "add", "dev", dev)
    want_netem = delay_ms > 0 or jitter_ms > 0 or loss_pct > 0
    netem_args: tuple[str, ...] = ()
    if want_netem:
        netem_args = ("netem", "limit", str(NETEM_LIMIT_PACKETS))
        if delay_ms > 0 or jitter_ms > 0:
            netem_args += ("delay", f"{delay_ms:g}ms")
            if jitter_ms > 0:
                netem_args += (f"{jitter_ms:g}ms",)
        if loss_pct > 0:
            netem_args += ("loss", f"{loss_pct:g}%")
    if rate_bps is None:
        return [Step(tc + ("root",) + netem_args)] if want_netem else []
    burst = str(_burst_bytes(rate_bps))
    leaf = netem_args if want_netem else ("bfifo", "limit", str(queue_bytes(rate_bps)))
    return [
        Step(tc + ("root", "handle", "1:", "htb", "default", "1")),
        Step(
            prefix
            + ("class", "add", "dev", dev, "parent", "1:", "classid", "1:1", "htb")
            + ("rate", f"{rate_bps}bit", "ceil", f"{rate_bps}bit", "burst", burst, "cburst", burst, "quantum", "60000")
        ),
        Step(tc + ("parent", "1:1", "handle", "10:") + leaf),
    ]


def shared_channel_steps(layout: NetLayout) -> list[Step]:
    """The shared channel on the IFB: one htb parent at the channel rate, one child each.

    A single FIFO would let the first sender hold most of the channel (its standing
    queue delays everyone else's TCP); Wi-Fi's contention gives each busy station a
    roughly equal share instead. So each device has its own class (guaranteed
    rate/n, may borrow up to the full rate when the others are idle), classified by
    its source address; anything else (ARP) goes to a default class.
    """
    assert layout.ifb and layout.shared_bps
    dev, rate = layout.ifb, layout.shared_bps
    n = max(1, len(layout.devices))
    share = max(8000, rate // n)
    burst = str(_burst_bytes(rate))
    limit = str(queue_bytes(rate))
    steps = [
        Step(("tc", "qdisc", "add", "dev", dev, "root", "handle", "1:", "htb", "default", "ffff")),
        Step(
            ("tc", "class", "add", "dev", dev, "parent", "1:", "classid", "1:1", "htb")
            + ("rate", f"{rate}bit", "ceil", f"{rate}bit", "burst", burst, "cburst", burst, "quantum", "60000")
        ),
    ]
    classes = [(d.index + 2, d.address) for d in layout.devices] + [(0xFFFF, None)]
    for minor, address in classes:
        cid = f"1:{minor:x}"
        steps.append(
            Step(
                ("tc", "class", "add", "dev", dev, "parent", "1:1", "classid", cid, "htb")
                + ("rate", f"{share}bit", "ceil", f"{rate}bit", "burst", burst, "cburst", burst, "quantum", "30000")
            )
        )
        steps.append(Step(("tc", "qdisc", "add", "dev", dev, "parent", cid, "bfifo", "limit", limit)))
        if address is not None:
            steps.append(
                Step(
                    ("tc", "filter", "add", "dev", dev, "parent", "1:", "protocol", "ip", "prio", "1", "u32")
                    + ("match", "ip", "src", f"{address}/32", "flowid", cid)
                )
            )
    return steps


def setup_steps(layout: NetLayout) -> list[Step]:
    """Every command that builds ``layout``, in order."""
    steps: list[Step] = []
    br = layout.bridge
    steps.append(Step(("ip", "link", "add", br, "type", "bridge"), creates=f"link:{br}"))
    steps.append(Step(("ip", "addr", "add", f"{layout.bridge_addr}/{layout.prefix_len}", "dev", br)))
    steps.append(Step(("ip", "link", "set", br, "up")))
    if layout.ifb:
        steps.append(Step(("ip", "link", "add", layout.ifb, "type", "ifb"), creates=f"link:{layout.ifb}"))
        steps.append(Step(("ip", "link", "set", layout.ifb, "up")))
        steps.extend(shared_channel_steps(layout))
    for d in layout.devices:
        ipn = ("ip", "-n", d.netns)
        steps.append(Step(("ip", "netns", "add", d.netns), creates=f"netns:{d.netns}"))
        steps.append(
            Step(
                ("ip", "link", "add", d.host_if, "type", "veth", "peer", "name", d.ns_if, "netns", d.netns),
                creates=f"link:{d.host_if}",
            )
        )
        steps.append(Step(("ip", "link", "set", d.host_if, "master", br)))
        steps.append(Step(("ip", "link", "set", d.host_if, "up")))
        steps.append(Step(ipn + ("addr", "add", f"{d.address}/{layout.prefix_len}", "dev", d.ns_if)))
        steps.append(Step(ipn + ("link", "set", d.ns_if, "up")))
        steps.append(Step(ipn + ("link", "set", "lo", "up")))
        if layout.tcp_congestion:
            steps.append(Step(("ip", "netns", "exec", d.netns, "sysctl", "-q", "-w",
                               f"net.ipv4.tcp_congestion_control={layout.tcp_congestion}")))
        steps.extend(shaping_steps(("tc", "-n", d.netns), d.ns_if, d.up_bps, d.delay_ms, d.jitter_ms, d.loss_pct))
        steps.extend(shaping_steps(("tc",), d.host_if, d.down_bps, d.delay_ms, d.jitter_ms, 0.0))
        if layout.ifb:
            steps.append(Step(("tc", "qdisc", "add", "dev", d.host_if, "handle", "ffff:", "ingress")))
            steps.append(
                Step(
                    ("tc", "filter", "add", "dev", d.host_if, "parent", "ffff:", "protocol", "all")
                    + ("u32", "match", "u32", "0", "0", "action", "mirred", "egress", "redirect", "dev", layout.ifb)
                )
            )
    return steps
