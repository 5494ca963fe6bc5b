"""Credentials: API tokens, join tokens and node secrets.

A token reads ``mva.<id>.<secret>`` (API) or ``mvj.<id>.<secret>`` (join). Only a SHA-256 of the
secret is stored; the secrets are 256-bit random, so a fast hash is enough and a stolen
database holds nothing that opens the cluster.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from multiverse.core.errors import InvalidArgument, NotFound, PermissionDenied, Unauthenticated
from multiverse.store.repository import Store, now
from multiverse.wire import pki

API, JOIN = "api", "join"
_PREFIX = {API: "mva", JOIN: "mvj"}
ROLES = ("admin", "viewer")
# A join token is meant for one worker now: one use within the hour unless asked for more.
DEFAULT_JOIN_TTL = timedelta(hours=1)
DEFAULT_JOIN_USES = 1
MAX_TTL = timedelta(days=365)
MAX_USES = 1000
# Seconds an API request may rely on this master's last read of its token; a revocation
# through another master takes that long at most to reach this one.
API_TOKEN_MAX_AGE = 1.0


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def secret_matches(secret: str, stored_hash: str) -> bool:
    return hmac.compare_digest(hash_secret(secret), stored_hash)


def new_secret() -> str:
    return secrets.token_urlsafe(32)


@dataclass(frozen=True)
class IssuedToken:
    id: str
    token: str  # shown once, never stored
    expires_at: datetime | None


async def issue_token(
    store: Store,
    kind: str,
    *,
    role: str = "",
    ttl: timedelta | None = None,
    uses: int | None = None,
    description: str = "",
) -> IssuedToken:
    if kind == API and role not in ROLES:
        raise InvalidArgument(f"unknown role {role!r}: use one of {', '.join(ROLES)}")
    if ttl is not None and not timedelta(seconds=1) <= ttl <= MAX_TTL:
        raise InvalidArgument(f"ttl must be between 1s and {MAX_TTL.days} days")
    if kind == API and uses is not None:
        # Counting requests would make the token die in the middle of a user's work.
        raise InvalidArgument(
            "uses applies to join tokens only: an API token is valid for every request "
            "until it expires (--ttl) or is revoked"
        )
    if uses is not None and not 1 <= uses <= MAX_USES:
        raise InvalidArgument(f"uses must be between 1 and {MAX_USES}")
    token_id = secrets.token_hex(8)
    secret = new_secret()
    expires_at = now() + ttl if ttl is not None else None
    await store.add_token(
        token_id,
        kind,
        hash_secret(secret),
        role=role,
        description=description,
        expires_at=expires_at,
        uses_left=uses,
    )
    return IssuedToken(token_id, f"{_PREFIX[kind]}.{token_id}.{secret}", expires_at)


async def verify_token(store: Store, kind: str, token: str) -> dict[str, object]:
    """The stored token for ``token`` if it is valid now; raises Unauthenticated otherwise.

    Every failure says the same thing, so a caller learns nothing about which part was wrong.
    """
    prefix, _, rest = token.partition(".")
    token_id, _, secret = rest.partition(".")
    max_age = API_TOKEN_MAX_AGE if kind == API else 0.0  # a join token's uses are counted
    valid = prefix == _PREFIX[kind] and secret
    record = await store.get_token(token_id, max_age=max_age) if valid else None
    what = "join token" if kind == JOIN else "API token"
    if (
        record is None
        or record["kind"] != kind
        or record["revoked"]
        or not secret_matches(secret, str(record["secret_hash"]))
    ):
        raise Unauthenticated(f"invalid {what}")
    expires_at = record["expires_at"]
    if isinstance(expires_at, datetime) and expires_at <= now():
        raise Unauthenticated(
            f"the {what} has expired; create a new one with `multiverse token create`"
        )
    return record


async def find_token(store: Store, token: str) -> str:
    """The id of ``token`` as ``token create`` printed it (``mva.<id>.<secret>``,
    ``mvj.<id>.<secret>`` or an encoded join token), if it is one of ours, expired and revoked
    ones too: the secret must match, so a mistyped token names no other."""
    if token.startswith(pki.JOIN_TOKEN_PREFIX):
        join = pki.JoinToken.decode(token)
        token_id, secret = join.token_id, join.secret
    else:
        prefix, _, rest = token.partition(".")
        token_id, _, secret = rest.partition(".")
        if prefix not in _PREFIX.values():
            token_id = ""
    record = await store.get_token(token_id) if token_id and secret else None
    if record is None or not secret_matches(secret, str(record["secret_hash"])):
        raise NotFound("no such token: give the whole token `token create` printed, or its id")
    return token_id


def require_role(record: dict[str, object], role: str) -> None:
    if role == "admin" and record.get("role") != "admin":
        raise PermissionDenied("this API token is read-only (role viewer)")
