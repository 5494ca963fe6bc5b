"""Fault injection with real VMs (issue 19): three VMs on two namespace hosts (a on host-a;
b and c on host-b), faults applied on the hosts from outside the guests.

Hosts, VMs and workers are made once for the module (as in test_network.py, with the same
harness helpers); every namespace, and with it each nftables table and qdisc made in it, is
deleted at the end whatever happened.
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from harness import (
    Cluster,
    Hosts,
    new_cluster,
    start_host_worker,
    start_network_master,
    underlay,
    wait_until,
)

pytestmark = pytest.mark.vm

CIDR = "10.98.0.0/24"
VM = ("--memory", "192M", "--disk", "64M")
BOOT = 300  # seconds: TCG under a loaded machine boots slowly


@dataclass
class Lab:
    cluster: Cluster
    hosts: Hosts

    def ping(self, vm: str, target: str) -> bool:
        """Whether ``vm`` gets every answer of a short ping to ``target``."""
        done = self.cluster.cli("exec", vm, "--", "ping", "-c", "2", "-W", "2", target)
        return done.code == 0 and " 0% packet loss" in done.out

    def tcp(self, vm: str, target: str) -> bool:
        """Whether ``vm`` opens a TCP connection to ``target``'s SSH port (dropbear's banner)."""
        script = f"nc -w 3 {target} 22 </dev/null | head -c 4"
        done = self.cluster.cli("exec", vm, "--", "sh", "-c", script)
        return done.code == 0 and done.out == "SSH-"

    def fault(self, *args: str) -> dict[str, object]:
        return dict(self.cluster.ok("fault", *args, "--format", "json").json())

    def faults(self) -> list[dict[str, object]]:
        return list(self.cluster.ok("fault", "list", "--format", "json").json())

    def host_rules(self, host: str) -> str:
        done = subprocess.run(
            ["ip", "netns", "exec", self.hosts.workers[host], "nft", "list", "table", "bridge",
             "multiverse_faults"], capture_output=True, text=True, check=False,
        )  # fmt: skip
        return done.stdout

    def heal_all(self) -> None:
        self.cluster.ok("fault", "heal", "--all")


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, tiny_image: Path) -> Iterator[Lab]:
    root = tmp_path_factory.mktemp("faults")
    with underlay(uuid.uuid4().hex[:5]) as hosts, new_cluster(root) as cluster:
        start_network_master(cluster, hosts, "--network", CIDR)
        start_host_worker(cluster, hosts, "host-a", 21, "--network-mode", "bridge")
        start_host_worker(cluster, hosts, "host-b", 22, "--network-mode", "bridge")
        for name, node in (("a", "host-a"), ("b", "host-b"), ("c", "host-b")):
            cluster.ok("launch", "--name", name, "--node", node, *VM, timeout=BOOT)
        yield Lab(cluster, hosts)


@pytest.fixture
def healed(lab: Lab) -> Iterator[Lab]:
    """Each test starts and ends with no fault in force."""
    yield lab
    lab.heal_all()


def test_partition_cuts_a_from_b_and_c_and_heal_restores(healed: Lab) -> None:
    lab = healed
    assert lab.ping("a", "b") and lab.ping("b", "c") and lab.tcp("a", "b")
    fault = lab.fault("partition", "a", "/", "b,c")
    assert not lab.ping("a", "b") and not lab.ping("a", "c")
    assert not lab.tcp("a", "b") and lab.tcp("b", "c")
    assert not lab.ping("c", "a")
    assert lab.ping("b", "c") and lab.ping("c", "b")  # same side: untouched
    # On the hosts, not in the guests: each sender's node holds its drops.
    address = {n: lab.cluster.instances()[n]["address"] for n in ("a", "b")}
    assert f"ip saddr {address['a']} ip daddr {address['b']} drop" in lab.host_rules("host-a")
    assert f"ip saddr {address['b']} ip daddr {address['a']} drop" in lab.host_rules("host-b")
    assert [f["id"] for f in lab.faults()] == [fault["id"]]
    lab.cluster.ok("fault", "heal", str(fault["id"]))
    assert lab.faults() == []
    assert lab.ping("a", "b") and lab.ping("a", "c") and lab.ping("c", "a")
    assert lab.tcp("a", "b")
    assert lab.host_rules("host-a") == "" and lab.host_rules("host-b") == ""


def _kernel_has_netem() -> bool:
    namespace = f"mvnetem-{uuid.uuid4().hex[:5]}"
    subprocess.run(["ip", "netns", "add", namespace], check=True)
    try:
        done = subprocess.run(
            ["ip", "netns", "exec", namespace, "tc", "qdisc", "add", "dev", "lo", "root",
             "netem", "delay", "1ms"], capture_output=True, check=False,
        )  # fmt: skip
        return done.returncode == 0
    finally:
        subprocess.run(["ip", "netns", "del", namespace], check=False)


def _rtt_ms(lab: Lab, vm: str, target: str) -> float:
    out = lab.cluster.ok("exec", vm, "--", "ping", "-c", "5", "-W", "5", target).out
    return float(out.rsplit("min/avg/max = ", 1)[1].split("/")[1])


def test_link_delay_slows_a_to_b_only(healed: Lab) -> None:
    lab = healed  # netem where the kernel has it, else iptables and NFQUEUE: the same effect
    before_b, before_c = _rtt_ms(lab, "a", "b"), _rtt_ms(lab, "a", "c")
    lab.fault("link", "a", "--to", "b", "--delay", "200ms")
    grown_b, grown_c = _rtt_ms(lab, "a", "b") - before_b, _rtt_ms(lab, "a", "c") - before_c
    print(f"a→b {before_b:.1f} ms, +{grown_b:.1f} ms; a→c {before_c:.1f} ms, +{grown_c:.1f} ms")
    assert 160 <= grown_b <= 240, (before_b, grown_b)
    assert grown_c < 40, (before_c, grown_c)


def _netns(lab: Lab, host: str, *argv: str) -> str:
    done = subprocess.run(["ip", "netns", "exec", lab.hosts.workers[host], *argv],
                          capture_output=True, text=True, check=True)  # fmt: skip
    return done.stdout


def _bridge_nf(lab: Lab, host: str, value: str | None = None) -> str:
    path = "/proc/sys/net/bridge/bridge-nf-call-iptables"
    if value is not None:
        _netns(lab, host, "sh", "-c", f"echo {value} > {path}")
    return _netns(lab, host, "cat", path).strip()


def test_link_fault_outlives_a_worker_restart_and_heal_leaves_nothing(healed: Lab) -> None:
    lab = healed
    if _kernel_has_netem():
        pytest.skip("this kernel has netem: the NFQUEUE fallback is not used")
    before = _rtt_ms(lab, "a", "b")
    old = _bridge_nf(lab, "host-b")
    _bridge_nf(lab, "host-b", "0")  # bridged traffic skips iptables until the fault is on
    try:
        refused = lab.cluster.cli("fault", "link", "a", "--to", "b", "--duplicate", "1%")
        assert refused.code != 0 and "--duplicate needs the netem qdisc" in refused.err
        assert lab.faults() == [] and "MV-LINK" not in _netns(lab, "host-b", "iptables-save")
        fault = lab.fault("link", "a", "--to", "b", "--delay", "200ms", "--jitter", "10ms")
        assert _bridge_nf(lab, "host-b") == "1"
        assert "-j NFQUEUE" in _netns(lab, "host-b", "iptables-save")
        worker = lab.cluster.workers["host-b"]
        worker.kill()  # its reader goes; the rules stay, bypassed: the path is fast again
        assert _rtt_ms(lab, "a", "b") - before < 100
        worker.start()
        wait_until(lambda: _rtt_ms(lab, "a", "b") - before > 160, timeout=120, interval=1)
        lab.cluster.ok("fault", "heal", str(fault["id"]))
        assert _rtt_ms(lab, "a", "b") - before < 40
        assert _bridge_nf(lab, "host-b") == "0"
        ruleset = _netns(lab, "host-b", "nft", "list", "ruleset")
        assert "MV-LINK" not in ruleset and "table ip filter" not in ruleset, ruleset
    finally:
        _bridge_nf(lab, "host-b", old)


def test_pause_with_a_duration_freezes_b_then_heals_by_itself(healed: Lab) -> None:
    lab = healed
    fault = lab.fault("pause", "b", "--duration", "15s")
    assert fault["expires_at"]
    assert not lab.ping("a", "b")  # frozen: no answer
    wait_until(lambda: lab.faults() == [], timeout=60, interval=0.5)
    wait_until(lambda: lab.ping("a", "b"), timeout=60)
    assert lab.cluster.ok("exec", "b", "--", "echo", "back").out == "back\n"


def test_a_worker_restarted_mid_fault_applies_it_again(healed: Lab) -> None:
    lab = healed
    lab.fault("partition", "a", "/", "b")
    assert "drop" in lab.host_rules("host-a")
    worker = lab.cluster.workers["host-a"]
    worker.kill()
    # As a host reboot would: the rules are gone while the worker is away.
    subprocess.run(
        ["ip", "netns", "exec", lab.hosts.workers["host-a"], "nft", "delete", "table", "bridge",
         "multiverse_faults"], check=True,
    )  # fmt: skip
    worker.start()
    wait_until(lambda: "drop" in lab.host_rules("host-a"), timeout=60)
    assert not lab.ping("a", "b")


def test_a_master_restarted_mid_fault_lists_it_and_heals_it_on_time(healed: Lab) -> None:
    lab = healed
    fault = lab.fault("partition", "a", "/", "c", "--duration", "40s")
    assert lab.cluster.master is not None
    lab.cluster.master.kill()
    start_network_master(lab.cluster, lab.hosts)
    listed = lab.faults()
    assert [(f["id"], f["expires_at"]) for f in listed] == [(fault["id"], fault["expires_at"])]
    assert not lab.ping("a", "c")
    wait_until(lambda: lab.faults() == [], timeout=120, interval=0.5)
    wait_until(lambda: lab.host_rules("host-a") == "", timeout=30)
    assert lab.ping("a", "c")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("partition", "a", "/", "nosuch"), "unknown instance(s): nosuch"),
        (("link", "a", "--to", "b", "--delay", "-5ms"), "cannot be negative"),
        (("link", "a", "--to", "b", "--rate", "fast"), "invalid --rate"),
        (("partition", "a,b", "/"), "two non-empty sides"),
        (("pause", "nosuch"), "unknown instance(s): nosuch"),
    ],
)
def test_bad_input_is_refused_and_applies_nothing(
    healed: Lab, args: tuple[str, ...], message: str
) -> None:
    done = healed.cluster.cli("fault", *args)
    assert done.code != 0 and message in done.err, done.err
    assert healed.faults() == []
    assert healed.host_rules("host-a") == "" and healed.host_rules("host-b") == ""


def _now(lab: Lab, vm: str) -> int:
    return int(lab.cluster.ok("exec", vm, "--", "date", "+%s").out)


def test_clock_skew_steps_the_guests_clock_and_heal_steps_it_back(healed: Lab) -> None:
    lab = healed
    assert abs(_now(lab, "b") - _now(lab, "a")) < 30
    fault = lab.fault("clock", "b", "--skew", "+600s")
    assert 570 < _now(lab, "b") - _now(lab, "a") < 630
    lab.cluster.ok("fault", "heal", str(fault["id"]))
    assert abs(_now(lab, "b") - _now(lab, "a")) < 30


def _boot_id(lab: Lab, vm: str) -> str:
    """The guest kernel's id of its current boot: a new one each boot."""
    return lab.cluster.ok("exec", vm, "--", "cat", "/proc/sys/kernel/random/boot_id").out


