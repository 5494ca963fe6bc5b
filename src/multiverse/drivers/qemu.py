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
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qemu.qmp import EventListener, QMPClient, QMPError

from multiverse.core.errors import Conflict, DriverError, InvalidArgument, NotFound, Unavailable
from multiverse.core.files import write_private
from multiverse.core.model import IncomingEndpoint, LiveProgress, Resources
from multiverse.core.sizes import MiB, format_size
from multiverse.drivers.base import PowerState, VMConfig, VMStatus
from multiverse.drivers.images import CachedImage, ImageCache
from multiverse.drivers.process import (
    HOST_KEY_FILE,
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

# Live moves: QEMU object, node, job and export names (one live move per VM at a time).
_TLS_ID = "mv-tls"
_NBD_NODE = "mv-nbd"
_MIRROR_JOB = "mv-mirror"
_EXPORT = "mv-disk"
_DRIVE = "virtio0"  # the first virtio -drive: the VM's disk
_INCOMING = "incoming"  # vm.json: QEMU waits for a live move's state
_LIVE_PORTS = "live_ports"  # vm.json: the ports an incoming QEMU listens on
INCOMING_MESSAGE = "waiting for a live move to hand the VM over"
# The longest pause the final stop-and-copy may cost; QEMU's default is 300 ms as well, stated
# here because the moves' promise depends on it.
DOWNTIME_LIMIT_MS = 300
MAX_BANDWIDTH = 10 * 1024**3  # bytes/s: no throttle (QEMU's default caps it at 128 MiB/s)
# A QMP command of a live move may wait this long: a loaded host starves QEMU's main loop.
_LIVE_TIMEOUT = 30.0
_POLL = 0.02  # seconds between QMP polls of a migration: the switch-over waits on it
_MIGRATING = {"setup", "active", "pre-switchover", "device", "cancelling", "wait-unplug",
              "postcopy-active"}  # fmt: skip


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
            process = self._spawn_process(
                vm, self.qemu_argv(vm, boot, 0), vm_dir / "qemu.log", self._runtime(vm, 0)
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
                vm, self.qemu_argv(vm, boot, port), vm_dir / "qemu.log", self._runtime(vm, port)
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

    def _runtime(self, vm: VMConfig, port: int) -> dict[str, Any]:
        """What ``vm.json`` records of a QEMU's guest: where its SSH is, its address."""
        if vm.network is not None:  # on the cluster network: SSH to the guest's own address
            ip = vm.network.nic.ip
            return {"ssh_host": ip, "ssh_port": 22, "accel": self.accel, "ipv4": ip}
        return {"ssh_port": port, "accel": self.accel, "ipv4": USER_NET_ADDRESS.split("/")[0]}

    def _free_port(self, host: str = "127.0.0.1", taken: frozenset[int] = frozenset()) -> int:
        """A port on ``host`` nobody listens on now and none of our running VMs uses."""
        ours = {
            port
            for runtime in (read_json(path) for path in self.vms_dir.glob("*/vm.json"))
            if runtime
            for port in (runtime.get("ssh_port"), *runtime.get(_LIVE_PORTS, ()))
        }
        for _ in range(50):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                probe.bind((host, 0))
                port: int = probe.getsockname()[1]
            if port not in ours and port not in taken:
                return port
        raise DriverError(f"no free port on {host}")

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
        if (read_json(self._vm_dir(vm) / "vm.json") or {}).get(_INCOMING):
            # Not the VM yet: its source runs it until the move lets this one run on.
            return VMStatus(PowerState.STOPPED, message=INCOMING_MESSAGE)
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

    # --- live moves (base.LiveMigratable) -----------------------------------------------
    #
    # The target starts QEMU with the source's very argv plus ``-incoming defer -S`` on an
    # empty disk of the same size (an empty overlay on the same base for a disk image), and
    # exports that disk over NBD. The source mirrors its disk into the export, waits for the
    # mirror to be in sync, then migrates memory and devices with ``pause-before-switchover``:
    # once the source is paused, the mirror is ended in sync (block-job-cancel after READY),
    # the migration finishes, and the target is let run (``cont``). Both channels run over
    # TLS with the nodes' cluster certificates (QEMU's tls-creds-x509, peers verified).

    async def prepare_incoming(self, vm: VMConfig, host: str, tls_dir: Path) -> IncomingEndpoint:
        async with self._lock(vm.id):
            self._validate(vm)
            await self._remove(vm)  # a retried move starts clean
            for attempt in range(3):
                self._vm_dir(vm).mkdir(parents=True)
                try:
                    return await self._prepare_incoming(vm, host, tls_dir)
                except DriverError as error:
                    await self._remove(vm)
                    # Someone took a port between our probe and QEMU's bind: try others.
                    if attempt == 2 or "in use" not in error.message:
                        raise
                except BaseException:
                    await self._remove(vm)
                    raise
            raise AssertionError("unreachable")

    async def _prepare_incoming(self, vm: VMConfig, host: str, tls_dir: Path) -> IncomingEndpoint:
        vm_dir = self._vm_dir(vm)
        boot = self.boot_files(vm.image)
        write_json(vm_dir / "config.json", {key: getattr(vm, key) for key in (
            "id", "name", "cpus", "memory", "disk", "image")})  # fmt: skip
        await asyncio.to_thread(self._make_incoming_disk, vm, vm_dir / self.disk_file, boot)
        self.write_guest_config(vm)
        if boot.cloud_init:
            await asyncio.to_thread(write_seed_iso, self.seed(vm), vm_dir / SEED_FILE)
        ssh_port = 0 if vm.network is not None else self._free_port()
        nbd_port = self._free_port(host, frozenset({ssh_port}))
        migration_port = self._free_port(host, frozenset({ssh_port, nbd_port}))
        runtime = {**self._runtime(vm, ssh_port), _INCOMING: True,
                   _LIVE_PORTS: [nbd_port, migration_port]}  # fmt: skip
        argv = [*self.qemu_argv(vm, boot, ssh_port), "-incoming", "defer", "-S"]
        process = self._spawn_process(vm, argv, vm_dir / "qemu.log", runtime)
        deadline = time.monotonic() + self.boot_timeout
        while True:  # until its monitor answers
            if process.poll() is not None or not pid_alive(process.pid):
                self._raise_exited(vm, process)
            if self._control_socket(vm).exists():
                try:
                    async with self._monitor(vm, _LIVE_TIMEOUT) as qmp:
                        await self._listen_incoming(qmp, vm, host, tls_dir, nbd_port,
                                                    migration_port)  # fmt: skip
                    break
                except DriverError as error:
                    if "a connection" not in error.message or time.monotonic() > deadline:
                        raise
            await asyncio.sleep(0.01)
        public_key = self.key_path.with_suffix(".pub").read_text().strip()
        return IncomingEndpoint(host, nbd_port, migration_port, login_key=public_key)

    def _make_incoming_disk(self, vm: VMConfig, path: Path, boot: BootFiles) -> None:
        """An empty disk the mirror fills: sparse raw of the data disk's size, or an empty
        overlay on the same base (the mirror then sends only what the VM wrote)."""
        if boot.disk is not None:
            self._make_disk(vm, path)
            return
        with path.open("wb") as file:
            file.truncate(vm.disk)

    async def _listen_incoming(
        self, qmp: Monitor, vm: VMConfig, host: str, tls_dir: Path, nbd_port: int,
        migration_port: int,
    ) -> None:  # fmt: skip
        await qmp("object-add", _tls_object("server", tls_dir))
        node = await self._disk_node(qmp, vm)
        address = {"type": "inet", "data": {"host": host, "port": str(nbd_port)}}
        await qmp("nbd-server-start", {"addr": address, "tls-creds": _TLS_ID})
        await qmp("block-export-add", {
            "type": "nbd", "id": _EXPORT, "node-name": node, "name": _EXPORT, "writable": True,
        })  # fmt: skip
        await qmp("migrate-set-parameters", {"tls-creds": _TLS_ID})
        await qmp("migrate-incoming", {"uri": f"tcp:{_uri_host(host)}:{migration_port}"})

    async def _disk_node(self, qmp: Monitor, vm: VMConfig) -> str:
        """The block node under the first virtio drive (QEMU names auto-made nodes itself)."""
        for device in await qmp("query-block"):
            if device.get("device") == _DRIVE and device.get("inserted"):
                return str(device["inserted"]["node-name"])
        raise DriverError(f"VM {vm.name} has no disk {_DRIVE}")

    async def migrate_out(
        self, vm: VMConfig, to: IncomingEndpoint, tls_dir: Path,
        progress: Callable[[LiveProgress], None],
    ) -> LiveProgress:  # fmt: skip
        async with self._lock(vm.id):
            self._require_running(vm)
            # The target's agent must reach the guest it will hold: its key goes in while
            # the disk mirrors, and before the hand-over.
            letting_in = asyncio.ensure_future(self._let_in(vm, to.login_key))
            try:
                async with self._monitor(vm, _LIVE_TIMEOUT) as qmp:
                    await self._abort_out(qmp, vm)  # what an earlier attempt left
                    try:
                        return await self._send(qmp, vm, to, tls_dir, progress, letting_in)
                    except BaseException:
                        await asyncio.shield(self._abort_out(qmp, vm))
                        raise
            finally:
                letting_in.cancel()

    async def _send(
        self, qmp: Monitor, vm: VMConfig, to: IncomingEndpoint, tls_dir: Path,
        progress: Callable[[LiveProgress], None], letting_in: Awaitable[None],
    ) -> LiveProgress:  # fmt: skip
        await qmp("object-add", _tls_object("client", tls_dir))
        server = {"type": "inet", "host": to.host, "port": str(to.nbd_port)}
        nbd: dict[str, Any] = {"driver": "nbd", "node-name": _NBD_NODE, "server": server,
                               "export": _EXPORT, "tls-creds": _TLS_ID}  # fmt: skip
        if to.tls_hostname:
            nbd["tls-hostname"] = to.tls_hostname
        await qmp("blockdev-add", nbd)
        overlay = self.boot_files(vm.image).disk is not None  # the base is on the target
        await qmp("blockdev-mirror", {
            "job-id": _MIRROR_JOB, "device": _DRIVE, "target": _NBD_NODE,
            "sync": "top" if overlay else "full",
        })  # fmt: skip
        disk_total = 0
        while True:
            job = await self._mirror_job(qmp)
            if job is None:
                raise DriverError(f"VM {vm.name}: the disk mirror ended before it was in sync")
            disk_total = int(job.get("len", 0))
            progress(LiveProgress("mirroring", int(job.get("offset", 0)), disk_total))
            if job.get("ready"):
                break
            await qmp.settle(_POLL)
        await letting_in
        # "events": QEMU announces each new status (pre-switchover above all: the guest is
        # paused from then until the loop below lets the migration finish).
        await qmp("migrate-set-capabilities", {"capabilities": [
            {"capability": "pause-before-switchover", "state": True},
            {"capability": "events", "state": True}]})  # fmt: skip
        await qmp("migrate-set-parameters", {
            "tls-creds": _TLS_ID, "tls-hostname": to.tls_hostname,
            "downtime-limit": DOWNTIME_LIMIT_MS, "max-bandwidth": MAX_BANDWIDTH,
        })  # fmt: skip
        await qmp("migrate", {"uri": f"tcp:{_uri_host(to.host)}:{to.migration_port}"})
        switched = False
        while True:
            info = await qmp("query-migrate")
            status = info.get("status", "")
            ram = info.get("ram", {})
            done, total = int(ram.get("transferred", 0)), int(ram.get("total", 0))
            if status == "completed":
                break
            if status in ("failed", "cancelled"):
                raise DriverError(
                    f"VM {vm.name}: migration {status}: {info.get('error-desc', 'no reason given')}"
                )
            if status == "pre-switchover" and not switched:  # paused: end the mirror in sync
                progress(LiveProgress("switching", disk_total, disk_total, done, total))
                await qmp("block-job-cancel", {"device": _MIRROR_JOB})
                while await self._mirror_job(qmp) is not None:
                    await qmp.settle(0.005)
                await qmp("migrate-continue", {"state": "pre-switchover"})
                switched = True  # the state shows it a moment later
                continue
            progress(LiveProgress("migrating", disk_total, disk_total, done, total))
            await qmp.settle(0.005 if switched else _POLL)  # the guest waits on the end
        # Its NBD client stays: the guest is paused until the target runs, so nothing more
        # happens here first (this VM is deleted next, or _abort_out removes it).
        host_key = _read_text(self._vm_dir(vm) / HOST_KEY_FILE)
        return LiveProgress(
            "done", disk_total, disk_total, done, total,
            downtime=float(info.get("downtime", 0)) / 1000, host_key=host_key,
        )  # fmt: skip

    async def _mirror_job(self, qmp: Monitor) -> dict[str, Any] | None:
        for job in await qmp("query-block-jobs"):
            if job.get("device") == _MIRROR_JOB:
                return dict(job)
        return None

    async def abort_migrate_out(self, vm: VMConfig) -> None:
        async with self._lock(vm.id):
            if self._running_pid(vm) is not None:
                async with self._monitor(vm, _LIVE_TIMEOUT) as qmp:
                    await self._abort_out(qmp, vm)

    async def _abort_out(self, qmp: Monitor, vm: VMConfig) -> None:
        """Cancel a migration under way, end the mirror, drop its NBD client and TLS object,
        and let a VM the migration left paused run on."""
        info = await qmp("query-migrate")
        if info.get("status") in _MIGRATING:
            with contextlib.suppress(DriverError):
                await qmp("migrate_cancel")
            deadline = time.monotonic() + 30.0
            while (await qmp("query-migrate")).get("status") in _MIGRATING:
                if time.monotonic() > deadline:
                    raise DriverError(f"VM {vm.name}: its migration does not cancel")
                await asyncio.sleep(_POLL)
        if await self._mirror_job(qmp) is not None:
            with contextlib.suppress(DriverError):
                await qmp("block-job-cancel", {"device": _MIRROR_JOB, "force": True})
            deadline = time.monotonic() + 30.0
            while await self._mirror_job(qmp) is not None:
                if time.monotonic() > deadline:
                    raise DriverError(f"VM {vm.name}: its disk mirror does not end")
                await asyncio.sleep(_POLL)
        for command, arguments in (
            ("blockdev-del", {"node-name": _NBD_NODE}),
            ("migrate-set-parameters", {"tls-creds": "", "tls-hostname": ""}),
            ("object-del", {"id": _TLS_ID}),
        ):
            with contextlib.suppress(DriverError):  # absent: nothing to undo
                await qmp(command, arguments)
        state = (await qmp("query-status")).get("status")
        if state in ("postmigrate", "finish-migrate"):  # sent whole, but the target never ran
            await qmp("cont")

    async def finish_incoming(self, vm: VMConfig, host_key: str) -> VMStatus:
        async with self._lock(vm.id):
            self._require_running(vm)
            vm_dir = self._vm_dir(vm)
            runtime = read_json(vm_dir / "vm.json") or {}
            if runtime.get(_INCOMING):
                async with self._monitor(vm, _LIVE_TIMEOUT) as qmp:
                    status = (await qmp("query-migrate")).get("status", "none")
                    if status != "completed":
                        raise Conflict(f"VM {vm.name}: its state has not arrived whole ({status})")
                    if host_key:
                        (vm_dir / HOST_KEY_FILE).write_text(host_key)
                    await qmp("cont")
                    with contextlib.suppress(DriverError):
                        await qmp("nbd-server-stop")
                runtime.pop(_INCOMING, None)
                runtime.pop(_LIVE_PORTS, None)
                write_json(vm_dir / "vm.json", runtime)
                self._warm_guest(vm)
                # It runs: QEMU took the ``cont``. No second look (the guest waits on no one
                # now, but the move's caller does).
                return VMStatus(PowerState.RUNNING, str(runtime.get("ipv4", "")))
            return await self._hypervisor_status(vm, str(runtime.get("ipv4", "")))

    async def _remove(self, vm: VMConfig) -> None:
        """Kill the VM's QEMU if any and remove its directory (an incoming VM's undo)."""
        pid = self._running_pid(vm)
        if pid is not None:
            await self._kill(vm, pid)
        await self._close_guest(vm.id)
        await asyncio.to_thread(shutil.rmtree, self._vm_dir(vm), True)

    async def _qmp(
        self, vm: VMConfig, command: str, arguments: dict[str, Any] | None = None,
        timeout: float = 5.0,
    ) -> Any:  # fmt: skip
        """Run one QMP command on a fresh connection; QEMU's monitor serves one client at once,
        and a connection held open would lock out an agent that adopts the VM."""
        async with self._monitor(vm, timeout) as qmp:
            return await qmp(command, arguments)

    @contextlib.asynccontextmanager
    async def _monitor(self, vm: VMConfig, timeout: float = 5.0) -> AsyncIterator[Monitor]:
        """One QMP connection for a run of commands (a live move polls many times a second),
        held only that long."""
        client = QMPClient(f"multiverse-{vm.name}")

        def failed(error: BaseException, what: str) -> DriverError:
            return DriverError(
                f"QEMU monitor of VM {vm.name} did not answer {what}: "
                f"{str(error) or type(error).__name__}"
            )

        async def run(command: str, arguments: dict[str, Any] | None = None) -> Any:
            try:
                return await asyncio.wait_for(client.execute(command, arguments), timeout)
            except (OSError, QMPError, TimeoutError) as error:
                raise failed(error, command) from error

        try:
            try:
                sock_path = self._control_socket(vm)
                sock = await asyncio.wait_for(asyncio.to_thread(_connect_unix, sock_path), timeout)
                await asyncio.wait_for(client.connect(sock), timeout)
            except (OSError, QMPError, TimeoutError) as error:
                raise failed(error, "a connection") from error
            with client.listener() as events:
                yield Monitor(run, events)
        finally:
            with contextlib.suppress(Exception):
                await client.disconnect()


# RFC 7919's ffdhe2048 group (p, g = 2) as PKCS#3. QEMU's server credentials read
# ``dh-params.pem`` from their directory and, without one, make new parameters at every
# ``object-add``: 30-300 ms of CPU on the live move's path, for a group nobody needs secret.
_DH_PARAMS_PEM = """\
-----BEGIN DH PARAMETERS-----
MIIBCAKCAQEA//////////+t+FRYortKmq/cViAnPTzx2LnFg84tNpWp4TZBFGQz
+8yTnc4kmz75fS/jY2MMddj2gbICrsRhetPfHtXV/WVhJDP1H18GbtCFY2VVPe0a
87VXE15/V8k1mE8McODmi3fipona8+/och3xWKE2rec1MKzKT0g6eXq8CrGCsyT7
YdEIqUuyyOP7uWrat2DX9GgdT0Kj3jlN9K5W7edjcrsZCwenyO4KbXCeAvzhzffi
7MA0BM0oNC9hkXL+nOmFg/+OTxIy7vKBg8P+OxtMb61zO7X8vC7CIAXFjvGDfRaD
ssbzSibBsu/6iGtCOGEoXJf//////////wIBAg==
-----END DH PARAMETERS-----
"""


def write_tls_dh_params(tls_dir: Path) -> None:
    """Put the fixed Diffie-Hellman group where QEMU's x509 credentials look for it."""
    path = tls_dir / "dh-params.pem"
    if not path.exists() or path.read_text() != _DH_PARAMS_PEM:
        path.write_text(_DH_PARAMS_PEM)


class Monitor:
    """A QMP connection's runner: ``await qmp(command, arguments)``; and a poll's pause that
    ends early when QEMU says something."""

    def __init__(self, run: Callable[..., Awaitable[Any]], events: EventListener) -> None:
        self._run = run
        self._events = events

    async def __call__(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        return await self._run(command, arguments)

    async def settle(self, seconds: float) -> None:
        """Wait ``seconds``, or less if an event comes (a block job ready or ended, a
        migration's new status): the state a loop polls has changed, and the guest may be
        paused waiting on the loop to see it."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._events.get(), seconds)


def _tls_object(endpoint: str, tls_dir: Path) -> dict[str, Any]:
    """QEMU's x509 credentials from the node's cluster certificate; peers must show one of
    the cluster CA's certificates."""
    return {"qom-type": "tls-creds-x509", "id": _TLS_ID, "endpoint": endpoint,
            "dir": str(tls_dir), "verify-peer": True}  # fmt: skip


def _uri_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _read_text(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


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
