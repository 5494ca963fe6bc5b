"""Convergence whatever crashed in between: the reconciler, host health, node maintenance,
operations and events, with real master and worker processes (fake driver where the VM itself
does not matter; tests/test_vms.py has the QEMU ones)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
import websockets
from harness import DOWN_TIMEOUT, Cluster, wait_until

from multiverse.core.model import (
    DesiredState,
    Instance,
    InstanceSpec,
    InstanceState,
    Node,
    NodeStatus,
    Resources,
)
from multiverse.drivers.fake import FAIL_START
from multiverse.master.reconciler import Action, next_action


def _instance(state: InstanceState, desired: DesiredState) -> Instance:
    return Instance("i", InstanceSpec(name="a"), "n", desired, state)


def _node(status: NodeStatus = NodeStatus.READY) -> Node:
    return Node("n", "n", "127.0.0.1:1", "fake", status, {}, Resources(1, 1, 1))


@pytest.mark.parametrize(
    ("state", "desired", "action"),
    [
        (InstanceState.SCHEDULED, DesiredState.RUNNING, Action.LAUNCH),
        (InstanceState.STOPPED, DesiredState.RUNNING, Action.START),
        (InstanceState.FAILED, DesiredState.RUNNING, Action.LAUNCH),
        (InstanceState.RUNNING, DesiredState.STOPPED, Action.STOP),
        (InstanceState.RUNNING, DesiredState.DELETED, Action.DELETE),
        (InstanceState.STOPPED, DesiredState.DELETED, Action.DELETE),
        (InstanceState.RUNNING, DesiredState.RUNNING, None),
        (InstanceState.STOPPED, DesiredState.STOPPED, None),
        (InstanceState.STARTING, DesiredState.STOPPED, None),  # wait for the node to finish
        (InstanceState.DELETING, DesiredState.DELETED, None),
        (InstanceState.UNKNOWN, DesiredState.RUNNING, None),
        (InstanceState.FAILED, DesiredState.STOPPED, None),
    ],
)
def test_next_action(state: InstanceState, desired: DesiredState, action: Action | None) -> None:
    assert next_action(_instance(state, desired), _node()) == action


def test_nothing_is_done_on_an_unreachable_node() -> None:
    for status in (NodeStatus.NOT_READY, NodeStatus.DOWN, NodeStatus.UNKNOWN):
        stopped = _instance(InstanceState.STOPPED, DesiredState.RUNNING)
        assert next_action(stopped, _node(status)) is None
    assert next_action(_instance(InstanceState.STOPPED, DesiredState.RUNNING), None) is None


class Events:
    """Collects the master's event stream in a thread, from the moment it is made."""

    def __init__(self, cluster: Cluster) -> None:
        self.items: list[dict[str, Any]] = []
        self._ready = threading.Event()
        url = f"{cluster.ws}/api/v1/events"
        headers = {"Authorization": f"Bearer {cluster.token}"}

        async def listen() -> None:
            async with websockets.connect(
                url, additional_headers=headers, ssl=cluster.ssl_context
            ) as ws:
                self._ready.set()
                with contextlib.suppress(websockets.ConnectionClosed):  # the master went away
                    async for message in ws:
                        self.items.append(json.loads(message))

        threading.Thread(target=asyncio.run, args=(listen(),), daemon=True).start()
        assert self._ready.wait(10)

    def states(self, name: str) -> list[str]:
        return [e["state"] for e in self.items if e["type"] == "instance" and e["name"] == name]

    def nodes(self, name: str) -> list[str]:
        return [e["status"] for e in self.items if e["type"] == "node" and e["name"] == name]


def _api(cluster: Cluster) -> tuple[str, dict[str, str]]:
    return f"{cluster.api}/api/v1", {"Authorization": f"Bearer {cluster.token}"}


