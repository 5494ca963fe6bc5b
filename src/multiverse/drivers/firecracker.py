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
import fcntl
import hashlib
import ipaddress
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
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
from multiverse.drivers.base import PowerState, VMConfig, VMStatus
from multiverse.drivers.images import ROOTFS_FILE, ImageCache
from multiverse.drivers.process import (
    LOG_TAIL,
    UNIX_PATH_MAX,
    ProcessDriver,
    pid_alive,
    read_json,
    tail,
    wait_exit,
    write_json,
)
from multiverse.drivers.rootfs import copy_rootfs, make_ext4

BINARY_ENV = "MULTIVERSE_FIRECRACKER"
DEFAULT_BRIDGE = "mvbr0"
DEFAULT_CIDR = "172.31.90.0/24"

# Firecracker's limits (machine-config: vcpu_count 1..32); 96 MiB is the tiny guest's floor.
MAX_CPUS = 32
MIN_MEMORY = 96 * MiB
MIN_DISK = 16 * MiB

# reboot=k: a guest reboot ends Firecracker, which has no reset; panic=1 so a panic does too.
BASE_BOOT_ARGS = "console=ttyS0 reboot=k panic=1 quiet"


class FirecrackerDriver(ProcessDriver):
    """MicroVMs as Firecracker processes on this host, on tap devices of one bridge.

    The shared lifecycle is :class:`ProcessDriver`'s; this class configures and boots
    Firecracker over its API, plugs a tap and leases an address per VM and gives both back.
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
        bridge: str = DEFAULT_BRIDGE,
        cidr: str = DEFAULT_CIDR,
        ip_binary: str = "ip",
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
        self.network = HostNetwork(bridge, cidr, ip_binary)
        self.pool = IpPool(state_dir / "ip-pool.json", cidr)
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
        """Lease an address, plug a tap, start Firecracker, configure it, boot, wait for SSH.

        Any failure undoes all of it: the process killed, the tap removed, the address given
        back, so a failed launch leaks nothing.
        """
        kernel, initrd, image_rootfs = self._image_files(vm.image)
        vm_dir = self._vm_dir(vm)
        await self._close_guest(vm.id)
        # On the cluster network the node's network service made the tap and leased the
        # address; else this driver's own bridge and pool serve.
        shared = vm.network
        tap = shared.tap if shared else tap_name(vm.id)
        mac = shared.nic.mac if shared else mac_address(vm.id)
        process: subprocess.Popen[bytes] | None = None
        try:
            if shared:
                address = ipaddress.IPv4Interface(shared.nic.address)
            else:
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
                    "path_on_host": str(vm_dir / self.disk_file),
                    # Kernel+initrd images boot from RAM and mount the disk as data; images
                    # with a root file system boot from it.
                    "is_root_device": image_rootfs is not None and initrd is None,
                    "is_read_only": False,
                },
            )
            await api.put(
                "/network-interfaces/eth0",
                {"iface_id": "eth0", "host_dev_name": tap, "guest_mac": mac},
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
                    f"VM {vm.name} booted but its SSH at {address.ip} did not answer within "
                    f"{self.boot_timeout:.0f} s; console:\n"
                    f"{tail(vm_dir / self.console_log, LOG_TAIL)}"
                ) from None
        except BaseException:
            if process is not None:
                with contextlib.suppress(MultiverseError):
                    await self._kill(vm, process.pid)
            await self._close_guest(vm.id)
            self._forget_runtime(vm)
            if not shared:  # the shared tap is the agent's to detach
                with contextlib.suppress(MultiverseError):
                    await self.network.remove_tap(tap)
                self.pool.release(vm.id)
            raise

    def _kernel_args(self, vm: VMConfig, address: ipaddress.IPv4Interface, has_initrd: bool) -> str:
        public_key = self.key_path.with_suffix(".pub").read_text().strip()
        key = base64.b64encode((public_key + "\n").encode()).decode()
        network = f"ip={address.ip}::{self.pool.gateway.ip}:{address.netmask}:{vm.name}:eth0:off"
        if vm.network is not None:  # the whole config (gateway, DNS, MTU), as fw_cfg has it
            config = base64.b64encode(vm.network.guest_config().encode()).decode()
            network = (
                f"multiverse.network={config} multiverse.hostname="
                + base64.b64encode(vm.name.encode()).decode()
            )
        root = "" if has_initrd else " root=/dev/vda rw"
        return f"{self.boot_args}{root} {network} multiverse.authorized_keys={key}"

    def _spawn(self, vm: VMConfig, tap: str, ipv4: str) -> subprocess.Popen[bytes]:
        socket_path = self._control_socket(vm)
        socket_path.unlink(missing_ok=True)  # Firecracker refuses to start on a stale socket
        pci = ["--enable-pci"] if self.enable_pci else []
        return self._spawn_process(
            vm,
            [self.binary, "--api-sock", str(socket_path), "--id", vm.id, *pci],
            self._vm_dir(vm) / self.console_log,
            {"tap": tap, "ipv4": ipv4, "shared": vm.network is not None},
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

    async def _after_stop(self, vm: VMConfig) -> None:
        """Unplug the VM's tap (the one ``vm.json`` names, else the one its id gives)."""
        runtime = read_json(self._vm_dir(vm) / "vm.json") or {}
        if vm.network is not None or runtime.get("shared"):
            return  # the cluster network's tap: the agent detaches it
        await self.network.remove_tap(str(runtime.get("tap") or tap_name(vm.id)))

    def _after_delete(self, vm: VMConfig) -> None:
        """Give the VM's address back to the pool."""
        self.pool.release(vm.id)

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
        """A tap owned by the user that runs Firecracker (us: we start it), so that Firecracker
        can open it without CAP_NET_ADMIN."""
        if not await self._exists(name):
            await self._ip("tuntap", "add", "dev", name, "mode", "tap", "user", str(os.geteuid()))
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
    if len(str(preferred / "00000000-0000-0000-0000-000000000000.sock")) <= UNIX_PATH_MAX:
        return preferred
    digest = hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"multiverse-fc-{digest}"
