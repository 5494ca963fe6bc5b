"""The QEMU driver's side of `disk` images, without booting: each VM's qcow2 overlay on its own
hold of the image's disk, the checks at launch, and what QEMU is told. Real qemu-img and qemu-io
on small images; the Debian guest booting for real is tests/test_debian.py."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
import yaml

from multiverse.core.errors import InvalidArgument
from multiverse.core.network import Nic
from multiverse.core.sizes import GiB, MiB
from multiverse.drivers.base import ImageInfo, NetworkAttachment, VMConfig
from multiverse.drivers.images import CachedImage, ImageDirectories
from multiverse.drivers.qemu import BASE_FILE, SEED_FILE, QemuDriver, guest_mac
from multiverse.guest.cloudinit import read_seed_iso, write_seed_iso

pytestmark = pytest.mark.skipif(shutil.which("qemu-io") is None, reason="needs qemu-utils")

IMAGE = "disky"


def qemu_io(path: Path, command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", command, str(path)], capture_output=True, text=True
    )


def write(path: Path, command: str) -> None:
    done = qemu_io(path, command)
    assert done.returncode == 0, done.stdout + done.stderr


def holds_pattern(path: Path, pattern: int, offset: str = "0") -> bool:
    """Whether the MiB at ``offset`` the disk shows its guest is ``pattern`` (through any
    backing file)."""
    done = qemu_io(path, f"read -P {pattern:#x} {offset} 1M")
    assert "read 1048576/1048576" in done.stdout or "verification failed" in done.stdout, done
    return done.returncode == 0 and "verification failed" not in done.stdout


def make_image(images: Path, pattern: int, size: str = "64M") -> Path:
    """A `disk` image directory as the Debian build writes one, with a small patterned disk."""
    directory = images / IMAGE
    directory.mkdir(parents=True)
    disk = directory / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), size], check=True)
    write(disk, f"write -P {pattern:#x} 0 1M")
    (directory / "vmlinux").write_bytes(b"kernel")
    (directory / "initrd.img").write_bytes(b"initrd")
    files = {
        name: {
            "sha256": hashlib.sha256((directory / name).read_bytes()).hexdigest(),
            "size": (directory / name).stat().st_size,
        }
        for name in ("vmlinux", "initrd.img", "disk.qcow2")
    }
    manifest = {
        "name": IMAGE,
        "kind": "disk",
        "files": files,
        "boot": {"kernel": "vmlinux", "initrd": "initrd.img", "disk": "disk.qcow2",
                 "format": "qcow2", "cmdline": "root=/dev/vda rw", "seed": "nocloud"},
    }  # fmt: skip
    (directory / "image.json").write_text(json.dumps(manifest))
    return directory


def new_vm(disk: int = 1 * GiB, user_data: str = "") -> VMConfig:
    return VMConfig(str(uuid.uuid4()), "disky-one", 1, 256 * MiB, disk, IMAGE, user_data)


def test_overlay_on_the_vms_own_hold_of_the_image_disk(tmp_path: Path) -> None:
    images = tmp_path / "images"
    image = make_image(images, 0xAB)
    driver = QemuDriver(tmp_path / "state", [images])
    vm = new_vm()
    asyncio.run(driver.create(vm))
    vm_dir = driver.vms_dir / vm.id
    overlay, base = vm_dir / "disk.img", vm_dir / BASE_FILE
    info = json.loads(
        subprocess.run(["qemu-img", "info", "--output", "json", str(overlay)],
                       capture_output=True, text=True, check=True).stdout
    )  # fmt: skip
    assert info["format"] == "qcow2" and info["virtual-size"] == 1 * GiB
    assert info["backing-filename"] == BASE_FILE  # relative: the VM's directory may move
    assert base.samefile(image / "disk.qcow2")  # a hard link, no copy
    assert holds_pattern(overlay, 0xAB)

    # The VM writes into its overlay only.
    write(overlay, "write -P 0x11 1M 1M")
    assert holds_pattern(overlay, 0x11, "1M") and holds_pattern(image / "disk.qcow2", 0, "1M")

    # The image is rebuilt (its files replaced): the VM keeps the disk it was made on.
    shutil.rmtree(image)
    make_image(images, 0xCD)
    assert holds_pattern(overlay, 0xAB) and holds_pattern(overlay, 0x11, "1M")

    asyncio.run(driver.delete(vm))
    assert not vm_dir.exists()
    assert holds_pattern(images / IMAGE / "disk.qcow2", 0xCD)


def test_launch_checks_disk_size_and_cloud_config_before_making_anything(
    tmp_path: Path,
) -> None:
    images = tmp_path / "images"
    make_image(images, 0xAB, size="2G")
    driver = QemuDriver(tmp_path / "state", [images])
    with pytest.raises(InvalidArgument, match=r"smaller than image disky's own disk \(2"):
        asyncio.run(driver.validate(new_vm(disk=1 * GiB)))
    with pytest.raises(InvalidArgument, match="not valid YAML"):
        asyncio.run(driver.validate(new_vm(disk=2 * GiB, user_data="#cloud-config\na: [\n")))
    asyncio.run(driver.validate(new_vm(disk=2 * GiB, user_data="#!/bin/sh\ntrue\n")))
    assert list(driver.vms_dir.iterdir()) == []


class PulledLater:
    """An image cache whose source knows the image before its files are on the node, as a
    worker's cache is at launch time (the agent pulls before the driver's create)."""

    def __init__(self, images: Path) -> None:
        self.directories = ImageDirectories([images])
        self.pulled = False

    def lookup(self, name: str) -> CachedImage | None:
        return self.directories.lookup(name) if self.pulled else None

    def available(self, name: str) -> bool:
        return name == IMAGE

    def held(self) -> list[ImageInfo]:
        return self.directories.held() if self.pulled else []


def test_an_image_not_pulled_yet_has_its_disk_size_checked_after_the_pull(tmp_path: Path) -> None:
    images = tmp_path / "images"
    make_image(images, 0xAB, size="2G")
    cache = PulledLater(images)
    driver = QemuDriver(tmp_path / "state", cache)
    asyncio.run(driver.validate(new_vm(disk=1 * GiB)))  # not here: its disk is not known yet
    with pytest.raises(InvalidArgument, match="not valid YAML"):  # known without the image
        asyncio.run(driver.validate(new_vm(disk=2 * GiB, user_data="#cloud-config\na: [\n")))
    cache.pulled = True
    with pytest.raises(InvalidArgument, match=r"smaller than image disky's own disk \(2"):
        asyncio.run(driver.create(new_vm(disk=1 * GiB)))
    assert list(driver.vms_dir.iterdir()) == []
    boot = driver.boot_files(IMAGE)  # the manifest's hints, seed included, reach the driver
    assert boot.cloud_init and boot.cmdline.startswith("root=/dev/vda")


def test_qemu_is_given_the_images_kernel_its_cmdline_the_seed_and_a_mac(tmp_path: Path) -> None:
    images = tmp_path / "images"
    image = make_image(images, 0xAB)
    driver = QemuDriver(tmp_path / "state", [images])
    vm = new_vm(user_data="#!/bin/sh\necho hi\n")
    boot = driver.boot_files(IMAGE)
    assert (boot.kernel, boot.initrd, boot.disk) == (
        image / "vmlinux",
        image / "initrd.img",
        image / "disk.qcow2",
    )
    argv = driver.qemu_argv(vm, boot, 2222)
    assert argv[argv.index("-append") + 1].startswith("root=/dev/vda rw console=ttyS0")
    drives = [argv[i + 1] for i, arg in enumerate(argv) if arg == "-drive"]
    assert drives[0].startswith("file=disk.img,format=qcow2,if=virtio")  # /dev/vda
    assert drives[1] == f"file={SEED_FILE},format=raw,if=virtio,readonly=on"
    assert f"virtio-net-pci,netdev=net0,mac={guest_mac(vm.id)}" in argv
    assert guest_mac(vm.id) == guest_mac(vm.id) != guest_mac(str(uuid.uuid4()))

    seed = driver.seed(vm)
    (driver.vms_dir / vm.id).mkdir()
    write_seed_iso(seed, driver.vms_dir / vm.id / SEED_FILE)
    files = read_seed_iso(driver.vms_dir / vm.id / SEED_FILE)
    assert files["user-data"] == b"#!/bin/sh\necho hi\n"
    assert f"instance-id: {vm.id}" in files["meta-data"].decode()
    assert guest_mac(vm.id) in files["network-config"].decode()
    node_key = (driver.key_path.with_suffix(".pub")).read_text().strip()
    assert node_key in files["vendor-data"].decode()


def test_an_image_without_boot_hints_boots_as_the_tiny_guest_does(tmp_path: Path) -> None:
    images = tmp_path / "images"
    (images / "plain").mkdir(parents=True)
    for name in ("vmlinux", "initrd.img"):
        (images / "plain" / name).write_bytes(b"x")
    driver = QemuDriver(tmp_path / "state", [images])
    boot = driver.boot_files("plain")
    assert boot.disk is None and not boot.cloud_init and boot.cmdline == ""
    vm = VMConfig(str(uuid.uuid4()), "plain-one", 1, 256 * MiB, 64 * MiB, "plain")
    argv = driver.qemu_argv(vm, boot, 2222)
    drives = [argv[i + 1] for i, arg in enumerate(argv) if arg == "-drive"]
    assert len(drives) == 1 and "format=raw" in drives[0]


def test_on_the_cluster_network_the_seed_carries_the_vms_own_address(tmp_path: Path) -> None:
    images = tmp_path / "images"
    make_image(images, 0xAB)
    driver = QemuDriver(tmp_path / "state", [images])
    nic = Nic("10.77.0.5/16", "52:54:00:aa:bb:cc", "10.77.0.1", "10.77.0.1", "multiverse")
    vm = dataclasses.replace(new_vm(), network=NetworkAttachment("mvtap0", nic, mtu=1450))
    argv = driver.qemu_argv(vm, driver.boot_files(IMAGE), 0)
    assert "virtio-net-pci,netdev=net0,mac=52:54:00:aa:bb:cc" in argv
    path = tmp_path / SEED_FILE
    write_seed_iso(driver.seed(vm), path)
    config = yaml.safe_load(read_seed_iso(path)["network-config"])
    assert config["ethernets"] == {
        "eth0": {
            "match": {"macaddress": "52:54:00:aa:bb:cc"},
            "set-name": "eth0",
            "addresses": ["10.77.0.5/16"],
            "routes": [{"to": "0.0.0.0/0", "via": "10.77.0.1"}],
            "nameservers": {"addresses": ["10.77.0.1"], "search": ["multiverse"]},
            "mtu": 1450,
        }
    }
