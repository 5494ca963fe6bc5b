"""What keeps a call fast, checked as behaviour (never with a clock): issue 18.

An exec through the API cost ~40 ms more than its work: the master's API connections kept
Nagle on, so each small write of a response (headers, a chunk, the chunked end) waited for the
client's delayed ACK. The check here is on the socket the master's own server accepted.

A shell's output that reached the master while its WebSocket was busy goes out as one frame,
not one per gRPC message: checked on the relay with a call whose output has all arrived.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import ssl
from pathlib import Path
from typing import Any, cast

import grpc
from harness import free_port
from starlette.websockets import WebSocket

from multiverse.master.instances import SessionCall
from multiverse.master.server import Master, MasterConfig
from multiverse.master.sessions import relay
from multiverse.wire.v1 import multiverse_pb2 as pb

_EOF: object = grpc.aio.EOF  # type: ignore[attr-defined]  # missing from grpc-stubs


def _get_health(port: int, ca: Path) -> http.client.HTTPSConnection:
    """A kept-alive HTTPS connection to the API that has answered once."""
    context = ssl.create_default_context(cafile=str(ca))
    connection = http.client.HTTPSConnection("127.0.0.1", port, timeout=30, context=context)
    connection.request("GET", "/api/v1/health")
    response = connection.getresponse()
    assert response.status == 200, response.read()
    response.read()
    return connection


def test_the_api_turns_nagle_off_on_the_connections_it_accepts(tmp_path: Path) -> None:
    async def scenario() -> list[int]:
        port = free_port()
        master = Master(
            MasterConfig(
                data_dir=tmp_path / "master",
                listen=f"127.0.0.1:{free_port()}",
                api_listen=f"127.0.0.1:{port}",
            )
        )
        await master.start()
        connection = None
        try:
            ca = tmp_path / "master" / "pki" / "ca.crt"
            connection = await asyncio.to_thread(_get_health, port, ca)
            assert master._http is not None
            accepted = [
                protocol.transport.get_extra_info("socket")
                for protocol in master._http.server_state.connections
            ]
            return [sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) for sock in accepted]
        finally:
            if connection is not None:
                connection.close()
            await master.stop()

    options = asyncio.run(scenario())
    assert len(options) == 1  # the client's one kept-alive connection
    assert options[0] != 0


class _Call:
    """A session call whose output has all arrived: each read answers at once, as gRPC does
    for messages it holds already. ``cancelled`` makes the reads end as a call cancelled
    because the client went away does."""

    def __init__(self, outputs: list[pb.SessionOutput], cancelled: bool = False) -> None:
        self.outputs = outputs
        self.cancelled = cancelled

    async def read(self) -> object:
        if self.outputs:
            return self.outputs.pop(0)
        if self.cancelled:
            raise asyncio.CancelledError
        return _EOF

    async def write(self, _message: pb.SessionInput) -> None:
        pass

    def cancel(self) -> bool:
        return True


class _WebSocket:
    """The client's side: records what the relay sends; sends nothing itself."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.texts: list[str] = []
        self.closed = False

    async def receive(self) -> dict[str, Any]:
        await asyncio.Event().wait()  # the client types nothing
        raise AssertionError("unreachable")

    async def send_bytes(self, data: bytes) -> None:
        self.frames.append(data)

    async def send_text(self, text: str) -> None:
        self.texts.append(text)

    async def close(self) -> None:
        self.closed = True


def _relay(call: _Call) -> _WebSocket:
    websocket = _WebSocket()
    run = relay(cast(WebSocket, websocket), cast(SessionCall, call), "node")
    asyncio.run(asyncio.wait_for(run, timeout=30))  # a guard against a hang, not a measure
    return websocket


def test_output_that_has_arrived_goes_out_in_one_frame() -> None:
    pieces = [bytes([65 + i % 26]) for i in range(40)]  # a tty's echo: a byte a message
    outputs = [pb.SessionOutput(data=piece) for piece in pieces]
    websocket = _relay(_Call([*outputs, pb.SessionOutput(exit_code=3)]))

    assert b"".join(websocket.frames) == b"".join(pieces)
    assert len(websocket.frames) < len(pieces)  # one frame per message before
    assert [json.loads(text) for text in websocket.texts] == [{"type": "exit", "code": 3}]
    assert websocket.closed


def test_a_call_cancelled_under_the_relay_ends_it() -> None:
    # The client went away: its side cancelled the call, whose reads then raise CancelledError.
    websocket = _relay(_Call([pb.SessionOutput(data=b"last words")], cancelled=True))

    assert websocket.frames == [b"last words"]
    assert websocket.texts == []
    assert websocket.closed
