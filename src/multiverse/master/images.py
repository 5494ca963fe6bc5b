"""The master's image store, and the transfer service the workers pull images from.

Files are content-addressed blobs under ``<data-dir>/images/blobs/sha256/<hex>``; an image is a
manifest (:class:`multiverse.core.images.ImageManifest`) in the store that names its blobs, so
two images sharing a file (every rootfs image carries the tiny kernel) store it once.

Bringing an image in is two steps, so that big files never sit in the master's memory: the
client streams each file to ``PUT /api/v1/blobs/sha256:<hex>`` (hashed while written, refused if
the hash differs), then ``POST /api/v1/images`` names the files and the master decides the kind
from their shape: one file is a disk (``qemu-img info`` says raw or qcow2), a directory with an
``image.json`` is a kernel+initrd image like the tiny guest, an OCI layout becomes an ext4
rootfs. A URL with its sha256 is downloaded by the master itself.

Workers pull over gRPC (:class:`ImageServicer`): ``Fetch`` streams one blob from an offset in
chunks, so a broken transfer resumes where the worker's copy ends. Several workers pulling one
image at once do not read it from disk once each: every transfer asks :class:`ChunkReader` for
chunk-aligned pieces, and one piece is read once (single flight: the first asker starts the
read, the others await the same task) and kept in a small LRU window. Pullers of one image run
at about the same pace, so the ones behind find the pieces the first one read; one that starts
much later reads again, mostly from the page cache since the reads are sequential.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

import grpc
import httpx

from multiverse.core.errors import (
    AlreadyExists,
    Conflict,
    InvalidArgument,
    MultiverseError,
    NotFound,
    Unavailable,
)
from multiverse.core.images import (
    DISK,
    KERNEL_INITRD,
    MANIFEST_FILE,
    ROOTFS,
    ImageFile,
    ImageManifest,
    StoredImage,
    parse_sha256,
    sha256_file,
)
from multiverse.core.model import Node, validate_name
from multiverse.master.cluster import Agents
from multiverse.master.operations import Operation, Operations, Progress
from multiverse.store.repository import Store
from multiverse.wire import convert
from multiverse.wire.v1 import multiverse_pb2 as pb
from multiverse.wire.v1 import multiverse_pb2_grpc as pb_grpc

log = logging.getLogger("multiverse.master")

Ctx: TypeAlias = grpc.aio.ServicerContext[Any, Any]

CHUNK = 1024 * 1024  # bytes per transfer message (gRPC's default limit is 4 MiB)
WINDOW = 32  # chunks kept for pullers that lag a little behind the first
COPY_BUFFER = 1024 * 1024
ROOTFS_FILE = "rootfs.ext4"
BUILTIN = "tiny"  # the test guest, imported at the first start from the image directories
DISK_FORMATS = ("raw", "qcow2")


# ---- blobs -----------------------------------------------------------------------------------


class Blobs:
    """Content-addressed files: ``blobs/sha256/<hex>``, written via ``tmp/`` and a rename."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.dir = root / "blobs" / "sha256"
        self.tmp = root / "tmp"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        return self.dir / parse_sha256(sha256)

    def has(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def size(self, sha256: str) -> int:
        try:
            return self.path(sha256).stat().st_size
        except FileNotFoundError:
            raise NotFound(f"no blob sha256:{sha256}") from None

    def temporary(self) -> Path:
        return self.tmp / f"{uuid.uuid4().hex}.part"

    def commit(self, temporary: Path, expected: str | None) -> ImageFile:
        """Hash ``temporary`` (already written) and move it to its name; refused if it is not
        the ``expected`` content (the file is dropped then)."""
        return self._place(temporary, sha256_file(temporary), expected)

    def _place(self, temporary: Path, actual: str, expected: str | None) -> ImageFile:
        if expected is not None and actual != expected:
            temporary.unlink(missing_ok=True)
            raise InvalidArgument(
                f"content has sha256 {actual}, not the expected {expected}: nothing kept"
            )
        size = temporary.stat().st_size
        target = self.dir / actual
        if target.exists():
            temporary.unlink()
        else:
            temporary.rename(target)
        return ImageFile(actual, size)

    def add_file(self, source: Path) -> ImageFile:
        """Copy a local file in (hard link where possible), hashing it on the way. A link shares
        the file: blobs are never written to, and builders replace files rather than edit them."""
        temporary = self.temporary()
        try:
            os.link(source, temporary)
            return self.commit(temporary, None)
        except OSError:
            temporary.unlink(missing_ok=True)
        digest = hashlib.sha256()
        with source.open("rb") as reader, temporary.open("wb") as writer:
            while block := reader.read(COPY_BUFFER):
                digest.update(block)
                writer.write(block)
        return self._place(temporary, digest.hexdigest(), None)

    async def add_stream(
        self,
        chunks: AsyncIterator[bytes],
        expected: str | None,
        progress: Callable[[int], None] = lambda _done: None,
    ) -> ImageFile:
        """Write a stream in, hashing as it comes: never more than one chunk in memory."""
        temporary = self.temporary()
        digest = hashlib.sha256()
        done = 0
        try:
            with temporary.open("wb") as writer:
                async for chunk in chunks:
                    digest.update(chunk)
                    await asyncio.to_thread(writer.write, chunk)
                    done += len(chunk)
                    progress(done)
            return self._place(temporary, digest.hexdigest(), expected)
        finally:
            temporary.unlink(missing_ok=True)

    def remove_unreferenced(self, referenced: set[str]) -> int:
        """Drop blobs no image names; the bytes freed."""
        freed = 0
        for path in self.dir.iterdir():
            if path.name not in referenced:
                freed += path.stat().st_size
                path.unlink(missing_ok=True)
        return freed


class ChunkReader:
    """Chunk-aligned reads of blobs shared by every transfer (see the module's docstring)."""

    def __init__(self, blobs: Blobs, chunk: int = CHUNK, window: int = WINDOW) -> None:
        self.blobs = blobs
        self.chunk = chunk
        self.window = window
        self.disk_bytes = 0  # read from disk, for the metric that shows the sharing
        self._pieces: OrderedDict[tuple[str, int], asyncio.Task[bytes]] = OrderedDict()

    async def read(self, sha256: str, index: int) -> bytes:
        key = (sha256, index)
        task = self._pieces.get(key)
        if task is None:
            task = asyncio.ensure_future(asyncio.to_thread(self._read, sha256, index))
            self._pieces[key] = task
            task.add_done_callback(lambda done: self._forget_failed(key, done))
            while len(self._pieces) > self.window:
                oldest_key, oldest = next(iter(self._pieces.items()))
                if not oldest.done():
                    break
                del self._pieces[oldest_key]
        else:
            self._pieces.move_to_end(key)
        # Shielded: one puller going away must not cancel the read the others wait for.
        return await asyncio.shield(task)

    def _forget_failed(self, key: tuple[str, int], task: asyncio.Task[bytes]) -> None:
        if (task.cancelled() or task.exception() is not None) and self._pieces.get(key) is task:
            del self._pieces[key]

    def _read(self, sha256: str, index: int) -> bytes:
        descriptor = os.open(self.blobs.path(sha256), os.O_RDONLY)
        try:
            data = os.pread(descriptor, self.chunk, index * self.chunk)
        finally:
            os.close(descriptor)
        self.disk_bytes += len(data)
        return data


# ---- the store -------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileSource:
    """Files a client uploaded as blobs, by their path in what it imports."""

    files: Mapping[str, str]  # relative path -> sha256
    rootfs_size: int = 2 * 1024**3


class Images:
    """The image store: import, list, delete, and warming the nodes' caches."""

    def __init__(
        self,
        store: Store,
        root: Path,
        operations: Operations,
        agents: Agents,
        *,
        rate_limit: float = 0.0,
    ) -> None:
        self.store = store
        self.blobs = Blobs(root)
        self.operations = operations
        self.agents = agents
        self.reader = ChunkReader(self.blobs)
        self.rate_limit = rate_limit  # bytes/s per transfer; 0: as fast as it goes
        self.bytes_sent = 0
        self._importing = asyncio.Lock()

    # --- queries ---

    async def all(self) -> list[StoredImage]:
        return await self.store.list_images()

    async def get(self, ref: str) -> StoredImage:
        return await self.store.find_image(ref)

    async def users(self, image: StoredImage) -> list[str]:
        """The instances that boot from ``image`` (by any of its names)."""
        return [
            instance.name
            for instance in await self.store.list_instances()
            if image.answers_to(instance.spec.image)
        ]

    # --- import ---

    async def check_new(self, name: str, aliases: Sequence[str]) -> None:
        """Refuse bad or taken names before any work is done."""
        for ref in (name, *aliases):
            validate_name(ref, "image")
        taken = {ref for image in await self.all() for ref in (image.name, *image.aliases)}
        clash = sorted(taken & {name, *aliases})
        if clash:
            raise AlreadyExists(f"an image named {clash[0]!r} exists already")

    async def start_import(
        self, name: str, aliases: Sequence[str], source: FileSource | tuple[str, str]
    ) -> Operation:
        """Import from uploaded blobs or from ``(url, sha256)``; an operation with progress."""
        await self.check_new(name, aliases)
        progress = Progress(stage="importing")
        if isinstance(source, FileSource):
            missing = [path for path, sha in source.files.items() if not self.blobs.has(sha)]
            if missing:
                raise InvalidArgument(f"upload these files first: {', '.join(sorted(missing))}")
            work = self._import_files(name, aliases, source, progress)
        else:
            url, sha256 = source
            if not url.startswith(("https://", "http://")):
                raise InvalidArgument(f"only http(s) URLs can be imported, not {url!r}")
            work = self._import_url(name, aliases, url, parse_sha256(sha256), progress)
        return self.operations.start("image-import", name, work, transfer=progress)

    async def _import_url(
        self, name: str, aliases: Sequence[str], url: str, sha256: str, progress: Progress
    ) -> dict[str, Any]:
        progress.stage = f"downloading {url}"

        async def body() -> AsyncIterator[bytes]:
            try:
                async with (
                    httpx.AsyncClient(timeout=60, follow_redirects=True) as client,
                    client.stream("GET", url) as response,
                ):
                    if response.is_error:
                        raise Unavailable(f"{url} answered HTTP {response.status_code}")
                    length = response.headers.get("content-length", "")
                    progress.total = int(length) if length.isdigit() else 0
                    async for chunk in response.aiter_bytes(CHUNK):
                        yield chunk
            except httpx.HTTPError as exc:
                raise Unavailable(f"cannot download {url}: {exc}") from exc

        entry = await self.blobs.add_stream(body(), sha256, progress.advance_to)
        return await self._import_files(
            name, aliases, FileSource({Path(url).name or "disk": entry.sha256}), progress
        )

    async def _import_files(
        self, name: str, aliases: Sequence[str], source: FileSource, progress: Progress
    ) -> dict[str, Any]:
        async with self._importing:
            await self.check_new(name, aliases)
            progress.stage = "checking"
            tiny = await self._tiny()
            manifest = await asyncio.to_thread(self._manifest_of, name, source, progress, tiny)
            image = await self.store.add_image(manifest, aliases)
            log.info("image %s imported: %s, %s, %d bytes", name, manifest.kind,
                     manifest.digest, manifest.size)  # fmt: skip
            return image_json(image)

    def _manifest_of(
        self, name: str, source: FileSource, progress: Progress, tiny: StoredImage | None
    ) -> ImageManifest:
        files = dict(source.files)
        if MANIFEST_FILE in files:
            return self._described_image(name, files)
        if "oci-layout" in files or "index.json" in files:
            progress.stage = "converting the OCI layout to ext4"
            return self._rootfs_image(name, files, source.rootfs_size, tiny)
        if len(files) == 1:
            return self._disk_image(name, next(iter(files.values())))
        raise InvalidArgument(
            "cannot tell what these files are: import one disk file, a directory with an "
            "image.json, or an OCI image layout"
        )

    def _described_image(self, name: str, files: dict[str, str]) -> ImageManifest:
        """A directory that says what it is in its image.json (the tiny guest; any kind a
        builder writes, with its boot hints): the files must be exactly the ones it lists."""
        text = self.blobs.path(files.pop(MANIFEST_FILE)).read_text()
        try:
            described = ImageManifest.from_json(json.loads(text))
        except ValueError as exc:
            raise InvalidArgument(f"{MANIFEST_FILE} is not JSON: {exc}") from exc
        given = {path: ImageFile(sha, self.blobs.size(sha)) for path, sha in files.items()}
        if dict(described.files) != given:
            raise InvalidArgument(f"the files do not match what {MANIFEST_FILE} lists")
        return ImageManifest(
            name, described.kind, given, described.architecture, described.boot, described.extra
        )

    def _disk_image(self, name: str, sha256: str) -> ImageManifest:
        info = qemu_img_info(self.blobs.path(sha256))
        fmt = str(info.get("format", ""))
        if fmt not in DISK_FORMATS:
            raise InvalidArgument(f"a disk image must be raw or qcow2, not {fmt or 'unknown'}")
        if info.get("backing-filename"):
            raise InvalidArgument("a disk image with a backing file cannot be imported")
        file_name = f"disk.{fmt}"
        return ImageManifest(
            name,
            DISK,
            {file_name: ImageFile(sha256, self.blobs.size(sha256))},
            boot={"disk": file_name, "format": fmt},
            extra={"virtual_size": int(info.get("virtual-size", 0))},
        )

    def _rootfs_image(
        self, name: str, files: dict[str, str], size: int, tiny: StoredImage | None
    ) -> ImageManifest:
        from multiverse.drivers.rootfs import import_oci

        kernel = _builtin_kernel(tiny)
        with tempfile.TemporaryDirectory(dir=self.blobs.tmp) as work:
            layout = Path(work) / "layout"
            for relative, sha in files.items():
                target = (layout / relative).resolve()
                if not target.is_relative_to(layout.resolve()):
                    raise InvalidArgument(f"invalid path {relative!r} in the OCI layout")
                target.parent.mkdir(parents=True, exist_ok=True)
                os.symlink(self.blobs.path(sha), target)
            output = Path(work) / ROOTFS_FILE
            try:
                import_oci(layout, output, size)
            except (OSError, ValueError, KeyError) as exc:
                raise InvalidArgument(f"not a usable OCI image layout: {exc}") from exc
            rootfs = self.blobs.add_file(output)
        return ImageManifest(
            name,
            ROOTFS,
            {ROOTFS_FILE: rootfs, **kernel.files},
            boot={"rootfs": ROOTFS_FILE, **kernel.boot},
        )

    async def _tiny(self) -> StoredImage | None:
        """The tiny guest, whose kernel rootfs images boot with; None if there is none."""
        try:
            return await self.get(BUILTIN)
        except NotFound:
            return None

    async def import_builtin(self, directories: Sequence[Path]) -> StoredImage | None:
        """The tiny guest from the first image directory that has it, at the master's start,
        so that a fresh cluster can launch at once. The image keeps its name; if the build
        changed, the new one takes the name over unless the old one is in use."""
        for directory in directories:
            source = directory / BUILTIN
            try:
                described = ImageManifest.from_json(
                    json.loads((source / MANIFEST_FILE).read_text())
                )
            except (OSError, ValueError, MultiverseError):
                continue
            current = await self._tiny()
            if current is not None:
                if current.digest == described.digest:
                    return current
                if await self.users(current):
                    log.warning("a new %s build is in %s; the old one is in use", BUILTIN, source)
                    return current
                await self.store.delete_image(current.digest)
            files = {
                name: await asyncio.to_thread(self.blobs.add_file, source / name)
                for name in described.files
            }
            if files != dict(described.files):
                log.warning("image %s in %s has damaged files; not imported", BUILTIN, source)
                continue
            manifest = ImageManifest(
                BUILTIN, described.kind, files, described.architecture, described.boot,
                described.extra,
            )  # fmt: skip
            log.info("image %s imported from %s (%s)", BUILTIN, source, manifest.digest)
            return await self.store.add_image(manifest)
        return None

    # --- delete ---

    async def delete(self, ref: str) -> StoredImage:
        image = await self.get(ref)
        users = await self.users(image)
        if users:
            raise Conflict(
                f"image {image.name} is in use by instance(s) {', '.join(sorted(users))}"
            )
        await self.store.delete_image(image.digest)
        referenced = {
            entry.sha256 for other in await self.all() for entry in other.manifest.files.values()
        }
        self.blobs.remove_unreferenced(referenced)
        log.info("image %s deleted (%s)", image.name, image.digest)
        return image

    # --- nodes ---

    async def start_pull(self, ref: str, nodes: Sequence[Node]) -> Operation:
        """Warm the caches of ``nodes``: each pulls from the master now, in parallel."""
        image = await self.get(ref)
        if not nodes:
            raise InvalidArgument("name a node (--node) or ask for all of them (--all)")
        progress = Progress(stage=f"pulling to {', '.join(n.name for n in nodes)}")
        progress.total = image.manifest.size * len(nodes)
        return self.operations.start(
            "image-pull", image.name, self._pull(image, nodes, progress), transfer=progress
        )

    async def _pull(
        self, image: StoredImage, nodes: Sequence[Node], progress: Progress
    ) -> dict[str, Any]:
        done: dict[str, int] = {}

        async def one(node: Node) -> None:
            call = self.agents.stub(node).PullImage(pb.ImageRef(name=image.digest))
            try:
                async for step in call:
                    done[node.name] = step.done
                    progress.advance_to(sum(done.values()))
            except grpc.aio.AioRpcError as exc:
                raise convert.error_from_rpc(exc, node.name) from exc

        await asyncio.gather(*(one(node) for node in nodes))
        return {"image": image.name, "digest": image.digest, "nodes": [n.name for n in nodes]}


def _builtin_kernel(tiny: StoredImage | None) -> ImageManifest:
    """The kernel and initrd a rootfs image boots with: the tiny guest's."""
    if tiny is None:
        raise Conflict(
            f"a rootfs image boots the {BUILTIN} image's kernel: import or build it first"
        )
    manifest = tiny.manifest
    roles = {role: manifest.boot_file(role) for role in ("kernel", "initrd")}
    return ImageManifest(
        manifest.name, KERNEL_INITRD, {f: manifest.files[f] for f in roles.values()}, boot=roles
    )


def image_json(image: StoredImage) -> dict[str, Any]:
    manifest = image.manifest
    return {
        "name": image.name,
        "aliases": list(image.aliases),
        "kind": manifest.kind,
        "architecture": manifest.architecture,
        "size": manifest.size,
        "digest": image.digest,
        "files": {
            name: {"sha256": entry.sha256, "size": entry.size}
            for name, entry in sorted(manifest.files.items())
        },
        "nodes": list(image.nodes),
        "created_at": image.created_at.isoformat().replace("+00:00", "Z")
        if image.created_at
        else None,
    }


def qemu_img_info(path: Path) -> dict[str, Any]:
    """``qemu-img info --output json`` of a file, without trusting its format guess blindly:
    the answer names the format QEMU would open it as."""
    binary = shutil.which("qemu-img")
    if binary is None:
        raise Unavailable("qemu-img not found on the master: install qemu-utils")
    result = subprocess.run(
        [binary, "info", "--output", "json", str(path)],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    if result.returncode != 0:
        raise InvalidArgument(f"not a disk image: {result.stderr.strip()}")
    info = json.loads(result.stdout)
    return info if isinstance(info, dict) else {}


# ---- the transfer service --------------------------------------------------------------------


class ImageServicer(pb_grpc.ImageServiceServicer):  # type: ignore[misc]
    """Resolve and Fetch for the workers, over mutual TLS (node certificates only)."""

    def __init__(self, images: Images, peer_node: Callable[[Ctx], Awaitable[str | None]]) -> None:
        self.images = images
        self._peer_node = peer_node

    async def _node(self, context: Ctx) -> str:
        node_id = await self._peer_node(context)
        if node_id is None:
            raise NotFound("no such node")
        return (await self.images.store.get_node(node_id)).name

    async def Resolve(self, request: pb.ImageRef, context: Ctx) -> pb.ImageManifest:
        try:
            await self._node(context)
            image = await self.images.get(request.name)
        except MultiverseError as exc:
            await context.abort(*convert.error_to_rpc(exc))
            raise AssertionError("unreachable") from exc
        return pb.ImageManifest(json=json.dumps(image.manifest.to_json()))

    async def Fetch(self, request: pb.FetchRequest, context: Ctx) -> AsyncIterator[pb.Chunk]:
        try:
            node = await self._node(context)
            sha256 = parse_sha256(request.sha256)
            referenced = any(
                entry.sha256 == sha256
                for image in await self.images.all()
                for entry in image.manifest.files.values()
            )
            if not referenced:
                raise NotFound(f"no image has a file sha256:{sha256}")
            size = self.images.blobs.size(sha256)
            if not 0 <= request.offset <= size:
                raise InvalidArgument(f"offset {request.offset} is outside 0..{size}")
        except MultiverseError as exc:
            await context.abort(*convert.error_to_rpc(exc))
            return
        async for chunk in self._send(node, sha256, request.offset, size):
            yield chunk

    async def _send(
        self, node: str, sha256: str, offset: int, size: int
    ) -> AsyncIterator[pb.Chunk]:
        reader = self.images.reader
        rate = self.images.rate_limit
        position, sent, started, outcome = offset, 0, time.monotonic(), "broken"
        try:
            while position < size:
                index = position // reader.chunk
                data = await reader.read(sha256, index)
                piece = data[position - index * reader.chunk :]
                if not piece:
                    break  # the blob is shorter than it was: the worker's digest check fails
                yield pb.Chunk(data=piece)
                position += len(piece)
                sent += len(piece)
                self.images.bytes_sent += len(piece)
                if rate:
                    ahead = sent / rate - (time.monotonic() - started)
                    if ahead > 0:
                        await asyncio.sleep(ahead)
            outcome = "complete"
        finally:
            # One line per transfer: how a resumed pull started, and what it cost.
            log.info(
                "image transfer sha256:%s to node %s: offset %d sent %d bytes of %d, %s",
                sha256, node, offset, sent, size, outcome,
            )  # fmt: skip
