"""Instance actions as the API offers them: launch, start, stop, restart, delete, info, exec.

Placement is decided and recorded under one lock, so concurrent launches see each other's
reservations and never oversubscribe a node; the unique name constraint settles duplicates.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import TypeAlias

import grpc

from multiverse.core.errors import AlreadyExists, Conflict, MultiverseError, NotFound
from multiverse.core.model import (
    DesiredState,
    GuestStats,
    Instance,
    InstanceSpec,
    InstanceState,
    Node,
    ensure_running,
)
from multiverse.master.cluster import Agents, status_dict
from multiverse.master.scheduler import Strategy, place
from multiverse.store.repository import Store, now
from multiverse.wire import convert
from multiverse.wire.v1 import multiverse_pb2 as pb
from multiverse.wire.v1 import multiverse_pb2_grpc as pb_grpc

log = logging.getLogger("multiverse.master")

SessionCall: TypeAlias = grpc.aio.StreamStreamCall[pb.SessionInput, pb.SessionOutput]


@dataclass(frozen=True)
class InstanceInfo:
    instance: Instance
    stats: GuestStats | None  # None when the instance is not running or its node is away
    error: str = ""


class Instances:
    def __init__(self, store: Store, agents: Agents) -> None:
        self.store = store
        self.agents = agents
        self._placing = asyncio.Lock()

    def get(self, name: str) -> Instance:
        return self.store.find_instance(name)

    def _node_of(self, instance: Instance) -> Node:
        if instance.node_id is None:
            raise Conflict(f"instance {instance.name} is not placed on any node")
        return self.store.get_node(instance.node_id)

    def _stub(self, node: Node) -> pb_grpc.AgentServiceStub:
        return self.agents.stub(node)

    def _observe(self, instance_id: str, status: pb.InstanceStatus) -> Instance:
        if status.id:
            self.store.observe_instance(instance_id, status_dict(status))
        return self.store.get_instance(instance_id)

    async def launch(
        self,
        spec: InstanceSpec,
        *,
        node_name: str | None = None,
        selector: Mapping[str, str] | None = None,
        strategy: Strategy = "spread",
    ) -> Instance:
        spec.validate()
        async with self._placing:
            if self.store.list_instances(names=[spec.name]):
                raise AlreadyExists(f"an instance named {spec.name!r} exists already")
            nodes = [self.store.find_node(node_name)] if node_name else self.store.list_nodes()
            node = place(spec.resources, nodes, selector=selector, strategy=strategy)
            instance = Instance(
                id=str(uuid.uuid4()),
                spec=spec,
                node_id=node.id,
                node_name=node.name,
                desired=DesiredState.RUNNING,
                state=InstanceState.SCHEDULED,
                created_at=now(),
            )
            self.store.add_instance(instance)
        log.info("instance %s scheduled on node %s", spec.name, node.name)
        try:
            status = await self.agents.call(
                node,
                self._stub(node).Launch,
                pb.LaunchRequest(spec=convert.spec_to_pb(instance.id, spec)),
            )
        except MultiverseError:
            # Nothing was created on the node: give the name and the resources back.
            self.store.delete_instance(instance.id)
            raise
        return self._observe(instance.id, status)

    async def start(self, name: str) -> Instance:
        instance = self.get(name)
        node = self._node_of(instance)
        self.store.update_instance(instance.id, desired=DesiredState.RUNNING)
        status = await self.agents.call(
            node, self._stub(node).Start, pb.InstanceRef(id=instance.id)
        )
        return self._observe(instance.id, status)

    async def stop(self, name: str, force: bool = False) -> Instance:
        instance = self.get(name)
        node = self._node_of(instance)
        self.store.update_instance(instance.id, desired=DesiredState.STOPPED)
        status = await self.agents.call(
            node, self._stub(node).Stop, pb.StopRequest(id=instance.id, force=force)
        )
        return self._observe(instance.id, status)

    async def restart(self, name: str) -> Instance:
        instance = self.get(name)
        node = self._node_of(instance)
        self.store.update_instance(instance.id, desired=DesiredState.RUNNING)
        status = await self.agents.call(
            node, self._stub(node).Restart, pb.InstanceRef(id=instance.id)
        )
        return self._observe(instance.id, status)

    async def delete(self, name: str) -> Instance:
        instance = self.get(name)
        self.store.update_instance(instance.id, desired=DesiredState.DELETED)
        if instance.node_id is None:
            self.store.delete_instance(instance.id)
            return instance
        node = self._node_of(instance)
        status = await self.agents.call(
            node, self._stub(node).Delete, pb.InstanceRef(id=instance.id)
        )
        instance.state = InstanceState.DELETING
        if not status.id:  # the node never had it: nothing to wait for
            self.store.delete_instance(instance.id)
            return instance
        try:
            return self._observe(instance.id, status)
        except NotFound:  # the node's report of it being gone came first
            return instance

    async def info(self, instance: Instance) -> InstanceInfo:
        if instance.state != InstanceState.RUNNING:
            return InstanceInfo(instance, None)
        node = self._node_of(instance)
        try:
            reply = await self.agents.call(
                node, self._stub(node).Info, pb.InstanceRef(id=instance.id)
            )
        except MultiverseError as exc:
            return InstanceInfo(instance, None, exc.message)
        return InstanceInfo(instance, convert.stats_from_pb(reply))

    async def exec(
        self, name: str, command: list[str], stdin: bytes = b""
    ) -> AsyncIterator[pb.ExecOutput]:
        """The command's output chunks; checked before the first chunk, so errors come early."""
        instance = self.get(name)
        ensure_running(name, instance.state)
        node = self._node_of(instance)
        call = self._stub(node).Exec(
            pb.ExecRequest(id=instance.id, command=command, stdin=stdin),
            metadata=self.agents.metadata(node),
        )
        return _exec_stream(call, node.name)

    async def open_session(
        self, name: str, command: list[str], size: tuple[int, int] | None
    ) -> SessionCall:
        """Start a session on the instance's node; the call is ready for input and output."""
        instance = self.get(name)
        ensure_running(name, instance.state)
        node = self._node_of(instance)
        call: SessionCall = self._stub(node).Session(metadata=self.agents.metadata(node))
        cols, rows = size or (0, 0)
        start = pb.SessionStart(
            id=instance.id,
            command=command,
            tty=size is not None,
            size=pb.TerminalSize(cols=cols, rows=rows),
        )
        try:
            await call.write(pb.SessionInput(start=start))
        except grpc.aio.AioRpcError as exc:
            raise convert.error_from_rpc(exc, node.name) from exc
        return call

    async def logs(self, name: str) -> str:
        instance = self.get(name)
        node = self._node_of(instance)
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
