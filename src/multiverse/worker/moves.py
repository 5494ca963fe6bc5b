"""The worker's part of a cold move: a stopped VM's files, agent to agent.

The source serves the files (:func:`read_chunks`) only to the target node the master named;
the target pulls them (:func:`pull`) into its driver's incoming directory, resuming from what
an interrupted pull wrote, and checks every file's sha256 before the driver adopts them. Holes
of sparse disks travel as counts of zero bytes, and land as holes again.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc

from multiverse.core.errors import DriverError, InvalidArgument
from multiverse.wire import convert
from multiverse.wire.v1 import multiverse_pb2 as pb
from multiverse.wire.v1 import multiverse_pb2_grpc as pb_grpc

__all__ = ["CHUNK", "MoveFile", "manifest", "pull", "read_chunks"]

CHUNK = 1024 * 1024  # bytes per message; well under gRPC's 4 MiB limit
_ZEROS = bytes(CHUNK)


@dataclass(frozen=True)
class MoveFile:
    name: str
    size: int
    sha256: str


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while block := file.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


async def manifest(files: dict[str, Path]) -> list[MoveFile]:
    """Each file's size and sha256 (read in a thread: disks are large)."""
    return [
        MoveFile(name, path.stat().st_size, await asyncio.to_thread(_sha256, path))
        for name, path in files.items()
    ]


async def read_chunks(path: Path, offset: int) -> AsyncIterator[pb.FileChunk]:
    """``path`` from ``offset`` on, as chunks; all-zero blocks as counts (holes)."""
    with path.open("rb") as file:
        file.seek(offset)
        while block := await asyncio.to_thread(file.read, CHUNK):
            if block == _ZEROS[: len(block)]:
                yield pb.FileChunk(zeros=len(block))
            else:
                yield pb.FileChunk(data=block)


def _safe(root: Path, name: str) -> Path:
    """``root/name``, refused if the name would reach outside ``root`` (a hostile source)."""
    path = (root / name).resolve()
    if not name or name.startswith("/") or not path.is_relative_to(root.resolve()):
        raise InvalidArgument(f"refused file name {name!r} in a move")
    return path


async def pull(
    source: pb_grpc.AgentServiceStub,
    source_name: str,
    instance_id: str,
    files: list[MoveFile],
    into: Path,
    progress: Callable[[int, int], None],
) -> None:
    """Fetch ``files`` of ``instance_id`` from the source agent into ``into``.

    A file already complete is kept; a shorter one is continued from its end (the move was
    interrupted); each is checked against its sha256 once whole, and a mismatch is removed so
    that the next attempt starts it again.
    """
    total = sum(item.size for item in files)
    done = 0
    into.mkdir(parents=True, exist_ok=True)
    for item in files:
        path = _safe(into, item.name)
        path.parent.mkdir(parents=True, exist_ok=True)
        have = path.stat().st_size if path.exists() else 0
        if have > item.size:
            path.unlink()
            have = 0
        done += have
        progress(done, total)
        if have < item.size or not path.exists():
            request = pb.ReadFileRequest(id=instance_id, name=item.name, offset=have)
            with path.open("r+b" if have else "wb") as file:
                file.seek(have)
                try:
                    async for chunk in source.ReadFile(request):
                        if chunk.zeros:
                            file.seek(chunk.zeros, 1)
                            done += chunk.zeros
                        else:
                            await asyncio.to_thread(file.write, chunk.data)
                            done += len(chunk.data)
                        progress(done, total)
                except grpc.aio.AioRpcError as exc:
                    raise convert.error_from_rpc(exc, source_name) from exc
                file.truncate(file.tell())  # a trailing hole needs the file's length set
        if await asyncio.to_thread(_sha256, path) != item.sha256:
            path.unlink()
            raise DriverError(f"{item.name} arrived damaged (sha256 differs); try the move again")
