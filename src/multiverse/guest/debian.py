"""The real guest "debian": Debian 12 (bookworm) with systemd, OpenSSH, cloud-init and the QEMU
guest agent, built from Debian packages with debootstrap.

Output, an image directory ``<images_dir>/debian/`` (the image store imports it as it is):

- ``disk.qcow2``: the root file system, ext4 labelled ``rootfs`` on the whole disk (no
  partition table, no bootloader), 2 GiB virtual, zstd-compressed qcow2. Instances boot a
  qcow2 overlay of it grown to their ``--disk``; cloud-init's resizefs grows the ext4 inside.
- ``vmlinux``, ``initrd.img``: the image's own kernel (decompressed to the ELF image that QEMU
  boots through its PVH entry, as the tiny guest's) and an initramfs made by initramfs-tools
  inside the image with just the modules that find and mount the root disk.
- ``image.json``: like the tiny image's manifest (name, kind "disk", files with sha256 and
  size, digest, release) plus ``boot``: which file is the kernel, the initrd and the disk, the
  kernel command line, and ``seed: nocloud``: cloud-init configures the guest from a NoCloud
  seed the driver attaches.

Why debootstrap and an external kernel: everything comes from the Debian archive through
Debian's own installer, and ``mkfs.ext4 -d`` turns the tree into a file system without loop
mounts; with the kernel outside the disk no bootloader or firmware boot is needed, which
under TCG saves seconds per boot.

The debootstrap step is slow (minutes: it downloads and configures ~250 packages) and depends
only on the package list, so its result is cached under ``<images_dir>/cache/`` and reused
when the rest of the recipe (this module) changes. Building needs root (debootstrap, chroot).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from multiverse.core.sizes import GiB
from multiverse.guest.cloudinit import SEED_NOCLOUD
from multiverse.guest.image import (
    BOOT_OK_MARKER,
    HOST_KEY_MARKER,
    INITRD_FILE,
    KERNEL_FILE,
    MANIFEST_FILE,
    ImageBuildError,
    Progress,
    extract_vmlinux,
)
from multiverse.guest.image import image_is_valid as manifest_is_valid

DEBIAN_IMAGE = "debian"
IMAGE_KIND = "disk"
SUITE = "bookworm"
MIRROR_ENV = "MULTIVERSE_DEBIAN_MIRROR"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
DISK_FILE = "disk.qcow2"
DISK_FORMAT = "qcow2"
DISK_SIZE = 2 * GiB
ROOT_LABEL = "rootfs"
# rw: no fsck and remount of / at boot; the driver adds the console and its own options.
# net.ifnames=0: the first NIC is eth0, as a network config without a MAC names it.
KERNEL_CMDLINE = "root=/dev/vda rootfstype=ext4 rw net.ifnames=0"

# On top of debootstrap's minbase. cloud-init's networkd renderer needs `ip` (iproute2);
# python3-cffi-backend is listed because debootstrap does not resolve the virtual package
# python3-cryptography depends on; udev finds the seed by its label; dbus serves hostnamectl.
PACKAGES = (
    "linux-image-amd64",
    "systemd",
    "systemd-sysv",
    "udev",
    "dbus",
    "iproute2",
    "openssh-server",
    "cloud-init",
    "python3-cffi-backend",
    "qemu-guest-agent",
)
# Modules the initramfs needs to find and mount the root disk (initramfs-tools adds their
# dependencies); crc32c_generic because ext4 looks crc32c up at mount time, not by symbol.
INITRAMFS_MODULES = ("virtio_pci", "virtio_blk", "ext4", "crc32c_generic")
# Kernel module trees no VM of ours has hardware for; a third of the image's size.
PRUNED_MODULES = (
    "sound",
    "drivers/gpu",
    "drivers/media",
    "drivers/infiniband",
    "drivers/net/wireless",
    "drivers/net/ethernet",
    "drivers/iio",
    "drivers/staging",
    "drivers/comedi",
    "drivers/mtd",
    "drivers/usb",
    "drivers/bluetooth",
    "drivers/isdn",
    "net/wireless",
    "net/mac80211",
    "net/bluetooth",
)
# What the image keeps of no use in a VM: package caches, docs, translations.
PRUNED_PATHS = (
    "var/cache/apt",
    "var/lib/apt/lists",
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
    "debootstrap",
)

# cloud-init, for every instance of the image: the NoCloud seed only (probing cloud metadata
# servers waits on the network), networkd renders the network config, and no step that is
# slow under TCG or needs a mirror (locale generation, RSA host keys).
_CLOUD_CFG = """\
# Multiverse: configured by a NoCloud seed (the cidata volume the driver attaches).
datasource_list: [NoCloud, None]
system_info:
  network:
    renderers: [networkd]
