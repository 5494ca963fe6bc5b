"""Moves of instances between nodes: a persisted :class:`Migration` run as a plan of steps.

The target is reserved under the placement lock (the record makes the instance count on both
nodes), then the lock is released: a move that waits for a stop blocks no launch. The plan is
rebuilt from reality (the store and both agents) after every step, so a master killed at any
point resumes from the record at start-up (:meth:`Moves.resume`). Until the owner switches, a
failure that retries cannot mend rolls back: whatever the target got is removed and the
instance is left as the user wanted it on its source. After the switch it only goes forward.

Cold (any driver with :class:`multiverse.drivers.base.Migratable`): stop on the source, the
target pulls the files from the source agent (the master only coordinates), switch the owner,
start on the target when the user wanted it running, delete the source copy.

Live (QEMU, :class:`multiverse.drivers.base.LiveMigratable`): the target prepares an incoming
VM, the source mirrors its disk into it and sends memory and devices (QEMU to QEMU, over TLS
with the nodes' certificates), the target lets it run, the owner switches, the source copy
goes. Until the target runs, the source's VM is the truth: any failure, or a master that died
meanwhile, cancels on the source (which runs on) and clears the target; a resumed move then
starts the transfer again. Once the target runs, the move only goes forward.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from multiverse.core.errors import (
    Conflict,
    InvalidArgument,
    MultiverseError,
    NotFound,
    Unavailable,
)
from multiverse.core.model import (
    DesiredState,
    Instance,
    InstanceState,
    LiveProgress,
    Migration,
    MigrationKind,
    MigrationPhase,
    Node,
    NodeStatus,
)
from multiverse.master.instances import Instances
from multiverse.master.operations import Operation
from multiverse.master.plan import Step, execute
from multiverse.master.ports import NodeClient, Observation
from multiverse.master.scheduler import place
from multiverse.store.repository import Change, Store, now
from multiverse.wire.pki import node_server_name

__all__ = ["MOVABLE", "ColdPlan", "LivePlan", "Moves", "migration_json"]

log = logging.getLogger("multiverse.master")

# Errors no retry mends: refuse at once and roll back.
_PERMANENT = (InvalidArgument, NotFound)
# The drivers that can move an instance of each kind (see drivers/base.py: Migratable and
# LiveMigratable); the others are refused before anything is touched.
MOVABLE = {
    MigrationKind.COLD: frozenset({"qemu", "firecracker", "fake"}),
    MigrationKind.LIVE: frozenset({"qemu"}),
}


def migration_json(migration: Migration, live: LiveProgress | None = None) -> dict[str, Any]:
    """The figures of a move's operation; ``live``: the newest report of a live transfer
    (kept in memory: it only matters while the move runs)."""
    return {
        "id": migration.id, "instance_id": migration.instance_id, "kind": migration.kind.value,
        "source_id": migration.source_id, "target_id": migration.target_id,
        "desired_after": migration.desired_after.value, "phase": migration.phase.value,
        "attempts": migration.attempts, "message": migration.message,
        "disk_bytes_sent": live.disk_done if live else migration.bytes_done,
        "disk_bytes_total": live.disk_total if live else migration.bytes_total,
        "memory_bytes_sent": live.memory_done if live else 0,
        "memory_bytes_total": live.memory_total if live else 0,
        "downtime_ms": round(live.downtime * 1000, 1) if live else 0.0,
    }  # fmt: skip


@dataclass
class _Step:
    name: str
    _should: Callable[[], bool]
    _do: Callable[[], Awaitable[None]]
    _verify: Callable[[], Awaitable[None]]
    final: bool = False

    async def should_do(self) -> bool:
        return self._should()

    async def do(self) -> None:
        await self._do()

    async def verify(self) -> None:
        await self._verify()


def _side_by_side(name: str, *steps: _Step, final: bool = False) -> _Step:
    """Steps that need nothing of each other, as one step that runs the due ones at once."""
    due: list[_Step] = []

    async def do() -> None:
        due[:] = [step for step in steps if step._should()]
        await asyncio.gather(*(step.do() for step in due))

    async def verify() -> None:
        await asyncio.gather(*(step.verify() for step in due))

    return _Step(name, lambda: any(step._should() for step in steps), do, verify, final)


@dataclass(frozen=True)
class _Seen:
    """What the store and both nodes say of a move now: the plans' steps are chosen from it."""

    migration: Migration
    instance: Instance
    source: Node
    target: Node
    on_source: Observation | None  # None: the source does not have it (or is away)
    on_target: Observation | None

    @property
    def switched(self) -> bool:
        return self.instance.node_id == self.target.id


