"""Real VMs with QEMU: ``qemu-system-x86_64`` processes controlled over QMP, reached over SSH.

Each VM lives in ``<state_dir>/vms/<uuid>/``:

- ``config.json``: the :class:`VMConfig` it was created with;
- ``disk.img``: its data disk, a sparse raw file formatted ext4 on the host (``mkfs.ext4``), so
  the guest mounts it at once and no qemu-img or partitioning is involved;
- ``hostname``, ``authorized_keys``, ``network``, ``user-data`` (0600, when given): the per-VM
  configuration the guest reads through fw_cfg (see :mod:`multiverse.guest.image`);
- ``ssh_host_key.pub``: the guest's SSH host key, once known (see :class:`ProcessDriver`);
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
import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient, QMPError

from multiverse.core.errors import DriverError, NotFound, Unavailable
from multiverse.core.files import write_private
from multiverse.core.model import Resources
from multiverse.core.sizes import MiB
from multiverse.drivers.base import PowerState, VMConfig, VMStatus
from multiverse.drivers.images import ImageCache
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
from multiverse.guest.image import BOOT_OK_MARKER, FW_CFG_PREFIX

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
_PORT_TAKEN = "Could not set up host forwarding rule"


class QemuDriver(ProcessDriver):
    """VMs as QEMU processes on this host (KVM when the host has it, TCG otherwise).

    The shared lifecycle is :class:`ProcessDriver`'s; this class boots QEMU with a forwarded
    SSH port, stops it over QMP and asks QMP for its state.
    """

    name = "qemu"
    hypervisor = "QEMU"
    max_cpus = MAX_CPUS
    min_memory = MIN_MEMORY
    min_disk = MIN_DISK
    disk_file = "disk.img"
    console_log = "serial.log"
    stopped_alone = "guest power-off, panic or QEMU exit"
    install_hint = "is qemu-system-x86 installed?"

    def __init__(
        self,
        state_dir: Path,
        images: ImageCache | Sequence[Path],
        capacity: Resources | None = None,
        *,
        qemu_binary: str = "qemu-system-x86_64",
        boot_timeout: float = 120.0,
        stop_timeout: float = 30.0,
    ) -> None:
        super().__init__(
            state_dir, images, capacity, boot_timeout=boot_timeout, stop_timeout=stop_timeout
        )
        self.qemu_binary = qemu_binary
        self.accel = choose_accel()
        self.kernel_cmdline = KERNEL_CMDLINE
        if self.accel.startswith("tcg"):
            self.kernel_cmdline += " " + TCG_KERNEL_CMDLINE

    # --- creating and booting ----------------------------------------------------------

    def image_files(self, image: str) -> tuple[Path, Path]:
        """The image's kernel and initrd."""
        found = self._image(image)
        kernel, initrd = found.file("kernel"), found.file("initrd")
        if kernel is None or initrd is None:
            raise NotFound(f"image {image!r} not found on this node: it has no kernel and initrd")
        return kernel, initrd

    def _make_disk(self, vm: VMConfig, path: Path) -> None:
        make_data_disk(path, vm.disk)

    async def _boot(self, vm: VMConfig) -> None:
        """Start QEMU and wait until the guest's SSH answers; on failure leave nothing running."""
        vm_dir = self._vm_dir(vm)
        kernel, initrd = self.image_files(vm.image)
        self.write_guest_config(vm)
        _rotate(vm_dir / "serial.log")
        await self._close_guest(vm.id)
        deadline = time.monotonic() + self.boot_timeout
        if vm.network is not None:  # on the cluster network: SSH to the guest's own address
            ip = vm.network.nic.ip
            process = self._spawn_process(
                vm,
                self.qemu_argv(vm, kernel, initrd, 0),
                vm_dir / "qemu.log",
                {"ssh_host": ip, "ssh_port": 22, "accel": self.accel, "ipv4": ip},
            )
            try:
                await self._wait_for_guest(vm, process, deadline)
            except BaseException:
                await self._kill(vm, process.pid)
                self._forget_runtime(vm)
                raise
            return
        for _attempt in range(5):
            port = self._free_port()
            process = self._spawn_process(
                vm,
                self.qemu_argv(vm, kernel, initrd, port),
                vm_dir / "qemu.log",
                {"ssh_port": port, "accel": self.accel, "ipv4": USER_NET_ADDRESS.split("/")[0]},
            )
            try:
                await self._wait_for_guest(vm, process, deadline)
                return
            except _PortTaken:
                continue  # someone took the port between our probe and QEMU's bind
            except BaseException:
                await self._kill(vm, process.pid)
                self._forget_runtime(vm)
                raise
        raise DriverError(f"VM {vm.name}: no free local port for its SSH forward after 5 tries")

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
            *self._nic_argv(vm, port),
            "-qmp", "unix:qmp.sock,server=on,wait=off",
        ]  # fmt: skip
        if self.accel.startswith("kvm"):
            argv += ["-cpu", "host"]
        for key in ("hostname", "authorized_keys", "network"):
            argv += ["-fw_cfg", f"name={FW_CFG_PREFIX}{key},file={key}"]
        if vm.user_data:
            argv += ["-fw_cfg", f"name={FW_CFG_PREFIX}user-data,file=user-data"]
        return argv

    def _nic_argv(self, vm: VMConfig, port: int) -> list[str]:
        """The tap the node's network service made (bridge mode), else user mode with the
        SSH port forward."""
        if vm.network is None:
            return [
                "-netdev", f"user,id=net0,hostfwd=tcp:127.0.0.1:{port}-:22",
                "-device", "virtio-net-pci,netdev=net0",
            ]  # fmt: skip
        return [
            "-netdev", f"tap,id=net0,ifname={vm.network.tap},script=no,downscript=no",
            "-device", f"virtio-net-pci,netdev=net0,mac={vm.network.nic.mac}",
        ]  # fmt: skip

    def write_guest_config(self, vm: VMConfig) -> None:
        vm_dir = self._vm_dir(vm)
        public_key = self.key_path.with_suffix(".pub").read_text().strip()
        (vm_dir / "hostname").write_text(vm.name + "\n")
        (vm_dir / "authorized_keys").write_text(public_key + "\n")
        (vm_dir / "network").write_text(guest_network_config(vm))
        if vm.user_data:  # may hold secrets
            write_private(vm_dir / "user-data", vm.user_data.encode())

    async def _wait_for_guest(
        self, vm: VMConfig, process: subprocess.Popen[bytes], deadline: float
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
        guest = self._guest(vm)  # at the port that _spawn_process just recorded
        try:
            await guest.wait_until_ready(
                max(deadline - time.monotonic(), 1.0), alive=lambda: pid_alive(process.pid)
            )
        except Unavailable:  # a refused host key is not a slow boot: it goes up as it is
            if not pid_alive(process.pid):
                self._raise_exited(vm, process)
            raise DriverError(
                f"VM {vm.name} booted but its SSH did not answer within "
                f"{self.boot_timeout:.0f} s; console:\n{tail(vm_dir / 'serial.log', LOG_TAIL)}"
            ) from None
        runtime = read_json(vm_dir / "vm.json") or {}
        if not runtime.get("ipv4"):  # else known from the start: one command less to boot
            runtime["ipv4"] = await guest.ipv4()
            write_json(vm_dir / "vm.json", runtime)

    def _raise_exited(self, vm: VMConfig, process: subprocess.Popen[bytes]) -> None:
        vm_dir = self._vm_dir(vm)
        qemu_log = tail(vm_dir / "qemu.log", LOG_TAIL).strip()
        if _PORT_TAKEN in qemu_log:
            raise _PortTaken
        raise DriverError(
            f"QEMU for VM {vm.name} exited during boot (code {process.returncode}): "
            f"{qemu_log or '(no message)'}\nconsole:\n{tail(vm_dir / 'serial.log', LOG_TAIL)}"
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

    # --- the ProcessDriver hooks ---------------------------------------------------------

    async def _shut_down(self, vm: VMConfig, pid: int) -> bool:
        """ACPI power button first, then QMP quit; SIGKILL is left to the caller."""
        with contextlib.suppress(DriverError):
            await self._qmp(vm, "system_powerdown")
            if await wait_exit(pid, self.stop_timeout):
                return True
        with contextlib.suppress(DriverError):
            await self._qmp(vm, "quit")
            if await wait_exit(pid, 5.0):
                return True
        return False

    def _control_socket(self, vm: VMConfig) -> Path:
        return self._vm_dir(vm) / "qmp.sock"

    def _ssh_address(self, runtime: dict[str, Any]) -> tuple[str, int] | None:
        port = int(runtime.get("ssh_port", 0))
        return (str(runtime.get("ssh_host") or "127.0.0.1"), port) if port else None

    async def _hypervisor_status(self, vm: VMConfig, ipv4: str) -> VMStatus:
        answer = await self._qmp(vm, "query-status")
        qemu_state = answer.get("status", "") if isinstance(answer, dict) else ""
        message = "" if qemu_state == "running" else f"QEMU reports the VM as {qemu_state!r}"
        return VMStatus(PowerState.RUNNING, ipv4, message=message)

    async def pause(self, vm: VMConfig) -> None:
        await self._qmp(vm, "stop")

    async def resume(self, vm: VMConfig) -> None:
        await self._qmp(vm, "cont")

    async def reset(self, vm: VMConfig) -> None:
        await self._qmp(vm, "system_reset")

    async def throttle_disk(self, vm: VMConfig, iops: int) -> None:
        # The data disk is the first virtio drive; QEMU names it "virtio0". All six limits are
        # required by the command; 0 means unlimited.
        limits = {key: 0 for key in ("bps", "bps_rd", "bps_wr", "iops_rd", "iops_wr")}
        await self._qmp(vm, "block_set_io_throttle", {"device": "virtio0", "iops": iops, **limits})

    async def _qmp(
        self, vm: VMConfig, command: str, arguments: dict[str, Any] | None = None,
        timeout: float = 5.0,
    ) -> Any:  # fmt: skip
        """Run one QMP command on a fresh connection; QEMU's monitor serves one client at once,
        and a connection held open would lock out an agent that adopts the VM."""
        sock_path = self._control_socket(vm)
        client = QMPClient(f"multiverse-{vm.name}")
        try:
            sock = await asyncio.wait_for(asyncio.to_thread(_connect_unix, sock_path), timeout)
            await asyncio.wait_for(client.connect(sock), timeout)
            return await asyncio.wait_for(client.execute(command, arguments), timeout)
        except (OSError, QMPError, TimeoutError) as error:
            raise DriverError(
                f"QEMU monitor of VM {vm.name} did not answer {command}: "
                f"{str(error) or type(error).__name__}"
            ) from None
        finally:
            with contextlib.suppress(Exception):
                await client.disconnect()


class _PortTaken(Exception):
    """QEMU could not bind the SSH forward's port: try another."""


def guest_network_config(vm: VMConfig) -> str:
    """The ``network`` fw_cfg file: the cluster address, or QEMU user mode's fixed one."""
    if vm.network is None:
        return f"address={USER_NET_ADDRESS}\ngateway={USER_NET_GATEWAY}\ndns={USER_NET_DNS}\n"
    return vm.network.guest_config()


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
        if len(str(path)) <= UNIX_PATH_MAX:
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
