"""Address management for the cluster network, over the store; and what each node must know of
the network (its peers, the names to serve, its instances' interfaces).

The network is fixed at the master's first start (``multiverse master --network CIDR``); every
instance gets the lowest free address (or the one asked with ``launch --ip``) and a MAC derived
from its id, both stored in the store with the instance in one transaction and unique per
network by the table's primary key, so no address is handed out twice under any race or crash.
Each node gets an address too: its bridge's, the gateway and DNS server of the VMs on it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from multiverse.core.errors import Conflict, InvalidArgument, Unavailable
from multiverse.core.model import Instance, Node, NodeStatus
from multiverse.core.network import (
    DEFAULT_CIDR,
    ClusterNetwork,
    Lease,
    NetworkPlan,
    Nic,
    Publish,
    mac_for,
    parse_cidr,
    parse_publish,
)
from multiverse.store.repository import Store

__all__ = [
    "DEFAULT_NETWORK",
    "Ipam",
    "Picker",
    "choose_cidr",
    "host_routes",
]

DEFAULT_NETWORK = "default"
# Tried in order when no --network is given: the first that no host route overlaps.
_CANDIDATES = (DEFAULT_CIDR, "10.78.0.0/16", "10.177.0.0/16", "172.30.0.0/16", "192.168.177.0/24")


def host_routes(path: Path = Path("/proc/net/route")) -> list[ipaddress.IPv4Network]:
    """This host's IPv4 routes but the default one, from the kernel's table."""
    routes = []
    try:
        lines = path.read_text().splitlines()[1:]
    except OSError:
        return []
    for line in lines:
        fields = line.split()
        if len(fields) < 8:
            continue
        destination = ipaddress.IPv4Address(bytes.fromhex(fields[1])[::-1])
        mask = ipaddress.IPv4Address(bytes.fromhex(fields[7])[::-1])
        network = ipaddress.IPv4Network(f"{destination}/{mask}", strict=False)
        if network.prefixlen:
            routes.append(network)
    return routes


def choose_cidr(routes: Iterable[ipaddress.IPv4Network]) -> str:
    """The first candidate network no route of this host overlaps."""
    taken = list(routes)
    for candidate in _CANDIDATES:
        network = ipaddress.IPv4Network(candidate)
        if not any(network.overlaps(route) for route in taken):
            return candidate
    raise InvalidArgument(
        "every default cluster network overlaps a route of this host: choose one with --network"
    )


@dataclass(frozen=True)
class Picker:
    """Chooses one lease in a network: the asked address, else the first free one from where
    the previous lease left off (next fit, as DHCP servers do: an address just given back is
    not handed out again at once, and a launch need not look at every lease held).

    Pure: the store tries its :meth:`candidates` against the leases, inside its transaction,
    and takes the :meth:`lease` of the first free one; unit-tested alone.
    """

    network: str
    cidr: str
    owner: str
    kind: str = "instance"
    requested: str = ""
    publish: tuple[Publish, ...] = ()

    def candidates(self, after: str = "") -> Iterator[str]:
        """The asked address alone; else every usable address once, from the one after
        ``after`` on, wrapping round. Raises once they are all refused: Conflict for the asked
        one, Unavailable when the network is full."""
        subnet = ipaddress.IPv4Network(self.cidr)
        if self.requested:
            address = check_address(subnet, self.requested)
            yield address
            raise Conflict(f"address {address} is taken in the cluster network {subnet}")
        first, last = int(subnet.network_address) + 1, int(subnet.broadcast_address) - 1
        begin = int(ipaddress.IPv4Address(after)) + 1 if after else first
        begin = begin if first <= begin <= last else first
        for candidate in itertools.chain(range(begin, last + 1), range(first, begin)):
            yield str(ipaddress.IPv4Address(candidate))
        raise Unavailable(f"no free address left in the cluster network {subnet}")

    def lease(self, address: str) -> Lease:
        mac = mac_for(self.owner) if self.kind == "instance" else ""
        return Lease(self.network, address, self.owner, self.kind, mac, self.publish)


def check_address(subnet: ipaddress.IPv4Network, text: str) -> str:
    """An address a guest may have in ``subnet``: inside it, neither network nor broadcast."""
    try:
        address = ipaddress.IPv4Address(text.strip())
    except ValueError:
        raise InvalidArgument(f"invalid IPv4 address {text!r}") from None
    if address not in subnet or address in (subnet.network_address, subnet.broadcast_address):
        raise InvalidArgument(f"address {address} is not a usable address of {subnet}")
    return str(address)


@dataclass(frozen=True)
class _Seen:
    """The cluster as the nodes' plans are made from it (:meth:`Ipam._seen`)."""

    nodes: dict[str, Node]
    peers: tuple[tuple[str, str], ...]  # (node id, VTEP) of the live bridged nodes, by VTEP
    records: dict[str, str]  # instance name -> address, for the whole network
    by_node: dict[str, list[Instance]]


PLAN_MAX_AGE = 1.0  # seconds; a new instance's name reaches the other nodes' DNS this late more


