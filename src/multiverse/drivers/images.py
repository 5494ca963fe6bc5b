"""The port through which drivers get their images' files, and its plain-directory adapter.

A driver asks for an image by name and gets a :class:`CachedImage`: a directory and the
manifest's boot hints (which file is the kernel, the initrd, the disk, the rootfs). It never
downloads anything: on a worker the agent makes sure the image is in the node's cache before it
asks the driver to create a VM (``multiverse.worker.imagecache``, the adapter with a master
behind it); :class:`ImageDirectories` serves images that are already on disk, one directory
per image, as built by ``multiverse image build tiny`` (the driver tests and benchmarks use it).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

from multiverse.core.errors import InvalidArgument, MultiverseError
from multiverse.core.images import (
    DEFAULT_BOOT,
    KERNEL_INITRD,
    MANIFEST_FILE,
    ROOTFS,
    ImageManifest,
)
from multiverse.drivers.base import ImageInfo

__all__ = ["CachedImage", "ImageCache", "ImageDirectories", "check_image_name", "read_manifest"]

ROOTFS_FILE = "rootfs.ext4"


@dataclass(frozen=True)
class CachedImage:
    """An image whose files are on this host, under ``root``.

    ``boot`` carries the manifest's hints: the files that play the roles ``kernel``,
    ``initrd``, ``disk`` and ``rootfs`` (see :meth:`file`), and as plain values the disk's
    ``format`` (raw, qcow2) and a kernel ``cmdline`` when the image asks for one.
    """

    name: str
    kind: str
    root: Path
    digest: str = ""
    size: int = 0
    boot: Mapping[str, str] = field(default_factory=dict)

    def file(self, role: str) -> Path | None:
        """The file that plays ``role`` (kernel, initrd, disk, rootfs), if the image has one."""
        name = self.boot.get(role, "")
        path = self.root / name if name else None
        return path if path is not None and path.is_file() else None

    def info(self) -> ImageInfo:
        return ImageInfo(name=self.name, kind=self.kind, digest=self.digest, size=self.size)

    @classmethod
    def of(cls, manifest: ImageManifest, root: Path, name: str = "") -> CachedImage:
        roles = ("kernel", "initrd", "disk", "rootfs", "format", "cmdline", "seed")
        boot = {role: manifest.boot_file(role) for role in roles if manifest.boot_file(role)}
        return cls(name or manifest.name, manifest.kind, root, manifest.digest, manifest.size, boot)


@runtime_checkable
class ImageCache(Protocol):
    """What a driver may ask about images. Both calls only look at the disk (stat, small
    reads): fast enough for ``validate`` and for every report."""

    def lookup(self, name: str) -> CachedImage | None:
        """The image's files on this host, or None when they are not here (yet)."""

    def available(self, name: str) -> bool:
        """Whether a launch of ``name`` can get its files: here already, or known to the
        cache's source (the agent fetches it before the driver's ``create``)."""

    def held(self) -> list[ImageInfo]:
        """The images this host holds."""


def check_image_name(name: str) -> None:
    """A name that could leave the image directories is refused."""
    if "/" in name or name in ("", ".", ".."):
        raise InvalidArgument(f"invalid image name {name!r}")


def read_manifest(directory: Path) -> ImageManifest | None:
    try:
        return ImageManifest.from_json(json.loads((directory / MANIFEST_FILE).read_text()))
    except (OSError, ValueError, MultiverseError):
        return None


class ImageDirectories:
    """Images as directories ``<dir>/<name>/``, searched in order. With an ``image.json`` the
    manifest says what is what; without one, the tiny guest's file names do (vmlinux,
    initrd.img, rootfs.ext4)."""

    def __init__(self, directories: Sequence[Path]) -> None:
        self.directories = [Path(directory) for directory in directories]

    def lookup(self, name: str) -> CachedImage | None:
        check_image_name(name)
        for directory in self.directories:
            found = self._image(directory / name)
            if found is not None:
                return found
        return None

    def available(self, name: str) -> bool:
        return self.lookup(name) is not None

    def held(self) -> list[ImageInfo]:
        found: dict[str, ImageInfo] = {}
        for directory in self.directories:
            if not directory.is_dir():
                continue
            for candidate in sorted(directory.iterdir()):
                if candidate.name in found or not candidate.is_dir():
                    continue
                image = self._image(candidate)
                if image is not None and (image.file("kernel") or image.file("disk")):
                    found[candidate.name] = image.info()
        return list(found.values())

    def _image(self, directory: Path) -> CachedImage | None:
        if not directory.is_dir():
            return None
        manifest = read_manifest(directory)
        if manifest is not None:
            return CachedImage.of(manifest, directory, directory.name)
        boot = dict(DEFAULT_BOOT[KERNEL_INITRD])
        kind = KERNEL_INITRD
        if (directory / ROOTFS_FILE).is_file():
            boot["rootfs"], kind = ROOTFS_FILE, ROOTFS
        if not (directory / boot["kernel"]).is_file():
            return None
        files = [path for path in directory.iterdir() if path.is_file()]
        size = sum(path.stat().st_size for path in files)
        return CachedImage(directory.name, kind, directory, "", size, boot)
