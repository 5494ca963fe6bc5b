"""Network benchmark: VM-to-VM TCP throughput and round trip on the cluster network, against
the same VMs wired by hand with the same tap, bridge and VXLAN setup.

Two test hosts (network namespaces on a veth underlay, as in tests/test_network.py) each run a
qemu worker in bridge mode; three VMs: two on the first host (same node), one on the second
(across nodes, over VXLAN). Measured from the first VM, in the guest:

- **round trip**: ``ping -c N`` to the other VM, the average busybox reports;
- **throughput**: ``--megabytes`` of a file in the guest's RAM sent with busybox ``nc`` to a
  receiver that discards it, timed with ``time`` in the guest.

**By hand**, in the same run: two more namespaces on the same underlay, where a bridge, a
VXLAN interface with its head-end replication entry and a tap per VM are made with ``ip`` and
``bridge`` (no nftables: no anti-spoofing, no NAT), and the same three VMs are booted with
the command line ``QemuDriver`` builds (so the two cannot drift) on those taps. The ratios
stack / by hand are printed (throughput: higher is better; round trip: lower is better).

Both setups run at once (six small VMs) and the runs alternate between them, so that a change
in the host's load hits both alike; every VM, process and namespace is cleaned up at the end,
also on Ctrl-C or failure.

    .venv/bin/python bench/network.py [--runs 3] [--megabytes 16] [--pings 10] [--format json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from common import run_benchmark  # noqa: E402
from harness import (  # noqa: E402  (tests/ is put on the path just above)
    IMAGE_CACHE,
    Hosts,
    kill_qemus_under,
    netns_ip,
    new_cluster,
    start_host_worker,
    start_network_master,
    underlay,
    wait_until,
)

from multiverse.core.network import VXLAN_OVERHEAD, Nic  # noqa: E402
from multiverse.core.sizes import MiB  # noqa: E402
from multiverse.drivers.base import NetworkAttachment, VMConfig  # noqa: E402
from multiverse.drivers.qemu import QemuDriver  # noqa: E402
from multiverse.guest.image import TEST_IMAGE, build_test_image  # noqa: E402

MEMORY = "256M"
BOOT_TIMEOUT = 300.0
HAND_CIDR = "10.98.0.0/24"
HAND_MTU = 1500 - VXLAN_OVERHEAD  # what the stack computes from the veth underlay

# Runs a script in a VM, returns its stdout.
Shell = Callable[[str, str], str]


def say(message: str) -> None:
    print(f"[network] {message}", file=sys.stderr, flush=True)


# --- measuring inside the guests (the same for both setups) -----------------------------------


def round_trip_ms(shell: Shell, source: str, target: str, pings: int) -> float:
    out = shell(source, f"ping -c {pings} -q {target}")
    found = re.search(r"min/avg/max = [\d.]+/([\d.]+)/", out)
    if not found:
        raise RuntimeError(f"no round trip in ping's output: {out!r}")
    return float(found.group(1))


def throughput_mbps(shell: Shell, source: str, target: str, target_ip: str, mb: int) -> float:
    """MB/s of ``mb`` MB from a file in the source's RAM to a receiver that drops it."""
    shell(source, f"[ -s /tmp/blob ] || dd if=/dev/urandom of=/tmp/blob bs=1M count={mb} 2>&-")
    shell(target, "nc -l -p 5001 -e sh -c 'cat > /dev/null' </dev/null >/dev/null 2>&1 &")
    wait_until(lambda: ":1389 " in shell(target, "cat /proc/net/tcp*"), timeout=30)  # 5001
    out = shell(source, f"time nc {target_ip} 5001 < /tmp/blob 2>&1; true")
    found = re.search(r"real\s+(\d+)m\s*([\d.]+)s", out)
    if not found:
        raise RuntimeError(f"no time in the sender's output: {out!r}")
    seconds = int(found.group(1)) * 60 + float(found.group(2))
    return mb / max(seconds, 0.01)


@dataclass
class Figures:
    rtt_same: list[float] = field(default_factory=list)
    rtt_cross: list[float] = field(default_factory=list)
    tput_same: list[float] = field(default_factory=list)
    tput_cross: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        return {
            "rtt_same_node_ms": round(statistics.median(self.rtt_same), 3),
            "rtt_cross_node_ms": round(statistics.median(self.rtt_cross), 3),
            "throughput_same_node_MBps": round(statistics.median(self.tput_same), 2),
            "throughput_cross_node_MBps": round(statistics.median(self.tput_cross), 2),
        }