def test_master_killed_during_launches_converges_without_duplicates(cluster: Cluster) -> None:
    cluster.start_master()
    cluster.start_worker("node-a", "--fake-delay", "1.5")
    api, headers = _api(cluster)

    answered: list[int] = []

    def launch(i: int) -> int:
        body = {"name": f"inflight-{i}", "memory": "256M", "disk": "1G"}
        time.sleep(0.05 * i)  # spread out, so that the kill lands among them
        try:
            response = cluster.http.post(f"{api}/instances", json=body, headers=headers, timeout=30)
        except httpx.HTTPError:
            return 0  # the master died under this one
        answered.append(i)
        return response.status_code

    with ThreadPoolExecutor(10) as pool:
        futures = [pool.submit(launch, i) for i in range(10)]
        wait_until(lambda: len(answered) >= 3, timeout=30, interval=0.01)
        assert cluster.master is not None
        cluster.master.kill()  # kill -9 in the middle
        codes = [future.result() for future in futures]
    accepted = {f"inflight-{i}" for i, code in enumerate(codes) if code == 202}
    assert 3 <= len(accepted) < 10, codes
    cluster.start_master()

    def settled() -> bool:
        instances = cluster.instances()
        return all(i["state"] in ("Running", "Failed") for i in instances.values())

    wait_until(settled, timeout=60)
    instances = cluster.instances()
    assert accepted <= set(instances)  # every launch that was answered is there
    assert all(i["state"] == "Running" for i in instances.values()), instances
    # The worker holds exactly one VM per instance the master knows: none lost, none twice.
    vms = json.loads((cluster.root / "node-a" / "fake" / "vms.json").read_text())
    assert sorted(vms) == sorted(i["id"] for i in instances.values())


def test_stop_during_launch_and_delete_on_a_down_node(cluster: Cluster) -> None:
    cluster.start_master()
    cluster.start_worker("node-a", "--fake-delay", "2")
    events = Events(cluster)
    cluster.ok("launch", "--name", "hasty", "--no-wait")
    cluster.ok("stop", "hasty")  # while it is still Creating/Starting
    instance = cluster.instances()["hasty"]
    assert (instance["state"], instance["desired"]) == ("Stopped", "stopped")
    assert "Running" in events.states("hasty")  # it booted, then the reconciler stopped it

    cluster.workers["node-a"].kill()
    wait_until(lambda: cluster.node("node-a")["status"] == "Down", timeout=DOWN_TIMEOUT + 5)
    assert events.nodes("node-a")[-2:] == ["NotReady", "Down"]
    assert cluster.instances()["hasty"]["state"] == "Unknown"

    cluster.ok("delete", "hasty", "--no-wait")
    instance = cluster.instances()["hasty"]
    assert instance["desired"] == "deleted"  # kept, marked, until its node can confirm
    cluster.start_worker("node-a", "--fake-delay", "2", token="")
    wait_until(lambda: "hasty" not in cluster.instances(), timeout=30)
    vms = json.loads((cluster.root / "node-a" / "fake" / "vms.json").read_text())
    assert vms == {}


def test_a_boot_failing_on_its_node_is_retried_more_and_more_slowly_then_given_up(
    cluster: Cluster,
) -> None:
    """The agent takes a start at once and boots in the background; a boot that fails there
    leaves the instance Failed, which the reconciler launches again (the agent tries the
    whole of it once more), with the backoff of a refused call and its limit."""
    cluster.start_master()
    cluster.start_worker("node-a")
    events = Events(cluster)
    cluster.ok("launch", "--name", "flaky")
    flag = cluster.root / "node-a" / "fake" / "vms" / cluster.instances()["flaky"]["id"]
    flag /= FAIL_START

    def launches() -> int:
        return events.states("flaky").count("Creating")

    def failed_attempts() -> int:
        assert cluster.master is not None
        return cluster.master.output().count("reconcile: launch flaky failed (attempt ")

    # A boot failing twice, then coming up: Running again, by itself.
    cluster.ok("stop", "flaky")
    flag.touch()
    before = launches()
    cluster.ok("start", "flaky", "--no-wait")
    wait_until(lambda: launches() >= before + 2, timeout=30)
    flag.unlink()
    wait_until(lambda: cluster.instances()["flaky"]["state"] == "Running", timeout=30)

    # A boot failing every time: four launches more (1 + 2 + 4 + 8 s apart), then left Failed.
    cluster.ok("stop", "flaky")
    flag.touch()
    before, counted = launches(), failed_attempts()
    cluster.ok("start", "flaky", "--no-wait")
    wait_until(lambda: failed_attempts() == counted + 5, timeout=60)
    time.sleep(3)  # what a retry would take, were one still to come
    assert launches() == before + 4
    assert failed_attempts() == counted + 5
    assert cluster.instances()["flaky"]["state"] == "Failed"
    flag.unlink()
    cluster.ok("start", "flaky")  # a user's start tries again, whatever the backoff says
    assert cluster.instances()["flaky"]["state"] == "Running"


