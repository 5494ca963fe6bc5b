"""The cluster network with real VMs (issue 11): VMs on different hosts reach each other by
address and by name over the VXLAN overlay, keep their addresses, and cannot forge another's.

The test makes its own hosts: network namespaces on a veth "underlay" switched by a bridge in
the master's namespace, one QEMU worker per namespace, as separate machines would be. Every
namespace, and with it each bridge, tap, VXLAN and nftables table made in it, is deleted at the
end, and the workers' dnsmasq processes are killed with the cluster, whatever happened.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from harness import (
    UNDERLAY,
    Cluster,
    Hosts,
    new_cluster,
    start_host_worker,
    start_network_master,
    underlay,
    wait_until,
)

pytestmark = pytest.mark.vm

STANDIN = Path(__file__).parent / "standins" / "firecracker"

CIDR = "10.99.0.0/24"
VM = ("--memory", "192M", "--disk", "64M")
BOOT = 300  # seconds: TCG under a loaded machine boots slowly


@dataclass
class Net:
    cluster: Cluster
    hosts: Hosts

    def start_worker(self, name: str, index: int, *extra: str) -> None:
        start_host_worker(self.cluster, self.hosts, name, index, "--network-mode", "bridge", *extra)

    def sh(self, vm: str, script: str, timeout: float = 120) -> str:
        return self.cluster.ok("exec", vm, "--", "sh", "-c", script, timeout=timeout).out

    def instance(self, name: str) -> dict[str, str]:
        return dict(self.cluster.instances()[name])

    def guest_ipv4(self, vm: str) -> str:
        return self.sh(vm, "ip -4 -o addr show eth0 | awk '{print $4}'").strip().split("/")[0]


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory, tiny_image: Path) -> Iterator[Net]:
    root = tmp_path_factory.mktemp("net")
    with underlay(uuid.uuid4().hex[:5]) as hosts, new_cluster(root) as cluster:
        start_network_master(cluster, hosts, "--network", CIDR)
        yield Net(cluster, hosts)


@pytest.fixture(scope="module")
def two(net: Net) -> Net:
    """Two hosts with one VM each."""
    net.start_worker("host-a", 11)
    net.start_worker("host-b", 12)
    net.cluster.ok("launch", "--name", "vm-a", "--node", "host-a", *VM, timeout=BOOT)
    net.cluster.ok("launch", "--name", "vm-b", "--node", "host-b", *VM, timeout=BOOT)
    return net


def test_vms_on_two_hosts_reach_each_other_by_address_and_name(two: Net) -> None:
    a, b = two.instance("vm-a"), two.instance("vm-b")
    assert a["ipv4"] != b["ipv4"]
    # Each row shows what the guest itself has.
    assert two.guest_ipv4("vm-a") == a["ipv4"] == a["address"]
    assert two.guest_ipv4("vm-b") == b["ipv4"] == b["address"]
    for target in (b["ipv4"], "vm-b", "vm-b.multiverse"):
        assert " 0% packet loss" in two.sh("vm-a", f"ping -c 2 -W 5 {target}")
    assert " 0% packet loss" in two.sh("vm-b", "ping -c 2 -W 5 vm-a")


def test_ten_megabytes_cross_intact(two: Net) -> None:
    sent = two.sh(
        "vm-a", "dd if=/dev/urandom of=/tmp/blob bs=1024 count=10240 2>/dev/null; md5sum /tmp/blob"
    ).split()[0]
    # busybox nc ends a connection at EOF on its own stdin: the receiver runs as nc's -e
    # program, reading the socket to its end, in the background of the exec.
    two.sh(
        "vm-b",
        "rm -f /tmp/got; nc -l -p 5001 -e sh -c 'md5sum > /tmp/got.part && mv /tmp/got.part "
        "/tmp/got' </dev/null >/dev/null 2>&1 &",
    )
    wait_until(lambda: ":1389 " in two.sh("vm-b", "cat /proc/net/tcp*"), timeout=30)  # 5001
    two.sh("vm-a", "nc vm-b 5001 < /tmp/blob", timeout=300)
    received = wait_until(
        lambda: two.cluster.cli("exec", "vm-b", "--", "cat", "/tmp/got").out, timeout=120
    )
    assert received.split()[0] == sent


def test_a_vm_forging_a_source_address_gets_nothing_through(two: Net) -> None:
    b = two.instance("vm-b")["ipv4"]
    forged = "10.99.0.200"
    two.sh("vm-a", f"ip addr add {forged}/24 dev eth0")
    try:
        forged_out = two.cluster.cli(
            "exec", "vm-a", "--", "ping", "-c", "3", "-W", "2", "-I", forged, b
        )
        assert forged_out.code != 0 and "100% packet loss" in forged_out.out
        # The same ping from its own address passes: the rule, not the route, dropped it.
        assert " 0% packet loss" in two.sh("vm-a", f"ping -c 2 -W 5 {b}")
    finally:
        two.sh("vm-a", f"ip addr del {forged}/24 dev eth0")


def test_a_third_host_joins_and_reaches_the_others(two: Net) -> None:
    two.start_worker("host-c", 13)
    two.cluster.ok("launch", "--name", "vm-c", "--node", "host-c", *VM, timeout=BOOT)
    try:
        for target in ("vm-a", "vm-b"):
            assert " 0% packet loss" in two.sh("vm-c", f"ping -c 2 -W 5 {target}")
        # ...and the first two reach it: their nodes learned the new peer within a sync.
        assert " 0% packet loss" in two.sh("vm-a", "ping -c 2 -W 5 vm-c")
        network = two.cluster.ok("network", "--format", "json").json()[0]
        assert {n["name"]: n["vtep"] for n in network["nodes"]} == {
            "host-a": f"{UNDERLAY}.11", "host-b": f"{UNDERLAY}.12", "host-c": f"{UNDERLAY}.13",
        }  # fmt: skip
        freed = two.instance("vm-c")["address"]
    finally:
        two.cluster.ok("delete", "vm-c", timeout=BOOT)
    # Deleted frees its address: asking for it by --ip now works; a taken one is refused.
    taken = two.cluster.cli("launch", "--name", "vm-x", "--ip", two.instance("vm-a")["address"])
    assert taken.code != 0 and "taken" in taken.err
    two.cluster.ok(
        "launch", "--name", "vm-d", "--node", "host-c", "--ip", freed, "--publish", "8080:80",
        *VM, timeout=BOOT,
    )  # fmt: skip
    try:
        assert two.instance("vm-d")["ipv4"] == freed
        # A node port goes to one VM only.
        clash = two.cluster.cli("launch", "--name", "vm-y", "--node", "host-c", "-p", "8080:81")
        assert clash.code != 0 and "published by vm-d" in clash.err
        info = two.cluster.ok("info", "vm-d", "--format", "json").json()[0]
        assert info["publish"] == ["8080:80/tcp"]
        # From another host (the master's), the node's port 8080 reaches the guest's port 80.
        two.sh("vm-d", "nc -l -p 80 -e echo published </dev/null >/dev/null 2>&1 &")
        wait_until(lambda: ":0050 " in two.sh("vm-d", "cat /proc/net/tcp*"), timeout=30)
        assert _fetch(two.hosts.master_ns, f"{UNDERLAY}.13", 8080) == "published\n"
    finally:
        two.cluster.ok("delete", "vm-d", timeout=BOOT)


def test_a_node_that_leaves_is_dropped_from_every_forwarding_table(two: Net) -> None:
    def flood_to(host: str) -> set[str]:
        table = subprocess.run(
            ["ip", "netns", "exec", two.hosts.workers[host], "bridge", "fdb", "show", "dev",
             "mvvx0"],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        return {line.split("dst ")[1].split()[0] for line in table.splitlines() if "dst " in line}

    gone = f"{UNDERLAY}.13"
    assert gone in flood_to("host-a") and gone in flood_to("host-b")
    two.cluster.workers["host-c"].kill()
    two.cluster.ok("node", "remove", "host-c")
    wait_until(lambda: gone not in flood_to("host-a") | flood_to("host-b"), timeout=10)
    assert flood_to("host-a") >= {f"{UNDERLAY}.12"}  # the others stay


def test_vms_reach_outside_the_cluster_network_through_their_node(two: Net) -> None:
    # The master's host is no VM and has no route to the cluster network: only the node's
    # masquerade brings the answers back.
    assert " 0% packet loss" in two.sh("vm-a", f"ping -c 2 -W 5 {UNDERLAY}.1")


def _fetch(namespace: str, host: str, port: int) -> str:
    """What a TCP server at host:port says, asked from inside ``namespace``."""
    script = (
        "import socket,sys\n"
        f"s = socket.create_connection(({host!r}, {port}), timeout=20)\n"
        "sys.stdout.write(s.makefile().read())\n"
    )
    done = subprocess.run(
        ["ip", "netns", "exec", namespace, sys.executable, "-c", script],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return done.stdout


def test_addresses_survive_stop_start_and_a_master_restart(two: Net) -> None:
    before = {name: two.instance(name)["address"] for name in ("vm-a", "vm-b")}
    two.cluster.ok("stop", "vm-a", timeout=BOOT)
    assert two.instance("vm-a")["address"] == before["vm-a"]
    two.cluster.ok("start", "vm-a", timeout=BOOT)
    assert two.instance("vm-a")["ipv4"] == before["vm-a"]
    assert two.cluster.master is not None
    two.cluster.master.kill()
    start_network_master(two.cluster, two.hosts)
    wait_until(lambda: two.instance("vm-b")["state"] == "Running", timeout=60)
    assert {name: two.instance(name)["address"] for name in ("vm-a", "vm-b")} == before
    assert " 0% packet loss" in two.sh("vm-b", "ping -c 2 -W 5 vm-a")


def test_a_worker_without_cap_net_admin_runs_vms_in_user_mode(two: Net) -> None:
    start_host_worker(
        two.cluster, two.hosts, "host-u", 14, "--network-mode", "auto",
        wrap=["setpriv", "--inh-caps=-net_admin", "--bounding-set=-net_admin"],
    )  # fmt: skip
    assert two.cluster.node("host-u")["network_mode"] == "user"
    row = next(
        line for line in two.cluster.ok("nodes").out.splitlines() if line.startswith("host-u")
    )
    assert " user " in row
    two.cluster.ok("launch", "--name", "vm-u", "--node", "host-u", *VM, timeout=BOOT)
    try:
        # What the VM has, and no cluster address it does not have (none is leased for it).
        assert two.instance("vm-u")["ipv4"] == "10.0.2.15"
        assert two.instance("vm-u")["address"] == ""
        assert two.sh("vm-u", "echo hi") == "hi\n"
    finally:
        two.cluster.ok("delete", "vm-u", timeout=BOOT)


def test_a_firecracker_worker_plugs_its_vms_into_the_same_network(two: Net) -> None:
    """One network service for both drivers: the Firecracker driver gets the node's tap, MAC
    and address (its stand-in boots the guest with QEMU on that tap, with that MAC)."""
    two.cluster.env["MULTIVERSE_FIRECRACKER"] = str(STANDIN)
    start_host_worker(
        two.cluster, two.hosts, "host-f", 15, "--network-mode", "bridge", driver="firecracker"
    )
    two.cluster.ok("launch", "--name", "vm-f", "--node", "host-f", *VM, timeout=BOOT)
    try:
        assert two.guest_ipv4("vm-f") == two.instance("vm-f")["address"]
        assert " 0% packet loss" in two.sh("vm-f", "ping -c 2 -W 5 vm-a")
        assert " 0% packet loss" in two.sh("vm-b", "ping -c 2 -W 5 vm-f")
    finally:
        two.cluster.ok("delete", "vm-f", timeout=BOOT)
