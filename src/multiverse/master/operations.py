"""Operations: long actions (launch, start, stop, delete, drain, evacuate) as trackable objects.

An API call that starts one answers at once with its id; ``GET /api/v1/operations/{id}`` tells
how it is going and ``.../wait?timeout=`` waits for its end. Kept in memory, as LXD does: after
a master restart the instances' own states tell the rest.

The table is bounded by count and by age: finished operations are kept for lookups for
``keep_for`` seconds, and beyond ``keep`` operations the oldest go first, finished ones before
running ones, so that one that never ends (a drain waiting on a node that is gone) cannot pin
the table. A running operation dropped from it keeps running; only its lookup is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from multiverse.core.errors import MultiverseError, NotFound
from multiverse.master.events import EventBus

KEEP = 1000  # operations kept for lookups at most
KEEP_FOR = 3600.0  # seconds a finished operation stays for lookups
SWEEP_EVERY = 1.0  # seconds between looks for expired operations (one may linger that long)


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


@dataclass
class Progress:
    """How far a long operation got (bytes of an import or a pull), for progress bars."""

    stage: str = ""
    done: int = 0
    total: int = 0  # 0 while unknown

    def advance_to(self, done: int) -> None:
        self.done = done

    def json(self) -> dict[str, Any]:
        return {"stage": self.stage, "done": self.done, "total": self.total}


@dataclass
class Operation:
    id: str
    kind: str
    target: str
    status: str = "running"  # running | success | failure
    error: str = ""
    created_at: str = field(default_factory=_now)
    updated_at: str = field(default_factory=_now)
    result: Any = None
    progress: list[str] = field(default_factory=list)  # one line per step, as it goes
    transfer: Progress | None = None  # bytes moved, for imports and pulls
    # How far it is in numbers, asked at each lookup (a move's phase and bytes sent).
    figures: Callable[[], Any] | None = field(default=None, repr=False)
    done: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    ended: float = field(default=0.0, repr=False)  # on the registry's clock, once done

    def json(self) -> dict[str, Any]:
        return {
            "id": self.id, "kind": self.kind, "target": self.target, "status": self.status,
            "error": self.error, "created_at": self.created_at, "updated_at": self.updated_at,
            "result": self.result, "progress": list(self.progress),
            "transfer": self.transfer.json() if self.transfer else None,
            "figures": self.figures() if self.figures else None,
        }  # fmt: skip


class Operations:
    def __init__(
        self,
        events: EventBus,
        *,
        keep: int = KEEP,
        keep_for: float = KEEP_FOR,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.events = events
        self.keep = keep
        self.keep_for = keep_for
        self._clock = clock
        self._operations: dict[str, Operation] = {}  # oldest first
        self._swept = clock()
        self._tasks: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self._operations)

    def _prune(self) -> None:
        """Runs at every start, so it must not walk the table each time: a sweep of the table
        once a second drops the expired (a launch storm starts hundreds a second, and walking
        1,000 operations for each was a tenth of the master's loop), and past ``keep`` the
        oldest go, found from the old end (finished ones first, then running ones)."""
        moment = self._clock()
        if moment - self._swept >= SWEEP_EVERY:
            self._swept = moment
            for operation in [
                op for op in self._operations.values()
                if op.done.is_set() and moment - op.ended >= self.keep_for
            ]:  # fmt: skip
                del self._operations[operation.id]
        excess = len(self._operations) - self.keep
        if excess <= 0:
            return
        table = self._operations.values()
        oldest = list(itertools.islice((op for op in table if op.done.is_set()), excess))
        running = (op for op in table if not op.done.is_set())
        oldest += itertools.islice(running, excess - len(oldest))
        for operation in oldest:
            del self._operations[operation.id]

    def start(
        self,
        kind: str,
        target: str,
        work: Coroutine[Any, Any, Any],
        progress: list[str] | None = None,
        transfer: Progress | None = None,
    ) -> Operation:
        """Run ``work`` as an operation; ``progress`` is the list ``work`` appends its steps to."""
        operation = Operation(str(uuid.uuid4()), kind, target, transfer=transfer)
        if progress is not None:
            operation.progress = progress
        self._operations[operation.id] = operation
        self._prune()
        task = asyncio.create_task(self._run(operation, work))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return operation

    async def _run(self, operation: Operation, work: Coroutine[Any, Any, Any]) -> None:
        try:
            operation.result = await work
            operation.status = "success"
        except MultiverseError as exc:
            operation.status, operation.error = "failure", exc.message
        except Exception as exc:  # a bug must still end the operation, not hang its waiters
            operation.status, operation.error = "failure", f"{type(exc).__name__}: {exc}"
        operation.updated_at = _now()
        operation.ended = self._clock()
        operation.done.set()
        self.events.publish(
            "operation", id=operation.id, action=operation.kind, target=operation.target,
            status=operation.status, error=operation.error,
        )  # fmt: skip

    def get(self, operation_id: str) -> Operation:
        try:
            return self._operations[operation_id]
        except KeyError:
            raise NotFound(f"operation {operation_id} does not exist") from None

    async def wait(self, operation_id: str, timeout: float) -> Operation:
        operation = self.get(operation_id)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(operation.done.wait(), timeout)
        return operation

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