@dataclass
class Setup:
    """Three running VMs (two on one host, one on another) and a way to run scripts in them."""

    shell: Shell
    vms: list[str]
    ips: list[str]
    figures: Figures = field(default_factory=Figures)

    def measure(self, args: argparse.Namespace) -> None:
        shell, vms, ips, figures = self.shell, self.vms, self.ips, self.figures
        figures.rtt_same.append(round_trip_ms(shell, vms[0], ips[1], args.pings))
        figures.rtt_cross.append(round_trip_ms(shell, vms[0], ips[2], args.pings))
        figures.tput_same.append(throughput_mbps(shell, vms[0], vms[1], ips[1], args.megabytes))
        figures.tput_cross.append(throughput_mbps(shell, vms[0], vms[2], ips[2], args.megabytes))


# --- the stack --------------------------------------------------------------------------------


@contextlib.contextmanager
def through_stack(root: Path, hosts: Hosts) -> Iterator[Setup]:
    (root / "stack").mkdir()
    with new_cluster(root / "stack") as cluster:
        # The default timings (the tests' are much shorter), as a user runs it.
        start_network_master(cluster, hosts, "--node-timeout", "20", "--down-timeout", "120")
        for name, index in (("host-a", 11), ("host-b", 12)):
            start_host_worker(
                cluster, hosts, name, index, "--network-mode", "bridge", "--sync-interval", "5"
            )
        vms = ["vm-1", "vm-2", "vm-3"]
        for vm, node in zip(vms, ("host-a", "host-a", "host-b"), strict=True):
            say(f"stack: launching {vm} on {node}")
            cluster.ok(
                "launch", "--name", vm, "--node", node, "--memory", MEMORY, "--disk", "64M",
                timeout=BOOT_TIMEOUT,
            )  # fmt: skip
        ips = [cluster.instances()[vm]["ipv4"] for vm in vms]

        def shell(vm: str, script: str) -> str:
            return str(cluster.ok("exec", vm, "--", "sh", "-c", script, timeout=300).out)

        yield Setup(shell, vms, ips)


# --- by hand ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class HandVM:
    name: str
    namespace: str
    tap: str
    ip: str
    gateway: str

    def config(self) -> VMConfig:
        vm_id = str(uuid.uuid5(uuid.NAMESPACE_DNS, self.name))
        nic = Nic(address=f"{self.ip}/24", mac=_mac(self.name), gateway=self.gateway, dns="")
        return VMConfig(
            id=vm_id, name=self.name, cpus=1, memory=int(MEMORY[:-1]) * MiB, disk=64 * MiB,
            image=TEST_IMAGE, network=NetworkAttachment(tap=self.tap, nic=nic, mtu=HAND_MTU),
        )  # fmt: skip


def _mac(name: str) -> str:
    from multiverse.core.network import mac_for

    return mac_for("hand-" + name)


def wire_host(namespace: str, local: str, peer: str, gateway: str, taps: list[str]) -> None:
    """What a person would type: a bridge, a VXLAN port with one flood entry, taps."""
    commands = [
        ["link", "add", "br0", "type", "bridge"],
        ["addr", "add", f"{gateway}/24", "dev", "br0"],
        ["link", "set", "br0", "mtu", str(HAND_MTU), "up"],
        ["link", "add", "vx0", "type", "vxlan", "id", "98", "local", local, "dev",
         f"ul{local.rsplit('.', 1)[1]}", "dstport", "4789"],
        ["link", "set", "vx0", "master", "br0", "mtu", str(HAND_MTU), "up"],
    ]  # fmt: skip
    for tap in taps:
        commands += [
            ["tuntap", "add", "dev", tap, "mode", "tap"],
            ["link", "set", tap, "master", "br0", "mtu", str(HAND_MTU), "up"],
        ]
    for command in commands:
        netns_ip(namespace, *command)
    subprocess.run(
        ["ip", "netns", "exec", namespace, "bridge", "fdb", "append", "00:00:00:00:00:00",
         "dev", "vx0", "dst", peer],
        check=True,
    )  # fmt: skip


