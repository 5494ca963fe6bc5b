"""Lifecycle events, fanned out to listeners (the events WebSocket, operations, metrics).

Each listener has a bounded queue; one that falls behind is dropped rather than ever slowing
the master (it sees its stream end and may reconnect).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

log = logging.getLogger("multiverse.master")

Event = dict[str, Any]
QUEUE_SIZE = 1000


@dataclass(eq=False)
class _Waiter:
    about: Callable[[Event], bool] | None  # None: every event may matter
    wake: asyncio.Event = field(default_factory=asyncio.Event)


class EventBus:
    def __init__(self) -> None:
        self._listeners: set[asyncio.Queue[Event | None]] = set()
        self._waiters: set[_Waiter] = set()  # woken by any event their filter accepts
        self._keyed: dict[str, set[_Waiter]] = {}  # woken only by events with this "id"

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
        key = event.get("id")
        keyed = self._keyed.get(key, ()) if isinstance(key, str) else ()
        for waiter in (*self._waiters, *keyed):
            if waiter.about is None or waiter.about(event):
                waiter.wake.set()

    async def wait_for(
        self,
        predicate: Callable[[], Awaitable[bool]],
        timeout: float,
        *,
        keys: Collection[str] | None = None,
        about: Callable[[Event], bool] | None = None,
        recheck: float = 1.0,
    ) -> bool:
        """Wait until ``await predicate()`` holds, checking it after every event ``about``
        accepts (every event when None) among those whose id is one of ``keys`` (any id
        when None), and every ``recheck`` seconds, for changes that raise no event (time
        passing); False on timeout.

        ``keys`` and ``about`` are what keep many waiters cheap: a thousand launches waiting
        for Running would otherwise each read the store on every event of every other one,
        and with ``keys`` an event is not even shown to the waiters of other instances."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        waiter = _Waiter(about)
        keyed = [(key, self._keyed.setdefault(key, set())) for key in dict.fromkeys(keys or ())]
        for waiters in [waiters for _, waiters in keyed] if keys is not None else [self._waiters]:
            waiters.add(waiter)
        try:
            while True:
                waiter.wake.clear()  # before the check: an event during it wakes the wait
                if await predicate():
                    return True
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return False
                # In this task (asyncio.wait_for ran the wait in a task of its own, one per
                # check of every waiting operation).
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(remaining, recheck)):
                        await waiter.wake.wait()
        finally:
            self._waiters.discard(waiter)
            for key, waiters in keyed:
                waiters.discard(waiter)
                if not waiters:  # the last waiter of an id takes its entry with it
                    del self._keyed[key]

    async def listen(self) -> AsyncIterator[Event]:
        """Events from now on, until the listener is dropped for being slow."""
        queue: asyncio.Queue[Event | None] = asyncio.Queue(QUEUE_SIZE)
        self._listeners.add(queue)
        try:
            while (event := await queue.get()) is not None:
                yield event
        finally:
            self._listeners.discard(queue)
