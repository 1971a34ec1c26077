"""The pool spec: which devices take part and how they are linked.

Units: bandwidth in megabits per second (``_mbps``), latency in milliseconds
(``_ms``), memory in GB (10^9 bytes, as vendors state it).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from edgepool import catalog


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NetworkSpec(_Strict):
    medium: Literal["shared", "switched"] = "shared"
    bandwidth_mbps: float = Field(100.0, gt=0)
    latency_ms: float = Field(2.0, ge=0)
    jitter_ms: float = Field(0.0, ge=0)
    loss_pct: float = Field(0.0, ge=0, lt=100)


class DeviceSpec(_Strict):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    kind: str
    host: str = "local"
    memory_gb: float | None = Field(None, gt=0)
    power_mode: str | None = None
    compute_scale: float | None = Field(None, gt=0)
    bandwidth_mbps: float | None = Field(None, gt=0)
    latency_ms: float | None = Field(None, ge=0)

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
    name: str = "pool"
    network: NetworkSpec = NetworkSpec()
    devices: tuple[DeviceSpec, ...] = Field(min_length=1)

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
