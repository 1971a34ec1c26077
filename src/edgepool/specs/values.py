"""Bounded value types for the specs: every number finite and in a physical range,
every name a safe identifier.

A spec value is read once, here, and refused there with one line naming the field,
the value and the range, so nothing downstream (planner, simulator, ranks) ever sees
``inf``, ``NaN``, ``true`` for a number, or a device called ``..``.

The limits are what an edge pool can be, with room to spare; each is a named
constant so an error can state it:

- ``MAX_DEVICES`` devices in a pool or a plan (the planner's work grows with it);
- ``MAX_MICROBATCHES`` micro-batches in a step (the simulator's events grow with it);
- model sizes: ``models.config.LIMITS`` (checked where a config is built);
- a job's batch, sequence and step counts: the bounds on ``specs.job.TrainSpec``.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, Field

MAX_DEVICES = 64
MAX_MICROBATCHES = 256
MAX_NAME = 63
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


def safe_name(v: str) -> str:
    """A name that is safe in a file path, a log line and a shell command."""
    if not isinstance(v, str) or len(v) > MAX_NAME or not NAME.fullmatch(v):
        raise ValueError(f"{v!r} is not a safe name; use up to {MAX_NAME} letters, digits, '_' and '-', starting "
                         "with a letter or digit")
    return v


def _number(v: Any) -> Any:
    if isinstance(v, bool):
        raise ValueError(f"expected a number, got {str(v).lower()}")
    if isinstance(v, float) and not math.isfinite(v):
        raise ValueError(f"expected a finite number, got {v}")
    if isinstance(v, str):
        try:
            f = float(v)
        except ValueError:
            return v  # pydantic's own "not a number" error follows
        if not math.isfinite(f):
            raise ValueError(f"expected a finite number, got {v!r}")
    return v


Name = Annotated[str, AfterValidator(safe_name)]


def Real(*, gt: float | None = None, ge: float | None = None, le: float):  # noqa: N802 (a type)
    """A finite float in a range (never a bool)."""
    return Annotated[float, BeforeValidator(_number), Field(gt=gt, ge=ge, le=le)]


def Count(*, ge: int, le: int):  # noqa: N802 (a type)
    """A whole number in a range (never a bool, never a fraction)."""
    return Annotated[int, BeforeValidator(_number), Field(ge=ge, le=le)]
