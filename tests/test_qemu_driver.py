"""The QEMU driver with real VMs (TCG here), and the pieces of the test image it boots.

Tests marked ``vm`` boot the "tiny" guest; the image is built once into a shared cache
(``MULTIVERSE_IMAGE_CACHE``, default ``<repo>/.data/images``) and reused by every run. Every VM
is killed by a fixture finalizer, whatever the test did. At most two VMs run at once: the
module's shared VM and one test's own.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import lzma
import os
import shutil
import stat
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import asyncssh
import psutil
import pytest
from asyncssh import generate_private_key
from harness import kill_qemus_under, qemu_processes_under

from multiverse.core.errors import Conflict, InvalidArgument, NotFound
from multiverse.core.sizes import GiB, MiB
from multiverse.drivers.base import ExecChunk, PowerState, VMConfig
from multiverse.drivers.process import HOST_KEY_FILE
from multiverse.drivers.qemu import QemuDriver
from multiverse.guest.image import (
    ImageBuildError,
    Initramfs,
    extract_vmlinux,
    module_load_order,
    needed_libraries,
)
from multiverse.guest.ssh import (
    GuestConnection,
    HostKeyMismatch,
    KnownHost,
    announced_host_key,
    parse_ipv4,
    parse_stats,
)

T = TypeVar("T")


# --- helpers ---------------------------------------------------------------------------------


def run(driver: QemuDriver, step: Callable[[], Awaitable[T]]) -> T:
    """Run one async step in a fresh loop, closing the driver's SSH connections at its end."""

    async def main() -> T:
        try:
            return await step()
        finally:
            await driver.close()

    return asyncio.run(main())


async def exec_collect(driver: QemuDriver, vm: VMConfig, *command: str) -> tuple[int, bytes, bytes]:
    chunks: list[ExecChunk] = [chunk async for chunk in driver.exec(vm, list(command))]
    out = b"".join(chunk.data for chunk in chunks if chunk.stream == 1)
    err = b"".join(chunk.data for chunk in chunks if chunk.stream == 2)
    assert chunks[-1].exit_code is not None, "the last chunk carries the exit code"
    return chunks[-1].exit_code, out, err


def new_vm(name: str, memory: int = 256 * MiB, image: str = "tiny") -> VMConfig:
    return VMConfig(
        id=str(uuid.uuid4()), name=name, cpus=1, memory=memory, disk=1 * GiB, image=image
    )


@dataclass
class Booted:
    driver: QemuDriver
    vm: VMConfig
    state_dir: Path


# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def images(tiny_image: Path) -> Path:
    """The directory holding the built test image (conftest builds it once)."""
    return tiny_image.parent


@pytest.fixture()
def state_dir(tmp_path: Path) -> Iterator[Path]:
    """A driver state dir whose QEMU processes are killed at the end, whatever happened."""
    path = tmp_path / "state"
    yield path
    kill_qemus_under(path)


@pytest.fixture(scope="module")
def booted(images: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Booted]:
    """One running VM shared by the read-only tests of this module."""
    state = tmp_path_factory.mktemp("shared") / "state"
    driver = QemuDriver(state, [images])
    vm = new_vm("shared")
    try:
        run(driver, lambda: driver.start(vm))
        yield Booted(driver, vm, state)
    finally:
        kill_qemus_under(state)


# --- unit tests of the image's pieces (no VM) -------------------------------------------------


def read_newc(archive: bytes) -> list[tuple[str, int, bytes, tuple[int, int]]]:
    """(name, mode, data, rdev) of each member, checking the format's alignment rules."""
    members: list[tuple[str, int, bytes, tuple[int, int]]] = []
    offset = 0
    while True:
        assert archive[offset : offset + 6] == b"070701"
        fields = [int(archive[offset + 6 + 8 * i : offset + 14 + 8 * i], 16) for i in range(13)]
        mode, size, rdev, name_size = fields[1], fields[6], (fields[9], fields[10]), fields[11]
        name_start = offset + 110
        name = archive[name_start : name_start + name_size - 1].decode()
        data_start = name_start + name_size + (-(110 + name_size) % 4)
        assert data_start % 4 == 0
        data = archive[data_start : data_start + size]
        offset = data_start + size + (-size % 4)
        if name == "TRAILER!!!":
            assert offset == len(archive)
            return members
        members.append((name, mode, data, rdev))


