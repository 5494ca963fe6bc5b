"""What keeps a call fast, checked as behaviour (never with a clock): issue 18.

An exec through the API cost ~40 ms more than its work: the master's API connections kept
Nagle on, so each small write of a response (headers, a chunk, the chunked end) waited for the
client's delayed ACK. The check here is on the socket the master's own server accepted.
"""

from __future__ import annotations

import asyncio
import http.client
import socket
import ssl
from pathlib import Path

from harness import free_port

from multiverse.master.server import Master, MasterConfig


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
