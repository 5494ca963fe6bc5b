"""Environments (`apply -f`): the file's rules alone, then a master and three fake-driver
workers driven by the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from harness import Cluster, wait_until

from multiverse.core.environment import (
    CLOUD_INIT_LABEL,
    ENV_LABEL,
    GROUP_LABEL,
    StepKind,
    parse_document,
    parse_yaml,
    plan,
    render,
)
from multiverse.core.errors import Conflict, InvalidArgument
from multiverse.core.model import DesiredState, Instance, InstanceSpec, InstanceState
from multiverse.core.sizes import GiB, MiB

LAB = """\
name: lab
instances:
  - name: db
    memory: 512M
    disk: 1G
  - name: web-{n}
    count: COUNT
    spread: true
    memory: 512M
    disk: 1G
    cloud-init: |
      #!/bin/sh
      echo {{ instances.db.ipv4 }} > /tmp/db
      echo {{ member.name }} of {{ env.name }}
"""


def _no_files(name: str) -> str:
    raise AssertionError(f"read {name}")


def lab(count: int = 2) -> str:
    return LAB.replace("COUNT", str(count))


# ---- the file, alone ----


def test_groups_expand_and_templates_order_creation() -> None:
    spec = parse_yaml(lab(), "lab.yaml", read=_no_files)
    assert [m.name for m in spec.members] == ["db", "web-1", "web-2"]
    web = spec.member("web-2")
    assert (web.group, web.n, web.spread, web.memory, web.disk) == ("web", 2, True, 512 * MiB, GiB)
    assert web.after == {"db"} and spec.member("db").after == frozenset()
    assert [[m.name for m in level] for level in spec.levels()] == [["db"], ["web-1", "web-2"]]
    facts = {"db": {"name": "db", "ipv4": "10.1.2.3", "node": "n1"}}
    assert render(spec, web, facts) == "#!/bin/sh\necho 10.1.2.3 > /tmp/db\necho web-2 of lab\n"
    # The API's body parses to the same spec.
    assert parse_document(spec.document) == spec


def test_a_member_named_first_in_the_file_is_created_after_what_it_names() -> None:
    text = """\
name: k3s
instances:
  - name: agent-{n}
    count: 2
    cloud-init: |
      server={{ instances.server.ipv4 }} peers={{ groups.db | map(attribute='name') | join(',') }}
  - name: server
    cloud-init: server.yaml
  - name: db-{n}
    count: 2
