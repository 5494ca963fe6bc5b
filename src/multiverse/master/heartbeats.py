"""Reports that change no instance, written for many nodes at once.

A thousand nodes reporting every five seconds are two hundred reports a second, nearly all of
them saying only "still here, using this much". Taken one by one, each was a transaction of
its own (the node's row, its instances, its images: ~2 ms of the master's CPU), 40% of a core
before anybody launched anything. Such a report is now answered from memory and its figures
join the next batch, written once a second in one transaction; anything else (an instance
changed, images changed, a node this master has not taken a whole report from, or one whose
status changed meanwhile) still goes through :meth:`Store.take_report` on its own.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from multiverse.core.model import NodeStatus, Resources, Usage
from multiverse.store.repository import Heartbeat, ReportTaken, Store, now

log = logging.getLogger("multiverse.master")

FLUSH_INTERVAL = 1.0  # seconds between batches: far below any node timeout


@dataclass(frozen=True)
class _Known:
    """What the last whole report of a node left in the store."""

    name: str
    network_mode: str
    images: frozenset[str]


class Heartbeats:
    def __init__(self, store: Store) -> None:
        self.store = store
        self._known: dict[str, _Known] = {}
        self._beats: dict[str, Heartbeat] = {}

    def take(
        self, node_id: str, capacity: Resources, used: Usage, images: frozenset[str]
    ) -> ReportTaken | None:
        """The report taken into the next batch, or None when it must be taken whole."""
        known = self._known.get(node_id)
        if known is None or known.images != images:
            return None
        self._beats[node_id] = Heartbeat(at=now(), capacity=capacity, used=used)
        return ReportTaken(known.name, NodeStatus.READY, known.network_mode, [])

    def taken_whole(self, node_id: str, taken: ReportTaken, images: frozenset[str]) -> None:
        """A whole report went to the store: the node is Ready with these images there."""
        self._known[node_id] = _Known(taken.name, taken.network_mode, images)
        # A beat still waiting is older than what was just written.
        self._beats.pop(node_id, None)

    def images(self, node_id: str) -> frozenset[str] | None:
        """The node's images as its last whole report left them in the store (None: none
        taken since it joined)."""
        known = self._known.get(node_id)
        return known.images if known is not None else None

    def forget(self, node_id: str) -> None:
        self._known.pop(node_id, None)
        self._beats.pop(node_id, None)

    async def flush(self) -> None:
        beats, self._beats = self._beats, {}
        try:
            stale = await self.store.take_heartbeats(beats)
        except BaseException:
            # Into the next batch, unless a newer beat or a whole report came meanwhile.
            self._beats = {**beats, **self._beats}
            raise
        for node_id in stale:
            self._known.pop(node_id, None)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL)
            try:
                await self.flush()
            except Exception:
                log.exception("writing %d nodes' reports failed; trying again", len(self._beats))
