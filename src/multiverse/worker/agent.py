"""The agent: instances on this host, their state machine, and the gRPC service over it.

Every action runs as a background task per instance (one at a time per instance), moves the
instance through the states the cluster sees (Creating, Starting, Running, Stopping, Stopped,
Deleting), bumps its ``version`` and wakes the sync client, so the master hears at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeAlias

import grpc

from multiverse.core.errors import Conflict, MultiverseError, NotFound, Unauthenticated
from multiverse.core.model import InstanceSpec, InstanceState, ensure_running
from multiverse.core.network import NetworkPlan, Nic
from multiverse.drivers.base import (
    Driver,
    ImageInfo,
    NetworkAttachment,
    PowerState,
    Session,
    TerminalSize,
    VMConfig,
)
from multiverse.wire import convert
from multiverse.wire.v1 import multiverse_pb2 as pb
from multiverse.wire.v1 import multiverse_pb2_grpc as pb_grpc
from multiverse.worker.localstore import LocalStore, VMRecord
from multiverse.worker.network import NodeNetwork

log = logging.getLogger("multiverse.worker")

Ctx: TypeAlias = grpc.aio.ServicerContext[Any, Any]

_SETTLED = {InstanceState.RUNNING, InstanceState.STOPPED}


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


class Agent:
    """This host's instances over one Driver."""

    def __init__(
        self, driver: Driver, store: LocalStore, network: NodeNetwork | None = None
    ) -> None:
        self.driver = driver
        self.store = store
        # The cluster network on this node (bridge mode); None: the driver's user-mode fallback.
        self.network = network
        self.records: dict[str, VMRecord] = {record.id: record for record in store.load()}
        self.changed = asyncio.Event()
        self.images: list[ImageInfo] = []  # what the driver can boot, as of the last observe()
        self._locks: dict[str, asyncio.Lock] = {}
        self._tasks: set[asyncio.Task[None]] = set()

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

    async def report(self) -> pb.NodeReport:
        return pb.NodeReport(
            capacity=convert.resources_to_pb(await self.driver.capacity()),
            instances=[self.status_pb(record) for record in self.records.values()],
            images=[
                pb.ImageInfo(name=i.name, kind=i.kind, digest=i.digest, size=i.size)
                for i in self.images
            ],
        )

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
            return record
        record = VMRecord(id=instance_id, spec=spec, nic=nic if self.network else None)
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
        await self.driver.create(_vm(record))
        self._set(record, InstanceState.STARTING)
        await self._boot(record)

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

    # ---- the hypervisor's truth ----

    async def observe(self) -> None:
        """Align settled records with what the hypervisor says (a VM can die behind our back).

        Also used once at start, where it adopts the VMs that kept running while the agent
        was away and settles the actions the agent was killed in the middle of.
        """
        try:
            self.images = await self.driver.images()
        except (MultiverseError, OSError) as exc:
            log.warning("cannot list the images: %s", exc)
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
        elif power == PowerState.MISSING and record.state != InstanceState.FAILED:
            self._set(record, InstanceState.FAILED, "the hypervisor has no such VM")

    async def shutdown(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.driver.close()


async def _feed(inputs: AsyncIterator[pb.SessionInput], session: Session) -> None:
    """Input, resizes and end-of-input from the master into the session, in order."""
    async for message in inputs:
        kind = message.WhichOneof("kind")
        if kind == "data":
            await session.write(message.data)
        elif kind == "resize":
            await session.resize(message.resize.cols, message.resize.rows)
        elif kind == "eof":
            await session.close_input()


class AgentServicer(pb_grpc.AgentServiceServicer):
    """The gRPC face of the agent. Serves only the master that holds this node's secret."""

    def __init__(self, agent: Agent, authorize: Callable[[Ctx], bool]) -> None:
        self.agent = agent
        self._authorize = authorize

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
        start = first.start
        try:
            record = self.agent.running(start.id)
            size = TerminalSize(start.size.cols or 80, start.size.rows or 24) if start.tty else None
            session = await self.agent.driver.open_session(
                _vm(record), list(start.command) or None, size
            )
        except MultiverseError as exc:
            await context.abort(*convert.error_to_rpc(exc))
            return
        feeder = asyncio.create_task(_feed(request_iterator, session))
        try:
            while data := await session.read():
                yield pb.SessionOutput(data=data)
            yield pb.SessionOutput(exit_code=await session.wait())
        finally:
            feeder.cancel()
            await session.close()

    async def Logs(self, request: pb.InstanceRef, context: Ctx) -> pb.LogsResponse:
        await self._guard(context)
        try:
            record = self.agent.get(request.id)
            return pb.LogsResponse(text=await self.agent.driver.logs(_vm(record)))
        except MultiverseError as exc:
            await context.abort(*convert.error_to_rpc(exc))
            raise AssertionError("unreachable") from exc

    async def Report(self, request: pb.Empty, context: Ctx) -> pb.NodeReport:
        await self._guard(context)
        return await self.agent.report()
