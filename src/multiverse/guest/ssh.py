"""In-guest access over SSH (asyncssh): run commands, read the guest's numbers, open a PTY.

One :class:`GuestConnection` per VM keeps a single SSH connection open and runs every command
as a new channel on it: opening a connection costs ~1.6 s under TCG (the key exchange runs on
the emulated CPU) while a command on an open one takes ~15 ms. The connection is opened on first
use and again after it broke; callers never see a half-open state.

Errors reaching callers are :class:`multiverse.core.errors.Unavailable` (the guest could not be
reached, dropped the connection or did not answer in time) or :class:`HostKeyMismatch`, never
asyncssh's or the socket's own exceptions.

Host keys: the guest's key is checked on every connection against the one recorded for the VM
(:class:`KnownHost`). Before any key is recorded, the key the guest announced out of band (the
test guest prints it on its serial console at boot, before its SSH server starts; the host
reads that log from the hypervisor, which no one on the network can write) must match; a guest
that announces nothing (a cloud image with its own sshd) is trusted on first use. The key is
recorded after the first successful login and any other key is refused from then on.

Bounds: a command run to its end (``run``, ``stats``, ``ipv4``) has a time limit, and opening a
command's channel has one too, so a hung guest never holds a caller (and the VM's lock) for
ever; streamed output waits in a small queue, so a slow reader slows the guest down (SSH flow
control) instead of piling the output up in memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shlex
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncssh

from multiverse.core.errors import Conflict, Unavailable
from multiverse.core.model import GuestStats
from multiverse.guest.image import HOST_KEY_MARKER

STDOUT, STDERR = 1, 2

# Exit code when the command's end is unknown (connection lost), as OpenSSH's client reports it.
UNKNOWN_EXIT = 255

# Read everything `stats` needs in one round trip; sections are split on a marker line.
_STATS_SEPARATOR = "--multiverse--"
_STATS_SCRIPT = f"""
cat /proc/loadavg; echo {_STATS_SEPARATOR}
cat /proc/meminfo; echo {_STATS_SEPARATOR}
if grep -q ' /data ' /proc/mounts; then df -P -k /data; else df -P -k /; fi; echo {_STATS_SEPARATOR}
sed -n 's/^PRETTY_NAME=//p' /etc/os-release 2>/dev/null; echo {_STATS_SEPARATOR}
ip -4 -o addr show scope global 2>/dev/null
"""
_IPV4_SCRIPT = "ip -4 -o addr show scope global"

# Chunks of streamed output waiting for the reader: a bound, not a buffer (64 KiB each).
EXEC_QUEUE_CHUNKS = 16
# How long ``stats`` and ``ipv4`` may take, and opening a command's channel: generous for a
# loaded TCG guest (a command takes ~15 ms there), short enough that a hung one is let go.
COMMAND_TIMEOUT = 30.0
# The first pause between SSH attempts while a guest boots; it doubles up to the caller's interval.
FIRST_RETRY = 0.02


class HostKeyMismatch(Conflict):
    """The guest offered another SSH host key than the one recorded or announced for it."""


class KnownHost:
    """The SSH host key of one guest: recorded in a file once known, and checked.

    ``announced`` reads the key the guest announced out of band (None: it announced none);
    it is consulted only while no key is recorded.
    """

    def __init__(
        self,
        record: Path,
        name: str,
        announced: Callable[[], str | None] | None = None,
    ) -> None:
        self.record = record
        self.name = name
        self.announced = announced

    def recorded(self) -> asyncssh.SSHKey | None:
        try:
            return asyncssh.import_public_key(self.record.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, asyncssh.KeyImportError) as error:
            raise HostKeyMismatch(
                f"the recorded host key of {self.name} in {self.record} is unreadable "
                f"({error}); remove the file to trust the guest's key again"
            ) from error

    def expected(self) -> tuple[asyncssh.SSHKey | None, str]:
        """The key the guest must offer (None: any, trusted on first use) and where it is from."""
        key = self.recorded()
        if key is not None:
            return key, "recorded"
        text = self.announced() if self.announced else None
        if text:
            with contextlib.suppress(asyncssh.KeyImportError):
                return asyncssh.import_public_key(text), "announced"
        return None, ""

    def check(self, offered: asyncssh.SSHKey) -> None:
        """Raise HostKeyMismatch unless ``offered`` is the key this guest must have."""
        expected, source = self.expected()
        if expected is None or expected == offered:
            return
        if source == "recorded":
            raise HostKeyMismatch(
                f"host key of {self.name} changed: it offered {_fingerprint(offered)}, but "
                f"{_fingerprint(expected)} is recorded in {self.record}. Someone else may be "
                f"answering at its address. If you re-created the guest (a new disk or "
                f"system), run `rm {self.record}` on its node and start it again."
            )
        raise HostKeyMismatch(
            f"host key of {self.name} is not the one it announced on its console: it offered "
            f"{_fingerprint(offered)}, it announced {_fingerprint(expected)}. Someone else may "
            "be answering at its address; refusing to connect."
        )

    def remember(self, key: asyncssh.SSHKey) -> None:
        """Record ``key`` unless a key is recorded already (the first one stays)."""
        if self.record.exists():
            return
        temporary = self.record.with_name(f".{self.record.name}.{os.getpid()}.tmp")
        temporary.write_bytes(key.export_public_key())
        try:
            os.link(temporary, self.record)  # never replaces a key recorded meanwhile
        except FileExistsError:
            pass
        finally:
            temporary.unlink(missing_ok=True)


def announced_host_key(console: str) -> str | None:
    """The public key the guest printed on its console at boot, if it printed one (the first)."""
    for line in console.splitlines():
        _before, marker, key = line.partition(HOST_KEY_MARKER)
        if marker and len(fields := key.split()) >= 2:
            return f"{fields[0]} {fields[1]}"
    return None


class _HostKeyClient(asyncssh.SSHClient):
    """Checks the server's key with :class:`KnownHost` during the key exchange."""

    def __init__(self, known: KnownHost) -> None:
        self.known = known
        self.offered: asyncssh.SSHKey | None = None
        self.refused: HostKeyMismatch | None = None

    def validate_host_public_key(
        self, host: str, addr: str, port: int, key: asyncssh.SSHKey
    ) -> bool:
        self.offered = key
        try:
            self.known.check(key)
        except HostKeyMismatch as error:
            self.refused = error
            return False
        return True


