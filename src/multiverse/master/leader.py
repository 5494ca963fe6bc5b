"""Leadership among masters sharing one database: the singleton loops (reconciler, health)
run on the one master holding the store's leader lock (a PostgreSQL advisory lock; with SQLite
there is one master and it leads). A standby asks every ``interval`` seconds, so it takes over
within seconds of the leader's death, when PostgreSQL drops the dead leader's session and its
lock. The rest of the master does not know whether it leads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from multiverse.store.repository import Store

log = logging.getLogger("multiverse.master")

Loop = Callable[[], Coroutine[Any, Any, None]]


class Leadership:
    def __init__(
        self,
        store: Store,
        master_id: str,
        loops: list[Loop],
        *,
        api: str = "",
        cluster: str = "",
        interval: float = 1.0,
    ) -> None:
        self.store = store
        self.master_id = master_id
        self.loops = loops
        self.api = api
        self.cluster = cluster
        self.interval = interval
        self.leading = False
        self._tasks: list[asyncio.Task[None]] = []

    async def run(self) -> None:
        """Lead whenever the lock is ours, until cancelled (then the loops stop too)."""
        try:
            while True:
                try:
                    leading = await self.store.try_lead()
                    if leading != self.leading:
                        self._switch(leading)
                    await self.store.heartbeat_master(
                        self.master_id, self.api, self.cluster, self.leading
                    )
                except Exception:  # a database hiccup: ask again next time
                    log.exception("leader election round failed")
                await asyncio.sleep(self.interval)
        finally:
            await self._stop_loops()

    def _switch(self, leading: bool) -> None:
        self.leading = leading
        if leading:
            log.info("this master leads: reconciler and health checks run here")
            self._tasks = [asyncio.create_task(loop()) for loop in self.loops]
        else:
            log.warning("this master lost the lead: its reconciler and health checks stop")
            for task in self._tasks:
                task.cancel()
            self._tasks = []

    async def _stop_loops(self) -> None:
        for task in self._tasks:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
