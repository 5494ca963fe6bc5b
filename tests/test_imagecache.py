"""The node's image cache against a source double: resume, verification, LRU, in-use images.

The transfers over gRPC between real processes are in test_images.py; here the cache's own
decisions are checked one by one, with a source that records what it was asked for and can
break a transfer or damage a byte on purpose.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from multiverse.core.errors import DriverError, NotFound, Unavailable
from multiverse.core.images import DISK, ImageFile, ImageManifest
from multiverse.core.sizes import MiB
from multiverse.drivers.images import ImageCache
from multiverse.worker.imagecache import NodeImageCache


class Source:
    """Serves images from memory; ``break_after`` cuts a transfer, ``damage`` flips a byte."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}
        self.manifests: dict[str, ImageManifest] = {}
        self.requests: list[tuple[str, int]] = []  # (sha256, offset) of each fetch
        self.sent = 0
        self.break_after: int | None = None
        self.damage = 0  # how many transfers still arrive with a flipped byte

    def add(self, name: str, size: int) -> ImageManifest:
        data = os.urandom(size)
        sha = hashlib.sha256(data).hexdigest()
        self.blobs[sha] = data
        manifest = ImageManifest(
            name, DISK, {"disk.raw": ImageFile(sha, size)}, boot={"disk": "disk.raw"}
        )
        self.manifests[name] = manifest
        return manifest

    async def resolve(self, name: str) -> ImageManifest:
        if name not in self.manifests:
            raise NotFound(f"image {name!r} does not exist")
        return self.manifests[name]

    async def fetch(self, sha256: str, offset: int) -> AsyncIterator[bytes]:
        self.requests.append((sha256, offset))
        data = bytearray(self.blobs[sha256][offset:])
        if self.damage:
            self.damage -= 1
            data[len(data) // 2] ^= 0xFF
        for start in range(0, len(data), 256 * 1024):
            if self.break_after is not None and start >= self.break_after:
                self.break_after = None
                raise Unavailable("connection lost")
            piece = bytes(data[start : start + 256 * 1024])
            self.sent += len(piece)
            yield piece


def new_cache(
    root: Path, source: Source, limit: int, in_use: set[str] | None = None
) -> NodeImageCache:
    cache = NodeImageCache(root, limit, in_use=lambda: in_use or set())
    cache.source = source
    return cache


def run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


def cached_bytes(path: Path) -> bytes:
    return path.read_bytes()


def test_the_cache_is_the_drivers_image_port(tmp_path: Path) -> None:
    assert isinstance(new_cache(tmp_path, Source(), MiB), ImageCache)


def test_a_broken_pull_resumes_from_its_offset(tmp_path: Path) -> None:
    source = Source()
    manifest = source.add("big", 3 * MiB)
    sha = manifest.files["disk.raw"].sha256
    cache = new_cache(tmp_path, source, 100 * MiB)
    source.break_after = MiB
    with pytest.raises(Unavailable):
        run(cache.ensure("big"))
    assert cache.lookup("big") is None
    partial = tmp_path / "partial" / manifest.digest.removeprefix("sha256:") / "disk.raw"
    assert partial.stat().st_size == MiB
    source.sent = 0
    found = run(cache.ensure("big"))
    assert source.requests[-1] == (sha, MiB)  # resumed where the copy ended
    assert source.sent == 2 * MiB
    assert found.digest == manifest.digest  # type: ignore[attr-defined]
    disk = found.file("disk")  # type: ignore[attr-defined]
    assert disk is not None and hashlib.sha256(disk.read_bytes()).hexdigest() == sha


def test_a_damaged_transfer_is_discarded_and_pulled_again(tmp_path: Path) -> None:
    source = Source()
    manifest = source.add("img", MiB)
    cache = new_cache(tmp_path, source, 100 * MiB)
    source.damage = 1
    found = run(cache.ensure("img"))
    assert [offset for _, offset in source.requests] == [0, 0]
    disk = found.file("disk")  # type: ignore[attr-defined]
    assert hashlib.sha256(disk.read_bytes()).hexdigest() == manifest.files["disk.raw"].sha256

    source.damage = 2  # a source that keeps sending bad data is not believed
    source.add("worse", MiB)
    with pytest.raises(DriverError, match="damaged twice"):
        run(cache.ensure("worse"))
    assert cache.lookup("worse") is None


def test_a_damaged_cached_copy_is_found_and_pulled_again(tmp_path: Path) -> None:
    source = Source()
    manifest = source.add("img", MiB)
    cache = new_cache(tmp_path, source, 100 * MiB)
    disk = run(cache.ensure("img")).file("disk")  # type: ignore[attr-defined]
    run(cache.ensure("img"))
    assert len(source.requests) == 1  # intact: no second transfer
    with disk.open("r+b") as file:
        file.seek(1000)
        byte = file.read(1)
        file.seek(1000)
        file.write(bytes([byte[0] ^ 1]))
    again = run(cache.ensure("img")).file("disk")  # type: ignore[attr-defined]
    assert len(source.requests) == 2
    assert hashlib.sha256(again.read_bytes()).hexdigest() == manifest.files["disk.raw"].sha256


def test_the_limit_evicts_the_least_recently_used_but_never_an_image_in_use(
    tmp_path: Path,
) -> None:
    source = Source()
    for name in ("a", "b", "c", "d"):
        source.add(name, 10 * MiB)
    in_use: set[str] = set()
    cache = new_cache(tmp_path, source, 25 * MiB, in_use)
    run(cache.ensure("a"))
    run(cache.ensure("b"))
    in_use.add("a")  # an instance boots from a, the oldest
    run(cache.ensure("c"))  # room for c: b goes, not a
    assert cache.lookup("a") is not None and cache.lookup("c") is not None
    assert cache.lookup("b") is None
    in_use.add("c")
    run(cache.ensure("d"))  # nothing may go: over the limit rather than break an instance
    assert all(cache.lookup(name) is not None for name in ("a", "c", "d"))
    in_use.clear()
    # The oldest first, until it fits: a, then c; d, the newest, fits in what is left.
    assert cache.prune(10 * MiB) == [source.manifests["a"].digest, source.manifests["c"].digest]
    assert cache.lookup("d") is not None
    held = {info.name for info in cache.held()}
    assert held == {"d"}


def test_an_image_larger_than_the_cache_is_refused(tmp_path: Path) -> None:
    source = Source()
    source.add("huge", 2 * MiB)
    cache = new_cache(tmp_path, source, MiB)
    with pytest.raises(DriverError, match="larger than this node's image cache"):
        run(cache.ensure("huge"))
    assert source.requests == []
    with pytest.raises(NotFound):
        run(cache.ensure("nosuch"))
