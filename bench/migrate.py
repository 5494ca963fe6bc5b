"""Live move benchmark: what Multiverse costs on top of a QEMU live migration driven by hand.

Measured for the same running VM shape (the test guest, ``--memory`` 256 MiB by default, a
sparse ``--disk`` data disk mirrored whole) and the same QEMU command line on both sides:

- **stack**: ``POST /api/v1/instances/NAME/move`` with ``kind=live`` between two qemu workers
  (real processes on loopback, tests/harness.py), timed until the move's operation ends
  (the target runs the VM, the owner switched, the source copy deleted). Its downtime is the
  operation's ``downtime_ms``: QEMU's own downtime on the source (guest stopped until the
  migration completed) plus the time until the target's ``cont`` returned.
- **by hand**: two QEMU processes started with ``QemuDriver.qemu_argv`` (the target with
  ``-incoming defer -S`` on an empty disk of the same size), driven over QMP directly: the
  same TLS (x509 credentials from a throwaway cluster CA), ``nbd-server-start`` and a
  writable ``block-export-add`` on the target, ``blockdev-mirror`` (sync=full) from the
  source until READY, ``migrate`` with ``pause-before-switchover``, ``block-job-cancel`` at the
  switch-over, ``migrate-continue``, then ``cont`` on the target, and the source QEMU killed
  and its disk removed. Timed from spawning the target QEMU until the source copy is gone (as
  the stack's operation ends once the source copy is deleted); its downtime is QEMU's downtime
  plus the time from the migration's completion until ``cont`` returned, as for the stack.

Each side's VM goes back and forth between its two places, one move per run, runs alternating
stack / by hand so the host's load hits both alike; printed: medians, and the ratios (goals:
total at most 1.2x, downtime within 2x). At most two guests run at once (plus, during a move,
the target's incoming QEMU); everything is cleaned up at the end, also on Ctrl-C or failure.

    .venv/bin/python bench/migrate.py [--runs 9] [--memory 256M] [--disk 64M] [--format json]
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
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from common import add_report_options, run_benchmark  # noqa: E402
from harness import IMAGE_CACHE, Cluster, free_port, new_cluster  # noqa: E402
from qemu.qmp import QMPClient  # noqa: E402

from multiverse.core.sizes import format_size, parse_size  # noqa: E402
from multiverse.drivers.base import VMConfig  # noqa: E402
from multiverse.drivers.process import HOST_KEY_FILE  # noqa: E402
from multiverse.drivers.qemu import (  # noqa: E402
    DOWNTIME_LIMIT_MS,
    MAX_BANDWIDTH,
    QemuDriver,
    make_data_disk,
    write_tls_dh_params,
)
from multiverse.guest.image import TEST_IMAGE, build_test_image  # noqa: E402
from multiverse.guest.ssh import GuestConnection, KnownHost  # noqa: E402
from multiverse.wire import pki  # noqa: E402

NODES = ("node-a", "node-b")
TIMEOUT = 600.0


def say(message: str) -> None:
    """Progress goes to stderr, so that ``--format json`` keeps stdout clean."""
    print(f"[migrate] {message}", file=sys.stderr, flush=True)


# --- the whole stack ------------------------------------------------------------------------


def _api(cluster: Cluster, method: str, path: str, **body: object) -> Any:
    headers = {"Authorization": f"Bearer {cluster.token}"}
    answer = cluster.http.request(
        method, f"{cluster.api}/api/v1{path}", headers=headers, json=body or None
    )
    if answer.status_code >= 400:
        raise RuntimeError(f"{method} {path}: {answer.status_code} {answer.text}")
    return answer.json()


def move_through_stack(cluster: Cluster, name: str, target: str) -> tuple[float, float]:
    """(total seconds, downtime seconds) of one live move through the API."""
    started = time.perf_counter()
    operation = _api(cluster, "POST", f"/instances/{name}/move", node=target, kind="live")
    # The long poll `multiverse move` waits with: answered when the operation ends.
    while (done := _api(cluster, "GET", f"/operations/{operation['operation']}/wait?timeout=5"))[
        "status"
    ] == "running":
        pass
    elapsed = time.perf_counter() - started
    if done["status"] != "success":
        raise RuntimeError(f"the live move of {name} failed: {done.get('error')}")
    return elapsed, done["figures"]["downtime_ms"] / 1000


# --- by hand --------------------------------------------------------------------------------


class ByHand:
    """One VM moved back and forth between two directories by QMP, without Multiverse."""

    def __init__(self, root: Path, memory: int, disk: int) -> None:
        self.driver = QemuDriver(root / "qemu", [IMAGE_CACHE])
        self.vm = VMConfig(str(uuid.uuid4()), "by-hand", 1, memory, disk, TEST_IMAGE)
        self.boot = self.driver.boot_files(TEST_IMAGE)
        self.tls = root / "tls"
        self.places = [root / "a", root / "b"]
        self.processes: list[subprocess.Popen[bytes]] = []
        self.at = 0  # which place runs the VM

    def _tls_files(self) -> None:
        ca = pki.ClusterCA.create()
        node_id = str(uuid.uuid4())
        key, csr = pki.new_key_and_csr("bench")
        cert = pki.sign_node_csr(ca, csr, node_id, "bench")
        self.tls.mkdir(mode=0o700)
        (self.tls / "ca-cert.pem").write_bytes(ca.cert_pem)
        for role in ("server", "client"):
            (self.tls / f"{role}-cert.pem").write_bytes(cert)
            (self.tls / f"{role}-key.pem").write_bytes(key)
        self.tls_hostname = pki.node_server_name(node_id)
        write_tls_dh_params(self.tls)  # as a node's directory has it (drivers/qemu.py)

    def _spawn(self, place: Path, extra: list[str], port: int) -> subprocess.Popen[bytes]:
        argv = [*self.driver.qemu_argv(self.vm, self.boot, port), *extra]
        with (place / "qemu.log").open("wb") as log:
            process = subprocess.Popen(
                argv, cwd=place, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        self.processes.append(process)
        return process

    def _guest_files(self, place: Path) -> None:
        place.mkdir(parents=True, exist_ok=True)
        # write_guest_config writes into the driver's VM directory: copy them from there.
        self.driver.write_guest_config(self.vm)
        for name in ("hostname", "authorized_keys", "network"):
            shutil.copy(self.driver.vms_dir / self.vm.id / name, place / name)

    def start(self) -> None:
        """Boot the VM in the first place and wait for its SSH."""
        self._tls_files()
        (self.driver.vms_dir / self.vm.id).mkdir(parents=True)
        for place in self.places:
            self._guest_files(place)
        make_data_disk(self.places[0] / "disk.img", self.vm.disk)
        port = free_port()
        process = self._spawn(self.places[0], [], port)
        known = KnownHost(self.places[0] / HOST_KEY_FILE, self.vm.name)
        guest = GuestConnection("127.0.0.1", port, self.driver.key_path, known)

        async def ready() -> None:
            try:
                await guest.wait_until_ready(TIMEOUT, alive=lambda: process.poll() is None)
            finally:
                await guest.close()

        asyncio.run(ready())

    def move(self) -> tuple[float, float]:
        """(total seconds, downtime seconds) of one live migration to the other place."""
        source, target = self.places[self.at], self.places[1 - self.at]
        result = asyncio.run(self._move(source, target))
        self.at = 1 - self.at
        return result

    async def _move(self, source_dir: Path, target_dir: Path) -> tuple[float, float]:
        with (target_dir / "disk.img").open("wb") as disk:
            disk.truncate(self.vm.disk)
        nbd_port, migration_port = free_port(), free_port()
        old = self.processes[-1]
        started = time.perf_counter()
        process = self._spawn(target_dir, ["-incoming", "defer", "-S"], free_port())
        target = await _connect(target_dir / "qmp.sock", process)
        source = await _connect(source_dir / "qmp.sock", old)
        try:
            # Each QEMU is a target once, then a source once: its objects get two names.
            tls = {"qom-type": "tls-creds-x509", "dir": str(self.tls), "verify-peer": True}
            await target.execute("object-add", {**tls, "id": "tls-in", "endpoint": "server"})
            node = next(
                d["inserted"]["node-name"]
                for d in await target.execute("query-block")
                if d["device"] == "virtio0"
            )
            address = {"type": "inet", "data": {"host": "127.0.0.1", "port": str(nbd_port)}}
            await target.execute("nbd-server-start", {"addr": address, "tls-creds": "tls-in"})
            await target.execute("block-export-add", {
                "type": "nbd", "id": "disk", "node-name": node, "name": "disk", "writable": True,
            })  # fmt: skip
            await target.execute("migrate-set-parameters", {"tls-creds": "tls-in"})
            await target.execute("migrate-incoming", {"uri": f"tcp:127.0.0.1:{migration_port}"})

            await source.execute("object-add", {**tls, "id": "tls-out", "endpoint": "client"})
            await source.execute("blockdev-add", {
                "driver": "nbd", "node-name": "nbd0", "export": "disk", "tls-creds": "tls-out",
                "tls-hostname": self.tls_hostname,
                "server": {"type": "inet", "host": "127.0.0.1", "port": str(nbd_port)},
            })  # fmt: skip
            await source.execute("blockdev-mirror", {
                "job-id": "mirror0", "device": "virtio0", "target": "nbd0", "sync": "full",
            })  # fmt: skip
            while not any(job.get("ready") for job in await source.execute("query-block-jobs")):
                await asyncio.sleep(0.02)
            await source.execute("migrate-set-capabilities", {"capabilities": [
                {"capability": "pause-before-switchover", "state": True}]})  # fmt: skip
            await source.execute("migrate-set-parameters", {
                "tls-creds": "tls-out", "tls-hostname": self.tls_hostname,
                "downtime-limit": DOWNTIME_LIMIT_MS, "max-bandwidth": MAX_BANDWIDTH,
            })  # fmt: skip
            await source.execute("migrate", {"uri": f"tcp:127.0.0.1:{migration_port}"})
            switched = False
            while True:
                info: Any = await source.execute("query-migrate")
                if info["status"] == "pre-switchover" and not switched:
                    await source.execute("block-job-cancel", {"device": "mirror0"})
                    while await source.execute("query-block-jobs"):
                        await asyncio.sleep(0.005)
                    await source.execute("migrate-continue", {"state": "pre-switchover"})
                    switched = True
                elif info["status"] == "completed":
                    break
                elif info["status"] in ("failed", "cancelled"):
                    raise RuntimeError(f"migration {info['status']}: {info.get('error-desc')}")
                await asyncio.sleep(0.02)
            completed = time.perf_counter()
            await target.execute("nbd-server-stop")
            await target.execute("cont")
            resumed = time.perf_counter()
        finally:
            await target.disconnect()
            await source.disconnect()
        # The source copy goes, as the stack's move deletes it before its operation ends.
        _kill(old)
        self.processes.remove(old)
        (source_dir / "disk.img").unlink()
        ended = time.perf_counter()
        return ended - started, info["downtime"] / 1000 + resumed - completed

    def kill_all(self) -> None:
        for process in self.processes:
            _kill(process)
        self.processes.clear()


async def _connect(path: Path, process: subprocess.Popen[bytes]) -> QMPClient:
    deadline = time.monotonic() + TIMEOUT
    while True:
        client = QMPClient("bench")
        try:
            await client.connect(str(path))
            return client
        except Exception:  # not listening yet
            if process.poll() is not None or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.01)


def _kill(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


# --- running it -----------------------------------------------------------------------------


def _summary(samples: list[float]) -> dict[str, Any]:
    return {
        "median_s": round(statistics.median(samples), 3),
        "min_s": round(min(samples), 3),
        "max_s": round(max(samples), 3),
        "samples_s": [round(value, 3) for value in samples],
    }


def run(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    memory, disk = parse_size(args.memory), parse_size(args.disk)
    say(f"guest image {TEST_IMAGE} in {IMAGE_CACHE} (built if missing)")
    build_test_image(IMAGE_CACHE, say)
    hand = ByHand(root / "by-hand", memory, disk)
    stack_total: list[float] = []
    stack_down: list[float] = []
    hand_total: list[float] = []
    hand_down: list[float] = []
    (root / "cluster").mkdir()
    with new_cluster(root / "cluster") as cluster:
        try:
            say("starting a master and two qemu workers")
            cluster.start_master()
            for node in NODES:
                cluster.start_worker(node, driver="qemu", capacity="cpus=2,memory=4G,disk=20G")
            cluster.ok("launch", "--name", "bench-move", "--node", NODES[0], "--memory",
                       args.memory, "--disk", args.disk, timeout=TIMEOUT)  # fmt: skip
            say("booting the by-hand VM")
            hand.start()
            for index in range(args.warmup + args.runs):
                label = "warm-up" if index < args.warmup else f"run {index - args.warmup + 1}"
                total, down = move_through_stack(cluster, "bench-move", NODES[(index + 1) % 2])
                say(f"{label}: stack {total:.3f} s, downtime {down * 1000:.0f} ms")
                if index >= args.warmup:
                    stack_total.append(total)
                    stack_down.append(down)
                total, down = hand.move()
                say(f"{label}: by hand {total:.3f} s, downtime {down * 1000:.0f} ms")
                if index >= args.warmup:
                    hand_total.append(total)
                    hand_down.append(down)
            cluster.ok("delete", "bench-move", timeout=120)
        finally:
            hand.kill_all()
    stack = {"total": _summary(stack_total), "downtime": _summary(stack_down)}
    by_hand = {"total": _summary(hand_total), "downtime": _summary(hand_down)}
    return {
        "runs": args.runs,
        "accel": hand.driver.accel,
        "vm": {"cpus": 1, "memory_bytes": memory, "disk_bytes": disk},
        "stack": stack,
        "by_hand": by_hand,
        "ratio_total": round(stack["total"]["median_s"] / by_hand["total"]["median_s"], 3),
        "ratio_downtime": round(stack["downtime"]["median_s"] / by_hand["downtime"]["median_s"], 3),
    }


def print_table(report: dict[str, Any]) -> None:
    vm = report["vm"]
    print(
        f"Live move of a running {TEST_IMAGE} guest: {vm['cpus']} cpu, "
        f"{format_size(vm['memory_bytes'])} memory, {format_size(vm['disk_bytes'])} disk "
        f"mirrored, accel {report['accel']}, TLS, median of {report['runs']} moves"
    )
    print()
    header = f"{'path':<34} {'total s':>8} {'min':>6} {'max':>6} {'downtime ms':>12} {'min':>5} {'max':>5}"  # noqa: E501
    print(header)
    print("-" * len(header))
    for label, side in (
        ("multiverse move --live (stack)", report["stack"]),
        ("QMP by hand (same argv)", report["by_hand"]),
    ):
        total, down = side["total"], side["downtime"]
        print(
            f"{label:<34} {total['median_s']:>8.3f} {total['min_s']:>6.2f} "
            f"{total['max_s']:>6.2f} {down['median_s'] * 1000:>12.0f} "
            f"{down['min_s'] * 1000:>5.0f} {down['max_s'] * 1000:>5.0f}"
        )
    print()
    print(
        f"ratio stack / by hand: total {report['ratio_total']:.2f}x (goal <= 1.2x), "
        f"downtime {report['ratio_downtime']:.2f}x (goal <= 2x)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    # Single moves vary by +-100 ms here (QEMU's start, the RAM copy under TCG): a median of 9.
    parser.add_argument("--runs", type=int, default=9, help="timed moves of each (default 9)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed moves first (default 1)")
    parser.add_argument("--memory", default="256M")
    parser.add_argument("--disk", default="64M")
    add_report_options(parser)
    args = parser.parse_args()
    if args.runs < 1 or args.warmup < 0:
        parser.error("--runs must be at least 1 and --warmup at least 0")
    return run_benchmark("migrate", args, run, print_table)


if __name__ == "__main__":
    sys.exit(main())
