"""The agent: instances on this host, their state machine, and the gRPC service over it.

Every action runs as a background task per instance (one at a time per instance), moves the
instance through the states the cluster sees (Creating, Starting, Running, Stopping, Stopped,
Deleting), bumps its ``version`` and wakes the sync client, so the master hears at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, TypeAlias

import grpc

from multiverse.core.errors import (
    Conflict,
    DriverError,
    InvalidArgument,
    MultiverseError,
    NotFound,
    Unauthenticated,
    Unavailable,
)
from multiverse.core.faults import NodeFaults
from multiverse.core.model import (
    IncomingEndpoint,
    InstanceSpec,
    InstanceState,
    LiveProgress,
    ensure_running,
)
from multiverse.core.network import NetworkPlan, Nic
from multiverse.core.sessions import EOF, Resize
from multiverse.core.sizes import format_size
from multiverse.drivers.base import (
    Driver,
    ImageInfo,
    LiveMigratable,
    Migratable,
    NetworkAttachment,
    PowerState,
    Session,
    TerminalSize,
    VMConfig,
)
from multiverse.wire import convert
from multiverse.wire.v1 import multiverse_pb2 as pb
from multiverse.wire.v1 import multiverse_pb2_grpc as pb_grpc
from multiverse.worker import moves
from multiverse.worker.faults import NodeFaultsApplier
from multiverse.worker.imagecache import NodeImageCache
from multiverse.worker.localstore import LocalStore, VMRecord
from multiverse.worker.network import NodeNetwork
from multiverse.worker.sessions import SessionTickets, Ticket, apply_input, output_frames
from multiverse.worker.usage import HostUsage

log = logging.getLogger("multiverse.worker")

Ctx: TypeAlias = grpc.aio.ServicerContext[Any, Any]
Told: TypeAlias = tuple[object, ...]  # what a report says of one instance

_SETTLED = {InstanceState.RUNNING, InstanceState.STOPPED}
# Seconds a relayed session's call stays open after its exit code for the master to end it
# (a master of this release does at once; an older one waited for the call's end instead).
SESSION_LINGER = 5.0
# The message of an instance held here for a live move that has not handed it over yet.
INCOMING = "incoming live move"


def _vm(record: VMRecord, network: NetworkAttachment | None = None) -> VMConfig:
    spec = record.spec
    return VMConfig(
        network=network,
        id=record.id,
        name=spec.name,
        cpus=spec.cpus,
        memory=spec.memory,
        disk=spec.disk,
        image=spec.image,
        user_data=spec.user_data,
    )


def _told(record: VMRecord) -> Told:
    return (record.version, record.state, record.ipv4, record.message, record.release)


class Agent:
    """This host's instances over one Driver."""

    def __init__(
        self,
        driver: Driver,
        store: LocalStore,
        network: NodeNetwork | None = None,
        image_cache: NodeImageCache | None = None,
        faults_dir: Path | None = None,
        usage: HostUsage | None = None,
    ) -> None:
        self.driver = driver
        self.store = store
        # The cluster network on this node (bridge mode); None: user mode (QEMU's NAT).
        self.network = network
        # The node's image cache, for drivers that boot files from it (QEMU, Firecracker).
        self.image_cache = image_cache
        self.usage = usage  # None: reports carry no "used" (the master shows zeros)
        self.records: dict[str, VMRecord] = {record.id: record for record in store.load()}
        self.changed = asyncio.Event()
        self.images: list[ImageInfo] = []  # what the driver can boot, as of the last observe()
        self._locks: dict[str, asyncio.Lock] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        # The faults in force on this node (issue 19); None: this agent takes none.
        self.faults = (
            NodeFaultsApplier(driver, self._fault_vm, faults_dir, networked=network is not None)
            if faults_dir is not None
            else None
        )
        # Cold moves: instance id -> the node allowed to read its files (told by the master).
        self.exports: dict[str, str] = {}
        # How to reach another node's agent (the worker sets it: its node certificate).
        self.peer: Callable[[str, str], pb_grpc.AgentServiceStub] | None = None
        # The node's certificate as QEMU reads x509 credentials (the worker sets it): the
        # TLS of a live move's disk mirror and migration.
        self.tls_dir: Path | None = None
        # Direct sessions (worker/sessions.py): the tickets the master asked for, and the
        # endpoint's port (the worker sets it; 0: no endpoint, sessions go through the master).
        self.tickets = SessionTickets()
        self.session_port = 0

    # ---- state ----

    def _set(
        self, record: VMRecord, state: InstanceState, message: str = "", **fields: str
    ) -> None:
        record.state = state
        record.message = message
        for key, value in fields.items():
            setattr(record, key, value)
        record.version += 1
        self.store.save(record)
        self.changed.set()
        log.info("instance %s %s %s", record.spec.name, state.value, message)

    def get(self, instance_id: str) -> VMRecord:
        try:
            return self.records[instance_id]
        except KeyError:
            raise NotFound(f"no instance {instance_id} on this node") from None

    def running(self, instance_id: str) -> VMRecord:
        """The record of a Running instance; a clear Conflict otherwise."""
        record = self.get(instance_id)
        ensure_running(record.spec.name, record.state)
        return record

    def status_pb(self, record: VMRecord) -> pb.InstanceStatus:
        return pb.InstanceStatus(
            id=record.id,
            name=record.spec.name,
            state=record.state.value,
            ipv4=record.ipv4,
            message=record.message,
            version=record.version,
            release=record.release,
        )

    async def report(self, since: Mapping[str, Told] | None = None) -> pb.NodeReport:
        """The node's report: full, or a delta from ``since`` (what :meth:`told` said when
        the previous report went out) naming only the instances that changed or went."""
        capacity = convert.resources_to_pb(await self.driver.capacity())
        # No await from here on: the caller takes told() right after, of the same records.
        records = [
            record for instance_id, record in self.records.items()
            if since is None or since.get(instance_id) != _told(record)
        ]  # fmt: skip
        return pb.NodeReport(
            capacity=capacity,
            instances=[self.status_pb(record) for record in records],
            images=[
                pb.ImageInfo(name=i.name, kind=i.kind, digest=i.digest, size=i.size)
                for i in self.images
            ],
            used=convert.usage_to_pb(self.usage.measure()) if self.usage else None,
            delta=since is not None,
            removed=[] if since is None else [i for i in since if i not in self.records],
        )

    def told(self) -> dict[str, Told]:
        """What a report says of each instance now, to send only what changes next time."""
        return {instance_id: _told(record) for instance_id, record in self.records.items()}

    # ---- actions: each returns at once, the work goes on in a task ----

    def _run(self, record: VMRecord, work: Callable[[VMRecord], Awaitable[None]]) -> None:
        lock = self._locks.setdefault(record.id, asyncio.Lock())

        async def guarded() -> None:
            async with lock:
                try:
                    await work(record)
                except MultiverseError as exc:
                    self._set(record, InstanceState.FAILED, exc.message)
                except Exception as exc:  # a driver bug must not kill the agent
                    log.exception("instance %s: %s failed", record.spec.name, work.__name__)
                    self._set(record, InstanceState.FAILED, f"{type(exc).__name__}: {exc}")

        task = asyncio.create_task(guarded())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def launch(
        self, instance_id: str, spec: InstanceSpec, nic: Nic | None = None
    ) -> VMRecord:
        record = self.records.get(instance_id)
        if record is not None:  # a retried launch: idempotent
            if record.state == InstanceState.FAILED:
                # The master's retry of a create or boot that failed here (its reconciler
                # launches a Failed instance that should run): try the whole of it again.
                self._set(record, InstanceState.CREATING)
                self._run(record, self._create_and_boot)
            return record
        record = VMRecord(id=instance_id, spec=spec, nic=nic if self.network else None)
        if self.image_cache is not None:
            await self.image_cache.resolve(spec.image)  # an unknown image is refused at once
        await self.driver.validate(_vm(record))
        self.records[instance_id] = record
        self._set(record, InstanceState.CREATING)
        self._run(record, self._create_and_boot)
        return record

    async def start(self, instance_id: str) -> VMRecord:
        record = self.get(instance_id)
        if record.state in (InstanceState.DELETING,):
            raise Conflict(f"instance {record.spec.name} is being deleted")
        if record.state != InstanceState.RUNNING:
            self._set(record, InstanceState.STARTING)
            self._run(record, self._boot)
        return record

    async def stop(self, instance_id: str, force: bool = False) -> VMRecord:
        record = self.get(instance_id)
        if record.state == InstanceState.DELETING:
            raise Conflict(f"instance {record.spec.name} is being deleted")
        if record.state != InstanceState.STOPPED:
            self._set(record, InstanceState.STOPPING)

            async def shut_down(record: VMRecord) -> None:
                await self.driver.stop(_vm(record), force=force)
                if self.network is not None:
                    await self.network.detach(record.id)
                self._set(record, InstanceState.STOPPED, ipv4="")

            self._run(record, shut_down)
        return record

    async def restart(self, instance_id: str) -> VMRecord:
        record = self.get(instance_id)
        if record.state == InstanceState.DELETING:
            raise Conflict(f"instance {record.spec.name} is being deleted")
        self._set(record, InstanceState.STOPPING)

        async def cycle(record: VMRecord) -> None:
            await self.driver.stop(_vm(record))
            self._set(record, InstanceState.STARTING, ipv4="")
            await self._boot(record)

        self._run(record, cycle)
        return record

    async def delete(self, instance_id: str) -> VMRecord | None:
        record = self.records.get(instance_id)
        if record is None:
            return None
        self._set(record, InstanceState.DELETING)
        self._run(record, self._destroy)
        return record

    async def _create_and_boot(self, record: VMRecord) -> None:
        if self.image_cache is not None:
            await self._pull_for(record)
        await self.driver.create(_vm(record))
        self._set(record, InstanceState.STARTING)
        await self._boot(record)

    async def _pull_for(self, record: VMRecord) -> None:
        """Get the instance's image into the cache; the instance's message tells the progress
        (the launch operation shows it), at most twice a second."""
        assert self.image_cache is not None
        image = record.spec.image
        shown = 0.0

        def progress(done: int, total: int) -> None:
            nonlocal shown
            if done >= total or time.monotonic() - shown < 0.5:
                return
            shown = time.monotonic()
            message = f"pulling image {image}: {format_size(done)} of {format_size(total)}"
            self._set(record, InstanceState.CREATING, message)

        await self.image_cache.ensure(image, progress)
        if record.message:
            self._set(record, InstanceState.CREATING)
        await self.refresh_images()

    async def pull_image(self, name: str) -> AsyncIterator[tuple[str, int, int]]:
        """Warm the cache with ``name``: (digest, bytes here, bytes in all) as it goes."""
        if self.image_cache is None:
            raise Conflict(f"the {self.driver.name} driver keeps no image cache")
        updates: asyncio.Queue[tuple[int, int]] = asyncio.Queue()
        pulling = asyncio.create_task(
            self.image_cache.ensure(name, lambda done, total: updates.put_nowait((done, total)))
        )
        try:
            while not pulling.done() or not updates.empty():
                waiter = asyncio.ensure_future(updates.get())
                await asyncio.wait({waiter, pulling}, return_when=asyncio.FIRST_COMPLETED)
                if waiter.done():
                    yield ("", *waiter.result())
                else:
                    waiter.cancel()
            image = pulling.result()
        finally:
            pulling.cancel()
        await self.refresh_images()
        yield (image.digest, image.size, image.size)

    async def refresh_images(self) -> None:
        """What the driver can boot now, told to the master with the next report."""
        try:
            images = await self.driver.images()
        except (MultiverseError, OSError) as exc:
            log.warning("cannot list the images: %s", exc)
            return
        if images != self.images:
            self.images = images
            self.changed.set()

    async def _boot(self, record: VMRecord) -> None:
        attachment = None
        if self.network is not None and record.nic is not None:
            attachment = await self.network.attach(record.id, record.nic)
        status = await self.driver.start(_vm(record, attachment))
        # Running is told the moment the guest answers; its release, which takes one more
        # command in the guest (~50 ms under TCG, far more on a busy host), follows.
        self._set(record, InstanceState.RUNNING, ipv4=status.ipv4)
        with contextlib.suppress(MultiverseError):
            release = (await self.driver.stats(_vm(record))).release
            if record.state == InstanceState.RUNNING and release != record.release:
                self._set(record, InstanceState.RUNNING, record.message, release=release)

    async def _destroy(self, record: VMRecord) -> None:
        await self.driver.delete(_vm(record))
        if self.network is not None:
            await self.network.detach(record.id)
        self.records.pop(record.id, None)
        self._locks.pop(record.id, None)
        self.store.remove(record.id)
        self.changed.set()
        log.info("instance %s deleted", record.spec.name)

    # ---- cold moves ----

    def _migratable(self) -> Migratable:
        if not isinstance(self.driver, Migratable):
            raise InvalidArgument(f"the {self.driver.name} driver cannot move instances")
        return self.driver

    async def export(self, instance_id: str, target_node_id: str) -> list[moves.MoveFile]:
        """Let ``target_node_id`` read the stopped instance's files; their sizes and sha256."""
        record = self.get(instance_id)
        if record.state != InstanceState.STOPPED:
            raise Conflict(f"instance {record.spec.name} is {record.state.value}; stop it first")
        files = self._migratable().export_files(_vm(record))
        self.exports[instance_id] = target_node_id
        return await moves.manifest(files)

    def export_path(self, instance_id: str, name: str, peer_node_id: str | None) -> Path:
        """The file a target node may read; refused to any other caller."""
        if peer_node_id is None or self.exports.get(instance_id) != peer_node_id:
            raise Unauthenticated("this node was not named as the target of a move")
        record = self.get(instance_id)
        files = self._migratable().export_files(_vm(record))
        if name not in files:
            raise NotFound(f"instance {record.spec.name} has no file {name!r}")
        return files[name]

    async def import_(
        self,
        instance_id: str,
        spec: InstanceSpec,
        source: tuple[str, str],
        files: list[moves.MoveFile],
        progress: Callable[[int, int], None],
        nic: Nic | None = None,
    ) -> VMRecord:
        """Pull the instance's files from the source node (id, address) and hold it Stopped.

        Idempotent: an instance imported already is answered as it is; an interrupted pull
        continues where it stopped. The counter-action is :meth:`abort_import`.
        """
        if (record := self.records.get(instance_id)) is not None:
            return record
        driver = self._migratable()
        vm = VMConfig(instance_id, spec.name, spec.cpus, spec.memory, spec.disk, spec.image,
                      spec.user_data)  # fmt: skip
        await self._have_image(spec.image)
        await self.driver.validate(vm)
        if self.peer is None:
            raise Conflict("this agent has no identity to call other nodes with yet")
        lock = self._locks.setdefault(instance_id, asyncio.Lock())
        async with lock:
            stub = self.peer(*source)
            try:
                await moves.pull(stub, source[0], instance_id, files, driver.incoming_dir(vm),
                                 progress)  # fmt: skip
            except OSError as exc:
                raise DriverError(f"cannot write the moved files: {exc}") from exc
            await driver.adopt_incoming(vm)
            # Its address and MAC as on the source: the cluster network moves with it.
            record = VMRecord(id=instance_id, spec=spec, nic=nic if self.network else None)
            self.records[instance_id] = record
            self._set(record, InstanceState.STOPPED)
        return record

    async def abort_import(self, instance_id: str) -> None:
        """Forget an import that did not become the instance (a rolled-back move)."""
        record = self.records.get(instance_id)
        if record is None:
            spec_vm = VMConfig(instance_id, "", 0, 0, 0, "")
            await self._migratable().abort_incoming(spec_vm)
            return
        await self.delete(instance_id)

    async def _have_image(self, image: str) -> None:
        """A moved instance's image, pulled through the image store when this node lacks it
        (a disk image's overlay needs its very base here)."""
        cache = self.image_cache
        if cache is not None and cache.lookup(image) is None:
            await cache.ensure(image, lambda done, total: None)
            await self.refresh_images()

    # ---- live moves ----

    def _live(self) -> LiveMigratable:
        if not isinstance(self.driver, LiveMigratable):
            raise InvalidArgument(f"the {self.driver.name} driver cannot move instances live")
        return self.driver

    def _tls(self) -> Path:
        if self.tls_dir is None:
            raise Conflict("this agent has no certificate for live moves yet")
        return self.tls_dir

    async def prepare_incoming(
        self, instance_id: str, spec: InstanceSpec, nic: Nic | None, host: str
    ) -> IncomingEndpoint:
        """Hold the instance here as a VM waiting for its state (Stopped to the cluster until
        :meth:`finish_incoming`); a VM prepared before is replaced. The counter-action is
        :meth:`abort_import`."""
        record = self.records.get(instance_id)
        # Anything else held here is what an earlier attempt left: replaced. Never a VM that
        # runs here (it would be this instance, handed over already).
        if record is not None and record.state == InstanceState.RUNNING:
            raise Conflict(f"instance {spec.name} is Running on this node already")
        driver, tls_dir = self._live(), self._tls()
        await self._have_image(spec.image)
        record = record or VMRecord(id=instance_id, spec=spec, nic=nic if self.network else None)
        lock = self._locks.setdefault(instance_id, asyncio.Lock())
        async with lock:
            # Recorded first: an agent killed while its QEMU starts finds it to clean up.
            self.records[instance_id] = record
            self._set(record, InstanceState.STOPPED, INCOMING)
            attachment = None
            if self.network is not None and record.nic is not None:
                attachment = await self.network.attach(record.id, record.nic)
            return await driver.prepare_incoming(_vm(record, attachment), host, tls_dir)

    async def migrate_out(
        self, instance_id: str, to: IncomingEndpoint, progress: Callable[[LiveProgress], None]
    ) -> LiveProgress:
        """Send the running instance to the target that :meth:`prepare_incoming` readied;
        a failure (or the caller going away) leaves it running here."""
        record = self.running(instance_id)
        driver, tls_dir = self._live(), self._tls()
        async with self._locks.setdefault(instance_id, asyncio.Lock()):
            return await driver.migrate_out(_vm(record), to, tls_dir, progress)

    async def abort_migrate_out(self, instance_id: str) -> None:
        record = self.records.get(instance_id)
        if record is not None and record.state == InstanceState.RUNNING:
            await self._live().abort_migrate_out(_vm(record))

    async def finish_incoming(self, instance_id: str, host_key: str) -> VMRecord:
        """The state arrived: let the VM run here. Idempotent."""
        record = self.get(instance_id)
        if record.state == InstanceState.RUNNING:
            return record
        if record.message != INCOMING:
            raise Conflict(f"instance {record.spec.name} is not waiting for a live move here")
        async with self._locks.setdefault(instance_id, asyncio.Lock()):
            status = await self._live().finish_incoming(_vm(record), host_key)
            self._set(record, InstanceState.RUNNING, ipv4=status.ipv4)
        return record

    async def apply_network(self, plan: NetworkPlan) -> None:
        """Converge this node to the master's view of the network; records launched before
        their node had the network learn their interface from it."""
        if self.network is None:
            return
        await self.network.ensure(plan)
        for vm_id, nic in plan.nics.items():
            record = self.records.get(vm_id)
            if record is not None and record.nic != nic:
                record.nic = nic
                self.store.save(record)

    def _fault_vm(self, instance_id: str) -> VMConfig | None:
        record = self.records.get(instance_id)
        return _vm(record) if record is not None else None

    async def apply_faults(self, faults: NodeFaults) -> None:
        """Converge this node to the faults the master says are in force here."""
        if self.faults is None:
            raise Unavailable("this node does not take faults")
        await self.faults.converge(faults)

    # ---- the hypervisor's truth ----

    async def observe(self) -> None:
        """Align settled records with what the hypervisor says (a VM can die behind our back).

        Also used once at start, where it adopts the VMs that kept running while the agent
        was away and settles the actions the agent was killed in the middle of.
        """
        await self.refresh_images()
        for record in list(self.records.values()):
            lock = self._locks.setdefault(record.id, asyncio.Lock())
            if lock.locked():
                continue  # an action is under way; it will set the state
            async with lock:
                try:
                    status = await self.driver.status(_vm(record))
                except MultiverseError as exc:
                    if record.state != InstanceState.UNKNOWN or record.message != exc.message:
                        self._set(record, InstanceState.UNKNOWN, exc.message)
                    continue
                await self._settle(record, status.power, status.ipv4)

    async def _settle(self, record: VMRecord, power: PowerState, ipv4: str) -> None:
        if record.state == InstanceState.DELETING:
            self._run(record, self._destroy)
        elif power == PowerState.RUNNING and record.state != InstanceState.RUNNING:
            self._set(record, InstanceState.RUNNING, ipv4=ipv4 or record.ipv4)
        elif power == PowerState.STOPPED and record.state not in (
            InstanceState.STOPPED,
            InstanceState.FAILED,
        ):
            why = "" if record.state in _SETTLED else f"interrupted while {record.state.value}"
            self._set(record, InstanceState.STOPPED, why, ipv4="")
            await self._detach(record)  # it stopped by itself (a guest poweroff): no tap kept
        elif power == PowerState.MISSING and record.state != InstanceState.FAILED:
            self._set(record, InstanceState.FAILED, "the hypervisor has no such VM")
            await self._detach(record)

    async def _detach(self, record: VMRecord) -> None:
        """Unplug a VM found down; a failure is retried by its next start or delete."""
        if self.network is None:
            return
        try:
            await self.network.detach(record.id)
        except MultiverseError as exc:
            log.warning("instance %s: cannot detach its network: %s", record.spec.name, exc)

    async def open_session(self, wanted: Ticket) -> Session:
        """The session a ticket (or the master's relayed start) asks for, on a running VM."""
        record = self.running(wanted.instance_id)
        return await self.driver.open_session(
            _vm(record), list(wanted.command) or None, wanted.size
        )

    async def shutdown(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.driver.close()


async def _feed(
    inputs: AsyncIterator[pb.SessionInput], session: Session, ended: asyncio.Event
) -> None:
    """Input, resizes and end-of-input from the master into the session, in order; once the
    process has ended, what still comes is read and dropped, until the master ends the call."""
    async for message in inputs:
        if ended.is_set():
            continue
        kind = message.WhichOneof("kind")
        if kind == "data":
            await apply_input(session, message.data)
        elif kind == "resize":
            await apply_input(session, Resize(message.resize.cols, message.resize.rows))
        elif kind == "eof":
            await apply_input(session, EOF)


def _ticket_of(start: pb.SessionStart) -> Ticket:
    """What a session's start asks for; a session relayed by the master has no expiry."""
    size = TerminalSize(start.size.cols or 80, start.size.rows or 24) if start.tty else None
    return Ticket(start.id, tuple(start.command), size, expires=float("inf"))


class AgentServicer(pb_grpc.AgentServiceServicer):
    """The gRPC face of the agent. Serves only the master that holds this node's secret."""

    def __init__(
        self,
        agent: Agent,
        authorize: Callable[[Ctx], bool],
        peer_node: Callable[[Ctx], str | None] = lambda context: None,
    ) -> None:
        self.agent = agent
        self._authorize = authorize
        # The calling node's id when another node calls (ReadFile of a move), else None.
        self._peer_node = peer_node

    async def _guard(self, context: Ctx) -> None:
        if not self._authorize(context):
            await context.abort(
                *convert.error_to_rpc(Unauthenticated("not the master of this node"))
            )

    async def _call(
        self, context: Ctx, action: Callable[[], Awaitable[VMRecord | None]]
    ) -> pb.InstanceStatus:
        await self._guard(context)
        try:
            record = await action()
        except MultiverseError as exc:
            await context.abort(*convert.error_to_rpc(exc))
            raise AssertionError("unreachable") from exc
        return self.agent.status_pb(record) if record else pb.InstanceStatus()

    async def _done(self, context: Ctx, action: Callable[[], Awaitable[object]]) -> pb.Empty:
        """A call answered by nothing but success, or the error as its status."""
        await self._guard(context)
        try:
            await action()
        except MultiverseError as exc:
            await context.abort(*convert.error_to_rpc(exc))
        return pb.Empty()

    async def Launch(self, request: pb.LaunchRequest, context: Ctx) -> pb.InstanceStatus:
        instance_id, spec = convert.spec_from_pb(request.spec)
        nic = convert.nic_from_pb(request.spec.nic)
        return await self._call(context, lambda: self.agent.launch(instance_id, spec, nic))

    async def Start(self, request: pb.InstanceRef, context: Ctx) -> pb.InstanceStatus:
        return await self._call(context, lambda: self.agent.start(request.id))

    async def Stop(self, request: pb.StopRequest, context: Ctx) -> pb.InstanceStatus:
        return await self._call(context, lambda: self.agent.stop(request.id, request.force))

    async def Restart(self, request: pb.InstanceRef, context: Ctx) -> pb.InstanceStatus:
        return await self._call(context, lambda: self.agent.restart(request.id))

    async def Delete(self, request: pb.InstanceRef, context: Ctx) -> pb.InstanceStatus:
        return await self._call(context, lambda: self.agent.delete(request.id))

    async def _info(self, instance_id: str) -> pb.InstanceInfo:
        record = self.agent.running(instance_id)
        stats = await self.agent.driver.stats(_vm(record))
        return convert.stats_to_pb(self.agent.status_pb(record), stats)

    async def Info(self, request: pb.InstanceRef, context: Ctx) -> pb.InstanceInfo:
        await self._guard(context)
        try:
            return await self._info(request.id)
        except MultiverseError as exc:
            await context.abort(*convert.error_to_rpc(exc))
            raise AssertionError("unreachable") from exc

    async def InfoMany(self, request: pb.InstanceRefs, context: Ctx) -> pb.InfoResults:
        """Info of many instances in one call; each answers alone, failures included."""
        await self._guard(context)

        async def one(instance_id: str) -> pb.InfoResult:
            try:
                return pb.InfoResult(id=instance_id, info=await self._info(instance_id))
            except MultiverseError as exc:
                return pb.InfoResult(id=instance_id, error=exc.message)

        return pb.InfoResults(results=await asyncio.gather(*map(one, request.ids)))

    async def Exec(self, request: pb.ExecRequest, context: Ctx) -> AsyncIterator[pb.ExecOutput]:
        await self._guard(context)
        try:
            record = self.agent.running(request.id)
            async for chunk in self.agent.driver.exec(
                _vm(record), list(request.command), request.stdin
            ):
                if chunk.exit_code is not None:
                    yield pb.ExecOutput(exited=True, exit_code=chunk.exit_code)
                else:
                    yield pb.ExecOutput(stream=chunk.stream, data=chunk.data)
        except MultiverseError as exc:
            await context.abort(*convert.error_to_rpc(exc))

    async def Session(
        self, request_iterator: AsyncIterator[pb.SessionInput], context: Ctx
    ) -> AsyncIterator[pb.SessionOutput]:
        """Relay one interactive session; closing the call ends the process in the guest."""
        await self._guard(context)
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("kind") != "start":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "invalid_argument:start first")
            return
        try:
            session = await self.agent.open_session(_ticket_of(first.start))
        except MultiverseError as exc:
            await context.abort(*convert.error_to_rpc(exc))
            return
        ended = asyncio.Event()
        feeder = asyncio.create_task(_feed(request_iterator, session, ended))
        try:
            async for data in output_frames(session):
                yield pb.SessionOutput(data=data)
            code = await session.wait()
            ended.set()
            yield pb.SessionOutput(exit_code=code)
            # Held open until the master, told the exit code, cancels or half-closes the call:
            # finishing it first would make a write of the master's still in flight (the
            # client's end-of-input, say) fail the call on the master's side, and grpc then
            # drops the messages it had not handed over, exit code included.
            # (Input the ended process could not take is no error of the session's.)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(feeder), SESSION_LINGER)
        finally:
            feeder.cancel()
            await session.close()

    async def IssueSessionTicket(self, request: pb.SessionStart, context: Ctx) -> pb.SessionTicket:
        """A ticket for this session at the agent's own endpoint (worker/sessions.py)."""
        await self._guard(context)
        try:
            self.agent.running(request.id)  # refused now, not when the client comes
        except MultiverseError as exc:
            await context.abort(*convert.error_to_rpc(exc))
            raise AssertionError("unreachable") from exc
        if not self.agent.session_port:
            return pb.SessionTicket()  # no endpoint here: the client goes through the master
        wanted = _ticket_of(request)
        secret = self.agent.tickets.issue(wanted.instance_id, wanted.command, wanted.size)
        return pb.SessionTicket(
            ticket=secret, port=self.agent.session_port, expires_in=self.agent.tickets.ttl
        )

    async def AuthorizeSsh(self, request: pb.SshLoginRequest, context: Ctx) -> pb.SshLogin:
        await self._guard(context)
        try:
            record = self.agent.running(request.id)
            login = await self.agent.driver.ssh_login(_vm(record), request.public_key)
        except MultiverseError as exc:
            await context.abort(*convert.error_to_rpc(exc))
            raise AssertionError("unreachable") from exc
        return convert.ssh_login_to_pb(login)

    async def Logs(self, request: pb.InstanceRef, context: Ctx) -> pb.LogsResponse:
        await self._guard(context)
        try:
            record = self.agent.get(request.id)
            return pb.LogsResponse(text=await self.agent.driver.logs(_vm(record)))
        except MultiverseError as exc:
            await context.abort(*convert.error_to_rpc(exc))
            raise AssertionError("unreachable") from exc

    async def ApplyFaults(self, request: pb.NodeFaults, context: Ctx) -> pb.Empty:
        return await self._done(
            context, lambda: self.agent.apply_faults(convert.faults_from_pb(request))
        )

    async def Report(self, request: pb.Empty, context: Ctx) -> pb.NodeReport:
        await self._guard(context)
        return await self.agent.report()

    async def PullImage(self, request: pb.ImageRef, context: Ctx) -> AsyncIterator[pb.PullProgress]:
        await self._guard(context)
        try:
            async for digest, done, total in self.agent.pull_image(request.name):
                yield pb.PullProgress(digest=digest, done=done, total=total)
        except MultiverseError as exc:
            await context.abort(*convert.error_to_rpc(exc))

    async def Export(self, request: pb.ExportRequest, context: Ctx) -> pb.ExportManifest:
        await self._guard(context)
        try:
            files = await self.agent.export(request.id, request.target_node_id)
        except MultiverseError as exc:
            await context.abort(*convert.error_to_rpc(exc))
            raise AssertionError("unreachable") from exc
        return pb.ExportManifest(
            files=[pb.MoveFile(name=f.name, size=f.size, sha256=f.sha256) for f in files]
        )

    async def ReadFile(
        self, request: pb.ReadFileRequest, context: Ctx
    ) -> AsyncIterator[pb.FileChunk]:
        """The one method another node may call: the target of a move, reading the files."""
        try:
            path = self.agent.export_path(request.id, request.name, self._peer_node(context))
        except MultiverseError as exc:
            await context.abort(*convert.error_to_rpc(exc))
            return
        async for chunk in moves.read_chunks(path, request.offset):
            yield chunk

    async def Import(
        self, request: pb.ImportRequest, context: Ctx
    ) -> AsyncIterator[pb.ImportProgress]:
        await self._guard(context)
        instance_id, spec = convert.spec_from_pb(request.spec)
        files = [moves.MoveFile(f.name, f.size, f.sha256) for f in request.files]
        updates: asyncio.Queue[tuple[int, int]] = asyncio.Queue()
        work = asyncio.ensure_future(
            self.agent.import_(
                instance_id, spec, (request.source_node_id, request.source_address), files,
                lambda done, total: updates.put_nowait((done, total)),
                convert.nic_from_pb(request.spec.nic),
            )
        )  # fmt: skip
        try:
            while not work.done():
                waiter = asyncio.ensure_future(updates.get())
                await asyncio.wait({work, waiter}, return_when=asyncio.FIRST_COMPLETED)
                if not waiter.done():
                    waiter.cancel()
                    continue
                done, total = waiter.result()
                while not updates.empty():  # only the newest figure matters
                    done, total = updates.get_nowait()
                yield pb.ImportProgress(bytes_done=done, bytes_total=total)
            record = work.result()
        except MultiverseError as exc:
            await context.abort(*convert.error_to_rpc(exc))
            return
        finally:
            work.cancel()
        yield pb.ImportProgress(status=self.agent.status_pb(record))

    async def AbortImport(self, request: pb.AbortImportRequest, context: Ctx) -> pb.Empty:
        return await self._done(context, lambda: self.agent.abort_import(request.id))

    async def PrepareIncoming(
        self, request: pb.PrepareIncomingRequest, context: Ctx
    ) -> pb.IncomingEndpoint:
        await self._guard(context)
        instance_id, spec = convert.spec_from_pb(request.spec)
        try:
            endpoint = await self.agent.prepare_incoming(
                instance_id, spec, convert.nic_from_pb(request.spec.nic), request.listen_host
            )
        except MultiverseError as exc:
            await context.abort(*convert.error_to_rpc(exc))
            raise AssertionError("unreachable") from exc
        return convert.endpoint_to_pb(endpoint)

    async def MigrateOut(
        self, request: pb.MigrateOutRequest, context: Ctx
    ) -> AsyncIterator[pb.LiveProgress]:
        await self._guard(context)
        updates: asyncio.Queue[LiveProgress] = asyncio.Queue()
        work = asyncio.ensure_future(
            self.agent.migrate_out(
                request.id, convert.endpoint_from_pb(request.target), updates.put_nowait
            )
        )
        try:
            while not work.done():
                waiter = asyncio.ensure_future(updates.get())
                await asyncio.wait({work, waiter}, return_when=asyncio.FIRST_COMPLETED)
                if not waiter.done():
                    waiter.cancel()
                    continue
                update = waiter.result()
                while not updates.empty():  # only the newest figure matters
                    update = updates.get_nowait()
                yield convert.live_progress_to_pb(update)
            last = work.result()
        except MultiverseError as exc:
            await context.abort(*convert.error_to_rpc(exc))
            return
        finally:
            if not work.done():  # the master went away: the driver rolls the source back
                work.cancel()
                await asyncio.gather(work, return_exceptions=True)
        message = convert.live_progress_to_pb(last)
        message.done = True
        yield message

    async def AbortMigrateOut(self, request: pb.InstanceRef, context: Ctx) -> pb.Empty:
        return await self._done(context, lambda: self.agent.abort_migrate_out(request.id))

    async def FinishIncoming(
        self, request: pb.FinishIncomingRequest, context: Ctx
    ) -> pb.InstanceStatus:
        return await self._call(
            context, lambda: self.agent.finish_incoming(request.id, request.host_key)
        )
