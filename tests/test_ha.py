"""Several masters on one PostgreSQL: the leader dies (kill -9) during launches, the other
takes over, every launch converges once, and the CLI, knowing both, keeps working."""

from __future__ import annotations

import json
import shutil
import signal
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from harness import DOWN_TIMEOUT, NODE_TIMEOUT, Cluster, Proc, free_port, wait_until
from postgres import private_postgres

LAUNCHES = 20


def _masters(cluster: Cluster) -> list[dict[str, Any]]:
    return list(cluster.ok("masters", "--format", "json").json())


def _leader(cluster: Cluster) -> dict[str, Any] | None:
    leaders = [m for m in _masters(cluster) if m["leader"] and m["status"] == "up"]
    return leaders[0] if len(leaders) == 1 else None


def test_two_masters_on_postgresql_survive_the_leader_killed_during_launches(
    cluster: Cluster,
) -> None:
    with private_postgres() as db:
        cluster.start_master("--db", db)
        first_api = cluster.api
        # The second master shares the database and the cluster CA (copied, as an operator
        # would), and serves its own ports.
        second_dir = cluster.root / "master-b"
        second_dir.mkdir(mode=0o700)
        shutil.copytree(cluster.root / "master" / "pki", second_dir / "pki")
        grpc_b, api_b = free_port(), free_port()
        second = Proc(
            "master-b",
            ["master", "--listen", f"127.0.0.1:{grpc_b}", "--api-listen", f"127.0.0.1:{api_b}",
             "--data-dir", str(second_dir), "--db", db, "--node-timeout", str(NODE_TIMEOUT),
             "--down-timeout", str(DOWN_TIMEOUT)],
            cluster.root / "master-b.log", cluster.env,
        ).start()  # fmt: skip
        first = cluster.master
        assert first is not None
        try:
            # The CLI knows both masters.
            config = (cluster.root / "master" / "client.toml").read_text()
            both = f"{first_api},https://127.0.0.1:{api_b}"
            config = config.replace(f'server = "{first_api}"', f'server = "{both}"')
            (cluster.root / "both.toml").write_text(config)
            cluster.env["MULTIVERSE_CONFIG"] = str(cluster.root / "both.toml")
            wait_until(lambda: len(_masters(cluster)) == 2 and _leader(cluster), timeout=60)

            masters = f"127.0.0.1:{cluster.grpc_port},127.0.0.1:{grpc_b}"
            for name in ("node-a", "node-b", "node-c"):
                cluster.start_worker(name, "--master", masters)

            leader = _leader(cluster)
            assert leader is not None
            killed, survivor = (first, second) if leader["api"] == first_api else (second, first)

            def launch(index: int) -> None:
                name = f"ha-{index:02d}"
                result = cluster.cli("launch", "--name", name, "--no-wait", "--memory", "256M")
                if result.code != 0:  # it went to the dying master: try again, once is enough
                    again = cluster.cli("launch", "--name", name, "--no-wait", "--memory", "256M")
                    assert again.code == 0 or "exists already" in again.err, again.err

            with ThreadPoolExecutor(4) as pool:
                done = [pool.submit(launch, index) for index in range(LAUNCHES)]
                wait_until(lambda: sum(f.done() for f in done) >= 5, timeout=120)
                killed.kill(signal.SIGKILL)  # the leader, mid-way
                for future in done:
                    future.result()

            assert survivor.process is not None and survivor.process.poll() is None
            wait_until(
                lambda: (found := _leader(cluster)) is not None and found["api"] != leader["api"],
                timeout=60,
            )

            def converged() -> bool:
                instances = cluster.instances()
                return len(instances) == LAUNCHES and all(
                    item["state"] == "Running" for item in instances.values()
                )

            wait_until(converged, timeout=180, interval=0.5)
            assert sorted(cluster.instances()) == [f"ha-{i:02d}" for i in range(LAUNCHES)]
            vms = [
                vm
                for name in ("node-a", "node-b", "node-c")
                for vm in json.loads((cluster.root / name / "fake" / "vms.json").read_text())
            ]
            assert len(vms) == LAUNCHES == len(set(vms))  # no VM made twice
            nodes = cluster.ok("nodes", "--format", "json").json()
            assert sorted(node["name"] for node in nodes) == ["node-a", "node-b", "node-c"]
            cluster.ok("stop", "ha-00")  # a write through the survivor
            assert cluster.instances()["ha-00"]["state"] == "Stopped"
        finally:
            second.kill()
            cluster.close()
