"""The REST API under /api/v1 (FastAPI; OpenAPI at /docs). Thin: it validates, authorises,
calls the services and shapes JSON. Every error is ``{"error": {"code", "message"}}``.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import logging
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Query, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import Histogram
from pydantic import BaseModel, Field, field_validator
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from starlette.websockets import WebSocketDisconnect

from multiverse import __version__
from multiverse.core.environment import ENV_LABEL, parse_document
from multiverse.core.errors import (
    InvalidArgument,
    MultiverseError,
    NotFound,
    RateLimited,
    Unauthenticated,
    Unavailable,
    Unschedulable,
)
from multiverse.core.faults import FaultKind, parse_duration
from multiverse.core.images import parse_sha256
from multiverse.core.model import (
    DEFAULT_CPUS,
    DEFAULT_DISK,
    DEFAULT_IMAGE,
    DEFAULT_MEMORY,
    Instance,
    InstanceSpec,
    InstanceState,
    MigrationKind,
    Node,
    NodeStatus,
    numbered,
    parse_labels,
)
from multiverse.core.network import parse_publish
from multiverse.core.sessions import valid_size
from multiverse.core.sizes import parse_size
from multiverse.master import auth, ui
from multiverse.master.environments import Environments
from multiverse.master.faults import Faults
from multiverse.master.images import FileSource, Images, image_json
from multiverse.master.instances import InstanceInfo, Instances
from multiverse.master.metrics import CONTENT_TYPE, Metrics
from multiverse.master.moves import migration_json
from multiverse.master.network import Ipam
from multiverse.master.nodes import Nodes
from multiverse.master.operations import Operation
from multiverse.master.provision import (
    DEFAULT_ROOT,
    Credentials,
    Installer,
    InstallRequest,
    SSHTarget,
)
from multiverse.master.scheduler import Strategy
from multiverse.master.sessions import relay
from multiverse.store.repository import Store
from multiverse.wire import pki

log = logging.getLogger("multiverse.master")

HTTP_STATUS = {
    "invalid_argument": 400,
    "unauthenticated": 401,
    "permission_denied": 403,
    "not_found": 404,
    "already_exists": 409,
    "conflict": 409,
    "unschedulable": 409,
    "unavailable": 503,
    "rate_limited": 429,
    "driver_error": 502,
}


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None, **details: Any
) -> JSONResponse:
    """The error body every 4xx/5xx has; ``details`` add fields beside code and message."""
    if status == 401:
        headers = {**(headers or {}), "WWW-Authenticate": "Bearer"}
    return JSONResponse(
        {"error": {"code": code, "message": message, **details}},
        status_code=status,
        headers=headers,
    )


# ---- request bodies ----

Size = int | str


class LaunchBody(BaseModel):
    name: str = Field(max_length=63)
    cpus: int = DEFAULT_CPUS
    memory: Size = DEFAULT_MEMORY
    disk: Size = DEFAULT_DISK
    image: str = Field(DEFAULT_IMAGE, max_length=128)
    user_data: str = Field("", max_length=65536)
    labels: dict[str, str] = {}
    node: str | None = None
    selector: dict[str, str] = {}
    strategy: Strategy = "spread"
    ip: str = Field("", max_length=64)  # a given free address of the cluster network
    publish: list[str] = Field([], max_length=64)  # "8080:80" or "5353:53/udp"
    count: int | None = None  # this many, named from {n} in ``name`` (Instances.launch_many)


class ImportBody(BaseModel):
    """Either ``files`` uploaded before (``PUT /api/v1/blobs/...``) or a ``url`` and its sha256."""

    name: str = Field(max_length=63)
    aliases: list[str] = Field([], max_length=16)
    files: dict[str, str] = Field({}, max_length=100_000)  # relative path -> sha256
    url: str = Field("", max_length=4096)
    sha256: str = Field("", max_length=71)
    rootfs_size: Size = "2G"  # an OCI layout becomes an ext4 of this size


class PullBody(BaseModel):
    nodes: list[str] = Field([], max_length=10_000)
    all: bool = False


class FaultBody(BaseModel):
    kind: FaultKind
    targets: list[str] = Field(max_length=256)
    peers: list[str] = Field([], max_length=256)
    params: dict[str, str] = Field({}, max_length=16)
    one_way: bool = False
    duration: str | None = Field(None, max_length=32)  # "30s"


class ApplyBody(BaseModel):
    spec: dict[str, Any]  # the environment file's JSON form (core/environment.py)
    prune: bool = False
    recreate: bool = False


class StopBody(BaseModel):
    force: bool = False


class MoveBody(BaseModel):
    node: str = Field(min_length=1, max_length=63)
    kind: Literal["cold", "live"] = "cold"


class TokenBody(BaseModel):
    kind: Literal["join", "api"] = "join"
    role: Literal["admin", "viewer"] = "admin"
    ttl_seconds: int | None = Field(None, ge=1, le=int(auth.MAX_TTL.total_seconds()))
    uses: int | None = Field(None, ge=1, le=auth.MAX_USES)
    description: str = Field("", max_length=255)


class RevokeBody(BaseModel):
    token: str = Field(max_length=1024)


class LabelsBody(BaseModel):
    labels: dict[str, str | None]  # a None value removes the label


class JoinBody(BaseModel):
    token: str = Field(max_length=512)
    csr: str = Field(max_length=16 * 1024)
    name: str = Field(max_length=63)


class NodeCredentialsBody(BaseModel):
    """How the master logs in to a host over SSH. Used for that connection and then dropped:
    never stored, logged or returned."""

    identity: str = Field("", max_length=64 * 1024)  # a private key (preferred)
    password: str = Field("", max_length=4096)


class NodeAddBody(NodeCredentialsBody):
    name: str = Field(max_length=63)
    ssh: str = Field(max_length=300)  # user@host[:port]
    host_key_fingerprint: str = Field("", max_length=100)
    known_hosts: str = Field("", max_length=512 * 1024)
    driver: Literal["qemu", "firecracker", "multipass", "fake"] = "qemu"
    labels: dict[str, str] = {}
    install_deps: bool = False
    root: str = Field(DEFAULT_ROOT, max_length=255)


class SshLoginBody(BaseModel):
    public_key: str = Field(max_length=16 * 1024)  # checked whole by core.sshlogin


class SessionBody(BaseModel):
    command: list[str] = Field(default_factory=list, max_length=4096)  # empty: the login shell
    tty: bool = True
    cols: int = 80
    rows: int = 24

    @field_validator("command")
    @classmethod
    def _no_nul(cls, command: list[str]) -> list[str]:
        return _without_nul(command)


class ExecBody(BaseModel):
    command: list[str] = Field(min_length=1, max_length=4096)
    stdin: str = ""  # base64

    @field_validator("command")
    @classmethod
    def _no_nul(cls, command: list[str]) -> list[str]:
        return _without_nul(command)


def _without_nul(command: list[str]) -> list[str]:
    # No program can receive a NUL inside an argument; say so instead of failing later.
    if any("\0" in part for part in command):
        raise ValueError("arguments cannot contain NUL characters")
    return command


# ---- JSON shapes ----


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat().replace("+00:00", "Z") if moment else None


def node_json(node: Node) -> dict[str, Any]:
    free = node.free
    return {
        "name": node.name,
        "id": node.id,
        "status": node.status.value,
        "ipv4": node.ipv4,
        "address": node.address,
        "driver": node.driver,
        "cpus": {"total": node.capacity.cpus, "free": free.cpus},
        "memory": {"total": node.capacity.memory, "free": free.memory},
        "disk": {"total": node.capacity.disk, "free": free.disk},
        # Measured on the host (cores busy, bytes), next to the allocations above.
        "used": {"cpus": node.used.cpus, "memory": node.used.memory, "disk": node.used.disk},
        "labels": node.effective_labels,  # what placement matches selectors against
        "node_labels": node.labels,
        "admin_labels": node.admin_labels,
        "cordoned": node.cordoned,
        "instances": node.instance_count,
        "last_sync": _iso(node.last_sync),
        "version": node.version,
        "network_mode": node.network_mode,
        "message": node.message,  # `node add`: the step running, or why it failed
    }


def instance_json(instance: Instance) -> dict[str, Any]:
    spec = instance.spec
    return {
        "name": spec.name,
        "id": instance.id,
        "node": instance.node_name,
        "state": instance.state.value,
        "desired": instance.desired.value,
        "ipv4": instance.ipv4,
        "image": spec.image,
        "release": instance.release,
        "cpus": spec.cpus,
        "memory": spec.memory,
        "disk": spec.disk,
        "labels": spec.labels,
        "message": instance.message,
        "restarts": instance.restarts,
        "created_at": _iso(instance.created_at),
        "address": instance.address,
        "mac": instance.mac,
        "publish": list(instance.publish),
    }


def environment_json(name: str, members: list[Instance]) -> dict[str, Any]:
    return {
        "name": name,
        "instances": [instance_json(instance) for instance in members],
        "running": sum(instance.state == InstanceState.RUNNING for instance in members),
    }


def info_json(info: InstanceInfo) -> dict[str, Any]:
    stats = info.stats
    body = instance_json(info.instance)
    body.update(
        load=list(stats.load) if stats else None,
        memory_usage={"used": stats.memory_used, "total": stats.memory_total} if stats else None,
        disk_usage={"used": stats.disk_used, "total": stats.disk_total} if stats else None,
        info_error=info.error,
    )
    if stats and stats.release:
        body["release"] = stats.release
    return body


MAX_BODY = 1024 * 1024  # bytes; the largest legitimate body (user-data) is far smaller
# Routes whose body is a stream of any size, written to disk as it comes (image files): the
# route itself reads it chunk by chunk, and only an admin token gets that far.
STREAMED_BODIES = ("/api/v1/blobs/",)


def body_limit_applies(path: str) -> bool:
    return not path.startswith(STREAMED_BODIES)


class Timed:
    """Each request's time until its response starts, into ``histogram`` by method, route
    template and status (ASGI middleware: Starlette's ``BaseHTTPMiddleware`` costs a task and
    a pair of streams per request, on every launch and exec)."""

    def __init__(self, app: ASGIApp, histogram: Histogram) -> None:
        self.app = app
        self.histogram = histogram

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        observed = False

        def observe(status: int) -> None:
            nonlocal observed
            observed = True
            route = getattr(scope.get("route"), "path", "unmatched")  # set by the router
            self.histogram.labels(scope["method"], route, str(status)).observe(
                time.perf_counter() - started
            )

        async def timed(message: Message) -> None:
            if message["type"] == "http.response.start":
                observe(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, timed)
        finally:
            if not observed:
                observe(500)  # it ended before answering: a bug, or the client went away


class BodyLimit:
    """Refuse request bodies over ``limit`` bytes, counted as they arrive (ASGI middleware).

    ``Content-Length`` alone is not enough: a chunked body has none, and a route would read it
    whole before any check (``/api/v1/cluster/join`` even before authentication). So every
    ``http.request`` message is counted as the app receives it; past the limit the client gets
    413 at once and the app sees a disconnect. Nothing is buffered here.
    """

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not body_limit_applies(scope["path"]):
            await self.app(scope, receive, send)
            return
        length = Headers(scope=scope).get("content-length", "")
        if length.isdigit() and int(length) > self.limit:
            await self._refuse(scope, receive, send)
            return
        received = 0
        refused = started = False

        async def counted() -> Message:
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    refused = True
                    if not started:
                        await self._refuse(scope, receive, send)
                    return {"type": "http.disconnect"}
            return message

        async def guarded(message: Message) -> None:
            nonlocal started
            if refused:
                return  # the client has its 413 already; what the app says now goes nowhere
            started = True
            await send(message)

        await self.app(scope, counted, guarded)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        # No "Connection: close": closing a socket with unread data makes the kernel send a
        # reset, and a client still sending would lose the 413 with it. The server discards
        # the rest of the body instead (never holding it) and keeps the connection.
        response = error_response(413, "too_large", f"request body over {self.limit} bytes")
        await response(scope, receive, send)


class _FailedAuth:
    """Failed authentications per client address in a sliding window.

    Only failures count and only failures are refused: past ``limit`` failures in ``window``
    seconds a client's wrong tokens get 429 instead of 401 (guessing gets slow), while a valid
    token always passes, so a client behind the same address (a NAT, a proxy, another local
    user) is never locked out. The table holds at most ``max_clients`` addresses, least
    recently failed dropped first, and forgets an address once its last failure is out of the
    window.
    """

    def __init__(
        self,
        limit: int = 20,
        window: float = 60.0,
        max_clients: int = 4096,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit = limit
        self.clock = clock
        self.window = window
        self.max_clients = max_clients
        # Ordered by last failure, oldest first; each keeps at most ``limit`` times.
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._failures)

    def failed(self, client: str) -> None:
        """Count a failure; raises RateLimited when ``client`` failed ``limit`` times in the
        window before this one."""
        moment = self.clock()
        cutoff = moment - self.window
        while self._failures and next(iter(self._failures.values()))[-1] < cutoff:
            self._failures.popitem(last=False)
        failures = self._failures.pop(client, None) or deque(maxlen=self.limit)
        limited = len(failures) == self.limit and failures[0] >= cutoff
        failures.append(moment)
        self._failures[client] = failures
        while len(self._failures) > self.max_clients:
            self._failures.popitem(last=False)
        if limited:
            raise RateLimited(
                f"too many failed authentications from {client}; wait {self.window:.0f}s"
            )


# A browser cannot set headers on a WebSocket, only subprotocols: it offers
# [WS_PROTOCOL, WS_BEARER + token] (as Kubernetes' "base64url.bearer.authorization.k8s.io."),
# so the token stays out of the URL and the logs; the server answers with WS_PROTOCOL.
WS_PROTOCOL = "multiverse.v1"
WS_BEARER = "bearer.multiverse."


def _bearer(request: HTTPConnection) -> str:
    """The token from ``Authorization: Bearer``, or from a WebSocket's subprotocols."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    if request.scope["type"] == "websocket":
        for protocol in request.scope.get("subprotocols", []):
            if protocol.startswith(WS_BEARER):
                return str(protocol[len(WS_BEARER) :])
    return ""


