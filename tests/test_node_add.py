"""`node add` end to end: the master installs a worker over SSH on another host and it joins.

The other host is a network namespace with a veth pair to this one, running Debian's OpenSSH
server with its own config, host key and authorized_keys in a temp dir, and a throwaway user
(removed afterwards). The namespace shares this file system, so each install goes under a
temp root. Its worker runs the fake driver: this master was started with
MULTIVERSE_ALLOW_FAKE=1, the only case in which the installer forwards it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import secrets
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from harness import REPO, Cluster, new_cluster, wait_until

from multiverse.master.wheelhouse import Wheelhouse
from multiverse.wire.pki import JOIN_TOKEN_PREFIX

SSHD = Path("/usr/sbin/sshd")
WHEELHOUSE = REPO / ".data" / "wheelhouse"

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not SSHD.exists(),
    reason="needs root (namespaces, a throwaway user) and openssh-server (scripts/host-deps.sh)",
)


def _run(*args: str, stdin: str | None = None) -> str:
    done = subprocess.run(args, input=stdin, capture_output=True, text=True, check=True)
    return done.stdout


@dataclass
class SSHHost:
    namespace: str
    address: str  # the host's, inside the namespace
    user: str
    password: str
    key: Path  # the client's private key (authorized on the host)
    known_hosts: Path  # holds the host's key
    fingerprint: str  # of the host key, SHA256:...
    no_python_port: int  # a second sshd whose sessions have a PATH without python3
    tmp: Path

    def root(self, name: str) -> Path:
        """An install root for one test, writable by the throwaway user."""
        path = self.tmp / "roots" / name
        return path


def _reachable(address: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((address, port), timeout=0.5):
        return True
    return False


@pytest.fixture(scope="session")
def wheelhouse() -> Path:
    """Built once (minutes the first time), cached under .data/ for every later run."""
    return asyncio.run(Wheelhouse(WHEELHOUSE).ensure())


@pytest.fixture(scope="module")
def ssh_host() -> Iterator[SSHHost]:
    tag = secrets.token_hex(3)
    namespace, outside, inside = f"mvssh-{tag}", f"mvs{tag}a", f"mvs{tag}b"
    subnet = f"10.254.{random.randrange(256)}"
    user = f"mvt{tag}"
    # Not under pytest's 0700 temp dirs: the throwaway user must reach its files.
    tmp = Path(tempfile.mkdtemp(prefix="mvssh-"))
    tmp.chmod(0o755)
    sshds: list[subprocess.Popen[bytes]] = []
    created_user = created_ns = False
    try:
        _run("ip", "netns", "add", namespace)
        created_ns = True
        _run("ip", "link", "add", outside, "type", "veth", "peer", "name", inside)
        _run("ip", "link", "set", inside, "netns", namespace)
        _run("ip", "addr", "add", f"{subnet}.1/30", "dev", outside)
        _run("ip", "link", "set", outside, "up")
        inns = ["ip", "netns", "exec", namespace]
        _run(*inns, "ip", "addr", "add", f"{subnet}.2/30", "dev", inside)
        _run(*inns, "ip", "link", "set", inside, "up")
        _run(*inns, "ip", "link", "set", "lo", "up")

        home = tmp / "home"
        _run("useradd", "--no-create-home", "--home-dir", str(home), "--shell", "/bin/sh", user)
        created_user = True
        password = secrets.token_urlsafe(12)
        _run("chpasswd", stdin=f"{user}:{password}\n")
        (tmp / "roots").mkdir()
        home.mkdir()
        shutil.chown(home, user)
        shutil.chown(tmp / "roots", user)

        _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp / "host_key"))
        _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp / "id_ed25519"))
        shutil.copy(tmp / "id_ed25519.pub", tmp / "authorized_keys")
        host_pub = (tmp / "host_key.pub").read_text().split()
        fingerprint = _run("ssh-keygen", "-lf", str(tmp / "host_key.pub")).split()[1]
        known_hosts = tmp / "known_hosts"
        known_hosts.write_text(f"{subnet}.2 {host_pub[0]} {host_pub[1]}\n")
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation dir

        def sshd(port: int, extra: str = "") -> None:
            config = tmp / f"sshd_{port}.conf"
            config.write_text(
                f"ListenAddress {subnet}.2\nPort {port}\nHostKey {tmp / 'host_key'}\n"
                f"PidFile {tmp / f'sshd_{port}.pid'}\n"
                f"AuthorizedKeysFile {tmp / 'authorized_keys'}\nStrictModes no\nUsePAM no\n"
                "PasswordAuthentication yes\nKbdInteractiveAuthentication no\n"
                f"PermitRootLogin no\nAllowUsers {user}\nSubsystem sftp internal-sftp\n{extra}"
            )
            with open(tmp / f"sshd_{port}.log", "ab") as log:
                sshds.append(
                    subprocess.Popen(
                        [*inns, str(SSHD), "-D", "-e", "-f", str(config)],
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
            wait_until(lambda: _reachable(f"{subnet}.2", port), timeout=20)

        sshd(22)
        sshd(2222, "SetEnv PATH=/nonexistent\n")
        yield SSHHost(
            namespace, f"{subnet}.2", user, password, tmp / "id_ed25519", known_hosts,
            fingerprint, 2222, tmp,
        )  # fmt: skip
    finally:
        for process in sshds:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, 9)
            process.wait(10)
        if created_user:
            for process in psutil.process_iter(["username"]):  # what the installs started
                if process.info["username"] == user:
                    with contextlib.suppress(psutil.Error):
                        process.kill()
            subprocess.run(["userdel", user], check=False)
        if created_ns:
            subprocess.run(["ip", "netns", "del", namespace], check=False)
        subprocess.run(["ip", "link", "del", outside], check=False, capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def cluster(tmp_path: Path, wheelhouse: Path, ssh_host: SSHHost) -> Iterator[Cluster]:
    with new_cluster(tmp_path) as created:
        created.env["MULTIVERSE_WHEELHOUSE"] = str(WHEELHOUSE)
        # Reachable from the namespace (the veth's address) as well as from loopback; installed
        # workers report every 5 s (their default), so the harness' 3 s timeout would not do.
        created.start_master(
            "--listen", f"0.0.0.0:{created.grpc_port}",
            "--api-listen", f"0.0.0.0:{created.api_port}",
            "--node-timeout", "20", "--down-timeout", "60",
        )  # fmt: skip
        yield created


class PsWatch:
    """Samples the command lines of the install's processes while it runs: the far host's
    (its throwaway user's) and this side's (the CLI and the master, children of this test).
    Other processes on the machine are not the install's; their arguments are their own."""

    def __init__(self, host: SSHHost) -> None:
        self.host = host
        self.lines: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            ours = {child.pid for child in psutil.Process().children(recursive=True)}
            for process in psutil.process_iter(["pid", "username", "cmdline"]):
                if process.info["pid"] in ours or process.info["username"] == self.host.user:
                    self.lines.add(" ".join(process.info["cmdline"] or []))
            time.sleep(0.05)

    def __enter__(self) -> PsWatch:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture(autouse=True)
def _no_worker_left(request: pytest.FixtureRequest) -> Iterator[None]:
    """A test that fails before its uninstall leaves its worker running on the far host,
    holding the port every install listens on: stop it, so the next test starts clean."""
    yield
    if "ssh_host" not in request.fixturenames:
        return
    roots = str(request.getfixturevalue("ssh_host").tmp / "roots")
    for process in psutil.process_iter(["cmdline"]):
        line = " ".join(process.info["cmdline"] or [])
        if line.startswith(roots) and "/venv/bin/multiverse worker" in line:
            with contextlib.suppress(psutil.Error):
                process.kill()


def _installed(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def _add(cluster: Cluster, host: SSHHost, name: str, *login: str, stdin: bytes | None = None,
         port: int = 22, known_hosts: Path | None = None) -> tuple[int, str]:  # fmt: skip
    result = cluster.cli(
        "node", "add", name, "--ssh", f"{host.user}@{host.address}:{port}", *login,
        "--known-hosts", str(known_hosts or host.known_hosts), "--driver", "fake",
        "--labels", "site=ns", "--root", str(host.root(name)),
        stdin=stdin, timeout=600,
    )  # fmt: skip
    return result.code, result.out + result.err


def _worker_pids(root: Path) -> list[int]:
    worker = f"{root}/venv/bin/multiverse worker"
    return [
        p.pid for p in psutil.process_iter(["cmdline"])
        if worker in " ".join(p.info["cmdline"] or [])
    ]  # fmt: skip


def _uninstall(cluster: Cluster, host: SSHHost, name: str) -> None:
    result = cluster.cli("node", "remove", name, "--uninstall", "--identity", str(host.key))
    assert result.code == 0, result.err
    assert _installed(host.root(name)) == []
    assert not host.root(name).exists()
    assert cluster.node(name) == {}
    running = [
        p for p in psutil.process_iter(["cmdline"])
        if str(host.root(name)) in " ".join(p.info["cmdline"] or [])
    ]  # fmt: skip
    assert running == []


def test_add_with_a_key_runs_a_worker_there_and_uninstall_leaves_nothing(
    cluster: Cluster, ssh_host: SSHHost
) -> None:
    with PsWatch(ssh_host) as ps:
        code, output = _add(cluster, ssh_host, "far", "--identity", str(ssh_host.key))
    assert code == 0, output
    assert "connect:" in output and "venv:" in output and "join:" in output
    assert "supervised background process" in output  # no systemd here, and it says so
    node = cluster.node("far")
    assert node["status"] == "Ready"
    assert node["address"].startswith(f"{ssh_host.address}:")  # joined over the namespace
    assert node["labels"]["site"] == "ns"
    assert not any(JOIN_TOKEN_PREFIX in line for line in ps.lines)
    root = ssh_host.root("far")
    assert (root / "worker.pid").exists() and not (root / "join-token").exists()
    assert (root / "worker.env").stat().st_mode & 0o077 == 0

    # Supervised: a worker that dies is started again.
    first = wait_until(lambda: len(pids := _worker_pids(root)) == 1 and pids)
    os.kill(first[0], 9)
    wait_until(lambda: _worker_pids(root) not in ([], first), timeout=60)
    wait_until(lambda: cluster.node("far")["status"] == "Ready", timeout=60)

    cluster.ok("launch", "--name", "there", "--node", "far")
    assert cluster.instances()["there"]["state"] == "Running"
    refused = cluster.cli("node", "remove", "far", "--uninstall", "--identity", str(ssh_host.key))
    assert refused.code != 0 and "there" in refused.err  # its VMs must go first
    assert (root / "venv").exists()

    again = _add(cluster, ssh_host, "far", "--identity", str(ssh_host.key))
    assert again[0] == 0 and "installed already" in again[1]  # idempotent

    cluster.ok("delete", "there")
    wait_until(lambda: "there" not in cluster.instances(), timeout=30)
    _uninstall(cluster, ssh_host, "far")


def test_add_with_a_password_on_stdin_never_shows_it(cluster: Cluster, ssh_host: SSHHost) -> None:
    with PsWatch(ssh_host) as ps:
        code, output = _add(
            cluster, ssh_host, "pw", "--password-stdin", stdin=f"{ssh_host.password}\n".encode()
        )
    assert code == 0, output
    try:
        assert cluster.node("pw")["status"] == "Ready"
        assert ps.lines and not any(ssh_host.password in line for line in ps.lines)
        assert not any(JOIN_TOKEN_PREFIX in line for line in ps.lines)
        master_log = (cluster.root / "master.log").read_text()
        assert ssh_host.password not in master_log
    finally:  # the host's worker goes even when a check fails: the next install needs its port
        _uninstall(cluster, ssh_host, "pw")


def test_failures_end_failed_with_a_reason_and_leave_nothing(
    cluster: Cluster, ssh_host: SSHHost, tmp_path: Path
) -> None:
    wrong = _add(cluster, ssh_host, "bad-pw", "--password-stdin", stdin=b"not-the-password\n")
    unknown_hosts = tmp_path / "empty_known_hosts"
    unknown_hosts.write_text("")
    unknown = _add(cluster, ssh_host, "bad-key", "--identity", str(ssh_host.key),
                   known_hosts=unknown_hosts)  # fmt: skip
    pinned_wrong = _add(cluster, ssh_host, "bad-pin", "--identity", str(ssh_host.key),
                        "--host-key-fingerprint", "SHA256:" + "A" * 43)  # fmt: skip
    no_python = _add(cluster, ssh_host, "no-py", "--identity", str(ssh_host.key),
                     port=ssh_host.no_python_port)  # fmt: skip
    for (code, output), name, reason in [
        (wrong, "bad-pw", "authentication"),
        (unknown, "bad-key", f"unknown host key {ssh_host.fingerprint}"),
        (pinned_wrong, "bad-pin", f"the host key of {ssh_host.user}@{ssh_host.address}:22 is "
                                  f"{ssh_host.fingerprint}"),
        (no_python, "no-py", "python3 not found"),
    ]:  # fmt: skip
        assert code != 0, output
        assert reason in output, output
        node = cluster.node(name)
        assert node["status"] == "Failed"
        assert reason in node["message"]
        assert _installed(ssh_host.root(name)) == []
    table = cluster.ok("nodes").out
    assert "Failed (connect)" in table and "Failed (check)" in table

    # A retry with what was missing (the pinned fingerprint) installs it.
    code, output = _add(cluster, ssh_host, "bad-key", "--identity", str(ssh_host.key),
                        "--host-key-fingerprint", ssh_host.fingerprint)  # fmt: skip
    assert code == 0, output
    assert cluster.node("bad-key")["status"] == "Ready"
    _uninstall(cluster, ssh_host, "bad-key")


def test_bad_requests_are_refused_and_change_nothing(cluster: Cluster, ssh_host: SSHHost) -> None:
    for args, message in [
        (["--ssh", "no-user-here", "--identity", str(ssh_host.key)], "invalid --ssh"),
        (["--ssh", f"{ssh_host.user}@{ssh_host.address}"], "--identity KEY (preferred)"),
        (["--ssh", f"{ssh_host.user}@{ssh_host.address}", "--identity", str(ssh_host.key),
          "--root", "relative/path"], "invalid install root"),
        (["--ssh", f"{ssh_host.user}@{ssh_host.address}", "--identity", str(ssh_host.key),
          "--host-key-fingerprint", "MD5:00"], "invalid host key fingerprint"),
    ]:  # fmt: skip
        result = cluster.cli("node", "add", "nope", *args, "--driver", "fake")
        assert result.code != 0 and message in result.err, result.err
    assert cluster.node("nope") == {}