"""
    spec = parse_yaml(text, "k3s.yaml", read=lambda name: f"#!/bin/sh\n# {name}\n")
    assert [m.name for m in spec.members] == ["server", "db-1", "db-2", "agent-1", "agent-2"]
    assert spec.member("agent-1").after == {"server", "db-1", "db-2"}
    assert spec.member("server").cloud_init == "#!/bin/sh\n# server.yaml\n"
    facts = {
        name: {"name": name, "ipv4": f"10.0.0.{i}", "node": "n"}
        for i, name in enumerate(["server", "db-1", "db-2"])
    }
    assert render(spec, spec.member("agent-2"), facts) == "server=10.0.0.0 peers=db-1,db-2\n"


BAD_FILES = [
    (  # unknown key, pointed at the key
        "name: x\ninstances:\n  - name: a\n    cpu: 2\n",
        "x.yaml:4:5: unknown key 'cpu'; did you mean 'cpus'?",
    ),
    (
        "name: x\nflavour: big\ninstances:\n  - name: a\n",
        "x.yaml:2:1: unknown key 'flavour'",
    ),
    (  # a bad size, pointed at the value
        "name: x\ninstances:\n  - name: a\n    memory: 2X\n",
        "x.yaml:4:13: invalid size '2X'",
    ),
    (
        "name: x\ninstances:\n  - name: a\n    disk: 2P\n",
        "x.yaml:4:11: disk must be between",
    ),
    (
        "name: x\ninstances:\n  - name: a\n  - name: b\n  - name: a\n",
        "x.yaml:5:11: duplicate instance name 'a' (also at x.yaml:3:11)",
    ),
    (  # a group's member clashing with a single instance
        "name: x\ninstances:\n  - name: w-{n}\n    count: 2\n  - name: w-2\n",
        "x.yaml:5:11: duplicate instance name 'w-2' (also at x.yaml:3:11)",
    ),
    (  # a group and an instance that would carry the same group label
        "name: x\ninstances:\n  - name: web-{n}\n    count: 2\n  - name: web\n",
        "x.yaml:5:11: group 'web' is also the group of x.yaml:3:11; name them apart",
    ),
    (
        "name: x\ninstances:\n  - name: w-{n}\n    count: 0\n",
        "x.yaml:4:12: count must be a whole number of at least 1, not 0",
    ),
    (  # the line inside a block template
        "name: x\ninstances:\n  - name: a\n  - name: b\n    cloud-init: |\n      #!/bin/sh\n"
        "      echo {{ instances.c.ipv4 }}\n",
        "x.yaml:7:15: template names instance 'c', which the file does not define",
    ),
    (
        "name: x\ninstances:\n  - name: a\n    cloud-init: |\n      {{ groups.web }}\n",
        "x.yaml:5:10: template names group 'web', which the file does not define",
    ),
    (
        "name: x\ninstances:\n  - name: a\n    cloud-init: |\n      {{ instances.a.ipv4 }}\n",
        "x.yaml:4:17: cloud-init templates refer to each other in a cycle: a -> a",
    ),
    (
        "name: x\ninstances:\n  - name: a\n    cloud-init: |\n      {{ instances.b.ipv4 }}\n"
        "  - name: b\n    cloud-init: |\n      {{ instances.a.ipv4 }}\n",
        "x.yaml:4:17: cloud-init templates refer to each other in a cycle: a -> b -> a",
    ),
    (
        "name: x\ninstances:\n  - name: a\n    memory: 1G\n    memory: 2G\n",
        "x.yaml:5:5: duplicate key 'memory'",
    ),
    (
        "name: x\ninstances:\n  - name: a\n    cloud-init: |\n      {% if %}\n",
        "x.yaml:5:7: template: Expected an expression",
    ),
    (
        "name: x\ninstances: [{name: a}\n",
        "x.yaml:3:1: not valid YAML",
    ),
]


@pytest.mark.parametrize(("text", "message"), BAD_FILES)
def test_bad_files_say_what_and_where(text: str, message: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse_yaml(text, "x.yaml", read=_no_files)
    assert caught.value.message.startswith(message), caught.value.message


def test_a_template_file_error_names_that_file_and_line() -> None:
    text = "name: x\ninstances:\n  - name: a\n    cloud-init: a.sh\n"
    with pytest.raises(InvalidArgument, match=r"^a\.sh:3:9: template names instance 'nope'"):
        parse_yaml(text, "x.yaml", read=lambda _: "#!/bin/sh\n\necho {{ instances.nope.name }}\n")

    def missing(name: str) -> str:
        raise FileNotFoundError(2, "No such file or directory")

    with pytest.raises(InvalidArgument, match=r"^x\.yaml:4:17: cannot read cloud-init file"):
        parse_yaml(text, "x.yaml", read=missing)


def test_the_api_body_gets_paths_instead_of_lines() -> None:
    with pytest.raises(InvalidArgument, match=r"instances\[0\]\.count: count must be"):
        parse_document({"name": "x", "instances": [{"name": "a-{n}", "count": 0}]})


def _instance(name: str, memory: int = 512 * MiB, **labels: str) -> Instance:
    spec = InstanceSpec(name, memory=memory, disk=GiB, labels=labels)
    return Instance(name, spec, "node", DesiredState.RUNNING, InstanceState.RUNNING)


def test_plan_creates_what_is_missing_and_refuses_changes_in_place() -> None:
    spec = parse_yaml(lab(), "lab.yaml", read=_no_files)
    digest = spec.member("web-1").labels[CLOUD_INIT_LABEL]
    ours = {ENV_LABEL: "lab", GROUP_LABEL: "web", CLOUD_INIT_LABEL: digest}
    db = _instance("db", **{ENV_LABEL: "lab", GROUP_LABEL: "db"})
    web1 = _instance("web-1", **ours)
    assert [(s.kind, s.name) for s in plan(spec, [db, web1]).steps] == [(StepKind.CREATE, "web-2")]
    web2 = _instance("web-2", **ours)
    assert plan(spec, [db, web1, web2]).steps == ()
    # One more member than the file lists: kept, unless pruned.
    web3 = _instance("web-3", **ours)
    kept = plan(spec, [db, web1, web2, web3])
    assert kept.steps == () and kept.kept == ("web-3",)
    pruned = plan(spec, [db, web1, web2, web3], prune=True)
    assert [(s.kind, s.name) for s in pruned.steps] == [(StepKind.DELETE, "web-3")]
    # A size change is refused, or (--recreate) done by deleting and creating.
    bigger = _instance("web-2", memory=GiB, **ours)
    with pytest.raises(Conflict, match=r"web-2: memory 1\.0GiB -> 512\.0MiB.*delete and re-create"):
        plan(spec, [db, web1, bigger])
    again = plan(spec, [db, web1, bigger], recreate=True)
    assert [(s.kind, s.name) for s in again.steps] == [(StepKind.RECREATE, "web-2")]
    # A changed template is a change only re-creating makes.
    with pytest.raises(Conflict, match="cloud-init changed"):
        plan(spec, [db, web1, _instance("web-2", **{**ours, CLOUD_INIT_LABEL: "0" * 16})])
    # A stopped member the file wants running is started.
    stopped = _instance("web-2", **ours)
    stopped.desired = DesiredState.STOPPED
    assert [s.kind for s in plan(spec, [db, web1, stopped]).steps] == [StepKind.START]
    # An instance of that name outside the environment is never taken over, nor pruned.
    with pytest.raises(Conflict, match="web-2 exists outside environment lab"):
        plan(spec, [db, web1, _instance("web-2")], prune=True)


# ---- the whole stack, fake VMs ----


def test_apply_a_file_across_three_workers(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_master()
    for name in ("node-a", "node-b", "node-c"):
        cluster.start_worker(name, capacity="cpus=4,memory=8G,disk=50G")
    cluster.ok("launch", "--name", "other", "--memory", "512M", "--disk", "1G")
    path = tmp_path / "lab.yaml"
    path.write_text(lab(2))

    diff = cluster.ok("diff", "-f", str(path)).out
    assert diff.splitlines() == [
        "+ create db (tiny, 1 cpus, 512.0MiB memory, 1.0GiB disk)",
        "+ create web-1 (tiny, 1 cpus, 512.0MiB memory, 1.0GiB disk)",
        "+ create web-2 (tiny, 1 cpus, 512.0MiB memory, 1.0GiB disk)",
    ]
    assert set(cluster.instances()) == {"other"}  # a diff changes nothing

    applied = cluster.ok("apply", "-f", str(path))
    assert "+ create web-2" in applied.out and "3 instances as the file says" in applied.out
    members = {
        i["name"]: i for i in cluster.ok("instances", "--env", "lab", "--format", "json").json()
    }
    assert set(members) == {"db", "web-1", "web-2"}
    assert all(i["state"] == "Running" for i in members.values())
    assert members["web-1"]["node"] != members["web-2"]["node"]  # spread
    assert members["web-1"]["labels"][ENV_LABEL] == "lab"
    db_ipv4 = members["db"]["ipv4"]
    assert db_ipv4
    for web in ("web-1", "web-2"):  # the template, filled with the address the table shows
        user_data = cluster.ok("exec", web, "--", "cat", "user-data").out
        assert user_data == f"#!/bin/sh\necho {db_ipv4} > /tmp/db\necho {web} of lab\n"

    again = cluster.ok("apply", "-f", str(path))
    assert "environment lab: nothing to do" in again.out
    assert {
        i["name"]: i["id"]
        for i in cluster.ok("instances", "--env", "lab", "--format", "json").json()
    } == {name: item["id"] for name, item in members.items()}

    # Three members, three nodes: the third goes to the node without one.
    path.write_text(lab(3))
    assert cluster.ok("apply", "-f", str(path)).out.startswith("+ create web-3")
    webs = {n: i["node"] for n, i in cluster.instances().items() if n.startswith("web-")}
    assert sorted(webs.values()) == ["node-a", "node-b", "node-c"]
    # A fourth cannot be spread: refused with the scheduler's reasons, nothing created.
    path.write_text(lab(4))
    refused = cluster.cli("apply", "-f", str(path))
    assert refused.code == 2
    assert "cannot place web-4: no node can hold the instance: node-a: holds web-" in refused.err
    assert "of the same spread group" in refused.err
    assert "web-4" not in cluster.instances()

    # Fewer members: kept without --prune, deleted with it.
    path.write_text(lab(2))
    kept = cluster.ok("apply", "-f", str(path))
    assert "kept, not in the file (--prune deletes them): web-3" in kept.out
    assert "web-3" in cluster.instances()
    pruned = cluster.ok("apply", "-f", str(path), "--prune")
    assert pruned.out.startswith("- delete web-3")
    assert "web-3" not in cluster.instances()

    # The file's state: stopped, then running again.
    path.write_text(lab(2).replace("  - name: db\n", "  - name: db\n    state: stopped\n"))
    assert cluster.ok("apply", "-f", str(path)).out.startswith("~ stop db")
    assert cluster.instances()["db"]["state"] == "Stopped"
    path.write_text(lab(2))
    assert cluster.ok("apply", "-f", str(path)).out.startswith("~ start db")
    assert cluster.instances()["db"]["state"] == "Running"

    # The API checks the body as the CLI checks the file, by path instead of line.
    headers = {"Authorization": f"Bearer {cluster.token}"}
    url = f"{cluster.api}/api/v1/environments/lab"
    bad = {"spec": {"name": "lab", "instances": [{"name": "w-{n}", "count": 0}]}}
    answer = cluster.http.put(url, json=bad, headers=headers)
    assert answer.status_code == 400
    assert answer.json()["error"]["message"] == (
        "instances[0].count: count must be a whole number of at least 1, not 0"
    )
    other = {"spec": {"name": "elsewhere", "instances": [{"name": "a"}]}}
    answer = cluster.http.put(url, json=other, headers=headers)
    assert answer.status_code == 400 and "names environment 'elsewhere'" in answer.text
    dry = cluster.http.put(
        url,
        params={"dry_run": "true"},
        json={
            "spec": {"name": "lab", "instances": [{"name": "db", "memory": "512M", "disk": "1G"}]},
            "prune": True,
        },
        headers=headers,
    )
    assert dry.status_code == 200 and dry.json()["operation"] is None
    assert [(a["action"], a["name"]) for a in dry.json()["actions"]] == [
        ("delete", "web-1"),
        ("delete", "web-2"),
    ]

    # A size change is refused, nothing changes; --recreate makes it anew.
    path.write_text(
        lab(2).replace(
            "memory: 512M\n    disk: 1G\n  - name: web", "memory: 1G\n    disk: 1G\n  - name: web"
        )
    )
    resized = cluster.cli("apply", "-f", str(path))
    assert resized.code == 2 and "db: memory 512.0MiB -> 1.0GiB" in resized.err
    assert "delete and re-create it (apply --recreate does)" in resized.err
    assert cluster.instances()["db"]["memory"] == 512 * MiB
    recreated = cluster.ok("apply", "-f", str(path), "--recreate")
    assert recreated.out.startswith("-/+ recreate db (memory 512.0MiB -> 1.0GiB)")
    db = cluster.instances()["db"]
    assert db["state"] == "Running" and db["memory"] == GiB and db["id"] != members["db"]["id"]

    listed = cluster.ok("envs", "--format", "json").json()
    assert [(e["name"], e["running"]) for e in listed] == [("lab", 3)]
    shown = cluster.ok("get", "env", "lab").out
    assert all(name in shown for name in ("db", "web-1", "web-2"))
    assert cluster.cli("get", "env", "nope").code == 2

    cluster.ok("delete", "-f", str(path))
    assert set(cluster.instances()) == {"other"}
    assert cluster.ok("envs").out.strip() == "No items found."


def test_a_bad_file_is_refused_before_anything_is_sent(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\ninstances:\n  - name: a\n  - name: b-{n}\n    count: 0\n")
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "MULTIVERSE_SERVER": "https://127.0.0.1:1",
    }
    done = subprocess.run(
        [sys.executable, "-m", "multiverse", "apply", "-f", str(path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 1
    assert f"{path}:5:12: count must be a whole number of at least 1, not 0" in done.stderr


# ---- real VMs ----

VM_LAB = """\
name: vm-lab
instances:
  - name: first
    memory: 256M
    disk: 1G
  - name: second
    memory: 256M
    disk: 1G
    cloud-init: |
      #!/bin/sh
      echo {{ instances.first.ipv4 }} > /root/first-address
