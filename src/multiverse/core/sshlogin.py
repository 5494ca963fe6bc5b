"""A login to a guest's own SSH server, for the user's OpenSSH client (``multiverse shell``).

Where the CLI runs on the guest's node, its keystrokes need not cross Multiverse at all: the
master authorizes the CLI's public key in the guest for a short window, as EC2 Instance
Connect pushes a key for 60 seconds, and the CLI hands the terminal to OpenSSH. The key is
taken out again when the window ends; a session opened within it lasts as long as it lasts
(sshd checks ``authorized_keys`` when it authenticates, not after).
"""

from __future__ import annotations

import base64
import binascii
import re
import secrets
import struct
from dataclasses import dataclass

from multiverse.core.errors import InvalidArgument

__all__ = ["LOGIN_WINDOW", "SshLogin", "authorized_key_line", "parse_public_key"]

LOGIN_WINDOW = 30.0  # seconds a pushed key lets its holder authenticate
MAX_KEY_LENGTH = 16 * 1024  # an RSA key of 16384 bits is ~2.8 KiB in base64

_KEY_TYPES = frozenset(
    {
        "ssh-ed25519",
        "ssh-rsa",
        "ecdsa-sha2-nistp256",
        "ecdsa-sha2-nistp384",
        "ecdsa-sha2-nistp521",
        "sk-ssh-ed25519@openssh.com",
        "sk-ecdsa-sha2-nistp256@openssh.com",
    }
)
_BASE64 = re.compile(r"[A-Za-z0-9+/]+={0,2}")


@dataclass(frozen=True)
class SshLogin:
    """Where the guest's SSH server answers, as the node sees it, and who may log in."""

    host: str
    port: int
    user: str
    host_key: str  # "TYPE BASE64", what the client must find the server to hold
    expires_in: float  # seconds left of the pushed key's window


def parse_public_key(text: str) -> str:
    """``TYPE BASE64`` of an OpenSSH public key line (its comment dropped); InvalidArgument
    for anything else. The line is written into a guest's ``authorized_keys``: what passes
    here cannot carry options, a second line or a key of another type than it says."""
    if len(text) > MAX_KEY_LENGTH:
        raise InvalidArgument("the public key is too long")
    line = text.strip()
    if any(stop in line for stop in "\r\n\0"):
        raise InvalidArgument("a public key is one line")
    fields = line.split()
    if len(fields) < 2 or fields[0] not in _KEY_TYPES or not _BASE64.fullmatch(fields[1]):
        raise InvalidArgument(
            "not an OpenSSH public key (one line: TYPE BASE64 [COMMENT], "
            f"TYPE one of {', '.join(sorted(_KEY_TYPES))})"
        )
    kind, blob = fields[0], fields[1]
    try:
        raw = base64.b64decode(blob, validate=True)
        (length,) = struct.unpack(">I", raw[:4])
    except (binascii.Error, struct.error) as exc:
        raise InvalidArgument(f"the public key's data is not valid: {exc}") from exc
    if raw[4 : 4 + length] != kind.encode():
        raise InvalidArgument(f"the public key's data is not a {kind} key")
    return f"{kind} {blob}"


def authorized_key_line(public_key: str) -> str:
    """The key's line for ``authorized_keys``, with a comment of its own: the same key pushed
    twice (two shells at once) is two lines, each taken out when its own window ends."""
    return f"{parse_public_key(public_key)} multiverse-login-{secrets.token_hex(6)}"