class Ipam:
    """The cluster network of one master: its definition, leases and per-node plans."""

    def __init__(self, store: Store, network: ClusterNetwork) -> None:
        self.store = store
        self.network = network
        self.subnet = ipaddress.IPv4Network(network.cidr)
        self._gateways: dict[str, str] = {}  # node id -> its address (leased once, kept)
        self._last_seen = _Seen({}, (), {}, {})
        self._seen_at = -float("inf")
        self._seeing = asyncio.Lock()

    @classmethod
    def open(cls, store: Store, cidr: str = "", nat: bool | None = None) -> Ipam:
        """The network the store holds; made at the first start (from ``cidr`` or a default
        that avoids this host's routes). A different ``cidr`` later is refused: addresses
        were handed out in the first."""
        known = store.get_network(DEFAULT_NETWORK)
        if known is None:
            chosen = str(parse_cidr(cidr)) if cidr else choose_cidr(host_routes())
            known = ClusterNetwork(DEFAULT_NETWORK, chosen, nat=True if nat is None else nat)
            store.put_network(known)
        else:
            if cidr and str(parse_cidr(cidr)) != known.cidr:
                raise InvalidArgument(
                    f"the cluster network is {known.cidr} already (addresses were leased in "
                    f"it); it cannot become {cidr}"
                )
            if nat is not None and nat != known.nat:
                known = ClusterNetwork(known.name, known.cidr, nat=nat, vni=known.vni)
                store.put_network(known)
        return cls(store, known)

    def picker(
        self, owner: str, *, kind: str = "instance", requested: str = "",
        publish: Sequence[Publish] = (),
    ) -> Picker:  # fmt: skip
        if requested:
            check_address(self.subnet, requested)  # a bad address fails before anything
        return Picker(self.network.name, self.network.cidr, owner, kind, requested, tuple(publish))

    async def check_publish(self, node_id: str, publish: Sequence[Publish]) -> None:
        """A node port forwards to one guest only."""
        wanted = {(item.host_port, item.protocol) for item in publish}
        if len(wanted) != len(publish):
            raise InvalidArgument("a port is published twice")
        for instance in await self.store.list_instances(node_id=node_id):
            for text in instance.publish:
                held = parse_publish(text)
                if (held.host_port, held.protocol) in wanted:
                    raise Conflict(f"port {held} of the node is published by {instance.name}")

    async def sweep(self) -> int:
        """Give back the addresses of instances that are gone other than by this master's
        deletes (each of which gives its address back at once); how many."""
        return await self.store.sweep_leases()

    async def node_address(self, node_id: str) -> str:
        """The node's own address on the network (leased once, kept), with the prefix."""
        lease = await self.store.ensure_lease(node_id, self.picker(node_id, kind="node"))
        return f"{lease.address}/{self.subnet.prefixlen}"

    async def nic_on(self, instance: Instance, node_id: str) -> Nic | None:
        """The interface a launch or a move hands ``node_id`` for ``instance``; None for an
        instance off the network (a user-mode node's), which leases the node no gateway."""
        if not instance.address:
            return None
        return self.nic(instance, await self.node_address(node_id))

    def nic(self, instance: Instance, gateway: str) -> Nic | None:
        if not instance.address:
            return None
        node_ip = gateway.split("/", 1)[0]
        return Nic(
            address=f"{instance.address}/{self.subnet.prefixlen}",
            mac=instance.mac,
            gateway=node_ip,
            dns=node_ip,
            publish=tuple(parse_publish(text) for text in instance.publish),
        )

    async def plan(self, node_id: str) -> NetworkPlan:
        """What ``node_id`` must realise now (as of at most :data:`PLAN_MAX_AGE` ago)."""
        seen = await self._seen()
        node = seen.nodes.get(node_id) or await self.store.get_node(node_id)  # NotFound: gone
        gateway = self._gateways.get(node_id) or await self.node_address(node_id)
        self._gateways[node_id] = gateway
        nics = {}
        for instance in seen.by_node.get(node_id, []):
            if nic := self.nic(instance, gateway):
                nics[instance.id] = nic
        return NetworkPlan(
            network=self.network,
            gateway=gateway,
            underlay=node.ipv4,
            peers=tuple(address for other, address in seen.peers if other != node_id),
            records=seen.records,
            nics=nics,
        )

    async def _seen(self) -> _Seen:
        """Every node and instance, read once for all the plans of a moment: each node's sync
        acknowledgement carries its plan, two hundred a second at a thousand nodes, and each
        read the whole cluster."""
        async with self._seeing:  # one read for everybody waiting on it
            if time.monotonic() - self._seen_at > PLAN_MAX_AGE:
                started = time.monotonic()
                nodes = {node.id: node for node in await self.store.list_nodes()}
                instances = await self.store.list_instances()
                bridged = {node.id for node in nodes.values() if node.network_mode == "bridge"}
                by_node: dict[str, list[Instance]] = {}
                for instance in instances:
                    by_node.setdefault(instance.node_id or "", []).append(instance)
                live = [
                    (node.id, node.ipv4)
                    for node in nodes.values()
                    if node.id in bridged and node.status != NodeStatus.DOWN
                ]
                self._last_seen = _Seen(
                    nodes=nodes,
                    peers=tuple(sorted(live, key=lambda peer: peer[1])),
                    # Only instances on the network have a name on it (not user-mode nodes').
                    records={
                        i.name: i.address for i in instances if i.address and i.node_id in bridged
                    },
                    by_node=by_node,
                )
                self._seen_at = started
        return self._last_seen

    async def usage(self) -> dict[str, object]:
        """``multiverse network``: the CIDR, how much of it is leased, each node's VTEP."""
        leases = await self.store.leases(self.network.name)
        nodes = {node.id: node for node in await self.store.list_nodes()}
        size = max(self.subnet.num_addresses - 2, 0)
        return {
            "name": self.network.name,
            "cidr": self.network.cidr,
            "nat": self.network.nat,
            "vni": self.network.vni,
            "size": size,
            "used": len(leases),
            "instances": sum(1 for lease in leases if lease.kind == "instance"),
            "nodes": [
                {
                    "name": nodes[lease.owner].name,
                    "address": lease.address,
                    "vtep": nodes[lease.owner].ipv4,
                    "mode": nodes[lease.owner].network_mode,
                }
                for lease in leases
                if lease.kind == "node" and lease.owner in nodes
            ],
        }
