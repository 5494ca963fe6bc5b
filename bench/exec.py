"""Exec benchmark: what one ``exec`` of ``true`` costs through each hop of the stack.

One VM (the tiny test guest under QEMU) runs on one qemu worker; the same command, ``true``,
is run in it again and again along four paths, interleaved so that a change of the host's
load hits all of them alike:

- **ssh**: a new channel on an SSH connection kept open to the guest (asyncssh, the library
  and the connection kind the agent uses): the floor, the guest and its SSH channel alone;
- **grpc**: the agent's ``Exec`` call, straight from here over mutual TLS on a kept channel
  (a client certificate signed by the cluster's CA, as the master's is): adds gRPC and the
  agent;
- **api**: ``POST /api/v1/instances/NAME/exec`` on a kept-alive HTTPS connection (httpx, as
  the CLI sends it): adds HTTP and the master;
- **cli**: ``multiverse exec NAME -- true`` as a user runs it, a new process each time: adds
  the CLI's start and its connection (TCP, TLS) to the master.

Printed: p50 and p99 of each path (``--runs`` of each, ``--cli-runs`` for the CLI, after a few
untimed ones), the cost each hop adds (difference of p50s) and the ratios to the ssh path.
Then the CLI's own start: ``multiverse --version`` against ``python -c pass``, wall time and
CPU time (user + system of the process, which a busy host inflates less than wall time).

The cluster runs as real processes on loopback through tests/harness.py in a temporary
directory; the guest image comes from the shared cache (``MULTIVERSE_IMAGE_CACHE``, default
``<repo>/.data/images``). The VM and every process are cleaned up at the end, also on Ctrl-C,
SIGTERM or failure.

    .venv/bin/python bench/exec.py [--runs 100] [--cli-runs 20] [--format table|json]
"""

from __future__ import annotations

import argparse
import asyncio
import compileall
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from common import add_report_options, run_benchmark  # noqa: E402
from harness import IMAGE_CACHE, Cluster, new_cluster  # noqa: E402  (tests/ is on the path now)

from multiverse.guest.image import TEST_IMAGE, build_test_image  # noqa: E402
from multiverse.guest.ssh import GuestConnection, KnownHost  # noqa: E402
from multiverse.wire import pki  # noqa: E402
from multiverse.wire.convert import GRPC_CHANNEL_OPTIONS  # noqa: E402
from multiverse.wire.v1 import multiverse_pb2 as pb  # noqa: E402
from multiverse.wire.v1 import multiverse_pb2_grpc as pb_grpc  # noqa: E402

NODE = "exec-node"
NAME = "bench-exec"
WARMUP = 5
COMMAND = ["true"]
PATHS = ("ssh", "grpc", "api", "cli")


def say(message: str) -> None:
    """Progress goes to stderr, so that ``--format json`` keeps stdout clean."""
    print(f"[exec] {message}", file=sys.stderr, flush=True)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


