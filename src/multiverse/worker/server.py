"""Wiring of one worker process: driver, local store, agent service, join and sync."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from multiverse.core.errors import InvalidArgument, MultiverseError, Unavailable
from multiverse.core.files import private_dir
from multiverse.core.model import Resources
from multiverse.core.sizes import GiB
from multiverse.drivers.base import Driver
from multiverse.drivers.process import ProcessDriver
from multiverse.drivers.qemu import write_tls_dh_params
from multiverse.wire import pki
from multiverse.wire.aio import drain_wakeups
from multiverse.wire.convert import (
    GRPC_CHANNEL_OPTIONS,
    GRPC_SERVER_OPTIONS,
    listen_grpc,
    split_address,
)
from multiverse.wire.v1 import multiverse_pb2_grpc as pb_grpc
from multiverse.worker.agent import Agent, AgentServicer, Ctx
from multiverse.worker.imagecache import MasterImages, NodeImageCache
from multiverse.worker.localstore import LocalStore
from multiverse.worker.network import LinuxNetwork, detect_mode
from multiverse.worker.sessions import NodeTLS, SessionServer
from multiverse.worker.sync import Identity, join, observe_forever, renew_forever, sync_forever
from multiverse.worker.usage import HostUsage

log = logging.getLogger("multiverse.worker")

DRIVERS = ("qemu", "firecracker", "multipass", "fake")
NETWORKED = ("qemu", "firecracker")  # the drivers that plug VMs into the cluster network


@dataclass
class WorkerConfig:
    master: str
    data_dir: Path
    token: str = ""
    listen: str = "0.0.0.0:1339"
    advertise: str = ""
    # The direct shell endpoint (worker/sessions.py): "" = the listen host, a free port (the
    # agent tells the master its port with each ticket); "off" = none, shells go by the master.
    session_listen: str = ""
    name: str = ""
    driver: str = "qemu"
    labels: dict[str, str] = field(default_factory=dict)
    capacity: Resources | None = None
    sync_interval: float = 5.0
    fake_delay: float = 0.0
    image_dirs: list[Path] = field(default_factory=list)  # images already here (seeds)
    image_cache: int = 20 * GiB  # bytes the image cache may hold
    # "bridge": VMs on the cluster network; "user": QEMU's NAT; "auto": bridge when this
    # process holds CAP_NET_ADMIN (only the qemu driver plugs into the cluster network).
    network_mode: str = "auto"


def make_image_cache(config: WorkerConfig) -> NodeImageCache:
    root = config.data_dir / "images"
    return NodeImageCache(root, config.image_cache, seeds=[root, *config.image_dirs])


def make_driver(config: WorkerConfig, images: NodeImageCache) -> Driver:
    """The adapter named by ``--driver``; imported lazily, each pulls in its own libraries."""
    state_dir = config.data_dir / config.driver
    if config.driver == "fake":
        from multiverse.drivers.fake import FakeDriver

        return FakeDriver(state_dir, capacity=config.capacity, delay=config.fake_delay)
    if config.driver == "qemu":
        from multiverse.drivers.qemu import QemuDriver

        return QemuDriver(state_dir, images, capacity=config.capacity)
    if config.driver == "firecracker":
        from multiverse.drivers.firecracker import FirecrackerDriver

        return FirecrackerDriver(state_dir, images, capacity=config.capacity)
    if config.driver == "multipass":
        from multiverse.drivers.multipass import MultipassDriver

        return MultipassDriver(state_dir, capacity=config.capacity)
    raise InvalidArgument(f"unknown driver {config.driver!r}: use one of {', '.join(DRIVERS)}")


def qemu_tls_dir(pki_dir: Path) -> Path:
    """The node's certificate as QEMU's tls-creds-x509 reads it (fixed names in one
    directory), for live moves. Links, not copies: the key stays in one file, and a renewal's
    rename shows through them."""
    out = pki_dir / "qemu"
    out.mkdir(mode=0o700, exist_ok=True)
    for name, target in (
        ("ca-cert.pem", "ca.crt"), ("server-cert.pem", "node.crt"),
        ("server-key.pem", "node.key"), ("client-cert.pem", "node.crt"),
        ("client-key.pem", "node.key"),
    ):  # fmt: skip
        link = out / name
        if not link.is_symlink():
            link.unlink(missing_ok=True)
            link.symlink_to(Path("..") / target)
    write_tls_dh_params(out)
    return out


class Worker:
    """A running worker; ``await start()`` then ``await stop()``, or ``await run()``."""

    def __init__(self, config: WorkerConfig, usage: HostUsage | None = None) -> None:
        """``usage``: the host's, when other workers of this process measure it already."""
        self.config = config
        private_dir(config.data_dir)  # its key, its VMs' user data
        network = None
        if config.driver in NETWORKED and detect_mode(config.network_mode) == "bridge":
            network = LinuxNetwork(config.data_dir / "network")
        images = make_image_cache(config)
        driver = make_driver(config, images)
        # Only drivers that boot files from the cache use it (Multipass keeps its own images).
        uses_cache = isinstance(driver, ProcessDriver)
        self.agent = Agent(
            driver,
            LocalStore(config.data_dir / "worker.db"),
            network,
            images if uses_cache else None,
            faults_dir=config.data_dir / "faults",
            usage=usage or HostUsage(config.data_dir),
        )
        images.in_use = lambda: {record.spec.image for record in self.agent.records.values()}
        self.image_source: MasterImages | None = None
        self.identity: Identity | None = None
        self._server: grpc.aio.Server | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._peers: dict[str, tuple[str, grpc.aio.Channel]] = {}
        self.agent.peer = self._dial_peer
        self.sessions = SessionServer(self.agent.tickets, self.agent.open_session)

    def _authorize(self, context: Ctx) -> bool:
        """TLS checked the chain; the agent serves only the master's identity."""
        try:
            return pki.peer_identity_of(context.auth_context()).kind == "master"
        except MultiverseError:
            return False

    def _peer_node(self, context: Ctx) -> str | None:
        """The calling node's id, for the one method nodes may call (reading a move's files)."""
        try:
            identity = pki.peer_identity_of(context.auth_context())
        except MultiverseError:
            return None
        return identity.node_id if identity.kind == "node" else None

    def _dial_peer(self, node_id: str, address: str) -> pb_grpc.AgentServiceStub:
        """Another node's agent, over a channel kept per node, with this node's certificate;
        the peer must present the certificate the CA issued to ``node_id``."""
        assert self.identity is not None
        cached = self._peers.get(node_id)
        if cached is None or cached[0] != address:
            options = (
                ("grpc.ssl_target_name_override", pki.node_server_name(node_id)),
                *GRPC_CHANNEL_OPTIONS,
            )
            channel = grpc.aio.secure_channel(address, self.identity.channel_credentials(), options)
            cached = self._peers[node_id] = (address, channel)
        return pb_grpc.AgentServiceStub(cached[1])

    async def start(self) -> Identity:
        config = self.config
        if config.driver == "firecracker" and self.agent.network is None:
            from multiverse.drivers.firecracker import NO_NETWORK

            # Refused before joining rather than at each launch: no VM here could ever boot.
            raise InvalidArgument(NO_NETWORK)
        await self.agent.observe()  # adopt what kept running while we were away
        if self.agent.image_cache is not None:  # the limit may have shrunk since the last run
            cache = self.agent.image_cache
            await asyncio.to_thread(cache.prune, cache.max_bytes)
        listen_host, port = split_address(config.listen)
        # Checked before joining, as --listen is: a typo must not leave a joined node behind.
        session_at = (
            None
            if config.session_listen == "off"
            else split_address(config.session_listen)
            if config.session_listen
            else (listen_host, 0)
        )
        if port == 0:
            raise InvalidArgument("--listen needs a port: the master must know where to call")
        # Join first: the agent's listener serves the certificate the join brings.
        self.identity = await join(
            config.master,
            token=config.token,
            data_dir=config.data_dir,
            name=config.name,
            advertise=config.advertise or f":{port}",
            driver=config.driver,
            labels=config.labels,
            agent=self.agent,
        )
        self.agent.tls_dir = qemu_tls_dir(config.data_dir / "pki")
        if self.agent.image_cache is not None:
            self.image_source = MasterImages(config.master, self.identity.channel_credentials())
            self.agent.image_cache.source = self.image_source
        self._server = grpc.aio.server(options=GRPC_SERVER_OPTIONS)
        pb_grpc.add_AgentServiceServicer_to_server(
            AgentServicer(self.agent, self._authorize, self._peer_node), self._server
        )
        listen_grpc(self._server, config.listen, self.identity.server_credentials())
        await self._server.start()
        drain_wakeups(asyncio.get_running_loop())  # the master's acks and calls
        if session_at is not None:
            identity = self.identity
            tls = NodeTLS(config.data_dir / "pki", lambda: identity.cert)
            self.agent.session_port = await self.sessions.start(*session_at, tls)
        self._tasks = [
            asyncio.create_task(
                sync_forever(config.master, self.identity, self.agent, config.sync_interval)
            ),
            asyncio.create_task(observe_forever(self.agent, config.sync_interval)),
            asyncio.create_task(renew_forever(config.master, self.identity, config.data_dir)),
        ]
        return self.identity

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.agent.session_port = 0  # no more tickets for an endpoint that is going
        await self.sessions.close()
        if self._server:
            await self._server.stop(grace=1)
        for _address, channel in self._peers.values():
            await channel.close(grace=None)
        await self.agent.shutdown()
        if self.image_source is not None:
            await self.image_source.close()
        self.agent.store.close()


