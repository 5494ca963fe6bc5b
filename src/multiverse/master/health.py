"""Host health: a node whose reports stop coming is NotReady after ``not_ready_after`` seconds
and Down after ``down_after``; a Down node's instances show as Unknown, never silently gone.

After a master (re)start every node is Unknown until it reports or its time runs out, counted
from the master's start: the master cannot know what happened while it was away.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import datetime, timedelta

from multiverse.core.model import InstanceState, NodeStatus
from multiverse.store.repository import Change, Store, now

log = logging.getLogger("multiverse.master")

# Statuses a silent node can age out of; Cordoned/Draining are marks set by people.
_AGING = {NodeStatus.READY, NodeStatus.JOINING, NodeStatus.UNKNOWN, NodeStatus.NOT_READY}


async def check_nodes(
    store: Store, not_ready_after: float, down_after: float, since: datetime
) -> tuple[list[tuple[str, NodeStatus]], list[Change]]:
    """Age silent nodes; returns (node name, new status) pairs and their instances' changes."""
    moment = now()
    transitions: list[tuple[str, NodeStatus]] = []
    changes: list[Change] = []
    if (moment - since).total_seconds() <= not_ready_after:
        return transitions, changes  # nobody can have been silent that long yet
    not_ready_since = moment - timedelta(seconds=not_ready_after)
    down_since = moment - timedelta(seconds=down_after)
    # Only the nodes whose silence may have grown into a new status.
    asked = {status: not_ready_since for status in _AGING} | {NodeStatus.NOT_READY: down_since}
    for node in await store.list_nodes(silent=asked):
        if node.status not in _AGING:
            continue
        heard = max(node.last_sync or since, since)
        silent = (moment - heard).total_seconds()
        status = node.status
        if silent > down_after:
            status = NodeStatus.DOWN
        elif silent > not_ready_after:
            status = NodeStatus.NOT_READY
        if status == node.status:
            continue
        await store.update_node(node.id, status=status)
        log.warning("node %s %s: no report for %.0fs", node.name, status.value, silent)
        transitions.append((node.name, status))
        if status == NodeStatus.DOWN:
            changes += await store.mark_node_instances(
                node.id, InstanceState.UNKNOWN, f"node {node.name} is Down"
            )
    return transitions, changes


async def watch_nodes(
    store: Store,
    not_ready_after: float,
    down_after: float,
    on_change: Callable[[list[tuple[str, NodeStatus]], list[Change]], None],
) -> None:
    since = now()
    while True:
        await asyncio.sleep(min(1.0, not_ready_after / 4))
        try:
            transitions, changes = await check_nodes(store, not_ready_after, down_after, since)
            if transitions or changes:
                on_change(transitions, changes)
        except Exception:  # keep watching whatever one round hit
            log.exception("health check failed")
