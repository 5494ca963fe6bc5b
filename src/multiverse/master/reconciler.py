"""The reconciler: drives each instance's observed state toward its desired state.

It is the one place that turns "what was asked" into agent calls. Each step asks the pure
:func:`next_action` what, if anything, to do for one instance, then makes one idempotent call
(an agent that already did it answers with the current state). Failures back off
exponentially (capped) and, past the retry limit, leave the instance Failed with the last
error. Its work is a queue of the instances that changed (reports, API writes) plus those whose
backoff ran out, so a round costs what changed, not the size of the cluster; a full pass over
everything runs when nodes come and go (at most one each ``full_gap`` seconds) and every
``full_interval`` seconds, so whatever crashed in between - master, worker, a VM - is caught up
with.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import logging
import time
from collections.abc import AsyncIterator, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from multiverse.core.errors import InvalidArgument, MultiverseError, NotFound, Unavailable
from multiverse.core.model import DesiredState, Instance, InstanceState, Node, NodeStatus
from multiverse.master.cluster import Agents, status_dict
from multiverse.master.events import EventBus
from multiverse.master.network import Ipam
from multiverse.store.repository import Change, Standing, Store
from multiverse.wire import convert
from multiverse.wire.v1 import multiverse_pb2 as pb

log = logging.getLogger("multiverse.master")


class Action(enum.StrEnum):
    LAUNCH = "launch"
    START = "start"
    STOP = "stop"
    DELETE = "delete"


class _Standing(Protocol):
    """What :func:`next_action` looks at: an Instance, or a Standing (its row's few columns)."""

    @property
    def state(self) -> InstanceState: ...

    @property
    def desired(self) -> DesiredState: ...


def next_action(instance: _Standing, node: Node | None) -> Action | None:
    """What to do for ``instance`` now, or None (converged, or waiting for something)."""
    if node is None or node.status != NodeStatus.READY:
        return None  # nothing can be done on a node we cannot reach; its instances wait
    state, desired = instance.state, instance.desired
    if desired == DesiredState.DELETED:
        return None if state == InstanceState.DELETING else Action.DELETE
    if state == InstanceState.SCHEDULED:
        return Action.LAUNCH  # placed, but the node may never have heard of it
    if state.is_transient or state == InstanceState.UNKNOWN:
        return None  # the node is at it; its next report tells how it ended
    if desired == DesiredState.RUNNING:
        if state == InstanceState.FAILED:
            return Action.LAUNCH  # creating and booting again is the idempotent retry
        if state == InstanceState.STOPPED:
            return Action.START
    if desired == DesiredState.STOPPED and state == InstanceState.RUNNING:
        return Action.STOP
    return None


# Errors that no retry can mend: the request itself is wrong for that node.
PERMANENT = (InvalidArgument, NotFound)
# Agent calls that steps asked for together (step_all) have open at once, all of them together;
# as many again for the rounds' steps.
STEPS = 64
# Instances handed over together (step_all) and not yet stepped, past which a launch of many
# waits (then is refused: 503). Placing costs the master far less than handing an instance to
# its node; with no bound, a master on PostgreSQL placed 45,000 in five minutes, had handed
# fewer than 2,000 to their nodes, and fell so far behind that its nodes' reports went unheard.
BACKLOG = 10_000


@dataclass
class _Backoff:
    attempts: int = 0
    next_try: float = 0.0
    action: Action | None = None
    stepped_at: float = -float("inf")  # when its last step's answer was stored
    counted: int | None = None  # the version of the node's Failed report counted as an attempt


class Reconciler:
    def __init__(
        self,
        store: Store,
        agents: Agents,
        events: EventBus,
        ipam: Ipam | None = None,
        *,
        retry_limit: int = 5,
        base_delay: float = 1.0,
        max_delay: float = 30.0,
        interval: float = 2.0,
        full_interval: float = 30.0,
        full_gap: float = 2.0,
        round_gap: float = 0.05,
        backlog: int = BACKLOG,
        steps: int = STEPS,
    ) -> None:
        self.store = store
        self.agents = agents
        self.ipam = ipam
        self.events = events
        self.retry_limit = retry_limit
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.interval = interval
        self.full_interval = full_interval
        self.full_gap = full_gap
        # Rounds of what changed start at most this often: a launch storm changed instances
        # (Scheduled, Starting, Running) hundreds of times a second, and a round each read
        # the store for a handful of them; a short gap lets one round take them all.
        self.round_gap = round_gap
        self.retries_total = 0
        self._backoff: dict[str, _Backoff] = {}
        self._kick = asyncio.Event()
        self._busy: set[str] = set()
        self._changed: set[str] = set()  # instance ids to look at in the next round
        self._full = True  # the next round looks at everything
        self._running = False  # a master that does not lead runs no rounds: it queues nothing
        # Instances a move owns (master/moves.py): its plan acts on them, not the reconciler.
        self.paused: set[str] = set()
        self._steps = asyncio.Semaphore(steps)
        # The rounds' own: a master restarted with 50,000 instances Scheduled had its full
        # pass open 50,000 agent calls at once; and a round's steps must not queue behind the
        # thousands a launch of many hands over.
        self._round_steps = asyncio.Semaphore(steps)
        self.backlog_limit = backlog
        self.backlog = 0  # instances handed over by step_all, or about to be, not yet stepped
        self._waiting: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()

    def kick(self) -> None:
        """Look at every instance soon (nodes came or went, or many things changed)."""
        self._full = True
        self._kick.set()

    @staticmethod
    def queue_depth(nodes: list[Node], instances: list[Instance]) -> int:
        """Instances that want an action now or after their backoff."""
        by_id = {node.id: node for node in nodes}
        return sum(
            next_action(item, by_id.get(item.node_id or "")) is not None for item in instances
        )

    async def run(self) -> None:
        self._running, self._full = True, True
        try:
            await self._rounds()
        finally:
            self._running = False

    async def _rounds(self) -> None:
        next_full, last_full = 0.0, -float("inf")
        while True:
            self._kick.clear()  # before taking the work: a kick from now on is a new round
            try:
                if self._full:
                    # Asked for (a node came or went): soon, but kicks within ``full_gap`` of
                    # the last pass share the next one. A pass reads every node and instance;
                    # at 1,000 nodes flapping NotReady and back, a pass per transition kept a
                    # store thread busy and the master fell further behind their reports.
                    self._full = False
                    next_full = min(next_full, last_full + self.full_gap)
                if time.monotonic() >= next_full:
                    self._changed = set()
                    last_full = time.monotonic()
                    next_full = last_full + self.full_interval
                    await self.reconcile_all()
                else:
                    await self.reconcile_changed()
            except Exception:  # keep reconciling whatever one round hit
                log.exception("reconcile round failed")
            await asyncio.sleep(self.round_gap)
            wait = min(self.interval, max(next_full - time.monotonic(), 0.0))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kick.wait(), wait)

    async def reconcile_changed(self) -> None:
        """One step for the instances that changed, and for those whose backoff ran out."""
        moment = time.monotonic()
        due = {
            instance_id
            for instance_id, backoff in self._backoff.items()
            if backoff.attempts < self.retry_limit and backoff.next_try <= moment
        }
        # A paused instance's changes are the move's own steps: the move kicks it when done.
        # A busy one's changes wait for a round after its step (mostly its own answer).
        changed = self._changed | due
        wanted, self._changed = changed - self._busy - self.paused, changed & self._busy
        if not wanted:
            return
        read_at = time.monotonic()
        standings = await self.store.standings(ids=sorted(wanted))
        node_ids = sorted({standing.node_id for standing in standings if standing.node_id})
        nodes = {node.id: node for node in await self.store.list_nodes(ids=node_ids)}
        await self._step_due(standings, nodes, read_at)
        for gone in wanted - {standing.id for standing in standings}:
            self._backoff.pop(gone, None)

    async def reconcile_all(self) -> None:
        read_at = time.monotonic()
        nodes = {node.id: node for node in await self.store.list_nodes()}
        standings = await self.store.standings()
        if self.ipam is not None and (swept := await self.ipam.sweep()):
            log.warning("gave back %d address(es) of instances gone", swept)
        # Whole rows, and a step, only for the instances with something to do: at fifty
        # thousand converged ones, a coroutine each held the event loop (and the API's
        # answers) for seconds. The others, and those gone from the store (deleted, or
        # forgotten with their removed node), take their backoff with them.
        due = await self._step_due(standings, nodes, read_at)
        for settled in self._backoff.keys() - due - self._busy - self.paused:
            del self._backoff[settled]

    async def _step_due(
        self, standings: Sequence[Standing], nodes: Mapping[str, Node], read_at: float
    ) -> set[str]:
        """A step for each instance of ``standings`` with something to do, read whole for
        it (most changes, Starting or Running, leave nothing to do: a launch storm read each
        instance whole three times over for nothing); the ids of those."""
        due = set()
        for standing in standings:
            if standing.id in self._busy or standing.id in self.paused:
                continue
            if next_action(standing, nodes.get(standing.node_id or "")) is None:
                self._backoff.pop(standing.id, None)
            else:
                due.add(standing.id)
        instances = await self.store.list_instances(ids=sorted(due)) if due else []

        async def one(instance: Instance) -> None:
            async with self._round_steps:
                await self.reconcile(instance, nodes.get(instance.node_id or ""), read_at=read_at)

        await asyncio.gather(*(one(instance) for instance in instances))
        return due

    def step_all(self, pairs: Sequence[tuple[Instance, Node | None]]) -> Coroutine[Any, Any, None]:
        """One step each for many instances (a launch of many just recorded them), at most
        STEPS agent calls at a time: thousands at once held the event loop, and the API's
        answers waited behind them. They count as busy from this call on, so the rounds,
        which see them Scheduled meanwhile, leave them to it (they launched those still
        waiting for their turn a second time: the agent's answer is the same, its work not)."""
        self._busy.update(instance.id for instance, _ in pairs)
        self.backlog += len(pairs)
        return self._step_all(pairs)

    async def _step_all(self, pairs: Sequence[tuple[Instance, Node | None]]) -> None:
        async def one(instance: Instance, node: Node | None) -> None:
            try:
                async with self._steps:
                    self._busy.discard(instance.id)  # the step marks it again for its call
                    await self.reconcile(instance, node)
            finally:
                self._busy.discard(instance.id)
                self._release(1)

        await asyncio.gather(*(one(instance, node) for instance, node in pairs))

    @contextlib.asynccontextmanager
    async def room_for(self, count: int, timeout: float) -> AsyncIterator[None]:
        """Room for ``count`` more instances in the backlog, held while the block places
        them and hands them over (:meth:`step_all` counts them from then on). Waits, first
        come first served, while the backlog is full; Unavailable after ``timeout`` seconds.
        An empty backlog takes any count."""
        if not self._waiting and (not self.backlog or self.backlog + count <= self.backlog_limit):
            self.backlog += count
        else:
            entry = (count, asyncio.get_running_loop().create_future())
            self._waiting.append(entry)
            try:
                async with asyncio.timeout(timeout):
                    await entry[1]
            except BaseException as exc:
                with contextlib.suppress(ValueError):
                    self._waiting.remove(entry)
                if entry[1].done() and not entry[1].cancelled():
                    self._release(count)  # let in just as its time ran out
                if isinstance(exc, TimeoutError):
                    raise Unavailable(
                        f"the master has {self.backlog} instances still to hand to their "
                        "nodes; launch again in a few seconds",
                        retry_after=5,
                    ) from None
                raise
        try:
            yield
        finally:
            self._release(count)

    def _release(self, count: int) -> None:
        """``count`` fewer in the backlog: let in the waiting launches that now fit, in turn."""
        self.backlog -= count
        while self._waiting:
            wanted, future = self._waiting[0]
            if not future.done() and self.backlog and self.backlog + wanted > self.backlog_limit:
                break
            self._waiting.popleft()
            if not future.done():
                self.backlog += wanted
                future.set_result(None)

    async def reconcile(
        self,
        instance: Instance,
        node: Node | None,
        *,
        by_user: bool = False,
        force: bool = False,
        read_at: float | None = None,
    ) -> None:
        """One step for one instance. ``by_user``: an API call asked for it just now (no
        backoff, errors raised to the caller). ``force``: stop without a clean shutdown.
        ``read_at``: when a round read ``instance`` (its monotonic clock). Unless a user
        asks, no step while another is under way, nor when one ended after the read: a
        round that read fifty thousand instances acted on each seconds later, and launched
        again what a launch of many had launched meanwhile (that step's own change brings
        the instance to the next round)."""
        action = next_action(instance, node)
        backoff = self._backoff.get(instance.id)
        if action is None:
            self._backoff.pop(instance.id, None)
            return
        if not by_user and (
            instance.id in self._busy
            or (read_at is not None and backoff is not None and backoff.stepped_at > read_at)
        ):
            return
        waiting = backoff is not None and backoff.action == action and not by_user
        if (
            waiting
            and backoff
            and (backoff.attempts >= self.retry_limit or time.monotonic() < backoff.next_try)
        ):
            return
        if (
            action == Action.LAUNCH
            and instance.state == InstanceState.FAILED
            and not by_user
            and (backoff is None or backoff.action != action or backoff.counted != instance.version)
        ):
            # The node failed after it took the step (a boot that did not come up): an attempt
            # that failed all the same, so a VM failing every boot is retried ever more slowly
            # and then left Failed, as one whose calls are refused.
            await self._failed(instance, action, MultiverseError(instance.message))
            self._backoff[instance.id].counted = instance.version
            return
        assert node is not None
        # Busy until the agent's answer is in the store: a round that read the instance
        # before then would take the same step again.
        self._busy.add(instance.id)
        try:
            try:
                status = await self._call(action, instance, node, force)
            except MultiverseError as exc:
                await self._failed(instance, action, exc)
                if by_user:
                    raise
                return
            if action == Action.START and not by_user:
                await self.store.update_instance(instance.id, restarts=instance.restarts + 1)
                log.info("instance %s stopped on its own; started it again", instance.name)
            if backoff is None or backoff.action != action:
                backoff = self._backoff[instance.id] = _Backoff(action=action)
            await self.observe(instance.id, status)
            backoff.stepped_at = time.monotonic()
        finally:
            self._busy.discard(instance.id)

    async def _call(
        self, action: Action, instance: Instance, node: Node, force: bool
    ) -> pb.InstanceStatus:
        stub = self.agents.stub(node)
        ref = pb.InstanceRef(id=instance.id)
        log.info("reconcile: %s %s on %s", action.value, instance.name, node.name)
        if action == Action.LAUNCH:
            nic = await self.ipam.nic_on(instance, node.id) if self.ipam else None
            request = pb.LaunchRequest(spec=convert.spec_to_pb(instance.id, instance.spec, nic))
            return await self.agents.call(node, stub.Launch, request)
        if action == Action.START:
            return await self.agents.call(node, stub.Start, ref)
        if action == Action.STOP:
            stop = pb.StopRequest(id=instance.id, force=force)
            return await self.agents.call(node, stub.Stop, stop)
        status: pb.InstanceStatus = await self.agents.call(node, stub.Delete, ref)
        if not status.id:  # the node never had it: nothing left to wait for
            await self.store.delete_instance(instance.id)
            self.publish_changes([Change(instance.id, instance.name, instance.state.value, "")])
        return status

    async def _failed(self, instance: Instance, action: Action, exc: MultiverseError) -> None:
        backoff = self._backoff.get(instance.id)
        if backoff is None or backoff.action != action:
            backoff = self._backoff[instance.id] = _Backoff(action=action)
        backoff.attempts += 1
        self.retries_total += 1
        delay = min(self.base_delay * 2 ** (backoff.attempts - 1), self.max_delay)
        backoff.next_try = time.monotonic() + delay
        gave_up = backoff.attempts >= self.retry_limit or (
            action == Action.LAUNCH and isinstance(exc, PERMANENT)
        )
        log.warning(
            "reconcile: %s %s failed (attempt %d): %s",
            action.value, instance.name, backoff.attempts, exc.message,
        )  # fmt: skip
        if gave_up:
            backoff.attempts = self.retry_limit
            message = f"{action.value} failed after {backoff.attempts} attempts: {exc.message}"
            await self.set_state(instance, InstanceState.FAILED, message)
        else:
            await self.store.update_instance(instance.id, message=f"{action.value}: {exc.message}")

    async def set_state(self, instance: Instance, state: InstanceState, message: str) -> None:
        await self.store.update_instance(instance.id, state=state, message=message)
        self.publish_changes([Change(instance.id, instance.name, instance.state.value, state)])

    async def observe(self, instance_id: str, status: pb.InstanceStatus) -> None:
        """Take an agent's answer about one instance, as a report would."""
        if status.id and (
            change := await self.store.observe_instance(instance_id, status_dict(status))
        ):
            self.publish_changes([change])

    def publish_changes(self, changes: list[Change]) -> None:
        for change in changes:
            self.events.publish(
                "instance", name=change.name, id=change.instance_id, old=change.old,
                state=change.new or "Deleted",
            )  # fmt: skip
            if self._running:
                self._changed.add(change.instance_id)
        if changes:
            self._kick.set()