def _free_ports(host: str, count: int) -> int:
    """The first of ``count`` consecutive ports free now, below the kernel's ephemeral range.

    The nodes bind theirs only after joining, seconds later; ports from the ephemeral range
    (what binding port 0 gives) would by then be taken by other processes' connections or
    listeners, and a thousand of them make that a certainty. Below the range, only a process
    asking for a port by number can take one.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    first = 10000
    while first + count <= low:
        for port in range(first, first + count):
            with socket.socket(family) as sock:
                try:
                    sock.bind((host, port))
                except OSError:
                    first = port + 1  # the block starts after the taken one
                    break
        else:
            return first
    raise Unavailable(f"no {count} consecutive free ports below {low} on {host}")


def simulated(config: WorkerConfig, count: int) -> list[WorkerConfig]:
    """``count`` hollow nodes (as kubemark's): each a whole worker of its own, with its data
    dir, identity, certificate, agent listener and sync stream, over the fake driver, so one
    process stands in for many hosts and the master sees exactly what real workers send.

    Node ``i`` is ``<name>-<i>`` in ``<data-dir>/<name>-<i>``; its agent listens on the
    ``--listen`` port plus ``i``; when that port is 0, from the first of ``count`` free ports.
    """
    if count < 1:
        raise InvalidArgument("--simulate needs at least 1 node")
    host, port = split_address(config.listen)
    advertised = split_address(config.advertise)[0] if config.advertise else ""
    width = len(str(count - 1))
    port = port or _free_ports(host, count)
    configs = []
    for index in range(count):
        name = f"{config.name}-{index:0{width}d}"
        node_port = port + index
        configs.append(
            dataclasses.replace(
                config,
                data_dir=config.data_dir / name,
                name=name,
                driver="fake",
                listen=f"{host}:{node_port}",
                advertise=f"{advertised}:{node_port}" if advertised else "",
                session_listen="off",  # a thousand more listeners would test nothing here
            )
        )
    return configs


class Workers:
    """Several workers in one process (``multiverse worker --simulate N``)."""

    def __init__(self, configs: list[WorkerConfig], concurrency: int = 16) -> None:
        # One host: one measure of its usage for all, not one per node per report.
        usage = HostUsage(configs[0].data_dir.parent) if configs else None
        self.workers = [Worker(config, usage) for config in configs]
        # Joins at once from a thousand nodes would only queue up at the master's API.
        self._gate = asyncio.Semaphore(concurrency)

    async def _start(self, worker: Worker) -> Identity:
        async with self._gate:
            return await worker.start()

    async def start(self) -> list[Identity]:
        return list(await asyncio.gather(*(self._start(worker) for worker in self.workers)))

    async def stop(self) -> None:
        await asyncio.gather(*(worker.stop() for worker in self.workers), return_exceptions=True)
