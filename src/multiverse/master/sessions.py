"""The master's part of a shell or ``exec -t``: a WebSocket on one side, gRPC on the other.

Frames on the WebSocket: binary frames carry the bytes, both ways; text frames carry JSON
control messages: from the client ``{"type": "resize", "cols", "rows"}`` and
``{"type": "eof"}``; to the client ``{"type": "exit", "code"}`` (last) or
``{"type": "error", "code", "message"}``. Each side awaits the other's flow control, so a slow
reader slows the writer and nothing piles up in the master.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any, cast

import grpc
from starlette.websockets import WebSocket, WebSocketDisconnect

from multiverse.core.errors import MultiverseError
from multiverse.master.instances import SessionCall
from multiverse.wire import convert
from multiverse.wire.v1 import multiverse_pb2 as pb

_EOF: object = grpc.aio.EOF  # type: ignore[attr-defined]  # missing from grpc-stubs
MAX_TERMINAL = 10000  # rows or columns; more is a bug or an attack, not a terminal


def _control(text: str) -> pb.SessionInput | None:
    """The gRPC input for a client control frame; None for frames we do not know."""
    try:
        message: dict[str, Any] = json.loads(text)
        kind = message.get("type")
        if kind == "resize":
            cols, rows = int(message["cols"]), int(message["rows"])
            if 0 < cols <= MAX_TERMINAL and 0 < rows <= MAX_TERMINAL:
                return pb.SessionInput(resize=pb.TerminalSize(cols=cols, rows=rows))
        elif kind == "eof":
            return pb.SessionInput(eof=True)
    except (ValueError, KeyError, TypeError, AttributeError):
        pass
    return None


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


async def relay(websocket: WebSocket, call: SessionCall, node_name: str) -> None:
    upstream = asyncio.create_task(_upstream(websocket, call))
    final: dict[str, Any] | None = None
    try:
        while (received := await call.read()) is not _EOF:
            output = cast(pb.SessionOutput, received)
            if output.WhichOneof("kind") == "data":
                await websocket.send_bytes(output.data)
            else:
                final = {"type": "exit", "code": output.exit_code}
    except grpc.aio.AioRpcError as exc:
        if exc.code() != grpc.StatusCode.CANCELLED:
            error: MultiverseError = convert.error_from_rpc(exc, node_name)
            final = {"type": "error", "code": error.code, "message": error.message}
    except (WebSocketDisconnect, RuntimeError):
        pass  # the client went away; cancelling the call ends the session on the node
    finally:
        upstream.cancel()
        call.cancel()
        with contextlib.suppress(Exception):
            if final is not None:
                await websocket.send_text(json.dumps(final))
            await websocket.close()
