"""Run Multiverse as users do: real processes on loopback, driven by the CLI.

Used by the tests (through conftest.py) and by the benchmarks in bench/.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

REPO = Path(__file__).resolve().parents[1]
# One built guest image for every test and process (the Makefile exports the same default).
IMAGE_CACHE = Path(os.environ.get("MULTIVERSE_IMAGE_CACHE", REPO / ".data" / "images"))
NODE_TIMEOUT = 3.0  # seconds; short so that the NotReady tests stay quick
DOWN_TIMEOUT = 6.0
SYNC_INTERVAL = 0.5
JOINED = "joined as "  # what a worker prints once it joined and its agent listens
LOG_TAIL_LINES = 60  # of each process's log, shown with a failed test


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(predicate: Any, timeout: float = 20.0, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)


async def async_wait_until(predicate: Any, timeout: float = 20.0, interval: float = 0.05) -> Any:
    """:func:`wait_until` while the event loop runs on: for a condition the loop brings about.

    The predicate runs in a worker thread, so it should only read (attributes, files).
    """
    return await asyncio.to_thread(wait_until, predicate, timeout, interval)


@dataclass
class Proc:
    name: str
    args: list[str]
    log: Path
    env: dict[str, str]
    prefix: list[str] = field(default_factory=list)  # e.g. ["ip", "netns", "exec", "ns"]
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> Proc:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [*self.prefix, sys.executable, "-m", "multiverse", *self.args],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
            )
        return self

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, sig)
            self.process.wait(timeout=30)

    def stop(self) -> None:
        self.kill(signal.SIGTERM)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@dataclass
class CLIResult:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


@dataclass
class Cluster:
    """A master and workers as separate OS processes, each with its own data directory."""

    root: Path
    env: dict[str, str]
    grpc_port: int = field(default_factory=free_port)
    api_port: int = field(default_factory=free_port)
    master: Proc | None = None
    workers: dict[str, Proc] = field(default_factory=dict)
    prefix: list[str] = field(default_factory=list)  # every process runs under it
    _http: httpx.Client | None = None

    @property
    def api(self) -> str:
        return f"https://127.0.0.1:{self.api_port}"

    @property
    def ca_path(self) -> Path:
        """The cluster CA, as a file for tools that take one (schemathesis, curl)."""
        path = self.root / "ca.crt"
        if not path.exists():
            path.write_bytes((self.root / "master" / "pki" / "ca.crt").read_bytes())
        return path

    @property
    def ssl_context(self) -> ssl.SSLContext:
        """Trusts this cluster's CA only, as the CLI does with its config."""
        return ssl.create_default_context(cafile=str(self.root / "master" / "pki" / "ca.crt"))

    @property
    def http(self) -> httpx.Client:
        """An HTTPS client of the master's API that trusts this cluster's CA (no token)."""
        if self._http is None:
            self._http = httpx.Client(verify=self.ssl_context, timeout=60)
        return self._http

    @property
    def ws(self) -> str:
        return f"wss://127.0.0.1:{self.api_port}"

    @property
    def token(self) -> str:
        text = (self.root / "master" / "client.toml").read_text()
        return text.split('token = "')[1].split('"')[0]

    def start_master(self, *extra: str) -> Proc:
        self.master = Proc(
            "master",
            [
                "master",
                "--listen",
                f"127.0.0.1:{self.grpc_port}",
                "--api-listen",
                f"127.0.0.1:{self.api_port}",
                "--data-dir",
                str(self.root / "master"),
                "--node-timeout",
                str(NODE_TIMEOUT),
                "--down-timeout",
                str(DOWN_TIMEOUT),
                *extra,
            ],
            self.root / "master.log",
            self.env,
            self.prefix,
        ).start()
        self.env["MULTIVERSE_CONFIG"] = str(self.root / "master" / "client.toml")
        wait_until(self._api_up, timeout=30)
        return self.master

    def _api_up(self) -> bool:
        if self.master and self.master.process and self.master.process.poll() is not None:
            raise AssertionError(f"master exited:\n{self.master.output()}")
        if self.prefix:  # another network namespace: ask through the CLI, from in there
            return self.cli("nodes").code == 0
        try:
            # Not yet trusting the CA: it may not exist yet; this only asks "is it up?".
            return httpx.get(f"{self.api}/api/v1/health", timeout=1, verify=False).is_success
        except httpx.HTTPError:
            return False

    def cli(
        self,
        *args: str,
        stdin: bytes | None = None,
        timeout: float = 120,
        env: dict[str, str] | None = None,
    ) -> CLIResult:
        done = subprocess.run(
            [*self.prefix, sys.executable, "-m", "multiverse", *args],
            env={**self.env, **(env or {})},
            capture_output=True,
            input=stdin,
            timeout=timeout,
        )
        return CLIResult(done.returncode, done.stdout.decode(), done.stderr.decode())

    def ok(self, *args: str, timeout: float = 120) -> CLIResult:
        result = self.cli(*args, timeout=timeout)
        assert result.code == 0, f"multiverse {' '.join(args)} -> {result.code}\n{result.err}"
        return result

    def join_token(self) -> str:
        return self.ok("token", "create").out.strip()

    def start_worker(
        self,
        name: str,
        *extra: str,
        token: str | None = None,
        driver: str = "fake",
        capacity: str = "cpus=8,memory=16G,disk=200G",
        wait: bool = True,
        host: str = "127.0.0.1",
        master_host: str = "127.0.0.1",
        prefix: list[str] | None = None,
        advertise: bool = False,
    ) -> Proc:
        """A worker; ``host``/``master_host``/``prefix`` put it on another test host;
        ``advertise``: the master dials ``host`` (not the address it sees the worker at)."""
        port = free_port()
        args = [
            "worker",
            "--master",
            f"{master_host}:{self.grpc_port}",
            "--listen",
            f"{host}:{port}",
            "--data-dir",
            str(self.root / name),
            "--name",
            name,
            "--driver",
            driver,
            "--sync-interval",
            str(SYNC_INTERVAL),
        ]
        if capacity:
            args += ["--capacity", capacity]
        if advertise:
            args += ["--advertise", f"{host}:{port}"]
        if token is None and not (self.root / name / "node.json").exists():
            token = self.join_token()
        env = {**self.env, "MULTIVERSE_JOIN_TOKEN": token or ""}  # not in argv: ps shows that
        where = self.prefix if prefix is None else prefix
        proc = Proc(name, [*args, *extra], self.root / f"{name}.log", env, where)
        joined_before = proc.output().count(JOINED) if proc.log.exists() else 0
        proc.start()
        self.workers[name] = proc
        if wait:
            # Ready alone may still be the previous process's state (a restart within the node
            # timeout); this one says it joined once its agent listens.
            wait_until(
                lambda: (
                    proc.output().count(JOINED) > joined_before
                    and self.node(name).get("status") == "Ready"
                ),
                timeout=60,
            )
        return proc

    def node(self, name: str) -> dict[str, Any]:
        for item in self.ok("nodes", "--format", "json").json():
            if item["name"] == name:
                return dict(item)
        return {}

    def instances(self) -> dict[str, dict[str, Any]]:
        return {i["name"]: i for i in self.ok("instances", "--format", "json").json()}

    def close(self) -> None:
        for proc in [*self.workers.values(), self.master]:
            if proc is not None:
                proc.kill()
        kill_qemus_under(self.root)  # VMs outlive their agents by design
        kill_under(self.root, "dnsmasq")  # so do the names the workers serve them