def test_initramfs_archive_is_valid_newc_and_reproducible(tmp_path: Path) -> None:
    def build() -> Initramfs:
        initramfs = Initramfs()
        initramfs.add_file("usr/bin/tool", b"#!/bin/sh\necho hi\n", 0o755)
        initramfs.add_symlink("bin/sh", "busybox")
        initramfs.add_char_device("dev/console", 5, 1, 0o600)
        initramfs.add_dir("tmp", 0o1777)
        return initramfs

    members = {name: (mode, data, rdev) for name, mode, data, rdev in read_newc(build().newc())}
    # Parents come before children, with the root first so the kernel sets its mode.
    assert list(members) == [".", "bin", "bin/sh", "dev", "dev/console", "tmp", "usr",
                             "usr/bin", "usr/bin/tool"]  # fmt: skip
    assert members["usr/bin/tool"] == (stat.S_IFREG | 0o755, b"#!/bin/sh\necho hi\n", (0, 0))
    assert members["bin/sh"] == (stat.S_IFLNK | 0o777, b"busybox", (0, 0))
    assert members["dev/console"] == (stat.S_IFCHR | 0o600, b"", (5, 1))
    assert members["tmp"][0] == stat.S_IFDIR | 0o1777

    first, second = tmp_path / "a.gz", tmp_path / "b.gz"
    build().write_gzip(first)
    build().write_gzip(second)
    assert first.read_bytes() == second.read_bytes()
    assert gzip.decompress(first.read_bytes()) == build().newc()


def test_modules_load_after_their_dependencies() -> None:
    depends = {
        "virtio_net": ["net_failover", "virtio"],
        "net_failover": ["failover"],
        "failover": [],
        "virtio": ["virtio_ring"],
        "virtio_ring": [],
        "virtio_blk": ["virtio"],
    }
    order = module_load_order(["virtio_blk", "virtio_net"], lambda name: depends[name])
    assert order == ["virtio_ring", "virtio", "virtio_blk", "failover", "net_failover",
                     "virtio_net"]  # fmt: skip

    cyclic = {"a": ["b"], "b": ["a"]}
    with pytest.raises(ImageBuildError, match="cycle"):
        module_load_order(["a"], lambda name: cyclic[name])


def test_vmlinux_is_found_after_garbage_and_before_trailer() -> None:
    elf = b"\x7fELF" + bytes(range(256)) * 64
    payload = lzma.compress(elf, format=lzma.FORMAT_XZ)
    # A false start: the magic bytes followed by something that is not an xz stream.
    vmlinuz = b"MZ setup code \xfd7zXZ\x00 not xz" + payload + b"decompressor trailer"
    assert extract_vmlinux(vmlinuz) == elf
    with pytest.raises(ImageBuildError):
        extract_vmlinux(b"no kernel here")


def test_needed_libraries_of_a_host_program() -> None:
    python = Path(os.path.realpath(shutil.which("ls") or "/bin/ls")).read_bytes()
    assert "libc.so.6" in needed_libraries(python)


def test_guest_stats_are_parsed() -> None:
    text = (
        "0.42 0.17 0.05 1/61 162\n--multiverse--\n"
        "MemTotal:         215800 kB\nMemFree:          170000 kB\n"
        "MemAvailable:     178900 kB\n--multiverse--\n"
        "Filesystem           1024-blocks    Used Available Capacity Mounted on\n"
        "/dev/vda                996780        48    927920   0% /data\n--multiverse--\n"
        '"Multiverse tiny 1 (Linux 6.1.0-56-amd64)"\n--multiverse--\n'
        "1: lo    inet 127.0.0.1/8 scope host lo\n"
        "2: eth0    inet 10.0.2.15/24 scope global eth0\\       valid_lft forever\n"
    )
    stats = parse_stats(text)
    assert stats.load == (0.42, 0.17, 0.05)
    assert stats.memory_total == 215800 * 1024
    assert stats.memory_used == (215800 - 178900) * 1024
    assert (stats.disk_used, stats.disk_total) == (48 * 1024, 996780 * 1024)
    assert stats.release == "Multiverse tiny 1 (Linux 6.1.0-56-amd64)"
    assert stats.ipv4 == "10.0.2.15"
    assert parse_ipv4("3: ens3    inet 192.168.1.9/24 brd 192.168.1.255 scope global") == (
        "192.168.1.9"
    )
    assert parse_stats("").memory_total == 0


