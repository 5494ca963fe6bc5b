"""Schemathesis against the master's own OpenAPI: hostile and odd requests get a clear answer.

For every operation in ``/openapi.json`` it sends generated requests, valid ones and invalid
ones, with the admin token, to a real master with one fake-driver worker, and holds the API to
its contract (DESIGN.md, "Cross-cutting"): never a 5xx, and every 4xx is JSON
``{"error": {"code": str, "message": str}}``.

Why not ``schemathesis.pytest.from_fixture``: the schema exists only once the master runs, and
schemathesis 4.32's lazy-fixture plugin reads ``request.node._nodeid``, which pytest 9.2 no
longer has. So the test drives Hypothesis itself over each operation's strategies. It records
every bad exchange rather than stopping at the first, and reports them all at once, each with a
curl line to reproduce it. Bounded examples and no shrinking keep the run near half a minute.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from harness import Cluster, new_cluster
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.core.result import Ok

# Per operation and generation mode (valid requests, invalid requests). MULTIVERSE_FUZZ_EXAMPLES
# digs deeper on demand: `MULTIVERSE_FUZZ_EXAMPLES=500 pytest tests/test_api_fuzz.py`.
EXAMPLES_PER_OPERATION = int(os.environ.get("MULTIVERSE_FUZZ_EXAMPLES", "25"))

# `node add` dials the host it is given: generated hosts would send traffic off this machine.
# tests/test_node_add.py holds its bad inputs to the contract instead.
NOT_FUZZED = {("POST", "/api/v1/nodes")}

FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES_PER_OPERATION,
    deadline=None,
    database=None,  # no example database: each run starts fresh, nothing saved
    phases=[Phase.explicit, Phase.generate],  # failures are recorded, not raised: no shrinking
    suppress_health_check=list(HealthCheck),
)


@pytest.fixture(scope="module")
def fuzz_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A master and one roomy fake worker, with an instance for the fuzzer to find."""
    with new_cluster(tmp_path_factory.mktemp("fuzz")) as cluster:
        cluster.start_master()
        cluster.start_worker("node-a", capacity="cpus=64,memory=256G,disk=4T")
        cluster.ok("launch", "--name", "existing")
        yield cluster


def contract_violation(status: int, content_type: str, text: str) -> str | None:
    """What is wrong with a response by the API's error contract, or None if nothing is."""
    if status >= 500:
        return "server error"
    if not 400 <= status < 500:
        return None
    if not content_type.startswith("application/json"):
        return f"4xx with content type {content_type!r}"
    try:
        body = json.loads(text)
    except ValueError:
        return "4xx body is not JSON"
    error = body.get("error") if isinstance(body, dict) else None
    if (
        not isinstance(body, dict)
        or set(body) != {"error"}
        or not isinstance(error, dict)
        or not isinstance(error.get("code"), str)
        or not error["code"]
        or not isinstance(error.get("message"), str)
        or not error["message"]
    ):
        return "4xx body is not {error: {code, message}}"
    return None


def test_contract_violation_judges_as_intended() -> None:
    """The judge itself, so a lenient judge cannot make the fuzz test pass for nothing."""
    good = json.dumps({"error": {"code": "not_found", "message": "no such thing"}})
    assert contract_violation(404, "application/json", good) is None
    assert contract_violation(200, "text/plain", "ok") is None
    assert contract_violation(502, "application/json", good) == "server error"
    assert contract_violation(404, "text/plain", good) is not None
    assert contract_violation(400, "application/json", "nope") is not None
    for bad in ({"detail": "x"}, {"error": "x"}, {"error": {"code": "x"}}, [1]):
        assert contract_violation(400, "application/json", json.dumps(bad)) is not None
    assert contract_violation(
        422, "application/json", json.dumps({"error": {"code": "", "message": "m"}})
    )


def _describe(case: Any, response: Any, problem: str) -> str:
    """One failing exchange in full: enough to write its regression test."""
    # A request without a body carries schemathesis' NotSet marker, which json cannot write.
    body = (
        json.dumps(case.body)
        if isinstance(case.body, (dict, list, str, int, float))
        else repr(case.body)
    )
    return (
        f"{problem}: {case.method} {case.formatted_path}"
        f" query={case.query!r} headers={_extra_headers(case)!r} body={body}\n"
        f"  -> {response.status_code} {response.text[:300]}\n"
        f"  reproduce: {case.as_curl_command()}"
    )


