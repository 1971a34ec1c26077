"""The error types of edgepool.

Every error a user can cause is an ``EdgepoolError``: its message is one line that
names the field or the number at fault and the fix. The CLI prints it without a
traceback. ``assert`` is kept for internal invariants only.
"""

from __future__ import annotations


class EdgepoolError(Exception):
    """Base class of every error edgepool raises on purpose."""


class SpecError(EdgepoolError, ValueError):
    """A pool, job or plan file is missing, malformed or inconsistent."""


class PlanError(EdgepoolError, ValueError):
    """A plan cannot run with this pool and job (shares, layer ranges, ...)."""


class InfeasibleError(EdgepoolError):
    """No plan fits. ``candidates`` holds the closest plans and why each failed."""

    def __init__(self, message: str, candidates: list[tuple[str, str]] | None = None):
        self.candidates = list(candidates or [])
        if self.candidates:
            why = "; ".join(f"{name}: {reason}" for name, reason in self.candidates[:5])
            message = f"{message} Closest candidates: {why}"
        super().__init__(message)


class PeerError(EdgepoolError, RuntimeError):
    """A peer rank died or stopped answering within the timeout. ``silent``: the ranks
    found silent (``runtime.health``), so the launcher can blame them."""

    def __init__(self, message: str, *, silent: tuple[int, ...] = ()):
        super().__init__(message)
        self.silent = tuple(silent)