locale: false
ssh_genkeytypes: [ed25519, ecdsa]
grub_dpkg:
  enabled: false
ssh:
  emit_keys_to_console: false
"""

# Once SSH is up, prints on the console the host key the driver must then be offered (made by
# cloud-init at the first boot) and the driver's boot marker (it tries SSH at once).
_READY_UNIT = f"""\
[Unit]
Description=Tell the Multiverse driver on the console that SSH is up, and its host key
After=ssh.service

[Service]
Type=oneshot
StandardOutput=tty
TTYPath=/dev/console
ExecStart=/bin/sh -c 'echo "{HOST_KEY_MARKER}$(cat /etc/ssh/ssh_host_ed25519_key.pub)"'
ExecStart=/bin/sh -c 'echo "{BOOT_OK_MARKER} $(uname -r) $(hostname)"'

[Install]
WantedBy=multi-user.target
"""

# networkd's wait-online holds cloud-init back until the network is up, by default for two
# minutes when it never is (a NIC without a lease): give up sooner, cloud-init needs no network.
_WAIT_ONLINE = """\
[Service]
ExecStart=
ExecStart=/lib/systemd/systemd-networkd-wait-online --any --timeout=20
"""

_FILES = {
    "etc/fstab": f"LABEL={ROOT_LABEL} / ext4 defaults 0 1\n",
    "etc/hostname": f"{DEBIAN_IMAGE}\n",
    "etc/hosts": f"127.0.0.1 localhost\n127.0.1.1 {DEBIAN_IMAGE}\n",
    # Empty: systemd makes a machine id per instance at its first boot.
    "etc/machine-id": "",
    # The builder's resolver means nothing in a guest; networkd or the user set one.
    "etc/resolv.conf": "",
    "etc/cloud/cloud.cfg.d/90_multiverse.cfg": _CLOUD_CFG,
    "etc/initramfs-tools/conf.d/multiverse": "MODULES=list\n",
    "etc/initramfs-tools/modules": "".join(f"{module}\n" for module in INITRAMFS_MODULES),
    "etc/systemd/system/multiverse-ready.service": _READY_UNIT,
    "etc/systemd/system/systemd-networkd-wait-online.service.d/multiverse.conf": _WAIT_ONLINE,
}
_ENABLED_UNITS = ("systemd-networkd.service", "multiverse-ready.service")
# e2scrub_reap checks LVM snapshots we never have, for 15 s of emulated CPU at every boot.
_MASKED_UNITS = ("e2scrub_reap.service",)


def build_debian_image(images_dir: Path, progress: Progress | None = None) -> Path:
    """Build the "debian" image into ``images_dir/debian/`` unless a valid one is there.

    Idempotent and safe to call from several processes at once (a lock file serialises them).
    """
    say = progress or (lambda _message: None)
    images_dir.mkdir(parents=True, exist_ok=True)
    image_dir = images_dir / DEBIAN_IMAGE
    with (images_dir / f".{DEBIAN_IMAGE}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if image_is_valid(image_dir):
            return image_dir
        if os.geteuid() != 0:
            raise ImageBuildError("building the Debian image needs root (debootstrap, chroot)")
        started = time.monotonic()
        bootstrapped = bootstrap(images_dir / "cache", say)
        with tempfile.TemporaryDirectory(prefix=f".{DEBIAN_IMAGE}-", dir=images_dir) as work:
            root = Path(work) / "root"
            say("copying the bootstrapped system")
            _run(["cp", "-a", "--reflink=auto", str(bootstrapped), str(root)], "cp")
            kernel_version = configure(root, say)
            staging = Path(work) / DEBIAN_IMAGE
            staging.mkdir()
            _write_image(root, staging, kernel_version, say)
            if image_dir.exists():
                shutil.rmtree(image_dir)
            staging.rename(image_dir)
        say(f"built {DEBIAN_IMAGE} (Linux {kernel_version}) in {_took(started)}")
        return image_dir


def image_is_valid(image_dir: Path) -> bool:
    """Whether ``image_dir`` holds a complete Debian image of this recipe with intact files."""
    return manifest_is_valid(image_dir, recipe_digest())


def recipe_digest() -> str:
    """How the image is made: this module's source. A change rebuilds all but debootstrap."""
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()


