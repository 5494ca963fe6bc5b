"""The ``faults:`` section of an environment file (issue 19): parsed and checked with the
file, run by `multiverse apply` once the environment is up, printed as a timeline."""

from __future__ import annotations

from pathlib import Path

import pytest
from harness import Cluster, wait_until

from multiverse.core.environment import parse_yaml
from multiverse.core.errors import InvalidArgument

ENV = """\
name: chaos
instances:
  - name: node-{n}
    count: 2
    memory: 256M
    disk: 1G
faults:
  - at: 2s
    kill: node-2
    for: 1s
  - at: 0s
    partition: node-1 / node-2
    for: 1s
"""


def _no_files(name: str) -> str:
    raise AssertionError(f"read {name}")


def test_the_schedule_is_parsed_in_time_order_and_checked_against_the_file() -> None:
    spec = parse_yaml(ENV, "chaos.yaml", _no_files)
    assert [(s.at, s.describe()) for s in spec.faults] == [
        (0.0, "partition node-1 / node-2 for 1s"), (2.0, "kill node-2 for 1s"),
    ]  # fmt: skip
    assert "faults" not in spec.document  # the master gets the instances only


def test_a_scheduled_fault_may_select_by_environment_or_group() -> None:
    entry = (
        "  - at: 1s\n    partition: node-1 / env:chaos\n"
        "  - at: 2s\n    pause: multiverse.group=node\n"
    )
    spec = parse_yaml(ENV.split("faults:\n")[0] + "faults:\n" + entry, "chaos.yaml", _no_files)
    assert [s.describe() for s in spec.faults] == [
        "partition node-1 / node-2", "pause node-1,node-2",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("  - at: 1s\n    pause: nosuch\n", "chaos.yaml:8:5: unknown instance(s): nosuch"),
        ("  - at: 1s\n    link: {from: node-1, to: node-2, delay: -5ms}\n", "cannot be negative"),
        ("  - at: 1s\n    partition: node-1 /\n", "two non-empty sides"),
        ("  - at: 1s\n    pause: node-1\n    kill: node-2\n", "exactly one kind"),
        ("  - at: 1s\n    pause: env:other\n", "no environment other"),
    ],
)
def test_a_bad_scheduled_fault_is_refused_with_the_file(entry: str, message: str) -> None:
    text = ENV.split("faults:\n")[0] + "faults:\n" + entry
    with pytest.raises(InvalidArgument, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_yaml(text, "chaos.yaml", _no_files)


def test_apply_runs_the_schedule_and_prints_a_timeline(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_master()
    cluster.start_worker("w1", capacity="cpus=4,memory=8G,disk=50G")
    path = tmp_path / "chaos.yaml"
    # Fake-driver VMs have no cluster network and no reset: the schedule kills only.
    path.write_text(
        ENV.split("faults:\n")[0]
        + "faults:\n  - at: 1s\n    kill: node-2\n    for: 1s\n  - at: 0s\n    kill: node-1\n"
    )
    out = cluster.ok("apply", "-f", str(path), timeout=120).out
    lines = [line for line in out.splitlines() if line.startswith("+") and " fault " in line]
    assert "applied: kill node-1" in lines[0]
    assert "(no duration" in out  # that one stays listed until healed
    assert "applied: kill node-2 for 1s" in lines[1]
    killed = lines[1].split(" fault ")[1].split()[0]
    assert lines[2].endswith(f"fault {killed} healed")
    listed = cluster.ok("fault", "list", "--format", "json").json()
    assert [(f["kind"], f["targets"]) for f in listed] == [("kill", ["node-1"])]
    # Killed (it stopped on its own), not deleted: desired running, the reconciler restarted it.
    for name in ("node-1", "node-2"):
        wait_until(
            lambda n=name: (i := cluster.instances()[n])["state"] == "Running" and i["restarts"],
            timeout=60,
        )
    cluster.ok("fault", "heal", "--all")
    assert cluster.ok("fault", "list", "--format", "json").json() == []


def test_faults_select_instances_by_environment_and_label(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_master()
    cluster.start_worker("w1", capacity="cpus=4,memory=8G,disk=50G")
    path = tmp_path / "chaos.yaml"
    path.write_text(ENV.split("faults:\n")[0])
    cluster.ok("apply", "-f", str(path), timeout=120)
    cluster.ok("launch", "--name", "other", "--memory", "256M", "--disk", "1G")

    def listed() -> list[tuple[str, list[str]]]:
        return [
            (f["kind"], f["targets"])
            for f in cluster.ok("fault", "list", "--format", "json").json()
        ]

    killed = cluster.ok("fault", "kill", "--env", "chaos", "--format", "json").json()
    assert killed["targets"] == ["node-1", "node-2"]  # resolved names, not the selector
    cluster.ok("fault", "heal", "--all")
    cluster.ok("fault", "kill", "multiverse.group=node", "--format", "json")
    assert listed() == [("kill", ["node-1", "node-2"])]
    cluster.ok("fault", "heal", "--all")
    for args, message in [
        (("kill", "--env", "nosuch"), "no environment nosuch (no instance carries it)"),
        (("kill", "role=db"), "no instance matches role=db"),
        (("partition", "node-1,node-2", "--env", "chaos"), "two non-empty sides"),
        (("pause", "other", "--env", "chaos"), "give an instance"),
        (("pause",), "give an instance"),
    ]:
        done = cluster.cli("fault", *args)
        assert done.code != 0 and message in done.err, (args, done.err)
        assert listed() == []
    refused = cluster.http.post(
        f"{cluster.api}/api/v1/faults",
        json={"kind": "partition", "targets": ["node-1"], "peers": ["env:nosuch"]},
        headers={"Authorization": f"Bearer {cluster.token}"},
    )
    assert refused.status_code == 400
    assert refused.json()["error"]["message"] == "no environment nosuch (no instance carries it)"
    assert listed() == []
