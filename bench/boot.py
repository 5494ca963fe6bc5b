"""Boot benchmark: what the whole Multiverse stack costs on top of booting a VM with QEMU alone.

Measured, for the same guest (``--image tiny``, the test guest, or ``debian``, the real one with
systemd and cloud-init), the same VM size and the same QEMU command line:

- **stack**: wall time of ``multiverse launch`` as a user runs it, from spawning the CLI to its
  exit, which happens once the instance is Running. That covers the CLI's start, the REST API,
  the master (store, scheduler), gRPC to the worker's agent, the agent making the VM directory
  and formatting its data disk (mkfs.ext4), QEMU's boot and the guest's SSH answering (Running
  means SSH answered, not that the process started), the worker's sync and the CLI's wait.
- **by hand**: the same guest booted directly with the command line that ``QemuDriver`` itself
  builds (``QemuDriver.qemu_argv``, so the two cannot drift), timed from spawning QEMU until the
  guest's SSH server accepted our key and ran ``true`` (asyncssh, retried every 0.25 s with a
  short timeout per attempt, ``--connect-timeout``), and for a cloud-init guest until
  ``cloud-init status --wait`` returned (what Running means for it). Its disk (data disk, or
  overlay on the image's disk), fw_cfg files and cloud-init seed are prepared before the clock
  starts, as anyone booting by hand would have them ready.

Printed: the median of ``--runs`` boots of each (runs alternate stack / by hand, so a change in
the host's load hits both alike), their ratio, and the resident memory (RSS) of each QEMU right
when its VM became Running. One untimed warm-up boot of each comes first (``--warmup``).

The cluster (one master, one qemu worker) runs as real processes on loopback through
tests/harness.py, in a temporary directory; the guest image comes from the shared cache
(``MULTIVERSE_IMAGE_CACHE``, default ``<repo>/.data/images``) and is built there if missing.
At most one VM runs at a time (the stack's is deleted before the next boot); every VM and
process is cleaned up at the end, also on Ctrl-C, SIGTERM or failure.

    .venv/bin/python bench/boot.py [--image tiny|debian] [--runs 5] [--format table|json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from common import add_report_options, run_benchmark  # noqa: E402
from harness import (  # noqa: E402  (tests/ is put on the path just above)
    IMAGE_CACHE,
    Cluster,
    free_port,
    new_cluster,
    qemu_processes_under,
    wait_until,
)

from multiverse.core.sizes import MiB, format_size, parse_size  # noqa: E402
from multiverse.drivers.base import VMConfig  # noqa: E402
from multiverse.drivers.process import HOST_KEY_FILE  # noqa: E402
from multiverse.drivers.qemu import (  # noqa: E402
    BASE_FILE,
    CLOUD_INIT_WAIT,
    SEED_FILE,
    QemuDriver,
    hold_base,
    make_data_disk,
    make_overlay,
)
from multiverse.guest.cloudinit import write_seed_iso  # noqa: E402
from multiverse.guest.debian import DEBIAN_IMAGE, build_debian_image  # noqa: E402
from multiverse.guest.image import TEST_IMAGE, build_test_image  # noqa: E402
from multiverse.guest.ssh import GuestConnection, KnownHost  # noqa: E402

NODE = "bench-node"
BOOT_TIMEOUT = 900.0  # the Debian guest under TCG on a loaded host takes minutes
BUILDERS = {TEST_IMAGE: build_test_image, DEBIAN_IMAGE: build_debian_image}


def say(message: str) -> None:
    """Progress goes to stderr, so that ``--format json`` keeps stdout clean."""
    print(f"[boot] {message}", file=sys.stderr, flush=True)


@dataclass
class Sample:
    seconds: float
    rss: int  # bytes, QEMU's resident set right when the VM became Running


@dataclass
class Series:
    samples: list[Sample] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        times = [sample.seconds for sample in self.samples]
        rss = [sample.rss for sample in self.samples]
        return {
            "median_s": round(statistics.median(times), 3),
            "min_s": round(min(times), 3),
            "max_s": round(max(times), 3),
            "samples_s": [round(value, 3) for value in times],
            "rss_median_bytes": int(statistics.median(rss)),
        }


@dataclass
class VMShape:
    cpus: int
    memory: int
    disk: int


# --- the whole stack ------------------------------------------------------------------------


def boot_through_stack(cluster: Cluster, image: str, name: str, shape: VMShape) -> Sample:
    """``multiverse launch`` until it returns with the instance Running; then delete it."""
    args = ["launch", image, "--name", name, "--node", NODE, "--cpus", str(shape.cpus)]
    args += ["--memory", str(shape.memory), "--disk", str(shape.disk)]
    args += ["--timeout", str(BOOT_TIMEOUT)]
    started = time.perf_counter()
    result = cluster.cli(*args, timeout=BOOT_TIMEOUT)
    elapsed = time.perf_counter() - started
    try:
        if result.code != 0:
            raise RuntimeError(f"multiverse launch {name} failed ({result.code}): {result.err}")
        state = cluster.instances()[name]["state"]
        if state != "Running":
            raise RuntimeError(f"launch returned but {name} is {state}")
        qemus = qemu_processes_under(cluster.root / NODE)
        if len(qemus) != 1:
            raise RuntimeError(f"expected one QEMU process on {NODE}, found {len(qemus)}")
        rss = qemus[0].memory_info().rss
    finally:
        cluster.cli("delete", name, timeout=60)
        wait_until(lambda: not qemu_processes_under(cluster.root / NODE), timeout=30)
    return Sample(elapsed, rss)


# --- by hand, with the driver's own command line --------------------------------------------


class ByHand:
    """Boots VMs with QEMU directly, using ``QemuDriver``'s argv builder and guest files."""

    def __init__(self, state_dir: Path, connect_timeout: float) -> None:
        self.driver = QemuDriver(state_dir, [IMAGE_CACHE])
        self.connect_timeout = connect_timeout
        self.live: list[subprocess.Popen[bytes]] = []

    def boot(self, image: str, shape: VMShape) -> Sample:
        vm = VMConfig(
            id=str(uuid.uuid4()),
            name=f"hand-{len(self.live)}",
            cpus=shape.cpus,
            memory=shape.memory,
            disk=shape.disk,
            image=image,
        )
        vm_dir = self.driver.vms_dir / vm.id
        vm_dir.mkdir(parents=True)
        # Ready before the clock starts: the disk, the files named by -fw_cfg, the seed.
        boot = self.driver.boot_files(vm.image)
        if boot.disk is None:
            make_data_disk(vm_dir / "disk.img", vm.disk)
        else:
            hold_base(boot.disk, vm_dir / BASE_FILE)
            make_overlay(vm_dir / "disk.img", vm_dir / BASE_FILE, boot.disk_format, vm.disk)
            write_seed_iso(self.driver.seed(vm), vm_dir / SEED_FILE)
        self.driver.write_guest_config(vm)
        port = free_port()
        argv = self.driver.qemu_argv(vm, boot, port)
        try:
            with (vm_dir / "qemu.log").open("wb") as log:
                started = time.perf_counter()
                process = subprocess.Popen(
                    argv,
                    cwd=vm_dir,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            self.live.append(process)
            known = KnownHost(vm_dir / HOST_KEY_FILE, vm.name)
            asyncio.run(
                self._ssh_answers(port, known, boot.cloud_init, lambda: process.poll() is None)
            )
            elapsed = time.perf_counter() - started
            if process.poll() is not None:
                log_text = (vm_dir / "qemu.log").read_text(errors="replace")
                raise RuntimeError(f"QEMU exited ({process.returncode}): {log_text}")
            rss = psutil.Process(process.pid).memory_info().rss
            return Sample(elapsed, rss)
        finally:
            self.kill_all()
            shutil.rmtree(vm_dir, ignore_errors=True)

    async def _ssh_answers(
        self, port: int, known: KnownHost, cloud_init: bool, alive: Callable[[], bool]
    ) -> None:
        # A short timeout per attempt: while the guest is not up yet, QEMU's user-mode network
        # accepts our TCP connection but its SYN to the guest goes unanswered and is resent
        # with backoff, so a patient attempt made too early hangs for seconds past the moment
        # SSH is up (measured: 6.7 s to SSH with a 15 s timeout, 4.7 s with 1 s).
        guest = GuestConnection(
            "127.0.0.1", port, self.driver.key_path, known, connect_timeout=self.connect_timeout
        )
        try:
            await guest.wait_until_ready(BOOT_TIMEOUT, alive=alive)
            result = await guest.run("true")
            if result.exit_code != 0:
                raise RuntimeError(f"`true` in the guest exited {result.exit_code}")
            if cloud_init:
                await guest.run(CLOUD_INIT_WAIT, timeout=BOOT_TIMEOUT)
        finally:
            await guest.close()

    def kill_all(self) -> None:
        for process in self.live:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=30)
        self.live.clear()