def test_bad_input_is_refused_and_leaves_nothing(tmp_path: Path) -> None:
    # A stand-in image is enough: nothing boots when the input is refused.
    images = tmp_path / "images"
    (images / "tiny").mkdir(parents=True)
    (images / "tiny" / "vmlinux").write_bytes(b"")
    (images / "tiny" / "initrd.img").write_bytes(b"")
    state = tmp_path / "state"
    driver = QemuDriver(state, [images])

    with pytest.raises(NotFound, match="image 'nosuch' not found"):
        run(driver, lambda: driver.create(new_vm("a", image="nosuch")))
    with pytest.raises(NotFound):
        run(driver, lambda: driver.start(new_vm("a", image="nosuch")))
    with pytest.raises(InvalidArgument, match=r"at least 96\.0MiB"):
        run(driver, lambda: driver.create(new_vm("b", memory=64 * MiB)))
    with pytest.raises(InvalidArgument, match=r"at least 96\.0MiB"):
        run(driver, lambda: driver.start(new_vm("b", memory=64 * MiB)))
    with pytest.raises(InvalidArgument):
        run(driver, lambda: driver.create(new_vm("c", image="../../etc")))

    assert list((state / "vms").iterdir()) == []
    assert qemu_processes_under(state) == []
    missing = new_vm("d")
    assert run(driver, lambda: driver.status(missing)).power is PowerState.MISSING
    with pytest.raises(NotFound):
        run(driver, lambda: driver.stop(missing))
    run(driver, lambda: driver.delete(missing))  # deleting what is gone is fine


def test_created_vm_is_stopped_until_started(tmp_path: Path) -> None:
    images = tmp_path / "images"
    (images / "tiny").mkdir(parents=True)
    for name in ("vmlinux", "initrd.img"):
        (images / "tiny" / name).write_bytes(b"")
    driver = QemuDriver(tmp_path / "state", [images])
    vm = new_vm("idle")
    run(driver, lambda: driver.create(vm))
    run(driver, lambda: driver.create(vm))  # idempotent
    disk = tmp_path / "state" / "vms" / vm.id / "disk.img"
    assert disk.stat().st_size == 1 * GiB
    assert disk.stat().st_blocks * 512 < 64 * MiB  # sparse
    assert run(driver, lambda: driver.status(vm)).power is PowerState.STOPPED
    with pytest.raises(Conflict):
        run(driver, lambda: exec_collect(driver, vm, "true"))
    run(driver, lambda: driver.delete(vm))
    assert not disk.parent.exists()


# --- real VMs ----------------------------------------------------------------------------------


@pytest.mark.vm
def test_start_returns_running_vm_with_guest_address(booted: Booted) -> None:
    status = run(booted.driver, lambda: booted.driver.status(booted.vm))
    assert status.power is PowerState.RUNNING
    assert status.ipv4 == "10.0.2.15"
    again = run(booted.driver, lambda: booted.driver.start(booted.vm))  # idempotent
    assert again.power is PowerState.RUNNING


@pytest.mark.vm
def test_exec_runs_in_the_guest_kernel(booted: Booted, images: Path) -> None:
    manifest = json.loads((images / "tiny" / "image.json").read_text())
    code, out, err = run(
        booted.driver, lambda: exec_collect(booted.driver, booted.vm, "uname", "-r")
    )
    assert (code, out.decode().strip(), err) == (0, manifest["kernel_version"], b"")


@pytest.mark.vm
def test_exec_keeps_streams_apart_and_returns_exit_code(booted: Booted) -> None:
    code, out, err = run(
        booted.driver,
        lambda: exec_collect(
            booted.driver, booted.vm, "sh", "-c", "echo out; echo err >&2; exit 7"
        ),
    )
    assert (code, out, err) == (7, b"out\n", b"err\n")


@pytest.mark.vm
def test_exec_feeds_stdin_and_quotes_arguments(booted: Booted) -> None:
    async def step() -> list[ExecChunk]:
        return [c async for c in booted.driver.exec(booted.vm, ["wc", "-c"], stdin=b"x" * 1000)]

    chunks = run(booted.driver, step)
    assert b"".join(c.data for c in chunks).strip() == b"1000"
    code, out, _ = run(
        booted.driver, lambda: exec_collect(booted.driver, booted.vm, "echo", "a  b", "$HOME;")
    )
    assert (code, out) == (0, b"a  b $HOME;\n")


