"""Conversions between the generated protobuf messages and core types. Nothing else lives here."""

from __future__ import annotations

from collections.abc import Iterable

import grpc

from multiverse.core import errors
from multiverse.core.faults import FaultKind, LinkRule, NodeFaults, Shot
from multiverse.core.model import (
    GuestStats,
    IncomingEndpoint,
    InstanceSpec,
    InstanceState,
    LiveProgress,
    Resources,
    Usage,
)
from multiverse.core.network import ClusterNetwork, NetworkPlan, Nic, Publish
from multiverse.core.sshlogin import SshLogin
from multiverse.wire.v1 import multiverse_pb2 as pb


def resources_to_pb(resources: Resources) -> pb.Resources:
    return pb.Resources(cpus=resources.cpus, memory=resources.memory, disk=resources.disk)


def resources_from_pb(message: pb.Resources) -> Resources:
    return Resources(cpus=message.cpus, memory=message.memory, disk=message.disk)


def usage_to_pb(usage: Usage) -> pb.Usage:
    return pb.Usage(cpus=usage.cpus, memory=usage.memory, disk=usage.disk)


def usage_from_pb(message: pb.Usage) -> Usage:
    return Usage(cpus=message.cpus, memory=message.memory, disk=message.disk)


def spec_to_pb(instance_id: str, spec: InstanceSpec, nic: Nic | None = None) -> pb.InstanceSpec:
    return pb.InstanceSpec(
        nic=nic_to_pb(nic) if nic else None,
        id=instance_id,
        name=spec.name,
        cpus=spec.cpus,
        memory=spec.memory,
        disk=spec.disk,
        image=spec.image,
        user_data=spec.user_data,
        labels=spec.labels,
    )


def spec_from_pb(message: pb.InstanceSpec) -> tuple[str, InstanceSpec]:
    spec = InstanceSpec(
        name=message.name,
        cpus=message.cpus,
        memory=message.memory,
        disk=message.disk,
        image=message.image,
        user_data=message.user_data,
        labels=dict(message.labels),
    )
    return message.id, spec


def ssh_login_to_pb(login: SshLogin) -> pb.SshLogin:
    return pb.SshLogin(
        host=login.host,
        port=login.port,
        user=login.user,
        host_key=login.host_key,
        expires_in=login.expires_in,
    )


def ssh_login_from_pb(message: pb.SshLogin) -> SshLogin:
    return SshLogin(message.host, message.port, message.user, message.host_key, message.expires_in)


def nic_to_pb(nic: Nic) -> pb.Nic:
    return pb.Nic(
        address=nic.address,
        mac=nic.mac,
        gateway=nic.gateway,
        dns=nic.dns,
        domain=nic.domain,
        publish=[
            pb.Publish(host_port=p.host_port, guest_port=p.guest_port, protocol=p.protocol)
            for p in nic.publish
        ],
    )


def nic_from_pb(message: pb.Nic) -> Nic | None:
    if not message.address:
        return None
    return Nic(
        address=message.address,
        mac=message.mac,
        gateway=message.gateway,
        dns=message.dns,
        domain=message.domain,
        publish=tuple(Publish(p.host_port, p.guest_port, p.protocol) for p in message.publish),
    )


def plan_to_pb(plan: NetworkPlan) -> pb.NetworkPlan:
    return pb.NetworkPlan(
        name=plan.network.name,
        cidr=plan.network.cidr,
        nat=plan.network.nat,
        vni=plan.network.vni,
        gateway=plan.gateway,
        underlay=plan.underlay,
        peers=plan.peers,
        records=plan.records,
        nics={key: nic_to_pb(nic) for key, nic in plan.nics.items()},
    )


def plan_from_pb(message: pb.NetworkPlan) -> NetworkPlan | None:
    if not message.cidr:
        return None
    return NetworkPlan(
        network=ClusterNetwork(message.name, message.cidr, nat=message.nat, vni=message.vni),
        gateway=message.gateway,
        underlay=message.underlay,
        peers=tuple(message.peers),
        records=dict(message.records),
        nics={key: nic for key, value in message.nics.items() if (nic := nic_from_pb(value))},
    )