class Paths:
    """The four ways to run the command, each kept open between calls where it can be."""

    def __init__(self, cluster: Cluster, instance: dict[str, Any], node: dict[str, Any]) -> None:
        self.cluster = cluster
        vm_dir = cluster.root / NODE / "qemu" / "vms" / instance["id"]
        runtime = json.loads((vm_dir / "vm.json").read_text())
        self.guest = GuestConnection(
            "127.0.0.1",
            int(runtime["ssh_port"]),
            cluster.root / NODE / "qemu" / "ssh" / "id_ed25519",
            KnownHost(vm_dir / "ssh_host_key.pub", NAME),
        )
        ca = pki.ClusterCA.load(cluster.root / "master" / "pki")
        self.credentials = pki.channel_credentials(ca.cert_pem, pki.sign_master_client_cert(ca))
        self.node = node
        self.cli_cpu: list[float] = []  # ms of CPU of each `multiverse exec` process
        self.instance_id = instance["id"]
        self.http = httpx.Client(
            base_url=f"{cluster.api}/api/v1",
            headers={"Authorization": f"Bearer {cluster.token}"},
            verify=cluster.ssl_context,
            timeout=60,
        )

    async def open(self) -> None:
        """The gRPC channel, in the loop that uses it (an aio channel is bound to one)."""
        options = (
            ("grpc.ssl_target_name_override", pki.node_server_name(self.node["id"])),
            *GRPC_CHANNEL_OPTIONS,
        )
        self.channel = grpc.aio.secure_channel(self.node["address"], self.credentials, options)
        self.agent = pb_grpc.AgentServiceStub(self.channel)

    async def ssh(self) -> None:
        result = await self.guest.run(COMMAND)
        if result.exit_code != 0:
            raise RuntimeError(f"ssh: `true` exited {result.exit_code}")

    async def grpc(self) -> None:
        codes = [
            chunk.exit_code
            async for chunk in self.agent.Exec(
                pb.ExecRequest(id=self.instance_id, command=COMMAND), timeout=60
            )
            if chunk.exited
        ]
        if codes != [0]:
            raise RuntimeError(f"grpc: `true` ended with {codes}")

    async def api(self) -> None:
        body = {"command": COMMAND, "stdin": ""}
        with self.http.stream("POST", f"/instances/{NAME}/exec", json=body) as response:
            lines = [json.loads(line) for line in response.iter_lines() if line]
        if response.status_code != 200 or lines[-1:] != [{"exit_code": 0}]:
            raise RuntimeError(f"api: {response.status_code} {lines}")

    async def cli(self) -> None:
        _wall, cpu, code = run_process(["exec", NAME, "--", *COMMAND], self.cluster.env)
        self.cli_cpu.append(cpu)
        if code != 0:
            raise RuntimeError(f"cli: `multiverse exec` exited {code}")

    async def close(self) -> None:
        self.http.close()
        await self.channel.close()
        await self.guest.close()


def run_process(
    args: list[str], env: dict[str, str], python: bool = False
) -> tuple[float, float, int]:
    """Run ``multiverse ARGS`` (or ``python ARGS``): its wall and CPU milliseconds, exit code."""
    argv = [sys.executable, *args] if python else [sys.executable, "-m", "multiverse", *args]
    started = time.perf_counter()
    process = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _pid, status, usage = os.wait4(process.pid, 0)
    wall = (time.perf_counter() - started) * 1000
    process.returncode = os.waitstatus_to_exitcode(status)
    return wall, (usage.ru_utime + usage.ru_stime) * 1000, process.returncode


def cli_start(env: dict[str, str], runs: int) -> dict[str, Any]:
    """Medians of wall and CPU ms of ``multiverse --version`` and ``python -c pass``,
    interleaved."""
    samples: dict[str, list[tuple[float, float, int]]] = {"python": [], "version": []}
    for _ in range(runs):
        samples["python"].append(run_process(["-c", "pass"], env, python=True))
        samples["version"].append(run_process(["--version"], env))
    return {
        name: {
            "wall_ms": round(statistics.median(s[0] for s in values), 1),
            "cpu_ms": round(statistics.median(s[1] for s in values), 1),
        }
        for name, values in samples.items()
    }


async def timed(call: Callable[[], Awaitable[None]]) -> float:
    started = time.perf_counter()
    await call()
    return (time.perf_counter() - started) * 1000