def test_reboot_resets_the_vm_and_it_comes_back(healed: Lab) -> None:
    lab = healed
    before = _boot_id(lab, "c")
    lab.fault("reboot", "c")
    answers: list[str] = []

    def rebooted() -> bool:
        done = lab.cluster.cli(
            "exec", "c", "--", "cat", "/proc/sys/kernel/random/boot_id", timeout=60
        )
        answers.append(f"{done.code} {done.out.strip()} {done.err.strip()}")
        return done.code == 0 and done.out != before

    try:
        wait_until(rebooted, timeout=300, interval=2)
    except AssertionError:
        c = lab.cluster.instances()["c"]
        raise AssertionError(
            f"c did not come back: {c['state']} {c['message']!r}; last answers {answers[-3:]}"
        ) from None
    wait_until(lambda: lab.ping("c", "b"), timeout=120)


def test_disk_full_fills_the_data_disk_and_slow_throttles_it(healed: Lab) -> None:
    lab = healed

    def use(vm: str) -> int:
        line = lab.cluster.ok("exec", vm, "--", "df", "-P", "/data").out.splitlines()[-1]
        return int(line.split()[4].rstrip("%"))

    assert use("b") < 90
    full = lab.fault("disk", "b", "--full")
    assert use("b") >= 99
    lab.cluster.ok("fault", "heal", str(full["id"]))
    assert use("b") < 90
    slow = lab.fault("disk", "b", "--slow", "10ms")  # QEMU's throttling took it: no error
    lab.cluster.ok("fault", "heal", str(slow["id"]))
    refused = lab.cluster.cli("fault", "disk", "b", "--full", "--slow", "10ms")
    assert refused.code != 0 and "exactly one of --full or --slow" in refused.err