@pytest.mark.vm
def test_stats_are_read_inside_the_guest(booted: Booted) -> None:
    stats = run(booted.driver, lambda: booted.driver.stats(booted.vm))
    # The kernel keeps some of the VM's memory for itself: total is a bit under 256 MiB.
    assert 160 * MiB < stats.memory_total <= 256 * MiB
    assert 0 < stats.memory_used < stats.memory_total
    assert len(stats.load) == 3 and all(isinstance(value, float) for value in stats.load)
    assert 0.9 * GiB < stats.disk_total <= 1 * GiB  # the data disk
    assert stats.release.startswith("Multiverse tiny 1 (Linux ")
    assert stats.ipv4 == "10.0.2.15"


@pytest.mark.vm
def test_pty_shell_follows_window_size(booted: Booted) -> None:
    port = json.loads((booted.state_dir / "vms" / booted.vm.id / "vm.json").read_text())
    vm_dir = booted.state_dir / "vms" / booted.vm.id
    known = KnownHost(vm_dir / HOST_KEY_FILE, "VM shared")
    guest = GuestConnection("127.0.0.1", port["ssh_port"], booted.driver.key_path, known)

    async def step() -> tuple[bytes, int]:
        shell = await guest.open_shell(size=(80, 24), command="stty size; read line; stty size")
        output = b""
        while b"24 80" not in output:
            output += await shell.read()
        await shell.resize(132, 43)
        await shell.write(b"go\n")
        while b"43 132" not in output:
            data = await shell.read()
            assert data, f"shell ended early: {output!r}"
            output += data
        code = await shell.wait()
        await guest.close()
        return output, code

    _, code = asyncio.run(step())
    assert code == 0


@pytest.mark.vm
def test_logs_hold_the_console(booted: Booted) -> None:
    logs = run(booted.driver, lambda: booted.driver.logs(booted.vm))
    assert "multiverse: boot ok" in logs


@pytest.mark.vm
def test_a_new_driver_adopts_the_running_vm(booted: Booted, images: Path) -> None:
    runtime = booted.state_dir / "vms" / booted.vm.id / "vm.json"
    pid = json.loads(runtime.read_text())["pid"]
    adopter = QemuDriver(booted.state_dir, [images])
    status = run(adopter, lambda: adopter.status(booted.vm))
    assert (status.power, status.ipv4) == (PowerState.RUNNING, "10.0.2.15")
    assert run(adopter, lambda: adopter.start(booted.vm)).power is PowerState.RUNNING
    assert json.loads(runtime.read_text())["pid"] == pid  # same process, not a new boot
    code, out, _ = run(adopter, lambda: exec_collect(adopter, booted.vm, "hostname"))
    assert (code, out) == (0, b"shared\n")


def test_a_pushed_ssh_key_logs_in_until_taken_out(booted: Booted) -> None:
    """`ssh_login` lets a key in and says where and to whom; the driver's close takes it out
    at once (its window would otherwise end 30 s later). A key that is no key changes
    nothing."""
    driver, vm = booted.driver, booted.vm
    key = generate_private_key("ssh-ed25519")
    public = key.export_public_key().decode()

    def authorized() -> bytes:
        keys = "/root/.ssh/authorized_keys"
        return run(driver, lambda: exec_collect(driver, vm, "cat", keys))[1]

    before = authorized()

    async def log_in() -> tuple[str, str, bytes]:
        login = await driver.ssh_login(vm, public)
        trusted = asyncssh.import_public_key(login.host_key)
        async with asyncssh.connect(
            login.host, login.port, username=login.user, client_keys=[key],
            known_hosts=([trusted], [], []),
        ) as connection:  # fmt: skip
            result = await connection.run("hostname", check=True)
        return login.user, login.host_key, str(result.stdout).encode()

    user, host_key, hostname = run(driver, log_in)
    assert (user, hostname) == ("root", b"shared\n")
    recorded = (booted.state_dir / "vms" / vm.id / HOST_KEY_FILE).read_text().split()[:2]
    assert host_key.split() == recorded
    assert authorized() == before  # run() closed the driver: the key is out again
    with pytest.raises(InvalidArgument):
        run(driver, lambda: driver.ssh_login(vm, public.replace("ssh-ed25519", "ssh-rsa")))
    assert authorized() == before


