"""In-guest access over SSH against a real SSH server (asyncssh on loopback) that misbehaves on
purpose: it changes its host key, hangs on commands, or floods output faster than it is read.

The host key checks, the command time limits and the bounded output queue of
:mod:`multiverse.guest.ssh` are tested here without a VM; ``test_qemu_driver`` checks the host
key with the real guest.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import asyncssh
import pytest

from multiverse.core.errors import Unavailable
from multiverse.core.sizes import GiB, MiB
from multiverse.drivers.base import VMConfig
from multiverse.drivers.process import HOST_KEY_FILE, create_time, ensure_ssh_key
from multiverse.drivers.qemu import QemuDriver
from multiverse.guest.ssh import (
    GuestConnection,
    HostKeyMismatch,
    KnownHost,
    announced_host_key,
)

T = TypeVar("T")
CHUNK = 65536
FLOOD_TOTAL = 64 * MiB
# What may pile up for a reader that stopped: the SSH window and asyncssh's buffers on both
# sides (measured: ~5 MiB) and the queue. A quarter of the flood leaves a margin, and yet an
# unbounded queue (which takes the whole flood) fails.
BACKLOG_BOUND = FLOOD_TOTAL // 4
GUARD = 60.0  # seconds a test waits at most before calling the old, unbounded behaviour a fail


@dataclass
class Behaviour:
    """What the fake guest does; its counters tell the test what happened inside."""

    hang: bool = False
    sent: int = 0
    hung_closed: asyncio.Event = field(default_factory=asyncio.Event)


class _Server(asyncssh.SSHServer):
    def begin_auth(self, username: str) -> bool:
        return True

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        return True


@dataclass
class FakeGuest:
    port: int
    host_key: asyncssh.SSHKey
    behaviour: Behaviour
    server: asyncssh.SSHAcceptor


async def start_guest(host_key: asyncssh.SSHKey, port: int = 0) -> FakeGuest:
    behaviour = Behaviour()

    async def handle(process: asyncssh.SSHServerProcess[bytes]) -> None:
        command = process.command or ""
        if behaviour.hang:
            await process.channel.wait_closed()
            behaviour.hung_closed.set()
            return
        if command == "flood":
            chunk = b"x" * CHUNK
            while behaviour.sent < FLOOD_TOTAL:
                process.stdout.write(chunk)
                await process.stdout.drain()
                behaviour.sent += len(chunk)
            process.exit(0)
            return
        process.stdout.write(b"ok\n")
        process.exit(0)

    server = await asyncssh.create_server(
        _Server,
        "127.0.0.1",
        port,
        server_host_keys=[host_key],
        process_factory=handle,
        encoding=None,
    )
    bound_port: int = server.sockets[0].getsockname()[1]
    return FakeGuest(bound_port, host_key, behaviour, server)


def new_key() -> asyncssh.SSHKey:
    return asyncssh.generate_private_key("ssh-ed25519")


@pytest.fixture()
def client_key(tmp_path: Path) -> Path:
    return ensure_ssh_key(tmp_path / "ssh" / "id_ed25519")


def run(main: Callable[[], Awaitable[T]]) -> T:
    """One test body in a fresh loop, failed (not hung) if it outlives the guard."""
    return asyncio.run(asyncio.wait_for(main(), GUARD))


async def with_guest(
    host_key: asyncssh.SSHKey, body: Callable[[FakeGuest], Awaitable[T]], port: int = 0
) -> T:
    guest = await start_guest(host_key, port)
    try:
        return await body(guest)
    finally:
        guest.server.close()
        await guest.server.wait_closed()


def connection(
    guest: FakeGuest, client_key: Path, known: KnownHost, **options: float
) -> GuestConnection:
    return GuestConnection("127.0.0.1", guest.port, client_key, known, **options)


def recorded(path: Path) -> bytes:
    """The key recorded in ``path``, in the SSH wire format (comparable across key objects)."""
    return asyncssh.import_public_key(path.read_bytes()).public_data


# --- host keys ---------------------------------------------------------------------------------


def test_first_login_records_the_key_and_a_changed_key_is_refused(
    tmp_path: Path, client_key: Path
) -> None:
    record = tmp_path / HOST_KEY_FILE
    known = KnownHost(record, "VM web")
    first, other = new_key(), new_key()

    async def login(guest: FakeGuest) -> bytes:
        ssh = connection(guest, client_key, known)
        try:
            return (await ssh.run("true")).stdout
        finally:
            await ssh.close()

    assert not record.exists()
    assert run(lambda: with_guest(first, login)) == b"ok\n"  # trusted on first use
    assert recorded(record) == first.public_data
    assert run(lambda: with_guest(first, login)) == b"ok\n"  # the same key again: accepted

    with pytest.raises(HostKeyMismatch) as refused:
        run(lambda: with_guest(other, login))
    message = refused.value.message
    assert message.startswith("host key of VM web changed: it offered ssh-ed25519 SHA256:")
    assert other.get_fingerprint() in message and first.get_fingerprint() in message
    assert f"run `rm {record}` on its node" in message
    assert refused.value.code == "conflict"
    assert recorded(record) == first.public_data  # the refusal recorded nothing


def test_a_key_announced_out_of_band_is_required_before_the_first_login(
    tmp_path: Path, client_key: Path
) -> None:
    record = tmp_path / HOST_KEY_FILE
    real, impostor = new_key(), new_key()
    console = f"[    0.1] booting\nmultiverse: host key {real.export_public_key().decode()}"
    known = KnownHost(record, "VM web", announced=lambda: announced_host_key(console))

    async def login(guest: FakeGuest) -> None:
        ssh = connection(guest, client_key, known)
        try:
            await ssh.connect()
        finally:
            await ssh.close()

    with pytest.raises(HostKeyMismatch, match="not the one it announced on its console"):
        run(lambda: with_guest(impostor, login))
    assert not record.exists()
    run(lambda: with_guest(real, login))
    assert recorded(record) == real.public_data


def test_a_refused_key_is_not_retried_as_a_slow_boot(tmp_path: Path, client_key: Path) -> None:
    """wait_until_ready retries only unreachable guests: a wrong key ends the wait at once."""
    record = tmp_path / HOST_KEY_FILE
    record.write_bytes(new_key().export_public_key())
    known = KnownHost(record, "VM web")

    async def wait(guest: FakeGuest) -> None:
        await connection(guest, client_key, known).wait_until_ready(timeout=GUARD * 2)

    with pytest.raises(HostKeyMismatch):
        run(lambda: with_guest(new_key(), wait))


def test_announced_key_is_read_from_the_console() -> None:
    key = new_key().export_public_key().decode().strip()
    console = f"noise\r\nmultiverse: host key {key} root@tiny\r\nmultiverse: host key ssh-rsa AAA\n"
    assert announced_host_key(console) == key  # the first one, without its comment
    assert announced_host_key("multiverse: boot ok\nmultiverse: host key \n") is None


def test_an_unreadable_record_is_refused(tmp_path: Path, client_key: Path) -> None:
    record = tmp_path / HOST_KEY_FILE
    record.write_text("not a key\n")

    async def login(guest: FakeGuest) -> None:
        await connection(guest, client_key, KnownHost(record, "VM web")).connect()

    with pytest.raises(HostKeyMismatch, match="unreadable"):
        run(lambda: with_guest(new_key(), login))


# --- time limits -------------------------------------------------------------------------------


def test_a_hung_command_times_out_and_frees_its_channel(tmp_path: Path, client_key: Path) -> None:
    known = KnownHost(tmp_path / HOST_KEY_FILE, "VM web")

    async def body(guest: FakeGuest) -> tuple[str, list[str]]:
        ssh = connection(guest, client_key, known, command_timeout=0.5)
        errors = []
        try:
            guest.behaviour.hang = True
            for call in (ssh.stats, ssh.ipv4, lambda: ssh.run("sleep 1000")):
                with pytest.raises(Unavailable) as timed_out:
                    await call()
                errors.append(timed_out.value.message)
            await guest.behaviour.hung_closed.wait()  # the guest saw its channel closed
            guest.behaviour.hang = False
            assert (await ssh.run("true")).stdout == b"ok\n"  # the connection still serves
        finally:
            await ssh.close()
        return ssh.address, errors

    address, errors = run(lambda: with_guest(new_key(), body))
    assert errors == [f"the guest at {address} did not finish a command within 0.5 s"] * 3


def test_a_driver_with_a_hung_guest_answers_within_its_limit(
    tmp_path: Path, client_key: Path
) -> None:
    """The QEMU driver's stats go through the same limit, and record the key in the VM's
    directory (a VM adopted by pid whose SSH port is the fake guest's)."""
    driver = QemuDriver(tmp_path / "state", [])
    driver.command_timeout = 0.5
    vm = VMConfig(str(uuid.uuid4()), "web", 1, 256 * MiB, 1 * GiB, "tiny")
    vm_dir = driver.vms_dir / vm.id
    vm_dir.mkdir(parents=True)

    async def body(guest: FakeGuest) -> str:
        runtime = {"pid": os.getpid(), "create_time": create_time(os.getpid())}
        (vm_dir / "vm.json").write_text(json.dumps({**runtime, "ssh_port": guest.port}))
        guest.behaviour.hang = True
        try:
            with pytest.raises(Unavailable) as timed_out:
                await driver.stats(vm)
            return timed_out.value.message
        finally:
            await driver.close()

    message = run(lambda: with_guest(new_key(), body))
    assert "did not finish a command within 0.5 s" in message
    assert (vm_dir / HOST_KEY_FILE).read_bytes().startswith(b"ssh-ed25519 ")


# --- back pressure -----------------------------------------------------------------------------


async def stalled(behaviour: Behaviour, quiet: float = 1.0) -> None:
    """Until the writer finished or made no progress for ``quiet`` seconds."""
    last, since = -1, time.monotonic()
    while behaviour.sent < FLOOD_TOTAL:
        if behaviour.sent != last:
            last, since = behaviour.sent, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return
        await asyncio.sleep(0.05)


def test_output_faster_than_its_reader_waits_for_it(tmp_path: Path, client_key: Path) -> None:
    known = KnownHost(tmp_path / HOST_KEY_FILE, "VM web")

    async def body(guest: FakeGuest) -> tuple[int, int]:
        ssh = connection(guest, client_key, known)
        output = ssh.exec("flood")
        try:
            first = await anext(output)  # then the reader stops reading
            assert first.data
            await stalled(guest.behaviour)
            backlog = guest.behaviour.sent
            # Reading again drains it all: the writer was only held back, not broken.
            received = len(first.data)
            async for chunk in output:
                received += len(chunk.data)
                if chunk.exit_code is not None:
                    assert chunk.exit_code == 0
            return backlog, received
        finally:
            await output.aclose()
            await ssh.close()

    backlog, received = run(lambda: with_guest(new_key(), body))
    assert backlog <= BACKLOG_BOUND, f"{backlog} bytes piled up for a reader that stopped"
    assert received == FLOOD_TOTAL


# --- refused channels ----------------------------------------------------------------------------


@dataclass
class Refusals:
    """How many exec requests the guest still refuses; what it saw."""

    left: int
    requests: int = 0
    connections: int = 0


class _RefusingSession(asyncssh.SSHServerSession[bytes]):
    """Refuses exec requests while ``refusals.left`` (the client then sees "Session request
    failed", as from a guest's dropbear just started); then prints ok."""

    def __init__(self, refusals: Refusals) -> None:
        self.refusals = refusals
        self.channel: asyncssh.SSHServerChannel[bytes] | None = None

    def connection_made(self, chan: asyncssh.SSHServerChannel[bytes]) -> None:
        self.channel = chan

    def exec_requested(self, command: str) -> bool:
        self.refusals.requests += 1
        if self.refusals.left:
            self.refusals.left -= 1
            return False
        return True

    def session_started(self) -> None:
        assert self.channel is not None
        self.channel.write(b"ok\n")
        self.channel.exit(0)


class _RefusingServer(_Server):
    def __init__(self, refusals: Refusals) -> None:
        self.refusals = refusals

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.refusals.connections += 1

    def session_requested(self) -> asyncssh.SSHServerSession[bytes]:
        return _RefusingSession(self.refusals)


@pytest.mark.parametrize("refused", [1, 2])
def test_a_refused_channel_is_asked_for_once_more_on_a_new_connection(
    tmp_path: Path, client_key: Path, refused: int
) -> None:
    known = KnownHost(tmp_path / HOST_KEY_FILE, "VM web")
    refusals = Refusals(left=refused)

    async def body() -> bytes | str:
        server = await asyncssh.create_server(
            lambda: _RefusingServer(refusals), "127.0.0.1", 0,
            server_host_keys=[new_key()], encoding=None,
        )  # fmt: skip
        ssh = GuestConnection("127.0.0.1", server.sockets[0].getsockname()[1], client_key, known)
        try:
            return (await ssh.run("true")).stdout
        except Unavailable as error:
            return error.message
        finally:
            await ssh.close()
            server.close()
            await server.wait_closed()

    answer = run(body)
    # Once, never more: a guest that keeps refusing is not asked for ever.
    assert (refusals.requests, refusals.connections) == (2, 2)
    if refused == 1:
        assert answer == b"ok\n"
    else:
        assert isinstance(answer, str)
        assert answer.startswith("cannot run a command in the guest at root@127.0.0.1:")
        assert answer.endswith(": Session request failed")
