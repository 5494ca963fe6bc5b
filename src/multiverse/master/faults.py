"""Faults in force (issue 19): kept in the store, pushed to the nodes, healed on time.

The store is the truth: a restarted master reads the faults back, sends every node its part
with each sync acknowledgement (so a restarted worker gets them back too), and heals each one
when its ``duration`` is over. Adding a fault pushes it to the nodes at once and answers only
when they applied it; a node that refuses it makes the whole fault undone, so bad input or a
node that cannot do it leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime

from multiverse.core.errors import InvalidArgument, MultiverseError, NotFound
from multiverse.core.faults import (
    Fault,
    FaultKind,
    NodeFaults,
    Placement,
    check_fault,
    node_faults,
    resolve_sides,
)
from multiverse.core.model import Instance, NodeStatus
from multiverse.master.cluster import Agents
from multiverse.master.events import EventBus
from multiverse.store.repository import Store
from multiverse.wire import convert

__all__ = ["Faults"]

log = logging.getLogger("multiverse.master")

_NETWORK_KINDS = (FaultKind.PARTITION, FaultKind.LINK)
# Seconds the acknowledgements' view of the faults and of where instances run is kept.
ACK_VIEW_MAX_AGE = 1.0


def _placements(instances: list[Instance]) -> dict[str, Placement]:
    return {i.name: Placement(i.id, i.node_id, i.address) for i in instances}


class Faults:
    """Add, list, heal and expire faults; ``run()`` is the expiry loop."""

    def __init__(self, store: Store, agents: Agents, events: EventBus) -> None:
        self.store = store
        self.agents = agents
        self.events = events
        # Nodes ignore a plan older than the last they applied: a restarted master starts later.
        self.generation = time.time_ns()
        self._placed: dict[str, Placement] = {}  # where the instances run, as of _placed_at
        self._placed_at = -float("inf")
        self._listed: list[Fault] = []  # the faults in force, as of _listed_at (_recent)
        self._listed_at = -float("inf")
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()

    async def placements(self) -> dict[str, Placement]:
        return _placements(await self.store.list_instances())

    async def plan_for(self, node_id: str) -> NodeFaults:
        """This node's part of the faults in force; sent with every sync acknowledgement
        (so the instances are read only while there are faults, and then at most once a
        second for all the nodes' acknowledgements: a thousand nodes report every few
        seconds, and where an instance runs changes far less often)."""
        faults = await self._recent()
        if not faults:
            return node_faults(faults, {}, node_id, self.generation)
        if time.monotonic() - self._placed_at > ACK_VIEW_MAX_AGE:
            self._placed, self._placed_at = await self.placements(), time.monotonic()
        return node_faults(faults, self._placed, node_id, self.generation)

    async def _recent(self) -> list[Fault]:
        """The faults in force as of at most a second ago (or of this master's last change to
        them): the acknowledgements' reads, two hundred a second at a thousand nodes."""
        if time.monotonic() - self._listed_at > ACK_VIEW_MAX_AGE:
            self._listed, self._listed_at = await self.store.list_faults(), time.monotonic()
        return self._listed

    async def in_force(self) -> list[Fault]:
        return await self.store.list_faults()

    async def add(
        self, kind: FaultKind, targets: tuple[str, ...], peers: tuple[str, ...] = (),
        params: Mapping[str, str] | None = None, *, one_way: bool = False,
        duration: float | None = None,
    ) -> Fault:  # fmt: skip
        instances = await self.store.list_instances()
        placements = _placements(instances)
        self._placed, self._placed_at = placements, time.monotonic()  # acks agree with the push
        # Selectors (env:NAME, KEY=VALUE) become names now; the fault keeps the names.
        labels = {i.name: i.spec.labels for i in instances}
        targets, peers = resolve_sides(targets, peers, labels)
        fault = check_fault(
            Fault(
                id=uuid.uuid4().hex[:8], kind=kind, targets=targets, peers=peers,
                params=dict(params or {}), one_way=one_way, started_at=datetime.now(UTC),
                duration=duration,
            ),
            placements,
        )  # fmt: skip
        if kind in _NETWORK_KINDS:
            off = sorted(n for n in {*targets, *peers} if not placements[n].address)
            if off:
                raise InvalidArgument(
                    f"not on the cluster network (user-mode networking): {', '.join(off)}"
                )
        for name in {*targets, *peers}:
            if placements[name].node_id is None:
                raise InvalidArgument(f"instance {name} is not placed on a node yet")
        async with self._lock:
            await self.store.add_fault(fault)
            try:
                await self._push(fault)
            except MultiverseError:
                await self.store.remove_fault(fault.id)
                await self._push(None)  # whatever part some node applied goes away
                raise
        self.events.publish("fault", action="applied", fault=fault.json())
        log.info("fault %s applied: %s %s", fault.id, kind.value, ",".join(targets))
        self._wake.set()
        return fault

    async def heal(self, fault_id: str | None, reason: str = "healed") -> list[Fault]:
        """Heal one fault (or all with None); NotFound for an unknown id."""
        async with self._lock:
            faults = await self.store.list_faults()
            chosen = [f for f in faults if fault_id is None or f.id == fault_id]
            if fault_id is not None and not chosen:
                raise NotFound(f"no fault {fault_id} (see `multiverse fault list`)")
            healed = [f for f in chosen if await self.store.remove_fault(f.id)]
            if healed:
                await self._push(None)
        for fault in healed:
            self.events.publish("fault", action=reason, fault=fault.json())
            log.info("fault %s %s", fault.id, reason)
        return healed

    async def _push(self, fault: Fault | None) -> None:
        """Send every live node its part now. A node that fails raises only when ``fault``
        concerns it (it must apply it); others catch up with their next sync."""
        self.generation = max(time.time_ns(), self.generation + 1)
        placements = await self.placements()
        involved = (
            {placements[n].node_id for n in (*fault.targets, *fault.peers) if n in placements}
            if fault is not None
            else set()
        )
        if fault is not None and fault.kind == FaultKind.LINK and not fault.peers:
            involved = {p.node_id for p in placements.values()}
        failures: list[MultiverseError] = []
        faults = await self.store.list_faults()
        self._listed, self._listed_at = faults, time.monotonic()  # acks agree with the push
        for node in await self.store.list_nodes():
            if node.status in (NodeStatus.DOWN, NodeStatus.NOT_READY) and node.id not in involved:
                continue
            plan = node_faults(faults, placements, node.id, self.generation)
            try:
                stub = self.agents.stub(node)
                await self.agents.call(node, stub.ApplyFaults, convert.faults_to_pb(plan))
            except MultiverseError as exc:
                if node.id in involved:
                    failures.append(type(exc)(f"{node.name}: {exc.message}"))
                else:
                    log.warning("fault push to %s failed: %s", node.name, exc.message)
        if failures:  # the first one's kind (refused, unreachable...), every node's reason
            raise type(failures[0])("; ".join(f.message for f in failures))

    async def run(self) -> None:
        """Heal each fault when its time is up, also those of a previous master's life."""
        while True:
            now = datetime.now(UTC)
            faults = await self.store.list_faults()
            due = [f for f in faults if f.expires_at and f.expires_at <= now]
            for fault in due:
                try:
                    await self.heal(fault.id, "expired")
                except NotFound:
                    pass  # healed by hand meanwhile
                except MultiverseError as exc:
                    log.warning("healing fault %s failed: %s", fault.id, exc.message)
            pending = [f.expires_at for f in await self.store.list_faults() if f.expires_at]
            wait = min(((t - datetime.now(UTC)).total_seconds() for t in pending), default=60.0)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=max(0.05, min(wait, 60.0)))
