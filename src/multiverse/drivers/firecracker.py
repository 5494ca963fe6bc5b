"""MicroVMs with Firecracker: one ``firecracker`` process per VM, driven over its HTTP API.

Each VM lives in ``<state_dir>/vms/<uuid>/``:

- ``config.json``: the :class:`VMConfig` it was created with;
- ``rootfs.ext4``: its disk, a copy (reflinked where possible) of the image's ``rootfs.ext4``,
  or an empty ext4 file for kernel+initrd images (the "tiny" guest mounts it on /data);
- while it runs: ``vm.json`` (pid, process start time, tap, address) and ``firecracker.log``
  (the process' output, which carries the guest's serial console).

The API socket is ``<run_dir>/<uuid>.sock``. The process runs as our child in its own session
(it outlives a killed agent, which adopts it by pid and start time, as the QEMU driver does).

Networking: a tap device per VM, ``mv`` + 13 hex digits of its uuid (Linux caps interface names
at 15 characters), on a bridge of this node (created if missing, given the pool's first
address); a locally administered MAC derived from the uuid; a guest address from the node's
pool (:class:`IpPool`, persisted in ``state_dir``). The address is leased at boot and given back
on delete and whenever a boot fails, so no failed launch leaks one (Catapult did).

The guest learns its address and the node's SSH key from the kernel command line
(``boot_args``), the only channel Firecracker offers before the network is up:

- ``ip=<guest>::<gateway>:<netmask>:<hostname>:eth0:off``, the kernel's own syntax;
- ``multiverse.authorized_keys=<base64>``: root's authorized_keys line.

Exec, stats and sessions go over SSH to the guest's address (:mod:`multiverse.guest.ssh`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import hashlib
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import psutil

from multiverse.core.errors import (
    Conflict,
    DriverError,
    InvalidArgument,
    MultiverseError,
    NotFound,
    Unavailable,
)
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
    host_resources,
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
from multiverse.drivers.rootfs import copy_rootfs, make_ext4
from multiverse.guest.image import INITRD_FILE, KERNEL_FILE
from multiverse.guest.ssh import GuestConnection

BINARY_ENV = "MULTIVERSE_FIRECRACKER"
ROOTFS_FILE = "rootfs.ext4"  # an image's root file system, when it has one
DEFAULT_BRIDGE = "mvbr0"
DEFAULT_CIDR = "172.31.90.0/24"

# Firecracker's limits (machine-config: vcpu_count 1..32); 96 MiB is the tiny guest's floor.
MAX_CPUS = 32
MIN_MEMORY = 96 * MiB
MIN_DISK = 16 * MiB

# reboot=k: a guest reboot ends Firecracker, which has no reset; panic=1 so a panic does too.
BASE_BOOT_ARGS = "console=ttyS0 reboot=k panic=1 quiet"
_UNIX_PATH_MAX = 107
_LOG_TAIL = 4000


class FirecrackerDriver(Driver):
    """MicroVMs as Firecracker processes on this host, on tap devices of one bridge."""

    name = "firecracker"

    def __init__(
        self,
        state_dir: Path,
        image_dirs: Sequence[Path],
        capacity: Resources | None = None,
        *,
        binary: str | None = None,
        run_dir: Path | None = None,
        bridge: str = DEFAULT_BRIDGE,
        cidr: str = DEFAULT_CIDR,
        ip_binary: str = "ip",
        boot_args: str = BASE_BOOT_ARGS,
        boot_timeout: float = 120.0,
        stop_timeout: float = 20.0,
        api_timeout: float = 10.0,
    ) -> None:
        """``binary``: the firecracker executable (default: $MULTIVERSE_FIRECRACKER, else PATH).

        ``run_dir``: where the API sockets go (default ``state_dir/run``, or a short directory
        under /tmp when that path would pass the 108-byte limit of unix socket paths).
        """
        super().__init__(state_dir)
        self.image_dirs = [Path(directory) for directory in image_dirs]
        self._capacity = capacity
        self.binary = (
            binary or os.environ.get(BINARY_ENV) or shutil.which("firecracker") or ("firecracker")
        )
        self.run_dir = run_dir or _short_run_dir(state_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.vms_dir = state_dir / "vms"
        self.vms_dir.mkdir(parents=True, exist_ok=True)
        self.network = HostNetwork(bridge, cidr, ip_binary)
        self.pool = IpPool(state_dir / "ip-pool.json", cidr)
        self.boot_args = boot_args
        self.boot_timeout = boot_timeout
        self.stop_timeout = stop_timeout
        self.api_timeout = api_timeout
        self.key_path = ensure_ssh_key(state_dir / "ssh" / "id_ed25519")
        self._guests: dict[str, GuestConnection] = {}
        self._locks: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Lock]] = {}

    # --- the Driver port -----------------------------------------------------------------

    async def capacity(self) -> Resources:
        return self._capacity or host_resources(self.state_dir)

    async def validate(self, vm: VMConfig) -> None:
        self._validate(vm)

    async def create(self, vm: VMConfig) -> None:
        async with self._lock(vm.id):
            await self._create(vm)

    async def start(self, vm: VMConfig) -> VMStatus:
        async with self._lock(vm.id):
            await self._create(vm)
            pid = self._running_pid(vm)
            if pid is not None and await self._vmm_state(vm) != "Running":
                # A process left configured but never started (an agent killed mid-boot).
                await self._kill(vm, pid)
                pid = None
            if pid is None:
                await self._boot(vm)
            else:
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
            if vm_dir.is_dir():
                await self._stop(vm, force=True)
                try:
                    await asyncio.to_thread(shutil.rmtree, vm_dir)
                except OSError as error:
                    raise DriverError(f"cannot remove the files of VM {vm.name}: {error}") from None
            self.pool.release(vm.id)

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

    async def open_session(
        self, vm: VMConfig, command: Sequence[str] | None, size: TerminalSize | None
    ) -> Session:
        self._require_running(vm)
        return await self._guest(vm).open_shell(
            (size.cols, size.rows) if size else None, command=command
        )

    async def logs(self, vm: VMConfig) -> str:
        vm_dir = self._vm_dir(vm)
        if not vm_dir.is_dir():
            raise NotFound(f"VM {vm.name} ({vm.id}) does not exist on this node")
        return tail(vm_dir / "firecracker.log", 256 * 1024)

    async def close(self) -> None:
        guests, self._guests = self._guests, {}
        for guest in guests.values():
            await guest.close()

    # --- creating ------------------------------------------------------------------------

    def _validate(self, vm: VMConfig) -> tuple[Path, Path | None, Path | None]:
        """Refuse what Firecracker could not run; the image's kernel, initrd and rootfs."""
        self._vm_dir(vm)
        if not 1 <= vm.cpus <= MAX_CPUS:
            raise InvalidArgument(f"cpus must be between 1 and {MAX_CPUS}, not {vm.cpus}")
        if vm.memory < MIN_MEMORY:
            raise InvalidArgument(
                f"memory {format_size(max(vm.memory, 0))} is too small: at least "
                f"{format_size(MIN_MEMORY)}"
            )
        if vm.disk < MIN_DISK:
            raise InvalidArgument(
                f"disk {format_size(max(vm.disk, 0))} is too small: at least "
                f"{format_size(MIN_DISK)}"
            )
        return self._image_files(vm.image)

    def _image_files(self, image: str) -> tuple[Path, Path | None, Path | None]:
        if "/" in image or image in ("", ".", ".."):
            raise InvalidArgument(f"invalid image name {image!r}")
        for directory in self.image_dirs:
            kernel = directory / image / KERNEL_FILE
            if kernel.is_file():
                initrd = directory / image / INITRD_FILE
                rootfs = directory / image / ROOTFS_FILE
                return (
                    kernel,
                    initrd if initrd.is_file() else None,
                    rootfs if rootfs.is_file() else None,
                )
        searched = ", ".join(str(directory) for directory in self.image_dirs) or "(none)"
        raise NotFound(
            f"image {image!r} not found on this node: no {image}/{KERNEL_FILE} in {searched}"
        )

    async def _create(self, vm: VMConfig) -> None:
        """The VM directory and its disk, once; a failure leaves nothing behind."""
        _kernel, _initrd, image_rootfs = self._validate(vm)
        vm_dir = self._vm_dir(vm)
        disk = vm_dir / "rootfs.ext4"
        if disk.exists():
            return
        fresh = not vm_dir.exists()
        vm_dir.mkdir(parents=True, exist_ok=True)
        try:
            write_json(vm_dir / "config.json", _config_json(vm))
            if image_rootfs is not None:
                await asyncio.to_thread(copy_rootfs, image_rootfs, disk, vm.disk)
            else:
                await asyncio.to_thread(make_ext4, disk, vm.disk, None, "data")
        except BaseException:
            if fresh:
                shutil.rmtree(vm_dir, ignore_errors=True)
            raise

    # --- booting -------------------------------------------------------------------------

    async def _boot(self, vm: VMConfig) -> None:
        """Lease an address, plug a tap, start Firecracker, configure it, boot, wait for SSH.

        Any failure undoes all of it: the process killed, the tap removed, the address given
        back, so a failed launch leaks nothing.
        """
        kernel, initrd, image_rootfs = self._image_files(vm.image)
        vm_dir = self._vm_dir(vm)
        await self._close_guest(vm.id)
        tap = tap_name(vm.id)
        process: subprocess.Popen[bytes] | None = None
        try:
            address = self.pool.allocate(vm.id)
            await self.network.ensure_bridge(self.pool.gateway)
            await self.network.add_tap(tap)
            process = self._spawn(vm, tap, str(address.ip))
            await self._wait_for_socket(vm, process)
            api = self._api(vm)
            await api.put(
                "/machine-config", {"vcpu_count": vm.cpus, "mem_size_mib": vm.memory // MiB}
            )
            boot_source: dict[str, Any] = {
                "kernel_image_path": str(kernel),
                "boot_args": self._kernel_args(vm, address, has_initrd=initrd is not None),
            }
            if initrd is not None:
                boot_source["initrd_path"] = str(initrd)
            await api.put("/boot-source", boot_source)
            await api.put(
                "/drives/rootfs",
                {
                    "drive_id": "rootfs",
                    "path_on_host": str(vm_dir / "rootfs.ext4"),
                    # Kernel+initrd images boot from RAM and mount the disk as data; images
                    # with a root file system boot from it.
                    "is_root_device": image_rootfs is not None and initrd is None,
                    "is_read_only": False,
                },
            )
            await api.put(
                "/network-interfaces/eth0",
                {"iface_id": "eth0", "host_dev_name": tap, "guest_mac": mac_address(vm.id)},
            )
            await api.put("/actions", {"action_type": "InstanceStart"})
            guest = self._guest(vm)
            try:
                await guest.wait_until_ready(
                    self.boot_timeout, alive=lambda: pid_alive(process.pid) if process else False
                )
            except Unavailable:
                if not pid_alive(process.pid):
                    raise DriverError(
                        f"Firecracker of VM {vm.name} exited during boot (code "
                        f"{process.poll()}):\n{tail(vm_dir / 'firecracker.log', _LOG_TAIL)}"
                    ) from None
                raise DriverError(
                    f"VM {vm.name} booted but its SSH at {address.ip} did not answer within "
                    f"{self.boot_timeout:.0f} s; console:\n"
                    f"{tail(vm_dir / 'firecracker.log', _LOG_TAIL)}"
                ) from None
        except BaseException:
            if process is not None:
                with contextlib.suppress(MultiverseError):
                    await self._kill(vm, process.pid)
            await self._close_guest(vm.id)
            self._forget_runtime(vm)
            with contextlib.suppress(MultiverseError):
                await self.network.remove_tap(tap)
            self.pool.release(vm.id)
            raise

    def _kernel_args(self, vm: VMConfig, address: ipaddress.IPv4Interface, has_initrd: bool) -> str:
        public_key = self.key_path.with_suffix(".pub").read_text().strip()
        key = base64.b64encode((public_key + "\n").encode()).decode()
        network = f"ip={address.ip}::{self.pool.gateway.ip}:{address.netmask}:{vm.name}:eth0:off"
        root = "" if has_initrd else " root=/dev/vda rw"
        return f"{self.boot_args}{root} {network} multiverse.authorized_keys={key}"

    def _spawn(self, vm: VMConfig, tap: str, ipv4: str) -> subprocess.Popen[bytes]:
        vm_dir = self._vm_dir(vm)
        socket_path = self._socket(vm)
        socket_path.unlink(missing_ok=True)  # Firecracker refuses to start on a stale socket
        with (vm_dir / "firecracker.log").open("wb") as log:
            try:
                process = subprocess.Popen(
                    [self.binary, "--api-sock", str(socket_path), "--id", vm.id],
                    cwd=vm_dir,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    start_new_session=True,  # no signal meant for the agent's group reaches it
                    close_fds=True,
                )
            except OSError as error:
                raise Unavailable(
                    f"cannot run {self.binary}: {error.strerror or error} (is Firecracker "
                    f"installed? set ${BINARY_ENV} to its path)"
                ) from None
        # A thread blocked in wait() reaps it the moment it exits, whatever loop is running.
        threading.Thread(target=process.wait, name=f"reap-fc-{process.pid}", daemon=True).start()
        write_json(
            vm_dir / "vm.json",
            {
                "pid": process.pid,
                "create_time": create_time(process.pid),
                "tap": tap,
                "ipv4": ipv4,
                "started_at": time.time(),
            },
        )
        return process

    async def _wait_for_socket(self, vm: VMConfig, process: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + self.api_timeout
        while not self._socket(vm).exists():
            if process.poll() is not None or time.monotonic() > deadline:
                raise DriverError(
                    f"Firecracker of VM {vm.name} did not open its API socket: "
                    f"{tail(self._vm_dir(vm) / 'firecracker.log', _LOG_TAIL).strip()}"
                )
            await asyncio.sleep(0.02)

    # --- stopping ------------------------------------------------------------------------

    async def _stop(self, vm: VMConfig, force: bool) -> None:
        """Ctrl+Alt+Del first (unless ``force``), SIGKILL after ``stop_timeout``."""
        await self._close_guest(vm.id)
        pid = self._running_pid(vm)
        if pid is not None and not force:
            with contextlib.suppress(MultiverseError):
                await self._api(vm).put("/actions", {"action_type": "SendCtrlAltDel"})
                await wait_exit(pid, self.stop_timeout)
        if pid is not None:
            await self._kill(vm, pid)
        runtime = read_json(self._vm_dir(vm) / "vm.json") or {}
        await self.network.remove_tap(str(runtime.get("tap") or tap_name(vm.id)))
        self._forget_runtime(vm)

    async def _kill(self, vm: VMConfig, pid: int) -> None:
        if pid_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if not await wait_exit(pid, 10.0):
            raise DriverError(f"Firecracker process {pid} of VM {vm.name} survived SIGKILL")

    def _forget_runtime(self, vm: VMConfig) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self._vm_dir(vm) / "vm.json").unlink()
        self._socket(vm).unlink(missing_ok=True)

    # --- observing -----------------------------------------------------------------------

    async def _status(self, vm: VMConfig) -> VMStatus:
        vm_dir = self._vm_dir(vm)
        if not vm_dir.is_dir():
            return VMStatus(PowerState.MISSING)
        runtime = read_json(vm_dir / "vm.json")
        if self._running_pid(vm) is None:
            if runtime:
                return VMStatus(
                    PowerState.STOPPED,
                    message="the VM stopped on its own (guest power-off, reboot or panic); "
                    "see its console log",
                )
            return VMStatus(PowerState.STOPPED)
        ipv4 = str(runtime.get("ipv4", "")) if runtime else ""
        try:
            state = await self._vmm_state(vm)
        except MultiverseError as error:
            return VMStatus(PowerState.RUNNING, ipv4, message=error.message)
        if state == "Running":
            return VMStatus(PowerState.RUNNING, ipv4)
        if state == "Not started":
            return VMStatus(
                PowerState.STOPPED, message="Firecracker is up but the microVM was never started"
            )
        return VMStatus(PowerState.RUNNING, ipv4, message=f"Firecracker reports {state!r}")

    async def _vmm_state(self, vm: VMConfig) -> str:
        info = await self._api(vm).get("/")
        state = info.get("state")
        if not isinstance(state, str):
            raise DriverError(f"Firecracker of VM {vm.name} answered GET / without a state")
        return state

    def _running_pid(self, vm: VMConfig) -> int | None:
        """The pid of the VM's Firecracker if that very process is alive (pids get reused)."""
        runtime = read_json(self._vm_dir(vm) / "vm.json")
        if not runtime:
            return None
        try:
            pid = int(runtime["pid"])
            process = psutil.Process(pid)
            if process.status() == psutil.STATUS_ZOMBIE:
                return None
            if abs(process.create_time() - float(runtime["create_time"])) > 0.5:
                return None
        except (KeyError, TypeError, ValueError, psutil.Error):
            return None
        return pid

    def _require_running(self, vm: VMConfig) -> None:
        if not self._vm_dir(vm).is_dir():
            raise NotFound(f"VM {vm.name} ({vm.id}) does not exist on this node")
        if self._running_pid(vm) is None:
            raise Conflict(f"VM {vm.name} is not running")

    # --- helpers -------------------------------------------------------------------------

    def _vm_dir(self, vm: VMConfig) -> Path:
        if not vm.id or "/" in vm.id or vm.id.startswith("."):
            raise InvalidArgument(f"invalid VM id {vm.id!r}")
        return self.vms_dir / vm.id

    def _socket(self, vm: VMConfig) -> Path:
        return self.run_dir / f"{vm.id}.sock"

    def _api(self, vm: VMConfig) -> FirecrackerAPI:
        return FirecrackerAPI(self._socket(vm), vm.name, self.api_timeout)

    def _guest(self, vm: VMConfig) -> GuestConnection:
        runtime = read_json(self._vm_dir(vm) / "vm.json") or {}
        host = str(runtime.get("ipv4") or "")
        if not host:
            raise Conflict(f"VM {vm.name} is not running")
        guest = self._guests.get(vm.id)
        if guest is None or guest.host != host:
            # A boot shorter than SSH's usual connect timeout must not wait for it.
            timeout = min(15.0, self.boot_timeout)
            guest = GuestConnection(host, 22, self.key_path, connect_timeout=timeout)
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


# --- the Firecracker API ----------------------------------------------------------------------


class FirecrackerAPI:
    """One Firecracker process' API on its unix socket; errors come back typed.

    Firecracker answers 204 to a successful PUT, and 400 with ``{"fault_message": ...}`` to
    one it refuses; a refusal because the microVM already started becomes :class:`Conflict`,
    any other :class:`DriverError`; no answer at all :class:`Unavailable`.
    """

    def __init__(self, socket_path: Path, vm_name: str = "", timeout: float = 10.0) -> None:
        self.socket_path = socket_path
        self.vm_name = vm_name or socket_path.stem
        self.timeout = timeout

    async def get(self, path: str) -> dict[str, Any]:
        response = await self._request("GET", path, None)
        try:
            answer = response.json()
        except ValueError:
            raise DriverError(
                f"Firecracker of VM {self.vm_name} answered GET {path} with malformed JSON: "
                f"{response.text[:200]!r}"
            ) from None
        if not isinstance(answer, dict):
            raise DriverError(f"Firecracker of VM {self.vm_name} answered GET {path} oddly")
        return answer

    async def put(self, path: str, body: dict[str, Any]) -> None:
        await self._request("PUT", path, body)

    async def _request(self, method: str, path: str, body: dict[str, Any] | None) -> httpx.Response:
        transport = httpx.AsyncHTTPTransport(uds=str(self.socket_path))
        try:
            async with httpx.AsyncClient(
                transport=transport, base_url="http://localhost", timeout=self.timeout
            ) as client:
                response = await client.request(method, path, json=body)
        except httpx.HTTPError as error:
            raise Unavailable(
                f"the Firecracker API of VM {self.vm_name} did not answer {method} {path}: "
                f"{str(error) or type(error).__name__}"
            ) from None
        if response.is_success:
            return response
        raise api_error(method, path, response.status_code, response.text, self.vm_name)


def api_error(method: str, path: str, status: int, text: str, vm_name: str = "") -> MultiverseError:
    """The typed error for a Firecracker error response (pure: tested on every shape)."""
    fault = ""
    with contextlib.suppress(ValueError):
        body = json.loads(text)
        if isinstance(body, dict) and isinstance(body.get("fault_message"), str):
            fault = body["fault_message"]
    fault = fault or text.strip()[:300] or "(no fault message)"
    where = f"Firecracker of VM {vm_name}" if vm_name else "Firecracker"
    message = f"{where} refused {method} {path} ({status}): {fault}"
    if status == 400 and ("after starting" in fault or "already" in fault.lower()):
        return Conflict(message)
    return DriverError(message)


# --- host networking --------------------------------------------------------------------------


def tap_name(vm_id: str) -> str:
    """``mv`` + the uuid's first 13 hex digits: 15 characters, Linux's limit, unique enough
    (52 bits) among the VMs of one node."""
    digits = vm_id.replace("-", "").lower()
    if len(digits) < 13 or not all(c in "0123456789abcdef" for c in digits):
        digits = hashlib.sha256(vm_id.encode()).hexdigest()
    return "mv" + digits[:13]


def mac_address(vm_id: str) -> str:
    """A stable, locally administered unicast MAC (02:...) derived from the VM's id."""
    digest = hashlib.sha256(vm_id.encode()).digest()
    return "02:" + ":".join(f"{byte:02x}" for byte in digest[:5])


class HostNetwork:
    """The node's bridge and the VMs' tap devices, made and removed with iproute2's ``ip``."""

    def __init__(self, bridge: str, cidr: str, ip_binary: str = "ip") -> None:
        if not 1 <= len(bridge) <= 15 or "/" in bridge or " " in bridge:
            raise InvalidArgument(f"invalid bridge name {bridge!r} (1 to 15 characters)")
        self.bridge = bridge
        self.cidr = cidr
        self.ip_binary = ip_binary

    async def ensure_bridge(self, address: ipaddress.IPv4Interface) -> None:
        """The bridge, up, holding ``address``; made if missing, left alone if there."""
        if not await self._exists(self.bridge):
            await self._ip("link", "add", "name", self.bridge, "type", "bridge", ok="File exists")
        # Older iproute2 says "File exists" for an address already there, newer "already assigned".
        await self._ip(
            "addr", "add", str(address), "dev", self.bridge, ok=("File exists", "already assigned")
        )
        await self._ip("link", "set", self.bridge, "up")

    async def add_tap(self, name: str) -> None:
        if not await self._exists(name):
            await self._ip("tuntap", "add", "dev", name, "mode", "tap")
        await self._ip("link", "set", name, "master", self.bridge)
        await self._ip("link", "set", name, "up")

    async def remove_tap(self, name: str) -> None:
        if await self._exists(name):
            await self._ip("link", "del", name, ok="Cannot find device")

    async def _exists(self, name: str) -> bool:
        return Path("/sys/class/net", name).exists()

    async def _ip(self, *argv: str, ok: str | tuple[str, ...] = ()) -> None:
        """Run ``ip``; an error whose message holds one of ``ok`` means "already so"."""
        try:
            process = await asyncio.create_subprocess_exec(
                self.ip_binary,
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        except OSError as error:
            raise DriverError(f"cannot run {self.ip_binary}: {error.strerror or error}") from None
        _out, err = await process.communicate()
        message = err.decode(errors="replace").strip()
        accepted = (ok,) if isinstance(ok, str) else ok
        if process.returncode != 0 and not any(words in message for words in accepted):
            raise DriverError(f"ip {' '.join(argv)} failed: {message or process.returncode}")


class IpPool:
    """Guest addresses of one node's network, leased per VM and kept in a JSON file.

    The network's first host address is the bridge's (the guests' gateway); guests get the
    lowest free one after it. A file lock makes the lease safe across processes (an agent and
    a CLI tool, or two drivers over one state directory).
    """

    def __init__(self, path: Path, cidr: str) -> None:
        try:
            self.network = ipaddress.IPv4Network(cidr, strict=True)
        except ValueError as error:
            raise InvalidArgument(f"invalid guest network {cidr!r}: {error}") from None
        if self.network.num_addresses < 4:
            raise InvalidArgument(f"guest network {cidr} is too small")
        self.path = path

    @property
    def gateway(self) -> ipaddress.IPv4Interface:
        return ipaddress.IPv4Interface(
            f"{self.network.network_address + 1}/{self.network.prefixlen}"
        )

    def allocate(self, vm_id: str) -> ipaddress.IPv4Interface:
        """The VM's address: the one it holds, or the lowest free one."""
        with self._leases() as leases:
            held = leases.get(vm_id)
            if held is None:
                taken = set(leases.values())
                for host in list(self.network.hosts())[1:]:
                    if str(host) not in taken:
                        held = leases[vm_id] = str(host)
                        break
                else:
                    raise Unavailable(
                        f"no free guest address left in {self.network} ({len(leases)} leased)"
                    )
            return ipaddress.IPv4Interface(f"{held}/{self.network.prefixlen}")

    def release(self, vm_id: str) -> None:
        with self._leases() as leases:
            leases.pop(vm_id, None)

    def leases(self) -> dict[str, str]:
        with self._leases() as leases:
            return dict(leases)

    @contextlib.contextmanager
    def _leases(self) -> Iterator[dict[str, str]]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            data = read_json(self.path) or {}
            raw = data.get("leases")
            leases = (
                {str(k): str(v) for k, v in raw.items() if ipaddress.ip_address(v) in self.network}
                if isinstance(raw, dict)
                else {}
            )
            before = dict(leases)
            yield leases
            if leases != before or data.get("network") != str(self.network):
                write_json(self.path, {"network": str(self.network), "leases": leases})


def _short_run_dir(state_dir: Path) -> Path:
    """``state_dir/run`` if its socket paths fit in a sockaddr_un; else a short stable one."""
    preferred = state_dir / "run"
    if len(str(preferred / "00000000-0000-0000-0000-000000000000.sock")) <= _UNIX_PATH_MAX:
        return preferred
    digest = hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"multiverse-fc-{digest}"


def _config_json(vm: VMConfig) -> dict[str, Any]:
    return {
        "id": vm.id,
        "name": vm.name,
        "cpus": vm.cpus,
        "memory": vm.memory,
        "disk": vm.disk,
        "image": vm.image,
    }