async def _accept(websocket: WebSocket) -> None:
    """Accept, naming WS_PROTOCOL when offered: a browser that offered subprotocols drops a
    connection whose answer names none."""
    offered = websocket.scope.get("subprotocols", [])
    await websocket.accept(subprotocol=WS_PROTOCOL if WS_PROTOCOL in offered else None)


async def _caller(request: HTTPConnection) -> dict[str, object]:
    """The API token's record; every route but health needs one."""
    token = _bearer(request)
    try:
        if not token:
            raise Unauthenticated("missing API token: send Authorization: Bearer <token>")
        return await auth.verify_token(request.app.state.store, auth.API, token)
    except Unauthenticated:
        limiter: _FailedAuth = request.app.state.failed_auth
        limiter.failed(request.client.host if request.client else "unknown")
        raise


async def _admin(record: Annotated[dict[str, object], Depends(_caller)]) -> dict[str, object]:
    # A coroutine although it awaits nothing: FastAPI runs a plain function dependency in a
    # thread, a hop for every write of the API.
    auth.require_role(record, "admin")
    return record


Reader = Annotated[dict[str, object], Depends(_caller)]
Admin = Annotated[dict[str, object], Depends(_admin)]


JoinTokenIssuer = Callable[
    [timedelta | None, int | None, str], Awaitable[tuple[auth.IssuedToken, str]]
]


