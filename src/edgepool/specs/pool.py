"""The pool spec: which devices take part and how they are linked.

Units: bandwidth in megabits per second (``_mbps``), latency in milliseconds
(``_ms``), memory in GB (10^9 bytes, as vendors state it).

Every number is finite and in a physical range (``specs.values``): bandwidth 0.01 Mbit/s
to 400 Gbit/s, latency and jitter up to 10 s, memory 0.01 GB to 4 TB, a speed 0.001x to
1000x the reference, at most ``MAX_DEVICES`` devices. Names are safe identifiers.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from edgepool import catalog
from edgepool.specs.values import MAX_DEVICES, Name, Real

Bandwidth = Real(ge=0.01, le=400_000.0)
Latency = Real(ge=0.0, le=10_000.0)
Speed = Real(ge=1e-3, le=1e3)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NetworkSpec(_Strict):
    medium: Literal["shared", "switched"] = "shared"
    bandwidth_mbps: Bandwidth = 100.0
    latency_ms: Latency = 2.0
    jitter_ms: Latency = 0.0
    loss_pct: Real(ge=0.0, le=50.0) = 0.0


class DeviceSpec(_Strict):
    name: Name
    kind: str
    host: str = "local"
    memory_gb: Real(ge=0.01, le=4096.0) | None = None
    power_mode: str | None = None
    compute_scale: Speed | None = None
    bandwidth_mbps: Bandwidth | None = None
    latency_ms: Latency | None = None

    @field_validator("host")
    @classmethod
    def _address(cls, v: str) -> str:
        from edgepool.machine import is_address

        if v not in ("local", "emulated") and not is_address(v):
            raise ValueError(f"host {v!r} is neither local, emulated, an IP address nor a host name")
        return v

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, v: str) -> str:
        catalog.get(v)  # raises a SpecError-compatible ValueError listing the known kinds
        return v

    @model_validator(mode="after")
    def _known_power_mode(self) -> "DeviceSpec":
        if self.power_mode is not None:
            catalog.get(self.kind).power_mode(self.power_mode)
        return self

    @property
    def is_local(self) -> bool:
        return self.host in ("local", "emulated")

    def resolved_memory_gb(self) -> float:
        """Memory (GB) this device gives to training: ``memory_gb`` when the pool states
        it (the testbed caps an emulated device's rank at exactly this), else the kind's
        memory less what its OS and services keep (catalog ``reserved_gb``)."""
        if self.memory_gb is not None:
            return self.memory_gb
        return catalog.get(self.kind).usable_memory_gb

    def speed(self) -> float:
        """Relative training speed: ``compute_scale`` if given, else the catalog's figure."""
        if self.compute_scale is not None:
            return self.compute_scale
        return catalog.get(self.kind).relative_speed(self.power_mode)


class PoolSpec(_Strict):
    name: Name = "pool"
    network: NetworkSpec = NetworkSpec()
    devices: tuple[DeviceSpec, ...] = Field(min_length=1)
    # The address ``edgepool serve`` listens on (the coordinator's own, on the pool's network).
    coordinator: str | None = None

    @field_validator("coordinator")
    @classmethod
    def _coordinator_address(cls, v: str | None) -> str | None:
        from edgepool.machine import is_address

        if v is not None and not is_address(v):
            raise ValueError(f"coordinator {v!r} is neither an IP address nor a host name")
        return v

    @field_validator("devices", mode="before")
    @classmethod
    def _not_too_many(cls, v):
        if isinstance(v, (list, tuple)) and len(v) > MAX_DEVICES:
            raise ValueError(f"{len(v)} devices, more than edgepool's limit of {MAX_DEVICES} in one pool; "
                             "split the pool")
        return v

    @model_validator(mode="after")
    def _unique_names(self) -> "PoolSpec":
        seen: set[str] = set()
        for d in self.devices:
            if d.name in seen:
                raise ValueError(f"device name {d.name!r} appears twice; give each device a unique name")
            seen.add(d.name)
        return self

    def device(self, name: str) -> DeviceSpec:
        for d in self.devices:
            if d.name == name:
                return d
        raise KeyError(name)

    @property
    def device_names(self) -> list[str]:
        return [d.name for d in self.devices]


def load_pool(path) -> PoolSpec:
    from edgepool.specs.files import load

    return load(PoolSpec, path, "pool")
