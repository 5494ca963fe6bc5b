"""The CLI's end of ``shell`` and ``exec -t``: this terminal <-> a WebSocket to the session.

The WebSocket goes straight to the node's agent when it can (the master only hands out a
one-time ticket for it, worker/sessions.py): the bytes then cross one process less each way,
and not the master's, which serves everyone. When the node cannot be reached from here (it
refuses, times out, fails TLS) or the master offers no direct endpoint, the session goes
through the master's relay (master/sessions.py) as before; ``MULTIVERSE_DEBUG=1`` tells which.

With a terminal on stdin it goes raw (Ctrl-C, Ctrl-Z, Ctrl-D reach the guest), sends the size
at start and on every SIGWINCH, and restores the terminal on every way out. With piped stdin it
streams the input and then says end-of-input. Frames are those of core/sessions.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import ssl
import sys
import termios
import tty
from collections.abc import Iterator, Sequence
from typing import Any
from urllib.parse import urlencode

import websockets
from websockets.asyncio.client import ClientConnection

from multiverse.client.cli import debug
from multiverse.client.http import ApiClient, ApiError, Unreachable
from multiverse.core.sessions import EOF_FRAME, resize_frame

DIRECT_TIMEOUT = 2.0  # seconds to reach the node's agent before going through the master
# No permessage-deflate: a terminal's bytes are few per frame or already dense, and deflating
# every frame on one end and inflating it on the other cost more CPU than anything else on the
# path (a host the guest's emulated CPU shares).
_SESSION_OPTIONS: dict[str, Any] = {"max_size": None, "compression": None}


def _shell_path(name: str, command: Sequence[str], size: os.terminal_size | None) -> str:
    query: list[tuple[str, str | int]] = [("tty", "true" if size else "false")]
    if size:
        query += [("cols", size.columns), ("rows", size.lines)]
    query += [("command", part) for part in command]
    return f"/api/v1/instances/{name}/shell?{urlencode(query)}"


@contextlib.contextmanager
def _raw(fd: int) -> Iterator[None]:
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd, termios.TCSANOW)  # the default, TCSAFLUSH, drops typed-ahead keys
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _size(fd: int) -> os.terminal_size:
    try:
        return os.get_terminal_size(fd)
    except OSError:
        return os.terminal_size((80, 24))


async def _send_input(ws: ClientConnection, fd: int) -> None:
    """Stdin to the session; end-of-input is told once stdin ends."""
    loop = asyncio.get_running_loop()
    readable = asyncio.Event()
    try:
        loop.add_reader(fd, readable.set)
        watched = True
    except PermissionError:  # a regular file: always readable, epoll refuses it
        watched = False
    # Non-blocking while we read, or a wake-up that went stale would stall the whole loop in
    # read(); given back as it was, since the terminal is shared with the user's shell.
    was_blocking = os.get_blocking(fd)
    os.set_blocking(fd, False)
    try:
        while True:
            if watched:
                await readable.wait()
                readable.clear()
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                continue
            if not data:
                await ws.send(EOF_FRAME)
                return
            await ws.send(data)
    except websockets.ConnectionClosed:
        pass  # the session ended before its input did; _receive tells how it ended
    finally:
        os.set_blocking(fd, was_blocking)
        if watched:
            loop.remove_reader(fd)


def _ws(client: ApiClient, path: str) -> tuple[str, dict[str, Any]]:
    """The WebSocket URL for ``path`` and the connect options: the client's token and trust."""
    base = client.server.replace("https://", "wss://", 1).replace("http://", "ws://", 1)
    options: dict[str, Any] = {"additional_headers": {"Authorization": f"Bearer {client.token}"}}
    if base.startswith("wss://"):
        options["ssl"] = client.verify
    return base + path, options


async def attach(client: ApiClient, name: str, command: Sequence[str], want_tty: bool) -> int:
    """Run the session to its end; returns the remote exit code."""
    stdin, stdout = sys.stdin.fileno(), sys.stdout.fileno()
    interactive = want_tty and os.isatty(stdin)
    size = _size(stdout if os.isatty(stdout) else stdin) if want_tty else None
    ws = await _direct(client, name, command, size) or await _relayed(client, name, command, size)

    loop = asyncio.get_running_loop()

    resizes: set[asyncio.Task[None]] = set()

    def send_size() -> None:
        now = _size(stdout)
        sending = asyncio.create_task(ws.send(resize_frame(now.columns, now.lines)))
        resizes.add(sending)
        sending.add_done_callback(resizes.discard)

    task = asyncio.current_task()
    assert task is not None
    for sig in (signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, task.cancel)  # still restore the terminal on the way out
    if interactive:
        loop.add_signal_handler(signal.SIGWINCH, send_size)
    sender = asyncio.create_task(_send_input(ws, stdin))
    try:
        with _raw(stdin) if interactive else contextlib.nullcontext():
            return await _receive(ws, stdout)
    finally:
        sender.cancel()
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGWINCH):
            loop.remove_signal_handler(sig)
        await ws.close()


