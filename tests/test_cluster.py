"""End to end: a master and fake-driver workers as separate processes, driven by the CLI."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import httpx
import psutil
import websockets
import yaml
from harness import NODE_TIMEOUT, Cluster, wait_until


def _age(stamp: str) -> float:
    moment = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    return (datetime.now(UTC) - moment).total_seconds()


def test_two_workers_spread_and_lifecycle(cluster: Cluster) -> None:
    cluster.start_master()
    cluster.start_worker("node-a", "--labels", "zone=a")
    cluster.start_worker("node-b", "--labels", "zone=b")

    nodes = cluster.ok("nodes", "--format", "json").json()
    assert [n["name"] for n in nodes] == ["node-a", "node-b"]
    for node in nodes:
        assert node["status"] == "Ready"
        assert _age(node["last_sync"]) < 5
        assert node["cpus"] == {"total": 8, "free": 8}
        assert node["memory"]["total"] == 16 * 1024**3
        assert node["labels"]["zone"] in ("a", "b")
    table = cluster.ok("nodes").out
    assert table.splitlines()[0].split() == [
        "Node",
        "Name",
        "Status",
        "IPv4",
        "Cpu",
        "Mem",
        "Disk",
        "Instances",
        "Network",
        "Last",
        "Sync",
    ]

    images = {i["name"]: i for i in cluster.ok("images", "--format", "json").json()}
    assert images["tiny"]["nodes"] == ["node-a", "node-b"] and images["tiny"]["kind"] == "fake"
    assert "tiny" in cluster.ok("images").out

    for i in range(6):
        launched = cluster.ok(
            "launch", "--name", f"web-{i}", "--cpus", "1", "--memory", "1G", "--disk", "4G"
        )
        assert f"web-{i}" in launched.out
    instances = cluster.instances()
    assert all(item["state"] == "Running" for item in instances.values())
    per_node = [item["node"] for item in instances.values()]
    assert sorted(per_node.count(name) for name in ("node-a", "node-b")) == [3, 3]
    assert instances["web-0"]["memory"] == 1024**3 and instances["web-0"]["disk"] == 4 * 1024**3
    # What the scheduler reserved shows as used on the node.
    wait_until(lambda: cluster.node("node-a")["cpus"]["free"] == 5)

    # Placement by selector and by node name.
    cluster.ok("launch", "--name", "in-b", "--selector", "zone=b")
    cluster.ok("launch", "--name", "on-a", "--node", "node-a")
    instances = cluster.instances()
    assert instances["in-b"]["node"] == "node-b" and instances["on-a"]["node"] == "node-a"

    cluster.ok("stop", "web-0", "web-1")
    instances = cluster.instances()
    assert instances["web-0"]["state"] == "Stopped" and instances["web-1"]["state"] == "Stopped"
    assert instances["web-2"]["state"] == "Running"
    cluster.ok("start", "web-0")
    assert cluster.instances()["web-0"]["state"] == "Running"
    cluster.ok("restart", "web-2")
    assert cluster.instances()["web-2"]["state"] == "Running"
    cluster.ok("delete", "web-3")
    assert "web-3" not in cluster.instances()

    info = cluster.ok("info", "web-0", "--format", "json").json()[0]
    assert info["memory_usage"]["total"] == 1024**3 and info["memory_usage"]["used"] > 0
    assert len(info["load"]) == 3 and info["disk_usage"]["total"] == 4 * 1024**3
    assert "out of" in cluster.ok("info", "web-0").out

    # Every listing in every format parses, with the documented keys.
    listing = yaml.safe_load(cluster.ok("instances", "--format", "yaml").out)
    assert {"name", "id", "node", "state", "ipv4", "image", "cpus", "memory", "disk"} <= set(
        listing[0]
    )
    rows = list(csv.DictReader(io.StringIO(cluster.ok("list", "--format", "csv").out)))
    assert {row["Instance Name"] for row in rows} == set(cluster.instances())
    assert cluster.ok("ls").out.splitlines()[0].split()[:4] == ["Node", "Name", "Instance", "Name"]

    exec_result = cluster.cli("exec", "web-0", "--", "sh", "-c", "echo out; echo err >&2; exit 4")
    assert (exec_result.code, exec_result.out, exec_result.err) == (4, "out\n", "err\n")

    cluster.ok("delete", "--all")
    assert cluster.instances() == {}
    wait_until(lambda: cluster.node("node-a")["cpus"]["free"] == 8)


def test_a_worker_reports_what_its_host_uses(cluster: Cluster) -> None:
    # The host's usage, not the allocations: nothing runs, yet memory and disk are in use.
    cluster.start_master()
    cluster.start_worker("node-a", capacity="cpus=2,memory=1G,disk=1G")
    wait_until(lambda: cluster.node("node-a")["used"]["memory"] > 0, timeout=30)
    node = cluster.node("node-a")
    used = node["used"]
    assert set(used) == {"cpus", "memory", "disk"}
    assert 0 < used["memory"] <= psutil.virtual_memory().total
    assert 0 < used["disk"] <= psutil.disk_usage(str(cluster.root / "node-a")).total
    assert 0 <= used["cpus"] <= (psutil.cpu_count() or 1)
    # Allocations are apart from usage: an idle node has all its capacity free.
    assert node["memory"] == {"total": 1024**3, "free": 1024**3}
    assert node["instances"] == 0


def test_killed_worker_goes_not_ready_and_comes_back(cluster: Cluster) -> None:
    cluster.start_master()
    cluster.start_worker("node-a")
    cluster.start_worker("node-b")
    first_id = cluster.node("node-a")["id"]
    cluster.ok("launch", "--name", "keep-1", "--node", "node-a")
    cluster.ok("launch", "--name", "keep-2", "--node", "node-a")

    cluster.workers["node-a"].kill()
    killed_at = time.monotonic()
    wait_until(lambda: cluster.node("node-a")["status"] == "NotReady", timeout=NODE_TIMEOUT + 5)
    assert time.monotonic() - killed_at < NODE_TIMEOUT + 3
    for i in range(3):
        cluster.ok("launch", "--name", f"new-{i}")
    instances = cluster.instances()
    assert all(instances[f"new-{i}"]["node"] == "node-b" for i in range(3))
    refused = cluster.cli("launch", "--name", "pinned", "--node", "node-a")
    assert refused.code == 2 and "not ready" in refused.err

    # Same data dir, no token: it re-joins as the same node with its instances.
    proc = cluster.start_worker("node-a", token="")
    assert f"with uuid {first_id}" in wait_until(
        lambda: "joined as" in proc.output() and proc.output()
    )
    assert cluster.node("node-a")["id"] == first_id
    assert len([n for n in cluster.ok("nodes", "--format", "json").json()]) == 2
    instances = cluster.instances()
    assert instances["keep-1"]["state"] == instances["keep-2"]["state"] == "Running"
    cluster.ok("stop", "keep-1")
    assert cluster.instances()["keep-1"]["state"] == "Stopped"


def test_a_frozen_worker_goes_not_ready_and_comes_back_on_its_own_stream(
    cluster: Cluster,
) -> None:
    # Reports that change nothing are written in batches from the master's memory; a node
    # the health check found silent meanwhile must still become Ready again by its reports.
    cluster.start_master()
    cluster.start_worker("node-a")
    process = cluster.workers["node-a"].process
    assert process is not None
    os.killpg(process.pid, signal.SIGSTOP)
    try:
        wait_until(lambda: cluster.node("node-a")["status"] == "NotReady", timeout=NODE_TIMEOUT + 5)
    finally:
        os.killpg(process.pid, signal.SIGCONT)
    wait_until(lambda: cluster.node("node-a")["status"] == "Ready", timeout=NODE_TIMEOUT + 10)
    heard = cluster.node("node-a")["last_sync"]
    # And it stays Ready: its beats keep reaching the store (the health check reads them there).
    wait_until(lambda: cluster.node("node-a")["last_sync"] != heard, timeout=10)
    time.sleep(NODE_TIMEOUT + 1)
    assert cluster.node("node-a")["status"] == "Ready"


def test_master_restart_keeps_everything(cluster: Cluster) -> None:
    cluster.start_master()
    cluster.start_worker("node-a")
    cluster.ok("launch", "--name", "survivor", "--memory", "2G")
    cluster.ok("token", "create", "--api", "--role", "viewer", "--description", "ci")
    tokens_before = cluster.ok("token", "list", "--format", "json").json()
    node_before = cluster.node("node-a")

    assert cluster.master is not None
    cluster.master.stop()
    cluster.start_master()

    assert cluster.ok("token", "list", "--format", "json").json() == tokens_before
    node = cluster.node("node-a")
    assert node["id"] == node_before["id"]
    instance = cluster.instances()["survivor"]
    assert instance["memory"] == 2 * 1024**3 and instance["node"] == "node-a"
    # The worker's sync stream reconnects by itself; the node is Ready again, actions work.
    wait_until(lambda: _age(cluster.node("node-a")["last_sync"]) < 2, timeout=20)
    cluster.ok("stop", "survivor")
    assert cluster.instances()["survivor"]["state"] == "Stopped"


def test_concurrent_launches_never_lose_duplicate_or_oversubscribe(cluster: Cluster) -> None:
    cluster.start_master()
    cluster.start_worker("node-a", capacity="cpus=12,memory=64G,disk=500G")
    cluster.start_worker("node-b", capacity="cpus=12,memory=64G,disk=500G")
    headers = {"Authorization": f"Bearer {cluster.token}"}

    def launch(name: str) -> httpx.Response:
        body = {"name": name, "cpus": 1, "memory": "512M", "disk": "1G"}
        return cluster.http.post(
            f"{cluster.api}/api/v1/instances", json=body, headers=headers, timeout=60
        )

    with ThreadPoolExecutor(20) as pool:
        responses = list(pool.map(launch, [f"burst-{i}" for i in range(20)]))
    assert [r.status_code for r in responses] == [202] * 20
    ids = {r.json()["id"] for r in responses}
    assert len(ids) == 20
    wait_until(lambda: all(i["state"] == "Running" for i in cluster.instances().values()))
    instances = cluster.instances()
    assert {i["id"] for i in instances.values()} == ids

    # 4 cpus are left in all; 10 more at once: exactly 4 fit, none past capacity.
    with ThreadPoolExecutor(10) as pool:
        responses = list(pool.map(launch, [f"more-{i}" for i in range(10)]))
    codes = sorted(r.status_code for r in responses)
    assert codes == [202] * 4 + [409] * 6
    refused = [r.json()["error"] for r in responses if r.status_code == 409]
    assert all(e["code"] == "unschedulable" and "cpus free" in e["message"] for e in refused)
    # The same reasons as data, node by node, for clients that show them their own way.
    assert all(
        sorted(r["node"] for r in e["reasons"]) == ["node-a", "node-b"]
        and all(r["reason"].endswith("of 1 cpus free") for r in e["reasons"])
        for e in refused
    )
    for name in ("node-a", "node-b"):
        node = cluster.node(name)
        assert node["cpus"]["free"] == 0 and node["instances"] == 12

    # One name launched five times at once: exactly one wins.
    cluster.ok("delete", *[f"burst-{i}" for i in range(6)])
    with ThreadPoolExecutor(5) as pool:
        responses = list(pool.map(launch, ["same"] * 5))
    assert sorted(r.status_code for r in responses) == [202] + [409] * 4
    assert len(cluster.instances()) == 30 - 6 - 6 + 1


def test_streams_to_a_frozen_agent_end_with_an_error_instead_of_hanging(cluster: Cluster) -> None:
    """Issue 10, item 11: a worker that stops answering (SIGSTOP: its TCP still ACKs, nothing
    else) ends the master's Exec and Session streams to it by keepalive, as "unreachable",
    instead of leaving the client waiting on silence. With gRPC's default ping timeout (60 s,
    which overrides keepalive_timeout_ms) the CLI's own read timeout struck first."""
    cluster.start_master()
    worker = cluster.start_worker("node-a")
    cluster.ok("launch", "--name", "vm")
    command = ["sh", "-c", "echo started; sleep 600"]
    exec_ = subprocess.Popen(
        [sys.executable, "-m", "multiverse", "exec", "vm", "--", *command],
        env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip

    async def session() -> list[Any]:
        query = "&".join(f"command={part}" for part in ["sh", "-c", "echo%20started;sleep%20600"])
        url = f"{cluster.ws}/api/v1/instances/vm/shell?tty=false&{query}"
        headers = {"Authorization": f"Bearer {cluster.token}"}
        frames: list[Any] = []
        async with websockets.connect(
            url, additional_headers=headers, ssl=cluster.ssl_context
        ) as ws:
            with contextlib.suppress(websockets.ConnectionClosed):
                async for frame in ws:
                    frames.append(frame)
                    if frame == b"started\n":
                        os.killpg(worker.process.pid, signal.SIGSTOP)  # type: ignore[union-attr]
        return frames

    try:
        assert exec_.stdout is not None
        assert exec_.stdout.readline() == b"started\n"
        frames = asyncio.run(asyncio.wait_for(session(), 120))
        err = exec_.communicate(timeout=120)[1]
    finally:
        exec_.kill()
        os.killpg(worker.process.pid, signal.SIGCONT)  # type: ignore[union-attr]
    assert exec_.returncode != 0
    assert "node node-a is unreachable" in err.decode()
    error = json.loads(frames[-1])
    assert error["type"] == "error" and "node-a is unreachable" in error["message"]


def test_an_admins_node_labels_win_and_survive_rejoins(cluster: Cluster) -> None:
    cluster.start_master()
    cluster.start_worker("node-a", "--labels", "zone=a,disk=ssd")
    refused = cluster.cli("launch", "--name", "in-b", "--selector", "zone=b")
    assert refused.code == 2 and "label zone=b does not match" in refused.err

    done = cluster.ok("node", "label", "node-a", "zone=b", "rack=r1")
    assert "zone=b" in done.out and "rack=r1" in done.out
    node = cluster.node("node-a")
    assert node["node_labels"] == {"zone": "a", "disk": "ssd"}  # what it says stays shown
    assert node["admin_labels"] == {"zone": "b", "rack": "r1"}
    assert node["labels"] == {"zone": "b", "disk": "ssd", "rack": "r1"}
    cluster.ok("launch", "--name", "in-b", "--selector", "zone=b")
    refused = cluster.cli("launch", "--name", "in-a", "--selector", "zone=a")
    assert refused.code == 2 and "label zone=a does not match" in refused.err

    # A re-join brings the node's own labels anew; the admin's are kept apart and still win.
    cluster.workers["node-a"].kill()
    proc = cluster.start_worker("node-a", "--labels", "zone=c", token="", wait=False)
    wait_until(lambda: "joined as" in proc.output(), timeout=60)
    wait_until(lambda: cluster.node("node-a")["node_labels"] == {"zone": "c"})
    assert cluster.node("node-a")["labels"] == {"zone": "b", "rack": "r1"}

    cluster.ok("node", "label", "node-a", "zone-", "rack-")
    node = cluster.node("node-a")
    assert node["admin_labels"] == {} and node["labels"] == {"zone": "c"}

    before = cluster.node("node-a")
    for args, code, words in (
        (["node-a", "bad key!=v"], 1, "invalid label key"),
        (["node-a", "zone"], 1, "key- to remove"),
        (["ghost", "zone=a"], 2, "node 'ghost' does not exist"),
    ):
        result = cluster.cli("node", "label", *args)
        assert result.code == code and words in result.err, result
    headers = {"Authorization": f"Bearer {cluster.token}"}
    response = cluster.http.patch(
        f"{cluster.api}/api/v1/nodes/node-a/labels",
        json={"labels": {"zone": "bad value!"}},
        headers=headers,
    )
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_argument"
    assert cluster.node("node-a")["labels"] == before["labels"]


def test_a_restarted_worker_is_not_ready_until_its_agent_listens(cluster: Cluster) -> None:
    # Reports of the killed process would keep the node Ready for the node timeout: a long one
    # here, so that only the re-join itself can take Ready away.
    cluster.start_master("--node-timeout", "600", "--down-timeout", "1200")
    cluster.start_worker("node-a")
    cluster.workers["node-a"].kill()
    assert cluster.node("node-a")["status"] == "Ready"

    # The new process joins, then cannot listen (the port is taken) and exits: its agent never
    # listened, so the node must not show Ready.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = f"127.0.0.1:{taken.getsockname()[1]}"
        proc = cluster.start_worker("node-a", "--listen", busy, token="", wait=False)
        assert proc.process is not None
        assert proc.process.wait(timeout=60) != 0
    assert "cannot listen" in proc.output()
    assert cluster.node("node-a")["status"] == "Joining"

    cluster.start_worker("node-a", token="")  # waits until it joined, listens and is Ready
