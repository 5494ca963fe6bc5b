"""The cluster network's domain: its definition, an instance's interface on it, and the pure
rules the master's address management and the nodes share (which addresses are usable, how a
MAC follows from an owner's id).

The master allocates (``master/network.py``); each node realises it (``worker/network.py``).
"""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass, field

from multiverse.core.errors import InvalidArgument

__all__ = [
    "DEFAULT_CIDR",
    "DNS_DOMAIN",
    "VXLAN_OVERHEAD",
    "ClusterNetwork",
    "Lease",
    "NetworkPlan",
    "Nic",
    "Publish",
    "mac_for",
    "parse_cidr",
    "parse_publish",
]

DEFAULT_CIDR = "10.77.0.0/16"
DNS_DOMAIN = "multiverse"  # every instance is also <name>.multiverse
VXLAN_OVERHEAD = 50  # outer Ethernet + IPv4 + UDP + VXLAN headers: guests' MTU is this smaller


def parse_cidr(text: str) -> ipaddress.IPv4Network:
    """A cluster network: IPv4, a network address (no host bits), room for nodes and guests."""
    try:
        network = ipaddress.IPv4Network(text.strip(), strict=True)
    except ValueError as exc:
        raise InvalidArgument(f"invalid network {text!r}: {exc}") from exc
    if network.prefixlen > 29:
        raise InvalidArgument(f"network {network} is too small: use a /29 or larger")
    return network


def mac_for(owner_id: str) -> str:
    """A stable, locally administered unicast MAC (02:...) derived from an instance's id."""
    digest = hashlib.sha256(owner_id.encode()).digest()
    return "02:" + ":".join(f"{byte:02x}" for byte in digest[:5])


@dataclass(frozen=True)
class ClusterNetwork:
    """The one network every instance of the cluster is on."""

    name: str
    cidr: str  # "10.77.0.0/16"
    nat: bool = True  # masquerade guests' outbound traffic on their node
    vni: int = 77  # the VXLAN id joining the nodes' bridges


@dataclass(frozen=True)
class Publish:
    """A node port forwarded to a guest port (``launch --publish 8080:80``)."""

    host_port: int
    guest_port: int
    protocol: str = "tcp"

    def __str__(self) -> str:
        return f"{self.host_port}:{self.guest_port}/{self.protocol}"


def parse_publish(text: str) -> Publish:
    """``8080:80`` or ``5353:53/udp``."""
    ports, _, protocol = text.strip().partition("/")
    host, sep, guest = ports.partition(":")
    protocol = protocol or "tcp"
    try:
        publish = Publish(int(host), int(guest), protocol)
    except ValueError:
        raise InvalidArgument(
            f"invalid publish {text!r}: use HOST_PORT:GUEST_PORT[/tcp|udp]"
        ) from None
    if not sep or protocol not in ("tcp", "udp"):
        raise InvalidArgument(f"invalid publish {text!r}: use HOST_PORT:GUEST_PORT[/tcp|udp]")
    if not (1 <= publish.host_port <= 65535 and 1 <= publish.guest_port <= 65535):
        raise InvalidArgument(f"invalid publish {text!r}: ports are 1 to 65535")
    return publish


@dataclass(frozen=True)
class Nic:
    """An instance's interface on the cluster network, as its node must set it up.

    ``address`` carries the prefix (``10.77.0.5/16``); ``gateway`` and ``dns`` are the node's
    own address on the network; ``publish`` the node ports forwarded to it.
    """

    address: str
    mac: str
    gateway: str = ""
    dns: str = ""
    domain: str = DNS_DOMAIN
    publish: tuple[Publish, ...] = field(default_factory=tuple)

    @property
    def ip(self) -> str:
        return self.address.split("/", 1)[0]


@dataclass(frozen=True)
class Lease:
    """One address of a network held by an owner (an instance, or a node for its gateway)."""

    network: str
    address: str  # without prefix
    owner: str
    kind: str = "instance"  # or "node"
    mac: str = ""
    publish: tuple[Publish, ...] = ()


@dataclass(frozen=True)
class NetworkPlan:
    """What one node must realise: sent to it on every sync acknowledgement."""

    network: ClusterNetwork
    gateway: str  # the node's own address on the network, with prefix
    underlay: str  # the node's address the others reach it at (its VTEP)
    peers: tuple[str, ...]  # the other nodes' VTEPs
    records: dict[str, str] = field(default_factory=dict)  # instance name -> address
    nics: dict[str, Nic] = field(default_factory=dict)  # its instances' interfaces, by id
