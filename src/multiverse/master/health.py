"""Host health: a node whose reports stop coming is NotReady after ``not_ready_after`` seconds
and Down after ``down_after``; a Down node's instances show as Unknown, never silently gone.

After a master (re)start every node is Unknown until it reports or its time runs out, counted
from the master's start: the master cannot know what happened while it was away. The same
holds when the master finds it was away without stopping (paused, asleep): silence counts
again from when it is back.
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
    store: Store,
    not_ready_after: float,
    down_after: float,
    since: datetime,
    moment: datetime | None = None,
) -> tuple[list[tuple[str, NodeStatus]], list[Change]]:
    """Age silent nodes, as of ``moment`` (now); returns (node name, new status) pairs and
    their instances' changes."""
    moment = moment or now()
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
    clock: Callable[[], datetime] = now,
) -> None:
    period = min(1.0, not_ready_after / 4)
    since = last = clock()
    while True:
        await asyncio.sleep(period)
        moment = clock()
        away = (moment - last).total_seconds() - period
        if away > not_ready_after / 2:
            # The master itself was away (its VM paused, its host asleep, its loop stuck):
            # nobody could be heard meanwhile, so silence counts from now, as after a start.
            # A VM paused for 24 s made 923 of 1,000 healthy nodes NotReady at once.
            log.warning("the master was away for %.0fs: nodes' silence counts from now", away)
            since = moment
        last = moment
        try:
            transitions, changes = await check_nodes(
                store, not_ready_after, down_after, since, moment
            )
            if transitions or changes:
                on_change(transitions, changes)
        except Exception:  # keep watching whatever one round hit
            log.exception("health check failed")
