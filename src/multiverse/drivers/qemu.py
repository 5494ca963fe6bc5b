"""Real VMs with QEMU: ``qemu-system-x86_64`` processes controlled over QMP, reached over SSH.

Each VM lives in ``<state_dir>/vms/<uuid>/``:

- ``config.json``: the :class:`VMConfig` it was created with;
- ``disk.img``: its data disk, a sparse raw file formatted ext4 on the host (``mkfs.ext4``), so
  the guest mounts it at once and no qemu-img or partitioning is involved;
- ``hostname``, ``authorized_keys``, ``network``: the per-VM configuration the guest reads
  through fw_cfg (see :mod:`multiverse.guest.image`);
- while it runs: ``vm.json`` (pid, process start time, SSH port, guest address), ``qmp.sock``,
  ``serial.log`` (the console; the previous boot's in ``serial.log.1``) and ``qemu.log``.

QEMU runs as our child in its own session (not ``-daemonize``): it survives a killed agent, and
we can reap it. A new driver over the same directory adopts running VMs by their ``vm.json``:
the pid counts only if that process still has the recorded start time (pids get reused).

Networking is QEMU's user mode with one host port forwarded to the guest's SSH port on
127.0.0.1; the guest gets QEMU's fixed user-net address statically (no DHCP round trip).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import psutil
from qemu.qmp import QMPClient, QMPError

from multiverse.core.errors import Conflict, DriverError, InvalidArgument, NotFound
from multiverse.core.model import GuestStats, Resources
from multiverse.core.sizes import MiB, format_size
from multiverse.drivers.base import (
    Driver,
    ExecChunk,
    PowerState,
    Session,
    TerminalSize,
    VMConfig,
    VMStatus,
)
from multiverse.drivers.process import (
    create_time,
    ensure_ssh_key,
    pid_alive,
    read_json,
    tail,
    wait_exit,
    write_json,
)
from multiverse.guest.image import (
    BOOT_OK_MARKER,
    FW_CFG_PREFIX,
    INITRD_FILE,
    KERNEL_FILE,
)
from multiverse.guest.ssh import GuestConnection

# `-m 64` does not boot the Debian kernel with our initramfs; 96 MiB does (measured).
MIN_MEMORY = 96 * MiB
MIN_DISK = 16 * MiB  # the smallest ext4 with a journal that mkfs.ext4 makes without fuss
MAX_CPUS = 255  # the pc machine's limit

# QEMU's user-mode network: the guest's address, the gateway and the DNS forwarder it offers.
USER_NET_ADDRESS = "10.0.2.15/24"
USER_NET_GATEWAY = "10.0.2.2"
USER_NET_DNS = "10.0.2.3"

# quiet: the kernel's boot chatter on an emulated UART slows TCG boots for nothing.
# panic=-1 with -no-reboot: a panicking guest ends its QEMU, so the VM shows as stopped.
KERNEL_CMDLINE = "console=ttyS0 panic=-1 quiet"
# Only under TCG (measured: boot to SSH 4.6 s -> 3.8 s): an emulator does not speculate, so
# the Spectre mitigations protect nothing there and only cost; and the ACPI interrupt-link
# methods, interpreted on the emulated CPU, take ~0.2 s per PCI device where the BIOS's
# legacy routing table serves as well.
TCG_KERNEL_CMDLINE = "mitigations=off acpi=noirq"

ACCEL_ENV = "MULTIVERSE_QEMU_ACCEL"
_VM_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_UNIX_PATH_MAX = 107
_PORT_TAKEN = "Could not set up host forwarding rule"
_LOG_TAIL = 4000


class QemuDriver(Driver):
    """VMs as QEMU processes on this host (KVM when the host has it, TCG otherwise)."""

    name = "qemu"

    def __init__(
        self,
        state_dir: Path,
        image_dirs: Sequence[Path],
        capacity: Resources | None = None,
        *,
        qemu_binary: str = "qemu-system-x86_64",
        boot_timeout: float = 120.0,
        stop_timeout: float = 30.0,
    ) -> None:
        super().__init__(state_dir)
        self.image_dirs = [Path(directory) for directory in image_dirs]
        self.qemu_binary = qemu_binary
        self.boot_timeout = boot_timeout
        self.stop_timeout = stop_timeout
        self._capacity = capacity
        self.vms_dir = state_dir / "vms"
        self.vms_dir.mkdir(parents=True, exist_ok=True)
        self.key_path = ensure_ssh_key(state_dir / "ssh" / "id_ed25519")
        self.accel = choose_accel()
        self.kernel_cmdline = KERNEL_CMDLINE
        if self.accel.startswith("tcg"):
            self.kernel_cmdline += " " + TCG_KERNEL_CMDLINE
        self._guests: dict[str, GuestConnection] = {}
        self._locks: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Lock]] = {}

    # --- the Driver port -----------------------------------------------------------------

    async def capacity(self) -> Resources:
        if self._capacity is not None:
            return self._capacity
        return Resources(
            cpus=os.cpu_count() or 1,
            memory=psutil.virtual_memory().total,
            disk=shutil.disk_usage(self.state_dir).total,
        )

    async def validate(self, vm: VMConfig) -> None:
        self._validate(vm)

    async def open_session(
        self, vm: VMConfig, command: Sequence[str] | None, size: TerminalSize | None
    ) -> Session:
        self._require_running(vm)
        return await self._guest(vm).open_shell(
            (size.cols, size.rows) if size else None, command=command
        )

    async def create(self, vm: VMConfig) -> None:
        async with self._lock(vm.id):
            await self._create(vm)

    async def start(self, vm: VMConfig) -> VMStatus:
        async with self._lock(vm.id):
            await self._create(vm)
            if self._running_pid(vm) is None:
                await self._boot(vm)
            else:
                # Already running (maybe adopted): return only once the guest answers.
                await self._guest(vm).wait_until_ready(
                    self.boot_timeout, alive=lambda: self._running_pid(vm) is not None
                )
            return await self._status(vm)

    async def stop(self, vm: VMConfig, force: bool = False) -> None:
        async with self._lock(vm.id):
            if not self._vm_dir(vm).is_dir():
                raise NotFound(f"VM {vm.name} ({vm.id}) does not exist on this node")
            await self._stop(vm, force)

    async def delete(self, vm: VMConfig) -> None:
        async with self._lock(vm.id):
            vm_dir = self._vm_dir(vm)
            if not vm_dir.is_dir():
                return
            await self._stop(vm, force=True)
            try:
                await asyncio.to_thread(shutil.rmtree, vm_dir)
            except OSError as error:
                raise DriverError(f"cannot remove the files of VM {vm.name}: {error}") from None

    async def status(self, vm: VMConfig) -> VMStatus:
        return await self._status(vm)

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

    async def logs(self, vm: VMConfig) -> str:
        vm_dir = self._vm_dir(vm)
        if not vm_dir.is_dir():
            raise NotFound(f"VM {vm.name} ({vm.id}) does not exist on this node")
        return tail(vm_dir / "serial.log", 256 * 1024)

    async def close(self) -> None:
        guests, self._guests = self._guests, {}
        for guest in guests.values():
            await guest.close()

    # --- creating and booting ----------------------------------------------------------

    async def _create(self, vm: VMConfig) -> None:
        """Validate, then make the VM directory and its formatted data disk (once)."""
        self._validate(vm)
        vm_dir = self._vm_dir(vm)
        disk = vm_dir / "disk.img"
        if disk.exists():
            return
        fresh = not vm_dir.exists()
        vm_dir.mkdir(parents=True, exist_ok=True)
        try:
            write_json(vm_dir / "config.json", _config_json(vm))
            await asyncio.to_thread(make_data_disk, disk, vm.disk)
        except BaseException:
            if fresh:
                shutil.rmtree(vm_dir, ignore_errors=True)
            raise

    def _validate(self, vm: VMConfig) -> tuple[Path, Path]:
        """Reject what QEMU could not run before anything is written; the image's files."""
        if not _VM_ID.match(vm.id):
            raise InvalidArgument(f"invalid VM id {vm.id!r}")
        if not 1 <= vm.cpus <= MAX_CPUS:
            raise InvalidArgument(f"cpus must be between 1 and {MAX_CPUS}, not {vm.cpus}")
        if vm.memory < MIN_MEMORY:
            raise InvalidArgument(
                f"memory {format_size(max(vm.memory, 0))} is too small: QEMU needs at least "
                f"{format_size(MIN_MEMORY)} to boot a guest"
            )
        if vm.disk < MIN_DISK:
            raise InvalidArgument(
                f"disk {format_size(max(vm.disk, 0))} is too small: at least "
                f"{format_size(MIN_DISK)}"
            )
        return self.image_files(vm.image)

    def image_files(self, image: str) -> tuple[Path, Path]:
        if "/" in image or image in ("", ".", ".."):
            raise InvalidArgument(f"invalid image name {image!r}")
        for directory in self.image_dirs:
            kernel, initrd = directory / image / KERNEL_FILE, directory / image / INITRD_FILE
            if kernel.is_file() and initrd.is_file():
                return kernel, initrd
        searched = ", ".join(str(directory) for directory in self.image_dirs) or "(none)"
        raise NotFound(
            f"image {image!r} not found on this node: no {image}/{KERNEL_FILE} and "
            f"{image}/{INITRD_FILE} in {searched}"
        )

    async def _boot(self, vm: VMConfig) -> None:
        """Start QEMU and wait until the guest's SSH answers; on failure leave nothing running."""
        vm_dir = self._vm_dir(vm)
        kernel, initrd = self.image_files(vm.image)
        self.write_guest_config(vm)
        _rotate(vm_dir / "serial.log")
        await self._close_guest(vm.id)
        deadline = time.monotonic() + self.boot_timeout
        for _attempt in range(5):
            port = self._free_port()
            process = self._spawn(vm, kernel, initrd, port)
            try:
                await self._wait_for_guest(vm, process, port, deadline)
                return
            except _PortTaken:
                continue  # someone took the port between our probe and QEMU's bind
            except BaseException:
                await self._kill(vm, process.pid)
                self._forget_runtime(vm)
                raise
        raise DriverError(f"VM {vm.name}: no free local port for its SSH forward after 5 tries")

    def _spawn(
        self, vm: VMConfig, kernel: Path, initrd: Path, port: int
    ) -> subprocess.Popen[bytes]:
        vm_dir = self._vm_dir(vm)
        argv = self.qemu_argv(vm, kernel, initrd, port)
        with (vm_dir / "qemu.log").open("wb") as log:
            try:
                process = subprocess.Popen(
                    argv,
                    cwd=vm_dir,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    # Its own session: no signal meant for the agent's group reaches QEMU.
                    start_new_session=True,
                    close_fds=True,
                )
            except OSError as error:
                raise DriverError(
                    f"cannot run {self.qemu_binary}: {error} (is qemu-system-x86 installed?)"
                ) from None
        # A thread blocked in wait() reaps QEMU the moment it exits, so no zombie lingers even
        # when nobody asks about the VM; asyncio's child watchers would tie it to one loop.
        threading.Thread(target=process.wait, name=f"reap-qemu-{process.pid}", daemon=True).start()
        write_json(
            vm_dir / "vm.json",
            {
                "pid": process.pid,
                "create_time": create_time(process.pid),
                "ssh_port": port,
                "accel": self.accel,
                "ipv4": "",
                "started_at": time.time(),
            },
        )
        return process

    def qemu_argv(self, vm: VMConfig, kernel: Path, initrd: Path, port: int) -> list[str]:
        # Paths inside the VM directory are relative (QEMU runs there): that keeps the unix
        # socket's path under the 108-byte limit however deep the state directory is.
        argv = [
            self.qemu_binary,
            "-name", _escape(vm.name),
            "-machine", "pc",
            "-accel", self.accel,
            "-smp", str(vm.cpus),
            "-m", f"{vm.memory // MiB}M",
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-kernel", _escape(str(kernel)),
            "-initrd", _escape(str(initrd)),
            "-append", self.kernel_cmdline,
            "-chardev", "file,id=console,path=serial.log",
            "-serial", "chardev:console",
            # Without an entropy source dropbear waits ~1 s for the kernel's RNG to be ready.
            "-device", "virtio-rng-pci",
            "-drive", "file=disk.img,format=raw,if=virtio,cache=writeback,discard=unmap",
            "-netdev", f"user,id=net0,hostfwd=tcp:127.0.0.1:{port}-:22",
            "-device", "virtio-net-pci,netdev=net0",
            "-qmp", "unix:qmp.sock,server=on,wait=off",
        ]  # fmt: skip
        if self.accel.startswith("kvm"):
            argv += ["-cpu", "host"]
        for key in ("hostname", "authorized_keys", "network"):
            argv += ["-fw_cfg", f"name={FW_CFG_PREFIX}{key},file={key}"]
        return argv

    def write_guest_config(self, vm: VMConfig) -> None:
        vm_dir = self._vm_dir(vm)
        public_key = self.key_path.with_suffix(".pub").read_text().strip()
        (vm_dir / "hostname").write_text(vm.name + "\n")
        (vm_dir / "authorized_keys").write_text(public_key + "\n")
        (vm_dir / "network").write_text(
            f"address={USER_NET_ADDRESS}\ngateway={USER_NET_GATEWAY}\ndns={USER_NET_DNS}\n"
        )

    async def _wait_for_guest(
        self, vm: VMConfig, process: subprocess.Popen[bytes], port: int, deadline: float
    ) -> None:
        """Wait for the console's boot line (or a while), then for SSH; record the address."""
        vm_dir = self._vm_dir(vm)
        # Images that never print our boot line still get their SSH tried after this long.
        marker_deadline = min(deadline, time.monotonic() + 20.0)
        while time.monotonic() < marker_deadline:
            if process.poll() is not None or not pid_alive(process.pid):
                self._raise_exited(vm, process)
            if BOOT_OK_MARKER in tail(vm_dir / "serial.log", 64 * 1024):
                break
            await asyncio.sleep(0.05)
        guest = self._guest(vm, port)
        try:
            await guest.wait_until_ready(
                max(deadline - time.monotonic(), 1.0), alive=lambda: pid_alive(process.pid)
            )
        except Exception:
            if not pid_alive(process.pid):
                self._raise_exited(vm, process)
            raise DriverError(
                f"VM {vm.name} booted but its SSH did not answer within "
                f"{self.boot_timeout:.0f} s; console:\n{tail(vm_dir / 'serial.log', _LOG_TAIL)}"
            ) from None
        ipv4 = await guest.ipv4()
        runtime = read_json(vm_dir / "vm.json") or {}
        runtime["ipv4"] = ipv4
        write_json(vm_dir / "vm.json", runtime)

    def _raise_exited(self, vm: VMConfig, process: subprocess.Popen[bytes]) -> None:
        vm_dir = self._vm_dir(vm)
        qemu_log = tail(vm_dir / "qemu.log", _LOG_TAIL).strip()
        if _PORT_TAKEN in qemu_log:
            raise _PortTaken
        raise DriverError(
            f"QEMU for VM {vm.name} exited during boot (code {process.returncode}): "
            f"{qemu_log or '(no message)'}\nconsole:\n{tail(vm_dir / 'serial.log', _LOG_TAIL)}"
        )

    def _free_port(self) -> int:
        """A local port nobody listens on now and none of our running VMs uses."""
        ours = {
            runtime.get("ssh_port")
            for runtime in (read_json(path) for path in self.vms_dir.glob("*/vm.json"))
            if runtime
        }
        for _ in range(50):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                probe.bind(("127.0.0.1", 0))
                port: int = probe.getsockname()[1]
            if port not in ours:
                return port
        raise DriverError("no free local port for the SSH forward")

    # --- stopping ------------------------------------------------------------------------

    async def _stop(self, vm: VMConfig, force: bool) -> None:
        """ACPI power button first (unless ``force``), then QMP quit, then SIGKILL."""
        await self._close_guest(vm.id)
        pid = self._running_pid(vm)
        if pid is None:
            self._forget_runtime(vm)
            return
        if not force:
            with contextlib.suppress(DriverError):
                await self._qmp(vm, "system_powerdown")
                if await wait_exit(pid, self.stop_timeout):
                    self._forget_runtime(vm)
                    return
            with contextlib.suppress(DriverError):
                await self._qmp(vm, "quit")
                if await wait_exit(pid, 5.0):
                    self._forget_runtime(vm)
                    return
        await self._kill(vm, pid)
        self._forget_runtime(vm)

    async def _kill(self, vm: VMConfig, pid: int) -> None:
        if pid_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if not await wait_exit(pid, 10.0):
            raise DriverError(f"QEMU process {pid} of VM {vm.name} survived SIGKILL")

    def _forget_runtime(self, vm: VMConfig) -> None:
        """The VM is off: drop what described the running process."""
        vm_dir = self._vm_dir(vm)
        for name in ("vm.json", "qmp.sock"):
            with contextlib.suppress(FileNotFoundError):
                (vm_dir / name).unlink()

    # --- observing -----------------------------------------------------------------------

    async def _status(self, vm: VMConfig) -> VMStatus:
        vm_dir = self._vm_dir(vm)
        if not vm_dir.is_dir():
            return VMStatus(PowerState.MISSING)
        runtime = read_json(vm_dir / "vm.json")
        pid = self._running_pid(vm)
        if pid is None:
            if runtime:
                # vm.json is removed on every stop we do: its presence means it ended by itself.
                return VMStatus(
                    PowerState.STOPPED,
                    message="the VM stopped on its own (guest power-off, panic or QEMU exit); "
                    "see its console log",
                )
            return VMStatus(PowerState.STOPPED)
        ipv4 = str(runtime.get("ipv4", "")) if runtime else ""
        try:
            answer = await self._qmp(vm, "query-status")
        except DriverError as error:
            return VMStatus(PowerState.RUNNING, ipv4, message=error.message)
        qemu_state = answer.get("status", "") if isinstance(answer, dict) else ""
        message = "" if qemu_state == "running" else f"QEMU reports the VM as {qemu_state!r}"
        return VMStatus(PowerState.RUNNING, ipv4, message=message)

    def _running_pid(self, vm: VMConfig) -> int | None:
        """The pid of the VM's QEMU if that very process is alive (adopts across drivers)."""
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
        if not self._vm_dir(vm).is_dir():
            raise NotFound(f"VM {vm.name} ({vm.id}) does not exist on this node")
        if self._running_pid(vm) is None:
            raise Conflict(f"VM {vm.name} is not running")

    async def _qmp(self, vm: VMConfig, command: str, timeout: float = 5.0) -> Any:
        """Run one QMP command on a fresh connection; QEMU's monitor serves one client at once,
        and a connection held open would lock out an agent that adopts the VM."""
        sock_path = self._vm_dir(vm) / "qmp.sock"
        client = QMPClient(f"multiverse-{vm.name}")
        try:
            sock = await asyncio.wait_for(asyncio.to_thread(_connect_unix, sock_path), timeout)
            await asyncio.wait_for(client.connect(sock), timeout)
            return await asyncio.wait_for(client.execute(command), timeout)
        except (OSError, QMPError, TimeoutError) as error:
            raise DriverError(
                f"QEMU monitor of VM {vm.name} did not answer {command}: "
                f"{str(error) or type(error).__name__}"
            ) from None
        finally:
            with contextlib.suppress(Exception):
                await client.disconnect()

    # --- helpers -------------------------------------------------------------------------

    def _vm_dir(self, vm: VMConfig) -> Path:
        if not _VM_ID.match(vm.id):
            raise InvalidArgument(f"invalid VM id {vm.id!r}")
        return self.vms_dir / vm.id

    def _guest(self, vm: VMConfig, port: int | None = None) -> GuestConnection:
        """The VM's SSH connection, made anew when its port changed (a new boot)."""
        if port is None:
            runtime = read_json(self._vm_dir(vm) / "vm.json") or {}
            port = int(runtime.get("ssh_port", 0))
            if not port:
                raise Conflict(f"VM {vm.name} is not running")
        guest = self._guests.get(vm.id)
        if guest is None or guest.port != port:
            guest = GuestConnection("127.0.0.1", port, self.key_path)
            self._guests[vm.id] = guest
        return guest

    async def _close_guest(self, vm_id: str) -> None:
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