# --- running it -----------------------------------------------------------------------------


def cli_startup(cluster: Cluster, times: int = 3) -> float:
    """Median wall time of a trivial CLI call (``instances``): the CLI's fixed cost."""
    durations = []
    for _ in range(times):
        started = time.perf_counter()
        cluster.ok("instances", "--format", "json")
        durations.append(time.perf_counter() - started)
    return statistics.median(durations)


def run(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    shape = VMShape(args.cpus, parse_size(args.memory), parse_size(args.disk))
    say(f"guest image {args.image} in {IMAGE_CACHE} (built if missing)")
    BUILDERS[args.image](IMAGE_CACHE, say)
    by_hand = ByHand(root / "by-hand" / "qemu", args.connect_timeout)
    stack, hand = Series(), Series()
    (root / "cluster").mkdir()
    with new_cluster(root / "cluster") as cluster:
        try:
            say("starting a master and one qemu worker")
            cluster.start_master()
            cluster.start_worker(NODE, driver="qemu", capacity="cpus=2,memory=4G,disk=20G")
            total = args.warmup + args.runs
            for index in range(total):
                label = "warm-up" if index < args.warmup else f"run {index - args.warmup + 1}"
                sample = boot_through_stack(cluster, args.image, f"bench-boot-{index}", shape)
                say(f"{label}: stack {sample.seconds:.2f} s, rss {format_size(sample.rss)}")
                if index >= args.warmup:
                    stack.samples.append(sample)
                sample = by_hand.boot(args.image, shape)
                say(f"{label}: by hand {sample.seconds:.2f} s, rss {format_size(sample.rss)}")
                if index >= args.warmup:
                    hand.samples.append(sample)
            cli_seconds = cli_startup(cluster)
        except BaseException:
            if args.keep:
                say(f"logs kept in {root}")
            raise
        finally:
            by_hand.kill_all()
    stack_summary, hand_summary = stack.summary(), hand.summary()
    return {
        "runs": args.runs,
        "image": args.image,
        "accel": by_hand.driver.accel,
        "vm": {"cpus": shape.cpus, "memory_bytes": shape.memory, "disk_bytes": shape.disk},
        "qemu_argv": by_hand.driver.qemu_argv(
            VMConfig("ID", "NAME", shape.cpus, shape.memory, shape.disk, args.image),
            by_hand.driver.boot_files(args.image),
            0,
        ),
        "stack": stack_summary,
        "by_hand": hand_summary,
        "ratio": round(stack_summary["median_s"] / hand_summary["median_s"], 3),
        "overhead_s": round(stack_summary["median_s"] - hand_summary["median_s"], 3),
        "cli_call_s": round(cli_seconds, 3),
    }


def print_table(report: dict[str, Any]) -> None:
    vm = report["vm"]
    print(
        f"Boot to Running (SSH answers; for debian, cloud-init done): {report['image']} guest, "
        f"{vm['cpus']} cpu, "
        f"{format_size(vm['memory_bytes'])} memory, {format_size(vm['disk_bytes'])} disk, "
        f"accel {report['accel']}, median of {report['runs']} runs"
    )
    print()
    header = f"{'path':<34} {'median s':>9} {'min s':>7} {'max s':>7} {'QEMU RSS':>10}"
    print(header)
    print("-" * len(header))
    rows = [
        ("multiverse launch (whole stack)", report["stack"]),
        ("qemu by hand (same argv)", report["by_hand"]),
    ]
    for label, series in rows:
        print(
            f"{label:<34} {series['median_s']:>9.2f} {series['min_s']:>7.2f} "
            f"{series['max_s']:>7.2f} {series['rss_median_bytes'] / MiB:>6.0f} MiB"
        )
    print()
    print(
        f"ratio stack / by hand: {report['ratio']:.2f}x "
        f"(+{report['overhead_s']:.2f} s; a bare CLI call costs {report['cli_call_s']:.2f} s)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--image", choices=sorted(BUILDERS), default=TEST_IMAGE)
    parser.add_argument("--runs", type=int, default=5, help="timed boots of each (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed boots first (default 1)")
    parser.add_argument("--cpus", type=int, default=1)
    parser.add_argument("--memory", default="256M")
    parser.add_argument("--disk", default="1G")
    parser.add_argument(
        "--connect-timeout",
        type=float,
        default=1.0,
        help="by hand: give up an SSH attempt after this long and retry (default 1 s)",
    )
    add_report_options(parser)
    args = parser.parse_args()
    if args.runs < 1 or args.warmup < 0:
        parser.error("--runs must be at least 1 and --warmup at least 0")

    return run_benchmark("boot", args, run, print_table)


if __name__ == "__main__":
    sys.exit(main())
