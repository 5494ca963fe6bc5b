"""Wiring of the master process: store, cluster gRPC service, REST API, health watch."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import grpc
import tomli_w
import uvicorn

from multiverse.core.errors import InvalidArgument
from multiverse.core.files import private_dir, write_private
from multiverse.core.model import NodeStatus
from multiverse.drivers.fake import ALLOW_ENV
from multiverse.master import auth
from multiverse.master.api import create_app
from multiverse.master.cluster import Agents, ClusterServicer
from multiverse.master.events import EventBus
from multiverse.master.faults import Faults
from multiverse.master.health import watch_nodes
from multiverse.master.images import Images, ImageServicer
from multiverse.master.instances import Instances
from multiverse.master.leader import Leadership
from multiverse.master.network import Ipam
from multiverse.master.nodes import Nodes
from multiverse.master.operations import Operations
from multiverse.master.provision import Installer
from multiverse.master.reconciler import Reconciler
from multiverse.master.wheelhouse import Wheelhouse
from multiverse.store.repository import Change, Store
from multiverse.wire import pki
from multiverse.wire.aio import drain_wakeups
from multiverse.wire.convert import GRPC_SERVER_OPTIONS, listen_grpc, split_address
from multiverse.wire.v1 import multiverse_pb2_grpc as pb_grpc

log = logging.getLogger("multiverse.master")


MAX_REQUEST_HEAD = 1024 * 1024
"""Bytes of request line and headers the API reads: a query naming a page of 1,000 instances
(``GET /api/v1/info?name=...``, up to ~70 KB of valid names) fits with room to spare."""


@dataclass
class MasterConfig:
    data_dir: Path
    listen: str = "0.0.0.0:1337"
    api_listen: str = "0.0.0.0:1338"
    db: str = ""
    node_timeout: float = 20.0  # seconds without a report before a node is NotReady
    down_timeout: float = 120.0  # ... and before it is Down (its instances then Unknown)
    user_config: Path | None = None  # written if missing, so the CLI works at once
    advertise: str = ""  # the host workers reach the master at (default: guessed)
    insecure_http: bool = False  # plain HTTP API, for loopback-only use
    max_auth_failures: int = 20  # per client and minute; then it is refused for a while
    # Where the tiny guest may be found for its import at the first start (a build's output).
    image_dirs: list[Path] = field(default_factory=list)
    image_rate_limit: float = 0.0  # bytes/s per image transfer to a worker; 0: no limit
    network: str = ""  # the cluster network's CIDR at the first start ("": a free default)
    nat: bool | None = None  # masquerade guests' outbound traffic (None: keep as stored)
    node_cert_lifetime: timedelta = pki.NODE_CERT_LIFETIME  # workers renew at a third left
    wheelhouse: Path | None = None  # `node add`'s wheel cache (default: <data-dir>/wheelhouse)


def client_config_text(server: str, token: str, ca_pem: bytes | None) -> str:
    """The CLI's config: where the master is, an admin token, and the CA that the master's
    certificate must come from (pinned: no other trust store is asked)."""
    values = {"server": server, "token": token}
    if ca_pem is not None:
        values["ca_certificate"] = ca_pem.decode().strip() + "\n"
    return "# Written by `multiverse master`.\n" + tomli_w.dumps(values, multiline_strings=True)


def api_socket(address: str) -> socket.socket:
    """The API's listening socket, bound (not listening yet: uvicorn does that).

    Made with ``IPPROTO_TCP`` spelled out: asyncio turns Nagle off (TCP_NODELAY) only on
    connections whose socket says so, and ``accept`` copies the listener's protocol number. With
    the default 0, every response's small writes (headers, a chunk, the chunked end) waited for
    the client's delayed ACK: ~40 ms added to each call on a kept-alive connection.
    """
    host, port = split_address(address)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise InvalidArgument(f"cannot listen on {address}: {exc.strerror}") from exc
    return sock


class _Uvicorn(uvicorn.Server):
    """Uvicorn without its own signal handling: the process owner decides when to stop."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class Master:
    def __init__(self, config: MasterConfig) -> None:
        self.config = config
        private_dir(config.data_dir)  # its CA key, tokens and database
        self.store = Store(config.db) if config.db else Store.for_data_dir(config.data_dir)
        self.store.migrate()
        self.ipam = Ipam.open(self.store, config.network, config.nat)
        # The cluster CA, made at the first start; the listener's certificate is issued anew at
        # every start, so it names the addresses the host has now.
        self.ca = pki.ClusterCA.load_or_create(config.data_dir / "pki")
        self.server_cert = pki.issue_server_cert(
            self.ca, dns_names=[socket.gethostname()], ips=_host_addresses()
        )
        self.agents = Agents(
            self.ca,
            pki.sign_master_client_cert(self.ca),
            node_cert_lifetime=config.node_cert_lifetime,
        )
        self.events = EventBus()
        self.operations = Operations(self.events)
        self.reconciler = Reconciler(self.store, self.agents, self.events, self.ipam)
        self.instances = Instances(
            self.store, self.agents, self.reconciler, self.operations, self.events,
            placement_wait=config.node_timeout, ipam=self.ipam,
        )  # fmt: skip
        self.nodes = Nodes(self.store, self.agents, self.instances)
        self.images = Images(
            self.store, config.data_dir / "images", self.operations, self.agents,
            rate_limit=config.image_rate_limit,
        )  # fmt: skip
        self.cluster = ClusterServicer(self.store, self.agents, self.ipam)
        self.cluster.on_change = self._changed
        self.nodes.on_removed = self.cluster.forget
        self.faults = Faults(self.store, self.agents, self.events)
        self.cluster.fault_plan = self.faults.plan_for
        self.installer = Installer(
            self.store, self.events, self.operations,
            Wheelhouse(config.wheelhouse or config.data_dir / "wheelhouse"),
            self._install_token, lambda: self.grpc_port,
            worker_env={ALLOW_ENV: "1"} if os.environ.get(ALLOW_ENV) == "1" else {},
        )  # fmt: skip
        self.installer.on_uninstalled = lambda name: self.nodes.remove(name)
        self.installer.ensure_empty = self.nodes.ensure_empty
        self.api_url = ""
        self.master_id = str(uuid.uuid4())  # this process, among the masters of the database
        self.leadership: Leadership | None = None
        self.grpc_port = 0
        self._grpc: grpc.aio.Server | None = None
        self._http: _Uvicorn | None = None
        self._tasks: list[asyncio.Task[None]] = []

    def _changed(self, transitions: list[tuple[str, NodeStatus]], changes: list[Change]) -> None:
        """One place where state changes become events and wake the reconciler."""
        for name, status in transitions:
            self.events.publish("node", name=name, status=status.value)
        self.reconciler.publish_changes(changes)
        if transitions:
            self.instances.view.invalidate()
            self.reconciler.kick()

    async def _install_token(self, host: str, ttl: timedelta, description: str) -> tuple[str, str]:
        """`node add`'s join token: one use, short-lived, naming the master as the new host
        reaches it (the address of the installer's SSH connection) unless --advertise says."""
        host = self.config.advertise or host
        issued, token = await self.join_token(ttl, 1, description, host=host)
        return issued.id, token

    async def join_token(
        self, ttl: timedelta | None, uses: int | None, description: str = "", host: str = ""
    ) -> tuple[auth.IssuedToken, str]:
        """A join token: where the master is, the CA's fingerprint, and a new secret."""
        issued = await auth.issue_token(
            self.store, auth.JOIN, ttl=ttl or auth.DEFAULT_JOIN_TTL,
            uses=auth.DEFAULT_JOIN_USES if uses is None else uses,
            description=description,
        )  # fmt: skip
        host = host or self.config.advertise or _advertised_host(self.config.listen)
        api_port = split_address(self.config.api_listen)[1]
        _, token_id, secret = issued.token.split(".")
        token = pki.JoinToken(
            addresses=(f"{host}:{self.grpc_port}", f"{host}:{api_port}"),
            ca_fingerprint=self.ca.fingerprint,
            token_id=token_id,
            secret=secret,
        )
        return issued, token.encode()

    async def _ensure_client_config(self) -> None:
        """First start: an admin API token in <data-dir>/client.toml (and the user's config)."""
        path = self.config.data_dir / "client.toml"
        if path.exists():
            return
        issued = await auth.issue_token(
            self.store, auth.API, role="admin", description="first admin"
        )
        ca_pem = None if self.config.insecure_http else self.ca.cert_pem
        text = client_config_text(self.api_url, issued.token, ca_pem)
        write_private(path, text.encode())
        user = self.config.user_config
        if user is not None and not user.exists():
            write_private(user, text.encode())
            log.info("wrote %s", user)

    def _tls_files(self, host: str) -> tuple[str | None, str | None]:
        """uvicorn's TLS options: the listener's certificate, unless --insecure-http."""
        if self.config.insecure_http:
            if host not in ("127.0.0.1", "::1", "localhost"):
                log.warning(
                    "INSECURE: the API speaks plain HTTP on %s: tokens cross the network in "
                    "clear. Use --insecure-http only on loopback.", host,
                )  # fmt: skip
            return None, None
        directory = self.config.data_dir / "pki"
        self.server_cert.save(directory, "server")
        return str(directory / "server.crt"), str(directory / "server.key")

    async def start(self) -> None:
        config = self.config
        # Until a node reports, the master cannot know what happened while it was away.
        for node in await self.store.list_nodes():
            if node.status == NodeStatus.INSTALLING:  # its install ran in the old process
                await self.store.update_node(
                    node.id, status=NodeStatus.FAILED,
                    message=f"{node.message}: the master restarted; run `node add` again",
                )  # fmt: skip
            elif node.status != NodeStatus.FAILED:
                await self.store.update_node(node.id, status=NodeStatus.UNKNOWN)
        await self.images.import_builtin(config.image_dirs)
        self._grpc = grpc.aio.server(options=GRPC_SERVER_OPTIONS)
        pb_grpc.add_ClusterServiceServicer_to_server(self.cluster, self._grpc)
        pb_grpc.add_ImageServiceServicer_to_server(
            ImageServicer(self.images, self.cluster.peer_node), self._grpc
        )
        credentials = pki.server_credentials(
            self.ca.cert_pem, self.server_cert, require_client_auth=True
        )
        self.grpc_port = listen_grpc(self._grpc, config.listen, credentials)
        await self._grpc.start()
        drain_wakeups(asyncio.get_running_loop())  # nodes' reports, however busy the API

        host, port = split_address(config.api_listen)
        app = create_app(
            self.store, self.instances, self.nodes, self.join_token, self.ca,
            self.cluster.image_catalog, self.images, max_auth_failures=config.max_auth_failures,
            ipam=self.ipam, faults=self.faults,
            installer=self.installer,
        )  # fmt: skip
        certfile, keyfile = self._tls_files(host)
        self._http = _Uvicorn(
            uvicorn.Config(
                app,
                host=host,
                port=port,
                log_level="warning",
                lifespan="off",
                ssl_certfile=certfile,
                ssl_keyfile=keyfile,
                # h11 refuses a longer request head with a text/plain 400 that the API's error
                # contract cannot shape; `info` of a full page of names must fit.
                h11_max_incomplete_event_size=MAX_REQUEST_HEAD,
            )
        )
        # Bound here rather than by uvicorn, which exits the process when it cannot bind.
        sock = api_socket(config.api_listen)
        bound = sock.getsockname()[1]
        client_host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        scheme = "http" if config.insecure_http else "https"
        self.api_url = f"{scheme}://{client_host}:{bound}"
        # Before the API answers: whoever sees it up (a script, the tests) finds the first
        # admin's client config there already.
        await self._ensure_client_config()
        serving = asyncio.create_task(self._http.serve(sockets=[sock]))
        while not self._http.started and not serving.done():
            await asyncio.sleep(0.02)
        self.leadership = Leadership(
            self.store,
            self.master_id,
            [
                lambda: watch_nodes(
                    self.store, config.node_timeout, config.down_timeout, self._changed
                ),
                self._reconcile,
                self.faults.run,
            ],
            api=self.api_url,
            cluster=f"{_advertised_host(config.listen)}:{self.grpc_port}",
        )
        self._tasks = [
            serving,
            asyncio.create_task(self.leadership.run()),
            asyncio.create_task(self.cluster.heartbeats.run()),
        ]
        log.info("master addr: %s / api server addr: %s", config.listen, config.api_listen)

    async def _reconcile(self) -> None:
        """The leader's reconciler; before its first round, the moves a previous leader left
        unfinished own their instances again."""
        await self.nodes.moves.resume()
        await self.reconciler.run()

    async def stop(self) -> None:
        if self._http:
            self._http.should_exit = True
        for task in self._tasks[1:]:
            task.cancel()
        await self.operations.close()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._grpc:
            await self._grpc.stop(grace=1)
        await self.agents.close()
        with contextlib.suppress(Exception):  # leaving the list is a courtesy
            await self.store.forget_master(self.master_id)
        self.store.close()


def _host_addresses() -> list[str]:
    """Every IP address of this host, for the listener's certificate."""
    import psutil

    found = []
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family in (socket.AF_INET, socket.AF_INET6):
                found.append(address.address.split("%")[0])
    return found


def _advertised_host(listen: str) -> str:
    """The host a worker should dial: the listen host, or this host's first outward IPv4."""
    host = split_address(listen)[0]
    if host not in ("0.0.0.0", "::", ""):
        return host
    for address in _host_addresses():
        if "." in address and not address.startswith("127."):
            return address
    return "127.0.0.1"
