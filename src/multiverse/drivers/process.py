"""What the drivers that run one hypervisor process per VM share (QEMU, Firecracker): the
:class:`ProcessDriver` base that holds their common Driver logic, and the helpers under it:
process liveness that survives pid reuse, waiting for an exit, small JSON state files written
atomically, log tails, and the node's SSH key for reaching guests."""

from __future__ import annotations

import abc
import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import asyncssh
import psutil

from multiverse.core.errors import Conflict, DriverError, InvalidArgument, MultiverseError, NotFound
from multiverse.core.files import write_private
from multiverse.core.model import GuestStats, Resources
from multiverse.core.sizes import format_size
from multiverse.core.sshlogin import LOGIN_WINDOW, SshLogin, authorized_key_line
from multiverse.drivers.base import (
    Driver,
    ExecChunk,
    ImageInfo,
    PowerState,
    Session,
    TerminalSize,
    VMConfig,
    VMStatus,
    host_resources,
)
from multiverse.drivers.images import (
    CachedImage,
    ImageCache,
    ImageDirectories,
    check_image_name,
)
from multiverse.guest.ssh import COMMAND_TIMEOUT, GuestConnection, KnownHost, announced_host_key

log = logging.getLogger(__name__)

# Edits of the guest user's authorized_keys, the key's line on stdin. The guest's login shell
# runs them with its builtins (but for a rename): each process the guest starts costs tens of
# milliseconds on an emulated CPU, and a move waits for the first.
_LET_IN = (
    "umask 077; IFS= read -r k; [ -d ~/.ssh ] || mkdir ~/.ssh; "
    'f=~/.ssh/authorized_keys; if [ -f "$f" ]; then '
    'while IFS= read -r l; do [ "$l" = "$k" ] && exit 0; done < "$f"; fi; '
    'echo "$k" >> "$f"'
)
# Rewritten whole, then moved over the old file: sshd never reads half a file.
_LET_OUT = (
    'umask 077; IFS= read -r k; f=~/.ssh/authorized_keys; [ -f "$f" ] || exit 0; '
    '{ while IFS= read -r l; do [ "$l" = "$k" ] || echo "$l"; done < "$f"; } > "$f.new" '
    '&& mv -f "$f.new" "$f"'
)
_LET_OUT_ON_CLOSE = 5.0  # seconds the driver's close gives pushed keys to be taken out

UNIX_PATH_MAX = 107  # a sockaddr_un's path, less its terminating NUL
LOG_TAIL = 4000  # how much of a log an error message quotes
HOST_KEY_FILE = "ssh_host_key.pub"  # the guest's SSH host key once known, in the VM's directory
_VM_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_RUNTIME_FILES = {"vm.json"}  # a running process's; never part of a move


def ensure_ssh_key(path: Path) -> Path:
    """The node's SSH key pair (ed25519, private part 0600), made once and kept."""
    if path.exists() and path.with_suffix(".pub").exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = asyncssh.generate_private_key("ssh-ed25519", comment="multiverse-node")
    path.with_suffix(".pub").write_bytes(key.export_public_key())
    write_private(path, key.export_private_key())  # last: its presence means both are there
    return path


def pid_alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