@contextmanager
def new_cluster(root: Path) -> Iterator[Cluster]:
    """A cluster rooted at ``root``, with a HOME of its own; every process killed at the end."""
    home = root / "home"
    home.mkdir()
    env = {
        **os.environ,
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "XDG_DATA_HOME": str(home / ".local/share"),
        "MULTIVERSE_IMAGE_CACHE": str(IMAGE_CACHE),
        # Tests share this host's network namespace: only tests that make their own
        # namespaces (test_network.py) put workers on the cluster network.
        "MULTIVERSE_NETWORK_MODE": "user",
        "MULTIVERSE_ALLOW_FAKE": "1",  # the workers' default driver here; refused elsewhere
    }
    for key in ("MULTIVERSE_SERVER", "MULTIVERSE_TOKEN", "MULTIVERSE_CONFIG"):
        env.pop(key, None)
    created = Cluster(root, env)
    _live.append(created)
    try:
        yield created
    finally:
        _live.remove(created)
        created.close()


_live: list[Cluster] = []


def live_logs() -> str:
    """The last lines of every process's log in the clusters alive now: shown with a failed
    test (conftest.py), since CI keeps nothing else of a run."""
    parts = []
    for cluster in _live:
        for proc in (cluster.master, *cluster.workers.values()):
            if proc is not None and proc.log.exists():
                lines = proc.output().splitlines()[-LOG_TAIL_LINES:]
                parts.append(f"--- {proc.log} (last {len(lines)} lines)\n" + "\n".join(lines))
    return "\n".join(parts)


