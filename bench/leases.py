"""Launches on the cluster network as it fills: what recording an instance with its address
costs the master's store when the network already holds many.

For each size in ``--sizes`` (instances already holding an address, written in bulk), on SQLite
and on PostgreSQL (a private cluster, tests/postgres.py): ``--launches`` more instances are
recorded one after another with ``Store.add_instance`` and a lease from ``Ipam.picker``, as
``launch`` does for a VM on a bridge-mode node, and timed (p50 / p99, milliseconds). The
first of them is left out: it is the one read of the whole network a master makes once.

    .venv/bin/python bench/leases.py [--sizes 1000,10000,50000] [--launches 200] [--db both]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import statistics
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from common import Report, add_report_options, run_benchmark  # noqa: E402
from postgres import fresh_database, private_postgres  # noqa: E402  (tests/ is on the path)

from multiverse.core.model import DesiredState, Instance, InstanceSpec, InstanceState  # noqa: E402
from multiverse.core.network import mac_for  # noqa: E402
from multiverse.master.network import Ipam  # noqa: E402
from multiverse.store import statements as sql  # noqa: E402
from multiverse.store.repository import Store, now  # noqa: E402

NETWORK = "10.64.0.0/10"  # room for four million addresses: never the limit here
BATCH = 5000


def _fill(store: Store, count: int) -> None:
    """``count`` instances, each with its address, in bulk (not through a launch each)."""
    first = int(ipaddress.IPv4Network(NETWORK).network_address) + 1
    for start in range(0, count, BATCH):
        rows, held = [], []
        for index in range(start, min(start + BATCH, count)):
            instance_id = str(uuid.uuid4())
            rows.append(dict(
                id=instance_id, name=f"held-{index:07d}", node_id=None, cpus=1, memory=1 << 26,
                disk=1 << 30, image="tiny", user_data="", labels={}, desired="running",
                state="Running", ipv4="", release="", message="", version=1, created_at=now(),
            ))  # fmt: skip
            held.append(dict(
                network="default", address=str(ipaddress.IPv4Address(first + index)),
                owner=instance_id, kind="instance", mac=mac_for(instance_id), publish="",
            ))  # fmt: skip
        with store.engine.begin() as connection:
            connection.execute(sql.INSERT_INSTANCE, rows)
            connection.execute(sql.INSERT_LEASE, held)


async def _launches(store: Store, ipam: Ipam, count: int) -> list[float]:
    seconds = []
    for index in range(count + 1):
        instance_id = str(uuid.uuid4())
        instance = Instance(
            id=instance_id, spec=InstanceSpec(name=f"new-{index:05d}"), node_id=None,
            desired=DesiredState.RUNNING, state=InstanceState.SCHEDULED, created_at=now(),
        )  # fmt: skip
        started = time.perf_counter()
        await store.add_instance(instance, ipam.picker(instance_id))
        seconds.append(time.perf_counter() - started)
    return seconds[1:]


@contextlib.contextmanager
def _databases(kinds: list[str], root: Path) -> Iterator[dict[str, Iterator[str]]]:
    """Kind -> fresh database URLs, one per size."""
    with contextlib.ExitStack() as stack:

        def sqlite_urls() -> Iterator[str]:
            for index in range(1000):
                yield f"sqlite:///{root / f'leases-{index}.db'}"

        def postgres_urls() -> Iterator[str]:
            server = stack.enter_context(private_postgres())
            for _ in range(1000):
                yield fresh_database(server, f"b{uuid.uuid4().hex[:12]}")

        made = {"sqlite": sqlite_urls, "postgresql": postgres_urls}
        yield {kind: made[kind]() for kind in kinds}


def run(args: argparse.Namespace, root: Path) -> Report:
    kinds = ["sqlite", "postgresql"] if args.db == "both" else [args.db]
    rows = []
    with _databases(kinds, root) as urls:
        for kind in kinds:
            for size in args.sizes:
                store = Store(next(urls[kind]))
                try:
                    store.migrate()
                    ipam = Ipam.open(store, NETWORK)
                    _fill(store, size)
                    seconds = asyncio.run(_launches(store, ipam, args.launches))
                finally:
                    store.close()
                ordered = sorted(seconds)
                rows.append({
                    "db": kind, "instances": size,
                    "p50_ms": 1000 * statistics.median(ordered),
                    "p99_ms": 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
                })  # fmt: skip
                print(f"[leases] {kind} {size}: done", file=sys.stderr)
    return {"launches": args.launches, "runs": rows}


def print_table(report: Report) -> None:
    print(f"{report['launches']} launches with an address each, after N already held:")
    print(f"{'db':12}{'N':>10}{'p50 ms':>10}{'p99 ms':>10}")
    for row in report["runs"]:
        print(f"{row['db']:12}{row['instances']:>10}{row['p50_ms']:>10.2f}{row['p99_ms']:>10.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--sizes", type=lambda text: [int(part) for part in text.split(",")],
        default=[1000, 10000, 50000], help="instances holding an address already, comma-separated",
    )  # fmt: skip
    parser.add_argument("--launches", type=int, default=200)
    parser.add_argument("--db", choices=["sqlite", "postgresql", "both"], default="both")
    add_report_options(parser)
    return run_benchmark("leases", parser.parse_args(), run, print_table)


if __name__ == "__main__":
    sys.exit(main())
