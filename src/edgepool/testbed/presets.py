"""Network presets: typical links of a home or a factory floor as ``NetworkSpec`` values.

Each preset is a plain ``NetworkSpec``, so a pool file can hold the same numbers, and a
caller can override one field with ``spec.model_copy(update={...})``.

``bandwidth_mbps`` is the *effective* TCP throughput one link carries, not the PHY
rate printed on the box: Wi-Fi spends a large share of its airtime on contention,
preambles, acknowledgements and retries. The ratios used below (roughly 45-65% of the
PHY rate for Wi-Fi, 94% for Ethernet) are the usual rule of thumb of throughput
measurements; they are approximations, and a measured profile of the real network
(``edgepool profile``) beats any preset.

- ``802.11n``: 2.4 GHz, 20 MHz, 2 spatial streams, PHY 144 Mbit/s -> about 70 Mbit/s.
- ``802.11ac``: 5 GHz, 80 MHz, 2 streams, PHY 867 Mbit/s -> about 400 Mbit/s.
- ``802.11ax``: 5 GHz, 80 MHz, 2 streams, PHY 1201 Mbit/s -> about 700 Mbit/s.
- ``ethernet``: switched gigabit Ethernet, 1000 Mbit/s -> about 940 Mbit/s of TCP.
- ``fast-ethernet``: switched 100 Mbit/s Ethernet -> about 94 Mbit/s.

Wi-Fi is one shared channel (``medium: shared``): every station's frames take turns on
the same air. Latency and jitter are one-way, device to device, for a lightly loaded
channel. Loss is left at 0: Wi-Fi retransmits at the MAC layer, so TCP sees delay
rather than loss.
"""

from __future__ import annotations

from edgepool.specs.pool import NetworkSpec

NETWORK_PRESETS: dict[str, NetworkSpec] = {
    "802.11n": NetworkSpec(medium="shared", bandwidth_mbps=70.0, latency_ms=3.0, jitter_ms=2.0, loss_pct=0.0),
    "802.11ac": NetworkSpec(medium="shared", bandwidth_mbps=400.0, latency_ms=2.0, jitter_ms=1.0, loss_pct=0.0),
    "802.11ax": NetworkSpec(medium="shared", bandwidth_mbps=700.0, latency_ms=1.5, jitter_ms=0.5, loss_pct=0.0),
    "ethernet": NetworkSpec(medium="switched", bandwidth_mbps=940.0, latency_ms=0.2, jitter_ms=0.0, loss_pct=0.0),
    "fast-ethernet": NetworkSpec(medium="switched", bandwidth_mbps=94.0, latency_ms=0.3, jitter_ms=0.0, loss_pct=0.0),
}

_ALIASES = {"wifi4": "802.11n", "wifi5": "802.11ac", "wifi6": "802.11ax", "gigabit-ethernet": "ethernet"}


def network_preset(name: str) -> NetworkSpec:
    """The preset called ``name`` (aliases: wifi4, wifi5, wifi6, gigabit-ethernet)."""
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in NETWORK_PRESETS:
        known = ", ".join(list(NETWORK_PRESETS) + list(_ALIASES))
        raise ValueError(f"unknown network preset {name!r}; known presets: {known}")
    return NETWORK_PRESETS[key]
