"""Bad input gets a clear error, the right exit code or HTTP status, and changes nothing."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from harness import Cluster, new_cluster


@pytest.fixture(scope="module")
def small_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One node with room for 1 more cpu, shared by the tests here: none may change it."""
    with new_cluster(tmp_path_factory.mktemp("errors")) as cluster:
        cluster.start_master()
        cluster.start_worker("node-a", capacity="cpus=2,memory=4G,disk=50G")
        cluster.ok("launch", "--name", "existing")
        yield cluster


CLI_CASES = [
    # (args, exit code, words the message must hold)
    (["launch", "--name", "1bad"], 2, "invalid instance name"),
    (["launch", "--name", "bad_name"], 2, "invalid instance name"),
    (["launch", "--name", "existing"], 2, "exists already"),
    (["launch", "--name", "huge", "--memory", "1P"], 2, "memory must be between"),
    (["launch", "--name", "neg", "--memory", "-1G"], 1, "invalid size"),
    (["launch", "--name", "neg", "--cpus", "-2"], 1, "-2"),
    (["launch", "--name", "big", "--cpus", "3"], 2, "node-a: 1 of 3 cpus free"),
    (["launch", "--name", "big", "--memory", "8G"], 2, "memory free"),
    (["launch", "--name", "lost", "--node", "nowhere"], 2, "node 'nowhere' does not exist"),
    (["launch", "--name", "sel", "--selector", "zone=mars"], 2, "label zone=mars"),
    (["launch", "--name", "img", "no-such-image"], 2, "image 'no-such-image' does not exist"),
    (["start", "ghost"], 2, "instance 'ghost' does not exist"),
    (["info", "ghost"], 2, "instance 'ghost' does not exist"),
    (["delete", "ghost"], 2, "instance 'ghost' does not exist"),
    (["exec", "ghost", "--", "true"], 2, "instance 'ghost' does not exist"),
    (["stop"], 1, "name at least one instance"),
    (["launch", "--bogus"], 1, "No such option"),
]


@pytest.mark.parametrize(("args", "code", "words"), CLI_CASES, ids=lambda v: str(v))
def test_bad_cli_input(small_cluster: Cluster, args: list[str], code: int, words: str) -> None:
    before = small_cluster.instances()
    result = small_cluster.cli(*args)
    assert result.code == code, result
    assert words in result.err, result.err
    assert result.out == ""
    after = small_cluster.instances()
    assert after.keys() == before.keys()
    assert small_cluster.node("node-a")["cpus"]["free"] == 1


def test_auth_is_required(small_cluster: Cluster) -> None:
    api = f"{small_cluster.api}/api/v1"
    body = {"name": "sneaky"}
    for headers in ({}, {"Authorization": "Bearer mva.nope.nope"}, {"Authorization": "Basic x"}):
        for method, path in (
            ("GET", "/instances"),
            ("POST", "/instances"),
            ("DELETE", "/instances/existing"),
            ("GET", "/nodes"),
        ):
            response = small_cluster.http.request(method, api + path, json=body, headers=headers)
            assert response.status_code == 401, (method, path, headers)
            assert response.json()["error"]["code"] == "unauthenticated"
    assert small_cluster.http.get(f"{api}/health").status_code == 200

    env = dict(small_cluster.env)
    small_cluster.env["MULTIVERSE_TOKEN"] = "mva.0000.wrong"
    try:
        result = small_cluster.cli("instances")
        assert result.code == 2 and "invalid API token" in result.err
    finally:
        small_cluster.env.clear()
        small_cluster.env.update(env)
    assert set(small_cluster.instances()) == {"existing"}


def test_viewer_token_reads_but_cannot_write(small_cluster: Cluster) -> None:
    viewer = small_cluster.ok("token", "create", "--api", "--role", "viewer").out.strip()
    api = f"{small_cluster.api}/api/v1"
    headers = {"Authorization": f"Bearer {viewer}"}
    assert small_cluster.http.get(f"{api}/instances", headers=headers).status_code == 200
    response = small_cluster.http.post(f"{api}/instances", json={"name": "nope"}, headers=headers)
    assert response.status_code == 403
    assert (
        small_cluster.http.delete(f"{api}/instances/existing", headers=headers).status_code == 403
    )
    assert set(small_cluster.instances()) == {"existing"}


def test_bad_api_bodies_get_json_errors(small_cluster: Cluster) -> None:
    api = f"{small_cluster.api}/api/v1"
    headers = {"Authorization": f"Bearer {small_cluster.token}"}
    cases = [
        {"name": "x", "cpus": "many"},
        {"name": "x", "memory": "lots"},
        {"cpus": 1},
        {"name": "x" * 100},
        {"name": "x", "strategy": "random"},
        {"name": "x", "labels": {"bad key!": "v"}},
    ]
    for body in cases:
        response = small_cluster.http.post(f"{api}/instances", json=body, headers=headers)
        assert response.status_code == 400, body
        assert response.json()["error"]["code"] == "invalid_argument"
    response = small_cluster.http.post(f"{api}/instances", content=b"{not json", headers=headers)
    assert response.status_code == 400
    response = small_cluster.http.get(f"{api}/no/such/route", headers=headers)
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
    assert set(small_cluster.instances()) == {"existing"}


def test_join_needs_a_valid_unexpired_token(cluster: Cluster) -> None:
    cluster.start_master()
    expired = cluster.ok("token", "create", "--ttl", "1s").out.strip()
    time.sleep(1.5)
    for name, token, words in (
        ("late", expired, "expired"),
        ("forged", "mvj.1234.abcd", "invalid join token"),
        ("tokenless", "", "give it a join token"),
    ):
        proc = cluster.start_worker(name, token=token, wait=False)
        assert proc.process is not None
        assert proc.process.wait(timeout=30) != 0
        assert words in proc.output()
    once = cluster.ok("token", "create", "--uses", "1").out.strip()
    cluster.start_worker("first", token=once)
    second = cluster.start_worker("second", token=once, wait=False)
    assert second.process is not None and second.process.wait(timeout=30) != 0
    assert "invalid join token" in second.output()
    assert [n["name"] for n in cluster.ok("nodes", "--format", "json").json()] == ["first"]


def test_unreachable_master_exits_3(cluster: Cluster) -> None:
    cluster.env["MULTIVERSE_SERVER"] = "http://127.0.0.1:9"
    cluster.env["MULTIVERSE_TOKEN"] = "mva.x.y"
    result = cluster.cli("instances")
    assert result.code == 3 and "cannot reach the master" in result.err


def test_regressions_found_by_the_api_fuzzer(small_cluster: Cluster) -> None:
    """schemathesis found these: each was a 5xx or leaked internals; now a clear 400."""
    api = f"{small_cluster.api}/api/v1"
    headers = {"Authorization": f"Bearer {small_cluster.token}"}
    huge_ttl = {"kind": "api", "role": "admin", "ttl_seconds": 9007199254740991}
    response = small_cluster.http.post(f"{api}/tokens", json=huge_ttl, headers=headers)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_argument"
    nul = {"command": ["echo", "a\u0000b"]}
    response = small_cluster.http.post(f"{api}/instances/existing/exec", json=nul, headers=headers)
    assert response.status_code == 400 and "NUL" in response.json()["error"]["message"]
