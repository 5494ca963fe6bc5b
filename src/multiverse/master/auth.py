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

from multiverse.core.errors import InvalidArgument, PermissionDenied, Unauthenticated
from multiverse.store.repository import Store, now

API, JOIN = "api", "join"
_PREFIX = {API: "mva", JOIN: "mvj"}
ROLES = ("admin", "viewer")
DEFAULT_JOIN_TTL = timedelta(hours=24)
MAX_TTL = timedelta(days=3650)


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


def issue_token(
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
        raise InvalidArgument("ttl must be between 1s and 3650 days")
    if uses is not None and uses < 1:
        raise InvalidArgument("uses must be at least 1")
    token_id = secrets.token_hex(8)
    secret = new_secret()
    expires_at = now() + ttl if ttl is not None else None
    store.add_token(
        token_id,
        kind,
        hash_secret(secret),
        role=role,
        description=description,
        expires_at=expires_at,
        uses_left=uses,
    )
    return IssuedToken(token_id, f"{_PREFIX[kind]}.{token_id}.{secret}", expires_at)


def verify_token(store: Store, kind: str, token: str) -> dict[str, object]:
    """The stored token for ``token`` if it is valid now; raises Unauthenticated otherwise.

    Every failure says the same thing, so a caller learns nothing about which part was wrong.
    """
    prefix, _, rest = token.partition(".")
    token_id, _, secret = rest.partition(".")
    record = store.get_token(token_id) if prefix == _PREFIX[kind] and secret else None
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


def require_role(record: dict[str, object], role: str) -> None:
    if role == "admin" and record.get("role") != "admin":
        raise PermissionDenied("this API token is read-only (role viewer)")