def _content_type(response: Any) -> str:
    """schemathesis.Response keeps each header as a list of its values, under lowercase names."""
    values = response.headers.get("content-type") or [""]
    return str(values[0])


def _extra_headers(case: Any) -> dict[str, str]:
    return {k: v for k, v in (case.headers or {}).items() if k.lower() != "authorization"}


def _variants(method: str, path: str) -> list[tuple[GenerationMode, dict[str, str] | None]]:
    """Valid and invalid requests; for routes of one object, also aimed at an object that exists.

    Random names only ever reach "does not exist"; the fixture's node and instance let the
    fuzzer get past that, into exec, stop and the rest. DELETE is left random, so that the
    instance stays for the routes after it.
    """
    modes = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    variants: list[tuple[GenerationMode, dict[str, str] | None]] = [(m, None) for m in modes]
    if "{name}" in path and method.upper() != "DELETE":
        known = {"name": "existing" if path.startswith("/api/v1/instances/") else "node-a"}
        variants += [(m, known) for m in modes]
    return variants


def _harmless(case: Any) -> None:
    """Make a generated exec run ``true`` with the generated words as its arguments.

    The fake driver runs exec commands as host processes, so a generated ``["yes"]`` or
    ``["sleep", "1e9"]`` would really run. Arguments still travel the whole way (API, gRPC,
    agent, driver), which is where odd bytes break things.
    """
    body = case.body
    if case.path.endswith("/exec") and isinstance(body, dict):
        command = body.get("command")
        if isinstance(command, list) and command:
            case.body = {**body, "command": ["true", *command]}


def _fuzz(
    operation: Any,
    mode: GenerationMode,
    path_parameters: dict[str, str] | None,
    headers: dict[str, str],
    found: dict[tuple[str, str, int, str], str],
    verify: str,
) -> int:
    """Send one operation's generated requests; note each new kind of bad response in ``found``.

    Returns how many requests went out.
    """
    calls = 0

    @FUZZ_SETTINGS
    @given(case=operation.as_strategy(generation_mode=mode, path_parameters=path_parameters))
    def exchange(case: Any) -> None:
        nonlocal calls
        calls += 1
        _harmless(case)
        response = case.call(headers=headers, timeout=30, verify=verify)
        problem = contract_violation(response.status_code, _content_type(response), response.text)
        key = (case.method, operation.path, response.status_code, problem or "")
        if problem and key not in found:
            found[key] = _describe(case, response, problem)

    try:
        exchange()
    except Unsatisfiable:
        # Nothing to get wrong (no parameters, no body): no invalid request exists.
        assert mode is GenerationMode.NEGATIVE, operation.label
    return calls


def test_api_answers_every_request_with_a_clear_status(fuzz_cluster: Cluster) -> None:
    schema = schemathesis.openapi.from_url(
        f"{fuzz_cluster.api}/openapi.json", timeout=10, verify=str(fuzz_cluster.ca_path)
    )
    schema.config.update(base_url=fuzz_cluster.api)
    headers = {"Authorization": f"Bearer {fuzz_cluster.token}"}
    found: dict[tuple[str, str, int, str], str] = {}  # the first example of each kind
    operations = []
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), f"the master's OpenAPI is broken: {result.err()}"
        if (result.ok().method.upper(), result.ok().path) not in NOT_FUZZED:
            operations.append(result.ok())
    assert len(operations) >= 10, "the schema lost its routes"
    calls = 0
    for operation in operations:
        for mode, path_parameters in _variants(operation.method, operation.path):
            calls += _fuzz(
                operation, mode, path_parameters, headers, found, str(fuzz_cluster.ca_path)
            )
    assert calls >= len(operations) * EXAMPLES_PER_OPERATION // 2
    assert not found, f"{len(found)} kinds of bad response:\n\n" + "\n\n".join(found.values())