class _PortTaken(Exception):
    """QEMU could not bind the SSH forward's port: try another."""


def choose_accel() -> str:
    """KVM only on hosts with hardware KVM modules: this project's machines expose a nested
    "PVM" /dev/kvm that cannot run a stock kernel, so /dev/kvm alone proves nothing."""
    override = os.environ.get(ACCEL_ENV, "").strip()
    if override:
        return override
    hardware = any(Path(f"/sys/module/{module}").exists() for module in ("kvm_intel", "kvm_amd"))
    return "kvm" if hardware and os.access("/dev/kvm", os.R_OK | os.W_OK) else "tcg"


def make_data_disk(path: Path, size: int) -> None:
    """A sparse file of ``size`` bytes holding an empty ext4 file system labelled "data".

    Lazy inode table and journal init: the sparse file reads as zeros already, so writing them
    would only allocate space.
    """
    mkfs = shutil.which("mkfs.ext4", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    if mkfs is None:
        raise DriverError("mkfs.ext4 not found: install e2fsprogs")
    partial = path.with_name(path.name + ".part")
    with partial.open("wb") as file:
        file.truncate(size)
    result = subprocess.run(
        [mkfs, "-q", "-F", "-L", "data", "-E", "lazy_itable_init=1,lazy_journal_init=1",
         str(partial)],
        capture_output=True,
        text=True,
        check=False,
    )  # fmt: skip
    if result.returncode != 0:
        partial.unlink(missing_ok=True)
        raise DriverError(f"mkfs.ext4 failed: {result.stderr.strip()}")
    partial.rename(path)


def _connect_unix(path: Path) -> socket.socket:
    """A connected unix socket; long paths go through /proc/self/fd to dodge the 108-byte limit."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(5.0)
        if len(str(path)) <= _UNIX_PATH_MAX:
            sock.connect(str(path))
        else:
            directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                sock.connect(f"/proc/self/fd/{directory}/{path.name}")
            finally:
                os.close(directory)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _escape(value: str) -> str:
    """QEMU option values double their commas."""
    return value.replace(",", ",,")


def _rotate(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.replace(path.with_name(path.name + ".1"))


def _config_json(vm: VMConfig) -> dict[str, Any]:
    return {
        "id": vm.id,
        "name": vm.name,
        "cpus": vm.cpus,
        "memory": vm.memory,
        "disk": vm.disk,
        "image": vm.image,
    }
