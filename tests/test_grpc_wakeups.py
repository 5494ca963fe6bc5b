"""grpc.aio's wake-ups are read all at once (wire/aio.py)."""

from __future__ import annotations

import asyncio
import socket

import grpc

from multiverse.wire import aio


def test_each_turn_reads_every_waiting_wakeup() -> None:
    """grpcio's reader takes one byte a call; wrapped, one turn of the loop calls it once for
    each byte waiting, so the poller thread never finds the socket full."""
    reader_end, writer_end = socket.socketpair()
    reader_end.setblocking(False)
    calls: list[int] = []

    def grpc_reader(tag: int) -> None:  # as grpcio's: one byte, then its queue
        reader_end.recv(1)
        calls.append(tag)

    try:
        drain = aio._draining(reader_end.fileno(), grpc_reader, (7,))
        writer_end.send(b"x" * 300)
        drain()
        assert calls == [7] * 300
        writer_end.send(b"x")
        drain()
        assert len(calls) == 301
    finally:
        reader_end.close()
        writer_end.close()


def test_the_reader_of_a_real_grpc_server_is_found_and_wrapped_once() -> None:
    """Guards the grpcio this runs with: its reader is where the wrapper looks for it, and a
    call answers through the wrapped reader."""

    async def scenario() -> None:
        async def echo(request: bytes, context: object) -> bytes:
            return request

        def same(data: bytes) -> bytes:
            return data

        handler = grpc.method_handlers_generic_handler(
            "t.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo, same, same)}
        )
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((handler,))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            loop = asyncio.get_running_loop()
            assert aio.drain_wakeups(loop)
            assert not aio.drain_wakeups(loop)  # wrapped already: left as it is
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                call = channel.unary_unary("/t.Echo/Echo", same, same)
                assert await asyncio.gather(*(call(b"%d" % n) for n in range(50))) == [
                    b"%d" % n for n in range(50)
                ]
        finally:
            await server.stop(None)

    asyncio.run(scenario())
