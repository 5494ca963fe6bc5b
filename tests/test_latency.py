"""What keeps a call fast, checked as behaviour (never with a clock): issue 18.

An exec through the API cost ~40 ms more than its work: the master's API connections kept
Nagle on, so each small write of a response (headers, a chunk, the chunked end) waited for the
client's delayed ACK. The check here is on the socket the master's own server accepted.

A shell's output that reached the master while its WebSocket was busy goes out as one frame,
not one per gRPC message: checked on the relay with a call whose output has all arrived.

A shell's bytes go straight from the CLI to the node's agent: Nagle is off on both ends of
that connection too.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import ssl
import uuid
from pathlib import Path
from typing import Any, cast

import grpc
import websockets
from harness import free_port
from starlette.websockets import WebSocket

from multiverse.core.sessions import AGENT_SESSION_PATH, EOF_FRAME, exit_frame
from multiverse.drivers.base import Session
from multiverse.master.instances import SessionCall
from multiverse.master.server import Master, MasterConfig
from multiverse.master.sessions import relay
from multiverse.wire import pki
from multiverse.wire.v1 import multiverse_pb2 as pb
from multiverse.worker.sessions import NodeTLS, SessionServer, SessionTickets, Ticket

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


class _Echo:
    """A session that echoes its input and ends with code 0 at end of input."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()
        self.closed = False

    async def read(self) -> bytes:
        return await self.queue.get()

    async def write(self, data: bytes) -> None:
        self.queue.put_nowait(data)

    async def close_input(self) -> None:
        self.queue.put_nowait(b"")

    async def resize(self, cols: int, rows: int) -> None:
        pass

    async def wait(self) -> int:
        return 0

    async def close(self) -> None:
        self.closed = True


def _node_pki(ca: pki.ClusterCA, directory: Path, node_id: str) -> pki.CertKey:
    key_pem, csr_pem = pki.new_key_and_csr("node-a")
    cert = pki.CertKey(pki.sign_node_csr(ca, csr_pem, node_id, "node-a"), key_pem)
    cert.save(directory, "node")
    return cert


def test_the_agents_session_endpoint_turns_nagle_off_and_serves_a_renewed_cert(
    tmp_path: Path,
) -> None:
    """Both ends of a direct session have Nagle off; after a renewal rewrote the node's
    certificate, a new connection gets the new one without restarting the endpoint."""
    node_id = str(uuid.uuid4())
    ca = pki.ClusterCA.create()
    current = [_node_pki(ca, tmp_path, node_id)]
    tickets = SessionTickets()
    echoes: list[_Echo] = []

    async def open_session(_ticket: Ticket) -> Session:
        echoes.append(_Echo())
        return echoes[-1]

    async def session(server: SessionServer) -> tuple[int, int, bytes, str]:
        secret = tickets.issue("vm-1", (), None)
        async with websockets.connect(
            f"wss://127.0.0.1:{server.port}{AGENT_SESSION_PATH}vm-1",
            ssl=ssl.create_default_context(cadata=ca.cert_pem.decode()),
            server_hostname=pki.node_server_name(node_id),
            additional_headers={"Authorization": f"Bearer {secret}"},
        ) as ws:
            ours = ws.transport.get_extra_info("socket")
            peer_cert = ws.transport.get_extra_info("ssl_object").getpeercert(binary_form=True)
            await ws.send(b"typed")
            echoed = await ws.recv()
            assert server._server is not None
            (theirs,) = [
                c.transport.get_extra_info("socket")
                for c in server._server.connections
                if c.remote_address == ours.getsockname()
            ]
            options = (
                ours.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY),
                theirs.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY),
            )
            await ws.send(EOF_FRAME)
            last = await ws.recv()
            assert last == exit_frame(0)
            return *options, echoed if isinstance(echoed, bytes) else b"", pki.serial_of(peer_cert)

    async def scenario() -> list[tuple[int, int, bytes, str]]:
        server = SessionServer(tickets, open_session)
        await server.start("127.0.0.1", 0, NodeTLS(tmp_path, lambda: current[0]))
        try:
            first = await session(server)
            current[0] = _node_pki(ca, tmp_path, node_id)  # as a renewal does
            return [first, await session(server)]
        finally:
            await server.close()

    (client1, server1, echoed1, serial1), (_, _, echoed2, serial2) = asyncio.run(scenario())
    assert client1 != 0 and server1 != 0
    assert echoed1 == echoed2 == b"typed"
    assert serial2 == pki.serial_of(current[0].cert_pem) != serial1
    assert all(echo.closed for echo in echoes)
