"""Add a host over SSH (`node add`): the master installs the worker there and starts it.

Steps, each one line of the operation's progress and the node's message while it runs:
connect (host key checked: known_hosts or a pinned fingerprint, never accepted blindly),
check (python3 of the master's version, systemd or not), deps (Debian packages, when asked),
copy (the wheelhouse over SFTP), venv (``pip install --no-index`` from it), token (a one-use
join token in a 0600 file), service (a systemd unit, or a supervised background process with a
pid file where systemd does not run) and join (until the node is Ready).

A failed step marks the node Failed with the step, the reason and the output's last lines, and
removes whatever the attempt put on the host. Running `node add` again retries from scratch;
each step is idempotent. The password (or key) lives only in this process's memory for the
connection: never stored, logged, put on a command line or in an environment.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import shlex
import sys
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncssh

from multiverse import __version__
from multiverse.core.errors import (
    AlreadyExists,
    Conflict,
    InvalidArgument,
    MultiverseError,
)
from multiverse.core.model import (
    Node,
    NodeStatus,
    Resources,
    validate_labels,
    validate_name,
)
from multiverse.master.events import EventBus
from multiverse.master.operations import Operation, Operations
from multiverse.master.wheelhouse import Wheelhouse
from multiverse.store.repository import Store

log = logging.getLogger("multiverse.master")

__all__ = ["DEFAULT_ROOT", "Credentials", "InstallFailed", "Installer", "SSHTarget"]

DEFAULT_ROOT = "/opt/multiverse"
UNIT_NAME = "multiverse-worker.service"
UNIT_PATH = f"/etc/systemd/system/{UNIT_NAME}"
AGENT_PORT = 1339
JOIN_TTL = timedelta(minutes=15)
JOIN_TIMEOUT = 120.0  # seconds from the service's start until the node must be Ready
TAIL = 15  # lines of output a failure keeps
STEP_TIMEOUT = 900.0  # seconds one remote command may take (apt-get, pip install)
# Debian packages each driver needs on its host (`--install-deps`).
DRIVER_PACKAGES = {
    "qemu": ["qemu-system-x86", "qemu-utils", "e2fsprogs", "iproute2"],
    "firecracker": ["e2fsprogs", "iproute2"],
    "multipass": [],
    "fake": [],
}
_ROOT = re.compile(r"^(/[A-Za-z0-9._-]+)+$")
_FINGERPRINT = re.compile(r"^SHA256:[A-Za-z0-9+/]{43}=?$")
_TARGET = re.compile(r"^(?P<user>[a-z_][a-z0-9_.-]*)@(?P<host>\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+)"
                     r"(?::(?P<port>\d{1,5}))?$")  # fmt: skip
# The files an install puts under its root: an uninstall removes these and nothing else.
_INSTALLED = ("venv", "wheels", "data", "join-token", "worker.env", "worker.sh", "supervise.sh",
              "worker.pid", "worker.log")  # fmt: skip


class InstallFailed(MultiverseError):
    code = "install_failed"


@dataclass(frozen=True)
class SSHTarget:
    user: str
    host: str
    port: int = 22

    @classmethod
    def parse(cls, text: str) -> SSHTarget:
        """``user@host[:port]``; an IPv6 host in brackets."""
        match = _TARGET.match(text.strip())
        port = int(match["port"] or 22) if match else 0
        if not match or not 0 < port < 65536:
            raise InvalidArgument(f"invalid --ssh {text!r}: use user@host or user@host:port")
        return cls(match["user"], match["host"].strip("[]"), port)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.user}@{host}:{self.port}"


@dataclass(frozen=True)
class Credentials:
    """How to log in and whom to trust; held in memory for one operation only."""

    password: str = field(default="", repr=False)
    identity: str = field(default="", repr=False)  # a private key, OpenSSH or PEM text
    known_hosts: str = field(default="", repr=False)  # the user's, sent by the CLI
    host_key_fingerprint: str = ""

    def check(self) -> Credentials:
        if bool(self.password) == bool(self.identity):
            raise InvalidArgument("give one of identity (a private key; preferred) or password")
        if self.host_key_fingerprint and not _FINGERPRINT.match(self.host_key_fingerprint):
            raise InvalidArgument(
                f"invalid host key fingerprint {self.host_key_fingerprint!r}: "
                "use SHA256:... as `ssh-keygen -lf` prints it"
            )
        if self.identity:
            try:
                asyncssh.import_private_key(self.identity)
            except (asyncssh.KeyImportError, ValueError) as exc:
                raise InvalidArgument(
                    "the identity is not a private key asyncssh can read "
                    "(an unencrypted OpenSSH or PEM key)"
                ) from exc
        return self


@dataclass(frozen=True)
class InstallRequest:
    name: str
    target: SSHTarget
    driver: str = "qemu"
    labels: dict[str, str] = field(default_factory=dict)
    install_deps: bool = False
    root: str = DEFAULT_ROOT


class _StepFailed(Exception):
    def __init__(self, step: str, reason: str, output: str = "") -> None:
        super().__init__(reason)
        self.step = step
        self.reason = reason
        self.output = output


def _tail(text: str) -> str:
    return "\n".join(text.strip().splitlines()[-TAIL:])


class _Host:
    """One SSH connection to the host being installed, with the commands the steps run."""

    def __init__(self, connection: asyncssh.SSHClientConnection, root: str) -> None:
        self.connection = connection
        self.root = root
        self.sudo = ""  # "sudo -n " when not root, for the few commands that need it
        self.systemd = False
        self.checked = False

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    async def run(self, step: str, command: str, check: bool = True) -> str:
        try:
            result = await asyncio.wait_for(self.connection.run(command, check=False), STEP_TIMEOUT)
        except TimeoutError:
            raise _StepFailed(step, f"no end after {STEP_TIMEOUT:.0f}s") from None
        output = f"{result.stdout or ''!s}{result.stderr or ''!s}"
        if check and result.exit_status != 0:
            raise _StepFailed(step, f"the command exited {result.exit_status}", output)
        return output

    async def write(self, path: str, data: str, mode: int) -> None:
        """A file of ``mode`` from its creation on (a token is never readable by others)."""
        async with self.connection.start_sftp_client() as sftp:
            async with sftp.open(path, "w", attrs=asyncssh.SFTPAttrs(permissions=mode)) as remote:
                await remote.write(data)
            await sftp.chmod(path, mode)

    async def mkdirs(self, step: str, *paths: str) -> None:
        quoted = " ".join(shlex.quote(p) for p in paths)
        await self.run(step, f"umask 077 && mkdir -p {quoted}")


class Installer:
    """`node add` and `node remove --uninstall`: the master's side, over SSH."""

    def __init__(
        self,
        store: Store,
        events: EventBus,
        operations: Operations,
        wheelhouse: Wheelhouse,
        join_token: Callable[[str, timedelta, str], Awaitable[tuple[str, str]]],
        master_port: Callable[[], int],
        *,
        worker_env: dict[str, str] | None = None,
        join_timeout: float = JOIN_TIMEOUT,
    ) -> None:
        self.store = store
        self.events = events
        self.operations = operations
        self.wheelhouse = wheelhouse
        # (host the worker reaches the master at, ttl, description) -> (token id, join token)
        self.join_token = join_token
        self.master_port = master_port
        # Put into the worker's service environment: MULTIVERSE_ALLOW_FAKE=1 only when this
        # master was started with it (tests); a master without it refuses the fake driver.
        self.worker_env = dict(worker_env or {})
        self.join_timeout = join_timeout
        self._running: dict[str, Operation] = {}
        # Forgets the node once its host is clean (the master wires `Nodes.remove`).
        self.on_uninstalled: Callable[[str], Awaitable[object]] = _nothing
        # Refuses a node that still holds instances (the master wires `Nodes.ensure_empty`).
        self.ensure_empty: Callable[[Node, str], Awaitable[None]] = _anything

    # ---- node add ----

    async def add(self, request: InstallRequest, credentials: Credentials) -> Operation:
        validate_name(request.name, "node")
        validate_labels(request.labels)
        credentials.check()
        if request.driver not in DRIVER_PACKAGES:
            raise InvalidArgument(f"unknown driver {request.driver!r}")
        if request.driver == "fake" and self.worker_env.get("MULTIVERSE_ALLOW_FAKE") != "1":
            raise InvalidArgument(
                "the fake driver is a test tool; this master was not started with "
                "MULTIVERSE_ALLOW_FAKE=1, so it installs no fake workers"
            )
        if not _ROOT.match(request.root) or ".." in request.root.split("/"):
            raise InvalidArgument(f"invalid install root {request.root!r}: an absolute path")
        running = self._running.get(request.name)
        if running is not None and not running.done.is_set():
            raise Conflict(f"node {request.name} is being installed: operation {running.id}")
        install = {"ssh": str(request.target), "root": request.root, "driver": request.driver}
        found = await self.store.list_nodes(names=[request.name])
        if found:
            node = found[0]
            if node.status not in (NodeStatus.INSTALLING, NodeStatus.FAILED):
                if node.install.get("ssh") == install["ssh"]:
                    return self.operations.start(
                        "install", request.name, _already(node), progress=[
                            f"{request.name} is installed already ({node.status.value})"
                        ],
                    )  # fmt: skip
                raise AlreadyExists(f"a node named {request.name!r} exists already")
            node_id = node.id
            await self.store.update_node(
                node_id, status=NodeStatus.INSTALLING, message="starting", install=install
            )
        else:
            node_id = str(uuid.uuid4())
            await self.store.add_node(
                Node(
                    id=node_id, name=request.name, address="", driver=request.driver,
                    status=NodeStatus.INSTALLING, labels={}, capacity=Resources(),
                    message="starting", install=install,
                ),
                cert_serial="",
            )  # fmt: skip
        self.events.publish("node", name=request.name, status=NodeStatus.INSTALLING.value)
        progress: list[str] = []
        operation = self.operations.start(
            "install", request.name,
            self._install(node_id, request, credentials, progress), progress=progress,
        )  # fmt: skip
        self._running[request.name] = operation
        return operation

    async def _install(
        self,
        node_id: str,
        request: InstallRequest,
        credentials: Credentials,
        progress: list[str],
    ) -> dict[str, Any]:
        step = "connect"
        token_id = ""

        async def say(name: str, text: str) -> None:
            nonlocal step
            step = name
            progress.append(f"{name}: {text}")
            await self.store.update_node(node_id, message=f"{name}: {text}")
            self.events.publish("node", name=request.name, status="Installing", step=name)

        try:
            await say("connect", f"{request.target} over SSH")
            connection, fingerprint = await _connect(request.target, credentials)
            del credentials  # the password or key is needed no more
            async with connection:
                host = _Host(connection, request.root)
                try:
                    known = await self.store.get_node(node_id)
                    await self.store.update_node(
                        node_id, install={**known.install, "host_key": fingerprint}
                    )
                    await say("check", f"host key {fingerprint} trusted; looking for python3")
                    await self._check(host)
                    if request.install_deps and DRIVER_PACKAGES[request.driver]:
                        packages = " ".join(DRIVER_PACKAGES[request.driver])
                        await say("deps", f"apt-get install {packages}")
                        await host.run(
                            "deps",
                            f"{host.sudo}env DEBIAN_FRONTEND=noninteractive apt-get install -y "
                            f"-q --no-install-recommends {packages}",
                        )
                    await say("copy", "building the wheelhouse (once per version)")
                    wheels = await self.wheelhouse.ensure()
                    await say("copy", f"{len(Wheelhouse.wheels(wheels))} wheels over SFTP")
                    await self._copy(host, wheels)
                    await say("venv", f"installing multiverse {__version__} in {host.path('venv')}")
                    await self._venv(host)
                    await say("token", "a one-use join token, 0600")
                    master_host = connection.get_extra_info("sockname")[0]
                    token_id, token = await self.join_token(
                        master_host, JOIN_TTL, f"node add {request.name}"
                    )
                    await self._write_service_files(host, request, master_host)
                    await host.write(host.path("join-token"), token + "\n", 0o600)
                    del token
                    how = (
                        f"systemd unit {UNIT_NAME}" if host.systemd
                        else f"a supervised background process (no systemd on the host), "
                        f"pid file {host.path('worker.pid')}"
                    )  # fmt: skip
                    await say("service", f"starting the worker as {how}")
                    await self._start(host)
                    await say("join", "waiting for the node to join and report")
                    await self._joined(host, node_id)
                    await host.run("join", f"rm -f {shlex.quote(host.path('join-token'))}")
                except Exception:
                    if host.checked:  # before the check passed, nothing was written
                        progress.append("rollback: removing what this attempt installed")
                        with contextlib.suppress(_StepFailed, OSError, asyncssh.Error):
                            await _remove_install(host)
                    raise
        except Exception as exc:  # whatever it was, the node must not stay Installing
            if isinstance(exc, _StepFailed):
                reason, output = exc.reason, exc.output
            elif isinstance(exc, MultiverseError):
                reason, output = exc.message, ""
            else:
                reason, output = f"{type(exc).__name__}: {exc}", ""
            message = f"{step} failed: {reason}"
            if output.strip():
                message += f"\n{_tail(output)}"
            if token_id:
                await self.store.revoke_token(token_id)
            await self.store.update_node(node_id, status=NodeStatus.FAILED, message=message)
            self.events.publish("node", name=request.name, status=NodeStatus.FAILED.value)
            log.warning("node add %s: %s", request.name, message.splitlines()[0])
            raise InstallFailed(message) from exc
        await self.store.update_node(node_id, message="")
        progress.append(f"done: {request.name} is Ready")
        log.info("node add %s: installed and joined", request.name)
        return {"name": request.name, "service": how}

    async def _check(self, host: _Host, need_python: bool = True) -> None:
        """What the host is (root or not, systemd or not) and, to install, its python3."""
        want = f"{sys.version_info.major}.{sys.version_info.minor}" if need_python else ""
        command = (
            "echo uid=$(id -u) && "
            "if [ -d /run/systemd/system ]; then echo systemd=yes; else echo systemd=no; fi"
        )
        if want:
            command += (
                " && { command -v python3 >/dev/null 2>&1 || "
                '{ echo "python3 not found (PATH=$PATH)"; exit 3; }; } && '
                "python3 -c 'import sys, venv; print(\"python=%d.%d\" % sys.version_info[:2])'"
            )
        output = await host.run("check", command)
        facts = dict(line.split("=", 1) for line in output.splitlines() if "=" in line)
        if want and facts.get("python") != want:
            raise _StepFailed("check", f"the host's python3 is {facts.get('python')}; the "
                              f"wheelhouse is for Python {want}", output)  # fmt: skip
        host.sudo = "" if facts.get("uid") == "0" else "sudo -n "
        host.systemd = facts.get("systemd") == "yes"
        host.checked = True

    async def _copy(self, host: _Host, wheels: Path) -> None:
        remote = host.path("wheels")
        await host.mkdirs("copy", remote)
        async with host.connection.start_sftp_client() as sftp:
            present = {entry.filename: entry.attrs.size for entry in await sftp.readdir(remote)}
            for wheel in Wheelhouse.wheels(wheels):
                if present.get(wheel.name) != wheel.stat().st_size:
                    await sftp.put(str(wheel), f"{remote}/{wheel.name}")

    async def _venv(self, host: _Host) -> None:
        venv = shlex.quote(host.path("venv"))
        await host.run("venv", f"test -x {venv}/bin/python || python3 -m venv {venv}")
        # The host's own pip configuration (an index, constraints) has no say: the wheelhouse
        # is the whole truth.
        await host.run(
            "venv",
            f"PIP_CONFIG_FILE=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1 {venv}/bin/pip install "
            f"-q --no-index --find-links {shlex.quote(host.path('wheels'))} --upgrade "
            f"multiverse=={__version__}",
        )

    async def _write_service_files(
        self, host: _Host, request: InstallRequest, master_host: str
    ) -> None:
        root = shlex.quote(host.root)
        env = "".join(f"{key}={shlex.quote(value)}\n" for key, value in self.worker_env.items())
        await host.write(host.path("worker.env"), env, 0o600)
        labels = ",".join(f"{k}={v}" for k, v in sorted(request.labels.items()))
        master = f"[{master_host}]" if ":" in master_host else master_host
        worker = (
            f"{root}/venv/bin/multiverse worker --master {master}:{self.master_port()} "
            f"--listen 0.0.0.0:{AGENT_PORT} --data-dir {root}/data "
            f"--name {request.name} --driver {request.driver}"
            + (f" --labels {shlex.quote(labels)}" if labels else "")
        )
        # Read by the worker at its first start only; it keeps its identity after that.
        await host.write(host.path("worker.sh"), (
            "#!/bin/sh\n# Written by `multiverse node add`: runs this host's worker.\n"
            f"set -a; . {root}/worker.env; set +a\n"
            f"if [ -f {root}/join-token ]; then set -- --token-file {root}/join-token; fi\n"
            f'exec {worker} "$@"\n'
        ), 0o700)  # fmt: skip
        if host.systemd:
            await host.write(f"{host.path('worker.unit')}", worker_unit(host.root), 0o644)
            await host.run(
                "service", f"{host.sudo}install -m 0644 {root}/worker.unit {UNIT_PATH} && "
                f"rm -f {root}/worker.unit",
            )  # fmt: skip
            return
        await host.write(host.path("supervise.sh"), (
            "#!/bin/sh\n# Written by `multiverse node add`: keeps the worker running where "
            "systemd does not.\n"
            f"echo $$ > {root}/worker.pid\n"
            "child=\n"
            f"trap 'kill $child 2>/dev/null; wait $child; rm -f {root}/worker.pid; exit 0' "
            "TERM INT\n"
            f"while :; do {root}/worker.sh >> {root}/worker.log 2>&1 & child=$!; wait $child; "
            "sleep 2; done\n"
        ), 0o700)  # fmt: skip

    async def _start(self, host: _Host) -> None:
        if host.systemd:
            await host.run(
                "service", f"{host.sudo}systemctl daemon-reload && "
                f"{host.sudo}systemctl enable {UNIT_NAME} && "
                f"{host.sudo}systemctl restart {UNIT_NAME}",
            )  # fmt: skip
            return
        await self._stop_process(host)
        root = shlex.quote(host.root)
        await host.run(
            "service", f"setsid {root}/supervise.sh </dev/null >/dev/null 2>&1 & "
            f"for i in $(seq 50); do [ -s {root}/worker.pid ] && exit 0; sleep 0.1; done; "
            "echo 'the supervisor wrote no pid file'; exit 1",
        )  # fmt: skip

    @staticmethod
    async def _stop_process(host: _Host) -> None:
        pid_file = shlex.quote(host.path("worker.pid"))
        await host.run("service", (
            f"if [ -s {pid_file} ]; then pid=$(cat {pid_file}); kill $pid 2>/dev/null; "
            "for i in $(seq 100); do kill -0 $pid 2>/dev/null || break; sleep 0.1; done; "
            f"kill -9 $pid 2>/dev/null; rm -f {pid_file}; fi; true"
        ))  # fmt: skip

    async def _joined(self, host: _Host, node_id: str) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.join_timeout
        while (await self.store.get_node(node_id)).status != NodeStatus.READY:
            if loop.time() > deadline:
                logs = (
                    f"{host.sudo}journalctl -u {UNIT_NAME} -n {TAIL} --no-pager" if host.systemd
                    else f"tail -n {TAIL} {shlex.quote(host.path('worker.log'))}"
                )  # fmt: skip
                output = await host.run("join", logs, check=False)
                raise _StepFailed(
                    "join", f"the node did not join within {self.join_timeout:.0f}s", output
                )
            await asyncio.sleep(0.5)

    # ---- node remove --uninstall ----

    async def uninstall(self, name: str, credentials: Credentials) -> Operation:
        """Stop the node's worker, remove its unit, venv and data dir, then forget the node.
        Refused while it holds instances."""
        node = await self.store.find_node(name)
        if not node.install.get("host_key"):
            raise InvalidArgument(
                f"node {name} was not installed by `node add`; remove it with `node remove` "
                "and uninstall it on its host by hand"
            )
        await self.ensure_empty(node, "delete or evacuate them first")
        credentials.check()
        progress: list[str] = []
        return self.operations.start(
            "uninstall", name, self._uninstall(node, credentials, progress), progress=progress
        )

    async def _uninstall(
        self, node: Node, credentials: Credentials, progress: list[str]
    ) -> dict[str, Any]:
        target = SSHTarget.parse(node.install["ssh"])
        pinned = Credentials(
            password=credentials.password, identity=credentials.identity,
            host_key_fingerprint=node.install["host_key"],
        )  # fmt: skip
        progress.append(f"connect: {target} (host key {node.install['host_key']})")
        try:
            connection, _ = await _connect(target, pinned)
            del credentials, pinned
            async with connection:
                host = _Host(connection, node.install["root"])
                await self._check(host, need_python=False)
                progress.append("service: stopping the worker")
                await _remove_install(host)
                progress.append(f"files: removed {host.root}")
        except (_StepFailed, OSError, asyncssh.Error) as exc:
            if isinstance(exc, _StepFailed):
                reason = f"{exc.step}: {exc.reason}"
                if exc.output.strip():
                    reason += f"\n{_tail(exc.output)}"
            else:
                reason = f"{type(exc).__name__}: {exc}"
            raise InstallFailed(f"uninstall failed at {reason}; the node is kept") from exc
        await self.on_uninstalled(node.name)
        return {"name": node.name}


