"""Shells served straight to the client: the agent's own WebSocket endpoint.

Why: relayed through the master, a session's bytes crossed three Python processes (CLI,
master, agent), each a WebSocket or gRPC hop with its own framing; the master's loop alone was
busy a quarter of the time of a stream, on a host whose cores the guest's emulated CPU shares.
As Nomad's ``alloc exec`` does when the client node is reachable, the master now only
authorizes: it asks this agent for a one-time ticket (:class:`SessionTickets`) bound to an
instance, a command and a terminal, and hands the client the ticket and this endpoint. The
client presents the ticket here (``Authorization: Bearer``) and speaks the frames of
core/sessions.py, the same as to the master's relay, which stays the fallback.

The endpoint is TLS with the node's certificate (the one its gRPC listener serves), so the
client checks it reached *this* node as the master does: the cluster CA and the node's name.
The agent's side stays lean: the session's read goes out as one binary frame, no protobuf.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import secrets
import socket
import ssl
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from multiverse.core.errors import InvalidArgument, MultiverseError, Unauthenticated, Unavailable
from multiverse.core.sessions import (
    AGENT_SESSION_PATH,
    EOF,
    MAX_FRAME,
    Eof,
    Resize,
    error_frame,
    exit_frame,
    parse_control,
)
from multiverse.drivers.base import Session, TerminalSize

log = logging.getLogger("multiverse.worker")

__all__ = ["NodeTLS", "SessionServer", "SessionTickets", "Ticket", "apply_input", "output_frames"]

TICKET_TTL = 30.0  # seconds a ticket may wait for its client
MAX_TICKETS = 10000  # unredeemed at once; more is a flood, not users
MAX_INPUT = 1024 * 1024  # bytes of one client frame (the CLI sends reads of 64 KiB)
STREAMING = 1024  # bytes: a read this large is output streaming; an echo or a prompt is less
JOIN_WAIT = 0.005  # seconds streaming output waits for the reads that follow it


@dataclass(frozen=True)
class Ticket:
    """What one ticket allows: this session, once, before ``expires`` (monotonic seconds)."""

    instance_id: str
    command: tuple[str, ...]
    size: TerminalSize | None
    expires: float


class SessionTickets:
    """One-time tickets: 256 random bits each, single use, short-lived, never logged."""

    def __init__(self, ttl: float = TICKET_TTL, clock: Callable[[], float] = time.monotonic):
        self.ttl = ttl
        self._clock = clock
        self._tickets: dict[str, Ticket] = {}

    def issue(self, instance_id: str, command: tuple[str, ...], size: TerminalSize | None) -> str:
        now = self._clock()
        for key in [key for key, ticket in self._tickets.items() if ticket.expires <= now]:
            del self._tickets[key]
        if len(self._tickets) >= MAX_TICKETS:
            raise Unavailable("too many session tickets waiting; try again shortly")
        secret = secrets.token_urlsafe(32)
        self._tickets[secret] = Ticket(instance_id, command, size, now + self.ttl)
        return secret

    def redeem(self, secret: str, instance_id: str) -> Ticket:
        """The ticket's session, taken: a ticket shown once is spent, even at the wrong
        instance (whoever holds it may be guessing)."""
        ticket = self._tickets.pop(secret, None) if secret else None
        if ticket is None or ticket.expires <= self._clock():
            raise Unauthenticated("invalid or expired session ticket")
        # Compared in constant time, though a mismatch spent the ticket anyway.
        if not hmac.compare_digest(ticket.instance_id.encode(), instance_id.encode()):
            raise Unauthenticated("the session ticket is for another instance")
        return ticket


async def apply_input(session: Session, item: bytes | Resize | Eof | None) -> None:
    """One piece of the client's input into the session: bytes, a resize, or end-of-input
    (None: a control frame we do not know, ignored)."""
    if isinstance(item, bytes):
        await session.write(item)
    elif isinstance(item, Resize):
        await session.resize(item.cols, item.rows)
    elif item is EOF:
        await session.close_input()


async def output_frames(session: Session, wait: float = JOIN_WAIT) -> AsyncIterator[bytes]:
    """The session's output as the frames to send: a small read (a keystroke's echo, a
    prompt) at once; a large one, output streaming, joined with what the session gives within
    ``wait`` seconds after it (up to MAX_FRAME).

    Every frame costs both ends a system call to send or receive it, a TLS record, a wake-up
    of the other side's loop and a write to the terminal, whatever its size. Read as it came,
    a stream was one frame per SSH packet (~4.3 KiB from the guest's dropbear): py-spy found
    the agent's loop 35% in send() and the CLI's 65% in its terminal writes, on the two cores
    the guest's emulated CPU needs."""
    loop = asyncio.get_running_loop()
    while data := await session.read():
        if len(data) >= STREAMING:
            parts, size = [data], len(data)
            until = loop.time() + wait
            while size < MAX_FRAME:
                try:
                    async with asyncio.timeout_at(until):
                        more = await session.read()  # a read waiting for data takes none
                except TimeoutError:
                    break
                if not more:  # the end: what is held goes first
                    yield b"".join(parts)
                    return
                parts.append(more)
                size += len(more)
            data = b"".join(parts)
        yield data


class NodeTLS:
    """The listener's TLS: the node's certificate files, reloaded for new connections once
    ``version()`` (the worker's current certificate) changed, as a renewal rewrites them; the
    handshake's SNI callback swaps in the fresh context, so the listener never restarts."""

    def __init__(self, pki_dir: Path, version: Callable[[], object]) -> None:
        self._pki_dir = pki_dir
        self._version = version
        self._loaded = version()
        self.context = self._load()
        self.context.sni_callback = self._choose

    def _load(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self._pki_dir / "node.crt", self._pki_dir / "node.key")
        return context

    def _choose(self, sock: ssl.SSLObject, _name: str | None, _context: ssl.SSLContext) -> None:
        current = self._version()
        if current is not self._loaded:
            fresh = self._load()
            fresh.sni_callback = self._choose
            self.context, self._loaded = fresh, current
        if sock.context is not self.context:
            sock.context = self.context


def _refusal(connection: ServerConnection, exc: MultiverseError) -> Response:
    status = 401 if isinstance(exc, Unauthenticated) else 400
    body = json.dumps({"error": {"code": exc.code, "message": exc.message}})
    response = connection.respond(status, body)
    response.headers["Content-Type"] = "application/json"
    return response


class SessionServer:
    """The agent's session endpoint; ``await start()``, then ``await close()`` on shutdown,
    which ends every session (a client's WebSocket closing ends its process in the guest)."""

    def __init__(
        self, tickets: SessionTickets, open_session: Callable[[Ticket], Awaitable[Session]]
    ) -> None:
        self.tickets = tickets
        self._open = open_session
        # Ticket checked -> handler; weak: a handshake that fails after the check never
        # reaches the handler.
        self._granted: weakref.WeakKeyDictionary[ServerConnection, Ticket] = (
            weakref.WeakKeyDictionary()
        )
        self._server: Server | None = None
        self.port = 0  # bound by start()

    async def start(self, host: str, port: int, tls: NodeTLS) -> int:
        self._server = await serve(
            self._serve,
            host,
            port,
            ssl=tls.context,
            process_request=self._authorize,
            compression=None,  # dense or tiny frames: deflate costs more CPU than it saves
            max_size=MAX_INPUT,
            server_header=None,
        )
        self.port = self._server.sockets[0].getsockname()[1] if self._server.sockets else port
        return self.port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close(close_connections=True)
            await self._server.wait_closed()

    def _authorize(self, connection: ServerConnection, request: Request) -> Response | None:
        """The ticket checked before the upgrade, so a refusal is an HTTP status and the
        error's JSON, as the master's relay refuses."""
        try:
            if not request.path.startswith(AGENT_SESSION_PATH):
                raise InvalidArgument(f"no such endpoint {request.path.split('?')[0]!r}")
            instance_id = request.path[len(AGENT_SESSION_PATH) :].split("?")[0]
            scheme, _, secret = request.headers.get("Authorization", "").partition(" ")
            if scheme.lower() != "bearer":
                raise Unauthenticated("a session ticket is required (Authorization: Bearer)")
            self._granted[connection] = self.tickets.redeem(secret.strip(), instance_id)
        except MultiverseError as exc:
            return _refusal(connection, exc)
        return None

    async def _serve(self, connection: ServerConnection) -> None:
        ticket = self._granted.pop(connection)
        sock = connection.transport.get_extra_info("socket")
        if sock is not None:  # asyncio sets it for TCP already; said here, as it matters
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            session = await self._open(ticket)
        except MultiverseError as exc:
            with contextlib.suppress(ConnectionClosed):
                await connection.send(error_frame(exc.code, exc.message))
            return
        peer = connection.remote_address
        log.info("session on instance %s: direct from %s", ticket.instance_id, peer and peer[0])
        output = asyncio.create_task(_output(connection, session))
        given = asyncio.create_task(_input(connection, session))
        try:
            await asyncio.wait({output, given}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            output.cancel()
            given.cancel()
            await asyncio.gather(output, given, return_exceptions=True)
            await session.close()


async def _output(connection: ServerConnection, session: Session) -> None:
    """The session's output in binary frames (:func:`output_frames`); the exit code last.
    ``send`` waits while the client is not reading."""
    with contextlib.suppress(ConnectionClosed):
        async for data in output_frames(session):
            await connection.send(data)
        await connection.send(exit_frame(await session.wait()))


async def _input(connection: ServerConnection, session: Session) -> None:
    """The client's frames into the session until the client goes; websockets reads no more
    than a few frames ahead of us, so a guest slow to take input slows the client."""
    with contextlib.suppress(ConnectionClosed):
        async for message in connection:
            await apply_input(
                session, message if isinstance(message, bytes) else parse_control(message)
            )
