"""The node's image cache: images pulled from the master, verified, kept within a size limit.

Layout under ``<data-dir>/images/``::

    sha256/<hex>/          a complete, verified image: image.json and its files
        .verified          {file: [size, mtime_ns]} of each file when its sha256 was checked
        .used              touched at every use: its mtime orders the LRU eviction
    partial/<hex>/         an image being pulled; each file grows by appending, so a broken
                           transfer resumes from the size already there
    names.json             {name: digest} of the last ``ensure`` per name

A pull streams each file from the master (``ImageService.Fetch``) from the offset its partial
copy ends at, hashes the whole file, and only then moves the image into ``sha256/``; a file
whose hash is wrong is discarded and pulled once more from the start. A cached file whose size
or mtime changed since it was verified is hashed again before use, so a damaged copy is found
and pulled again rather than booted. Before a pull the cache makes room by evicting the least
recently used images, never one a local instance uses (``in_use``) and never the one being
pulled; an image in use is kept even when that leaves the cache over its limit.

Images that are already on this host as plain directories (a build's output, as the tests and
``multiverse up`` have) are ``seeds``: used in place when their digest is what the master has.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import shutil
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import grpc

from multiverse.core.errors import DriverError, NotFound, Unavailable
from multiverse.core.images import MANIFEST_FILE, ImageManifest, sha256_file
from multiverse.core.sizes import format_size
from multiverse.drivers.base import ImageInfo
from multiverse.drivers.images import (
    CachedImage,
    ImageDirectories,
    check_image_name,
    read_manifest,
)
from multiverse.wire import convert
from multiverse.wire.v1 import multiverse_pb2 as pb
from multiverse.wire.v1 import multiverse_pb2_grpc as pb_grpc

log = logging.getLogger("multiverse.worker")

Progress = Callable[[int, int], None]  # (bytes here, bytes in all)


class ImageSource(Protocol):
    """Where images come from: the master (or, in tests, anything that serves files)."""

    async def resolve(self, name: str) -> ImageManifest: ...

    def fetch(self, sha256: str, offset: int) -> AsyncIterator[bytes]: ...


class MasterImages:
    """The master's ImageService over this node's mutual-TLS identity."""

    def __init__(self, master: str, credentials: grpc.ChannelCredentials) -> None:
        self.master = master
        self._channel = grpc.aio.secure_channel(master, credentials, convert.GRPC_CHANNEL_OPTIONS)
        self._stub = pb_grpc.ImageServiceStub(self._channel)

    async def resolve(self, name: str) -> ImageManifest:
        try:
            reply = await self._stub.Resolve(pb.ImageRef(name=name), timeout=30)
        except grpc.aio.AioRpcError as exc:
            raise convert.error_from_rpc(exc, f"master {self.master}") from exc
        return ImageManifest.from_json(json.loads(reply.json))

    async def fetch(self, sha256: str, offset: int) -> AsyncIterator[bytes]:
        call = self._stub.Fetch(pb.FetchRequest(sha256=sha256, offset=offset))
        try:
            async for chunk in call:
                yield chunk.data
        except grpc.aio.AioRpcError as exc:
            raise convert.error_from_rpc(exc, f"master {self.master}") from exc
        finally:
            call.cancel()

    async def close(self) -> None:
        await self._channel.close(grace=None)


class NodeImageCache:
    """The worker's adapter of :class:`multiverse.drivers.images.ImageCache`, plus ``ensure``
    (pull if needed), used by the agent before it creates a VM."""

    def __init__(
        self,
        root: Path,
        max_bytes: int,
        seeds: Sequence[Path] = (),
        in_use: Callable[[], Collection[str]] = lambda: (),
    ) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self.seeds = ImageDirectories(seeds)
        self.in_use = in_use  # names of the images local instances boot from
        self.source: ImageSource | None = None  # the master, once joined
        self.complete = root / "sha256"
        self.partial = root / "partial"
        self.complete.mkdir(parents=True, exist_ok=True)
        self.partial.mkdir(parents=True, exist_ok=True)
        self._names_file = root / "names.json"
        self._known: dict[str, ImageManifest] = {}  # resolved at the master this run
        self._locks: dict[str, asyncio.Lock] = {}

    # --- the driver's port ---

    def lookup(self, name: str) -> CachedImage | None:
        check_image_name(name)
        digest = self._names().get(name, "")
        if digest:
            entry = self._entry(digest, name)
            if entry is not None:
                return entry
            seeded = self._seed_with(name, digest)
            if seeded is not None:
                return seeded
        if name.startswith("sha256:"):
            return self._entry(name, name)
        for directory in sorted(self.complete.iterdir(), key=_last_used, reverse=True):
            manifest = read_manifest(directory)
            if manifest is not None and manifest.name == name:
                return CachedImage.of(manifest, directory, name)
        return self.seeds.lookup(name)

    def available(self, name: str) -> bool:
        return name in self._known or self.lookup(name) is not None

    def held(self) -> list[ImageInfo]:
        found: dict[str, ImageInfo] = {}
        for directory in sorted(self.complete.iterdir()):
            manifest = read_manifest(directory)
            if manifest is not None:
                found[manifest.digest] = CachedImage.of(manifest, directory).info()
        for info in self.seeds.held():
            found.setdefault(info.digest or info.name, info)
        return sorted(found.values(), key=lambda info: info.name)

    # --- pulling ---

    async def resolve(self, name: str) -> ImageManifest | None:
        """What the master calls ``name`` now; None when it cannot be asked but the image is
        here (a launch then uses the local copy). NotFound when neither knows it."""
        check_image_name(name)
        if self.source is not None:
            try:
                manifest = await self.source.resolve(name)
            except Unavailable:
                if self.lookup(name) is None:
                    raise
                return None
            self._known[name] = manifest
            return manifest
        if self.lookup(name) is None:
            raise NotFound(f"image {name!r} not found on this node, and no master to ask")
        return None

    async def ensure(self, name: str, progress: Progress | None = None) -> CachedImage:
        """The image's files here, pulled and verified first if needed."""
        report = progress or (lambda _done, _total: None)
        manifest = await self.resolve(name)
        if manifest is None:
            found = self.lookup(name)
            assert found is not None  # resolve checked
            return found
        digest = manifest.digest
        lock = self._locks.setdefault(digest, asyncio.Lock())
        async with lock:
            seeded = self._seed_with(name, digest)
            if seeded is None:
                if not await asyncio.to_thread(self._intact, digest):
                    await self._pull(manifest, report)
                _touch(self._dir(digest) / ".used")
            self._remember(name, digest)
            report(manifest.size, manifest.size)
            found = self.lookup(name)
            if found is None:
                raise DriverError(f"image {name} vanished from the cache right after its pull")
            return found

    async def _pull(self, manifest: ImageManifest, report: Progress) -> None:
        if manifest.size > self.max_bytes:
            raise DriverError(
                f"image {manifest.name} ({format_size(manifest.size)}) is larger than this "
                f"node's image cache ({format_size(self.max_bytes)}; see --image-cache)"
            )
        await asyncio.to_thread(self.prune, self.max_bytes - manifest.size, {manifest.digest})
        source = self.source
        if source is None:
            raise Unavailable(f"image {manifest.name} is not here and there is no master to ask")
        hexdigest = manifest.digest.removeprefix("sha256:")
        staging = self.partial / hexdigest
        damaged = self._dir(manifest.digest)
        if damaged.exists():  # a cached copy that failed its check: keep its good files
            if staging.exists():
                shutil.rmtree(staging)
            damaged.rename(staging)
        staging.mkdir(parents=True, exist_ok=True)
        have = {
            name: _size(staging / name) for name in manifest.files
        }  # what earlier, broken pulls left

        def advance(name: str, size: int) -> None:
            have[name] = size
            report(sum(have.values()), manifest.size)

        stamps: dict[str, list[int]] = {}
        for name, entry in sorted(manifest.files.items()):
            path = staging / name
            for attempt in (1, 2):
                if await self._fetch(source, entry.sha256, entry.size, path, name, advance):
                    break
                log.warning(
                    "image %s: %s does not match its sha256; discarded, pulling it again",
                    manifest.name, name,
                )  # fmt: skip
                path.unlink()
                advance(name, 0)
                if attempt == 2:
                    raise DriverError(f"image {manifest.name}: {name} arrived damaged twice")
            stat = path.stat()
            stamps[name] = [stat.st_size, stat.st_mtime_ns]
        (staging / MANIFEST_FILE).write_text(json.dumps(manifest.to_json(), indent=2) + "\n")
        (staging / ".verified").write_text(json.dumps(stamps))
        for extra in staging.iterdir():
            if extra.name not in manifest.files and extra.name not in (MANIFEST_FILE, ".verified"):
                extra.unlink()
        staging.rename(self._dir(manifest.digest))
        log.info("image %s pulled and verified (%s)", manifest.name, manifest.digest)

    async def _fetch(
        self,
        source: ImageSource,
        sha256: str,
        size: int,
        path: Path,
        name: str,
        advance: Callable[[str, int], None],
    ) -> bool:
        """Append to ``path`` from where it ends until it has ``size`` bytes; whether the whole
        file has the ``sha256`` it must have. Hashed as it is written (the part a broken pull
        left is hashed first), so the check costs no second read of the file."""
        offset = _size(path)
        if offset > size:
            path.unlink()
            offset = 0
        digest = hashlib.sha256()
        if offset:
            await asyncio.to_thread(sha256_file, path, digest)
        if offset < size:
            if offset:
                log.info("resuming the pull of %s (sha256:%s) at offset %d", name, sha256, offset)
            with path.open("ab") as file:
                async for data in source.fetch(sha256, offset):
                    await asyncio.to_thread(_write, file, digest, data)
                    offset += len(data)
                    advance(name, offset)
                file.flush()
            if offset != size:
                raise Unavailable(f"the transfer of {name} ended at {offset} of {size} bytes")
        return digest.hexdigest() == sha256

    # --- keeping it small ---

    def prune(self, keep_bytes: int, keep: Collection[str] = ()) -> list[str]:
        """Evict least recently used images until the cache holds at most ``keep_bytes``; never
        an image in ``keep`` (digests) or one a local instance uses. The digests evicted."""
        in_use = set(self.in_use())
        names = self._names()
        protected = set(keep) | {names[name] for name in in_use if name in names}
        entries = []
        for directory in self.complete.iterdir():
            manifest = read_manifest(directory)
            if manifest is None:
                shutil.rmtree(directory, ignore_errors=True)
                continue
            entries.append((directory, manifest))
        total = sum(manifest.size for _, manifest in entries) + _tree_size(self.partial)
        evicted = []
        for directory, manifest in sorted(entries, key=lambda item: _last_used(item[0])):
            if total <= keep_bytes:
                break
            if manifest.digest in protected or manifest.name in in_use:
                continue
            shutil.rmtree(directory, ignore_errors=True)
            total -= manifest.size
            evicted.append(manifest.digest)
            log.info("image %s evicted from the cache (%s)", manifest.name, manifest.digest)
        return evicted

    # --- helpers ---

    def _dir(self, digest: str) -> Path:
        return self.complete / digest.removeprefix("sha256:")

    def _entry(self, digest: str, name: str) -> CachedImage | None:
        directory = self._dir(digest)
        manifest = read_manifest(directory)
        return CachedImage.of(manifest, directory, name) if manifest is not None else None

    def _seed_with(self, name: str, digest: str) -> CachedImage | None:
        seeded = self.seeds.lookup(name)
        return seeded if seeded is not None and seeded.digest == digest else None

    def _intact(self, digest: str) -> bool:
        """Whether the cached copy is complete and still what was verified; a changed file is
        hashed again, and a bad one dropped (its image is pulled again)."""
        directory = self._dir(digest)
        manifest = read_manifest(directory)
        if manifest is None or manifest.digest != digest:
            return False
        try:
            stamps = json.loads((directory / ".verified").read_text())
        except (OSError, ValueError):
            stamps = {}
        intact = True
        for name, entry in manifest.files.items():
            path = directory / name
            try:
                stat = path.stat()
            except FileNotFoundError:
                intact = False
                continue
            if stamps.get(name) == [stat.st_size, stat.st_mtime_ns]:
                continue
            if stat.st_size == entry.size and sha256_file(path) == entry.sha256:
                stamps[name] = [stat.st_size, stat.st_mtime_ns]
                continue
            log.warning("image %s: cached %s is damaged; pulling it again", manifest.name, name)
            path.unlink()
            intact = False
        (directory / ".verified").write_text(json.dumps(stamps))
        return intact

    def _names(self) -> dict[str, str]:
        try:
            names = json.loads(self._names_file.read_text())
        except (OSError, ValueError):
            return {}
        return {str(k): str(v) for k, v in names.items()} if isinstance(names, dict) else {}

    def _remember(self, name: str, digest: str) -> None:
        names = self._names()
        if names.get(name) == digest:
            return
        names[name] = digest
        temporary = self._names_file.with_suffix(".tmp")
        temporary.write_text(json.dumps(names, indent=2, sort_keys=True))
        temporary.replace(self._names_file)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _write(file: BinaryIO, digest: Any, data: bytes) -> None:
    digest.update(data)
    file.write(data)


def _tree_size(root: Path) -> int:
    return sum(path.stat().st_size for path in root.rglob("*") if path.is_file())


def _last_used(directory: Path) -> float:
    with contextlib.suppress(OSError):
        return (directory / ".used").stat().st_mtime
    return 0.0


def _touch(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.touch()
        os.utime(path)


__all__ = ["ImageSource", "MasterImages", "NodeImageCache"]