def create_app(
    store: Store,
    instances: Instances,
    nodes: Nodes,
    join_token: JoinTokenIssuer,
    ca: pki.ClusterCA,
    image_catalog: Callable[[], Awaitable[list[dict[str, Any]]]],
    image_store: Images,
    max_auth_failures: int = 20,
    ipam: Ipam | None = None,
    faults: Faults | None = None,
    installer: Installer | None = None,
) -> FastAPI:
    app = FastAPI(title="Multiverse", version=__version__, docs_url="/docs")
    metrics = Metrics(store, instances.reconciler, image_store)

    @app.exception_handler(MultiverseError)
    async def _domain_error(_request: Request, exc: MultiverseError) -> JSONResponse:
        # An unschedulable launch says why each node refused, as data: [{"node", "reason"}].
        details = (
            {"reasons": [{"node": n, "reason": r} for n, r in exc.reasons.items()]}
            if isinstance(exc, Unschedulable) and exc.reasons
            else {}
        )
        headers = None
        if isinstance(exc, Unavailable) and exc.retry_after is not None:
            headers = {"Retry-After": str(exc.retry_after)}
        return error_response(
            HTTP_STATUS.get(exc.code, 500), exc.code, exc.message, headers, **details
        )

    @app.exception_handler(Exception)
    async def _bug(_request: Request, exc: Exception) -> JSONResponse:
        # A bug: logged with its traceback here, told to the client without internals.
        log.exception("unhandled error in the API")
        return error_response(500, "internal", "internal error; the master's log has the details")

    @app.exception_handler(RequestValidationError)
    async def _bad_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc'][1:]) or 'body'}: {error['msg']}"
            for error in exc.errors()
        )
        return error_response(400, "invalid_argument", problems or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail))

    app.state.store = store
    app.state.failed_auth = _FailedAuth(limit=max_auth_failures)

    app.add_middleware(Timed, histogram=metrics.api_latency)
    app.add_middleware(BodyLimit)  # added last: outermost, before anything reads a body

    @app.get("/api/v1/health")
    async def health() -> dict[str, str]:
        return {"status": "ok", "version": __version__}

    @app.get("/api/v1/network")
    async def network(_: Reader) -> dict[str, Any]:
        if ipam is None:
            raise NotFound("this cluster has no network")
        return await ipam.usage()

    def _faults() -> Faults:
        if faults is None:
            raise NotFound("this master takes no faults")
        return faults

    @app.get("/api/v1/faults")
    async def list_faults(_: Reader) -> list[dict[str, object]]:
        return [fault.json() for fault in await _faults().in_force()]

    @app.post("/api/v1/faults", status_code=201)
    async def add_fault(body: FaultBody, _: Admin) -> dict[str, object]:
        duration = None if body.duration is None else parse_duration(body.duration, "duration")
        fault = await _faults().add(
            body.kind, tuple(body.targets), tuple(body.peers), body.params,
            one_way=body.one_way, duration=duration,
        )  # fmt: skip
        return fault.json()

    @app.delete("/api/v1/faults/{fault_id}")
    async def heal_fault(fault_id: str, _: Admin) -> list[dict[str, object]]:
        return [fault.json() for fault in await _faults().heal(fault_id)]

    @app.delete("/api/v1/faults")
    async def heal_all_faults(_: Admin) -> list[dict[str, object]]:
        return [fault.json() for fault in await _faults().heal(None)]

    @app.get("/api/v1/whoami")
    async def whoami(record: Reader) -> dict[str, Any]:
        """The caller's own token (never its secret): the dashboard asks which buttons to show."""
        return {
            "id": record["id"],
            "role": record["role"],
            "description": record["description"],
            "expires_at": _iso(record["expires_at"]),  # type: ignore[arg-type]
        }

    @app.get("/api/v1/images")
    async def images(_: Reader) -> list[dict[str, Any]]:
        return await image_catalog()

    @app.get("/api/v1/image-store")
    async def list_stored_images(_: Reader) -> list[dict[str, Any]]:
        return [image_json(image) for image in await image_store.all()]

    @app.get("/api/v1/image-store/{name}")
    async def get_stored_image(name: str, _: Reader) -> dict[str, Any]:
        return image_json(await image_store.get(name))

    @app.post("/api/v1/image-store", status_code=202)
    async def import_image(body: ImportBody, _: Admin) -> dict[str, Any]:
        """Import uploaded files or a URL; the operation tells the progress and the image."""
        source: FileSource | tuple[str, str]
        if body.url and body.files:
            raise InvalidArgument("give files or a url, not both")
        if body.url:
            if not body.sha256:
                raise InvalidArgument("a url needs its sha256, to check what arrives")
            source = (body.url, body.sha256)
        elif body.files:
            source = FileSource(
                {path: parse_sha256(sha) for path, sha in body.files.items()},
                rootfs_size=parse_size(body.rootfs_size),
            )
        else:
            raise InvalidArgument("nothing to import: give files or a url")
        return (await image_store.start_import(body.name, body.aliases, source)).json()

    @app.delete("/api/v1/image-store/{name}")
    async def delete_image(name: str, _: Admin) -> dict[str, Any]:
        return image_json(await image_store.delete(name))

    @app.post("/api/v1/image-store/{name}/pull", status_code=202)
    async def pull_image(name: str, body: PullBody, _: Admin) -> dict[str, Any]:
        """Warm the caches of some nodes (or all Ready ones) ahead of launches."""
        if body.all:
            targets = [node for node in await store.list_nodes() if node.status == NodeStatus.READY]
        else:
            targets = [await store.find_node(node_name) for node_name in body.nodes]
        return (await image_store.start_pull(name, targets)).json()

    @app.get("/api/v1/blobs/{digest}")
    async def get_blob(digest: str, _: Admin) -> dict[str, Any]:
        """Whether the master has this file already (404 if not): the client skips its upload."""
        sha256 = parse_sha256(digest)
        return {"digest": f"sha256:{sha256}", "size": image_store.blobs.size(sha256)}

    @app.put("/api/v1/blobs/{digest}", status_code=201)
    async def put_blob(digest: str, request: Request, _: Admin) -> dict[str, Any]:
        """One file of an image, streamed: hashed while written, kept only if it is ``digest``."""
        sha256 = parse_sha256(digest)
        if not image_store.blobs.has(sha256):
            await image_store.blobs.add_stream(request.stream(), sha256)
        return {"digest": f"sha256:{sha256}", "size": image_store.blobs.size(sha256)}

    @app.get("/api/v1/cluster/ca")
    async def cluster_ca() -> dict[str, str]:
        """The CA certificate, public: a joining worker checks it against its token's
        fingerprint before trusting it (as kubeadm's cluster-info)."""
        return {"certificate": ca.cert_pem.decode(), "fingerprint": ca.fingerprint}

    @app.post("/api/v1/cluster/join", status_code=201)
    async def admit_node(body: JoinBody) -> dict[str, str]:
        """A new worker's first step: its join token and CSR for a node certificate. The
        token is the credential here, so no API token is asked for."""
        node, certificate = await nodes.admit(body.token, body.csr.encode(), body.name)
        return {
            "node_id": node.id,
            "name": node.name,
            "certificate": certificate.decode(),
            "ca_certificate": ca.cert_pem.decode(),
        }

    def _installer() -> Installer:
        if installer is None:
            raise Unavailable("this master does not install nodes")
        return installer

    @app.post("/api/v1/nodes", status_code=202)
    async def add_node(body: NodeAddBody, _: Admin) -> dict[str, Any]:
        """Install a worker on a host over SSH and wait for it to join: an operation with one
        progress line per step; the node is Installing meanwhile, then Ready or Failed."""
        request = InstallRequest(
            name=body.name, target=SSHTarget.parse(body.ssh), driver=body.driver,
            labels=body.labels, install_deps=body.install_deps, root=body.root,
        )  # fmt: skip
        credentials = Credentials(
            password=body.password, identity=body.identity, known_hosts=body.known_hosts,
            host_key_fingerprint=body.host_key_fingerprint,
        )  # fmt: skip
        return (await _installer().add(request, credentials)).json()

    @app.post("/api/v1/nodes/{name}/uninstall", status_code=202)
    async def uninstall_node(name: str, body: NodeCredentialsBody, _: Admin) -> dict[str, Any]:
        """Stop the worker `node add` installed, remove its unit, venv and data dir, then forget
        the node; refused while it holds instances."""
        credentials = Credentials(password=body.password, identity=body.identity)
        return (await _installer().uninstall(name, credentials)).json()

    @app.delete("/api/v1/nodes/{name}")
    async def remove_node(name: str, _: Admin, force: bool = False) -> dict[str, Any]:
        """Forget a node and revoke its certificate; it can join again only with a token."""
        return node_json(await nodes.remove(name, force=force))

    @app.get("/api/v1/nodes")
    async def list_nodes(request: Request, _: Reader, page: Page, label: Labels = None) -> Response:
        found = await store.list_nodes(
            labels=_selector(label), after=page.after, limit=page.limit + 1
        )
        more = len(found) > page.limit
        return _page(request, [node_json(node) for node in found[: page.limit]], more)

    @app.get("/api/v1/masters")
    async def masters(_: Reader) -> list[dict[str, Any]]:
        """The masters serving this cluster's database; a silent one is "away" (and cannot
        lead: its lock went with its database session)."""
        moment = datetime.now(UTC)
        return [
            {
                **record,
                "status": "away" if (moment - record["last_seen"]).total_seconds() > 5 else "up",
                "started_at": _iso(record["started_at"]),
                "last_seen": _iso(record["last_seen"]),
            }
            for record in await store.list_masters()
        ]

    @app.get("/api/v1/nodes/{name}")
    async def get_node(name: str, _: Reader) -> dict[str, Any]:
        return node_json(await store.find_node(name))

    @app.post("/api/v1/nodes/{name}/cordon")
    async def cordon(name: str, _: Admin) -> dict[str, Any]:
        return node_json(await nodes.set_cordon(name, True))

    @app.patch("/api/v1/nodes/{name}/labels")
    async def label_node(name: str, body: LabelsBody, _: Admin) -> dict[str, Any]:
        return node_json(await nodes.label(name, body.labels))

    @app.post("/api/v1/nodes/{name}/uncordon")
    async def uncordon(name: str, _: Admin) -> dict[str, Any]:
        return node_json(await nodes.set_cordon(name, False))

    @app.post("/api/v1/nodes/{name}/{action}", status_code=202)
    async def maintain(
        name: str,
        action: Literal["drain", "evacuate", "restore"],
        _: Admin,
        mode: Literal["move", "recreate"] = "move",
    ) -> dict[str, Any]:
        """``mode`` (evacuate): ``move`` with the disks, ``recreate`` from the specs."""
        if action == "evacuate":
            return (await nodes.evacuate(name, recreate=mode == "recreate")).json()
        start = {"drain": nodes.drain, "restore": nodes.restore}
        return (await start[action](name)).json()

    @app.get("/api/v1/operations/{operation_id}")
    async def get_operation(operation_id: str, _: Reader) -> dict[str, Any]:
        return instances.operations.get(operation_id).json()

    @app.get("/api/v1/operations/{operation_id}/wait")
    async def wait_operation(
        operation_id: str, _: Reader, timeout: Annotated[float, Query(ge=0, le=60)] = 30
    ) -> dict[str, Any]:
        return (await instances.operations.wait(operation_id, timeout)).json()

    @app.websocket("/api/v1/events")
    async def events(websocket: WebSocket) -> None:
        """Lifecycle events as JSON text frames, from now on; a slow listener is dropped."""
        try:
            await _caller(websocket)
        except MultiverseError as exc:
            status = HTTP_STATUS.get(exc.code, 500)
            await websocket.send_denial_response(error_response(status, exc.code, exc.message))
            return
        await _accept(websocket)
        with contextlib.suppress(WebSocketDisconnect, RuntimeError):
            async for event in instances.events.listen():
                await websocket.send_text(json.dumps(event))
        with contextlib.suppress(RuntimeError):
            await websocket.close()

    @app.get("/metrics")
    async def prometheus(_: Reader) -> Response:
        return Response(await metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/api/v1/instances")
    async def list_instances(
        request: Request,
        _: Reader,
        page: Page,
        node: str | None = None,
        state: str | None = None,
        label: Labels = None,
        env: str | None = None,
    ) -> Response:
        """Instances by name, a page at a time, filtered; ``?env=NAME``: an environment's."""
        labels = {**(_selector(label) or {}), **({ENV_LABEL: env} if env is not None else {})}
        found = await store.list_instances(
            node_name=node, state=_state(state), labels=labels, after=page.after,
            limit=page.limit + 1,
        )  # fmt: skip
        more = len(found) > page.limit
        return _page(request, [instance_json(item) for item in found[: page.limit]], more)

    @app.get("/api/v1/instances/{name}")
    async def get_instance(name: str, _: Reader) -> dict[str, Any]:
        return instance_json(await instances.get(name))

    @app.post("/api/v1/instances", status_code=202)
    async def launch(body: LaunchBody, _: Admin) -> dict[str, Any]:
        """One instance; with a ``count``, that many named from ``{n}`` in the name, answered
        with ``instances`` and one operation for them all."""
        specs = [
            InstanceSpec(
                name=name,
                cpus=body.cpus,
                memory=parse_size(body.memory),
                disk=parse_size(body.disk),
                image=body.image,
                user_data=body.user_data,
                labels=body.labels,
            )
            for name in ([body.name] if body.count is None else numbered(body.name, body.count))
        ]
        if body.count is not None:
            if body.ip or body.publish:
                raise InvalidArgument("ip and publish are for one instance, not a count of them")
            many, operation = await instances.launch_many(
                specs, node_name=body.node, selector=body.selector, strategy=body.strategy
            )
            return {"instances": [instance_json(item) for item in many], "operation": operation.id}
        publish = [parse_publish(item) for item in body.publish]
        launched = await instances.launch(
            specs[0], node_name=body.node, selector=body.selector, strategy=body.strategy,
            ip=body.ip, publish=publish,
        )  # fmt: skip
        return _accepted(launched)

    @app.post("/api/v1/instances/{name}/start", status_code=202)
    async def start(name: str, _: Admin) -> dict[str, Any]:
        return _accepted(await instances.start(name))

    @app.post("/api/v1/instances/{name}/stop", status_code=202)
    async def stop(name: str, _: Admin, body: StopBody | None = None) -> dict[str, Any]:
        return _accepted(await instances.stop(name, force=bool(body and body.force)))

    @app.post("/api/v1/instances/{name}/restart", status_code=202)
    async def restart(name: str, _: Admin) -> dict[str, Any]:
        return _accepted(await instances.restart(name))

    @app.post("/api/v1/instances/{name}/move", status_code=202)
    async def move(name: str, body: MoveBody, _: Admin) -> dict[str, Any]:
        """Move to ``body.node``; the operation's ``figures`` tell the phase and bytes sent."""
        migration, operation = await nodes.moves.move(name, body.node, MigrationKind(body.kind))
        return {
            **instance_json(await instances.get(name)), "operation": operation.id,
            "move": migration_json(migration),
        }  # fmt: skip

    @app.delete("/api/v1/instances/{name}", status_code=202)
    async def delete(name: str, _: Admin) -> dict[str, Any]:
        return _accepted(await instances.delete(name))

    @app.get("/api/v1/instances/{name}/info")
    async def info(name: str, _: Reader) -> dict[str, Any]:
        return info_json((await instances.info([await instances.get(name)]))[0])

    @app.get("/api/v1/info")
    async def info_many(
        request: Request,
        _: Reader,
        page: Page,
        name: Annotated[list[str] | None, Query(max_length=MAX_PAGE)] = None,
        node: str | None = None,
        state: str | None = None,
        label: Labels = None,
    ) -> Response:
        """``info`` of a page of instances (those named, or all that match): each node is
        asked once for all of its instances on the page."""
        found = await store.list_instances(
            names=name, node_name=node, state=_state(state), labels=_selector(label),
            after=page.after, limit=page.limit + 1,
        )  # fmt: skip
        missing = sorted(set(name or ()) - {instance.name for instance in found})
        if missing and page.after is None and len(found) <= page.limit:
            raise NotFound(f"instance {missing[0]!r} does not exist")
        answered = await instances.info(found[: page.limit])
        return _page(request, [info_json(item) for item in answered], len(found) > page.limit)

    @app.get("/api/v1/instances/{name}/logs")
    async def logs(name: str, _: Admin) -> dict[str, str]:
        return {"name": name, "log": await instances.logs(name)}

    @app.post("/api/v1/instances/{name}/exec")
    async def exec_(name: str, body: ExecBody, _: Admin) -> StreamingResponse:
        """Output as JSON lines: ``{"stream": 1|2, "data": base64}``, last ``{"exit_code": N}``."""
        try:
            stdin = base64.b64decode(body.stdin, validate=True)
        except ValueError:
            raise InvalidArgument("stdin must be base64") from None
        chunks = await instances.exec(name, body.command, stdin)
        first = await anext(aiter(chunks), None)  # surfaces "not running" etc. as a 4xx

        async def lines() -> AsyncIterator[bytes]:
            pending = [first] if first is not None else []
            try:
                for chunk in pending:
                    yield _exec_line(chunk)
                async for chunk in chunks:
                    yield _exec_line(chunk)
            except MultiverseError as exc:
                yield (
                    json.dumps({"error": {"code": exc.code, "message": exc.message}}) + "\n"
                ).encode()

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    @app.post("/api/v1/instances/{name}/sessions", status_code=201)
    async def open_session(name: str, body: SessionBody, _: Admin) -> dict[str, Any]:
        """A session the client opens straight on the instance's node (as Nomad's ``alloc
        exec``): the agent's WebSocket URL and a one-time ticket for it (sent as ``Authorization:
        Bearer``; single use, valid ``expires_in`` seconds), the name its certificate carries
        and the CA that signed it. ``url`` null: that node serves none; use the ``shell``
        WebSocket here, which also serves when the client cannot reach the node."""
        if body.tty and not valid_size(body.cols, body.rows):
            raise InvalidArgument(f"invalid terminal size {body.cols}x{body.rows}")
        size = (body.cols, body.rows) if body.tty else None
        direct = await instances.session_ticket(name, body.command, size)
        if direct is None:
            return {"url": None}
        return {
            "url": direct.url,
            "ticket": direct.ticket,
            "server_name": direct.server_name,
            "ca_certificate": ca.cert_pem.decode(),
            "expires_in": direct.expires_in,
        }

    @app.post("/api/v1/instances/{name}/ssh", status_code=201)
    async def ssh_login(name: str, body: SshLoginBody, _: Admin) -> dict[str, Any]:
        """Let an OpenSSH public key log in to the instance's own SSH server for
        ``expires_in`` seconds (it is taken out again then; a session opened meanwhile
        lasts). ``host`` and ``port`` are where that server answers as its node sees them:
        often the node's loopback, for a client on the node (``node_host``) itself.
        ``host_key`` is the key the server must show. 502 ``driver_error``: this instance's
        driver takes no SSH logins; use a session (``sessions``, ``shell``)."""
        login, node_host = await instances.ssh_login(name, body.public_key)
        return {**dataclasses.asdict(login), "node_host": node_host}

    @app.websocket("/api/v1/instances/{name}/shell")
    async def shell(
        websocket: WebSocket,
        name: str,
        tty: bool = True,
        cols: int = 80,
        rows: int = 24,
        command: Annotated[list[str] | None, Query()] = None,
    ) -> None:
        """A shell (or ``command``) in the instance; frames as master/sessions.py tells."""
        try:
            auth.require_role(await _caller(websocket), "admin")
            if not valid_size(cols, rows):
                raise InvalidArgument(f"invalid terminal size {cols}x{rows}")
            node_name = (await instances.get(name)).node_name
            call = await instances.open_session(name, command or [], (cols, rows) if tty else None)
        except MultiverseError as exc:
            # Refused before the upgrade, so the client sees the status and the JSON body.
            status = HTTP_STATUS.get(exc.code, 500)
            await websocket.send_denial_response(error_response(status, exc.code, exc.message))
            return
        await _accept(websocket)
        await relay(websocket, call, node_name)

    environments = Environments(store, instances)

    @app.get("/api/v1/environments")
    async def list_environments(_: Reader) -> list[dict[str, Any]]:
        return [environment_json(name, items) for name, items in (await environments.all()).items()]

    @app.get("/api/v1/environments/{name}")
    async def get_environment(name: str, _: Reader) -> dict[str, Any]:
        return environment_json(name, await environments.get(name))

    @app.put("/api/v1/environments/{name}", status_code=202)
    async def apply_environment(
        name: str, body: ApplyBody, _: Admin, response: Response, dry_run: bool = False
    ) -> dict[str, Any]:
        """Make the environment as ``spec`` says; ``dry_run`` only tells what that takes."""
        spec = parse_document(body.spec)
        if spec.name != name:
            raise InvalidArgument(f"the spec names environment {spec.name!r}, the path {name!r}")
        if dry_run:
            response.status_code = 200
            diff = await environments.diff(spec, prune=body.prune, recreate=body.recreate)
            return {**diff.json(), "operation": None}
        steps, operation = await environments.apply(spec, prune=body.prune, recreate=body.recreate)
        return {**steps.json(), "operation": operation.id}

    @app.delete("/api/v1/environments/{name}", status_code=202)
    async def delete_environment(name: str, _: Admin) -> dict[str, Any]:
        members, operation = await environments.delete(name)
        return {**environment_json(name, members), "operation": operation.id}

    @app.post("/api/v1/tokens", status_code=201)
    async def create_token(body: TokenBody, _: Admin) -> dict[str, Any]:
        ttl = timedelta(seconds=body.ttl_seconds) if body.ttl_seconds else None
        if body.kind == auth.JOIN:
            issued, token = await join_token(ttl, body.uses, body.description)
        else:
            issued = await auth.issue_token(
                store, auth.API, role=body.role, ttl=ttl, uses=body.uses,
                description=body.description,
            )  # fmt: skip
            token = issued.token
        return {
            "id": issued.id,
            "kind": body.kind,
            "token": token,  # shown this once; only a hash is kept
            "expires_at": _iso(issued.expires_at),
        }

    @app.get("/api/v1/tokens")
    async def list_tokens(_: Admin) -> list[dict[str, Any]]:
        return [
            {
                "id": record["id"],
                "kind": record["kind"],
                "role": record["role"],
                "description": record["description"],
                "expires_at": _iso(record["expires_at"]),
                "uses_left": record["uses_left"],
                "revoked": record["revoked"],
                "created_at": _iso(record["created_at"]),
            }
            for record in await store.list_tokens()
        ]

    @app.delete("/api/v1/tokens/{token_id}")
    async def revoke_token(token_id: str, _: Admin) -> dict[str, str]:
        await store.revoke_token(token_id)
        return {"id": token_id, "status": "revoked"}

    @app.post("/api/v1/tokens/revoke")
    async def revoke_token_itself(body: RevokeBody, _: Admin) -> dict[str, str]:
        """Revoke a token given whole (in the body: a secret never goes into a URL)."""
        return await revoke_token(await auth.find_token(store, body.token.strip()), _)

    ui.mount(app)
    return app


DEFAULT_PAGE = 500  # items per page of a listing when the client does not say
MAX_PAGE = 1000


class PageParams(BaseModel):
    """``?limit=&after=``: at most ``limit`` items, those whose name sorts after ``after``."""

    limit: int = Field(DEFAULT_PAGE, ge=1, le=MAX_PAGE)
    after: str | None = Field(None, max_length=255)


Page = Annotated[PageParams, Query()]
# ``?label=zone=a,disk=ssd`` (or the parameter repeated): every one must match.
Labels = Annotated[list[str] | None, Query(max_length=64)]


def _selector(label: list[str] | None) -> dict[str, str] | None:
    return parse_labels(",".join(label)) if label else None


def _state(state: str | None) -> InstanceState | None:
    if state is None:
        return None
    try:
        return InstanceState(state)
    except ValueError:
        known = ", ".join(item.value for item in InstanceState)
        raise InvalidArgument(f"unknown state {state!r}: use one of {known}") from None


def _page(request: Request, items: list[dict[str, Any]], more: bool) -> Response:
    """One page (the store is asked for one item over the limit, to know whether ``more``
    follow); the next page's URL goes in a ``Link: <...>; rel="next"`` header (RFC 8288, as
    GitHub's API does), so the body stays the list it always was."""
    response = JSONResponse(items)
    if more and items:
        following = request.url.include_query_params(after=items[-1]["name"])
        response.headers["Link"] = f'<{following}>; rel="next"'
    return response


def _accepted(started: tuple[Instance, Operation]) -> dict[str, Any]:
    """An instance action's answer: the instance now, and the operation to wait on."""
    instance, operation = started
    return {**instance_json(instance), "operation": operation.id}


def _exec_line(chunk: Any) -> bytes:
    if chunk.exited:
        return (json.dumps({"exit_code": chunk.exit_code}) + "\n").encode()
    data = base64.b64encode(chunk.data).decode()
    return (json.dumps({"stream": chunk.stream, "data": data}) + "\n").encode()
