"""What the master's plans need of the nodes, in domain types: the :class:`NodeClient` port.

Moves (master/moves.py) speak to nodes only through it, so their steps are tested against a
fake; :class:`AgentNodeClient` is the adapter over the agents' gRPC service.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import grpc

from multiverse.core.errors import Unavailable
from multiverse.core.model import IncomingEndpoint, Instance, InstanceState, LiveProgress, Node
from multiverse.master.cluster import Agents
from multiverse.master.network import Ipam
from multiverse.wire import convert
from multiverse.wire.v1 import multiverse_pb2 as pb

__all__ = ["AgentNodeClient", "MoveFile", "NodeClient", "Observation"]


@dataclass(frozen=True)
class Observation:
    """One instance as its node sees it now."""

    state: InstanceState
    version: int = 0
    ipv4: str = ""
    message: str = ""


@dataclass(frozen=True)
class MoveFile:
    name: str
    size: int
    sha256: str


Progress = Callable[[int, int], Awaitable[None]]
LiveProgressSink = Callable[[LiveProgress], None]


class NodeClient(Protocol):
    async def observe(self, node: Node, instance_id: str) -> Observation | None:
        """The instance on ``node``, or None when the node has no such instance."""

    async def start(self, node: Node, instance_id: str) -> None: ...

    async def stop(self, node: Node, instance_id: str) -> None:
        """Ask for a clean stop; returns at once (observe tells when it is Stopped)."""

    async def delete(self, node: Node, instance_id: str) -> None:
        """Remove the instance and its files from ``node``. Idempotent."""

    async def export(self, node: Node, instance_id: str, target: Node) -> list[MoveFile]:
        """Let ``target`` read the stopped instance's files from ``node``; their manifest."""

    async def import_(
        self, node: Node, instance: Instance, source: Node, files: list[MoveFile],
        progress: Progress,
    ) -> None:  # fmt: skip
        """Have ``node`` pull ``files`` from ``source`` and hold the instance Stopped.
        Idempotent and resumable; the counter-action is :meth:`abort_import`."""

    async def abort_import(self, node: Node, instance_id: str) -> None:
        """Remove whatever an import of the instance left on ``node``. Idempotent."""

    async def prepare_incoming(
        self, node: Node, instance: Instance, listen_host: str
    ) -> IncomingEndpoint:
        """Have ``node`` hold the instance waiting for a live move's state (Stopped to the
        cluster); the counter-action is :meth:`abort_import`."""

    async def migrate_out(
        self, node: Node, instance_id: str, to: IncomingEndpoint, progress: LiveProgressSink
    ) -> LiveProgress:
        """Send the running instance on ``node`` to ``to``; on any failure it runs on there.
        The counter-action is :meth:`abort_migrate_out`."""

    async def abort_migrate_out(self, node: Node, instance_id: str) -> None:
        """Cancel a live move out of ``node``; the instance runs on there. Idempotent."""

    async def finish_incoming(self, node: Node, instance_id: str, host_key: str) -> Observation:
        """Let the instance that arrived whole on ``node`` run there; how it is then.
        Idempotent."""


class AgentNodeClient:
    """:class:`NodeClient` over the agents' gRPC service (the master's mTLS channels)."""

    def __init__(self, agents: Agents, ipam: Ipam | None = None) -> None:
        self.agents = agents
        # The cluster network's allocations: a moved instance keeps its address and MAC.
        self.ipam = ipam

    async def observe(self, node: Node, instance_id: str) -> Observation | None:
        report = await self.agents.call(node, self.agents.stub(node).Report, pb.Empty())
        for status in report.instances:
            if status.id == instance_id:
                return _observation(status)
        return None

    async def start(self, node: Node, instance_id: str) -> None:
        await self.agents.call(node, self.agents.stub(node).Start, pb.InstanceRef(id=instance_id))

    async def stop(self, node: Node, instance_id: str) -> None:
        await self.agents.call(node, self.agents.stub(node).Stop, pb.StopRequest(id=instance_id))

    async def delete(self, node: Node, instance_id: str) -> None:
        await self.agents.call(node, self.agents.stub(node).Delete, pb.InstanceRef(id=instance_id))

    async def export(self, node: Node, instance_id: str, target: Node) -> list[MoveFile]:
        request = pb.ExportRequest(id=instance_id, target_node_id=target.id)
        manifest = await self.agents.call(node, self.agents.stub(node).Export, request)
        return [MoveFile(f.name, f.size, f.sha256) for f in manifest.files]

    async def import_(
        self, node: Node, instance: Instance, source: Node, files: list[MoveFile],
        progress: Progress,
    ) -> None:  # fmt: skip
        nic = await self.ipam.nic_on(instance, node.id) if self.ipam else None
        request = pb.ImportRequest(
            spec=convert.spec_to_pb(instance.id, instance.spec, nic), source_node_id=source.id,
            source_address=source.address,
            files=[pb.MoveFile(name=f.name, size=f.size, sha256=f.sha256) for f in files],
        )  # fmt: skip
        # No call timeout: a disk takes as long as it takes; a dead peer ends the stream
        # through the channel's keepalive.
        try:
            async for update in self.agents.stub(node).Import(request):
                if not update.HasField("status"):
                    await progress(update.bytes_done, update.bytes_total)
        except grpc.aio.AioRpcError as exc:
            raise convert.error_from_rpc(exc, node.name) from exc

    async def abort_import(self, node: Node, instance_id: str) -> None:
        request = pb.AbortImportRequest(id=instance_id)
        await self.agents.call(node, self.agents.stub(node).AbortImport, request)

    async def prepare_incoming(
        self, node: Node, instance: Instance, listen_host: str
    ) -> IncomingEndpoint:
        nic = await self.ipam.nic_on(instance, node.id) if self.ipam else None
        request = pb.PrepareIncomingRequest(
            spec=convert.spec_to_pb(instance.id, instance.spec, nic), listen_host=listen_host
        )
        # The image may have to be pulled first: no call timeout (as an import has none).
        try:
            endpoint = await self.agents.stub(node).PrepareIncoming(request)
        except grpc.aio.AioRpcError as exc:
            raise convert.error_from_rpc(exc, node.name) from exc
        return convert.endpoint_from_pb(endpoint)

    async def migrate_out(
        self, node: Node, instance_id: str, to: IncomingEndpoint, progress: LiveProgressSink
    ) -> LiveProgress:
        request = pb.MigrateOutRequest(id=instance_id, target=convert.endpoint_to_pb(to))
        try:
            async for update in self.agents.stub(node).MigrateOut(request):
                last = convert.live_progress_from_pb(update)
                progress(last)
                if update.done:
                    return last
        except grpc.aio.AioRpcError as exc:
            raise convert.error_from_rpc(exc, node.name) from exc
        raise Unavailable(f"{node.name} ended the live move without an answer")

    async def abort_migrate_out(self, node: Node, instance_id: str) -> None:
        request = pb.InstanceRef(id=instance_id)
        await self.agents.call(node, self.agents.stub(node).AbortMigrateOut, request)

    async def finish_incoming(self, node: Node, instance_id: str, host_key: str) -> Observation:
        request = pb.FinishIncomingRequest(id=instance_id, host_key=host_key)
        return _observation(
            await self.agents.call(node, self.agents.stub(node).FinishIncoming, request)
        )


def _observation(status: pb.InstanceStatus) -> Observation:
    return Observation(
        convert.state_from_pb(status.state), status.version, status.ipv4, status.message
    )
