"""Host health: a node whose reports stop coming is NotReady after ``threshold`` seconds.

Its instances keep their last known state; the API shows the node's status and last sync, so
nobody mistakes stale data for fresh.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta

from multiverse.core.model import NodeStatus
from multiverse.store.repository import Store, now

log = logging.getLogger("multiverse.master")


def mark_stale_nodes(store: Store, threshold: float) -> list[str]:
    """Mark nodes silent for longer than ``threshold`` seconds NotReady; returns their names."""
    limit = now() - timedelta(seconds=threshold)
    stale = []
    for node in store.list_nodes():
        if node.status in (NodeStatus.READY, NodeStatus.JOINING) and (
            node.last_sync is None or node.last_sync < limit
        ):
            store.update_node(node.id, status=NodeStatus.NOT_READY)
            log.warning("node %s NotReady: no report since %s", node.name, node.last_sync)
            stale.append(node.name)
    return stale


async def watch_nodes(store: Store, threshold: float) -> None:
    while True:
        await asyncio.sleep(min(1.0, threshold / 4))
        try:
            mark_stale_nodes(store, threshold)
        except Exception:  # keep watching whatever one round hit
            log.exception("health check failed")