"""


@pytest.mark.vm
def test_user_data_of_real_vms_gets_the_other_vms_address(
    cluster: Cluster, tmp_path: Path, tiny_image: Path
) -> None:
    cluster.start_master()
    for name in ("node-a", "node-b"):
        cluster.start_worker(name, driver="qemu", capacity="cpus=2,memory=4G,disk=20G")
    path = tmp_path / "vm-lab.yaml"
    path.write_text(VM_LAB)
    cluster.ok("apply", "-f", str(path), timeout=600)
    instances = cluster.instances()
    assert instances["first"]["state"] == instances["second"]["state"] == "Running"
    assert {instances["first"]["node"], instances["second"]["node"]} == {"node-a", "node-b"}
    first_ipv4 = instances["first"]["ipv4"]
    assert first_ipv4

    # The script runs in the background at the first boot: wait for what it writes.
    def written() -> str:
        result = cluster.cli("exec", "second", "--", "cat", "/root/first-address")
        return result.out if result.code == 0 else ""

    assert wait_until(written, timeout=120, interval=1) == f"{first_ipv4}\n"
    log = cluster.ok("logs", "second").out
    assert "multiverse: user-data exited 0" in log
    # Once only: a restart does not run it again.
    cluster.ok("exec", "second", "--", "rm", "/root/first-address")
    cluster.ok("restart", "second", timeout=300)
    assert cluster.cli("exec", "second", "--", "cat", "/root/first-address").code != 0
    assert "nothing to do" in cluster.ok("apply", "-f", str(path)).out
    cluster.ok("delete", "-f", str(path), timeout=300)
    assert cluster.instances() == {}