class _MovePlan:
    """What both kinds of move share: reading reality, and the steps after the hand-over."""

    name = "move"

    def __init__(self, moves: Moves, migration_id: str) -> None:
        self.moves = moves
        self.migration_id = migration_id

    async def steps(self) -> list[Step]:
        return self._plan(await self._look())

    def _plan(self, seen: _Seen) -> list[Step]:
        raise NotImplementedError

    async def _look(self) -> _Seen:
        store, client = self.moves.store, self.moves.client
        # This master alone writes the record (it leads), and knows what it wrote last.
        migration = self.moves.latest.get(self.migration_id) or await store.get_migration(
            self.migration_id
        )
        # Read side by side: a move looks again after every step, on the switch-over's path.
        instance, nodes = await asyncio.gather(
            store.get_instance(migration.instance_id),
            store.list_nodes(ids=[migration.source_id, migration.target_id]),
        )
        by_id = {node.id: node for node in nodes}
        if len(by_id) < 2:
            raise NotFound("a node of the move was removed from the cluster")
        source, target = by_id[migration.source_id], by_id[migration.target_id]
        if instance.node_id != target.id and not _up(source):
            raise Unavailable(f"node {source.name} is {source.status.value}")

        async def on_source() -> Observation | None:
            return await client.observe(source, instance.id) if _up(source) else None

        seen = await asyncio.gather(on_source(), client.observe(target, instance.id))
        return _Seen(migration, instance, source, target, *seen)

    def _owner_and_cleanup(
        self, seen: _Seen, *, switch_when: Callable[[], bool], clean_when: Callable[[], bool]
    ) -> tuple[_Step, _Step]:
        """switch-owner (the target's VM becomes the instance) and delete-on-source (once the
        target runs as wanted): when each is due is the kind of move's to say."""
        moves = self.moves
        instance, source, target = seen.instance, seen.source, seen.target

        async def switch() -> None:
            moves.phase(seen.migration, MigrationPhase.SWITCHING)
            assert seen.on_target is not None
            await moves.switch_owner(instance, target, seen.on_target)

        async def owned() -> None:
            if (await moves.store.get_instance(instance.id)).node_id != target.id:
                raise Conflict("the owner did not switch")

        async def clean() -> None:
            moves.phase(seen.migration, MigrationPhase.CLEANING)
            await moves.client.delete(source, instance.id)
            await moves.until(source, instance.id, lambda o: o is None)

        async def gone() -> None:
            await moves.check(source, instance.id, lambda o: o is None)

        return (
            _Step("switch-owner", switch_when, switch, owned),
            _Step("delete-on-source", clean_when, clean, gone),
        )

    def _running_on_target(self, seen: _Seen) -> Callable[[], Awaitable[None]]:
        async def running() -> None:
            await self.moves.check(
                seen.target, seen.instance.id, lambda o: _is(o, InstanceState.RUNNING)
            )

        return running


