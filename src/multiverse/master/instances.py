"""Instance actions as the API offers them: launch, start, stop, restart, delete, info, exec.

Start, stop and delete write the desired state and let the reconciler act at once (the same
step its loop takes later, if this one fails); each returns an operation that ends when the
instance gets there. Placement is decided and recorded under one lock, so concurrent launches
see each other's reservations and never oversubscribe a node; the unique name constraint
settles duplicates.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeAlias

import grpc

from multiverse.core.errors import (
    Conflict,
    DriverError,
    InvalidArgument,
    MultiverseError,
    NotFound,
    Unavailable,
    Unschedulable,
)
from multiverse.core.model import (
    DesiredState,
    GuestStats,
    Instance,
    InstanceSpec,
    InstanceState,
    Node,
    NodeStatus,
    ensure_running,
)
from multiverse.core.network import Publish
from multiverse.core.sessions import AGENT_SESSION_PATH
from multiverse.core.sshlogin import SshLogin, parse_public_key
from multiverse.master.cluster import Agents
from multiverse.master.events import Event, EventBus
from multiverse.master.network import Ipam, Picker
from multiverse.master.operations import Operation, Operations, Progress
from multiverse.master.reconciler import PERMANENT, Reconciler
from multiverse.master.scheduler import SCORED, NodeView, Strategy, place_many, spread_conflict
from multiverse.store.repository import Change, Store, now
from multiverse.wire import convert, pki
from multiverse.wire.convert import split_address
from multiverse.wire.v1 import multiverse_pb2 as pb
from multiverse.wire.v1 import multiverse_pb2_grpc as pb_grpc

log = logging.getLogger("multiverse.master")

SessionCall: TypeAlias = grpc.aio.StreamStreamCall[pb.SessionInput, pb.SessionOutput]
OPERATION_TIMEOUT = 900.0  # seconds an operation waits for its instance to get there
# How often an operation re-reads its instance with no event about it: the change may have been
# seen by another master (its worker syncs there), which raises the event on that master only.
UNTIL_RECHECK = 5.0
UNTIL_RECHECK_MAX = 30.0
BACKLOG_WAIT = 20.0  # seconds a launch of many waits for room in the master's backlog
PLACEMENT_TRIES = 3  # a node found full at insert time (another master won it): choose again


@dataclass(frozen=True)
class DirectSession:
    """Where a client opens a session straight on the node, and the one-time ticket for it.
    ``server_name``: the name the node's certificate (from the cluster CA) carries."""

    url: str
    ticket: str = field(repr=False)  # a secret until used: never in a repr or a log
    server_name: str
    expires_in: float


@dataclass(frozen=True)
class InstanceInfo:
    instance: Instance
    stats: GuestStats | None  # None when the instance is not running or its node is away
    error: str = ""


