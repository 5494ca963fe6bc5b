"""Typed errors of the domain.

Each error carries a stable machine-readable ``code``; the API turns them into HTTP statuses and
the JSON body ``{"error": {"code", "message"}}``, so callers never parse messages.
"""

from __future__ import annotations


class MultiverseError(Exception):
    """Base of every error that is meant to reach a user."""

    code = "internal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(MultiverseError):
    code = "invalid_argument"


class NotFound(MultiverseError):
    code = "not_found"


class AlreadyExists(MultiverseError):
    code = "already_exists"


class Conflict(MultiverseError):
    """The request is valid but the object's current state does not allow it."""

    code = "conflict"


class Unschedulable(MultiverseError):
    """No node can hold the instance; the message says why, node by node, and ``reasons``
    holds the same as data (node name -> why), for clients that show it their own way."""

    code = "unschedulable"

    def __init__(self, message: str, reasons: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.reasons = dict(reasons or {})


class Unauthenticated(MultiverseError):
    code = "unauthenticated"


class PermissionDenied(MultiverseError):
    code = "permission_denied"


class RateLimited(MultiverseError):
    """Too many failed attempts from one client; it must wait."""

    code = "rate_limited"


class Unavailable(MultiverseError):
    """A node or hypervisor could not be reached, or the master is too busy; retrying later
    may work, after ``retry_after`` seconds when it says (HTTP's Retry-After)."""

    code = "unavailable"

    def __init__(self, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class DriverError(MultiverseError):
    """The hypervisor refused or failed an action."""

    code = "driver_error"
