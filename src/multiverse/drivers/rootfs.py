"""Root file systems as ext4 files: empty ones, per-VM copies, and OCI images turned into one.

Why ext4 files: Firecracker (and QEMU) attach a plain file as a virtio-blk disk, and
``mkfs.ext4 -d DIR`` (e2fsprogs >= 1.43) fills a new file system from a directory without root,
loop devices or mounts, in milliseconds. A VM's disk is a copy of its image's ext4 file, made
with ``cp --reflink=auto``: on XFS or btrfs the copy shares blocks until written; elsewhere it is
a plain copy.

:func:`import_oci` is Catapult's storage flow without Ceph: an OCI image layout (the directory
``skopeo copy ... oci:DIR`` or ``docker buildx --output type=oci`` writes) unpacked layer by
layer, whiteouts honoured, into one ext4 file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import tarfile
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any

from multiverse.core.errors import DriverError, InvalidArgument, NotFound

WHITEOUT_PREFIX = ".wh."
OPAQUE_WHITEOUT = ".wh..wh..opq"
_MAX_SYMLINKS = 40  # as Linux's path walk (MAXSYMLINKS): past it, a loop
_LAYER_TYPES = {
    "application/vnd.oci.image.layer.v1.tar": "",
    "application/vnd.oci.image.layer.v1.tar+gzip": "gz",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "gz",
    "application/vnd.oci.image.layer.v1.tar+zstd": "zstd",
}
_MANIFEST_TYPES = {
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
}
_INDEX_TYPES = {
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
}


def _tool(name: str) -> str:
    """An e2fsprogs tool; /sbin and /usr/sbin are searched too (not on every user's PATH)."""
    found = shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    if found is None:
        raise DriverError(f"{name} not found: install e2fsprogs")
    return found


def make_ext4(path: Path, size: int, source: Path | None = None, label: str = "") -> None:
    """Write a sparse ``size``-byte ext4 file at ``path``, filled from ``source`` if given.

    Written beside the target and renamed at the end, so a crash never leaves half a disk
    under the final name. Lazy inode-table and journal init: the sparse file reads as zeros
    already, writing them would only allocate space.
    """
    partial = path.with_name(path.name + ".part")
    with partial.open("wb") as file:
        file.truncate(size)
    argv = [_tool("mkfs.ext4"), "-q", "-F", "-E", "lazy_itable_init=1,lazy_journal_init=1"]
    if label:
        argv += ["-L", label]
    if source is not None:
        argv += ["-d", str(source)]
    result = subprocess.run([*argv, str(partial)], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        partial.unlink(missing_ok=True)
        raise DriverError(f"mkfs.ext4 failed: {result.stderr.strip() or result.stdout.strip()}")
    partial.rename(path)


def copy_rootfs(source: Path, target: Path, size: int = 0) -> None:
    """A VM's own copy of an image's ext4 file, reflinked where the file system can, grown to
    ``size`` bytes (never shrunk) with resize2fs."""
    partial = target.with_name(target.name + ".part")
    result = subprocess.run(
        ["cp", "--reflink=auto", "--sparse=always", str(source), str(partial)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        partial.unlink(missing_ok=True)
        raise DriverError(f"cannot copy the rootfs {source}: {result.stderr.strip()}")
    if size > partial.stat().st_size:
        with partial.open("r+b") as file:
            file.truncate(size)
        grown = subprocess.run(
            [_tool("resize2fs"), "-f", str(partial)], capture_output=True, text=True, check=False
        )
        if grown.returncode != 0:
            partial.unlink(missing_ok=True)
            raise DriverError(f"resize2fs failed: {grown.stderr.strip()}")
    partial.rename(target)


# --- OCI image layouts --------------------------------------------------------------------------


def import_oci(layout_dir: Path, output_ext4: Path, size: int) -> None:
    """Turn the OCI image layout at ``layout_dir`` into the ext4 file ``output_ext4``.

    Follows index.json to the (first linux/amd64, else first) manifest, applies its layers in
    order, honouring whiteouts, and formats the result with ``mkfs.ext4 -d``. Every blob's
    digest is checked. Files keep their modes; owners become the user running the import
    (``mkfs.ext4 -d`` copies what the unpacked tree has, and unpacking as non-root cannot
    keep owners).
    """
    layers = oci_layers(layout_dir)
    with tempfile.TemporaryDirectory(prefix=".oci-", dir=output_ext4.parent) as work:
        root = Path(work) / "rootfs"
        root.mkdir()
        for blob, compression in layers:
            apply_layer(root, blob, compression)
        make_ext4(output_ext4, size, source=root)


def oci_layers(layout_dir: Path) -> list[tuple[Path, str]]:
    """The layer blobs of the layout's image, in order, each with its compression ("", "gz")."""
    if not (layout_dir / "oci-layout").is_file() and not (layout_dir / "index.json").is_file():
        raise NotFound(f"{layout_dir} is not an OCI image layout (no index.json)")
    index = _read_json(layout_dir / "index.json")
    manifest = _resolve_manifest(layout_dir, index)
    layers = []
    for descriptor in manifest.get("layers") or []:
        media_type = str(descriptor.get("mediaType", ""))
        if media_type not in _LAYER_TYPES:
            raise InvalidArgument(f"unsupported OCI layer type {media_type!r}")
        if _LAYER_TYPES[media_type] == "zstd":
            raise InvalidArgument("zstd-compressed OCI layers are not supported; use gzip")
        layers.append((_blob(layout_dir, descriptor), _LAYER_TYPES[media_type]))
    return layers


def _resolve_manifest(layout_dir: Path, index: dict[str, Any]) -> dict[str, Any]:
    """Descend from an index through nested indexes to one image manifest."""
    for _depth in range(4):
        manifests = index.get("manifests") or []
        if not manifests:
            raise InvalidArgument("the OCI index lists no manifests")
        chosen = next(
            (
                entry
                for entry in manifests
                if (entry.get("platform") or {}).get("architecture") == "amd64"
                and (entry.get("platform") or {}).get("os", "linux") == "linux"
            ),
            manifests[0],
        )
        document = _read_json(_blob(layout_dir, chosen))
        media_type = chosen.get("mediaType") or document.get("mediaType", "")
        if media_type in _INDEX_TYPES or ("manifests" in document and "layers" not in document):
            index = document
            continue
        if media_type and media_type not in _MANIFEST_TYPES:
            raise InvalidArgument(f"unsupported OCI manifest type {media_type!r}")
        return document
    raise InvalidArgument("OCI indexes nested too deeply")


def _blob(layout_dir: Path, descriptor: dict[str, Any]) -> Path:
    """The verified blob a descriptor points to."""
    digest = str(descriptor.get("digest", ""))
    algorithm, _, hexdigest = digest.partition(":")
    if (
        algorithm != "sha256"
        or len(hexdigest) != 64
        or not all(c in "0123456789abcdef" for c in hexdigest)
    ):
        raise InvalidArgument(f"unsupported or malformed blob digest {digest!r}")
    path = layout_dir / "blobs" / "sha256" / hexdigest
    if not path.is_file():
        raise NotFound(f"OCI blob {digest} is missing from {layout_dir}")
    actual = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            actual.update(chunk)
    if actual.hexdigest() != hexdigest:
        raise InvalidArgument(f"OCI blob {digest} is corrupt (its content has another digest)")
    return path


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise InvalidArgument(f"cannot read {path.name}: {error}") from None
    if not isinstance(data, dict):
        raise InvalidArgument(f"{path.name} is not a JSON object")
    return data


def apply_layer(root: Path, blob: Path, compression: str = "") -> None:
    """Apply one layer tarball to the tree at ``root``, as overlayfs would see it stacked.

    ``.wh.NAME`` removes NAME from the layers below; ``.wh..wh..opq`` empties its directory
    of everything the layers below put there (entries of this same layer stay). Every path a
    member names (its own, a whiteout's, a hard link's target) is resolved by :func:`_inside`,
    never by the host: absolute paths start at ``root``, ``..`` in a name is refused, symlinks
    left by earlier layers lead where they will in the guest, never out of ``root``.

    Not ``tarfile``'s extraction filters: they are made for data archives, not root file
    systems. Both clear setuid and sticky bits (``su``, ``/tmp``), ``data`` refuses absolute
    symlinks (``/etc/localtime``) and devices, and their checks resolve symlinks on the host, so
    they refuse a write under an image's absolute ``/var/run -> /run``.
    """
    try:
        with (
            tarfile.open(blob, "r:gz") if compression == "gz" else tarfile.open(blob, "r:")
        ) as archive:
            members = archive.getmembers()
            # Whiteouts first: in a layer they refer to the layers below, whatever their order
            # in the tar stream relative to this layer's own files.
            for member in members:
                path = _member_path(member.name)
                if path is None:
                    continue
                name = path.name
                if name == OPAQUE_WHITEOUT:
                    _empty_dir(_inside(root, path.parent))
                elif name.startswith(WHITEOUT_PREFIX):
                    hidden = name[len(WHITEOUT_PREFIX) :]
                    if hidden in ("", ".", ".."):
                        raise InvalidArgument(f"a whiteout names no file: {member.name!r}")
                    _remove(_inside(root, path.parent / hidden))
            for member in members:
                path = _member_path(member.name)
                if path is None or path.name.startswith(WHITEOUT_PREFIX):
                    continue
                _extract(archive, member, root, path)
    except (tarfile.TarError, OSError, EOFError) as error:
        raise InvalidArgument(f"cannot unpack the layer {blob.name}: {error}") from None


def _member_path(name: str) -> PurePosixPath | None:
    path = PurePosixPath(name.lstrip("/"))
    if ".." in path.parts:
        raise InvalidArgument(f"a layer member leaves the root: {name!r}")
    parts = [part for part in path.parts if part != "."]
    return PurePosixPath(*parts) if parts else None


def _extract(
    archive: tarfile.TarFile, member: tarfile.TarInfo, root: Path, path: PurePosixPath
) -> None:
    target = _inside(root, path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if member.isdir():
        if target.is_symlink() or (target.exists() and not target.is_dir()):
            _remove(target)
        target.mkdir(exist_ok=True)
        target.chmod(member.mode & 0o7777 | stat.S_IRWXU)  # keep it writable for later layers
        return
    if target.is_dir() and not target.is_symlink():
        shutil.rmtree(target)
    else:
        target.unlink(missing_ok=True)
    if member.isreg():
        source = archive.extractfile(member)
        assert source is not None
        with source, target.open("xb") as out:  # exclusive: never through a symlink
            shutil.copyfileobj(source, out)
        target.chmod(member.mode & 0o7777)
    elif member.issym():
        target.symlink_to(member.linkname)
    elif member.islnk():
        linked = _member_path(member.linkname)
        if linked is None:
            raise InvalidArgument(f"hard link {member.name!r} to the root")
        os.link(_inside(root, linked), target, follow_symlinks=False)
    elif member.isfifo():
        os.mkfifo(target, member.mode & 0o7777)
    # Device nodes need root to create and have no place in a VM's image (devtmpfs makes them).


def _inside(root: Path, path: PurePosixPath) -> Path:
    """Where the image's ``path`` is in the tree at ``root``: each symlink among its parents is
    followed as the guest's kernel will follow it, inside ``root`` (an absolute target starts
    again at ``root``, ``..`` stops there), so no name leads out of the tree. The last
    component is not followed: a whiteout, a link or a write replaces a symlink, never its
    target."""
    pending = list(path.parts)
    walked: list[str] = []
    followed = 0
    while pending:
        part = pending.pop(0)
        if part == "..":
            del walked[-1:]
            continue
        here = root.joinpath(*walked, part)
        if not pending or not here.is_symlink():
            walked.append(part)
            continue
        followed += 1
        if followed > _MAX_SYMLINKS:
            raise InvalidArgument(f"too many levels of symbolic links in {str(path)!r}")
        target = PurePosixPath(os.readlink(here))
        if target.is_absolute():  # "/" or "//": its first part
            walked = []
            pending = [*target.parts[1:], *pending]
        else:
            pending = [*target.parts, *pending]
    return root.joinpath(*walked)


def _empty_dir(directory: Path) -> None:
    if directory.is_dir() and not directory.is_symlink():
        for child in directory.iterdir():
            _remove(child)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.is_symlink() or path.exists():
        path.unlink()
