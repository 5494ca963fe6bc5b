"""Image manifests: what a guest image is made of, named by one digest.

An image is a few files (the tiny guest: ``vmlinux`` and ``initrd.img``; a disk image: one
qcow2 or raw file; a rootfs: ``rootfs.ext4`` plus a kernel). Its manifest is the ``image.json``
the tiny guest's build writes, extended rather than replaced: ``name``, ``kind``, ``files``
(``{name: {"sha256", "size"}}``), ``digest``, ``size``, and optional ``architecture`` and
``boot`` hints (which file is the kernel, the initrd, the disk and its format, a kernel command
line). Keys it does not know (the tiny build's ``modules``, ``recipe``...) are kept as they are.

The digest names the file set, not the name: ``sha256`` of the sorted ``"<file>:<sha256>\\n"``
lines, as the tiny build has always computed it. Two imports of the same files are one image.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from multiverse.core.errors import InvalidArgument

__all__ = [
    "DEFAULT_BOOT",
    "DISK",
    "KERNEL_INITRD",
    "KINDS",
    "MANIFEST_FILE",
    "ROOTFS",
    "ImageFile",
    "ImageManifest",
    "StoredImage",
    "image_digest",
    "parse_sha256",
    "sha256_file",
]

MANIFEST_FILE = "image.json"
DISK = "disk"
KERNEL_INITRD = "kernel+initrd"
ROOTFS = "rootfs"
KINDS = (DISK, KERNEL_INITRD, ROOTFS)
# What a kernel+initrd image boots when its manifest names nothing else (the tiny guest's files).
DEFAULT_BOOT = {KERNEL_INITRD: {"kernel": "vmlinux", "initrd": "initrd.img"}}

_HEX = re.compile(r"^[0-9a-f]{64}$")
_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}$")
_KNOWN_KEYS = {"name", "kind", "files", "digest", "size", "architecture", "boot", "aliases"}


def parse_sha256(text: str) -> str:
    """The 64 hex digits of ``text`` (``abc...`` or ``sha256:abc...``); InvalidArgument else."""
    value = text.strip().lower().removeprefix("sha256:")
    if not _HEX.match(value):
        raise InvalidArgument(f"invalid sha256 {text!r}: 64 hexadecimal digits expected")
    return value


def sha256_file(path: Path, digest: Any = None) -> str:
    """The hex sha256 of a file, read in 1 MiB blocks (images are large); with ``digest``
    (a ``hashlib.sha256()`` object) the file is added to it, to go on with what follows."""
    digest = digest if digest is not None else hashlib.sha256()
    with path.open("rb") as file:
        while block := file.read(1024 * 1024):
            digest.update(block)
    return str(digest.hexdigest())


def image_digest(files: Mapping[str, str]) -> str:
    """``sha256:`` of the sorted ``"<file>:<sha256>\\n"`` lines: the image's name by content."""
    summary = "".join(f"{name}:{files[name]}\n" for name in sorted(files))
    return "sha256:" + hashlib.sha256(summary.encode()).hexdigest()


@dataclass(frozen=True)
class ImageFile:
    sha256: str  # 64 hex digits
    size: int  # bytes


@dataclass(frozen=True)
class ImageManifest:
    name: str
    kind: str
    files: Mapping[str, ImageFile]
    architecture: str = "x86_64"
    boot: Mapping[str, str] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict)  # keys kept as they came

    @property
    def digest(self) -> str:
        return image_digest({name: entry.sha256 for name, entry in self.files.items()})

    @property
    def size(self) -> int:
        return sum(entry.size for entry in self.files.values())

    def boot_file(self, role: str) -> str:
        """The file that plays ``role`` (kernel, initrd, disk, rootfs), or ""."""
        hints = {**DEFAULT_BOOT.get(self.kind, {}), **self.boot}
        return hints.get(role, "")

    def to_json(self) -> dict[str, Any]:
        return {
            **self.extra,
            "name": self.name,
            "kind": self.kind,
            "architecture": self.architecture,
            "boot": dict(self.boot),
            "digest": self.digest,
            "size": self.size,
            "files": {
                name: {"sha256": entry.sha256, "size": entry.size}
                for name, entry in sorted(self.files.items())
            },
        }

    @classmethod
    def from_json(cls, data: object) -> ImageManifest:
        """Parse and check a manifest; a ``digest`` that does not match its files is refused."""
        if not isinstance(data, dict):
            raise InvalidArgument("an image manifest is a JSON object")
        try:
            files = {
                str(name): ImageFile(parse_sha256(str(entry["sha256"])), int(entry["size"]))
                for name, entry in dict(data["files"]).items()
            }
            manifest = cls(
                name=str(data["name"]),
                kind=str(data.get("kind", KERNEL_INITRD)),
                files=files,
                architecture=str(data.get("architecture", "x86_64")),
                boot={str(k): str(v) for k, v in dict(data.get("boot") or {}).items()},
                extra={k: v for k, v in data.items() if k not in _KNOWN_KEYS},
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidArgument(f"invalid image manifest: {exc!r}") from exc
        manifest.check()
        if data.get("digest") not in (None, "", manifest.digest):
            raise InvalidArgument(
                f"image manifest digest {data['digest']} does not match its files "
                f"({manifest.digest})"
            )
        return manifest

    def check(self) -> None:
        if self.kind not in KINDS:
            raise InvalidArgument(f"unknown image kind {self.kind!r}: one of {', '.join(KINDS)}")
        if not self.files:
            raise InvalidArgument("an image needs at least one file")
        for name, entry in self.files.items():
            if not _FILE_NAME.match(name) or name == MANIFEST_FILE:
                raise InvalidArgument(f"invalid image file name {name!r}")
            if entry.size < 0:
                raise InvalidArgument(f"invalid size of image file {name!r}")
        for role in ("kernel", "initrd", "disk", "rootfs"):
            wanted = self.boot_file(role)
            if wanted and wanted not in self.files:
                raise InvalidArgument(f"the image's {role} {wanted!r} is not one of its files")


@dataclass(frozen=True)
class StoredImage:
    """An image of the master's store, with the nodes whose caches hold it."""

    manifest: ImageManifest
    aliases: tuple[str, ...] = ()
    created_at: datetime | None = None
    nodes: tuple[str, ...] = ()  # node names

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def digest(self) -> str:
        return self.manifest.digest

    def answers_to(self, ref: str) -> bool:
        """Whether ``ref`` (a name, an alias or the digest) means this image."""
        return ref in (self.name, self.digest, *self.aliases)
