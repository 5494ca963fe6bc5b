"""grpc.aio's wake-ups, read as fast as they come.

grpc.aio hands completed operations (a message received, one sent) from its poller thread to
the event loop through a queue, and wakes the loop by writing one byte per operation to a
socket pair that the loop watches. The loop's reader takes one byte per call and drains the
queue. While the loop is busy with other work (a master answering a thousand API requests a
second), it makes few calls, so the bytes pile up; past a few hundred the socket is full, the
poller thread blocks on its (blocking) write, and from then on gRPC delivers one operation per
turn of the loop. Measured on a master of 1,000 nodes: the nodes' reports reached it 8-34 s
late, in bursts, and hundreds of healthy nodes were declared NotReady.

:func:`drain_wakeups` wraps that reader so that each call takes every byte waiting: the first
call drains the queue, the rest only read their byte (a lock and an empty check each).
"""

from __future__ import annotations

import array
import asyncio
import fcntl
import logging
import termios
from collections.abc import Callable
from typing import Any

log = logging.getLogger("multiverse.wire")

_READER = "_handle_events"  # PollerCompletionQueue's reader, as grpcio names it


def drain_wakeups(loop: asyncio.AbstractEventLoop) -> bool:
    """Make gRPC's wake-up reader on ``loop`` take all its bytes at each call; call it once
    gRPC is in use on the loop (a server or channel made). False when there is no such
    reader (another grpcio, another loop): gRPC then works as it came."""
    selector = getattr(loop, "_selector", None)
    if selector is None:
        return False
    for key in list(selector.get_map().values()):
        handle = key.data[0] if isinstance(key.data, tuple) and key.data else None
        callback = getattr(handle, "_callback", None)
        named = getattr(callback, "func", callback)  # grpcio registers a functools.partial
        if callback is None or getattr(named, "__name__", "") != _READER:
            continue
        args = getattr(handle, "_args", ())
        loop.remove_reader(key.fd)
        loop.add_reader(key.fd, _draining(key.fd, callback, args))
        return True
    log.debug("no gRPC wake-up reader found on the event loop")
    return False


def _draining(fd: int, reader: Callable[..., Any], args: tuple[Any, ...]) -> Callable[[], None]:
    def drain() -> None:
        waiting = array.array("i", [0])
        fcntl.ioctl(fd, termios.FIONREAD, waiting)
        for _ in range(max(waiting[0], 1)):
            reader(*args)

    return drain