def _params_to_pb(params: tuple[tuple[str, str], ...]) -> list[pb.Param]:
    return [pb.Param(name=name, value=value) for name, value in params]


def _params_from_pb(params: Iterable[pb.Param]) -> tuple[tuple[str, str], ...]:
    return tuple((p.name, p.value) for p in params)


def faults_to_pb(faults: NodeFaults) -> pb.NodeFaults:
    return pb.NodeFaults(
        generation=faults.generation,
        drops=[pb.Drop(source=s, destination=d) for s, d in faults.drops],
        links=[
            pb.LinkRule(fault_id=r.fault_id, instance_id=r.instance_id, sources=r.sources,
                        params=_params_to_pb(r.params))
            for r in faults.links
        ],
        shots=[
            pb.Shot(fault_id=s.fault_id, kind=s.kind.value, instance_id=s.instance_id,
                    params=_params_to_pb(s.params))
            for s in faults.shots
        ],
    )  # fmt: skip


def faults_from_pb(message: pb.NodeFaults) -> NodeFaults:
    return NodeFaults(
        drops=tuple((d.source, d.destination) for d in message.drops),
        links=tuple(
            LinkRule(r.fault_id, r.instance_id, tuple(r.sources), _params_from_pb(r.params))
            for r in message.links
        ),
        shots=tuple(
            Shot(s.fault_id, FaultKind(s.kind), s.instance_id, _params_from_pb(s.params))
            for s in message.shots
        ),
        generation=message.generation,
    )


def state_from_pb(value: str) -> InstanceState:
    try:
        return InstanceState(value)
    except ValueError:
        return InstanceState.UNKNOWN


def stats_from_pb(message: pb.InstanceInfo) -> GuestStats:
    return GuestStats(
        load=(message.load1, message.load5, message.load15),
        memory_used=message.memory_used,
        memory_total=message.memory_total,
        disk_used=message.disk_used,
        disk_total=message.disk_total,
        release=message.release,
        ipv4=message.status.ipv4,
    )


def stats_to_pb(status: pb.InstanceStatus, stats: GuestStats) -> pb.InstanceInfo:
    return pb.InstanceInfo(
        status=status,
        load1=stats.load[0],
        load5=stats.load[1],
        load15=stats.load[2],
        memory_used=stats.memory_used,
        memory_total=stats.memory_total,
        disk_used=stats.disk_used,
        disk_total=stats.disk_total,
        release=stats.release,
    )


_STATUS_OF_CODE = {
    "invalid_argument": grpc.StatusCode.INVALID_ARGUMENT,
    "not_found": grpc.StatusCode.NOT_FOUND,
    "already_exists": grpc.StatusCode.ALREADY_EXISTS,
    "conflict": grpc.StatusCode.FAILED_PRECONDITION,
    "unschedulable": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "unauthenticated": grpc.StatusCode.UNAUTHENTICATED,
    "permission_denied": grpc.StatusCode.PERMISSION_DENIED,
    "unavailable": grpc.StatusCode.UNAVAILABLE,
    "driver_error": grpc.StatusCode.INTERNAL,
}
_ERROR_OF_CODE: dict[str, type[errors.MultiverseError]] = {
    cls.code: cls
    for cls in (
        errors.InvalidArgument,
        errors.NotFound,
        errors.AlreadyExists,
        errors.Conflict,
        errors.Unschedulable,
        errors.Unauthenticated,
        errors.PermissionDenied,
        errors.Unavailable,
        errors.DriverError,
    )
}


def error_to_rpc(exc: errors.MultiverseError) -> tuple[grpc.StatusCode, str]:
    """The status and details to abort a call with; the details keep our error code."""
    return _STATUS_OF_CODE.get(exc.code, grpc.StatusCode.INTERNAL), f"{exc.code}:{exc.message}"