def mirror() -> str:
    return os.environ.get(MIRROR_ENV, "").strip() or DEFAULT_MIRROR


def bootstrap_key(packages: Sequence[str] = PACKAGES) -> str:
    """What debootstrap's result depends on: suite, variant, mirror and packages."""
    recipe = f"{SUITE}\nminbase\n{mirror()}\n" + "\n".join(sorted(packages))
    return hashlib.sha256(recipe.encode()).hexdigest()[:16]


def bootstrap(cache_dir: Path, progress: Progress) -> Path:
    """The debootstrapped tree, from the cache or made now (and timed); older trees removed."""
    key = bootstrap_key()
    done = cache_dir / f"debian-{SUITE}-{key}"
    if (done / "etc" / "debian_version").is_file():
        progress(f"using the debootstrapped system cached in {done}")
        return done
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = done.with_name(done.name + ".partial")
    if partial.exists():
        _unmount_under(partial)  # a killed debootstrap may leave /proc or /sys mounted there
        shutil.rmtree(partial)
    started = time.monotonic()
    argv = [
        "debootstrap",
        "--variant=minbase",
        "--components=main",
        f"--include={','.join(PACKAGES)}",
        SUITE,
        str(partial),
        mirror(),
    ]
    try:
        process = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        )
    except OSError as error:
        raise ImageBuildError(f"cannot run debootstrap ({error}): install debootstrap") from error
    assert process.stdout is not None
    lines: list[str] = []
    for line in process.stdout:
        lines.append(line.rstrip())
        progress("debootstrap: " + line.strip().removeprefix("I: "))
    if process.wait() != 0:
        raise ImageBuildError(
            f"debootstrap failed (exit {process.returncode}):\n" + "\n".join(lines[-20:])
        )
    # The downloaded packages are in the tree now; the image does not keep them.
    for deb in (partial / "var/cache/apt/archives").glob("*.deb"):
        deb.unlink()
    partial.rename(done)
    for stale in cache_dir.glob(f"debian-{SUITE}-*"):
        if stale != done:
            shutil.rmtree(stale, ignore_errors=True)
    progress(f"debootstrap took {_took(started)}")
    return done


