"""Images: ``images`` (what the nodes can boot) and the ``image`` group of the master's
store (import, list, delete, pull; ``build`` runs on this machine, from multiverse.servers)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from multiverse.client import cmdline
from multiverse.client.cli import api_client, format_option, stderr_console
from multiverse.client.errors import Failure
from multiverse.client.output import Column, render
from multiverse.core.sizes import format_size

if TYPE_CHECKING:
    from multiverse.client.http import ApiClient


IMAGE_COLUMNS = [
    Column("Image", lambda i: i["name"]),
    Column("Kind", lambda i: i["kind"]),
    Column("Size", lambda i: format_size(i["size"]) if i["size"] else "--"),
    Column("Digest", lambda i: i["digest"][:19]),
    Column("Nodes", lambda i: ",".join(i["nodes"])),
]


@cmdline.command()
@format_option
def images(fmt: str) -> None:
    """List the images the nodes can boot (launch's default is tiny)."""
    cmdline.echo(render(api_client().images(), IMAGE_COLUMNS, fmt))


STORED_IMAGE_COLUMNS = [
    Column("Image", lambda i: i["name"]),
    Column("Aliases", lambda i: ",".join(i["aliases"])),
    Column("Kind", lambda i: i["kind"]),
    Column("Size", lambda i: format_size(i["size"])),
    Column("Digest", lambda i: i["digest"][:19]),
    Column("Nodes", lambda i: ",".join(i["nodes"])),
]


# `image build` makes a guest here, which is the servers' side (multiverse.servers); its
# module is loaded only by a call of it (or help).
@cmdline.group(
    lazy={
        "build": "multiverse.servers:image_build",
        "build-test": "multiverse.servers:image_build_test",
    },
)
def image() -> None:
    """Images of the master's store: import, list, delete, pull to nodes, build."""


@contextmanager
def _bar(label: str, total: int) -> Iterator[Callable[[int, int], None]]:
    """A progress bar of bytes on stderr; yields ``update(done, total)``."""
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TransferSpeedColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
    )
    with Progress(*columns, console=stderr_console(), transient=True) as bar:
        task = bar.add_task(label, total=total or None)

        def update(done: int, new_total: int) -> None:
            bar.update(task, completed=done, total=new_total or None)

        yield update


def wait_with_progress(client: ApiClient, operation: dict[str, Any], timeout: float) -> Any:
    """Wait for an import or pull operation, its bytes as a bar; its result once it succeeded."""
    deadline = time.monotonic() + timeout
    label = f"{operation['kind']} {operation['target']}"
    with _bar(label, 0) as update:
        while True:
            operation = client.wait_operation(operation["id"], timeout=1)
            if operation["status"] == "success":
                return operation["result"]
            if operation["status"] == "failure":
                raise Failure(operation["error"] or f"{label} failed")
            if time.monotonic() > deadline:
                raise Failure(f"{label}: still not done after {timeout:.0f}s")
            progress = operation.get("transfer") or {}
            update(int(progress.get("done", 0)), int(progress.get("total", 0)))


def _sha256_of(path: Path, update: Callable[[int, int], None]) -> str:
    import hashlib

    digest = hashlib.sha256()
    done, total = 0, path.stat().st_size
    with path.open("rb") as file:
        while block := file.read(1024 * 1024):
            digest.update(block)
            done += len(block)
            update(done, total)
    return digest.hexdigest()


def upload_files(client: ApiClient, files: dict[str, Path]) -> dict[str, str]:
    """Send each file the master does not have yet, streamed; {relative path: sha256}."""
    digests: dict[str, str] = {}
    for relative, path in sorted(files.items()):
        with _bar(f"hashing {relative}", path.stat().st_size) as update:
            sha256 = _sha256_of(path, update)
        digests[relative] = sha256
        if client.has_blob(sha256):
            continue
        with _bar(f"uploading {relative}", path.stat().st_size) as update:
            client.put_blob(sha256, path, update)
    return digests


@image.command(name="import")
@cmdline.argument("source")
@cmdline.option("--name", "name", required=True, help="The image's name.")
@cmdline.option("--alias", "aliases", multiple=True, help="Another name for it (repeatable).")
@cmdline.option("--sha256", default="", help="A URL's expected sha256 (required with a URL).")
@cmdline.option("--size", "rootfs_size", default="2G", show_default=True,
              help="An OCI layout's ext4 root file system size.")  # fmt: skip
@cmdline.option("--timeout", type=cmdline.FloatRange(1), default=3600, show_default=True)
@format_option
def image_import(
    source: str,
    name: str,
    aliases: tuple[str, ...],
    sha256: str,
    rootfs_size: str,
    timeout: float,
    fmt: str,
) -> None:
    """Import SOURCE as image NAME: a qcow2 or raw disk file, a directory (an OCI image layout,
    or an image directory with an image.json such as the tiny guest's), or an https URL with
    --sha256. Files go to the master streamed; the master tells the kind."""
    client = api_client()
    body: dict[str, Any] = {"name": name, "aliases": list(aliases), "rootfs_size": rootfs_size}
    if source.startswith(("https://", "http://")):
        if not sha256:
            raise cmdline.UsageError("a URL needs --sha256, so that what arrives can be checked")
        body.update(url=source, sha256=sha256)
    else:
        path = Path(source)
        if not path.exists():
            raise cmdline.UsageError(f"{source} does not exist")
        if path.is_dir():
            files = {
                str(item.relative_to(path)): item
                for item in sorted(path.rglob("*"))
                if item.is_file() and not item.name.startswith(".")
            }
        else:
            files = {path.name: path}
        body["files"] = upload_files(client, files)
    operation = client.import_image(body)
    result = wait_with_progress(client, operation, timeout)
    cmdline.echo(render([result], STORED_IMAGE_COLUMNS, fmt))


@image.command(name="list")
@format_option
def image_list(fmt: str) -> None:
    """The images of the master's store, and the nodes whose caches hold each."""
    cmdline.echo(render(api_client().stored_images(), STORED_IMAGE_COLUMNS, fmt))


@image.command(name="delete")
@cmdline.argument("name")
@format_option
def image_delete(name: str, fmt: str) -> None:
    """Delete an image from the store (refused while an instance uses it)."""
    deleted = api_client().delete_image(name)
    cmdline.echo(f"deleted {deleted['name']}" if fmt == "table" else render([deleted], [], fmt))


@image.command(name="pull")
@cmdline.argument("name")
@cmdline.option("--node", "nodes", multiple=True, help="A node to pull to (repeatable).")
@cmdline.option("--all", "all_", is_flag=True, help="Every Ready node.")
@cmdline.option("--timeout", type=cmdline.FloatRange(1), default=3600, show_default=True)
@format_option
def image_pull(name: str, nodes: tuple[str, ...], all_: bool, timeout: float, fmt: str) -> None:
    """Warm nodes' image caches with NAME ahead of launches."""
    if not nodes and not all_:
        raise cmdline.UsageError("name a node with --node, or use --all")
    client = api_client()
    operation = client.pull_image(name, list(nodes), all_)
    result = wait_with_progress(client, operation, timeout)
    if fmt == "table":
        cmdline.echo(f"pulled {result['image']} to {', '.join(result['nodes'])}")
    else:
        cmdline.echo(render([result], [], fmt))
