"""The cluster service (gRPC, :1337): workers join, then stream their state to the master.

It also holds the other direction, :class:`Agents`: one mutual-TLS channel per node's agent.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from typing import Any, TypeAlias, TypeVar

import grpc

from multiverse.core.errors import MultiverseError, Unauthenticated
from multiverse.core.faults import NodeFaults
from multiverse.core.model import Node, NodeStatus, validate_labels
from multiverse.master.heartbeats import Heartbeats
from multiverse.master.network import Ipam
from multiverse.store.repository import Change, ReportTaken, Store, now
from multiverse.wire import convert, pki
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
    """Join and Sync, over mutual TLS: every caller is the node its certificate names (a new
    node gets its certificate from the API with a join token first: see master/nodes.py)."""

    def __init__(self, store: Store, agents: Agents, ipam: Ipam | None = None) -> None:
        self.store = store
        self.agents = agents
        self.ipam = ipam
        self.heartbeats = Heartbeats(store)  # its writer runs on every master (server.py)
        # Told of node status transitions and instance changes (server.py publishes them).
        self.on_change: Callable[[list[tuple[str, NodeStatus]], list[Change]], None] = (
            lambda transitions, changes: None
        )
        # What each node last said it can boot; in memory: every node says it again at once.
        self.images: dict[str, list[dict[str, Any]]] = {}
        # A node's part of the faults in force (master/faults.py), sent with every ack.
        self.fault_plan: Callable[[str], Awaitable[NodeFaults]] | None = None

    async def peer_node(self, context: Ctx) -> str | None:
        """The node id of the caller's certificate; refused if revoked or not a node's."""
        cert = pki.peer_cert_of(context.auth_context())
        identity = pki.check_peer_cert(self.agents.ca, cert, await self.store.revoked_serials())
        if identity.kind != "node" or not await self.store.list_nodes(ids=[identity.node_id]):
            raise Unauthenticated("this certificate belongs to no node of this cluster")
        return identity.node_id

    async def _answer(
        self, context: Ctx, what: str, answer: Callable[[], Awaitable[Reply]]
    ) -> Reply:
        """``answer()``, or the call aborted with our error's code (logged: refusals of nodes
        are what an operator looks for)."""
        try:
            return await answer()
        except MultiverseError as exc:
            log.info("%s refused from %s: %s", what, context.peer(), exc.message)
            await context.abort(*convert.error_to_rpc(exc))
            raise AssertionError("unreachable") from exc

    async def Join(self, request: pb.JoinRequest, context: Ctx) -> pb.JoinResponse:
        return await self._answer(context, "join", lambda: self._join(request, context))

    async def Renew(self, request: pb.RenewRequest, context: Ctx) -> pb.RenewResponse:
        return await self._answer(context, "renewal", lambda: self._renew(request, context))

    async def _renew(self, request: pb.RenewRequest, context: Ctx) -> pb.RenewResponse:
        """A new certificate for the calling node, for the key in its CSR. Only a node whose
        current certificate is good may ask: a removed node's is revoked, an expired one fails
        the handshake (that node must be admitted again with a join token)."""
        node_id = await self.peer_node(context)
        if node_id is None:
            raise Unauthenticated("renewal needs the node's certificate")
        node = await self.store.get_node(node_id)
        certificate = pki.sign_node_csr(
            self.agents.ca, request.csr, node_id, node.name, self.agents.node_cert_lifetime
        )
        # The serial that `node remove` revokes is the newest one.
        await self.store.update_node(node_id, cert_serial=pki.serial_of(certificate))
        expires = pki.as_cert(certificate).not_valid_after_utc.isoformat()
        log.info("node %s renewed its certificate, valid until %s", node.name, expires)
        return pb.RenewResponse(certificate=certificate.decode())

    async def _join(self, request: pb.JoinRequest, context: Ctx) -> pb.JoinResponse:
        """Register (again) where a node's agent is and what it offers. The node was admitted
        before (``POST /api/v1/cluster/join`` with a join token gave it its certificate)."""
        node_id = await self.peer_node(context)
        if node_id is None:
            raise Unauthenticated("join needs the node's certificate; admit it with a join token")
        address = request.agent_address
        if address.startswith(":"):
            address = f"{_peer_host(context)}{address}"
        node = await self.store.get_node(node_id)
        # A node joins before its agent listens (the listener serves the certificate the join
        # may bring): a restarted node still Ready from its previous process's reports is
        # Joining until the new one reports, which it does once its agent listens.
        rejoined = node.status == NodeStatus.READY
        joining = {"status": NodeStatus.JOINING} if rejoined else {}
        await self.store.update_node(
            node_id,
            address=address,
            labels=validate_labels(dict(request.labels)),
            driver=request.driver,
            capacity=convert.resources_from_pb(request.capacity),
            version=request.version,
            last_sync=now(),
            network_mode=request.network_mode,
            **joining,
        )
        self.agents.forget(node_id)
        self.heartbeats.forget(node_id)  # its next report is taken whole: Joining -> Ready
        log.info("node %s joined from %s", node.name, address)
        if rejoined:
            self.on_change([(node.name, NodeStatus.JOINING)], [])
        return pb.JoinResponse(node_id=node_id, name=node.name, agent_address=address)

    async def Sync(
        self, request_iterator: AsyncIterator[pb.NodeReport], context: Ctx
    ) -> AsyncIterator[pb.SyncAck]:
        try:
            node_id = await self.peer_node(context)
            if node_id is None:
                raise Unauthenticated("sync needs the node's certificate")
        except MultiverseError as exc:
            await context.abort(*convert.error_to_rpc(exc))
            return
        async for report in request_iterator:
            taken = await self.apply(node_id, report)
            ack = await self.ack(node_id, taken.network_mode)
            # A node back from Unknown or Down: the master marked its instances meanwhile,
            # so the node tells all of them again rather than only what it changed.
            ack.full = taken.before != NodeStatus.READY
            yield ack

    async def ack(self, node_id: str, network_mode: str) -> pb.SyncAck:
        """The acknowledgement of a report, with the network as the node must now have it
        (and the faults in force there, when the master has faults)."""
        faults = convert.faults_to_pb(await self.fault_plan(node_id)) if self.fault_plan else None
        if self.ipam is None or network_mode != "bridge":
            return pb.SyncAck(faults=faults)
        plan = await self.ipam.plan(node_id)
        return pb.SyncAck(network=convert.plan_to_pb(plan), faults=faults)

    def forget(self, node_id: str) -> None:
        """A removed node leaves nothing behind here: its images, its agent's channel."""
        self.images.pop(node_id, None)
        self.agents.forget(node_id)
        self.heartbeats.forget(node_id)

    async def image_catalog(self) -> list[dict[str, Any]]:
        """Every image some node can boot, with the nodes that hold it (``multiverse images``)."""
        names = {node.id: node.name for node in await self.store.list_nodes()}
        catalog: dict[str, dict[str, Any]] = {}
        for node_id, images in self.images.items():
            if node_id not in names:
                continue  # removed meanwhile
            for image in images:
                entry = catalog.setdefault(image["name"], {**image, "nodes": []})
                entry["nodes"].append(names[node_id])
        return [catalog[name] for name in sorted(catalog)]

    async def apply(self, node_id: str, report: pb.NodeReport) -> ReportTaken:
        """Take one report: the node is alive now, and its instances are as it says."""
        self.images[node_id] = [
            {"name": i.name, "kind": i.kind, "digest": i.digest, "size": i.size}
            for i in report.images
        ]
        capacity = convert.resources_from_pb(report.capacity)
        used = convert.usage_from_pb(report.used)
        digests = frozenset(i.digest for i in report.images if i.digest)
        if report.delta and not report.instances and not report.removed:
            beat = self.heartbeats.take(node_id, capacity, used, digests)
            if beat is not None:
                return beat
        taken = await self.store.take_report(
            node_id,
            capacity=capacity,
            used=used,
            reported=[status_dict(item) for item in report.instances],
            removed=list(report.removed) if report.delta else None,
            # Unchanged since the last report taken whole: nothing to read or write.
            image_digests=None if digests == self.heartbeats.images(node_id) else sorted(digests),
        )
        self.heartbeats.taken_whole(node_id, taken, digests)
        back = [(taken.name, NodeStatus.READY)] if taken.before != NodeStatus.READY else []
        self.on_change(back, taken.changes)
        return taken


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
    """Calls to the nodes' agents, one cached mutual-TLS channel per node.

    The master presents its own client certificate; it checks that the agent's certificate is
    the one the CA issued to *that* node (by its name override), whatever its address.
    """

    def __init__(
        self,
        ca: pki.ClusterCA,
        client: pki.CertKey,
        timeout: float = 30.0,
        node_cert_lifetime: timedelta = pki.NODE_CERT_LIFETIME,
    ) -> None:
        self.ca = ca
        # How long the certificates this master signs for nodes (at admission and renewal) last.
        self.node_cert_lifetime = pki.check_lifetime(node_cert_lifetime)
        self._credentials = pki.channel_credentials(ca.cert_pem, client)
        self.timeout = timeout
        # Node id -> (address, channel, stub). The stub is kept with its channel: building
        # one makes a callable per RPC of the service, and a launch storm built one per call.
        self._channels: dict[str, tuple[str, grpc.aio.Channel, pb_grpc.AgentServiceStub]] = {}
        self._closing: set[asyncio.Task[None]] = set()

    def forget(self, node_id: str) -> None:
        """Drop a node's channel (the node re-joined, maybe elsewhere, or was removed) and close
        it; calls still on it get the usual call timeout to finish."""
        cached = self._channels.pop(node_id, None)
        if cached is not None:
            closing = asyncio.get_running_loop().create_task(cached[1].close(grace=self.timeout))
            self._closing.add(closing)
            closing.add_done_callback(self._closing.discard)

    def stub(self, node: Node) -> pb_grpc.AgentServiceStub:
        cached = self._channels.get(node.id)
        if cached is None or cached[0] != node.address:
            options = (
                ("grpc.ssl_target_name_override", pki.node_server_name(node.id)),
                *convert.GRPC_CHANNEL_OPTIONS,
            )
            channel = grpc.aio.secure_channel(node.address, self._credentials, options)
            cached = (node.address, channel, pb_grpc.AgentServiceStub(channel))
            self._channels[node.id] = cached
        return cached[2]

    async def call(
        self, node: Node, method: Callable[..., Awaitable[Reply]], request: object
    ) -> Reply:
        """``await agents.call(node, stub.Start, request)`` with a timeout and typed errors."""
        try:
            return await method(request, timeout=self.timeout)
        except grpc.aio.AioRpcError as exc:
            raise convert.error_from_rpc(exc, node.name) from exc

    async def close(self) -> None:
        for _address, channel, _stub in self._channels.values():
            await channel.close(grace=None)
        self._channels.clear()
        await asyncio.gather(*self._closing, return_exceptions=True)