async def _direct(
    client: ApiClient, name: str, command: Sequence[str], size: os.terminal_size | None
) -> ClientConnection | None:
    """The session on the node's agent itself, or None when that cannot be (then the master
    relays). The master's refusals (no such instance, not running, not allowed) are final."""
    cols, rows = (size.columns, size.lines) if size else (80, 24)
    offer = client.open_session(name, list(command), size is not None, cols, rows)
    if not offer.get("url"):
        debug("the master offers no direct session; relaying through the master")
        return None
    # The node's certificate must come from the cluster's CA (what the master trusts its
    # agents by) and name that node, whatever address it has: the master told both, over a
    # connection this client already trusts.
    trust = ssl.create_default_context(cadata=offer["ca_certificate"])
    try:
        ws = await websockets.connect(
            offer["url"],
            ssl=trust,
            server_hostname=offer["server_name"],
            additional_headers={"Authorization": f"Bearer {offer['ticket']}"},
            open_timeout=DIRECT_TIMEOUT,
            proxy=None,  # the node, or the relay: not a proxy in between
            **_SESSION_OPTIONS,
        )
    except (OSError, websockets.InvalidHandshake, TimeoutError) as exc:
        debug(f"cannot open the session at {offer['url']} ({exc}); relaying through the master")
        return None
    debug(f"session straight to the node at {offer['url']}")
    sock = ws.transport.get_extra_info("socket")
    if sock is not None:  # asyncio sets it on TCP already; a keystroke must not wait for an ACK
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return ws


async def _relayed(
    client: ApiClient, name: str, command: Sequence[str], size: os.terminal_size | None
) -> ClientConnection:
    url, options = _ws(client, _shell_path(name, command, size))
    try:
        return await websockets.connect(url, **options, open_timeout=30, **_SESSION_OPTIONS)
    except websockets.InvalidStatus as exc:
        raise _refusal(exc) from None
    except (OSError, websockets.InvalidHandshake, TimeoutError) as exc:
        raise Unreachable(f"cannot reach the master at {client.server}: {exc}") from exc


async def _write_all(fd: int, data: bytes) -> None:
    """Write everything, waiting while the terminal is full: on a terminal stdout shares the
    open file with stdin, which _send_input made non-blocking."""
    loop = asyncio.get_running_loop()
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:
            writable = asyncio.Event()
            loop.add_writer(fd, writable.set)
            try:
                await writable.wait()
            finally:
                loop.remove_writer(fd)


async def _receive(ws: ClientConnection, stdout: int) -> int:
    try:
        async for message in ws:
            if isinstance(message, bytes):
                await _write_all(stdout, message)
                continue
            control = json.loads(message)
            if control.get("type") == "exit":
                return int(control["code"])
            if control.get("type") == "error":
                raise ApiError(502, control["code"], control["message"])
    except websockets.ConnectionClosedError as exc:
        raise Unreachable(f"lost the connection to the master: {exc}") from exc
    raise Unreachable("the master closed the session without an exit code")


def _refusal(exc: websockets.InvalidStatus) -> ApiError:
    response = exc.response
    try:
        error = json.loads(response.body or b"")["error"]
        return ApiError(response.status_code, error["code"], error["message"])
    except (ValueError, KeyError, TypeError):
        return ApiError(response.status_code, "http_error", f"refused: HTTP {response.status_code}")


async def follow_events(client: ApiClient) -> int:
    """Print the master's events, one JSON object a line, until the stream ends."""
    url, options = _ws(client, "/api/v1/events")
    try:
        async with websockets.connect(url, **options) as ws:
            async for message in ws:
                text = message.decode() if isinstance(message, bytes) else message
                sys.stdout.write(text + "\n")
                sys.stdout.flush()
    except websockets.InvalidStatus as exc:
        raise _refusal(exc) from None
    except (OSError, websockets.InvalidHandshake) as exc:
        raise Unreachable(f"cannot reach the master at {client.server}: {exc}") from exc
    except websockets.ConnectionClosedError as exc:
        raise Unreachable(f"lost the connection to the master: {exc}") from exc
    return 0
