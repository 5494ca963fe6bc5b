"""Host health over time: the clock is the test's, the store is a real SQLite file."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from pathlib import Path

from multiverse.core.model import Node, NodeStatus, Resources
from multiverse.master.health import watch_nodes
from multiverse.store.repository import Change, Store, now


def test_a_master_that_was_away_counts_silence_from_its_return(tmp_path: Path) -> None:
    """A paused VM (24 s here) made every node look silent: 923 of 1,000 went NotReady at
    once. Silence now counts from the master's return, as after a start; a node that stays
    silent after that is NotReady all the same."""

    async def scenario() -> None:
        store = Store.for_data_dir(tmp_path)
        store.migrate()
        start = now()
        for name in ("a", "b"):
            node = Node(name, name, "127.0.0.1:1", "fake", NodeStatus.READY, {},
                        Resources(4, 4 << 30, 40 << 30))  # fmt: skip
            await store.add_node(node, "")
            await store.update_node(name, last_sync=start)
        # Checks every 0.2 s (a timeout of 0.8 s); the third comes after a pause of 1.6 s.
        ticks = [0.0, 0.2, 0.4, 2.0, 2.2, 2.4, 3.0, 3.2]
        seen: list[tuple[int, list[tuple[str, NodeStatus]]]] = []
        at = 0

        def clock() -> datetime:
            nonlocal at
            moment = start + timedelta(seconds=ticks[min(at, len(ticks) - 1)])
            at += 1
            return moment

        def changed(transitions: list[tuple[str, NodeStatus]], _: list[Change]) -> None:
            seen.append((at - 1, transitions))

        watch = asyncio.create_task(watch_nodes(store, 0.8, 60.0, changed, clock=clock))
        try:
            while at < len(ticks) + 1:
                await asyncio.sleep(0.05)
        finally:
            watch.cancel()
            store.close()
        # Nothing at the return (2.0 s, silent 2 s by the wall); NotReady at 3.0 s, silent
        # 1.0 s since the return.
        assert seen == [(6, [("a", NodeStatus.NOT_READY), ("b", NodeStatus.NOT_READY)])]

    asyncio.run(scenario())