@dataclass(frozen=True)
class GuestOutput:
    """A piece of a command's output (``stream`` 1 or 2), or its end (``exit_code`` set)."""

    stream: int = STDOUT
    data: bytes = b""
    exit_code: int | None = None


@dataclass(frozen=True)
class GuestResult:
    """A finished command's exit code and whole output."""

    exit_code: int
    stdout: bytes
    stderr: bytes


class GuestConnection:
    """The SSH connection to one guest, opened lazily and reused by every call.

    Bound to the event loop that opened it: used from another loop (a new ``asyncio.run``), it
    drops the old connection and opens a new one rather than touching a dead loop's transport.
    """

    def __init__(
        self,
        host: str,
        port: int,
        key_path: Path,
        known_host: KnownHost,
        user: str = "root",
        connect_timeout: float = 15.0,
        command_timeout: float = COMMAND_TIMEOUT,
    ) -> None:
        self.host = host
        self.port = port
        self.key_path = key_path
        self.known_host = known_host
        self.user = user
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self._connection: asyncssh.SSHClientConnection | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock: asyncio.Lock | None = None
        self._opening: asyncio.Lock | None = None

    @property
    def address(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"

    async def connect(self) -> asyncssh.SSHClientConnection:
        """The open connection, opening it if there is none (or the old one broke)."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._forget()
            self._loop, self._lock, self._opening = loop, asyncio.Lock(), asyncio.Lock()
        assert self._lock is not None
        async with self._lock:
            if self._connection is not None and not self._connection.is_closed():
                return self._connection
            self._connection = None
            checker = _HostKeyClient(self.known_host)
            try:
                connection = await asyncio.wait_for(
                    asyncssh.connect(
                        self.host,
                        self.port,
                        username=self.user,
                        client_keys=[str(self.key_path)],
                        # No key trusted up front: every key goes through the checker.
                        known_hosts=([], [], []),
                        client_factory=lambda: checker,
                        agent_path=None,
                        config=None,
                        # Ask for the key type the guest has, so it never generates RSA keys.
                        server_host_key_algs=["ssh-ed25519"],
                        keepalive_interval=30,
                    ),
                    timeout=self.connect_timeout,
                )
            except (TimeoutError, OSError, asyncssh.Error) as error:
                if checker.refused is not None:
                    raise checker.refused from None
                raise Unavailable(
                    f"cannot reach the guest over SSH at {self.address}: {_describe(error)}"
                ) from None
            # Recorded only now: a key counts once the guest also accepted our login.
            if checker.offered is not None:
                self.known_host.remember(checker.offered)
            self._connection = connection
            return connection

    async def wait_until_ready(
        self,
        timeout: float,
        alive: Callable[[], bool] | None = None,
        interval: float = 0.25,
    ) -> None:
        """Connect, retrying while the guest boots, until ``timeout`` seconds have passed.

        Retries come quickly at first and then every ``interval`` seconds: callers start
        waiting when the guest is about to start its SSH server (its boot line), so the server
        usually answers within a few tries, and a fixed coarse interval would add half of
        itself to every boot on average.

        ``alive`` lets the caller stop early when the VM died; then the last error is raised.
        A refused host key (HostKeyMismatch) ends the wait at once: waiting would not mend it.
        """
        deadline = time.monotonic() + timeout
        delay = min(FIRST_RETRY, interval)
        while True:
            try:
                await self.connect()
                return
            except Unavailable:
                if time.monotonic() >= deadline or (alive is not None and not alive()):
                    raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, interval)

    async def exec(
        self, command: Sequence[str] | str, stdin: bytes = b""
    ) -> AsyncGenerator[GuestOutput, None]:
        """Run ``command`` (a list is quoted for the guest's shell), streaming its output.

        stdout and stderr come as they arrive, each on its own stream; the last item carries the
        exit code (128 + N for a signal, 255 if the connection was lost). Leaving the iteration
        early closes the command's channel.
        """
        text = command if isinstance(command, str) else shlex.join(command)
        process = await self._open("run a command", text)
        # Bounded: while it is full the pumps stop reading, the channel's window closes and
        # the guest's writes block, so output never piles up here faster than it is read.
        queue: asyncio.Queue[tuple[int, bytes] | None] = asyncio.Queue(EXEC_QUEUE_CHUNKS)

        async def pump(reader: asyncssh.SSHReader[bytes], stream: int) -> None:
            try:
                while chunk := await reader.read(65536):
                    await queue.put((stream, chunk))
            except (OSError, asyncssh.Error):
                pass  # the channel or connection closed: the exit code tells the rest
            finally:
                await queue.put(None)

        pumps = [
            asyncio.create_task(pump(process.stdout, STDOUT)),
            asyncio.create_task(pump(process.stderr, STDERR)),
        ]
        finished = False
        try:
            if stdin:
                process.stdin.write(stdin)
            process.stdin.write_eof()
            open_streams = len(pumps)
            while open_streams:
                item = await queue.get()
                if item is None:
                    open_streams -= 1
                else:
                    yield GuestOutput(stream=item[0], data=item[1])
            await process.wait_closed()
            finished = True
            yield GuestOutput(exit_code=_exit_code(process.returncode))
        finally:
            for task in pumps:
                task.cancel()
            if not finished:
                process.close()

    async def run(
        self, command: Sequence[str] | str, stdin: bytes = b"", timeout: float | None = None
    ) -> GuestResult:
        """Run ``command`` to its end and collect its output.

        Unavailable if it has not ended within ``timeout`` seconds (default: the connection's
        ``command_timeout``); its channel is closed then, the connection stays for others.
        """
        limit = self.command_timeout if timeout is None else timeout
        out, err = bytearray(), bytearray()
        exit_code = UNKNOWN_EXIT
        try:
            async with asyncio.timeout(limit):
                async with contextlib.aclosing(self.exec(command, stdin)) as chunks:
                    async for chunk in chunks:
                        if chunk.exit_code is not None:
                            exit_code = chunk.exit_code
                        (out if chunk.stream == STDOUT else err).extend(chunk.data)
        except TimeoutError:
            raise Unavailable(
                f"the guest at {self.address} did not finish a command within {limit:g} s"
            ) from None
        return GuestResult(exit_code, bytes(out), bytes(err))

    async def stats(self) -> GuestStats:
        """Load, memory, disk (the data disk if mounted, else /), release and IPv4 address."""
        result = await self.run(_STATS_SCRIPT)
        return parse_stats(result.stdout.decode(errors="replace"))

    async def ipv4(self) -> str:
        """The guest's own IPv4 address (its first global one; eth0 in the test guest)."""
        result = await self.run(_IPV4_SCRIPT)
        return parse_ipv4(result.stdout.decode(errors="replace"))

    async def open_shell(
        self,
        size: tuple[int, int] | None = (80, 24),
        term_type: str = "xterm-256color",
        command: Sequence[str] | str | None = None,
    ) -> GuestShell:
        """An interactive session on a PTY of ``size`` (columns, rows): the login shell, or
        ``command``. The PTY merges stdout and stderr, as a terminal does. Without a size,
        no PTY: plain pipes, as ``ssh host < script`` (stderr then merged into stdout)."""
        text = command if command is None or isinstance(command, str) else shlex.join(command)
        process = await self._open(
            "open a shell",
            text,
            term_type=term_type if size else None,
            term_size=size,
            stderr=asyncssh.STDOUT,
        )
        return GuestShell(process)

    async def _open(
        self, what: str, command: str | None, **options: Any
    ) -> asyncssh.SSHClientProcess[bytes]:
        """A new channel running ``command``; a guest that does not open one within
        ``command_timeout`` (hung, or a dead connection not yet noticed) loses its connection.
        A refused channel ran nothing, so it is asked for once more on a new connection: a
        guest just started refused one now and then ("Session request failed")."""
        try:
            return await self._channel(what, command, options)
        except _Refused:
            return await self._channel(what, command, options)

    async def _channel(
        self, what: str, command: str | None, options: dict[str, Any]
    ) -> asyncssh.SSHClientProcess[bytes]:
        connection = await self.connect()
        assert self._opening is not None
        try:
            # One channel opening at a time: the guest's dropbear closed a second session
            # asked for while the first was being set up on a new connection ("Session request
            # failed"). Commands still run side by side once open.
            async with self._opening:
                return await asyncio.wait_for(
                    connection.create_process(command, encoding=None, **options),
                    timeout=self.command_timeout,
                )
        except (TimeoutError, OSError, asyncssh.Error) as error:
            self._drop(connection)
            refused = isinstance(error, asyncssh.ChannelOpenError)
            raise (_Refused if refused else Unavailable)(
                f"cannot {what} in the guest at {self.address}: {_describe(error)}"
            ) from None

    async def close(self) -> None:
        """Close the connection (if open in this loop); the next call opens a new one."""
        connection, self._connection = self._connection, None
        if connection is None:
            return
        if self._loop is asyncio.get_running_loop():
            connection.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(connection.wait_closed(), timeout=2)
        else:
            self._forget(connection)

    def _drop(self, connection: asyncssh.SSHClientConnection) -> None:
        if self._connection is connection:
            self._connection = None
        connection.close()

    def _forget(self, connection: asyncssh.SSHClientConnection | None = None) -> None:
        """Let go of a connection whose loop is gone; closing it there would only raise."""
        connection = connection or self._connection
        self._connection = None
        if connection is not None:
            with contextlib.suppress(Exception):
                connection.abort()


class _Refused(Unavailable):
    """The guest refused a command's channel: nothing ran."""


class GuestShell:
    """An interactive PTY session: bytes in and out, window resizes, and the exit code."""

    def __init__(self, process: asyncssh.SSHClientProcess[bytes]) -> None:
        self._process = process

    async def read(self, size: int = 262144) -> bytes:
        """The next output bytes; ``b""`` once the session ended."""
        try:
            return await self._process.stdout.read(size)
        except (OSError, asyncssh.Error):
            return b""

    async def write(self, data: bytes) -> None:
        try:
            self._process.stdin.write(data)
            await self._process.stdin.drain()
        except (OSError, asyncssh.Error) as error:
            raise Unavailable(f"the guest's shell is gone: {_describe(error)}") from None

    async def close_input(self) -> None:
        with contextlib.suppress(OSError, asyncssh.Error):
            self._process.stdin.write_eof()

    async def resize(self, cols: int, rows: int) -> None:
        self._process.change_terminal_size(cols, rows)

    async def wait(self) -> int:
        """Wait for the session to end; its exit code."""
        await self._process.wait_closed()
        return _exit_code(self._process.returncode)

    async def close(self) -> None:
        self._process.close()


def parse_stats(text: str) -> GuestStats:
    """GuestStats from the output of the stats script (pure, so it is tested without a VM)."""
    sections = [part.strip("\n") for part in text.split(_STATS_SEPARATOR)]
    sections += [""] * (5 - len(sections))
    loadavg, meminfo, df, release, addresses = sections[:5]

    fields = loadavg.split()
    load = (0.0, 0.0, 0.0)
    if len(fields) >= 3:
        with contextlib.suppress(ValueError):
            load = (float(fields[0]), float(fields[1]), float(fields[2]))

    memory: dict[str, int] = {}
    for line in meminfo.splitlines():
        match = re.match(r"^(\w+):\s+(\d+)\s*kB", line)
        if match:
            memory[match.group(1)] = int(match.group(2)) * 1024
    memory_total = memory.get("MemTotal", 0)
    available = memory.get("MemAvailable", memory.get("MemFree", 0))

    disk_used = disk_total = 0
    df_lines = df.splitlines()
    if len(df_lines) >= 2:
        parts = df_lines[-1].split()
        if len(parts) >= 4 and parts[1].isdigit() and parts[2].isdigit():
            disk_total, disk_used = int(parts[1]) * 1024, int(parts[2]) * 1024

    return GuestStats(
        load=load,
        memory_used=max(memory_total - available, 0),
        memory_total=memory_total,
        disk_used=disk_used,
        disk_total=disk_total,
        release=release.strip().strip("\"'"),
        ipv4=parse_ipv4(addresses),
    )


def parse_ipv4(text: str) -> str:
    """The first address of ``ip -4 -o addr`` output, preferring eth0's."""
    found = re.findall(r"^\d+:\s+(\S+)\s+inet\s+(\d+\.\d+\.\d+\.\d+)", text, re.MULTILINE)
    for interface, address in found:
        if interface == "eth0":
            return str(address)
    return str(found[0][1]) if found else ""


def _exit_code(returncode: int | None) -> int:
    if returncode is None:
        return UNKNOWN_EXIT
    return 128 - returncode if returncode < 0 else returncode


def _fingerprint(key: asyncssh.SSHKey) -> str:
    return f"{key.algorithm.decode()} {key.get_fingerprint()}"


def _describe(error: BaseException) -> str:
    if isinstance(error, asyncio.TimeoutError):
        return "timed out"
    if isinstance(error, asyncssh.Error):
        return error.reason or type(error).__name__
    return str(error) or type(error).__name__


__all__ = [
    "STDERR",
    "STDOUT",
    "GuestConnection",
    "GuestOutput",
    "GuestResult",
    "GuestShell",
    "HostKeyMismatch",
    "KnownHost",
    "announced_host_key",
    "parse_ipv4",
    "parse_stats",
]
