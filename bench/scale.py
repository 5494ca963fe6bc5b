"""Scale: one master, many simulated nodes (``multiverse worker --simulate N``), many launches.

Measures, for SQLite and for PostgreSQL (a private cluster, tests/postgres.py): the time until
every node is Ready, placements per second (launches accepted through the REST API at a fixed
number in flight), the time until every instance is Running, the latency of
``GET /instances?limit=500``, how long a stop takes to show on the master (sync lag, bounded
above), and the master's RSS and CPU time. Run by hand
(``python bench/scale.py --nodes 1000 --instances 50000``); tests/test_scale.py runs a small
one to check that it works, not how fast.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from common import Report, run_benchmark  # noqa: E402
from harness import Cluster, new_cluster, wait_until  # noqa: E402  (tests/ is on the path)
from postgres import private_postgres  # noqa: E402

from multiverse.core.model import InstanceState  # noqa: E402

CAPACITY = "cpus=100000,memory=100000G,disk=1000000G"  # room for any count of instances


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else 0.0


@contextlib.contextmanager
def _database(kind: str) -> Iterator[list[str]]:
    """The master's --db options for ``kind``."""
    if kind == "sqlite":
        yield []
        return
    with private_postgres() as url:
        yield ["--db", url]


class _Connection:
    """One keep-alive HTTPS connection speaking just the HTTP/1.1 the launches need. httpx
    spent 7.4 ms of CPU per launch here, more than a fifth of the machine during a launch
    storm: CPU the master and the simulated nodes, on the same two cores, went without."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: str):
        self._reader, self._writer, self._head = reader, writer, head

    @classmethod
    async def open(cls, cluster: Cluster) -> _Connection:
        url = urllib.parse.urlsplit(cluster.api)
        reader, writer = await asyncio.open_connection(
            url.hostname, url.port, ssl=cluster.ssl_context
        )
        head = f"Host: {url.netloc}\r\nAuthorization: Bearer {cluster.token}\r\n"
        return cls(reader, writer, head)

    async def request(self, method: str, path: str, body: bytes = b"") -> int:
        """The response's status; its body is read and dropped."""
        self._writer.write(
            f"{method} /api/v1{path} HTTP/1.1\r\n{self._head}"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        status = int((await self._reader.readline()).split()[1])
        length = 0
        while (line := await self._reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        await self._reader.readexactly(length)
        return status

    def close(self) -> None:
        self._writer.close()


async def _send_all(
    cluster: Cluster, count: int, in_flight: int, batch: int = 0, start: int = 0
) -> tuple[float, int, int]:
    """``count`` launches, ``batch`` to a request (a ``count`` launch; 1: each its own
    request, with no count), named from the ``start``-th on, or, with ``batch`` 0, ``count``
    authenticated requests that do nothing (``GET /whoami``: the floor the API's HTTPS,
    routing and token check set); ``in_flight`` requests at a time, each sender on a
    connection of its own. A launch the master is too busy for (503: its backlog of
    instances still to hand to their nodes is full) is sent again a second later. Returns
    (seconds, instances not launched, 503 answers)."""
    requests = iter(range(start, start + count, max(batch, 1)))
    failures = busy = 0
    connections = [await _Connection.open(cluster) for _ in range(in_flight)]

    async def sender(connection: _Connection) -> None:
        nonlocal failures, busy
        for first in requests:
            size = min(batch, start + count - first)
            body: dict[str, Any] = {"cpus": 1, "memory": "64M", "disk": "1G"}
            if batch == 0:
                failures += await connection.request("GET", "/whoami") != 200
                continue
            if batch == 1:
                body["name"] = f"vm-{first:06d}"
            else:  # vm-000100-1 ... vm-000100-50, for the batch from the 100th on
                body.update(name=f"vm-{first:06d}-{{n}}", count=size)
            data = json.dumps(body).encode()
            while (status := await connection.request("POST", "/instances", data)) == 503:
                busy += 1
                await asyncio.sleep(1.0)
            failures += size if status != 202 else 0

    started = time.perf_counter()
    try:
        await asyncio.gather(*(sender(connection) for connection in connections))
    finally:
        for connection in connections:
            connection.close()
    return time.perf_counter() - started, failures, busy


def _cpu(process: psutil.Process) -> float:
    return sum(process.cpu_times()[:2])


def _count(cluster: Cluster, **params: Any) -> int:
    """How many instances match, following the pages."""
    headers = {"Authorization": f"Bearer {cluster.token}"}
    url: str | None = f"{cluster.api}/api/v1/instances"
    query: dict[str, Any] | None = {"limit": 1000, **params}
    total = 0
    while url:
        response = cluster.http.get(url, params=query, headers=headers)
        response.raise_for_status()
        total += len(response.json())
        url, query = response.links.get("next", {}).get("url"), None
    return total


def _all_running(cluster: Cluster) -> bool:
    """No instance in any other state: a request of one item per state, not every Running one
    listed (at 50,000 instances, the benchmark's own listing every half second was a large
    part of the master's work)."""
    headers = {"Authorization": f"Bearer {cluster.token}"}
    for state in [state for state in InstanceState if state != InstanceState.RUNNING]:
        response = cluster.http.get(
            f"{cluster.api}/api/v1/instances", params={"state": state.value, "limit": 1},
            headers=headers,
        )  # fmt: skip
        response.raise_for_status()
        if response.json():
            return False
    return True


def _stop_seen(cluster: Cluster, samples: int) -> list[float]:
    """Sync lag, bounded above: from asking a node to stop an instance until the master shows
    it Stopped (the API call, the agent's Stop, the node's next report and its intake)."""
    headers = {"Authorization": f"Bearer {cluster.token}"}
    api = f"{cluster.api}/api/v1/instances"
    lags = []
    first = cluster.http.get(api, params={"limit": max(samples, 1)}, headers=headers).json()
    for name in [item["name"] for item in first[:samples]]:
        begun = time.perf_counter()
        cluster.http.post(f"{api}/{name}/stop", headers=headers).raise_for_status()
        while cluster.http.get(f"{api}/{name}", headers=headers).json()["state"] != "Stopped":
            if time.perf_counter() - begun > 120:
                raise TimeoutError(f"{name} never showed Stopped")
            time.sleep(0.005)
        lags.append(time.perf_counter() - begun)
    return lags


def measure(args: argparse.Namespace, root: Path, kind: str) -> Report:
    (root / kind).mkdir()
    with _database(kind) as db, new_cluster(root / kind) as cluster:
        # The master's own defaults, not the harness's seconds-long test timeouts: a node
        # reporting every --sync-interval seconds must not flap NotReady in between.
        timeouts = ["--node-timeout", str(max(20.0, 4 * args.sync_interval)), "--down-timeout",
                    str(max(120.0, 24 * args.sync_interval))]  # fmt: skip
        cluster.start_master(*db, *timeouts)
        master = psutil.Process(cluster.master.process.pid)  # type: ignore[union-attr]
        token = cluster.ok("token", "create", "--uses", str(args.nodes)).out.strip()
        started = time.perf_counter()
        cluster.start_worker(
            "sim", "--simulate", str(args.nodes), "--listen", "127.0.0.1:0",
            "--sync-interval", str(args.sync_interval), token=token, capacity=CAPACITY,
            wait=False,
        )  # fmt: skip

        def all_ready() -> bool:
            nodes = cluster.ok("nodes", "--format", "json").json()
            return len(nodes) == args.nodes and all(n["status"] == "Ready" for n in nodes)

        wait_until(all_ready, timeout=args.timeout, interval=0.5)
        nodes_ready = time.perf_counter() - started
        # What the nodes' reports alone cost the master, before any launch.
        idle_before = _cpu(master)
        time.sleep(args.idle_seconds)
        idle_cpu = (_cpu(master) - idle_before) / args.idle_seconds

        floor_requests = min(args.instances, args.floor_requests)
        floor, _, _ = asyncio.run(_send_all(cluster, floor_requests, args.in_flight))

        # The cluster filled up to all but the launches measured, and settled (all Running):
        # the placements measured are those of a master holding that many.
        filled = args.instances - args.launches
        fill_started = time.perf_counter()
        fill_seconds, fill_failures, fill_busy = asyncio.run(
            _send_all(cluster, filled, args.in_flight, args.batch)
        )
        wait_until(lambda: _all_running(cluster), timeout=args.timeout, interval=0.5)
        fill_running = time.perf_counter() - fill_started

        nodes = psutil.Process(cluster.workers["sim"].process.pid)  # type: ignore[union-attr]
        client = psutil.Process()
        before = [_cpu(master), _cpu(nodes), _cpu(client)]
        seconds, failures, busy = asyncio.run(
            _send_all(cluster, args.launches, args.in_flight, args.batch, start=filled)
        )
        after = [_cpu(master), _cpu(nodes), _cpu(client)]
        spent = [done - was for done, was in zip(after, before, strict=True)]
        running_from = time.perf_counter()
        wait_until(lambda: _all_running(cluster), timeout=args.timeout, interval=0.5)
        all_running = seconds + time.perf_counter() - running_from
        placements = (args.launches - failures) / seconds if seconds else 0.0
        failures += fill_failures

        headers = {"Authorization": f"Bearer {cluster.token}"}
        latencies = []
        for _ in range(args.pages):
            begun = time.perf_counter()
            response = cluster.http.get(
                f"{cluster.api}/api/v1/instances", params={"limit": 500}, headers=headers
            )
            latencies.append(time.perf_counter() - begun)
            response.raise_for_status()
        running = _count(cluster, state="Running")
        lags = _stop_seen(cluster, min(args.lag_samples, args.instances - failures))
        return {
            "db": kind,
            "nodes": args.nodes,
            "instances": args.instances,
            "launches_measured": args.launches,
            "per_request": args.batch,
            "launch_failures": failures,
            "busy_answers": fill_busy + busy,
            "running": running,
            "nodes_ready_s": nodes_ready,
            "empty_requests_per_s": floor_requests / floor if floor else 0.0,
            "fill_placements_per_s": filled / fill_seconds if fill_seconds else 0.0,
            "fill_all_running_s": fill_running if filled else 0.0,
            "placements_per_s": placements,
            "all_running_s": all_running,
            "list_page_p50_ms": 1000 * statistics.median(latencies),
            "list_page_p99_ms": 1000 * _percentile(latencies, 0.99),
            "stop_seen_p50_ms": 1000 * statistics.median(lags) if lags else 0.0,
            "stop_seen_p99_ms": 1000 * _percentile(lags, 0.99),
            "master_idle_cpu_pct": 100 * idle_cpu,
            "master_rss_mb": master.memory_info().rss / 2**20,
            "master_cpu_s_during_launches": spent[0],
            # Per launch, over the launches' seconds only (the Running that follows is not in).
            "master_cpu_ms_per_launch": 1000 * spent[0] / args.launches,
            "nodes_cpu_ms_per_launch": 1000 * spent[1] / args.launches,
            "client_cpu_ms_per_launch": 1000 * spent[2] / args.launches,
        }


def run(args: argparse.Namespace, root: Path) -> Report:
    kinds = ["sqlite", "postgresql"] if args.db == "both" else [args.db]
    return {"runs": [measure(args, root, kind) for kind in kinds]}


def print_table(report: Report) -> None:
    runs = report["runs"]
    rows = [key for key in runs[0] if key != "db"]
    print(f"{'':32}" + "".join(f"{run['db']:>14}" for run in runs))
    for key in rows:
        cells = "".join(
            f"{run[key]:>14.1f}" if isinstance(run[key], float) else f"{run[key]:>14}"
            for run in runs
        )
        print(f"{key:32}{cells}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--instances", type=int, default=2000)
    parser.add_argument(
        "--launches", type=int, default=0,
        help="launches measured, after the others fill the cluster (0: all of --instances)",
    )  # fmt: skip
    parser.add_argument("--in-flight", type=int, default=32)
    parser.add_argument(
        "--floor-requests", type=int, default=5000, help="empty requests measuring the floor"
    )
    parser.add_argument(
        "--batch", type=int, default=1, help="instances per launch request (a count)"
    )
    parser.add_argument("--pages", type=int, default=50, help="GET /instances?limit=500 calls")
    parser.add_argument("--sync-interval", type=float, default=5.0)
    parser.add_argument("--lag-samples", type=int, default=50, help="instances stopped one by one")
    parser.add_argument("--idle-seconds", type=float, default=10.0, help="idle CPU measured")
    parser.add_argument("--db", choices=["sqlite", "postgresql", "both"], default="both")
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--keep", action="store_true", help="keep the logs")
    parser.add_argument("--format", choices=["table", "json"], default="table")
    args = parser.parse_args()
    if not 0 <= args.launches <= args.instances:
        parser.error("--launches must be between 0 and --instances")
    args.launches = args.launches or args.instances
    return run_benchmark("scale", args, run, print_table)


if __name__ == "__main__":
    sys.exit(main())
