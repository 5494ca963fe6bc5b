"""Image pull benchmark: master -> worker over the image transfer service, against a plain copy.

A file of ``--megabytes`` (default 500) of random bytes is imported into a master's store (the
CLI streams it up), then a worker (qemu driver: the one whose launches use the image cache; no
VM is started) pulls it with ``multiverse image pull``: gRPC over mutual TLS in 1 MiB chunks,
written to the worker's cache, then hashed as a whole before it counts as pulled. The figure is
the pull's MB/s (10^6 bytes), from the API request until the operation succeeded (the
worker hashes each chunk as it writes it, so the digest check is inside that time).

The baseline, in the same run on the same loopback: the same file sent over one plain TCP
connection (``socket.sendfile`` on one side, ``recv_into`` + ``write`` to a file on the other);
no TLS, no chunking, no hashing. The ratio pull / plain is printed (goal: >= 0.8).

Both read the file from the page cache (it was just written) and write to the same disk. The
cluster runs as real processes through tests/harness.py in a temporary directory, removed at
the end, also on Ctrl-C.

    .venv/bin/python bench/images.py [--megabytes 500] [--format table|json]
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from common import run_benchmark  # noqa: E402
from harness import Cluster, new_cluster  # noqa: E402  (tests/ is on the path now)

MB = 1_000_000
MiB = 1024 * 1024


def say(message: str) -> None:
    print(f"[images] {message}", file=sys.stderr, flush=True)


def make_file(path: Path, megabytes: int) -> None:
    with path.open("wb") as file:
        for _ in range(megabytes * MB // MiB):
            file.write(os.urandom(MiB))


def plain_copy(source: Path, target: Path) -> float:
    """Seconds to send ``source`` over one loopback TCP connection into ``target``."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        connection, _ = listener.accept()
        with connection, source.open("rb") as file:
            connection.sendfile(file)

    sender = threading.Thread(target=serve, daemon=True)
    started = time.perf_counter()
    sender.start()
    buffer = bytearray(MiB)
    view = memoryview(buffer)
    with socket.create_connection(("127.0.0.1", port)) as client, target.open("wb") as out:
        while received := client.recv_into(buffer):
            out.write(view[:received])
        out.flush()
    elapsed = time.perf_counter() - started
    sender.join()
    listener.close()
    return elapsed


def timed_pull(cluster: Cluster, image: str, node: str) -> float:
    """Seconds from the pull request (the API, as the CLI sends it) until its operation
    succeeded: the transfer and the worker's check of the digest, not the CLI's start-up."""
    headers = {"Authorization": f"Bearer {cluster.token}"}
    base = f"{cluster.api}/api/v1"
    started = time.perf_counter()
    answer = cluster.http.post(f"{base}/image-store/{image}/pull", json={"nodes": [node]},
                               headers=headers)  # fmt: skip
    answer.raise_for_status()
    operation = answer.json()
    while operation["status"] == "running":
        operation = cluster.http.get(
            f"{base}/operations/{operation['id']}/wait", params={"timeout": 30}, headers=headers
        ).json()
    elapsed = time.perf_counter() - started
    if operation["status"] != "success":
        raise RuntimeError(f"the pull failed: {operation['error']}")
    return elapsed


def run(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    source = root / "image.raw"
    say(f"writing {args.megabytes} MB of random bytes")
    make_file(source, args.megabytes)
    size = source.stat().st_size
    (root / "cluster").mkdir()
    with new_cluster(root / "cluster") as cluster:
        cluster.env.pop("MULTIVERSE_IMAGE_CACHE", None)
        cluster.start_master()
        say("importing it into the master's store")
        cluster.ok("image", "import", str(source), "--name", "big", timeout=1800)
        cluster.start_worker("w1", driver="qemu")
        say("pulling it to the worker")
        pull = timed_pull(cluster, "big", "w1")
    say("the same bytes over plain TCP")
    plain = plain_copy(source, root / "copy.raw")
    return {
        "bytes": size,
        "pull_seconds": round(pull, 3),
        "pull_mb_s": round(size / MB / pull, 1),
        "plain_tcp_seconds": round(plain, 3),
        "plain_tcp_mb_s": round(size / MB / plain, 1),
        "ratio": round(plain / pull, 3),
    }


def print_table(report: dict[str, Any]) -> None:
    print(f"image pull of {report['bytes'] / MB:.0f} MB, master -> worker on loopback")
    print(f"  multiverse image pull : {report['pull_mb_s']:8.1f} MB/s ({report['pull_seconds']} s)")
    print(
        f"  plain TCP copy        : {report['plain_tcp_mb_s']:8.1f} MB/s "
        f"({report['plain_tcp_seconds']} s)"
    )
    print(f"  ratio pull / plain    : {report['ratio']:.2f}x (goal >= 0.80x)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--megabytes", type=int, default=500)
    parser.add_argument("--format", choices=("table", "json"), default="table")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs) at the end")
    args = parser.parse_args()
    return run_benchmark("images", args, run, print_table)


if __name__ == "__main__":
    sys.exit(main())