def hand_call(vm: HandVM, state_dir: Path, script: str) -> str:
    """Boot (or adopt) the hand-wired VM with the QEMU driver in its namespace, run ``script``."""
    request = {"state_dir": str(state_dir), "vm": vm.__dict__, "script": script}
    done = subprocess.run(
        ["ip", "netns", "exec", vm.namespace, sys.executable, __file__, "--hand-call",
         json.dumps(request)],
        capture_output=True, text=True, timeout=BOOT_TIMEOUT + 60,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"by hand in {vm.name}: {done.stderr.strip()[-2000:]}")
    return done.stdout


def _hand_call_main(request: dict[str, Any]) -> int:
    vm = HandVM(**request["vm"])
    driver = QemuDriver(Path(request["state_dir"]), [IMAGE_CACHE])

    async def call() -> str:
        config = vm.config()
        await driver.start(config)
        out = b""
        async for chunk in driver.exec(config, ["sh", "-c", request["script"]]):
            out += chunk.data if chunk.stream == 1 else b""
        await driver.close()
        return out.decode(errors="replace")

    sys.stdout.write(asyncio.run(call()))
    return 0


@contextlib.contextmanager
def by_hand(root: Path, hosts: Hosts) -> Iterator[Setup]:
    state_dir = root / "hand"
    try:
        a, b = hosts.add("hand-a", 21), hosts.add("hand-b", 22)
        on_a, on_b = hosts.workers["hand-a"], hosts.workers["hand-b"]
        vms = [
            HandVM("hand-1", on_a, "tap1", "10.98.0.11", "10.98.0.251"),
            HandVM("hand-2", on_a, "tap2", "10.98.0.12", "10.98.0.251"),
            HandVM("hand-3", on_b, "tap3", "10.98.0.13", "10.98.0.252"),
        ]
        wire_host(on_a, a, b, "10.98.0.251", ["tap1", "tap2"])
        wire_host(on_b, b, a, "10.98.0.252", ["tap3"])
        by_name = {vm.name: vm for vm in vms}
        for vm in vms:
            say(f"by hand: booting {vm.name}")
            hand_call(vm, state_dir, "true")

        def shell(name: str, script: str) -> str:
            return hand_call(by_name[name], state_dir, script)

        yield Setup(shell, [vm.name for vm in vms], [vm.ip for vm in vms])
    finally:
        kill_qemus_under(state_dir)


def run(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    build_test_image(IMAGE_CACHE)
    with underlay(uuid.uuid4().hex[:5]) as hosts:
        started = time.monotonic()
        with through_stack(root, hosts) as stack, by_hand(root, hosts) as hand:
            for run in range(args.runs):
                # Alternating which goes first, so that a change in the host's load hits both.
                pair = [("stack", stack), ("by hand", hand)]
                for label, setup in pair if run % 2 == 0 else pair[::-1]:
                    say(f"run {run + 1}/{args.runs}: {label}")
                    setup.measure(args)
            figures = {"stack": stack.figures.summary(), "by_hand": hand.figures.summary()}
    ratios = {
        key: round(value / figures["by_hand"][key], 3) if figures["by_hand"][key] else None
        for key, value in figures["stack"].items()
    }
    return {
        "runs": args.runs,
        "megabytes": args.megabytes,
        "pings": args.pings,
        **figures,
        "ratio_stack_over_hand": ratios,
        "wall_s": round(time.monotonic() - started, 1),
    }


def print_table(report: dict[str, Any]) -> None:
    print(f"{'':28} {'stack':>10} {'by hand':>10} {'ratio':>8}")
    for key, value in report["stack"].items():
        hand, ratio = report["by_hand"][key], report["ratio_stack_over_hand"][key]
        print(f"{key:28} {value:>10} {hand:>10} {ratio:>7}x")
    print(
        f"(median of {report['runs']} runs; throughput: {report['megabytes']} MB per run, "
        "higher is better, goal >= 0.9x; round trip: lower is better)"
    )


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--hand-call":
        return _hand_call_main(json.loads(sys.argv[2]))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--megabytes", type=int, default=16)
    parser.add_argument("--pings", type=int, default=10)
    parser.add_argument("--format", choices=("table", "json"), default="table")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs) at the end")
    return run_benchmark("network", parser.parse_args(), run, print_table)


if __name__ == "__main__":
    sys.exit(main())
