"""Lifecycle events, fanned out to listeners (the events WebSocket, operations, metrics).

Each listener has a bounded queue; one that falls behind is dropped rather than ever slowing
the master (it sees its stream end and may reconnect).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

log = logging.getLogger("multiverse.master")

Event = dict[str, Any]
QUEUE_SIZE = 1000


class EventBus:
    def __init__(self) -> None:
        self._listeners: set[asyncio.Queue[Event | None]] = set()
        self._tick = asyncio.Event()  # set (and replaced) on every event: wakes wait_for()

    def publish(self, kind: str, **fields: Any) -> None:
        event = {"type": kind, "time": datetime.now(UTC).isoformat().replace("+00:00", "Z")}
        event.update(fields)
        for queue in list(self._listeners):
            try:
                queue.put_nowait(event)
            except asyncio.QueueFull:
                self._listeners.discard(queue)
                queue.get_nowait()  # room for the end mark
                queue.put_nowait(None)
                log.warning("dropped a slow event listener")
        tick, self._tick = self._tick, asyncio.Event()
        tick.set()

    async def wait_for(self, predicate: Callable[[], Awaitable[bool]], timeout: float) -> bool:
        """Wait until ``await predicate()`` holds, checking it after every event; False on
        timeout."""
        deadline = asyncio.get_running_loop().time() + timeout
        while not await predicate():
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                return False
            tick = self._tick
            with contextlib.suppress(TimeoutError):
                # Also re-check now and then: some changes (e.g. time passing) raise no event.
                await asyncio.wait_for(tick.wait(), min(remaining, 1.0))
        return True

    async def listen(self) -> AsyncIterator[Event]:
        """Events from now on, until the listener is dropped for being slow."""
        queue: asyncio.Queue[Event | None] = asyncio.Queue(QUEUE_SIZE)
        self._listeners.add(queue)
        try:
            while (event := await queue.get()) is not None:
                yield event
        finally:
            self._listeners.discard(queue)
