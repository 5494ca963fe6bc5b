"""The test guest "tiny": a stock Debian kernel and a small initramfs, built from .deb packages.

Why build our own: it answers SSH ~4 s after QEMU starts under TCG (no bootloader, no disk image),
needs nothing but apt and Python on the host, and every byte of it is reproducible from the
Debian archive. The output is an image directory ``<images_dir>/tiny/`` with

- ``vmlinux``: the kernel's ELF image, decompressed out of the packaged bzImage. QEMU boots it
  directly through its PVH entry note, skipping SeaBIOS' slow real-mode decompression.
- ``initrd.img``: a gzip'd newc cpio archive written here (no cpio tool), holding busybox,
  dropbear with the shared libraries it links, the kernel modules the guest needs, and the
  scripts below.
- ``image.json``: name, kind, kernel version, sizes and sha256 digests.

How a VM is configured (the contract with the driver): QEMU's fw_cfg files named
``opt/multiverse/<key>`` (``-fw_cfg name=opt/multiverse/<key>,file=...``), read by the guest
under ``/sys/firmware/qemu_fw_cfg/by_name/``. fw_cfg rather than the kernel command line because
it carries any bytes (keys, later user data) without quoting rules or the 2 KiB cmdline limit.

- ``hostname``: the guest's hostname (default ``tiny``);
- ``authorized_keys``: written to root's ``~/.ssh/authorized_keys`` at every boot;
- ``network``: ``address=10.0.2.15/24``, ``gateway=...``, ``dns=...`` (on the cluster network
  also ``search=...`` and ``mtu=...``) lines for a static eth0;
  without it the guest asks DHCP (udhcpc);
- ``user-data``: if it is a script (``#!``), run once at the first boot (once per data disk),
  in the background, its output in ``/var/log/user-data.log``.

In the guest, busybox ``init`` is PID 1 (it reaps orphans and respawns the services); its
sysinit script loads the modules, mounts the data disk ``/dev/vda`` (ext4) on ``/data`` with
root's home on it (so what users write survives stop/start) and the SSH host key (made at the
first boot), starts networking, prints ``multiverse: host key <key>`` and then
``multiverse: boot ok`` on the serial console; dropbear and acpid then run as respawned services.
The ACPI power button (QMP ``system_powerdown``) syncs, unmounts and powers off at once.
Ctrl+Alt+Del (Firecracker's ``SendCtrlAltDel``, through the i8042 keyboard: Firecracker has no
ACPI power-off on x86) reboots after the same sync and unmount; with ``reboot=k`` that ends the
Firecracker process, which has no reset.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import shutil
import stat
import struct
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from multiverse.core.errors import MultiverseError

TEST_IMAGE = "tiny"
IMAGE_KIND = "kernel+initrd"
KERNEL_FILE = "vmlinux"
INITRD_FILE = "initrd.img"
MANIFEST_FILE = "image.json"
OS_VERSION = "1"

# The fw_cfg names the guest reads; the driver writes files under these names.
FW_CFG_PREFIX = "opt/multiverse/"
BOOT_OK_MARKER = "multiverse: boot ok"
HOST_KEY_MARKER = "multiverse: host key "  # then the SSH host key, printed before the boot line
DATA_MOUNT = "/data"

# The meta-package that names the current kernel; its versioned dependency is the real kernel.
KERNEL_META_PACKAGE = "linux-image-amd64"
USERLAND_PACKAGES = (
    "busybox-static",
    "dropbear-bin",
    # dropbear's shared libraries (libtomcrypt pulls libgmp in); the loader comes with libc6.
    "libc6",
    "libcrypt1",
    "libtomcrypt1",
    "libtommath1",
    "zlib1g",
    "libgmp10",
)
# Loaded in this order, each after its own dependencies (read from the modules themselves).
# crc32c_generic is listed by hand: ext4 and jbd2 look crc32c up through the crypto API at
# mount time instead of linking it, so no depends= line names it (and crc32c-intel would need
# SSE4.2, which TCG's default CPU lacks).
GUEST_MODULES = (
    "virtio_pci",
    # Firecracker's transport (unless --enable-pci). Debian's kernel lacks
    # VIRTIO_MMIO_CMDLINE_DEVICES: it finds the devices through ACPI (Firecracker >= 1.8).
    "virtio_mmio",
    "virtio_net",
    "virtio_blk",
    "virtio_console",
    "virtio_rng",
    "crc32c_generic",
    "ext4",
    "button",
    "evdev",
    "qemu_fw_cfg",
)
GUEST_BINARIES = {
    "bin/busybox": "bin/busybox",
    "usr/sbin/dropbear": "usr/sbin/dropbear",
    "usr/bin/dropbearkey": "usr/bin/dropbearkey",
}
LIBRARY_DIRS = ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu")

# Fixed timestamp of every archive member, so that the same packages give the same bytes.
SOURCE_DATE_EPOCH = 0

Progress = Callable[[str], None]


class ImageBuildError(MultiverseError):
    """The test image could not be built (apt, dpkg or the packages' contents)."""

    code = "image_build_failed"


# ---------------------------------------------------------------------------------------------
# The guest's own files
# ---------------------------------------------------------------------------------------------

_RCS = r"""#!/bin/sh
# Multiverse tiny guest: one-time setup, run by busybox init before it starts the services.
/bin/busybox --install -s
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts

# No depmod/modprobe here: the build wrote the modules in dependency order.
while read -r module; do
    insmod "/lib/modules/$module.ko" || echo "multiverse: cannot load module $module"
done < /etc/multiverse/modules

# fw_cfg under QEMU; without it (Firecracker) the kernel command line: multiverse.<key>=<base64>.
config() {
    fw="/sys/firmware/qemu_fw_cfg/by_name/opt/multiverse/$1/raw"
    if [ -r "$fw" ]; then
        cat "$fw"
        return
    fi
    for word in $(cat /proc/cmdline); do
        case "$word" in
            "multiverse.$1="*) echo "${word#*=}" | base64 -d 2>/dev/null ;;
        esac
    done
}

# The kernel's own ip=<guest>::<gateway>:<netmask>:<hostname>:eth0:off, as Firecracker hosts
# pass it (this kernel has no IP autoconfiguration, so we apply it), as a network config.
cmdline_network() {
    for word in $(cat /proc/cmdline); do
        case "$word" in
            ip=*)
                IFS=: read -r guest _ gateway netmask host _ <<IP
${word#ip=}
IP
                [ -n "$guest" ] || continue
                eval "$(ipcalc -p "$guest" "${netmask:-255.255.255.0}")"
                echo "address=$guest/$PREFIX"
                [ -n "$gateway" ] && echo "gateway=$gateway"
                [ -n "$host" ] && echo "hostname=$host"
                ;;
        esac
    done
}

network=$(config network)
[ -n "$network" ] || network=$(cmdline_network)

name=$(config hostname)
[ -n "$name" ] || name=$(echo "$network" | sed -n 's/^hostname=//p')
hostname "${name:-tiny}"
hostname > /etc/hostname
printf '127.0.0.1 localhost\n127.0.1.1 %s\n' "$(hostname)" > /etc/hosts

ip link set lo up
ip link set eth0 up
address= gateway= dns= search= mtu=
while IFS='=' read -r key value; do
    case "$key" in
        address) address=$value ;;
        gateway) gateway=$value ;;
        dns) dns=$value ;;
        search) search=$value ;;
        mtu) mtu=$value ;;
    esac
done <<EOF
$network
EOF
# The cluster network's overlay leaves less than 1500 bytes per frame: the node says how much.
[ -n "$mtu" ] && ip link set eth0 mtu "$mtu"
if [ -n "$address" ]; then
    ip addr add "$address" dev eth0
    [ -n "$gateway" ] && ip route add default via "$gateway"
    [ -n "$dns" ] && echo "nameserver $dns" > /etc/resolv.conf
    [ -n "$search" ] && echo "search $search" >> /etc/resolv.conf
else
    udhcpc -i eth0 -n -q -t 10 -T 1 -s /usr/share/udhcpc/default.script \
        || echo "multiverse: no DHCP lease on eth0"
fi

# The data disk keeps root's home and the SSH host key across stop/start.
keys=/run/dropbear
if [ -b /dev/vda ]; then
    mkdir -p /data
    # noinit_itable: zeroing inode tables in the background would eat the emulated CPU.
    if mount -t ext4 -o noinit_itable /dev/vda /data; then
        mkdir -p /data/root /data/.multiverse/dropbear
        chmod 700 /data/root /data/.multiverse/dropbear
        mount --bind /data/root /root
        keys=/data/.multiverse/dropbear
    else
        echo "multiverse: cannot mount /dev/vda on /data"
    fi
fi
mkdir -p "$keys" /root/.ssh
chmod 700 "$keys" /root /root/.ssh
ln -sfn "$keys" /etc/dropbear
config authorized_keys > /root/.ssh/authorized_keys
chmod 600 /root/.ssh/authorized_keys
host_key=/etc/dropbear/dropbear_ed25519_host_key
if [ ! -s "$host_key" ]; then
    dropbearkey -t ed25519 -f "$host_key" > /dev/null 2>&1
fi
# The host checks SSH logins against this key: it reads it from the hypervisor's console log,
# a channel no one on the network can write, before dropbear even starts.
echo "multiverse: host key $(dropbearkey -y -f "$host_key" | grep '^ssh-')"

# User-data that is a script (#!) runs once, at the first boot, as cloud-init runs that form;
# in the background, so that SSH does not wait for it. Once per data disk: the marker is there.
config user-data > /run/user-data
if [ "$(head -c 2 /run/user-data)" = "#!" ]; then
    ran=/run/user-data.ran
    [ -d /data/.multiverse ] && ran=/data/.multiverse/user-data.ran
    if [ ! -e "$ran" ]; then
        : > "$ran"
        chmod 700 /run/user-data
        (/run/user-data > /var/log/user-data.log 2>&1; echo "multiverse: user-data exited $?") &
    fi
fi

echo "multiverse: boot ok $(uname -r) $(hostname) $(ip -4 -o addr show eth0 | awk '{print $4}')"
"""

_POWEROFF = r"""#!/bin/sh
# ACPI power button: QMP system_powerdown. Flush the data disk, then power off without delay.
sync
umount /root /data 2>/dev/null || mount -o remount,ro /data 2>/dev/null
poweroff -f
"""

_INITTAB = """\
::sysinit:/etc/init.d/rcS
::respawn:/usr/sbin/dropbear -F -E -s -p 22 -r /etc/dropbear/dropbear_ed25519_host_key
::respawn:/sbin/acpid -f -c /etc/acpi -l /var/log/acpid.log
::ctrlaltdel:/sbin/reboot
::shutdown:/bin/sh -c 'sync; umount /root; umount -a -r'
"""

_UDHCPC_SCRIPT = r"""#!/bin/sh
# udhcpc hands the lease over in the environment; apply it to the interface.
case "$1" in
    deconfig)
        ip addr flush dev "$interface"
        ip link set "$interface" up
        ;;
    bound|renew)
        ip addr flush dev "$interface"
        ip addr add "$ip/${mask:-24}" dev "$interface"
        for gw in $router; do ip route add default via "$gw" dev "$interface"; break; done
        : > /etc/resolv.conf
        for server in $dns; do echo "nameserver $server" >> /etc/resolv.conf; done
        ;;
esac
exit 0
"""

_STATIC_FILES = {
    "etc/inittab": _INITTAB,
    "etc/passwd": "root:x:0:0:root:/root:/bin/sh\n",
    "etc/group": "root:x:0:\ntty:x:5:\n",
    "etc/shells": "/bin/sh\n/bin/ash\n",
    "etc/nsswitch.conf": "passwd: files\ngroup: files\nshadow: files\nhosts: files dns\n",
    "etc/profile": 'export PATH=/usr/sbin:/usr/bin:/sbin:/bin\nPS1="\\u@\\h:\\w\\$ "\n',
}
_SCRIPTS = {
    "etc/init.d/rcS": _RCS,
    "etc/acpi/PWRF/00000080": _POWEROFF,
    "usr/share/udhcpc/default.script": _UDHCPC_SCRIPT,
}


def os_release(kernel_version: str) -> str:
    """The guest's /etc/os-release; ``multiverse info`` shows its PRETTY_NAME as the release."""
    return (
        'NAME="Multiverse tiny"\n'
        "ID=multiverse-tiny\n"
        f'VERSION_ID="{OS_VERSION}"\n'
        f'PRETTY_NAME="Multiverse tiny {OS_VERSION} (Linux {kernel_version})"\n'
    )


# ---------------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------------


def build_test_image(images_dir: Path, progress: Progress | None = None) -> Path:
    """Build the "tiny" image into ``images_dir/tiny/`` unless a valid one is already there.

    Idempotent and safe to call from several processes at once (a lock file serialises them).
    Downloaded packages stay in ``images_dir/cache/debs`` so that a rebuild needs no network.
    """
    say = progress or (lambda _message: None)
    images_dir.mkdir(parents=True, exist_ok=True)
    image_dir = images_dir / TEST_IMAGE
    with _locked(images_dir / f".{TEST_IMAGE}.lock"):
        if image_is_valid(image_dir):
            return image_dir
        cache = images_dir / "cache" / "debs"
        say("resolving the kernel package")
        kernel_package = kernel_package_name()
        debs = fetch_packages([kernel_package, *USERLAND_PACKAGES], cache, say)
        with tempfile.TemporaryDirectory(prefix=f".{TEST_IMAGE}-", dir=images_dir) as work:
            root = Path(work) / "root"
            say("extracting packages")
            extract_packages(debs, root)
            staging = Path(work) / TEST_IMAGE
            staging.mkdir()
            kernel_version = _write_image(root, staging, debs, say)
            if image_dir.exists():
                shutil.rmtree(image_dir)
            staging.rename(image_dir)
        say(f"built {TEST_IMAGE} (Linux {kernel_version}) in {image_dir}")
        return image_dir


def image_is_valid(image_dir: Path, recipe: str = "") -> bool:
    """Whether ``image_dir`` holds a complete image of ``recipe`` (default: the tiny image's
    current one) with intact files."""
    try:
        manifest = json.loads((image_dir / MANIFEST_FILE).read_text())
        if manifest.get("recipe") != (recipe or recipe_digest()):
            return False
        for name, entry in manifest["files"].items():
            path = image_dir / name
            if path.stat().st_size != entry["size"] or _sha256_file(path) != entry["sha256"]:
                return False
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    return True


def recipe_digest() -> str:
    """A digest of how the image is made: this module's own source, which holds the scripts,
    package and module lists and the archive writer. Any change to it rebuilds the image."""
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Packages
# ---------------------------------------------------------------------------------------------


def kernel_package_name() -> str:
    """The versioned kernel package (``linux-image-6.1.0-NN-amd64``) the meta-package names.

    apt's package lists may be missing on a fresh machine: then update them once and retry.
    """
    for attempt in range(2):
        result = subprocess.run(
            ["apt-cache", "depends", KERNEL_META_PACKAGE],
            capture_output=True,
            text=True,
            check=False,
        )
        match = re.search(r"Depends:\s*(linux-image-\S+-amd64)\s*$", result.stdout, re.MULTILINE)
        if match:
            return match.group(1)
        if attempt == 0:
            _apt_update()
    raise ImageBuildError(
        f"apt does not know {KERNEL_META_PACKAGE}: {result.stderr.strip() or result.stdout}"
    )


def fetch_packages(names: Sequence[str], cache_dir: Path, progress: Progress) -> list[Path]:
    """The .deb of each package, downloaded with ``apt-get download`` unless already cached."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    missing = [name for name in names if _cached_deb(cache_dir, name) is None]
    if missing:
        progress(f"downloading {', '.join(missing)}")
        result = _apt_get_download(missing, cache_dir)
        if result.returncode != 0 and "Unable to locate package" in result.stderr:
            _apt_update()
            result = _apt_get_download(missing, cache_dir)
        if result.returncode != 0:
            raise ImageBuildError(f"apt-get download failed: {result.stderr.strip()}")
    debs = []
    for name in names:
        deb = _cached_deb(cache_dir, name)
        if deb is None:
            raise ImageBuildError(f"apt-get download did not produce a .deb for {name}")
        debs.append(deb)
    return debs


def extract_packages(debs: Iterable[Path], root: Path) -> None:
    """Unpack the packages' files into one tree, as dpkg would install them (without scripts)."""
    root.mkdir(parents=True, exist_ok=True)
    for deb in debs:
        result = subprocess.run(
            ["dpkg", "-x", str(deb), str(root)], capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            raise ImageBuildError(f"dpkg -x {deb.name} failed: {result.stderr.strip()}")


def _cached_deb(cache_dir: Path, name: str) -> Path | None:
    # apt names files <package>_<version>_<arch>.deb; the newest download wins if several.
    candidates = sorted(cache_dir.glob(f"{name}_*.deb"), key=lambda path: path.stat().st_mtime)
    return candidates[-1] if candidates else None


def _apt_get_download(names: Sequence[str], cache_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["apt-get", "download", *names],
        cwd=cache_dir,
        capture_output=True,
        text=True,
        check=False,
    )


def _apt_update() -> None:
    result = subprocess.run(["apt-get", "update"], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise ImageBuildError(f"apt-get update failed: {result.stderr.strip()}")


# ---------------------------------------------------------------------------------------------
# Kernel, modules and libraries
# ---------------------------------------------------------------------------------------------

_XZ_MAGIC = b"\xfd7zXZ\x00"


def extract_vmlinux(vmlinuz: bytes) -> bytes:
    """The ELF kernel inside a bzImage whose payload is xz-compressed (Debian's choice).

    The payload starts at the first xz stream magic that decompresses to an ELF file; whatever
    follows the stream (the decompressor's trailer) is ignored.
    """
    start = vmlinuz.find(_XZ_MAGIC)
    while start != -1:
        decompressor = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
        try:
            elf = decompressor.decompress(vmlinuz[start:])
        except lzma.LZMAError:
            elf = b""
        if elf.startswith(b"\x7fELF"):
            return elf
        start = vmlinuz.find(_XZ_MAGIC, start + 1)
    raise ImageBuildError("no xz-compressed ELF kernel found in vmlinuz")


def elf_section(elf: bytes, name: str) -> bytes | None:
    """The contents of the named section of a 64-bit little-endian ELF file, if it has one."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        raise ImageBuildError("not a 64-bit little-endian ELF file")
    (shoff,) = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)
    headers = [
        struct.unpack_from("<IIQQQQIIQQ", elf, shoff + index * shentsize) for index in range(shnum)
    ]
    if not headers:
        return None
    names_offset, names_size = headers[shstrndx][4], headers[shstrndx][5]
    names = elf[names_offset : names_offset + names_size]
    for header in headers:
        name_end = names.index(b"\0", header[0])
        if names[header[0] : name_end].decode() == name:
            sh_type, offset, size = header[1], header[4], header[5]
            return b"" if sh_type == 8 else elf[offset : offset + size]  # 8: SHT_NOBITS
    return None


def module_dependencies(ko: bytes) -> list[str]:
    """The modules a .ko needs loaded first: the ``depends=`` entry of its .modinfo section."""
    info = elf_section(ko, ".modinfo") or b""
    for entry in info.split(b"\0"):
        if entry.startswith(b"depends="):
            return [name for name in entry[len(b"depends=") :].decode().split(",") if name]
    return []


def module_load_order(
    wanted: Sequence[str], dependencies: Callable[[str], Sequence[str]]
) -> list[str]:
    """``wanted`` and everything they depend on, each module after its dependencies.

    Keeps the order of ``wanted`` where the dependencies allow; a cycle is an error.
    """
    order: list[str] = []
    visiting: set[str] = set()

    def visit(module: str) -> None:
        if module in order:
            return
        if module in visiting:
            raise ImageBuildError(f"kernel modules depend on each other in a cycle at {module}")
        visiting.add(module)
        for dependency in dependencies(module):
            visit(dependency)
        visiting.discard(module)
        order.append(module)

    for module in wanted:
        visit(module)
    return order


def needed_libraries(elf: bytes) -> list[str]:
    """The sonames a dynamically linked program asks the loader for (its DT_NEEDED entries)."""
    dynamic = elf_section(elf, ".dynamic")
    strings = elf_section(elf, ".dynstr")
    if dynamic is None or strings is None:
        return []
    needed = []
    for offset in range(0, len(dynamic) - 15, 16):
        tag, value = struct.unpack_from("<qQ", dynamic, offset)
        if tag == 0:  # DT_NULL ends the table
            break
        if tag == 1:  # DT_NEEDED: value is an offset into .dynstr
            needed.append(strings[value : strings.index(b"\0", value)].decode())
    return needed


def elf_interpreter(elf: bytes) -> str | None:
    """The loader path a dynamically linked program names (its .interp section)."""
    interp = elf_section(elf, ".interp")
    return interp.rstrip(b"\0").decode() if interp else None


# ---------------------------------------------------------------------------------------------
# The initramfs archive
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CpioEntry:
    """One member of a newc archive: ``path`` relative to the root, ``mode`` with its type."""

    path: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


class Initramfs:
    """The files of an initramfs, collected by path and written as a reproducible archive."""

    def __init__(self) -> None:
        self.entries: dict[str, CpioEntry] = {}

    def add_dir(self, path: str, mode: int = 0o755) -> None:
        path = path.strip("/")
        if not path or path in self.entries:
            return
        self.add_dir(os.path.dirname(path))
        self.entries[path] = CpioEntry(path, stat.S_IFDIR | mode)

    def add_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        path = path.strip("/")
        self.add_dir(os.path.dirname(path))
        self.entries[path] = CpioEntry(path, stat.S_IFREG | mode, data)

    def add_symlink(self, path: str, target: str) -> None:
        path = path.strip("/")
        self.add_dir(os.path.dirname(path))
        self.entries[path] = CpioEntry(path, stat.S_IFLNK | 0o777, target.encode())

    def add_char_device(self, path: str, major: int, minor: int, mode: int) -> None:
        path = path.strip("/")
        self.add_dir(os.path.dirname(path))
        self.entries[path] = CpioEntry(path, stat.S_IFCHR | mode, rdev=(major, minor))

    def newc(self) -> bytes:
        # "." first: the kernel applies its mode to / (else the root stays world-writable).
        root = CpioEntry(".", stat.S_IFDIR | 0o755)
        return newc_archive([root, *(self.entries[path] for path in sorted(self.entries))])

    def write_gzip(self, path: Path) -> None:
        """Gzip without a name or time in the header, so equal archives give equal files."""
        buffer = io.BytesIO()
        with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, mtime=0) as archive:
            archive.write(self.newc())
        path.write_bytes(buffer.getvalue())


def newc_archive(entries: Iterable[CpioEntry], mtime: int = SOURCE_DATE_EPOCH) -> bytes:
    """The "new ASCII" cpio format the kernel unpacks: a 110-byte hex header per member.

    Owners are root and times fixed; inode numbers count up in archive order.
    """
    out = bytearray()

    def member(ino: int, mode: int, name: str, data: bytes, rdev: tuple[int, int]) -> None:
        name_bytes = name.encode() + b"\0"
        nlink = 2 if stat.S_ISDIR(mode) else 1
        fields = (ino, mode, 0, 0, nlink, mtime, len(data), 0, 0, *rdev, len(name_bytes), 0)
        out.extend(b"070701" + b"".join(b"%08X" % value for value in fields))
        out.extend(name_bytes)
        out.extend(b"\0" * (-len(out) % 4))
        out.extend(data)
        out.extend(b"\0" * (-len(out) % 4))

    count = 0
    for count, entry in enumerate(entries, start=1):
        member(count, entry.mode, entry.path, entry.data, entry.rdev)
    member(count + 1, 0, "TRAILER!!!", b"", (0, 0))
    return bytes(out)


# ---------------------------------------------------------------------------------------------
# Assembly
# ---------------------------------------------------------------------------------------------


def _write_image(root: Path, out: Path, debs: Sequence[Path], progress: Progress) -> str:
    """Write vmlinux, initrd.img and image.json for the unpacked packages in ``root``."""
    kernels = sorted((root / "boot").glob("vmlinuz-*"))
    if len(kernels) != 1:
        raise ImageBuildError(f"expected one kernel in the package, found {len(kernels)}")
    kernel_version = kernels[0].name.removeprefix("vmlinuz-")

    progress("decompressing the kernel")
    (out / KERNEL_FILE).write_bytes(extract_vmlinux(kernels[0].read_bytes()))

    progress("writing the initramfs")
    initramfs = Initramfs()
    for directory, mode in (
        ("dev", 0o755), ("proc", 0o555), ("sys", 0o555), ("run", 0o755), ("tmp", 0o1777),
        ("var/log", 0o755), ("root", 0o700), ("etc/multiverse", 0o755),
    ):  # fmt: skip
        initramfs.add_dir(directory, mode)
    # The kernel opens /dev/console for init before anything could mount devtmpfs.
    initramfs.add_char_device("dev/console", 5, 1, 0o600)
    initramfs.add_char_device("dev/null", 1, 3, 0o666)
    initramfs.add_symlink("init", "/bin/busybox")  # busybox runs as init when called "init"
    initramfs.add_symlink("sbin/init", "/bin/busybox")
    initramfs.add_symlink("bin/sh", "busybox")
    _add_programs(initramfs, root)
    modules = _add_modules(initramfs, root, kernel_version)
    initramfs.add_file("etc/multiverse/modules", "".join(f"{m}\n" for m in modules).encode())
    for path, text in _STATIC_FILES.items():
        initramfs.add_file(path, text.encode())
    for path, text in _SCRIPTS.items():
        initramfs.add_file(path, text.encode(), 0o755)
    initramfs.add_file("etc/os-release", os_release(kernel_version).encode())
    initramfs.write_gzip(out / INITRD_FILE)

    digests = {name: _sha256_file(out / name) for name in (KERNEL_FILE, INITRD_FILE)}
    sizes = {name: (out / name).stat().st_size for name in digests}
    # One digest names the image as a whole: the sorted "file:sha256" lines, hashed.
    summary = "".join(f"{name}:{digests[name]}\n" for name in sorted(digests))
    manifest = {
        "name": TEST_IMAGE,
        "kind": IMAGE_KIND,
        "kernel_version": kernel_version,
        "release": f"Multiverse tiny {OS_VERSION}",
        "size": sum(sizes.values()),
        "digest": "sha256:" + hashlib.sha256(summary.encode()).hexdigest(),
        "files": {name: {"sha256": digests[name], "size": sizes[name]} for name in digests},
        "packages": sorted(deb.name for deb in debs),
        "modules": modules,
        "recipe": recipe_digest(),
    }
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return kernel_version


def _add_programs(initramfs: Initramfs, root: Path) -> None:
    """The binaries, the shared libraries they need (transitively) and the dynamic loader."""
    pending: list[bytes] = []
    for source, target in GUEST_BINARIES.items():
        data = _read_from(root, source)
        initramfs.add_file(target, data, 0o755)
        pending.append(data)
    seen: set[str] = set()
    while pending:
        elf = pending.pop()
        interpreter = elf_interpreter(elf)
        if interpreter and interpreter.strip("/") not in initramfs.entries:
            initramfs.add_file(interpreter, _read_from(root, interpreter.strip("/")), 0o755)
        for soname in needed_libraries(elf):
            if soname in seen:
                continue
            seen.add(soname)
            library = _find_library(root, soname)
            initramfs.add_file(f"{LIBRARY_DIRS[0]}/{soname}", library, 0o755)
            pending.append(library)


def _add_modules(initramfs: Initramfs, root: Path, kernel_version: str) -> list[str]:
    """Copy the wanted modules and their dependencies flat under /lib/modules/<version>/."""
    tree = root / "lib" / "modules" / kernel_version
    # Module names use underscores where file names may use dashes; the kernel treats both alike.
    files = {path.name.removesuffix(".ko").replace("-", "_"): path for path in tree.rglob("*.ko")}
    contents: dict[str, bytes] = {}

    def dependencies(module: str) -> list[str]:
        if module not in files:
            raise ImageBuildError(f"kernel module {module} is not in the kernel package")
        contents[module] = files[module].read_bytes()
        return module_dependencies(contents[module])

    order = module_load_order(GUEST_MODULES, dependencies)
    for module in order:
        initramfs.add_file(f"lib/modules/{module}.ko", contents[module])
    return order


def _find_library(root: Path, soname: str) -> bytes:
    for directory in LIBRARY_DIRS:
        path = root / directory / soname
        if path.exists():
            return _read_from(root, f"{directory}/{soname}")
    raise ImageBuildError(f"shared library {soname} is in none of the packages")


def _read_from(root: Path, relative: str) -> bytes:
    """Read a file of the unpacked tree, following symlinks inside the tree, not the host's."""
    path = root / relative
    for _ in range(16):
        if not path.is_symlink():
            try:
                return path.read_bytes()
            except OSError as error:
                raise ImageBuildError(f"cannot read /{relative} of the packages: {error}") from None
        target = os.readlink(path)
        path = root / target.lstrip("/") if target.startswith("/") else path.parent / target
    raise ImageBuildError(f"too many symlinks at /{relative}")


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
