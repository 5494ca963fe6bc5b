"""Scale: hollow workers, paginated and filtered listings (real processes on loopback)."""

from __future__ import annotations

from harness import Cluster, wait_until


def _simulated(cluster: Cluster, count: int, *extra: str) -> None:
    """``worker --simulate count`` as one process, its nodes sim-0... all Ready."""
    token = cluster.ok("token", "create", "--uses", str(count)).out.strip()
    cluster.start_worker(
        "sim", "--simulate", str(count), "--listen", "127.0.0.1:0", *extra, token=token,
        wait=False,
    )  # fmt: skip

    def ready() -> bool:
        nodes = cluster.ok("nodes", "--format", "json").json()
        return len(nodes) == count and all(node["status"] == "Ready" for node in nodes)

    wait_until(ready, timeout=120)


def test_hollow_workers_are_nodes_of_their_own(cluster: Cluster) -> None:
    cluster.start_master()
    _simulated(cluster, 3)
    nodes = cluster.ok("nodes", "--format", "json").json()
    assert [node["name"] for node in nodes] == ["sim-0", "sim-1", "sim-2"]
    assert len({node["id"] for node in nodes}) == 3
    assert len({node["address"] for node in nodes}) == 3  # each its own agent listener
    for index in range(3):  # each its own identity and certificate in its own data dir
        assert (cluster.root / "sim" / f"sim-{index}" / "node.json").exists()
        assert (cluster.root / "sim" / f"sim-{index}" / "pki" / "node.crt").exists()

    for index in range(6):
        cluster.ok("launch", "--name", f"vm-{index}", "--cpus", "1", "--memory", "1G")
    instances = cluster.instances()
    assert all(item["state"] == "Running" for item in instances.values())
    assert sorted(item["node"] for item in instances.values()) == [
        "sim-0", "sim-0", "sim-1", "sim-1", "sim-2", "sim-2",
    ]  # fmt: skip
    # A simulated node's agent runs the calls of real ones: exec reaches it.
    assert cluster.ok("exec", "vm-0", "--", "echo", "hello").out.strip() == "hello"
    cluster.ok("delete", "vm-1")
    assert "vm-1" not in cluster.instances()


def test_simulate_refuses_a_real_driver(cluster: Cluster) -> None:
    result = cluster.cli(
        "worker", "--master", "127.0.0.1:1", "--simulate", "2", "--driver", "qemu",
        "--data-dir", str(cluster.root / "sim"),
    )  # fmt: skip
    assert result.code != 0 and "fake driver" in result.err
    assert not (cluster.root / "sim").exists()
