"""Bad input gets a clear error, the right exit code or HTTP status, and changes nothing."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import datetime, timedelta

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
    once = cluster.ok("token", "create").out.strip()  # one use is the default
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


def test_join_tokens_default_to_one_use_for_an_hour(small_cluster: Cluster) -> None:
    created = small_cluster.ok("token", "create", "--format", "json").json()
    listed = {t["id"]: t for t in small_cluster.ok("token", "list", "--format", "json").json()}
    mine = listed[created["id"]]
    assert mine["uses_left"] == 1
    lifetime = datetime.fromisoformat(mine["expires_at"]) - datetime.fromisoformat(
        mine["created_at"]
    )
    assert timedelta(minutes=59) < lifetime <= timedelta(hours=1)
    more = small_cluster.ok("token", "create", "--uses", "3", "--ttl", "2h", "--format", "json")
    listed = {t["id"]: t for t in small_cluster.ok("token", "list", "--format", "json").json()}
    assert listed[more.json()["id"]]["uses_left"] == 3


TOKEN_CASES = [
    # (CLI args, exit code, words) for `token create`: none is a 500, none makes a token
    (["--api", "--uses", "3"], 1, "--uses is for join tokens only"),
    (["--uses", "0"], 1, "0"),
    (["--uses", "lots"], 1, "lots"),
    (["--uses", "1001"], 2, "less than or equal to 1000"),
    (["--uses", "99999999999999999999999"], 2, "less than or equal to 1000"),
    (["--ttl", "366d"], 2, "less than or equal to 31536000"),
    (["--ttl", "99999999999999999999999d"], 2, "less than or equal to 31536000"),
    (["--ttl", "soon"], 1, "invalid duration"),
    (["--ttl", "0s"], 1, "invalid duration"),
]


@pytest.mark.parametrize(("args", "code", "words"), TOKEN_CASES, ids=lambda v: str(v))
def test_token_bounds(small_cluster: Cluster, args: list[str], code: int, words: str) -> None:
    before = len(small_cluster.ok("token", "list", "--format", "json").json())
    result = small_cluster.cli("token", "create", *args)
    assert result.code == code and words in result.err, result
    assert result.out == ""
    assert len(small_cluster.ok("token", "list", "--format", "json").json()) == before


def test_api_tokens_refuse_uses_and_bounds_give_400(small_cluster: Cluster) -> None:
    api = f"{small_cluster.api}/api/v1"
    headers = {"Authorization": f"Bearer {small_cluster.token}"}
    before = len(small_cluster.ok("token", "list", "--format", "json").json())
    for body, words in (
        ({"kind": "api", "uses": 5}, "join tokens only"),
        ({"kind": "join", "uses": 1001}, "uses"),
        ({"kind": "join", "uses": 2**70}, "uses"),
        ({"kind": "join", "ttl_seconds": 366 * 86400}, "ttl_seconds"),
        ({"kind": "join", "ttl_seconds": "1h"}, "ttl_seconds"),
    ):
        response = small_cluster.http.post(f"{api}/tokens", json=body, headers=headers)
        assert response.status_code == 400, (body, response.text)
        assert words in response.json()["error"]["message"]
    assert len(small_cluster.ok("token", "list", "--format", "json").json()) == before


def test_token_create_tells_the_id_and_revoke_takes_the_token(small_cluster: Cluster) -> None:
    made = small_cluster.ok("token", "create", "--api", "--role", "viewer")
    token = made.out.strip()
    assert "\n" not in token and token.startswith("mva.")  # stdout is the token alone
    token_id = token.split(".")[1]
    assert f"Token id: {token_id}" in made.err
    created = small_cluster.ok("token", "create", "--format", "json").json()
    assert {"id", "token", "kind", "expires_at"} <= set(created) and created["kind"] == "join"
    assert small_cluster.ok("token", "create", "--format", "yaml").out.startswith("id: ")

    api = f"{small_cluster.api}/api/v1"
    viewer = {"Authorization": f"Bearer {token}"}
    assert small_cluster.http.get(f"{api}/nodes", headers=viewer).status_code == 200
    wrong = token[:-4] + ("aaaa" if not token.endswith("aaaa") else "bbbb")
    refused = small_cluster.cli("token", "revoke", wrong)
    assert refused.code == 2 and "no such token" in refused.err
    assert small_cluster.cli("token", "revoke", "mva.nonsense").code == 2
    assert small_cluster.ok("token", "revoke", token).out.strip() == f"Revoked {token_id}"
    assert small_cluster.ok("token", "revoke", created["token"]).out.strip() == (
        f"Revoked {created['id']}"
    )
    listed = {t["id"]: t for t in small_cluster.ok("token", "list", "--format", "json").json()}
    assert listed[token_id]["revoked"] and listed[created["id"]]["revoked"]
    assert small_cluster.http.get(f"{api}/nodes", headers=viewer).status_code == 401
    by_id = small_cluster.ok("token", "create", "--format", "json").json()["id"]
    assert small_cluster.ok("token", "revoke", by_id).out.strip() == f"Revoked {by_id}"