async def wait_exit(pid: int, timeout: float) -> bool:
    """Whether process ``pid`` ended within ``timeout``: told by the kernel the moment it
    does (a pidfd turns readable; a zombie counts as ended), else seen by polling."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:  # gone already, or no pidfds here
        return await _poll_exit(pid, timeout)
    ended = asyncio.Event()
    loop = asyncio.get_running_loop()
    try:
        loop.add_reader(pidfd, ended.set)
        if pid_alive(pid):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ended.wait(), timeout)
        return not pid_alive(pid)
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)


async def _poll_exit(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.05)
    return True


def create_time(pid: int) -> float:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return 0.0


def tail(path: Path, size: int) -> str:
    try:
        with path.open("rb") as file:
            file.seek(max(file.seek(0, os.SEEK_END) - size, 0))
            return file.read().decode(errors="replace")
    except OSError:
        return ""


def head(path: Path, size: int) -> str:
    try:
        with path.open("rb") as file:
            return file.read(size).decode(errors="replace")
    except OSError:
        return ""


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write atomically: a reader (another driver adopting the VM) never sees half a file."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    temporary.replace(path)


# --- the drivers that run one hypervisor process per VM -------------------------------------


class ProcessDriver(Driver):
    """A driver that runs one hypervisor process per VM, keeps the VM in its own directory and
    reaches the guest over SSH (QEMU, Firecracker).

    Everything that does not depend on the hypervisor lives here once: the per-VM lock, the VM
    directory and its disk's creation, adoption of a running process by pid and start time, the
    stop sequence (graceful, then SIGKILL), status, and the guest SSH connections that serve
    exec, stats and sessions. A subclass says how to boot, how to ask its hypervisor for a
    graceful stop and for its state, where its control socket and SSH endpoint are, and what
    else a stop or delete must give back (a tap, an address lease).

    Each VM lives in ``<state_dir>/vms/<id>/`` with ``config.json`` and its disk; while it runs,
    ``vm.json`` records the process (``pid``, ``create_time``, ``started_at`` and what the
    subclass adds). ``vm.json`` is removed on every stop the driver makes, so one found beside a
    dead process means the VM ended by itself.

    The guest's SSH host key is kept in ``ssh_host_key.pub`` there (see
    :class:`multiverse.guest.ssh.KnownHost`): before the first login it must match the key the
    guest printed on its console at this boot (the test guest does; an image that prints
    none is trusted on first use); from then on it must match the recorded one, across
    stop/start (the test guest keeps its key on its data disk), until the VM is deleted.
    """

    hypervisor: ClassVar[str] = ""  # its name in messages: "QEMU", "Firecracker"
    max_cpus: ClassVar[int] = 1
    min_memory: ClassVar[int] = 0
    min_disk: ClassVar[int] = 0
    disk_file: ClassVar[str] = ""  # the VM's disk, in its directory
    console_log: ClassVar[str] = ""  # the guest's console, in the VM's directory
    stopped_alone: ClassVar[str] = ""  # how a VM ends by itself, for the status message
    install_hint: ClassVar[str] = ""  # what to do when the binary cannot be run
    # What a binary that cannot be run raises; kept per driver, as each always raised it.
    spawn_error: ClassVar[type[MultiverseError]] = DriverError

    def __init__(
        self,
        state_dir: Path,
        images: ImageCache | Sequence[Path],
        capacity: Resources | None,
        *,
        boot_timeout: float,
        stop_timeout: float,
    ) -> None:
        """``images``: the port to the node's images, or plain image directories."""
        super().__init__(state_dir)
        self.image_cache = images if isinstance(images, ImageCache) else ImageDirectories(images)
        self.boot_timeout = boot_timeout
        self.stop_timeout = stop_timeout
        self._capacity = capacity
        self.vms_dir = state_dir / "vms"
        self.vms_dir.mkdir(parents=True, exist_ok=True)
        self.key_path = ensure_ssh_key(state_dir / "ssh" / "id_ed25519")
        # How long a command the driver itself runs in the guest (stats, its address) may take.
        self.command_timeout = COMMAND_TIMEOUT
        self._guests: dict[str, GuestConnection] = {}
        self._warming: dict[str, asyncio.Task[None]] = {}
        self._logins: set[asyncio.Task[None]] = set()  # pushed keys, each until its window ends
        self._locks: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Lock]] = {}

    # --- what a subclass provides --------------------------------------------------------

    @abc.abstractmethod
    def _make_disk(self, vm: VMConfig, path: Path) -> None:
        """Make the VM's disk at ``path`` (runs in a thread; may take a while)."""

    @abc.abstractmethod
    async def _boot(self, vm: VMConfig) -> None:
        """Start the hypervisor process and return once the guest's SSH answers.

        On failure leave nothing running and no ``vm.json``.
        """

    @abc.abstractmethod
    def _control_socket(self, vm: VMConfig) -> Path:
        """The hypervisor's control socket, removed with ``vm.json`` when the VM is off."""

    @abc.abstractmethod
    def _ssh_address(self, runtime: dict[str, Any]) -> tuple[str, int] | None:
        """The guest's SSH (host, port) from ``vm.json``; None while there is none."""

    @abc.abstractmethod
    async def _hypervisor_status(self, vm: VMConfig, ipv4: str) -> VMStatus:
        """The status of a VM whose process is alive, as its hypervisor reports it.

        A MultiverseError (no answer) is reported as running with the error's message.
        """

    @abc.abstractmethod
    async def _shut_down(self, vm: VMConfig, pid: int) -> bool:
        """Ask the guest to power off; True once process ``pid`` exited, False to kill it."""

    async def _boot_incomplete(self, vm: VMConfig) -> bool:
        """Whether a live process must be killed and booted again rather than adopted."""
        return False

    # --- the Driver port -----------------------------------------------------------------

    async def capacity(self) -> Resources:
        if self._capacity is not None:
            return self._capacity
        return host_resources(self.state_dir)

    async def validate(self, vm: VMConfig) -> None:
        self._validate(vm)

    async def create(self, vm: VMConfig) -> None:
        async with self._lock(vm.id):
            await self._create(vm)

    async def start(self, vm: VMConfig) -> VMStatus:
        async with self._lock(vm.id):
            await self._create(vm)
            pid = self._running_pid(vm)
            if pid is not None and await self._boot_incomplete(vm):
                await self._kill(vm, pid)
                pid = None
            if pid is None:
                await self._boot(vm)
            else:
                # Already running (maybe adopted): return only once the guest answers.
                await self._guest(vm).wait_until_ready(
                    self.boot_timeout, alive=lambda: self._running_pid(vm) is not None
                )
            return await self.status(vm)

    async def stop(self, vm: VMConfig, force: bool = False) -> None:
        async with self._lock(vm.id):
            self._existing_dir(vm)
            await self._stop(vm, force)

    async def delete(self, vm: VMConfig) -> None:
        async with self._lock(vm.id):
            vm_dir = self._vm_dir(vm)
            if vm_dir.is_dir():
                await self._stop(vm, force=True)
                try:
                    await asyncio.to_thread(shutil.rmtree, vm_dir)
                except OSError as error:
                    raise DriverError(f"cannot remove the files of VM {vm.name}: {error}") from None

    async def status(self, vm: VMConfig) -> VMStatus:
        vm_dir = self._vm_dir(vm)
        if not vm_dir.is_dir():
            return VMStatus(PowerState.MISSING)
        runtime = read_json(vm_dir / "vm.json")
        if self._running_pid(vm) is None:
            if runtime:
                return VMStatus(
                    PowerState.STOPPED,
                    message=f"the VM stopped on its own ({self.stopped_alone}); "
                    "see its console log",
                )
            return VMStatus(PowerState.STOPPED)
        ipv4 = str(runtime.get("ipv4", "")) if runtime else ""
        try:
            return await self._hypervisor_status(vm, ipv4)
        except MultiverseError as error:
            return VMStatus(PowerState.RUNNING, ipv4, message=error.message)

    async def stats(self, vm: VMConfig) -> GuestStats:
        self._require_running(vm)
        return await self._guest(vm).stats()

    async def exec(
        self, vm: VMConfig, command: Sequence[str], stdin: bytes = b""
    ) -> AsyncIterator[ExecChunk]:
        if not command:
            raise InvalidArgument("exec needs a command")
        self._require_running(vm)
        async for chunk in self._guest(vm).exec(command, stdin):
            yield ExecChunk(stream=chunk.stream, data=chunk.data, exit_code=chunk.exit_code)

    async def open_session(
        self, vm: VMConfig, command: Sequence[str] | None, size: TerminalSize | None
    ) -> Session:
        self._require_running(vm)
        return await self._guest(vm).open_shell(
            (size.cols, size.rows) if size else None, command=command
        )

    async def ssh_login(self, vm: VMConfig, public_key: str) -> SshLogin:
        line = authorized_key_line(public_key)
        self._require_running(vm)
        guest = self._guest(vm)
        await self._let_in(vm, line)  # connects first, so the host key below is known
        host_key = guest.known_host.recorded()
        if host_key is None:
            raise DriverError(f"VM {vm.name}: its SSH host key is not known yet")
        expiry = asyncio.create_task(self._expire_login(vm, line))
        self._logins.add(expiry)
        expiry.add_done_callback(self._logins.discard)
        kind, blob = host_key.export_public_key("openssh").decode().split()[:2]
        return SshLogin(guest.host, guest.port, guest.user, f"{kind} {blob}", LOGIN_WINDOW)

    async def _expire_login(self, vm: VMConfig, line: str) -> None:
        """Take a pushed key out when its window ends, or at once when the driver closes."""
        try:
            await asyncio.sleep(LOGIN_WINDOW)
        finally:
            try:
                await self._let_out(vm, line)
            except MultiverseError as exc:  # stopped, say: the next boot's keys are the config's
                log.info("VM %s: cannot take a pushed SSH key out: %s", vm.name, exc.message)

    async def _let_in(self, vm: VMConfig, line: str) -> None:
        """Add ``line`` to the guest user's authorized_keys, unless it is there already."""
        if line:
            await self._edit_keys(vm, line, "authorize", _LET_IN)

    async def _let_out(self, vm: VMConfig, line: str) -> None:
        """Take ``line`` out of the guest user's authorized_keys."""
        await self._edit_keys(vm, line, "take out", _LET_OUT)

    async def _edit_keys(self, vm: VMConfig, line: str, what: str, script: str) -> None:
        result = await self._guest(vm).run(script, stdin=line.encode() + b"\n")
        if result.exit_code != 0:
            raise DriverError(f"VM {vm.name}: cannot {what} an SSH key: {result.stderr!r}")

    async def logs(self, vm: VMConfig) -> str:
        return tail(self._existing_dir(vm) / self.console_log, 256 * 1024)

    async def close(self) -> None:
        for expiry in list(self._logins):
            expiry.cancel()  # takes its key out now
        if self._logins:  # a guest that does not answer soon keeps the key: a stop waits not
            await asyncio.wait(list(self._logins), timeout=_LET_OUT_ON_CLOSE)
        for vm_id in list(self._guests):
            await self._close_guest(vm_id)

    # --- creating ------------------------------------------------------------------------

    def _validate(self, vm: VMConfig) -> None:
        """Refuse what the hypervisor could not run, before anything is written."""
        self._vm_dir(vm)
        if not 1 <= vm.cpus <= self.max_cpus:
            raise InvalidArgument(f"cpus must be between 1 and {self.max_cpus}, not {vm.cpus}")
        if vm.memory < self.min_memory:
            raise InvalidArgument(
                f"memory {format_size(max(vm.memory, 0))} is too small: {self.hypervisor} needs "
                f"at least {format_size(self.min_memory)} to boot a guest"
            )
        if vm.disk < self.min_disk:
            raise InvalidArgument(
                f"disk {format_size(max(vm.disk, 0))} is too small: at least "
                f"{format_size(self.min_disk)}"
            )
        self._check_available(vm.image)

    def _image(self, image: str) -> CachedImage:
        """The image's files on this host; NotFound when they are not here."""
        found = self.image_cache.lookup(image)
        if found is None:
            raise NotFound(f"image {image!r} not found on this node")
        return found

    def _check_available(self, image: str) -> None:
        check_image_name(image)
        if not self.image_cache.available(image):
            raise NotFound(f"image {image!r} not found on this node")

    async def images(self) -> list[ImageInfo]:
        return self.image_cache.held()

    async def _create(self, vm: VMConfig) -> None:
        """Validate, then make the VM directory and its disk, once; a failure leaves nothing."""
        self._validate(vm)
        vm_dir = self._vm_dir(vm)
        disk = vm_dir / self.disk_file
        if disk.exists():
            return
        fresh = not vm_dir.exists()
        vm_dir.mkdir(parents=True, exist_ok=True)
        try:
            write_json(vm_dir / "config.json", _config_json(vm))
            await asyncio.to_thread(self._make_disk, vm, disk)
        except BaseException:
            if fresh:
                shutil.rmtree(vm_dir, ignore_errors=True)
            raise

    # --- running the process -------------------------------------------------------------

    def _spawn_process(
        self, vm: VMConfig, argv: Sequence[str], log: Path, runtime: dict[str, Any]
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` in the VM directory, output to ``log``; record it in ``vm.json``
        together with ``runtime``."""
        vm_dir = self._vm_dir(vm)
        with log.open("wb") as output:
            try:
                process = subprocess.Popen(
                    argv,
                    cwd=vm_dir,
                    stdin=subprocess.DEVNULL,
                    stdout=output,
                    stderr=output,
                    # Its own session: no signal meant for the agent's group reaches it, and it
                    # outlives a killed agent.
                    start_new_session=True,
                    close_fds=True,
                )
            except OSError as error:
                raise self.spawn_error(
                    f"cannot run {argv[0]}: {error.strerror or error} ({self.install_hint})"
                ) from None
        # A thread blocked in wait() reaps it the moment it exits, so no zombie lingers even
        # when nobody asks about the VM; asyncio's child watchers would tie it to one loop.
        threading.Thread(
            target=process.wait, name=f"reap-{self.name}-{process.pid}", daemon=True
        ).start()
        write_json(
            vm_dir / "vm.json",
            {
                "pid": process.pid,
                "create_time": create_time(process.pid),
                "started_at": time.time(),
                **runtime,
            },
        )
        return process

    async def _stop(self, vm: VMConfig, force: bool) -> None:
        """A graceful stop first (unless ``force``), SIGKILL if that did not end it."""
        await self._close_guest(vm.id)
        pid = self._running_pid(vm)
        if pid is not None:
            exited = not force and await self._shut_down(vm, pid)
            if not exited:
                await self._kill(vm, pid)
        self._forget_runtime(vm)

    async def _kill(self, vm: VMConfig, pid: int) -> None:
        if pid_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if not await wait_exit(pid, 10.0):
            raise DriverError(f"{self.hypervisor} process {pid} of VM {vm.name} survived SIGKILL")

    def _forget_runtime(self, vm: VMConfig) -> None:
        """The VM is off: drop what described the running process."""
        with contextlib.suppress(FileNotFoundError):
            (self._vm_dir(vm) / "vm.json").unlink()
        self._control_socket(vm).unlink(missing_ok=True)

    def _running_pid(self, vm: VMConfig) -> int | None:
        """The pid of the VM's hypervisor if that very process is alive (pids get reused), so
        that a new driver over the same directory adopts what kept running."""
        runtime = read_json(self._vm_dir(vm) / "vm.json")
        if not runtime:
            return None
        try:
            pid = int(runtime["pid"])
            process = psutil.Process(pid)
            if process.status() == psutil.STATUS_ZOMBIE:
                return None
            if abs(process.create_time() - float(runtime["create_time"])) > 0.5:
                return None  # the pid now belongs to another process
        except (KeyError, TypeError, ValueError, psutil.Error):
            return None
        return pid

    def _require_running(self, vm: VMConfig) -> None:
        self._existing_dir(vm)
        if self._running_pid(vm) is None:
            raise Conflict(f"VM {vm.name} is not running")

    # --- cold moves (base.Migratable) ------------------------------------------------------

    def export_files(self, vm: VMConfig) -> dict[str, Path]:
        vm_dir = self._existing_dir(vm)
        if self._running_pid(vm) is not None:
            raise Conflict(f"VM {vm.name} is running; a cold move needs it stopped")
        return {
            str(path.relative_to(vm_dir)): path
            for path in sorted(vm_dir.rglob("*"))
            if path.is_file() and not path.is_symlink() and path.name not in _RUNTIME_FILES
        }

    def incoming_dir(self, vm: VMConfig) -> Path:
        self._vm_dir(vm)  # refuses an id that could name a path elsewhere
        return self.state_dir / "incoming" / vm.id

    async def adopt_incoming(self, vm: VMConfig) -> None:
        async with self._lock(vm.id):
            incoming, vm_dir = self.incoming_dir(vm), self._vm_dir(vm)
            if vm_dir.is_dir() and not incoming.exists():
                return  # adopted already
            if vm_dir.is_dir():
                raise Conflict(f"VM {vm.name} exists on this node already")
            vm_dir.parent.mkdir(parents=True, exist_ok=True)
            os.replace(incoming, vm_dir)

    async def abort_incoming(self, vm: VMConfig) -> None:
        await asyncio.to_thread(shutil.rmtree, self.incoming_dir(vm), True)

    # --- helpers -------------------------------------------------------------------------

    def _vm_dir(self, vm: VMConfig) -> Path:
        """The VM's directory; an id that could name a path outside ``vms`` is refused."""
        if not _VM_ID.match(vm.id):
            raise InvalidArgument(f"invalid VM id {vm.id!r}")
        return self.vms_dir / vm.id

    def _existing_dir(self, vm: VMConfig) -> Path:
        vm_dir = self._vm_dir(vm)
        if not vm_dir.is_dir():
            raise NotFound(f"VM {vm.name} ({vm.id}) does not exist on this node")
        return vm_dir

    def _guest(self, vm: VMConfig) -> GuestConnection:
        """The VM's SSH connection, made anew when its address changed (a new boot)."""
        address = self._ssh_address(read_json(self._vm_dir(vm) / "vm.json") or {})
        if address is None:
            raise Conflict(f"VM {vm.name} is not running")
        guest = self._guests.get(vm.id)
        if guest is None or (guest.host, guest.port) != address:
            vm_dir = self._vm_dir(vm)
            console = vm_dir / self.console_log
            known = KnownHost(
                vm_dir / HOST_KEY_FILE,
                f"VM {vm.name}",
                # Read when needed: the guest prints its key early in each boot.
                announced=lambda: announced_host_key(head(console, 64 * 1024)),
            )
            guest = GuestConnection(
                *address,
                self.key_path,
                known,
                # A boot shorter than SSH's usual connect timeout must not wait for it.
                connect_timeout=min(15.0, self.boot_timeout),
                command_timeout=self.command_timeout,
            )
            self._guests[vm.id] = guest
        return guest

    def _warm_guest(self, vm: VMConfig) -> None:
        """Open the VM's SSH connection and run one command, in the background. A boot
        leaves both warm (readiness is an SSH login, then a stats command); a VM that arrived
        some other way (a live move) would otherwise pay on its first exec or its next move
        the key exchange (~0.4 s of an emulated CPU) and a command path its new QEMU has not
        translated yet (~0.15 s under TCG)."""
        guest = self._guest(vm)

        async def connect() -> None:
            with contextlib.suppress(MultiverseError):  # the next call says what is wrong
                await guest.run("true")

        self._warming[vm.id] = asyncio.ensure_future(connect())

    async def _close_guest(self, vm_id: str) -> None:
        warming = self._warming.pop(vm_id, None)
        if warming is not None:
            warming.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await warming
        guest = self._guests.pop(vm_id, None)
        if guest is not None:
            await guest.close()

    def _lock(self, vm_id: str) -> asyncio.Lock:
        """One action at a time per VM, in the running loop (a lock is bound to its loop)."""
        loop = asyncio.get_running_loop()
        entry = self._locks.get(vm_id)
        if entry is None or entry[0] is not loop:
            entry = (loop, asyncio.Lock())
            self._locks[vm_id] = entry
        return entry[1]


def _config_json(vm: VMConfig) -> dict[str, Any]:
    """What ``config.json`` records: the config less its user data (which may hold secrets)."""
    return {key: getattr(vm, key) for key in ("id", "name", "cpus", "memory", "disk", "image")}