class ColdPlan(_MovePlan):
    """The steps of one cold move, from what the store and both nodes say now."""

    name = "cold move"

    def _plan(self, seen: _Seen) -> list[Step]:
        moves, client = self.moves, self.moves.client
        migration, instance, source, target = (
            seen.migration, seen.instance, seen.source, seen.target
        )  # fmt: skip
        on_source, on_target, switched = seen.on_source, seen.on_target, seen.switched
        wants_running = migration.desired_after == DesiredState.RUNNING

        async def stop() -> None:
            moves.phase(migration, MigrationPhase.STOPPING)
            if on_source and on_source.state != InstanceState.STOPPING:
                await client.stop(source, instance.id)
            await moves.until(source, instance.id, lambda o: _is(o, InstanceState.STOPPED))

        async def transfer() -> None:
            moves.phase(migration, MigrationPhase.TRANSFERRING)
            files = await client.export(source, instance.id, target)
            total = sum(item.size for item in files)
            await moves.update(migration.id, bytes_total=total)
            await client.import_(target, instance, source, files, moves.progress(migration.id))
            await moves.update(migration.id, bytes_done=total)

        async def start() -> None:
            moves.phase(migration, MigrationPhase.STARTING)
            await client.start(target, instance.id)
            await moves.until(target, instance.id, lambda o: _is(o, InstanceState.RUNNING))

        async def stopped_on_source() -> None:
            await moves.check(source, instance.id, lambda o: _is(o, InstanceState.STOPPED))

        async def on_target_now() -> None:
            await moves.check(target, instance.id, lambda o: o is not None)

        target_ok = not wants_running or _is(on_target, InstanceState.RUNNING)
        switch, clean = self._owner_and_cleanup(
            seen,
            switch_when=lambda: not switched,
            clean_when=lambda: switched and target_ok and _up(source) and on_source is not None,
        )
        return [
            _Step("stop-on-source", lambda: not switched and not _is(on_source, InstanceState.STOPPED), stop, stopped_on_source),  # noqa: E501
            _Step("transfer", lambda: not switched and on_target is None, transfer, on_target_now),
            switch,
            _Step("start-on-target", lambda: switched and not target_ok, start, self._running_on_target(seen)),  # noqa: E501
            clean,
        ]  # fmt: skip


class LivePlan(_MovePlan):
    """The steps of one live move, from what the store and both nodes say now."""

    name = "live move"

    def _plan(self, seen: _Seen) -> list[Step]:
        moves, client = self.moves, self.moves.client
        migration, instance, source, target = (
            seen.migration, seen.instance, seen.source, seen.target
        )  # fmt: skip
        on_source, on_target, switched = seen.on_source, seen.on_target, seen.switched
        handed_over = _is(on_target, InstanceState.RUNNING)  # no way back from here
        arrived: list[Observation] = []  # the target's word once it let the VM run

        async def transfer() -> None:
            if not _is(on_source, InstanceState.RUNNING):
                raise Conflict(f"instance {instance.spec.name} is no longer Running on "
                               f"{source.name}: a live move needs it Running")  # fmt: skip
            moves.phase(migration, MigrationPhase.PREPARING)
            began = time.monotonic()
            endpoint = await client.prepare_incoming(target, instance, _host(target.address))
            prepared_at = time.monotonic()
            endpoint = dataclasses.replace(endpoint, tls_hostname=node_server_name(target.id))
            moves.phase(migration, MigrationPhase.TRANSFERRING)
            sent = await client.migrate_out(source, instance.id, endpoint,
                                            moves.live_progress(migration.id))  # fmt: skip
            sent_at = time.monotonic()
            try:
                arrived.append(await client.finish_incoming(target, instance.id, sent.host_key))
            except MultiverseError:
                # The source is paused with its state sent: it runs on before anything else
                # (the target never ran, so the source's VM is still the truth).
                await client.abort_migrate_out(source, instance.id)
                raise
            # The guest stayed paused from the source's stop (QEMU's downtime) until the
            # target ran: both count.
            paused = sent.downtime + time.monotonic() - sent_at
            moves.live[migration.id] = dataclasses.replace(sent, downtime=paused)
            moves.tell(migration.id, bytes_done=sent.disk_done, bytes_total=sent.disk_total)
            log.info(
                "instance %s runs on %s after a live move: target ready in %.3f s, state sent "
                "in %.3f s, paused %.0f ms", instance.spec.name, target.name,
                prepared_at - began, sent_at - prepared_at, paused * 1000,
            )  # fmt: skip

        async def running_there() -> None:  # as the target answered the hand-over
            if not arrived or not _is(arrived[-1], InstanceState.RUNNING):
                raise Conflict(f"{target.name} does not run the instance after the move")

        # Once the target runs, the source's paused copy is of no use to anyone: it goes
        # while the owner switches.
        switch, clean = self._owner_and_cleanup(
            seen,
            switch_when=lambda: not switched and handed_over,
            clean_when=lambda: handed_over and _up(source) and on_source is not None,
        )
        return [
            _Step("transfer-live", lambda: not switched and not handed_over, transfer, running_there),  # noqa: E501
            _side_by_side("hand-over", switch, clean, final=True),
        ]  # fmt: skip


