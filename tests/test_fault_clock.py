"""Faults on a VM's time (issue 19) with one real VM under QEMU/TCG: a pause leaves a gap in
the guest's clock as seen from the host, and a drift makes the guest's clock run fast.

One master and one qemu worker (user-mode networking: these faults need no cluster network);
the cluster, its worker and its VM are killed at the end whatever happened.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import Cluster, new_cluster, wait_until

pytestmark = pytest.mark.vm

BOOT = 300  # seconds: TCG under a loaded machine boots slowly
# The guest's RTC (QEMU's CMOS clock) follows the host's time whatever the guest kernel does.
RTC = "/sys/class/rtc/rtc0/since_epoch"


@pytest.fixture(scope="module")
def vm(tmp_path_factory: pytest.TempPathFactory, tiny_image: Path) -> Iterator[Cluster]:
    with new_cluster(tmp_path_factory.mktemp("clock")) as cluster:
        cluster.start_master()
        cluster.start_worker("w1", driver="qemu", capacity="cpus=2,memory=2G,disk=10G")
        cluster.ok("launch", "--name", "b", "--memory", "192M", "--disk", "64M", timeout=BOOT)
        yield cluster
        cluster.cli("fault", "heal", "--all")


def _faults(cluster: Cluster) -> list[dict[str, object]]:
    return list(cluster.ok("fault", "list", "--format", "json").json())


def _uptime_seen_from_host(cluster: Cluster) -> tuple[float, float]:
    """(host monotonic time, the guest's uptime then): the middle of the exec's round trip."""
    before = time.monotonic()
    out = cluster.ok("exec", "b", "--", "cat", "/proc/uptime").out
    after = time.monotonic()
    return (before + after) / 2, float(out.split()[0])


def test_pause_stops_the_guests_clock_for_its_duration_then_it_runs_again(vm: Cluster) -> None:
    host_before, guest_before = _uptime_seen_from_host(vm)
    fault = vm.ok("fault", "pause", "b", "--duration", "5s", "--format", "json").json()
    assert fault["expires_at"]
    wait_until(lambda: _faults(vm) == [], timeout=120, interval=0.5)  # healed by itself
    host_after, guest_after = _uptime_seen_from_host(vm)
    # The host's time went on while the guest's stood still: the gap is the pause (give or
    # take the exec round trips and how late the heal ran on a loaded machine).
    gap = (host_after - host_before) - (guest_after - guest_before)
    assert 3.0 < gap < 60.0, (host_after - host_before, guest_after - guest_before)
    # It runs again: its clock moves on.
    wait_until(lambda: _uptime_seen_from_host(vm)[1] > guest_after + 1, timeout=60)


# In the guest: wait for an RTC second to begin, then note the uptime at the start of a later
# RTC second; the ratio of the two spans is the kernel clock's rate against real time.
_RATE = f"""
edge() {{ s=$(cat {RTC}); while [ "$(cat {RTC})" = "$s" ]; do sleep 0.05; done; }}
edge; r0=$(cat {RTC}); u0=$(cut -d' ' -f1 /proc/uptime)
while [ "$(cat {RTC})" -lt $((r0 + 20)) ]; do sleep 0.05; done
u1=$(cut -d' ' -f1 /proc/uptime); r1=$(cat {RTC})
echo "$r0 $u0 $r1 $u1"
"""


def _rate(cluster: Cluster) -> float:
    """How fast the guest kernel's clock runs against the RTC (1.0: on time)."""
    r0, u0, r1, u1 = map(float, cluster.ok("exec", "b", "--", "sh", "-c", _RATE).out.split())
    return (u1 - u0) / (r1 - r0)


def _adjtimex(cluster: Cluster) -> tuple[int, int]:
    """The guest kernel's (tick µs, frequency) as NTP would set them."""
    out = cluster.ok("exec", "b", "--", "adjtimex").out
    fields = {line.split(":")[0].split()[-1]: line.split(":")[1].split()[0] for line in
              out.splitlines() if ":" in line}  # fmt: skip
    return int(fields["tick"]), int(fields["freq.adjust"])


def test_drift_runs_the_guests_clock_fast_until_healed(vm: Cluster) -> None:
    assert _adjtimex(vm) == (10000, 0)
    fault = vm.ok("fault", "clock", "b", "--drift", "50000ppm", "--format", "json").json()
    assert fault["params"] == {"drift": "50000ppm"}
    assert _adjtimex(vm) == (10500, 0)  # 5%: 500 µs more per 10 ms tick
    assert 1.03 < _rate(vm) < 1.07
    vm.ok("fault", "heal", str(fault["id"]))
    assert _adjtimex(vm) == (10000, 0)
    odd = vm.ok("fault", "clock", "b", "--drift", "-130ppm", "--format", "json").json()
    assert _adjtimex(vm) == (9999, -30 * 65536)  # 100 ppm in the tick, the rest in frequency
    vm.ok("fault", "heal", str(odd["id"]))
    for drift, message in (("150000ppm", "within ±100000ppm"), ("fast", "invalid --drift")):
        done = vm.cli("fault", "clock", "b", "--drift", drift)
        assert done.code != 0 and message in done.err, done.err
    assert _faults(vm) == [] and _adjtimex(vm) == (10000, 0)
