"""Issue 7: nobody gets in without a credential, and secrets stay secret.

Real master and worker processes; gRPC between them is mutual TLS from the cluster CA; the API
is HTTPS with bearer tokens.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from harness import Cluster, new_cluster

from multiverse.core.errors import RateLimited
from multiverse.core.files import private_dir
from multiverse.master.api import _FailedAuth
from multiverse.store.repository import Store
from multiverse.wire import pki
from multiverse.wire.v1 import multiverse_pb2 as pb
from multiverse.wire.v1 import multiverse_pb2_grpc as pb_grpc
from multiverse.worker.localstore import LocalStore

WRITE_ROUTES = [
    ("POST", "/instances", {"name": "intruder"}),
    ("POST", "/instances/guarded/stop", {}),
    ("POST", "/instances/guarded/start", None),
    ("POST", "/instances/guarded/restart", None),
    ("DELETE", "/instances/guarded", None),
    ("POST", "/instances/guarded/exec", {"command": ["true"]}),
    ("POST", "/tokens", {"kind": "join"}),
    ("POST", "/nodes/node-a/cordon", None),
    ("POST", "/nodes/node-a/drain", None),
    ("DELETE", "/nodes/node-a", None),
    ("PATCH", "/nodes/node-a/labels", {"labels": {"zone": "stolen"}}),
    ("POST", "/tokens/revoke", {"token": "mva.0123456789abcdef.secret"}),
    ("PUT", "/environments/lab", {"spec": {"name": "lab", "instances": [{"name": "intruder"}]}}),
    ("DELETE", "/environments/lab", None),
]


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with new_cluster(tmp_path_factory.mktemp("secured")) as cluster:
        cluster.start_master("--max-auth-failures", "1000")  # this module fails on purpose
        cluster.start_worker("node-a")
        cluster.ok("launch", "--name", "guarded")
        yield cluster


def _state(cluster: Cluster) -> tuple[object, ...]:
    nodes = cluster.ok("nodes", "--format", "json").json()
    instances = cluster.instances()
    return (
        [(n["name"], n["cordoned"], n["status"], n["labels"]) for n in nodes],
        {name: (i["state"], i["desired"]) for name, i in instances.items()},
        len(cluster.ok("token", "list", "--format", "json").json()),
    )


def test_every_write_route_refuses_without_the_right_token(secured: Cluster) -> None:
    before = _state(secured)
    viewer = secured.ok("token", "create", "--api", "--role", "viewer").out.strip()
    revoked = secured.ok("token", "create", "--api", "--format", "json").json()
    secured.ok("token", "revoke", revoked["id"])
    before = _state(secured)
    api = f"{secured.api}/api/v1"
    cases = [
        ({}, 401),
        ({"Authorization": "Bearer mva.0123456789abcdef.not-the-secret"}, 401),
        ({"Authorization": f"Bearer {revoked['token']}"}, 401),
        ({"Authorization": f"Bearer {viewer}"}, 403),
    ]
    for headers, status in cases:
        for method, path, body in WRITE_ROUTES:
            response = secured.http.request(method, api + path, json=body, headers=headers)
            assert response.status_code == status, (method, path, headers, response.text)
            assert response.json()["error"]["code"] in ("unauthenticated", "permission_denied")
    assert _state(secured) == before
    read = secured.http.get(f"{api}/instances", headers={"Authorization": f"Bearer {viewer}"})
    assert read.status_code == 200 and [i["name"] for i in read.json()] == ["guarded"]


def test_the_api_is_https_pinned_to_the_cluster_ca(secured: Cluster) -> None:
    assert secured.api.startswith("https://")
    with pytest.raises(httpx.ConnectError):  # the system's trust store does not know our CA
        httpx.get(f"{secured.api}/api/v1/health")
    with pytest.raises(httpx.HTTPError):  # and it does not speak plain HTTP
        httpx.get(f"http://127.0.0.1:{secured.api_port}/api/v1/health")
    config = (secured.root / "master" / "client.toml").read_text()
    assert "BEGIN CERTIFICATE" in config  # the CLI trusts exactly this CA


def _agent_address(cluster: Cluster) -> str:
    return str(cluster.ok("nodes", "--format", "json").json()[0]["address"])


def _call_agent(address: str, credentials: grpc.ChannelCredentials | None, **options: str) -> str:
    """The status code of a Report call to the agent, made with ``credentials``."""

    async def call() -> str:
        channel = (
            grpc.aio.secure_channel(address, credentials, tuple(options.items()))
            if credentials
            else grpc.aio.insecure_channel(address)
        )
        async with channel:
            try:
                await pb_grpc.AgentServiceStub(channel).Report(pb.Empty(), timeout=5)
            except grpc.aio.AioRpcError as exc:
                return exc.code().name
        return "OK"

    return asyncio.run(call())


def test_an_agent_serves_only_the_master(secured: Cluster) -> None:
    address = _agent_address(secured)
    ca_pem = (secured.root / "master" / "pki" / "ca.crt").read_bytes()
    node_id = secured.node("node-a")["id"]
    target = {"grpc.ssl_target_name_override": pki.node_server_name(node_id)}
    assert _call_agent(address, None) == "UNAVAILABLE"  # no TLS: no handshake
    assert _call_agent(address, pki.channel_credentials(ca_pem), **target) == "UNAVAILABLE"
    other_ca = pki.ClusterCA.create("someone else's CA")
    forged_master = pki.sign_master_client_cert(other_ca)
    forged = pki.channel_credentials(ca_pem, forged_master)
    assert _call_agent(address, forged, **target) == "UNAVAILABLE"  # not our CA: TLS refuses
    # A real certificate of the cluster, but a node's, not the master's: refused too.
    node_cert = pki.CertKey.load(secured.root / "node-a" / "pki", "node")
    as_node = pki.channel_credentials(ca_pem, node_cert)
    assert _call_agent(address, as_node, **target) == "UNAUTHENTICATED"


def test_a_forged_or_revoked_node_certificate_is_refused(tmp_path: Path) -> None:
    with new_cluster(tmp_path) as cluster:
        cluster.start_master()
        cluster.start_worker("node-a")
        cluster.start_worker("node-b")
        ca_pem = (tmp_path / "master" / "pki" / "ca.crt").read_bytes()
        master = f"127.0.0.1:{cluster.grpc_port}"

        async def join_as(own: pki.CertKey) -> str:
            credentials = pki.channel_credentials(ca_pem, own)
            async with grpc.aio.secure_channel(master, credentials) as channel:
                request = pb.JoinRequest(name="node-a", agent_address="127.0.0.1:1")
                try:
                    await pb_grpc.ClusterServiceStub(channel).Join(request, timeout=5)
                except grpc.aio.AioRpcError as exc:
                    return exc.code().name
            return "OK"

        # A certificate naming node-a's id, signed by a CA of the forger's own.
        forger = pki.ClusterCA.create("forger")
        key_pem, csr_pem = pki.new_key_and_csr("node-a")
        forged = pki.sign_node_csr(forger, csr_pem, cluster.node("node-a")["id"], "node-a")
        assert asyncio.run(join_as(pki.CertKey(forged, key_pem))) == "UNAVAILABLE"
        assert cluster.node("node-a")["address"] != "127.0.0.1:1"

        # node-b removed: its real certificate is revoked; it cannot come back without a token.
        node_b = pki.CertKey.load(tmp_path / "node-b" / "pki", "node")
        cluster.workers["node-b"].kill()
        cluster.ok("node", "remove", "node-b")
        assert asyncio.run(join_as(node_b)) == "UNAUTHENTICATED"
        again = cluster.start_worker("node-b", token="", wait=False)
        assert again.process is not None and again.process.wait(timeout=30) != 0
        assert "certificate" in again.output()
        assert [n["name"] for n in cluster.ok("nodes", "--format", "json").json()] == ["node-a"]
        # A node that still holds instances is not forgotten by accident.
        cluster.ok("launch", "--name", "tenant", "--node", "node-a")
        busy = cluster.cli("node", "remove", "node-a")
        assert busy.code == 2 and "still holds tenant" in busy.err
        assert cluster.node("node-a")["status"] == "Ready"


def test_no_secret_leaks_into_logs_responses_ps_or_loose_files(tmp_path: Path) -> None:
    with new_cluster(tmp_path) as cluster:
        cluster.start_master()
        join = cluster.ok("token", "create").out.strip()
        api_token = cluster.ok("token", "create", "--api").out.strip()
        cluster.start_worker("node-a", token=join)
        cluster.ok("launch", "--name", "quiet")
        cluster.ok("exec", "quiet", "--", "true")
        bad = cluster.cli("launch", "--name", "nope", "--node", "nowhere")
        assert bad.code == 2
        secrets = {
            "join token": join,
            "join secret": pki.JoinToken.decode(join).secret,
            "api token": api_token,
            "admin token": cluster.token,
            "admin secret": cluster.token.split(".")[2],
            "node key": pki.CertKey.load(tmp_path / "node-a" / "pki", "node").key_pem.decode(),
        }
        answers = (
            "\n".join(
                cluster.ok(*command, "--format", "json").out
                for command in (("nodes",), ("instances",), ("info",), ("token", "list"))
            )
            + bad.err
        )
        answers += cluster.http.get(f"{cluster.api}/api/v1/cluster/ca").text
        logs = "\n".join(path.read_text() for path in tmp_path.glob("*.log"))
        ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
        for what, secret in secrets.items():
            for where, text in (("API answers", answers), ("logs", logs), ("ps", ps)):
                assert secret not in text, f"the {what} shows in the {where}"

        private = [
            tmp_path / "master" / "client.toml",
            tmp_path / "master" / "pki" / "ca.key",
            tmp_path / "master" / "pki" / "server.key",
            tmp_path / "node-a" / "pki" / "node.key",
            tmp_path / "node-a" / "node.json",
            # The databases hold user data and token hashes; their WALs hold the same rows.
            *(tmp_path / "master" / f"multiverse.db{end}" for end in ("", "-wal", "-shm")),
            *(tmp_path / "node-a" / f"worker.db{end}" for end in ("", "-wal", "-shm")),
        ]
        for path in private:
            mode = stat.S_IMODE(os.stat(path).st_mode)
            assert mode == 0o600, f"{path} is {oct(mode)}"
        for directory in (tmp_path / "master", tmp_path / "node-a"):
            mode = stat.S_IMODE(os.stat(directory).st_mode)
            assert mode == 0o700, f"{directory} is {oct(mode)}"


def _peak_rss(pid: int) -> int:
    """The process's peak resident memory so far (VmHWM), in bytes: a spike between two
    samples counts too, and it never goes down."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc")


