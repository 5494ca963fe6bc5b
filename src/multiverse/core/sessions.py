"""The frames of a shell or ``exec -t`` session on a WebSocket, one definition for all its ends.

The CLI speaks them to the master's relay (master/sessions.py) or straight to the node's agent
(worker/sessions.py); both servers answer the same frames. Binary frames carry the bytes, both
ways. Text frames carry JSON control messages: from the client ``{"type": "resize", "cols",
"rows"}`` and ``{"type": "eof"}``; to the client ``{"type": "exit", "code"}`` (last) or
``{"type": "error", "code", "message"}``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

__all__ = [
    "AGENT_SESSION_PATH",
    "EOF",
    "EOF_FRAME",
    "MAX_FRAME",
    "MAX_TERMINAL",
    "Eof",
    "Resize",
    "error_frame",
    "exit_frame",
    "parse_control",
    "resize_frame",
    "valid_size",
]

# Where a node's agent serves sessions straight to clients, + the instance id (worker/sessions.py).
AGENT_SESSION_PATH = "/v1/sessions/"
MAX_TERMINAL = 10000  # rows or columns; more is a bug or an attack, not a terminal
MAX_FRAME = 256 * 1024  # bytes of output joined into one binary frame at most


@dataclass(frozen=True)
class Resize:
    cols: int
    rows: int


@dataclass(frozen=True)
class Eof:
    """End of the client's input."""


EOF = Eof()
EOF_FRAME = json.dumps({"type": "eof"})


def valid_size(cols: int, rows: int) -> bool:
    return 0 < cols <= MAX_TERMINAL and 0 < rows <= MAX_TERMINAL


def parse_control(text: str) -> Resize | Eof | None:
    """A client's control frame; None for frames we do not know (ignored, as a terminal
    ignores an escape sequence it does not know)."""
    try:
        message: dict[str, Any] = json.loads(text)
        kind = message.get("type")
        if kind == "resize":
            cols, rows = int(message["cols"]), int(message["rows"])
            if valid_size(cols, rows):
                return Resize(cols, rows)
        elif kind == "eof":
            return EOF
    except (ValueError, KeyError, TypeError, AttributeError):
        pass
    return None


def resize_frame(cols: int, rows: int) -> str:
    return json.dumps({"type": "resize", "cols": cols, "rows": rows})


def exit_frame(code: int) -> str:
    return json.dumps({"type": "exit", "code": code})


def error_frame(code: str, message: str) -> str:
    return json.dumps({"type": "error", "code": code, "message": message})