@pytest.mark.vm
def test_stop_and_start_keep_the_data_disk(images: Path, state_dir: Path) -> None:
    driver = QemuDriver(state_dir, [images], stop_timeout=60)
    vm = new_vm("keeper")
    run(driver, lambda: driver.start(vm))
    first_pid = qemu_processes_under(state_dir)[0].pid
    code, _, _ = run(
        driver,
        lambda: exec_collect(driver, vm, "sh", "-c", "echo kept > /data/file; echo home > ~/f"),
    )
    assert code == 0

    began = time.monotonic()
    run(driver, lambda: driver.stop(vm))
    # Well under stop_timeout: the guest powered off on the ACPI button, QEMU was not killed.
    assert time.monotonic() - began < 15
    assert run(driver, lambda: driver.status(vm)).power is PowerState.STOPPED
    assert qemu_processes_under(state_dir) == []
    run(driver, lambda: driver.stop(vm))  # idempotent

    assert run(driver, lambda: driver.start(vm)).power is PowerState.RUNNING
    assert qemu_processes_under(state_dir)[0].pid != first_pid
    code, out, _ = run(driver, lambda: exec_collect(driver, vm, "sh", "-c", "cat /data/file ~/f"))
    assert (code, out) == (0, b"kept\nhome\n")


@pytest.mark.vm
def test_guest_host_key_is_announced_recorded_kept_and_checked(
    images: Path, state_dir: Path
) -> None:
    driver = QemuDriver(state_dir, [images], stop_timeout=60)
    vm = new_vm("keyed")
    vm_dir = state_dir / "vms" / vm.id
    record = vm_dir / HOST_KEY_FILE
    run(driver, lambda: driver.start(vm))
    # What the guest printed on its console is what was recorded, and is the key dropbear has.
    announced = announced_host_key((vm_dir / "serial.log").read_text(errors="replace"))
    assert announced is not None and announced.startswith("ssh-ed25519 ")
    assert record.read_text().split()[:2] == announced.split()
    show_key = ("dropbearkey", "-y", "-f", "/etc/dropbear/dropbear_ed25519_host_key")
    code, out, _ = run(driver, lambda: exec_collect(driver, vm, *show_key))
    assert code == 0 and announced in out.decode()

    # Kept across stop/start (on the data disk): the new boot's key passes the check.
    run(driver, lambda: driver.stop(vm))
    assert record.read_text().split()[:2] == announced.split()
    assert run(driver, lambda: driver.start(vm)).power is PowerState.RUNNING
    assert announced_host_key((vm_dir / "serial.log").read_text(errors="replace")) == announced
    assert run(driver, lambda: exec_collect(driver, vm, "true"))[0] == 0

    # Another key recorded (as if someone else had answered first): refused, clearly.
    record.write_bytes(generate_private_key("ssh-ed25519").export_public_key())
    with pytest.raises(HostKeyMismatch) as refused:
        run(driver, lambda: exec_collect(driver, vm, "true"))
    assert refused.value.message.startswith("host key of VM keyed changed: it offered ssh-ed25519")
    assert f"run `rm {record}` on its node" in refused.value.message


@pytest.mark.vm
def test_delete_leaves_no_process_and_no_files(images: Path, state_dir: Path) -> None:
    driver = QemuDriver(state_dir, [images])
    vm = new_vm("doomed")
    run(driver, lambda: driver.start(vm))
    process = qemu_processes_under(state_dir)[0]

    run(driver, lambda: driver.stop(vm, force=True))
    assert run(driver, lambda: driver.status(vm)).power is PowerState.STOPPED
    assert not process.is_running() or process.status() == psutil.STATUS_ZOMBIE

    run(driver, lambda: driver.start(vm))
    run(driver, lambda: driver.delete(vm))
    assert qemu_processes_under(state_dir) == []
    assert not (state_dir / "vms" / vm.id).exists()
    assert run(driver, lambda: driver.status(vm)).power is PowerState.MISSING
    # The reaper thread collected QEMU: no zombie child of ours is left behind.
    time.sleep(0.2)
    zombies = [
        child for child in psutil.Process().children() if child.status() == psutil.STATUS_ZOMBIE
    ]
    assert zombies == []
