"""One end-to-end suite, run once per hypervisor driver: launch, list, info, exec, shell, stop,
start, delete through the whole stack (CLI -> API -> master -> agent -> driver).

- fake: no VM; its shell is a local /bin/sh.
- qemu: real VMs (TCG here).
- multipass: against tests/standins/multipass (no Multipass can be installed here).
- firecracker: against tests/standins/firecracker, which serves Firecracker's API and boots the
  guest with QEMU on the tap the node's network service made (its worker runs in bridge
  mode); the whole cluster runs in a network namespace the test creates, so the bridge
  and guest addresses exist nowhere else.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pexpect
import pytest
from harness import REPO, Cluster, new_cluster

STANDINS = REPO / "tests" / "standins"
DRIVERS = ["fake", "qemu", "multipass", "firecracker"]


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"mvtest-e2e-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.fixture(params=DRIVERS)
def driven(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cluster]:
    driver: str = request.param
    if driver in ("qemu", "firecracker"):
        request.getfixturevalue("tiny_image")
    with new_cluster(tmp_path) as cluster:
        cluster.env["MULTIVERSE_MULTIPASS"] = str(STANDINS / "multipass")
        cluster.env["MULTIPASS_STANDIN_STATE"] = str(tmp_path / "multipass-state.json")
        cluster.env["MULTIVERSE_FIRECRACKER"] = str(STANDINS / "firecracker")
        if driver == "firecracker":
            cluster.prefix = ["ip", "netns", "exec", request.getfixturevalue("netns")]
            # Firecracker has no user mode: its node builds the cluster network, in the netns.
            cluster.env["MULTIVERSE_NETWORK_MODE"] = "bridge"
        cluster.start_master()
        cluster.start_worker("node-a", driver=driver, capacity="cpus=2,memory=4G,disk=20G")
        yield cluster


def test_every_command_on_every_driver(driven: Cluster) -> None:
    cluster = driven
    assert cluster.node("node-a")["status"] == "Ready"
    launched = cluster.ok("launch", "--name", "vm-e2e", "--memory", "256M", "--disk", "1G")
    assert "vm-e2e" in launched.out
    instance = cluster.instances()["vm-e2e"]
    assert instance["state"] == "Running" and instance["ipv4"]

    info = cluster.ok("info", "vm-e2e", "--format", "json").json()[0]
    assert info["memory_usage"]["total"] > 0 and len(info["load"]) == 3

    result = cluster.cli("exec", "vm-e2e", "--", "sh", "-c", "echo out; echo err >&2; exit 7")
    assert (result.code, result.out, result.err) == (7, "out\n", "err\n")

    shell = pexpect.spawn(
        cluster.prefix[0] if cluster.prefix else sys.executable,
        [*cluster.prefix[1:], *([sys.executable] if cluster.prefix else []),
         "-m", "multiverse", "shell", "vm-e2e"],
        env=cluster.env, dimensions=(29, 91), timeout=30,
    )  # fmt: skip
    shell.sendline("stty size")
    shell.expect(r"29 91\r\n")
    shell.sendline("exit 3")
    shell.expect(pexpect.EOF)
    shell.close()
    assert shell.exitstatus == 3

    cluster.ok("stop", "vm-e2e")
    assert cluster.instances()["vm-e2e"]["state"] == "Stopped"
    cluster.ok("start", "vm-e2e")
    assert cluster.instances()["vm-e2e"]["state"] == "Running"
    cluster.ok("delete", "vm-e2e")
    assert cluster.instances() == {}
