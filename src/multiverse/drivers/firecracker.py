"""MicroVMs with Firecracker: one ``firecracker`` process per VM, driven over its HTTP API.

Each VM lives in ``<state_dir>/vms/<uuid>/``:

- ``config.json``: the :class:`VMConfig` it was created with;
- ``rootfs.ext4``: its disk, a copy (reflinked where possible) of the image's ``rootfs.ext4``,
  or an empty ext4 file for kernel+initrd images (the "tiny" guest mounts it on /data);
- while it runs: ``vm.json`` (pid, process start time, tap, address) and ``firecracker.log``
  (the process' output, which carries the guest's serial console);
- ``ssh_host_key.pub``: the guest's SSH host key once known; the tiny guest announces it on
  its console, so it is checked from the first login (see :class:`ProcessDriver`).

The API socket is ``<run_dir>/<uuid>.sock``. The process runs as our child in its own session
(it outlives a killed agent, which adopts it by pid and start time, as the QEMU driver does).

Networking is the node's network service's (``worker/network.py``), as for QEMU: the agent
hands each boot a ready tap on the cluster network, with the MAC and address the guest must use
(``VMConfig.network``), and unplugs it after the VM stops. Firecracker has no user-mode network
of its own, so a VM without that attachment is refused: its node must run in bridge mode.

The guest learns its network and the node's SSH key from the kernel command line
(``boot_args``), the only channel Firecracker offers before the network is up:

- ``multiverse.network=<base64>``: the network config (address, gateway, DNS, MTU), as QEMU's
  guests read it from fw_cfg, and ``multiverse.hostname=<base64>``;
- ``multiverse.authorized_keys=<base64>``: root's authorized_keys line.

Exec, stats and sessions go over SSH to the guest's address (:mod:`multiverse.guest.ssh`).

Devices and power, as Firecracker has them on x86:

- virtio over MMIO, described by ACPI (Firecracker >= 1.8), unless the driver is made with
  ``enable_pci`` and Firecracker started with ``--enable-pci`` (>= 1.13): the guest must load
  the transport it is given (the tiny guest loads both ``virtio_mmio`` and ``virtio_pci``);
- an entropy device only when asked for (``PUT /entropy``): we ask, so that the guest's SSH
  server does not wait for the kernel's RNG;
- stop is ``SendCtrlAltDel``, a key press on the i8042: the guest's init reboots and, with
  ``reboot=k``, the reset ends the process. There is no ACPI power-off: after a ``poweroff``
  in the guest the process stays, and stop kills it after ``stop_timeout``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from multiverse.core.errors import (
    Conflict,
    DriverError,
    InvalidArgument,
    MultiverseError,
    NotFound,
    Unavailable,
)
from multiverse.core.model import Resources
from multiverse.core.sizes import MiB
from multiverse.drivers.base import NetworkAttachment, PowerState, VMConfig, VMStatus
from multiverse.drivers.images import ROOTFS_FILE, ImageCache
from multiverse.drivers.process import (
    LOG_TAIL,
    UNIX_PATH_MAX,
    ProcessDriver,
    pid_alive,
    tail,
    wait_exit,
)
from multiverse.drivers.rootfs import copy_rootfs, make_ext4

BINARY_ENV = "MULTIVERSE_FIRECRACKER"
NO_NETWORK = (
    "Firecracker VMs need the cluster network, and this node has none: run the worker as root "
    "(CAP_NET_ADMIN and /dev/net/tun) with --network-mode bridge or auto, or use --driver qemu"
)

# Firecracker's limits (machine-config: vcpu_count 1..32); 96 MiB is the tiny guest's floor.
MAX_CPUS = 32
MIN_MEMORY = 96 * MiB
MIN_DISK = 16 * MiB

# reboot=k: a guest reboot ends Firecracker, which has no reset; panic=1 so a panic does too.
BASE_BOOT_ARGS = "console=ttyS0 reboot=k panic=1 quiet"


class FirecrackerDriver(ProcessDriver):
    """MicroVMs as Firecracker processes on this host, each on the tap the agent gives it.

    The shared lifecycle is :class:`ProcessDriver`'s; this class configures and boots
    Firecracker over its API.
    """

    name = "firecracker"
    hypervisor = "Firecracker"
    max_cpus = MAX_CPUS
    min_memory = MIN_MEMORY
    min_disk = MIN_DISK
    disk_file = ROOTFS_FILE
    console_log = "firecracker.log"  # the process' output carries the serial console
    stopped_alone = "guest power-off, reboot or panic"
    install_hint = f"is Firecracker installed? set ${BINARY_ENV} to its path"
    spawn_error = Unavailable

    def __init__(
        self,
        state_dir: Path,
        images: ImageCache | Sequence[Path],
        capacity: Resources | None = None,
        *,
        binary: str | None = None,
        run_dir: Path | None = None,
        boot_args: str = BASE_BOOT_ARGS,
        boot_timeout: float = 120.0,
        stop_timeout: float = 20.0,
        api_timeout: float = 10.0,
        enable_pci: bool = False,
    ) -> None:
        """``binary``: the firecracker executable (default: $MULTIVERSE_FIRECRACKER, else PATH).

        ``run_dir``: where the API sockets go (default ``state_dir/run``, or a short directory
        under /tmp when that path would pass the 108-byte limit of unix socket paths).
        """
        super().__init__(
            state_dir, images, capacity, boot_timeout=boot_timeout, stop_timeout=stop_timeout
        )
        self.binary = (
            binary or os.environ.get(BINARY_ENV) or shutil.which("firecracker") or ("firecracker")
        )
        self.run_dir = run_dir or _short_run_dir(state_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.boot_args = boot_args
        self.api_timeout = api_timeout
        self.enable_pci = enable_pci

    # --- creating ------------------------------------------------------------------------

    def _image_files(self, image: str) -> tuple[Path, Path | None, Path | None]:
        """The image's kernel, and its initrd and root file system where it has them."""
        found = self._image(image)
        kernel = found.file("kernel")
        if kernel is None:
            raise NotFound(f"image {image!r} not found on this node: it has no kernel")
        return kernel, found.file("initrd"), found.file("rootfs")

    def _make_disk(self, vm: VMConfig, path: Path) -> None:
        """A copy of the image's root file system, or an empty ext4 for kernel+initrd images."""
        _kernel, _initrd, image_rootfs = self._image_files(vm.image)
        if image_rootfs is not None:
            copy_rootfs(image_rootfs, path, vm.disk)
        else:
            make_ext4(path, vm.disk, None, "data")

    # --- booting -------------------------------------------------------------------------

    async def _boot(self, vm: VMConfig) -> None:
        """Start Firecracker on the VM's tap, configure it, boot, wait for SSH.

        Any failure kills the process, so a failed launch leaves nothing running; the tap is
        the agent's to unplug.
        """
        network = vm.network
        if network is None:
            raise InvalidArgument(f"cannot start VM {vm.name}: {NO_NETWORK}")
        kernel, initrd, image_rootfs = self._image_files(vm.image)
        vm_dir = self._vm_dir(vm)
        await self._close_guest(vm.id)
        tap, address = network.tap, network.nic.ip
        process: subprocess.Popen[bytes] | None = None
        try:
            process = self._spawn(vm, tap, address)
            await self._wait_for_socket(vm, process)
            api = self._api(vm)
            await api.put(
                "/machine-config", {"vcpu_count": vm.cpus, "mem_size_mib": vm.memory // MiB}
            )
            boot_source: dict[str, Any] = {
                "kernel_image_path": str(kernel),
                "boot_args": self._kernel_args(vm, network, has_initrd=initrd is not None),
            }
            if initrd is not None:
                boot_source["initrd_path"] = str(initrd)
            await api.put("/boot-source", boot_source)
            await api.put(
                "/drives/rootfs",
                {
                    "drive_id": "rootfs",
                    "path_on_host": str(vm_dir / self.disk_file),
                    # Kernel+initrd images boot from RAM and mount the disk as data; images
                    # with a root file system boot from it.
                    "is_root_device": image_rootfs is not None and initrd is None,
                    "is_read_only": False,
                },
            )
            await api.put(
                "/network-interfaces/eth0",
                {"iface_id": "eth0", "host_dev_name": tap, "guest_mac": network.nic.mac},
            )
            await api.put("/entropy", {})
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
                        f"{process.poll()}):\n{tail(vm_dir / self.console_log, LOG_TAIL)}"
                    ) from None
                raise DriverError(
                    f"VM {vm.name} booted but its SSH at {address} did not answer within "
                    f"{self.boot_timeout:.0f} s; console:\n"
                    f"{tail(vm_dir / self.console_log, LOG_TAIL)}"
                ) from None
        except BaseException:
            if process is not None:
                with contextlib.suppress(MultiverseError):
                    await self._kill(vm, process.pid)
            await self._close_guest(vm.id)
            self._forget_runtime(vm)
            raise

    def _kernel_args(self, vm: VMConfig, network: NetworkAttachment, has_initrd: bool) -> str:
        """The guest's whole network config (gateway, DNS, MTU), as fw_cfg gives QEMU's."""
        public_key = self.key_path.with_suffix(".pub").read_text().strip()
        key = base64.b64encode((public_key + "\n").encode()).decode()
        config = base64.b64encode(network.guest_config().encode()).decode()
        hostname = base64.b64encode(vm.name.encode()).decode()
        network_args = f"multiverse.network={config} multiverse.hostname={hostname}"
        root = "" if has_initrd else " root=/dev/vda rw"
        return f"{self.boot_args}{root} {network_args} multiverse.authorized_keys={key}"

    def _spawn(self, vm: VMConfig, tap: str, ipv4: str) -> subprocess.Popen[bytes]:
        socket_path = self._control_socket(vm)
        socket_path.unlink(missing_ok=True)  # Firecracker refuses to start on a stale socket
        pci = ["--enable-pci"] if self.enable_pci else []
        return self._spawn_process(
            vm,
            [self.binary, "--api-sock", str(socket_path), "--id", vm.id, *pci],
            self._vm_dir(vm) / self.console_log,
            {"tap": tap, "ipv4": ipv4},
        )

    async def _wait_for_socket(self, vm: VMConfig, process: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + self.api_timeout
        while not self._control_socket(vm).exists():
            if process.poll() is not None or time.monotonic() > deadline:
                raise DriverError(
                    f"Firecracker of VM {vm.name} did not open its API socket: "
                    f"{tail(self._vm_dir(vm) / self.console_log, LOG_TAIL).strip()}"
                )
            await asyncio.sleep(0.02)

    # --- the ProcessDriver hooks ---------------------------------------------------------

    async def _boot_incomplete(self, vm: VMConfig) -> bool:
        """A process left configured but never started (an agent killed mid-boot)."""
        return await self._vmm_state(vm) != "Running"

    async def _shut_down(self, vm: VMConfig, pid: int) -> bool:
        """Ctrl+Alt+Del, then ``stop_timeout`` for the guest to power off."""
        with contextlib.suppress(MultiverseError):
            await self._api(vm).put("/actions", {"action_type": "SendCtrlAltDel"})
            return await wait_exit(pid, self.stop_timeout)
        return False

    def _control_socket(self, vm: VMConfig) -> Path:
        return self.run_dir / f"{vm.id}.sock"

    def _ssh_address(self, runtime: dict[str, Any]) -> tuple[str, int] | None:
        host = str(runtime.get("ipv4") or "")
        return (host, 22) if host else None

    async def _hypervisor_status(self, vm: VMConfig, ipv4: str) -> VMStatus:
        state = await self._vmm_state(vm)
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

    def _api(self, vm: VMConfig) -> FirecrackerAPI:
        return FirecrackerAPI(self._control_socket(vm), vm.name, self.api_timeout)


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


def _short_run_dir(state_dir: Path) -> Path:
    """``state_dir/run`` if its socket paths fit in a sockaddr_un; else a short stable one."""
    preferred = state_dir / "run"
    if len(str(preferred / "00000000-0000-0000-0000-000000000000.sock")) <= UNIX_PATH_MAX:
        return preferred
    digest = hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"multiverse-fc-{digest}"