def configure(root: Path, progress: Progress) -> str:
    """Make the bootstrapped tree a guest: our files, units, a small initramfs, no caches.

    Returns the kernel version.
    """
    kernels = sorted((root / "boot").glob("vmlinuz-*"))
    if len(kernels) != 1:
        raise ImageBuildError(f"expected one kernel in the image, found {len(kernels)}")
    kernel_version = kernels[0].name.removeprefix("vmlinuz-")
    progress("configuring the guest")
    for relative, text in _FILES.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)  # may be a symlink into the host (resolv.conf)
        path.write_text(text)
    (root / "var/lib/dbus/machine-id").unlink(missing_ok=True)
    # Every instance gets its own host keys at its first boot (cloud-init's ssh module).
    for key in (root / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    _chroot(root, ["systemctl", "enable", *_ENABLED_UNITS])
    _chroot(root, ["systemctl", "mask", *_MASKED_UNITS])
    progress("pruning kernel modules")
    modules = root / "lib/modules" / kernel_version / "kernel"
    for relative in PRUNED_MODULES:
        shutil.rmtree(modules / relative, ignore_errors=True)
    _chroot(root, ["depmod", "-a", kernel_version])
    progress("writing the initramfs")
    _chroot(root, ["update-initramfs", "-u", "-k", kernel_version])
    for relative in PRUNED_PATHS:
        shutil.rmtree(root / relative, ignore_errors=True)
    (root / "var/cache/apt/archives/partial").mkdir(parents=True)
    (root / "var/lib/apt/lists/partial").mkdir(parents=True)
    for log in (root / "var/log").rglob("*"):
        if log.is_file():
            log.unlink()
    return kernel_version


def _write_image(root: Path, out: Path, kernel_version: str, progress: Progress) -> None:
    """Write the kernel, initrd, compressed disk and manifest of the configured tree."""
    progress("decompressing the kernel")
    (out / KERNEL_FILE).write_bytes(
        extract_vmlinux((root / "boot" / f"vmlinuz-{kernel_version}").read_bytes())
    )
    shutil.copyfile(root / "boot" / f"initrd.img-{kernel_version}", out / INITRD_FILE)
    packages = _chroot(root, ["dpkg-query", "-W", "-f", "${Package}=${Version}\\n"]).split()
    release = _os_release(root).get("PRETTY_NAME", "Debian")

    progress("making the ext4 root file system")
    raw = out / "disk.raw"
    with raw.open("wb") as file:
        file.truncate(DISK_SIZE)
    # Inode tables and journal written now: zeroing them lazily in the guest would cost
    # emulated CPU at every instance's first boot, and zeros compress to nothing.
    _run(
        ["mkfs.ext4", "-q", "-F", "-L", ROOT_LABEL, "-m", "1", "-d", str(root),
         "-E", "lazy_itable_init=0,lazy_journal_init=0", str(raw)],
        "mkfs.ext4",
    )  # fmt: skip
    progress("compressing the disk (qcow2)")
    _run(
        ["qemu-img", "convert", "-c", "-O", DISK_FORMAT, "-o", "compression_type=zstd",
         str(raw), str(out / DISK_FILE)],
        "qemu-img convert",
    )  # fmt: skip
    raw.unlink()

    names = (KERNEL_FILE, INITRD_FILE, DISK_FILE)
    digests = {name: _sha256(out / name) for name in names}
    sizes = {name: (out / name).stat().st_size for name in names}
    summary = "".join(f"{name}:{digests[name]}\n" for name in sorted(names))
    manifest = {
        "name": DEBIAN_IMAGE,
        "kind": IMAGE_KIND,
        "architecture": "x86_64",
        "kernel_version": kernel_version,
        "release": release,
        "size": sum(sizes.values()),
        "digest": "sha256:" + hashlib.sha256(summary.encode()).hexdigest(),
        "files": {name: {"sha256": digests[name], "size": sizes[name]} for name in names},
        # Strings only, as the image store keeps boot hints; "seed": what configures the guest.
        "boot": {
            "kernel": KERNEL_FILE,
            "initrd": INITRD_FILE,
            "disk": DISK_FILE,
            "format": DISK_FORMAT,
            "cmdline": KERNEL_CMDLINE,
            "seed": SEED_NOCLOUD,
        },
        "packages": sorted(packages),
        "recipe": recipe_digest(),
    }
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def _unmount_under(path: Path) -> None:
    resolved = str(path.resolve())
    with open("/proc/self/mounts") as mounts:
        points = [line.split()[1] for line in mounts]
    for point in sorted(points, key=len, reverse=True):
        if point == resolved or point.startswith(resolved + "/"):
            _run(["umount", "-l", point], "umount")


def _os_release(root: Path) -> dict[str, str]:
    fields = {}
    for line in (root / "usr/lib/os-release").read_text().splitlines():
        key, _, value = line.partition("=")
        fields[key] = value.strip('"')
    return fields


def _chroot(root: Path, argv: Sequence[str]) -> str:
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "HOME": "/root"}
    return _run(["chroot", str(root), *argv], argv[0], env=env)


def _run(argv: Sequence[str], what: str, env: dict[str, str] | None = None) -> str:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, check=False, env=env)
    except OSError as error:
        raise ImageBuildError(f"cannot run {what}: {error}") from error
    if result.returncode != 0:
        raise ImageBuildError(f"{what} failed: {(result.stderr or result.stdout).strip()}")
    return result.stdout


def _sha256(path: Path) -> str:
    with path.open("rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def _took(started: float) -> str:
    seconds = time.monotonic() - started
    return f"{int(seconds // 60)}m{seconds % 60:04.1f}s" if seconds >= 60 else f"{seconds:.1f}s"
