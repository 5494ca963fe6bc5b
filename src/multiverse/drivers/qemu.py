"""Real VMs with QEMU: ``qemu-system-x86_64`` processes controlled over QMP, reached over SSH.

Each VM lives in ``<state_dir>/vms/<uuid>/``:

- ``config.json``: the :class:`VMConfig` it was created with;
- ``disk.img``: its disk. For a ``kernel+initrd`` image (the tiny guest) a data disk: a sparse
  raw file formatted ext4 on the host (``mkfs.ext4``), so the guest mounts it at once and no
  qemu-img or partitioning is involved. For a ``disk`` image (the Debian guest) a qcow2
  overlay on ``base.img`` (the image's disk, hard-linked: see :func:`hold_base`), grown to the
  VM's disk size: the VM's whole root file system, kept across stop/start; deleting the VM
  deletes the overlay and its link only;
- ``hostname``, ``authorized_keys``, ``network``, ``user-data`` (0600, when given): the per-VM
  configuration the tiny guest reads through fw_cfg (see :mod:`multiverse.guest.image`);
  ``seed.iso`` (0600): the same for a ``disk`` image's cloud-init (its NoCloud seed, see
  :mod:`multiverse.guest.cloudinit`), with the user's cloud-init file;
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
import hashlib
import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient, QMPError

from multiverse.core.errors import DriverError, InvalidArgument, NotFound, Unavailable
from multiverse.core.files import write_private
from multiverse.core.model import Resources
from multiverse.core.sizes import MiB, format_size
from multiverse.drivers.base import PowerState, VMConfig, VMStatus
from multiverse.drivers.images import CachedImage, ImageCache
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
from multiverse.guest.cloudinit import (
    SEED_NOCLOUD,
    GuestNetwork,
    Seed,
    user_data,
    write_seed_iso,
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
SEED_FILE = "seed.iso"
BASE_FILE = "base.img"  # a disk image's base disk, held by the VM (see hold_base)
# A guest configured by cloud-init answers SSH before cloud-init has run the user's steps;
# the VM counts as running once this returns, as Multipass waits for cloud-init too.
CLOUD_INIT_WAIT = ("cloud-init", "status", "--wait")
# systemd and cloud-init take ~1 min to that point under TCG (46-58 s measured on 2 cores, and
# 2-4 min while a load of 10 shared them), 20 times the tiny guest: such images get this long.
CLOUD_INIT_BOOT_TIMEOUT = 600.0


@dataclass(frozen=True)
class BootFiles:
    """What QEMU boots for an image: its kernel and initrd, and for a ``disk`` image the base
    disk that instances overlay (from the ``boot`` section of the image's manifest)."""

    kernel: Path
    initrd: Path
    cmdline: str = ""  # the image's part of the kernel command line (root=...)
    disk: Path | None = None
    disk_format: str = ""
    cloud_init: bool = False  # wants a NoCloud seed, and waiting for cloud-init at boot


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

    def _validate(self, vm: VMConfig) -> None:
        super()._validate(vm)
        user_data(vm.user_data, ())  # a broken cloud-config fails the launch, not the boot
        found = self.image_cache.lookup(vm.image)
        # An image not pulled to this node yet is checked by create, after the agent's pull
        # (create validates first): a qcow2 disk's virtual size is only known from the file.
        boot = self._boot_files(found) if found is not None else None
        if boot is not None and boot.disk is not None:
            base = disk_virtual_size(boot.disk, boot.disk_format)
            if vm.disk < base:
                raise InvalidArgument(
                    f"disk {format_size(vm.disk)} is smaller than image {vm.image}'s own "
                    f"disk ({format_size(base)})"
                )

    def boot_files(self, image: str) -> BootFiles:
        """The image's boot files, as its manifest's ``boot`` hints name them."""
        return self._boot_files(self._image(image))

    def _boot_files(self, found: CachedImage) -> BootFiles:
        kernel, initrd = found.file("kernel"), found.file("initrd")
        if kernel is None or initrd is None:
            raise NotFound(
                f"image {found.name!r} not found on this node: it has no kernel and initrd"
            )
        disk = found.file("disk")
        if found.boot.get("disk") and disk is None:
            raise NotFound(f"image {found.name!r} not found on this node: it has no disk")
        return BootFiles(
            kernel=kernel,
            initrd=initrd,
            cmdline=found.boot.get("cmdline", ""),
            disk=disk,
            disk_format=found.boot.get("format", "qcow2"),
            cloud_init=found.boot.get("seed") == SEED_NOCLOUD,
        )

    def _make_disk(self, vm: VMConfig, path: Path) -> None:
        boot = self.boot_files(vm.image)
        if boot.disk is None:
            make_data_disk(path, vm.disk)
        else:
            base = path.with_name(BASE_FILE)
            hold_base(boot.disk, base)
            make_overlay(path, base, boot.disk_format, vm.disk)

    async def _boot(self, vm: VMConfig) -> None:
        """Start QEMU and wait until the guest's SSH answers; on failure leave nothing running."""
        vm_dir = self._vm_dir(vm)
        boot = self.boot_files(vm.image)
        self.write_guest_config(vm)
        if boot.cloud_init:
            await asyncio.to_thread(write_seed_iso, self.seed(vm), vm_dir / SEED_FILE)
        _rotate(vm_dir / "serial.log")
        await self._close_guest(vm.id)
        timeout = max(self.boot_timeout, CLOUD_INIT_BOOT_TIMEOUT if boot.cloud_init else 0.0)
        deadline = time.monotonic() + timeout
        if vm.network is not None:  # on the cluster network: SSH to the guest's own address
            ip = vm.network.nic.ip
            process = self._spawn_process(
                vm,
                self.qemu_argv(vm, boot, 0),
                vm_dir / "qemu.log",
                {"ssh_host": ip, "ssh_port": 22, "accel": self.accel, "ipv4": ip},
            )
            try:
                await self._wait_for_guest(vm, process, deadline)
                if boot.cloud_init:
                    await self._wait_for_cloud_init(vm, deadline)
            except BaseException:
                await self._kill(vm, process.pid)
                self._forget_runtime(vm)
                raise
            return
        for _attempt in range(5):
            port = self._free_port()
            process = self._spawn_process(
                vm,
                self.qemu_argv(vm, boot, port),
                vm_dir / "qemu.log",
                {"ssh_port": port, "accel": self.accel, "ipv4": USER_NET_ADDRESS.split("/")[0]},
            )
            try:
                await self._wait_for_guest(vm, process, deadline)
                if boot.cloud_init:
                    await self._wait_for_cloud_init(vm, deadline)
                return
            except _PortTaken:
                continue  # someone took the port between our probe and QEMU's bind
            except BaseException:
                await self._kill(vm, process.pid)
                self._forget_runtime(vm)
                raise
        raise DriverError(f"VM {vm.name}: no free local port for its SSH forward after 5 tries")

    def qemu_argv(self, vm: VMConfig, boot: BootFiles, port: int) -> list[str]:
        # Paths inside the VM directory are relative (QEMU runs there): that keeps the unix
        # socket's path under the 108-byte limit however deep the state directory is.
        disk_format = "raw" if boot.disk is None else "qcow2"  # a data disk, or an overlay
        argv = [
            self.qemu_binary,
            "-name", _escape(vm.name),
            "-machine", "pc",
            "-accel", self.accel,
            "-smp", str(vm.cpus),
            "-m", f"{vm.memory // MiB}M",
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-kernel", _escape(str(boot.kernel)),
            "-initrd", _escape(str(boot.initrd)),
            "-append", f"{boot.cmdline} {self.kernel_cmdline}".strip(),
            "-chardev", "file,id=console,path=serial.log",
            "-serial", "chardev:console",
            # Without an entropy source dropbear waits ~1 s for the kernel's RNG to be ready.
            "-device", "virtio-rng-pci",
            # The first virtio disk: /dev/vda, the root of a disk image.
            "-drive", f"file=disk.img,format={disk_format},if=virtio,cache=writeback,discard=unmap",
            *self._nic_argv(vm, port),
            "-qmp", "unix:qmp.sock,server=on,wait=off",
        ]  # fmt: skip
        if self.accel.startswith("kvm"):
            argv += ["-cpu", "host"]
        if boot.cloud_init:
            argv += [
                "-drive", f"file={SEED_FILE},format=raw,if=virtio,readonly=on",
                # The channel the image's qemu-guest-agent serves on.
                "-device", "virtio-serial-pci",
                "-chardev", "socket,id=qga,path=qga.sock,server=on,wait=off",
                "-device", "virtserialport,chardev=qga,name=org.qemu.guest_agent.0",
            ]  # fmt: skip
        for key in ("hostname", "authorized_keys", "network"):
            argv += ["-fw_cfg", f"name={FW_CFG_PREFIX}{key},file={key}"]
        if vm.user_data and not boot.cloud_init:  # cloud-init reads it from the seed
            argv += ["-fw_cfg", f"name={FW_CFG_PREFIX}user-data,file=user-data"]
        return argv

    def _nic_argv(self, vm: VMConfig, port: int) -> list[str]:
        """The tap the node's network service made (bridge mode), else user mode with the
        SSH port forward."""
        if vm.network is None:
            return [
                "-netdev", f"user,id=net0,hostfwd=tcp:127.0.0.1:{port}-:22",
                "-device", f"virtio-net-pci,netdev=net0,mac={self.guest_network(vm).mac}",
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

    def guest_network(self, vm: VMConfig) -> GuestNetwork:
        """The guest's NIC as cloud-init sets it: its cluster address, else QEMU's user-mode
        network (the same address for every VM, a MAC of its own)."""
        if vm.network is None:
            return GuestNetwork(
                USER_NET_ADDRESS, USER_NET_GATEWAY, (USER_NET_DNS,), guest_mac(vm.id)
            )
        nic = vm.network.nic
        return GuestNetwork(
            nic.address, nic.gateway, (nic.dns,) if nic.dns else (), nic.mac,
            search=(nic.domain,) if nic.domain else (), mtu=vm.network.mtu,
        )  # fmt: skip

    def seed(self, vm: VMConfig) -> Seed:
        """The cloud-init seed of a VM booting a ``disk`` image."""
        public_key = self.key_path.with_suffix(".pub").read_text().strip()
        return Seed(
            instance_id=vm.id,
            hostname=vm.name,
            authorized_keys=(public_key,),
            user_data=vm.user_data,
            network=self.guest_network(vm),
        )

    async def _wait_for_cloud_init(self, vm: VMConfig, deadline: float) -> None:
        """Return once cloud-init has finished in the guest (its errors are the user's to
        read in the guest's log: the VM runs either way)."""
        try:
            await self._guest(vm).run(CLOUD_INIT_WAIT, timeout=max(deadline - time.monotonic(), 1))
        except Unavailable:
            raise DriverError(
                f"VM {vm.name}: cloud-init did not finish before the boot timeout; console:\n"
                f"{tail(self._vm_dir(vm) / 'serial.log', LOG_TAIL)}"
            ) from None

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

    def command(partial: Path) -> list[str]:
        with partial.open("wb") as file:
            file.truncate(size)
        return [mkfs, "-q", "-F", "-L", "data", "-E", "lazy_itable_init=1,lazy_journal_init=1",
                str(partial)]  # fmt: skip

    _make_file(path, command)


def guest_mac(vm_id: str) -> str:
    """A stable MAC per VM in QEMU's locally administered 52:54:00 range: the guest's network
    config names its NIC by it."""
    digest = hashlib.sha256(vm_id.encode()).digest()
    return "52:54:00:" + ":".join(f"{byte:02x}" for byte in digest[:3])


def hold_base(image_disk: Path, base: Path) -> None:
    """Give the VM its own name for its base disk: a hard link to the image's disk (a copy
    across file systems).

    Why: an overlay is only valid on the very bytes it was made on. Rebuilding or re-pulling
    the image replaces its files; the VM keeps the old ones through its link, where a path into
    the image directory would silently give it a different disk under its blocks.
    """
    partial = base.with_name(base.name + ".part")
    partial.unlink(missing_ok=True)
    try:
        os.link(image_disk, partial)
    except OSError:
        shutil.copyfile(image_disk, partial)
    partial.rename(base)


def make_overlay(path: Path, base: Path, base_format: str, size: int) -> None:
    """A qcow2 file of ``size`` bytes that reads ``base`` and keeps every write itself.

    The base is recorded by its name relative to the overlay (both are in the VM's directory),
    so the VM's directory may move.
    """
    relative = os.path.relpath(base, path.parent)
    _make_file(
        path,
        lambda partial: ["qemu-img", "create", "-q", "-f", "qcow2", "-F", base_format,
                         "-b", relative, str(partial), str(size)],
    )  # fmt: skip


def _make_file(path: Path, command: Callable[[Path], Sequence[str]]) -> None:
    """Run the command ``command(partial)`` gives, which writes the file at ``partial``, then
    move it to ``path``: a failure or a crash leaves no half-made disk under its real name."""
    partial = path.with_name(path.name + ".part")
    argv = command(partial)
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        partial.unlink(missing_ok=True)
        raise DriverError(f"{Path(argv[0]).name} failed: {result.stderr.strip()}")
    partial.rename(path)


def disk_virtual_size(path: Path, disk_format: str) -> int:
    """The size a disk image shows its guest (qcow2's virtual size, not its file's size)."""
    result = subprocess.run(
        ["qemu-img", "info", "--output", "json", "-f", disk_format, str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    try:
        return int(json.loads(result.stdout)["virtual-size"])
    except (ValueError, KeyError, TypeError):
        raise DriverError(
            f"qemu-img cannot read {path}: {result.stderr.strip() or result.stdout}"
        ) from None


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