def test_drain_evacuate_restore(cluster: Cluster) -> None:
    cluster.start_master()
    cluster.start_worker("node-a")
    cluster.start_worker("node-b")
    for i in range(3):
        cluster.ok("launch", "--name", f"app-{i}", "--node", "node-a")
    cluster.ok("launch", "--name", "other", "--node", "node-b")

    drained = cluster.ok("node", "drain", "node-a", "--format", "json").json()
    assert sorted(o["name"] for o in drained) == ["app-0", "app-1", "app-2"]
    assert all(o["outcome"] == "stopped" for o in drained)
    instances = cluster.instances()
    assert all(instances[f"app-{i}"]["state"] == "Stopped" for i in range(3))
    assert cluster.node("node-a")["cordoned"]
    cluster.ok("launch", "--name", "newcomer")
    assert cluster.instances()["newcomer"]["node"] == "node-b"  # cordoned: not placed there

    restored = cluster.ok("node", "restore", "node-a", "--format", "json").json()
    assert all(o["outcome"] == "started again" for o in restored)
    wait_until(lambda: all(
        cluster.instances()[f"app-{i}"]["state"] == "Running" for i in range(3)
    ))  # fmt: skip
    assert not cluster.node("node-a")["cordoned"]

    evacuated = cluster.ok("node", "evacuate", "node-a", "--format", "json").json()
    assert all(o["outcome"].startswith("moved to node-b") for o in evacuated), evacuated
    wait_until(lambda: all(
        cluster.instances()[f"app-{i}"]["state"] == "Running" for i in range(3)
    ))  # fmt: skip
    instances = cluster.instances()
    assert {instances[f"app-{i}"]["node"] for i in range(3)} == {"node-b"}
    assert cluster.node("node-a")["instances"] == 0

    back = cluster.ok("node", "restore", "node-a", "--format", "json").json()
    assert all(o["outcome"].startswith("moved to node-a") for o in back), back
    wait_until(lambda: all(
        cluster.instances()[f"app-{i}"]["state"] == "Running" for i in range(3)
    ))  # fmt: skip
    instances = cluster.instances()
    assert {instances[f"app-{i}"]["node"] for i in range(3)} == {"node-a"}
    vms_b = json.loads((cluster.root / "node-b" / "fake" / "vms.json").read_text())
    assert len(vms_b) == 2  # "other" and "newcomer": the evacuees' copies are gone

    bad = cluster.cli("node", "drain", "nowhere")
    assert bad.code == 2 and "does not exist" in bad.err


def test_events_operations_and_metrics(cluster: Cluster) -> None:
    cluster.start_master()
    cluster.start_worker("node-a", "--fake-delay", "0.5")  # slow enough to see each state
    events = Events(cluster)
    api, headers = _api(cluster)
    launched = cluster.http.post(
        f"{api}/instances", json={"name": "watched"}, headers=headers
    ).json()
    operation = cluster.http.get(
        f"{api}/operations/{launched['operation']}/wait", params={"timeout": 20}, headers=headers
    ).json()
    assert (operation["status"], operation["kind"], operation["target"]) == (
        "success", "launch", "watched",
    )  # fmt: skip
    cluster.ok("stop", "watched")
    cluster.ok("delete", "watched")
    wait_until(lambda: "Deleted" in events.states("watched"))
    states = events.states("watched")
    assert states[0] == "Scheduled" and states[-1] == "Deleted"
    for expected in ("Creating", "Running", "Stopping", "Stopped", "Deleting"):
        assert expected in states
    assert states.index("Running") < states.index("Stopped") < states.index("Deleting")
    assert any(e["type"] == "operation" and e["status"] == "success" for e in events.items)

    missing = cluster.http.get(f"{api}/operations/nope", headers=headers)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    text = cluster.http.get(f"{cluster.api}/metrics", headers=headers).text
    assert 'multiverse_nodes{status="Ready"} 1.0' in text
    assert "multiverse_api_request_seconds_bucket" in text
    # By route template and status, as answered (the launch was accepted, the lookup not found).
    launched = 'method="POST",route="/api/v1/instances",status="202"'
    assert f"multiverse_api_request_seconds_count{{{launched}}} 1.0" in text
    assert 'route="/api/v1/operations/{operation_id}",status="404"' in text
    assert "multiverse_reconcile_queue_depth" in text
    assert 'multiverse_node_sync_lag_seconds{node="node-a"}' in text
    assert cluster.http.get(f"{cluster.api}/metrics").status_code == 401
