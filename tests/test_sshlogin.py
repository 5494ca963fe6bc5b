"""The pieces of `multiverse shell` through OpenSSH that need no VM: the key check the master
and the agent make, and the CLI's key and its idea of what it can reach."""

from __future__ import annotations

import base64
import socket
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from multiverse.client.openssh import _reachable, login_key
from multiverse.core.errors import InvalidArgument
from multiverse.core.sshlogin import authorized_key_line, parse_public_key


def test_a_key_made_by_ssh_keygen_is_taken_without_its_comment(tmp_path: Path) -> None:
    key = login_key(tmp_path / "ssh-login")
    line = key.with_suffix(".pub").read_text()
    kind, blob, comment = line.split()
    assert (kind, comment) == ("ssh-ed25519", "multiverse")
    assert parse_public_key(line) == f"{kind} {blob}"
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    assert oct(key.parent.stat().st_mode & 0o777) == "0o700"
    assert login_key(tmp_path / "ssh-login") == key  # made once, then kept
    assert key.with_suffix(".pub").read_text() == line


def test_first_shells_at_once_make_one_key(tmp_path: Path) -> None:
    with ThreadPoolExecutor(4) as pool:
        made = list(pool.map(lambda _: login_key(tmp_path), range(4)))
    assert len(set(made)) == 1
    private = subprocess.run(
        ["ssh-keygen", "-y", "-f", str(made[0])], capture_output=True, text=True, check=True
    ).stdout
    assert private.split()[:2] == made[0].with_suffix(".pub").read_text().split()[:2]


def test_each_push_of_a_key_is_a_line_of_its_own(tmp_path: Path) -> None:
    key = login_key(tmp_path).with_suffix(".pub").read_text()
    first, second = authorized_key_line(key), authorized_key_line(key)
    assert first != second and first.split()[:2] == second.split()[:2]
    assert first.split()[2].startswith("multiverse-login-")


@pytest.mark.parametrize(
    "text",
    [
        "",
        "ssh-ed25519",
        "ssh-dss AAAAB3NzaC1kc3MAAACBAP",  # a type OpenSSH itself no longer takes
        "ssh-ed25519 not-base64!",
        "ssh-ed25519 AAAA",  # base64 of too little to hold its type
        'from="10.0.0.1" ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA',
        "ecdsa-sha2-nistp256 " + base64.b64encode(b"\0\0\0\x0bssh-ed25519" + bytes(36)).decode(),
    ],
)
def test_what_is_not_a_public_key_is_refused(text: str) -> None:
    with pytest.raises(InvalidArgument):
        parse_public_key(text)


def test_a_guest_on_another_hosts_loopback_is_not_reachable() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        here = {"host": "127.0.0.1", "port": port}
        assert _reachable({**here, "node_host": "127.0.0.1"})
        assert _reachable({**here, "node_host": "localhost"})
        # 192.0.2.0/24 is for documentation: no host has it, so the node is elsewhere and its
        # loopback is not ours, whatever listens on ours.
        assert not _reachable({**here, "node_host": "192.0.2.7"})
    assert not _reachable({"host": "127.0.0.1", "port": port, "node_host": "127.0.0.1"})