def error_from_code(code: str, message: str) -> errors.MultiverseError:
    """Our typed error for an error code another process sent (gRPC details, a JSON body)."""
    return _ERROR_OF_CODE.get(code, errors.DriverError)(message)


def error_from_rpc(exc: grpc.aio.AioRpcError, peer: str) -> errors.MultiverseError:
    """Our typed error back from a failed call to ``peer`` (a node name, for the message)."""
    code, sep, message = (exc.details() or "").partition(":")
    if sep and code in _ERROR_OF_CODE:
        return _ERROR_OF_CODE[code](message)
    if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return errors.Unavailable(f"node {peer} is unreachable ({exc.code().name.lower()})")
    # Anything else is a bug on the other side: its log has the details, the caller gets none.
    return errors.DriverError(f"{peer}: internal error ({exc.code().name}); see its log")


# gRPC would otherwise share a busy port (SO_REUSEPORT) and split calls between two servers.
# Keepalive pings both ways: a link that silently died (a partition sends no RST) or a peer
# that stopped answering is noticed within seconds, not after TCP's minutes of retransmissions:
# the worker reconnects once the network is back, and the master's Exec and Session streams to
# an agent end as "unreachable" instead of hanging on silence (the streams carry no deadline: a
# command or a shell may rightly run for hours). gRPC (1.85) times a keepalive ping out after
# ``grpc.http2.ping_timeout_ms``, default 60 s, whatever ``keepalive_timeout_ms`` says.
GRPC_SERVER_OPTIONS = (
    ("grpc.so_reuseport", 0),
    ("grpc.keepalive_time_ms", 5000),
    ("grpc.keepalive_timeout_ms", 5000),
    ("grpc.http2.ping_timeout_ms", 5000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 4000),
    ("grpc.http2.max_ping_strikes", 0),
)
GRPC_CHANNEL_OPTIONS = (
    ("grpc.keepalive_time_ms", 5000),
    ("grpc.keepalive_timeout_ms", 5000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.http2.ping_timeout_ms", 5000),
)


def listen_grpc(server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials) -> int:
    """Bind ``server`` to ``address`` with TLS; the bound port, or a clear error."""
    try:
        port = server.add_secure_port(address, credentials)
    except RuntimeError:
        port = 0
    if port == 0:
        raise errors.InvalidArgument(f"cannot listen on {address}: address in use or invalid")
    return port


def split_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) -> (host, port); a clear error otherwise."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise errors.InvalidArgument(f"invalid address {address!r}: use HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


# ---- live moves ----


def endpoint_to_pb(endpoint: IncomingEndpoint) -> pb.IncomingEndpoint:
    return pb.IncomingEndpoint(
        host=endpoint.host, nbd_port=endpoint.nbd_port, migration_port=endpoint.migration_port,
        tls_hostname=endpoint.tls_hostname, login_key=endpoint.login_key,
    )  # fmt: skip


def endpoint_from_pb(message: pb.IncomingEndpoint) -> IncomingEndpoint:
    return IncomingEndpoint(
        message.host, message.nbd_port, message.migration_port, message.tls_hostname,
        message.login_key,
    )  # fmt: skip


def live_progress_to_pb(progress: LiveProgress) -> pb.LiveProgress:
    return pb.LiveProgress(
        phase=progress.phase, disk_done=progress.disk_done, disk_total=progress.disk_total,
        memory_done=progress.memory_done, memory_total=progress.memory_total,
        downtime=progress.downtime, host_key=progress.host_key,
    )  # fmt: skip


def live_progress_from_pb(message: pb.LiveProgress) -> LiveProgress:
    return LiveProgress(
        message.phase, message.disk_done, message.disk_total, message.memory_done,
        message.memory_total, message.downtime, message.host_key,
    )  # fmt: skip
