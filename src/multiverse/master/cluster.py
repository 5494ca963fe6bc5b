"""The cluster service (gRPC, :1337): workers join, then stream their state to the master.

It also holds the other direction, :class:`Agents`: one gRPC channel per node's agent, with the
per-node agent secret the master derives from its own key (so no node can call another).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeAlias, TypeVar

import grpc

from multiverse.core.errors import AlreadyExists, MultiverseError, Unauthenticated
from multiverse.core.model import Node, NodeStatus, validate_labels, validate_name
from multiverse.master.auth import JOIN, hash_secret, new_secret, secret_matches, verify_token
from multiverse.store.repository import Change, Store, now
from multiverse.wire import convert
from multiverse.wire.v1 import multiverse_pb2 as pb
from multiverse.wire.v1 import multiverse_pb2_grpc as pb_grpc

log = logging.getLogger("multiverse.master")

Ctx: TypeAlias = grpc.aio.ServicerContext[Any, Any]
Reply = TypeVar("Reply")


def _peer_host(context: Ctx) -> str:
    """The caller's IP from gRPC's peer string (``ipv4:1.2.3.4:5`` or ``ipv6:[::1]:5``)."""
    peer = context.peer() or ""
    kind, _, rest = peer.partition(":")
    host = rest.rsplit(":", 1)[0]
    return host if kind in ("ipv4", "ipv6") else "127.0.0.1"


class ClusterServicer(pb_grpc.ClusterServiceServicer):
    def __init__(self, store: Store, agents: Agents, sync_interval: float) -> None:
        self.store = store
        self.agents = agents
        self.sync_interval = sync_interval
        # Told of node status transitions and instance changes (server.py publishes them).
        self.on_change: Callable[[list[tuple[str, NodeStatus]], list[Change]], None] = (
            lambda transitions, changes: None
        )

    async def Join(self, request: pb.JoinRequest, context: Ctx) -> pb.JoinResponse:
        try:
            return self._join(request, context)
        except MultiverseError as exc:
            log.info("join refused from %s: %s", context.peer(), exc.message)
            await context.abort(*convert.error_to_rpc(exc))
            raise AssertionError("unreachable") from exc

    def _join(self, request: pb.JoinRequest, context: Ctx) -> pb.JoinResponse:
        address = request.agent_address
        if address.startswith(":"):
            address = f"{_peer_host(context)}{address}"
        labels = validate_labels(dict(request.labels))
        capacity = convert.resources_from_pb(request.capacity)
        if request.node_id:  # a node that joined before comes back with its own secret
            stored = self.store.node_secret_hash(request.node_id)
            if stored is None or not secret_matches(request.node_secret, stored):
                raise Unauthenticated("unknown node or wrong node secret; join again with a token")
            self.store.update_node(
                request.node_id,
                address=address,
                labels=labels,
                driver=request.driver,
                capacity=capacity,
                version=request.version,
                last_sync=now(),
            )
            node = self.store.get_node(request.node_id)
            self.agents.forget(node.id)
            log.info("node %s re-joined from %s", node.name, address)
            return pb.JoinResponse(
                node_id=node.id,
                name=node.name,
                agent_address=address,
                agent_secret=self.agents.secret_for(node.id),
            )
        record = verify_token(self.store, JOIN, request.token)
        name = validate_name(request.name, "node")
        if self.store.list_nodes(names=[name]):
            raise AlreadyExists(f"a node named {name!r} exists already; pick another --name")
        if not self.store.consume_token_use(str(record["id"])):
            raise Unauthenticated("invalid join token")  # used up: same words as any bad token
        secret = new_secret()
        node = Node(
            id=str(uuid.uuid4()),
            name=name,
            address=address,
            driver=request.driver,
            status=NodeStatus.JOINING,
            labels=labels,
            capacity=capacity,
            version=request.version,
            last_sync=now(),
        )
        self.store.add_node(node, hash_secret(secret))
        log.info("node %s joined from %s as %s", name, address, node.id)
        self.on_change([(name, NodeStatus.JOINING)], [])
        return pb.JoinResponse(
            node_id=node.id,
            name=name,
            node_secret=secret,
            agent_address=address,
            agent_secret=self.agents.secret_for(node.id),
        )

    async def Sync(
        self, request_iterator: AsyncIterator[pb.NodeReport], context: Ctx
    ) -> AsyncIterator[pb.SyncAck]:
        metadata = dict(context.invocation_metadata() or ())
        node_id = str(metadata.get("node-id", ""))
        stored = self.store.node_secret_hash(node_id) if node_id else None
        if stored is None or not secret_matches(str(metadata.get("node-secret", "")), stored):
            await context.abort(*convert.error_to_rpc(Unauthenticated("unknown node")))
        async for report in request_iterator:
            self.apply(node_id, report)
            yield pb.SyncAck(interval_ms=int(self.sync_interval * 1000))

    def apply(self, node_id: str, report: pb.NodeReport) -> None:
        """Take one report: the node is alive now, and its instances are as it says."""
        node = self.store.get_node(node_id)
        self.store.update_node(
            node_id,
            capacity=convert.resources_from_pb(report.capacity),
            last_sync=now(),
            status=NodeStatus.READY,
        )
        changes = self.store.apply_report(node_id, [status_dict(item) for item in report.instances])
        back = [(node.name, NodeStatus.READY)] if node.status != NodeStatus.READY else []
        self.on_change(back, changes)


def status_dict(status: pb.InstanceStatus) -> dict[str, Any]:
    return {
        "id": status.id,
        "state": convert.state_from_pb(status.state).value,
        "ipv4": status.ipv4,
        "message": status.message,
        "version": status.version,
        "release": status.release,
    }


class Agents:
    """Calls to the nodes' agents, one cached channel per node."""

    def __init__(self, master_key: bytes, timeout: float = 30.0) -> None:
        self._key = master_key
        self.timeout = timeout
        self._channels: dict[str, tuple[str, grpc.aio.Channel]] = {}

    def secret_for(self, node_id: str) -> str:
        return hmac.new(self._key, node_id.encode(), hashlib.sha256).hexdigest()

    def forget(self, node_id: str) -> None:
        """Drop a node's channel (its address may have changed); closed lazily by gRPC."""
        self._channels.pop(node_id, None)

    def stub(self, node: Node) -> pb_grpc.AgentServiceStub:
        cached = self._channels.get(node.id)
        if cached is None or cached[0] != node.address:
            cached = (node.address, grpc.aio.insecure_channel(node.address))
            self._channels[node.id] = cached
        return pb_grpc.AgentServiceStub(cached[1])

    def metadata(self, node: Node) -> tuple[tuple[str, str], ...]:
        return (("agent-secret", self.secret_for(node.id)),)

    async def call(
        self, node: Node, method: Callable[..., Awaitable[Reply]], request: object
    ) -> Reply:
        """``await agents.call(node, stub.Start, request)`` with auth, timeout, typed errors."""
        try:
            return await method(request, metadata=self.metadata(node), timeout=self.timeout)
        except grpc.aio.AioRpcError as exc:
            raise convert.error_from_rpc(exc, node.name) from exc

    async def close(self) -> None:
        for _address, channel in self._channels.values():
            await channel.close(grace=None)
        self._channels.clear()
