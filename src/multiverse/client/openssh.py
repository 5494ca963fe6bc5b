"""``multiverse shell`` handed to the user's OpenSSH client, where it can reach the guest.

A session through Multiverse (client/terminal.py) carries each keystroke through this CLI
and the node's agent, two Python event loops and a TLS WebSocket, on top of the guest's SSH
channel. On the guest's own node nothing of that is needed: the master lets this CLI's key
log in to the guest's SSH server for a few seconds (core/sshlogin.py), and this process
becomes ``ssh``, so the bytes go terminal -> OpenSSH -> the kernel -> the guest, the path a
user of plain SSH has. The master still decides who may log in (an admin token) and vouches
for the guest's host key, which OpenSSH then checks.

Where that cannot be (no OpenSSH here, a driver whose guests take no SSH logins, a guest
whose SSH server this host cannot reach) :func:`exec_openssh` returns and the caller opens a
session as before; ``MULTIVERSE_DEBUG=1`` tells why.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from multiverse.client.cli import debug
from multiverse.client.config import config_path
from multiverse.client.errors import ApiError
from multiverse.client.http import ApiClient

__all__ = ["exec_openssh", "login_key"]

PROBE_TIMEOUT = 1.0  # seconds to connect to the guest's SSH server before going another way


def exec_openssh(client: ApiClient, name: str) -> None:
    """Become ``ssh`` logged in to instance ``name``'s guest; returns, having changed nothing
    the user sees, when that cannot be."""
    ssh = shutil.which("ssh")
    if ssh is None:
        debug("no OpenSSH client (ssh) on PATH; the session goes through Multiverse")
        return
    try:
        key = login_key(config_path().parent / "ssh-login")
    except (OSError, subprocess.CalledProcessError) as exc:
        debug(f"no SSH login key ({exc}); the session goes through Multiverse")
        return
    try:
        login = client.ssh_login(name, key.with_suffix(".pub").read_text())
    except ApiError as exc:
        # A driver without SSH logins, a master or agent of a release before them, or a
        # refusal (no such instance, not running) that the session's own request then says.
        debug(f"{exc.message}; the session goes through Multiverse")
        return
    where = f"{login['host']}:{login['port']}"
    if not _reachable(login):
        debug(f"the guest's SSH server at {where} cannot be reached from here; "
              "the session goes through Multiverse")  # fmt: skip
        return
    alias = f"multiverse-{name}"
    known_hosts = _known_hosts(key.parent, alias, str(login["host_key"]))
    debug(f"session through OpenSSH at {where}")
    argv = [
        ssh,
        "-F", "none",  # the user's ssh_config could send this elsewhere (ProxyJump, ...)
        "-i", str(key),
        "-o", "IdentitiesOnly=yes",
        "-o", f"UserKnownHostsFile={known_hosts}",
        "-o", "GlobalKnownHostsFile=/dev/null",
        "-o", f"HostKeyAlias={alias}",
        "-o", "StrictHostKeyChecking=yes",  # the key the master vouched for, or nothing
        "-o", "BatchMode=yes",  # no password prompt: the pushed key or an error
        "-o", "LogLevel=ERROR",
        "-p", str(login["port"]),
        "-l", str(login["user"]),
        "-t",
        str(login["host"]),
    ]  # fmt: skip
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(ssh, argv)


def login_key(directory: Path) -> Path:
    """This CLI's own SSH key (``id_ed25519`` in ``directory``), made by ``ssh-keygen`` on
    first use. Its private half never leaves this host; the master pushes the public half."""
    key = directory / "id_ed25519"
    if key.exists() and key.with_suffix(".pub").exists():
        return key
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    with _locked(directory / ".lock"):  # two first shells at once make one key, not a mix
        if not key.with_suffix(".pub").exists():
            key.unlink(missing_ok=True)
            keygen = shutil.which("ssh-keygen") or "ssh-keygen"
            subprocess.run(
                [keygen, "-q", "-t", "ed25519", "-N", "", "-C", "multiverse", "-f", str(key)],
                check=True,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
    return key


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _known_hosts(directory: Path, alias: str, host_key: str) -> Path:
    """A known_hosts file holding only ``host_key`` for ``alias``: what OpenSSH checks the
    server against. One file per instance, written whole and moved into place, so that two
    shells at once never read each other's half-written file."""
    hosts = directory / "known_hosts"
    hosts.mkdir(mode=0o700, exist_ok=True)
    path = hosts / alias
    partial = hosts / f".{alias}.{os.getpid()}"
    partial.write_text(f"{alias} {host_key}\n")
    os.replace(partial, path)
    return path


def _reachable(login: dict[str, Any]) -> bool:
    """Whether the guest's SSH server can be connected to from here. A loopback address is
    the node's own: it counts only when the node's address is one of this host's."""
    host, port = str(login["host"]), int(login["port"])
    if _is_loopback(host) and not _is_local(str(login["node_host"])):
        return False
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT):
            return True
    except OSError:
        return False


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _is_local(host: str) -> bool:
    """Whether ``host`` is an address of this host (in this network namespace): only a local
    address can be bound to."""
    try:
        addresses = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return False
    for family, kind, proto, _name, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            try:
                probe.bind((address[0], 0))
            except OSError:
                continue
            return True
    return False