async def _nothing(name: str) -> None:
    """Forget no node (until the master wires `Nodes.remove`)."""


async def _anything(node: Node, what_next: str) -> None:
    """Refuse no node (until the master wires `Nodes.ensure_empty`)."""


async def _already(node: Node) -> dict[str, Any]:
    return {"name": node.name, "service": "installed already"}


async def _remove_install(host: _Host) -> None:
    """Stop the worker and remove its unit, venv, data and files; the root too if empty."""
    root = shlex.quote(host.root)
    if host.systemd:
        await host.run("uninstall", (
            f"{host.sudo}systemctl disable --now {UNIT_NAME} 2>/dev/null; "
            f"{host.sudo}rm -f {UNIT_PATH} && {host.sudo}systemctl daemon-reload; true"
        ))  # fmt: skip
    await Installer._stop_process(host)
    paths = " ".join(f"{root}/{name}" for name in _INSTALLED)
    await host.run("uninstall", f"rm -rf {paths} && (rmdir {root} 2>/dev/null; true)")


async def _connect(
    target: SSHTarget, credentials: Credentials
) -> tuple[asyncssh.SSHClientConnection, str]:
    """A connection whose host key is trusted: a known_hosts entry, or the fingerprint given.

    An unknown key is refused before any credential is sent, its fingerprint in the message.
    """
    known: Any
    if credentials.host_key_fingerprint:
        try:
            key = await asyncssh.get_server_host_key(target.host, target.port)
        except (OSError, asyncssh.Error) as exc:
            raise _StepFailed("connect", f"cannot reach {target}: {exc}") from exc
        seen = key.get_fingerprint("sha256") if key else "none"
        if seen != credentials.host_key_fingerprint:
            raise _StepFailed(
                "connect", f"the host key of {target} is {seen}, not the "
                f"{credentials.host_key_fingerprint} given: refused",
            )  # fmt: skip
        known = ([key], [], [])  # this very key, so the real connection cannot differ
    else:
        known = asyncssh.import_known_hosts(credentials.known_hosts or "")
    options: dict[str, Any] = {
        "username": target.user, "port": target.port, "known_hosts": known,
        "agent_path": None, "config": [], "connect_timeout": 20,
    }  # fmt: skip
    if credentials.identity:
        options.update(client_keys=[asyncssh.import_private_key(credentials.identity)],
                       password=None, kbdint_auth=False)  # fmt: skip
    else:
        options.update(client_keys=None, password=credentials.password)
    try:
        connection = await asyncssh.connect(target.host, **options)
    except asyncssh.HostKeyNotVerifiable as exc:
        try:
            key = await asyncssh.get_server_host_key(target.host, target.port)
            seen = key.get_fingerprint("sha256") if key else "unknown"
        except (OSError, asyncssh.Error):
            seen = "unknown"
        raise _StepFailed(
            "connect", f"unknown host key {seen} for {target}: refused. Check it on the host "
            f"(`ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub`), then add the host to your "
            f"known_hosts or pass --host-key-fingerprint {seen}",
        ) from exc  # fmt: skip
    except asyncssh.PermissionDenied as exc:
        how = "key" if credentials.identity else "password"
        raise _StepFailed(
            "connect", f"authentication as {target.user} failed: wrong {how}?"
        ) from exc
    except (OSError, asyncssh.Error) as exc:
        raise _StepFailed("connect", f"cannot connect to {target}: {exc}") from exc
    key = connection.get_server_host_key()
    return connection, key.get_fingerprint("sha256") if key else ""


def worker_unit(root: str) -> str:
    """The systemd unit of a worker installed under ``root`` (README shows it too)."""
    return (
        "[Unit]\nDescription=Multiverse worker (node agent)\n"
        "After=network-online.target\nWants=network-online.target\n\n"
        "[Service]\n"
        f"ExecStart={root}/worker.sh\n"
        "Restart=always\nRestartSec=2\n"
        "KillMode=process\n"  # VMs outlive the agent by design; a restarted one adopts them
        "\n[Install]\nWantedBy=multi-user.target\n"
    )


def master_unit(args: list[str]) -> str:
    """The systemd unit of a master run by this Python with ``args`` (`--install-service`)."""
    command = " ".join(
        shlex.quote(part) for part in [sys.executable, "-m", "multiverse", "master", *args]
    )
    return (
        "[Unit]\nDescription=Multiverse master\n"
        "After=network-online.target\nWants=network-online.target\n\n"
        f"[Service]\nExecStart={command}\nRestart=always\nRestartSec=2\n\n"
        "[Install]\nWantedBy=multi-user.target\n"
    )