class Instances:
    def __init__(
        self,
        store: Store,
        agents: Agents,
        reconciler: Reconciler,
        operations: Operations,
        events: EventBus,
        placement_wait: float = 20.0,
        ipam: Ipam | None = None,
    ) -> None:
        self.store = store
        self.agents = agents
        self.reconciler = reconciler
        self.operations = operations
        self.events = events
        self.placement_wait = placement_wait
        self.view = NodeView(store)
        # Evacuations hold it while they choose targets and move instances there.
        self.placing = asyncio.Lock()
        self.ipam = ipam
        self._scan_from = 0  # where the next placement starts looking (scheduler.place)
        self._dispatching: set[asyncio.Task[None]] = set()  # referenced until done

    async def get(self, name: str) -> Instance:
        return await self.store.find_instance(name)

    async def _node_of(self, instance: Instance) -> Node:
        if instance.node_id is None:
            raise Conflict(f"instance {instance.name} is not placed on any node")
        return await self.store.get_node(instance.node_id)

    def _stub(self, node: Node) -> pb_grpc.AgentServiceStub:
        return self.agents.stub(node)

    async def _candidates(self, node_name: str | None) -> list[Node]:
        """The nodes to place on, from the in-memory view; waits (bounded) while some are
        Unknown, as after a master restart, so that a launch does not fail only because
        nobody has reported yet. No lock is held meanwhile: other launches go on."""

        async def chosen() -> list[Node]:
            nodes = await self.view.nodes()
            if node_name is None:
                return nodes
            named = [node for node in nodes if node.name == node_name]
            return named or [await self.store.find_node(node_name)]  # NotFound, or brand new

        async def known() -> bool:
            return all(node.status != NodeStatus.UNKNOWN for node in await chosen())

        await self.events.wait_for(known, self.placement_wait)
        return await chosen()

    async def launch(
        self,
        spec: InstanceSpec,
        *,
        node_name: str | None = None,
        selector: Mapping[str, str] | None = None,
        strategy: Strategy = "spread",
        ip: str = "",
        publish: Sequence[Publish] = (),
        apart_from: Mapping[str, str] | None = None,
    ) -> tuple[Instance, Operation]:
        """Place, record (with its address on the cluster network, in the same transaction,
        when its node is on that network) and ask the node to create it, at once, so that a
        node's refusal (no such image) is the answer; ``ip`` asks for a given free address.
        ``apart_from``: labels; no node holding an instance with all of them is chosen
        (anti-affinity, as an environment's ``spread: true`` group asks)."""
        [(instance, node)] = await self._place(
            [spec], node_name=node_name, selector=selector, strategy=strategy, ip=ip,
            publish=publish, apart_from=apart_from,
        )  # fmt: skip
        try:
            await self.reconciler.reconcile(instance, node, by_user=True)
        except PERMANENT:
            # The node refused the request itself (no such image...): nothing was created.
            await self.store.delete_instance(instance.id)
            self._unreserve([(instance, node)])
            self.reconciler.publish_changes([Change(instance.id, spec.name, "Failed", "")])
            raise
        except MultiverseError:
            pass  # e.g. the node just went away: the reconciler tries again, with backoff
        operation = self.operations.start(
            "launch", spec.name, self.until(instance.id, {InstanceState.RUNNING})
        )
        return await self.store.get_instance(instance.id), operation

    async def launch_many(
        self,
        specs: Sequence[InstanceSpec],
        *,
        node_name: str | None = None,
        selector: Mapping[str, str] | None = None,
        strategy: Strategy = "spread",
    ) -> tuple[list[Instance], Operation]:
        """Several instances (a ``count``), placed together and recorded in one transaction:
        all or none, and a hundred cost one commit and one request, which is what lets a
        master place hundreds a second (Nomad's jobs and EC2's RunInstances batch the same
        way). Their nodes are asked afterwards, in the background, as the reconciler asks
        (a refusal leaves that instance Failed with the reason, and the operation says so);
        the operation ends when every one is Running. While the master has more instances
        than it can take still to hand to their nodes, the launch waits its turn, then is
        refused (Unavailable) rather than let that backlog grow without end."""
        async with self.reconciler.room_for(len(specs), BACKLOG_WAIT):
            placed = await self._place(
                specs, node_name=node_name, selector=selector, strategy=strategy
            )
            task = asyncio.create_task(self.reconciler.step_all(placed))
            self._dispatching.add(task)
            task.add_done_callback(self._dispatching.discard)
        progress = Progress(stage="0 Running", total=len(placed))
        ids = [instance.id for instance, _ in placed]
        operation = self.operations.start(
            "launch", f"{len(placed)} instances",
            self.until_all(ids, {InstanceState.RUNNING}, progress), transfer=progress,
        )  # fmt: skip
        return [instance for instance, _ in placed], operation

    async def _place(
        self,
        specs: Sequence[InstanceSpec],
        *,
        node_name: str | None,
        selector: Mapping[str, str] | None,
        strategy: Strategy,
        ip: str = "",
        publish: Sequence[Publish] = (),
        apart_from: Mapping[str, str] | None = None,
    ) -> list[tuple[Instance, Node]]:
        """Choose a node for each of ``specs`` (all of one size: a count) in turn (each sees
        the room the ones before it took) and record them all; ``ip`` and ``publish`` come
        with one spec only."""
        for spec in specs:
            spec.validate()
        avoid = await self._holding(apart_from) if apart_from else None
        ids = [str(uuid.uuid4()) for _ in specs]
        pickers = [
            self.ipam.picker(instance_id, requested=ip, publish=publish) if self.ipam else None
            for instance_id in ids
        ]
        if self.ipam is None and (ip or publish):
            raise InvalidArgument("this cluster has no network: --ip and --publish need one")
        reloaded = False
        for attempt in range(PLACEMENT_TRIES):
            nodes = await self._candidates(node_name)
            if ip or publish:  # prefer the nodes on the network; none: refused below, clearly
                nodes = [node for node in nodes if node.network_mode == "bridge"] or nodes
            # Choosing and reserving in the view happen with no await between them, so the
            # launches of this master see each other without a lock; the store's conditional
            # insert settles races with other masters (and the unique name, duplicates).
            start, self._scan_from = self._scan_from, self._scan_from + SCORED
            need = specs[0].resources
            try:
                targets = place_many(
                    need, nodes, len(specs), selector=selector, strategy=strategy,
                    avoid=avoid, scored=SCORED, start=start % max(len(nodes), 1),
                )  # fmt: skip
            except Unschedulable:
                if reloaded:
                    raise
                # The view may not know yet of room given back a moment ago (a delete): the
                # store's word before saying that nothing fits.
                reloaded = True
                self.view.invalidate()
                continue
            for node in targets:
                self.view.reserve(node.id, need)
            chosen = [
                (self._scheduled(instance_id, spec, node), node)
                for instance_id, spec, node in zip(ids, specs, targets, strict=True)
            ]
            try:
                leases = [
                    self._lease(picker, node, bool(ip or publish))
                    for picker, (_, node) in zip(pickers, chosen, strict=True)
                ]
                if publish and leases[0] is not None and self.ipam:
                    await self.ipam.check_publish(chosen[0][1].id, publish)
                await self.store.add_instances(
                    [(instance, lease) for (instance, _), lease in zip(chosen, leases, strict=True)]
                )
                break
            except Unschedulable:
                self.view.invalidate()  # someone else took the room: look again
                if attempt == PLACEMENT_TRIES - 1:
                    raise
            except BaseException:
                self._unreserve(chosen)
                raise
        for instance, node in chosen:
            log.info("instance %s scheduled on node %s", instance.name, node.name)
        self.reconciler.publish_changes(
            [Change(instance.id, instance.name, "", "Scheduled") for instance, _ in chosen]
        )
        return chosen

    @staticmethod
    def _scheduled(instance_id: str, spec: InstanceSpec, node: Node) -> Instance:
        return Instance(
            id=instance_id,
            spec=spec,
            node_id=node.id,
            node_name=node.name,
            desired=DesiredState.RUNNING,
            state=InstanceState.SCHEDULED,
            created_at=now(),
        )

    @staticmethod
    def _lease(picker: Picker | None, node: Node, asked: bool) -> Picker | None:
        """The address to lease with the instance: none for a node in user mode, whose VMs
        are off the cluster network (QEMU's NAT): an address leased for them would be shown
        but never used."""
        if picker is None or node.network_mode == "bridge":
            return picker
        if asked:
            raise InvalidArgument(
                f"node {node.name} runs its VMs in user mode, off the cluster network: "
                "--ip and --publish need a node in bridge mode"
            )
        return None

    def _unreserve(self, chosen: Sequence[tuple[Instance, Node]]) -> None:
        for instance, node in chosen:
            self.view.reserve(node.id, instance.spec.resources, count=-1)

    async def _holding(self, labels: Mapping[str, str]) -> dict[str, str]:
        """Node id -> why not there: it holds an instance carrying all of ``labels``."""
        return {
            instance.node_id: spread_conflict(instance.name)
            for instance in await self.store.list_instances(labels=labels)
            if instance.node_id
        }

    async def _set_desired(
        self, name: str, desired: DesiredState, *, force: bool = False
    ) -> Instance:
        instance = await self.get(name)
        if instance.desired == DesiredState.DELETED and desired != DesiredState.DELETED:
            raise Conflict(f"instance {name} is being deleted")
        self.refuse_if_moving(instance)
        await self.store.update_instance(instance.id, desired=desired, held=False)
        instance.desired = desired
        node = await self.store.get_node(instance.node_id) if instance.node_id else None
        await self.reconciler.reconcile(instance, node, by_user=True, force=force)
        return await self.store.get_instance(instance.id)

    def refuse_if_moving(self, instance: Instance) -> None:
        """A move owns the instance until it ends (its plan stops and starts it)."""
        if instance.id in self.reconciler.paused:
            raise Conflict(f"instance {instance.name} is being moved; wait for the move to end")

    async def start(self, name: str) -> tuple[Instance, Operation]:
        instance = await self._set_desired(name, DesiredState.RUNNING)
        work = self.until(instance.id, {InstanceState.RUNNING})
        return instance, self.operations.start("start", name, work)

    async def stop(self, name: str, force: bool = False) -> tuple[Instance, Operation]:
        instance = await self._set_desired(name, DesiredState.STOPPED, force=force)
        work = self.until(instance.id, {InstanceState.STOPPED})
        return instance, self.operations.start("stop", name, work)

    async def restart(self, name: str) -> tuple[Instance, Operation]:
        """Not a desired state: a stop and a start, done by the node in one go."""
        instance = await self.get(name)
        self.refuse_if_moving(instance)
        node = await self._node_of(instance)
        if node.status != NodeStatus.READY:
            raise Unavailable(f"node {node.name} is {node.status.value}; try again once it is back")
        await self.store.update_instance(instance.id, desired=DesiredState.RUNNING, held=False)
        ref = pb.InstanceRef(id=instance.id)
        status = await self.agents.call(node, self._stub(node).Restart, ref)
        await self.reconciler.observe(instance.id, status)
        work = self.until(instance.id, {InstanceState.RUNNING})
        return await self.store.get_instance(instance.id), self.operations.start(
            "restart", name, work
        )

    async def delete(self, name: str) -> tuple[Instance, Operation]:
        """Deleted once its node confirms; on a node that is away, when the node is back."""
        instance = await self.get(name)
        with contextlib.suppress(NotFound):  # the node's report of it being gone came first
            instance = await self._set_desired(name, DesiredState.DELETED)
        return instance, self.operations.start("delete", name, self.until(instance.id, None))

    async def until(self, instance_id: str, targets: set[InstanceState] | None) -> str:
        """Wait until the instance is in one of ``targets`` (None: gone); its final state."""
        return await self.until_all([instance_id], targets)

    async def until_all(
        self,
        instance_ids: Collection[str],
        targets: set[InstanceState] | None,
        progress: Progress | None = None,
    ) -> str:
        """Wait until every one of the instances is in one of ``targets`` (None: gone); the
        final state. The first to fail (or to go, while a state is awaited) ends the wait
        with why; ``progress`` counts those that got there."""
        wanted = {"Deleted"} if targets is None else {state.value for state in targets}
        pending = set(instance_ids)
        # The states their events named since the last check. An event is published once its
        # change is in the store, so one naming a wanted state settles its instance, and one
        # naming a state on the way (Starting) needs no read: a launch storm read each
        # instance again at each step of each launch otherwise. The others are read (one
        # query for all) at the first check, when an event names a failure, and again after
        # UNTIL_RECHECK seconds, then twice as long each time up to UNTIL_RECHECK_MAX: a
        # change seen by another master (its worker syncs there) raises the event on that
        # master only. A thousand launches of many waiting on a backlog re-read 50,000 rows
        # every 5 s, a tenth of the master, for events it had not missed.
        named: dict[str, list[str]] = {}
        loop = asyncio.get_running_loop()
        next_read, gap = 0.0, UNTIL_RECHECK

        def about(event: Event) -> bool:
            named.setdefault(str(event.get("id")), []).append(str(event.get("state")))
            return True

        def arrived(instance_id: str) -> None:
            pending.discard(instance_id)
            if progress is not None:
                progress.done += 1
                progress.stage = f"{progress.done}/{progress.total} {next(iter(wanted))}"

        async def reached() -> bool:
            nonlocal next_read, gap
            seen = dict(named)
            named.clear()
            unsure = set()
            for instance_id, states in seen.items():
                if instance_id not in pending:
                    continue
                if wanted.intersection(states):
                    arrived(instance_id)
                elif {InstanceState.FAILED.value, "Deleted"}.intersection(states):
                    unsure.add(instance_id)
            if loop.time() >= next_read:
                unsure, next_read = set(pending), loop.time() + gap
                gap = min(2 * gap, UNTIL_RECHECK_MAX)
            found = await self.store.states_of(sorted(unsure)) if unsure else {}
            for instance_id in unsure:
                if instance_id not in found:
                    if targets is not None:
                        raise Conflict("the instance was deleted meanwhile")
                    arrived(instance_id)
                    continue
                name, state, message = found[instance_id]
                if targets is not None and state in targets:
                    arrived(instance_id)
                elif targets is not None and state == InstanceState.FAILED:
                    raise DriverError(f"{name} failed: {message or 'no reason'}")
            return not pending

        # Their own changes always raise an event; the slow recheck is only a safety net.
        if not await self.events.wait_for(
            reached, OPERATION_TIMEOUT, keys=list(pending), about=about, recheck=UNTIL_RECHECK
        ):
            raise Unavailable(f"gave up waiting after {OPERATION_TIMEOUT:.0f}s")
        return "Deleted" if targets is None else next(iter(targets)).value

    async def info(self, instances: list[Instance]) -> list[InstanceInfo]:
        """What the guests say of themselves, in ``instances``' order: one call per node,
        the nodes asked at once; a node that fails to answer marks only its instances."""
        running: dict[str, list[Instance]] = {}
        for instance in instances:
            if instance.state == InstanceState.RUNNING and instance.node_id:
                running.setdefault(instance.node_id, []).append(instance)
        nodes = {node.id: node for node in await self.store.list_nodes(ids=list(running))}
        found: dict[str, InstanceInfo] = {}

        async def ask(node_id: str, on_node: list[Instance]) -> None:
            node = nodes.get(node_id)
            if node is None:
                return
            refs = pb.InstanceRefs(ids=[instance.id for instance in on_node])
            try:
                reply = await self.agents.call(node, self._stub(node).InfoMany, refs)
            except MultiverseError as exc:
                found.update((item.id, InstanceInfo(item, None, exc.message)) for item in on_node)
                return
            by_id = {instance.id: instance for instance in on_node}
            for result in reply.results:
                if (instance := by_id.get(result.id)) is not None:
                    stats = None if result.error else convert.stats_from_pb(result.info)
                    found[result.id] = InstanceInfo(instance, stats, result.error)

        await asyncio.gather(*(ask(node_id, items) for node_id, items in running.items()))
        return [found.get(instance.id, InstanceInfo(instance, None)) for instance in instances]

    async def exec(
        self, name: str, command: list[str], stdin: bytes = b""
    ) -> AsyncIterator[pb.ExecOutput]:
        """The command's output chunks; checked before the first chunk, so errors come early."""
        instance = await self.get(name)
        ensure_running(name, instance.state)
        node = await self._node_of(instance)
        call = self._stub(node).Exec(pb.ExecRequest(id=instance.id, command=command, stdin=stdin))
        return _exec_stream(call, node.name)

    async def _session_start(
        self, name: str, command: list[str], size: tuple[int, int] | None
    ) -> tuple[Node, pb.SessionStart]:
        instance = await self.get(name)
        ensure_running(name, instance.state)
        node = await self._node_of(instance)
        cols, rows = size or (0, 0)
        start = pb.SessionStart(
            id=instance.id,
            command=command,
            tty=size is not None,
            size=pb.TerminalSize(cols=cols, rows=rows),
        )
        return node, start

    async def open_session(
        self, name: str, command: list[str], size: tuple[int, int] | None
    ) -> SessionCall:
        """Start a session on the instance's node; the call is ready for input and output."""
        node, start = await self._session_start(name, command, size)
        call: SessionCall = self._stub(node).Session()
        try:
            await call.write(pb.SessionInput(start=start))
        except grpc.aio.AioRpcError as exc:
            raise convert.error_from_rpc(exc, node.name) from exc
        return call

    async def session_ticket(
        self, name: str, command: list[str], size: tuple[int, int] | None
    ) -> DirectSession | None:
        """A session the client opens on the node's agent itself (worker/sessions.py), the
        master only authorizing it; None when that agent serves no such endpoint."""
        node, start = await self._session_start(name, command, size)
        try:
            reply = await self._stub(node).IssueSessionTicket(start, timeout=self.agents.timeout)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                return None  # an agent of a release before direct sessions
            raise convert.error_from_rpc(exc, node.name) from exc
        if not reply.port:
            return None
        host = split_address(node.address)[0]
        host = f"[{host}]" if ":" in host else host
        return DirectSession(
            url=f"wss://{host}:{reply.port}{AGENT_SESSION_PATH}{start.id}",
            ticket=reply.ticket,
            server_name=pki.node_server_name(node.id),
            expires_in=reply.expires_in,
        )

    async def ssh_login(self, name: str, public_key: str) -> tuple[SshLogin, str]:
        """Let ``public_key`` log in to the instance's own SSH server for a short window
        (core/sshlogin.py); with the host part of its node's address, since the login's
        host is as the node sees it (its loopback, often)."""
        parse_public_key(public_key)  # refused here, before the node is asked
        instance = await self.get(name)
        ensure_running(name, instance.state)
        node = await self._node_of(instance)
        request = pb.SshLoginRequest(id=instance.id, public_key=public_key)
        reply = await self.agents.call(node, self._stub(node).AuthorizeSsh, request)
        return convert.ssh_login_from_pb(reply), split_address(node.address)[0]

    async def logs(self, name: str) -> str:
        instance = await self.get(name)
        node = await self._node_of(instance)
        reply = await self.agents.call(node, self._stub(node).Logs, pb.InstanceRef(id=instance.id))
        return str(reply.text)


async def _exec_stream(
    call: AsyncIterator[pb.ExecOutput], node_name: str
) -> AsyncIterator[pb.ExecOutput]:
    try:
        async for chunk in call:
            yield chunk
    except grpc.aio.AioRpcError as exc:
        raise convert.error_from_rpc(exc, node_name) from exc