def _host(address: str) -> str:
    """The host part of a node's agent address (where its QEMU listens for a live move)."""
    host = address.rsplit(":", 1)[0] if ":" in address else address
    return host.strip("[]") or "127.0.0.1"


def _up(node: Node) -> bool:
    return node.status == NodeStatus.READY


def _is(observation: Observation | None, state: InstanceState) -> bool:
    return observation is not None and observation.state == state


class Moves:
    """Starts, runs and resumes moves; the operation of each tells its phase and bytes."""

    def __init__(
        self,
        store: Store,
        client: NodeClient,
        instances: Instances,
        *,
        wait: float = 900.0,
        poll: float = 0.5,
        retry_limit: int = 3,
        retry_delay: float = 2.0,
    ) -> None:
        self.store = store
        self.client = client
        self.instances = instances
        self.wait = wait
        self.poll = poll
        self.retry_limit = retry_limit
        self.retry_delay = retry_delay
        self.operations: dict[str, Operation] = {}  # migration id -> its operation
        self.live: dict[str, LiveProgress] = {}  # migration id -> its transfer's newest figures
        self.latest: dict[str, Migration] = {}  # migration id -> its row as last written
        self._telling: dict[str, asyncio.Future[None]] = {}  # migration id -> its newest tell()

    # ---- starting ----

    async def move(
        self, name: str, target_name: str, kind: MigrationKind | None = None
    ) -> tuple[Migration, Operation]:
        """Check, reserve the target under the placement lock, and run the move."""
        instance, target = await asyncio.gather(
            self.instances.get(name), self.store.find_node(target_name)
        )
        if instance.desired == DesiredState.DELETED:
            raise Conflict(f"instance {name} is being deleted")
        if instance.node_id is None:
            raise Conflict(f"instance {name} is not placed on any node")
        source = await self.store.get_node(instance.node_id)
        kind = kind or MigrationKind.COLD
        if target.id == source.id:
            raise InvalidArgument(f"instance {name} is on {target.name} already")
        if target.driver != source.driver:
            raise InvalidArgument(
                f"{target.name} runs {target.driver or 'no driver yet'} and {source.name} runs "
                f"{source.driver}: an instance moves only between nodes of one driver"
            )
        if kind == MigrationKind.LIVE and instance.state != InstanceState.RUNNING:
            raise Conflict(
                f"instance {name} is {instance.state.value}: a live move needs it Running"
            )
        if source.driver not in MOVABLE[kind]:
            raise InvalidArgument(
                f"the {source.driver} driver cannot move instances"
                + (" live; use --cold" if source.driver in MOVABLE[MigrationKind.COLD] else "")
            )
        for node in (source, target):
            if not _up(node):
                raise Unavailable(
                    f"node {node.name} is {node.status.value}; a move needs both nodes"
                )
        async with self.instances.placing:
            place(instance.spec.resources, [target])  # the scheduler's reasons when no room
            migration = await self.store.add_migration(
                Migration(
                    id=str(uuid.uuid4()), instance_id=instance.id, kind=kind,
                    source_id=source.id, target_id=target.id,
                    desired_after=instance.desired, created_at=now(),
                )
            )  # fmt: skip
            # The target's room is taken in the store (list_nodes counts active moves): the
            # placement view reloads to see it.
            self.instances.view.invalidate()
        log.info("moving %s from %s to %s (%s)", name, source.name, target.name, kind.value)
        return migration, self._run(migration, name)

    def _run(self, migration: Migration, name: str, *, resumed: bool = False) -> Operation:
        self.instances.reconciler.paused.add(migration.instance_id)
        operation = self.instances.operations.start(
            "move", name, self._execute(migration, resumed=resumed)
        )
        self.latest[migration.id] = migration
        operation.figures = lambda: migration_json(
            self.latest[migration.id], self.live.get(migration.id)
        )
        self.operations[migration.id] = operation
        return operation

    async def resume(self) -> list[Operation]:
        """Run the moves a previous master left unfinished (at start, before the reconciler)."""
        resumed = []
        for migration in await self.store.list_migrations(active=True):
            try:
                name = (await self.store.get_instance(migration.instance_id)).spec.name
            except NotFound:
                await self.update(
                    migration.id,
                    phase=MigrationPhase.FAILED,
                    message="the instance is gone",
                )
                continue
            log.info("resuming the move of %s (%s)", name, migration.phase.value)
            resumed.append(self._run(migration, name, resumed=True))
        return resumed

    # ---- running ----

    async def _execute(self, migration: Migration, *, resumed: bool) -> dict[str, Any]:
        migration_id = migration.id
        ends = {migration.source_id, migration.target_id}

        async def known() -> bool:  # after a master restart, nodes are Unknown until they report
            if not resumed:  # both were Ready a moment ago: move() checked
                return True
            nodes = await self.store.list_nodes(ids=list(ends))
            return all(n.status != NodeStatus.UNKNOWN for n in nodes)

        try:
            if migration.phase == MigrationPhase.ROLLING_BACK:  # a master died rolling back
                await self._roll_back(migration)
                raise Conflict(f"the move failed and was rolled back: {migration.message}")
            while True:
                await self.instances.events.wait_for(known, self.wait)
                try:
                    plan = (LivePlan if migration.kind == MigrationKind.LIVE else ColdPlan)(
                        self, migration_id
                    )
                    await execute(plan)
                    migration = await self.update(
                        migration_id, phase=MigrationPhase.DONE, message=""
                    )
                    return migration_json(migration)
                except MultiverseError as exc:
                    migration = await self._failed(migration_id, exc)
                    if migration.phase == MigrationPhase.ROLLING_BACK:
                        await self._roll_back(migration)
                        raise Conflict(
                            f"the move failed and was rolled back: {exc.message}"
                        ) from exc
                    await asyncio.sleep(self.retry_delay * migration.attempts)
        finally:
            self.instances.reconciler.paused.discard(migration.instance_id)
            self.instances.view.invalidate()  # the target's room is no longer held for it
            self.instances.reconciler.kick()

    async def _failed(self, migration_id: str, exc: MultiverseError) -> Migration:
        await self._told(migration_id)
        migration = await self.store.get_migration(migration_id)
        instance = await self.store.get_instance(migration.instance_id)
        attempts = migration.attempts + 1
        switched = instance.node_id == migration.target_id
        log.warning("move of %s, attempt %d: %s", instance.spec.name, attempts, exc.message)
        give_up = not switched and (attempts >= self.retry_limit or isinstance(exc, _PERMANENT))
        phase = MigrationPhase.ROLLING_BACK if give_up else migration.phase
        return await self.update(migration_id, attempts=attempts, message=exc.message, phase=phase)

    async def _roll_back(self, migration: Migration) -> None:
        """Give the instance back to its source at once (the reconciler brings it to what the
        user wanted there: its desired state never changed), then remove what the target got;
        a target that is away is cleaned when it is back (until ``wait`` runs out)."""
        if migration.kind == MigrationKind.LIVE:  # first of all, the source runs on
            await self._resume_source(migration)
        self.instances.reconciler.paused.discard(migration.instance_id)
        self.instances.reconciler.kick()
        deadline = time.monotonic() + self.wait
        message = migration.message
        while True:
            target = await self.store.get_node(migration.target_id)
            try:
                await self.client.abort_import(target, migration.instance_id)
                break
            except MultiverseError as exc:
                if time.monotonic() > deadline:
                    message = f"{migration.message}; could not clean {target.name}: {exc.message}"
                    break

            async def back() -> bool:
                node = await self.store.get_node(migration.target_id)
                return node.status == NodeStatus.READY

            await self.instances.events.wait_for(back, max(deadline - time.monotonic(), 0))
            await asyncio.sleep(self.poll)
        await self.update(migration.id, phase=MigrationPhase.FAILED, message=message)

    async def _resume_source(self, migration: Migration) -> None:
        """Cancel a live transfer on the source; the instance runs on there (a source that
        is away cancels nothing: its QEMU never hands over without the master)."""
        source = await self.store.get_node(migration.source_id)
        try:
            await self.client.abort_migrate_out(source, migration.instance_id)
        except MultiverseError as exc:
            log.warning("cannot cancel the live move on %s: %s", source.name, exc.message)

    # ---- helpers of the steps ----

    async def switch_owner(self, instance: Instance, target: Node, on_target: Observation) -> None:
        """The instance is the target's now, as the target reports it."""
        await self.store.update_instance(
            instance.id, node_id=target.id, state=on_target.state,
            version=on_target.version, ipv4=on_target.ipv4, message="",
        )  # fmt: skip
        self.instances.reconciler.publish_changes(
            [Change(instance.id, instance.spec.name, instance.state.value, on_target.state)]
        )
        log.info("instance %s now belongs to %s", instance.spec.name, target.name)

    def live_progress(self, migration_id: str) -> Callable[[LiveProgress], None]:
        def update(progress: LiveProgress) -> None:
            self.live[migration_id] = progress

        return update

    async def update(self, migration_id: str, **fields: Any) -> Migration:
        """Write the move's row, after what :meth:`tell` was given before; the operation's
        figures tell what was written last."""
        await self._told(migration_id)
        return await self._write(migration_id, **fields)

    async def _write(self, migration_id: str, **fields: Any) -> Migration:
        migration = await self.store.update_migration(migration_id, **fields)
        self.latest[migration_id] = migration
        return migration

    def phase(self, migration: Migration, phase: MigrationPhase) -> None:
        self.tell(migration.id, phase=phase)

    def tell(self, migration_id: str, **fields: Any) -> None:
        """Write what only tells where the move is (its phase, its figures) behind the step,
        in order: the plan reads reality, never these, and a write each held up every step,
        the live move's hand-over among them."""
        before = self._telling.get(migration_id)

        async def write() -> None:
            if before is not None:
                await before
            try:
                await self._write(migration_id, **fields)
            except MultiverseError as exc:  # the next write says where it is
                log.warning("move %s: %s not written: %s", migration_id, fields, exc.message)

        self._telling[migration_id] = asyncio.ensure_future(write())

    async def _told(self, migration_id: str) -> None:
        if (pending := self._telling.pop(migration_id, None)) is not None:
            await pending

    def progress(self, migration_id: str) -> Callable[[int, int], Awaitable[None]]:
        last = [0.0]

        async def update(done: int, total: int) -> None:
            moment = time.monotonic()
            if moment - last[0] >= 0.5 or done == total:  # a row write per chunk is too many
                last[0] = moment
                await self.update(migration_id, bytes_done=done, bytes_total=total)

        return update

    async def until(
        self, node: Node, instance_id: str, reached: Callable[[Observation | None], bool]
    ) -> None:
        """Poll the node until ``reached`` holds for the instance; Unavailable past the wait."""
        deadline = time.monotonic() + self.wait
        # Most waits end soon (a deletion, ~20 ms): ask every 5 ms for a while, then back off.
        asked = 0
        while not reached(observed := await self.client.observe(node, instance_id)):
            if observed is not None and observed.state == InstanceState.FAILED:
                raise Conflict(f"on {node.name}: {observed.message or 'failed'}")
            if time.monotonic() > deadline:
                raise Unavailable(f"gave up waiting on {node.name} after {self.wait:.0f}s")
            asked += 1
            await asyncio.sleep(min(0.005 * 1.5 ** max(asked - 40, 0), self.poll))

    async def check(
        self, node: Node, instance_id: str, holds: Callable[[Observation | None], bool]
    ) -> None:
        if not holds(await self.client.observe(node, instance_id)):
            raise Conflict(f"{node.name} does not show the expected state after the step")