async def measure(paths: Paths, runs: int, cli_runs: int) -> dict[str, list[float]]:
    calls = {name: getattr(paths, name) for name in PATHS}
    for _ in range(WARMUP):
        for call in calls.values():
            await call()
    samples: dict[str, list[float]] = {name: [] for name in PATHS}
    cli_every = max(1, runs // max(cli_runs, 1))
    for index in range(runs):
        for name, call in calls.items():
            if name == "cli" and (index % cli_every or len(samples["cli"]) >= cli_runs):
                continue
            samples[name].append(await timed(call))
    return samples


def run(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    # An installed package has its bytecode; a checkout run with PYTHONDONTWRITEBYTECODE set
    # compiles every edited module again at each start (~12 ms of a CLI call, measured): time
    # the CLI as installed.
    compileall.compile_dir(REPO / "src" / "multiverse", quiet=1)
    say(f"guest image in {IMAGE_CACHE} (built if missing)")
    build_test_image(IMAGE_CACHE, progress=say)
    (root / "cluster").mkdir()
    with new_cluster(root / "cluster") as cluster:
        say("starting a master and one qemu worker")
        cluster.start_master()
        cluster.start_worker(NODE, driver="qemu", capacity="cpus=2,memory=4G,disk=20G")
        say("launching a VM")
        cluster.ok("launch", TEST_IMAGE, "--name", NAME, "--node", NODE, "--memory", "256M",
                   "--disk", "1G", timeout=240)  # fmt: skip
        try:
            paths = Paths(cluster, cluster.instances()[NAME], cluster.node(NODE))

            async def go() -> dict[str, list[float]]:
                await paths.open()
                try:
                    return await measure(paths, args.runs, args.cli_runs)
                finally:
                    await paths.close()

            say(f"timing {args.runs} runs of each path ({args.cli_runs} of the CLI)")
            samples = asyncio.run(go())
            say("timing the CLI's start")
            start = cli_start(cluster.env, args.cli_runs)
            start["exec"] = {"cpu_ms": round(statistics.median(paths.cli_cpu), 1)}
        finally:
            cluster.cli("delete", NAME, timeout=60)
    summary = {
        name: {
            "p50_ms": round(statistics.median(values), 2),
            "p90_ms": round(percentile(values, 0.90), 2),
            "p99_ms": round(percentile(values, 0.99), 2),
            "runs": len(values),
        }
        for name, values in samples.items()
    }
    floor = summary["ssh"]["p50_ms"]
    for name in PATHS:
        summary[name]["ratio_p50"] = round(summary[name]["p50_ms"] / floor, 2)
        summary[name]["ratio_p99"] = round(summary[name]["p99_ms"] / summary["ssh"]["p99_ms"], 2)
    return {"command": COMMAND, "paths": summary, "cli_start": start}


LABELS = {
    "ssh": "ssh channel (open asyncssh)",
    "grpc": "agent Exec (gRPC, kept)",
    "api": "API (HTTPS, kept-alive)",
    "cli": "multiverse exec (new CLI)",
}
HOPS = {
    "ssh": "the guest and its SSH channel",
    "grpc": "+ gRPC and the agent",
    "api": "+ HTTP and the master",
    "cli": "+ the CLI's start and connect",
}


def print_table(report: dict[str, Any]) -> None:
    paths = report["paths"]
    print(f"exec of `{' '.join(report['command'])}` in a tiny TCG guest")
    print()
    header = (
        f"{'path':<30} {'runs':>5} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} "
        f"{'x ssh p50':>9} {'x ssh p99':>9}  hop (p50 added)"
    )
    print(header)
    print("-" * len(header))
    previous = 0.0
    for name in PATHS:
        row = paths[name]
        added = row["p50_ms"] - previous
        previous = row["p50_ms"]
        print(
            f"{LABELS[name]:<30} {row['runs']:>5} {row['p50_ms']:>8.2f} {row['p90_ms']:>8.2f} "
            f"{row['p99_ms']:>8.2f} {row['ratio_p50']:>8.2f}x {row['ratio_p99']:>8.2f}x  "
            f"{HOPS[name]} ({added:+.1f} ms)"
        )
    start = report["cli_start"]
    print()
    print(
        f"CLI start: `multiverse --version` {start['version']['wall_ms']:.1f} ms wall, "
        f"{start['version']['cpu_ms']:.1f} ms CPU; `python -c pass` "
        f"{start['python']['wall_ms']:.1f} ms wall, {start['python']['cpu_ms']:.1f} ms CPU; "
        f"a `multiverse exec` process: {start['exec']['cpu_ms']:.1f} ms CPU"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=100, help="timed runs per path (default 100)")
    parser.add_argument("--cli-runs", type=int, default=20, help="timed CLI runs (default 20)")
    add_report_options(parser)
    args = parser.parse_args()
    if args.runs < 2 or args.cli_runs < 1:
        parser.error("--runs must be at least 2 and --cli-runs at least 1")

    return run_benchmark("exec", args, run, print_table)


if __name__ == "__main__":
    sys.exit(main())
