"""A worker cut off from its master by the network, then reconnected (issue 6).

Two test hosts the test makes itself: network namespaces joined by a veth pair, the master in
one, a QEMU worker in the other. Taking the worker's link down is a partition: no RST, no
goodbye, just silence.
"""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from harness import (
    DOWN_TIMEOUT,
    NODE_TIMEOUT,
    Cluster,
    new_cluster,
    qemu_processes_under,
    wait_until,
)

pytestmark = pytest.mark.vm


@dataclass
class Hosts:
    master_ns: str
    worker_ns: str
    master_ip: str
    worker_ip: str
    worker_link: str

    def link(self, up: bool) -> None:
        state = "up" if up else "down"
        _ip(self.worker_ns, "link", "set", self.worker_link, state)


def _ip(namespace: str, *args: str) -> None:
    subprocess.run(["ip", "netns", "exec", namespace, "ip", *args], check=True)


@pytest.fixture
def hosts() -> Iterator[Hosts]:
    tag = uuid.uuid4().hex[:6]
    names = Hosts(f"mvtest-m-{tag}", f"mvtest-w-{tag}", "10.231.77.1", "10.231.77.2", f"mvw{tag}")
    made: list[str] = []
    try:
        for namespace in (names.master_ns, names.worker_ns):
            subprocess.run(["ip", "netns", "add", namespace], check=True)
            made.append(namespace)
            _ip(namespace, "link", "set", "lo", "up")
        subprocess.run(
            ["ip", "link", "add", f"mvm{tag}", "netns", names.master_ns, "type", "veth",
             "peer", "name", names.worker_link, "netns", names.worker_ns],
            check=True,
        )  # fmt: skip
        _ip(names.master_ns, "addr", "add", f"{names.master_ip}/30", "dev", f"mvm{tag}")
        _ip(names.master_ns, "link", "set", f"mvm{tag}", "up")
        _ip(names.worker_ns, "addr", "add", f"{names.worker_ip}/30", "dev", names.worker_link)
        _ip(names.worker_ns, "link", "set", names.worker_link, "up")
        yield names
    finally:
        for namespace in made:  # deleting a namespace deletes its end of the veth, and so both
            subprocess.run(["ip", "netns", "del", namespace], check=False)


@pytest.fixture
def split(hosts: Hosts, tmp_path: Path, tiny_image: Path) -> Iterator[Cluster]:
    with new_cluster(tmp_path) as cluster:
        cluster.prefix = ["ip", "netns", "exec", hosts.master_ns]
        cluster.start_master(
            "--listen", f"0.0.0.0:{cluster.grpc_port}",
            "--api-listen", f"0.0.0.0:{cluster.api_port}",
            "--advertise", hosts.master_ip,
        )  # fmt: skip
        cluster.start_worker(
            "far", driver="qemu", capacity="cpus=2,memory=2G,disk=10G", host=hosts.worker_ip,
            master_host=hosts.master_ip, prefix=["ip", "netns", "exec", hosts.worker_ns],
        )  # fmt: skip
        yield cluster


def test_partitioned_worker_goes_not_ready_then_down_and_comes_back(
    split: Cluster, hosts: Hosts
) -> None:
    split.ok("launch", "--name", "island", "--memory", "256M", "--disk", "1G")
    (qemu,) = qemu_processes_under(split.root / "far")
    assert split.instances()["island"]["state"] == "Running"

    hosts.link(up=False)
    cut = time.monotonic()
    wait_until(lambda: split.node("far")["status"] == "NotReady", timeout=NODE_TIMEOUT + 5)
    not_ready_after = time.monotonic() - cut
    wait_until(lambda: split.node("far")["status"] == "Down", timeout=DOWN_TIMEOUT + 5)
    down_after = time.monotonic() - cut
    assert NODE_TIMEOUT - 1 < not_ready_after < down_after
    assert split.instances()["island"]["state"] == "Unknown"  # not deleted, not guessed
    assert psutil.pid_exists(qemu.pid)  # the VM itself never noticed

    hosts.link(up=True)
    wait_until(lambda: split.node("far")["status"] == "Ready", timeout=60)
    wait_until(lambda: split.instances()["island"]["state"] == "Running", timeout=30)
    info = split.ok("info", "island", "--format", "json").json()[0]
    assert info["restarts"] == 0
    assert [p.pid for p in qemu_processes_under(split.root / "far")] == [qemu.pid]
    assert split.ok("exec", "island", "--", "echo", "reunited").out == "reunited\n"
    split.ok("delete", "island")