def qemu_processes_under(state_dir: Path) -> list[psutil.Process]:
    """QEMU processes of a state dir: the driver runs each one in its VM's directory."""
    found = []
    for process in psutil.process_iter(["name"]):
        try:
            if "qemu" in (process.info["name"] or "") and Path(process.cwd()).is_relative_to(
                state_dir
            ):
                found.append(process)
        except (psutil.Error, OSError):
            continue
    return found


def kill_qemus_under(state_dir: Path) -> None:
    for process in qemu_processes_under(state_dir):
        with contextlib.suppress(psutil.Error):
            process.kill()
            process.wait(10)


# --- test hosts in network namespaces ---------------------------------------------------------

UNDERLAY = "10.231.88"  # the /24 of the test hosts' underlay; the master's host is .1


def netns_ip(namespace: str, *args: str) -> None:
    subprocess.run(["ip", "netns", "exec", namespace, "ip", *args], check=True)


def kill_under(root: Path, name: str) -> None:
    """Kill the ``name`` processes whose command line mentions ``root`` (dnsmasq of workers)."""
    for process in psutil.process_iter(["name", "cmdline"]):
        with contextlib.suppress(psutil.Error):
            if name in (process.info["name"] or "") and str(root) in " ".join(
                process.info["cmdline"] or []
            ):
                process.kill()


@dataclass
class Hosts:
    """Test hosts as network namespaces on one veth underlay, switched in the master's."""

    tag: str
    master_ns: str
    switch: str
    workers: dict[str, str] = field(default_factory=dict)  # node name -> namespace

    def add(self, name: str, index: int) -> str:
        """Another host on the underlay, at ``UNDERLAY.<index>``; returns its address."""
        namespace = f"mvnet-{name}-{self.tag}"
        subprocess.run(["ip", "netns", "add", namespace], check=True)
        self.workers[name] = namespace
        netns_ip(namespace, "link", "set", "lo", "up")
        outside, inside = f"mvu{index}{self.tag}", f"ul{index}"
        subprocess.run(
            ["ip", "link", "add", outside, "netns", self.master_ns, "type", "veth",
             "peer", "name", inside, "netns", namespace],
            check=True,
        )  # fmt: skip
        netns_ip(self.master_ns, "link", "set", outside, "master", self.switch, "up")
        address = f"{UNDERLAY}.{index}"
        netns_ip(namespace, "addr", "add", f"{address}/24", "dev", inside)
        netns_ip(namespace, "link", "set", inside, "up")
        return address

    def make_master_host(self) -> None:
        """The master's host: its namespace, holding the switch of the underlay at ``.1``."""
        subprocess.run(["ip", "netns", "add", self.master_ns], check=True)
        netns_ip(self.master_ns, "link", "set", "lo", "up")
        netns_ip(self.master_ns, "link", "add", self.switch, "type", "bridge")
        netns_ip(self.master_ns, "addr", "add", f"{UNDERLAY}.1/24", "dev", self.switch)
        netns_ip(self.master_ns, "link", "set", self.switch, "up")

    def remove(self) -> None:
        """Delete every namespace, and so every link, bridge and nftables table in them."""
        for namespace in [*self.workers.values(), self.master_ns]:
            subprocess.run(["ip", "netns", "del", namespace], check=False)


@contextmanager
def underlay(tag: str) -> Iterator[Hosts]:
    """Test hosts on a veth underlay: the master's now, workers' with ``Hosts.add``."""
    hosts = Hosts(tag, f"mvnet-m-{tag}", f"mvsw{tag}")
    try:
        hosts.make_master_host()
        yield hosts
    finally:
        hosts.remove()


def start_network_master(cluster: Cluster, hosts: Hosts, *extra: str) -> None:
    """The master in its host's namespace, reachable from the others at ``UNDERLAY.1``."""
    cluster.prefix = ["ip", "netns", "exec", hosts.master_ns]
    cluster.start_master(
        "--listen", f"0.0.0.0:{cluster.grpc_port}",
        "--api-listen", f"0.0.0.0:{cluster.api_port}",
        "--advertise", f"{UNDERLAY}.1", *extra,
    )  # fmt: skip


def start_host_worker(
    cluster: Cluster, hosts: Hosts, name: str, index: int, *extra: str,
    wrap: Sequence[str] = (), driver: str = "qemu",
) -> Proc:  # fmt: skip
    """A qemu worker on a new test host at ``UNDERLAY.<index>``; ``wrap`` runs it under a
    command (e.g. setpriv dropping capabilities)."""
    address = hosts.add(name, index)
    return cluster.start_worker(
        name, *extra, driver=driver, capacity="cpus=2,memory=2G,disk=10G", host=address,
        master_host=f"{UNDERLAY}.1", prefix=["ip", "netns", "exec", hosts.workers[name], *wrap],
    )  # fmt: skip
