"""What a call of the API can end in, apart from its answer.

Apart from client/http.py so that the CLI can catch these without loading an HTTP client and
TLS: commands that never reach the master (``--version``, ``--help``) should not pay for them.
"""

from __future__ import annotations

# Exit codes, as Multipass: 0 ok, 1 usage error, 2 the request failed, 3 the master is unreachable.
EXIT_USAGE, EXIT_FAILED, EXIT_UNREACHABLE = 1, 2, 3


class ApiError(Exception):
    """The master answered with an error (4xx/5xx and its JSON error body)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class Unreachable(Exception):
    """No answer from the master at all."""


class Failure(Exception):
    """The request went through but did not end as asked (e.g. a launch ended Failed)."""
