"""The master's part of a shell or ``exec -t``: a WebSocket on one side, gRPC on the other.

The relay: the CLI opens its sessions straight on the node's agent when it can reach it
(worker/sessions.py, with a ticket the master asked for), and comes here when it cannot; the
web UI's terminal always comes here. Frames as core/sessions.py defines them. Each side awaits
the other's flow control, so a slow reader slows the writer and nothing piles up in the master
beyond a few messages read ahead.

Output the agent sent while the WebSocket was busy goes out as one binary frame (up to
:data:`MAX_FRAME` bytes), not as one frame per gRPC message: a burst of small pieces (a
terminal's redraw, a tty's echo) costs one frame, one TLS record and one write.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import cast

import grpc
from starlette.websockets import WebSocket, WebSocketDisconnect

from multiverse.core.errors import MultiverseError
from multiverse.core.sessions import MAX_FRAME, Resize, error_frame, exit_frame, parse_control
from multiverse.master.instances import SessionCall
from multiverse.wire import convert
from multiverse.wire.v1 import multiverse_pb2 as pb

_EOF: object = grpc.aio.EOF  # type: ignore[attr-defined]  # missing from grpc-stubs
READ_AHEAD = 16  # gRPC messages (each at most a read of the session) waiting for the WebSocket

# What the reader hands the relay: a pb.SessionOutput, the call's grpc.aio.AioRpcError, or
# _EOF at its end (an object of grpc's: hence no narrower type).
_Item = object


def _control(text: str) -> pb.SessionInput | None:
    """The gRPC input for a client control frame; None for frames we do not know."""
    control = parse_control(text)
    if control is None:
        return None
    if isinstance(control, Resize):
        return pb.SessionInput(resize=pb.TerminalSize(cols=control.cols, rows=control.rows))
    return pb.SessionInput(eof=True)


async def _upstream(websocket: WebSocket, call: SessionCall) -> None:
    """Client -> agent, until the client goes; its going ends the session."""
    try:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                break
            if message.get("bytes") is not None:
                await call.write(pb.SessionInput(data=message["bytes"]))
            elif message.get("text") is not None and (control := _control(message["text"])):
                await call.write(control)
    except (WebSocketDisconnect, grpc.aio.AioRpcError, asyncio.InvalidStateError):
        pass
    call.cancel()


class _ReadAhead:
    """The agent's output, read ahead of the WebSocket: at most READ_AHEAD messages held (then
    the call is not read, and gRPC's flow control holds the agent back). Its end, however it
    comes (EOF, the call's error, the call cancelled because the client went), always reaches
    the relay as a last item: _EOF or the error."""

    def __init__(self, call: SessionCall) -> None:
        self._items: asyncio.Queue[_Item] = asyncio.Queue()  # bounded by _room, not here
        self._room = asyncio.Semaphore(READ_AHEAD)
        self._task = asyncio.create_task(self._read(call))

    async def _read(self, call: SessionCall) -> None:
        end: _Item = _EOF
        try:
            while True:
                await self._room.acquire()
                received = await call.read()
                if received is _EOF:
                    break
                self._items.put_nowait(received)
        except grpc.aio.AioRpcError as exc:
            end = exc
        finally:
            self._items.put_nowait(end)  # unbounded: the end is never refused

    async def get(self) -> _Item:
        item = await self._items.get()
        self._room.release()
        return item

    def get_ready(self) -> _Item | None:
        """The next item if it has arrived already, else None."""
        try:
            item = self._items.get_nowait()
        except asyncio.QueueEmpty:
            return None
        self._room.release()
        return item

    def close(self) -> None:
        self._task.cancel()

    def take_frame(self, first: pb.SessionOutput) -> tuple[bytes, _Item | None]:
        """``first``'s bytes joined with those of the data messages that arrived behind it (up
        to MAX_FRAME), and the first other item taken on the way, if any."""
        parts, size = [first.data], len(first.data)
        while size < MAX_FRAME and (item := self.get_ready()) is not None:
            if not (isinstance(item, pb.SessionOutput) and item.WhichOneof("kind") == "data"):
                return b"".join(parts), item
            parts.append(item.data)
            size += len(item.data)
        return b"".join(parts), None


async def relay(websocket: WebSocket, call: SessionCall, node_name: str) -> None:
    upstream = asyncio.create_task(_upstream(websocket, call))
    outputs = _ReadAhead(call)
    final: str | None = None
    try:
        held: _Item | None = None  # taken from the queue while joining a frame, not sent yet
        while True:
            item, held = (held if held is not None else await outputs.get()), None
            if item is _EOF:
                break
            if isinstance(item, grpc.aio.AioRpcError):
                raise item
            output = cast(pb.SessionOutput, item)
            if output.WhichOneof("kind") == "data":
                frame, held = outputs.take_frame(output)
                await websocket.send_bytes(frame)
            else:
                # The last message: done here, without waiting for the call's status. The
                # agent holds the call open until we go (see its Session), for a write of
                # ours that met a finished call would fail the call on this side, and grpc
                # then drops what it had not handed us yet: the exit code, at times.
                final = exit_frame(output.exit_code)
                break
    except grpc.aio.AioRpcError as exc:
        if exc.code() != grpc.StatusCode.CANCELLED:
            error: MultiverseError = convert.error_from_rpc(exc, node_name)
            final = error_frame(error.code, error.message)
    except (WebSocketDisconnect, RuntimeError):
        pass  # the client went away; cancelling the call ends the session on the node
    finally:
        upstream.cancel()
        outputs.close()
        call.cancel()
        with contextlib.suppress(Exception):
            if final is not None:
                await websocket.send_text(final)
            await websocket.close()
