"""What a call of the API can end in, apart from its answer.

Apart from client/http.py so that the CLI can catch these without loading an HTTP client and
TLS: commands that never reach the master (``--version``, ``--help``) should not pay for them.
"""

from __future__ import annotations


class ApiError(Exception):
    """The master answered with an error (4xx/5xx and its JSON error body)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class Unreachable(Exception):
    """No answer from the master at all."""