def _chunks(total: int, size: int = 64 * 1024) -> Iterator[bytes]:
    """A body without Content-Length: httpx sends a generator chunked."""
    for _ in range(total // size):
        yield b"x" * size


def test_limits_on_bodies_and_failed_logins(tmp_path: Path) -> None:
    with new_cluster(tmp_path) as cluster:
        cluster.start_master()
        api = f"{cluster.api}/api/v1"
        headers = {"Authorization": f"Bearer {cluster.token}"}
        huge = {"name": "big", "user_data": "x" * (2 * 1024 * 1024)}
        response = cluster.http.post(f"{api}/instances", json=huge, headers=headers)
        assert response.status_code == 413 and response.json()["error"]["code"] == "too_large"
        long_labels = {"name": "labelled", "labels": {f"k{i}": "v" for i in range(100)}}
        assert (
            cluster.http.post(f"{api}/instances", json=long_labels, headers=headers).status_code
            == 400
        )

        # Chunked bodies have no Content-Length: the bytes are counted as they come, on every
        # route (join needs no token), and the master never holds them.
        assert cluster.master is not None and cluster.master.process is not None
        pid = cluster.master.process.pid
        as_json = {**headers, "Content-Type": "application/json"}
        small = cluster.http.post(
            f"{api}/tokens", content=iter([b'{"kind": ', b'"join"}']), headers=as_json
        )
        assert small.status_code == 201, small.text  # chunked and small: served as any other
        before = _peak_rss(pid)
        for path, auth in (("/cluster/join", {}), ("/instances", headers)):
            response = cluster.http.post(
                api + path,
                content=_chunks(50 * 1024 * 1024),
                headers={**auth, "Content-Type": "application/json"},
            )
            assert response.status_code == 413, (path, response.text)
            assert response.json()["error"]["code"] == "too_large"
        grown = _peak_rss(pid) - before
        assert grown < 20 * 1024 * 1024, f"the master grew {grown / 2**20:.0f} MiB"
        assert cluster.http.get(f"{api}/health").status_code == 200

        # Failures are counted and, past 20 a minute, refused with 429; the right token from
        # the same address still passes at once (a NAT or proxy must not lock the admin out).
        wrong = {"Authorization": "Bearer mva.0000000000000000.guess"}
        codes = [cluster.http.get(f"{api}/nodes", headers=wrong).status_code for _ in range(25)]
        assert codes[:20] == [401] * 20 and set(codes[20:]) == {429}
        limited = cluster.http.get(f"{api}/nodes", headers=wrong)
        assert "too many failed" in limited.json()["error"]["message"]
        assert cluster.http.get(f"{api}/nodes", headers=headers).status_code == 200
        assert cluster.ok("nodes", "--format", "json").json() == []
        assert cluster.http.get(f"{api}/nodes", headers=wrong).status_code == 429


def test_the_failed_login_table_is_bounded_and_pruned() -> None:
    clock = [0.0]
    limiter = _FailedAuth(limit=2, window=60, max_clients=3, clock=lambda: clock[0])
    for client in ("a", "b", "c", "d"):
        limiter.failed(client)
    assert len(limiter) == 3  # the least recently failed address went first
    limiter.failed("b")
    with pytest.raises(RateLimited):
        limiter.failed("b")
    clock[0] = 61.0
    limiter.failed("e")
    assert len(limiter) == 1  # the others' failures aged out of the window
    limiter.failed("b")  # counted afresh, not refused


def test_the_fake_driver_is_refused_unless_allowed(tmp_path: Path) -> None:
    """It runs its VMs' commands on the host: a worker must not run it by mistake. Refused
    while the options are read, before anything starts (or detaches, for ``up``)."""
    env = {key: value for key, value in os.environ.items() if key != "MULTIVERSE_ALLOW_FAKE"}
    commands = [
        ["worker", "--master", "127.0.0.1:9", "--data-dir", str(tmp_path / "w")],
        ["up", "--data-dir", str(tmp_path / "up"), "--listen", "127.0.0.1:0",
         "--api-listen", "127.0.0.1:0", "--agent-listen", "127.0.0.1:0"],
    ]  # fmt: skip
    for command in commands:
        for allow in (None, "0", "yes"):
            run_env = env if allow is None else {**env, "MULTIVERSE_ALLOW_FAKE": allow}
            done = subprocess.run(
                [sys.executable, "-m", "multiverse", *command, "--driver", "fake"],
                env=run_env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert done.returncode != 0, (command, allow)
            assert "set MULTIVERSE_ALLOW_FAKE=1" in done.stderr, done.stderr
    assert list(tmp_path.iterdir()) == []  # nothing made


def test_fake_exec_and_shell_do_not_see_the_worker_environment(secured: Cluster) -> None:
    """The worker's environment holds its join token (MULTIVERSE_JOIN_TOKEN, as the harness
    starts it): a command in a fake VM gets a guest's few variables, none of the worker's."""
    token = secured.workers["node-a"].env["MULTIVERSE_JOIN_TOKEN"]
    assert token
    variables = dict(
        line.split("=", 1) for line in secured.ok("exec", "guarded", "--", "env").out.splitlines()
    )
    assert sorted(variables) == ["HOME", "LANG", "PATH"]
    assert token not in str(variables)
    shell = secured.cli("shell", "guarded", stdin=b"env\n")
    assert shell.code == 0 and "PATH=" in shell.out, shell.err
    assert "MULTIVERSE" not in shell.out and token not in shell.out


def test_databases_left_readable_by_an_older_version_are_tightened(tmp_path: Path) -> None:
    """Data from before: a 0755 directory and databases with their WAL, 0644. Opening them
    leaves every file 0600 and the directory 0700."""
    older = tmp_path / "data"
    older.mkdir(mode=0o755)
    paths = {name: older / name for name in ("multiverse.db", "worker.db")}
    left_open = []
    for path in paths.values():
        connection = sqlite3.connect(path, isolation_level=None)
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("CREATE TABLE t (x)")
        left_open.append(connection)  # so that -wal and -shm stay
    files = [older / f"{name}{end}" for name in paths for end in ("", "-wal", "-shm")]
    for path in files:
        path.chmod(0o644)
    try:
        private_dir(older)
        store = Store.for_data_dir(older)
        local = LocalStore(paths["worker.db"])
        try:
            modes = {path.name: oct(stat.S_IMODE(path.stat().st_mode)) for path in files}
            assert modes == {path.name: oct(0o600) for path in files}
            assert stat.S_IMODE(older.stat().st_mode) == 0o700
        finally:
            local.close()
            store.close()
    finally:
        for connection in left_open:
            connection.close()
