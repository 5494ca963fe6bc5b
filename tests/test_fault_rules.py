"""Fault validation and the pure per-node rules (issue 19), without a network."""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from harness import async_wait_until

from multiverse.core.errors import DriverError, InvalidArgument
from multiverse.core.faults import (
    Fault,
    FaultKind,
    LinkRule,
    NodeFaults,
    Placement,
    Shot,
    check_fault,
    node_faults,
    parse_duration,
    resolve_sides,
)
from multiverse.core.model import (
    ENV_LABEL,
    DesiredState,
    Instance,
    InstanceSpec,
    InstanceState,
    Node,
    NodeStatus,
    Resources,
)
from multiverse.core.network import ClusterNetwork, Lease, mac_for
from multiverse.drivers.base import ExecChunk
from multiverse.master.events import EventBus
from multiverse.master.faults import Faults
from multiverse.store.repository import Store
from multiverse.wire import convert
from multiverse.worker.faults import NodeFaultsApplier, render_drops
from multiverse.worker.linkqueue import NF_ACCEPT, NF_DROP, LinkQueue, parse_rate

PLACES = {
    "a": Placement("id-a", "n1", "10.0.0.2"),
    "b": Placement("id-b", "n2", "10.0.0.3"),
    "c": Placement("id-c", "n2", "10.0.0.4"),
}


def partition(one_way: bool = False) -> Fault:
    return Fault("f1", FaultKind.PARTITION, ("a",), ("b", "c"), one_way=one_way)


def test_a_partition_drops_on_each_senders_node_both_ways() -> None:
    assert node_faults([partition()], PLACES, "n1").drops == (
        ("10.0.0.2", "10.0.0.3"), ("10.0.0.2", "10.0.0.4"),
    )  # fmt: skip
    assert node_faults([partition()], PLACES, "n2").drops == (
        ("10.0.0.3", "10.0.0.2"), ("10.0.0.4", "10.0.0.2"),
    )  # fmt: skip
    # b and c, on the same side, keep reaching each other: no pair between them.
    assert node_faults([partition(one_way=True)], PLACES, "n2").drops == ()


def test_a_link_slows_the_receivers_tap_for_the_senders_packets() -> None:
    link = Fault("f2", FaultKind.LINK, ("a",), ("b",), {"delay": "200ms"})
    rule = LinkRule("f2", "id-b", ("10.0.0.2",), (("delay", "200ms"),))
    assert node_faults([link], PLACES, "n2").links == (rule,)
    assert node_faults([link], PLACES, "n1").links == ()
    everyone = Fault("f3", FaultKind.LINK, ("a",), (), {"loss": "5%"})
    assert {r.instance_id for r in node_faults([everyone], PLACES, "n2").links} == {"id-b", "id-c"}


def test_vm_faults_go_to_the_vms_node_only() -> None:
    pause = Fault("f4", FaultKind.PAUSE, ("b",))
    assert [s.instance_id for s in node_faults([pause], PLACES, "n2").shots] == ["id-b"]
    assert node_faults([pause], PLACES, "n1").shots == ()
    everyone = Fault("f5", FaultKind.KILL, ("a", "b", "c"))
    assert [s.instance_id for s in node_faults([everyone], PLACES, "n2").shots] == ["id-b", "id-c"]


LABELS = {
    "a": {ENV_LABEL: "lab", "role": "db"},
    "b": {ENV_LABEL: "lab", "role": "web"},
    "c": {ENV_LABEL: "lab", "role": "db"},
    "d": {ENV_LABEL: "prod"},
}


def test_sides_by_environment_and_label_are_resolved_to_names() -> None:
    assert resolve_sides(["env:lab"], [], LABELS) == (("a", "b", "c"), ())
    assert resolve_sides(["role=db"], ["env:prod"], LABELS) == (("a", "c"), ("d",))
    # A selector never takes what the other side names: a against the rest of its environment.
    assert resolve_sides(["a"], ["env:lab"], LABELS) == (("a",), ("b", "c"))
    assert resolve_sides(["b", "role=web"], ["d"], LABELS) == (("b",), ("d",))  # once each
    # Matched by selectors on both sides: left for check_fault to refuse.
    left, right = resolve_sides(["role=db"], ["env:lab"], LABELS)
    with pytest.raises(InvalidArgument, match="both sides"):
        check_fault(Fault("x", FaultKind.PARTITION, left, right), LABELS)


@pytest.mark.parametrize(
    ("targets", "peers", "message"),
    [
        (["env:nosuch"], [], "no environment nosuch (no instance carries it)"),
        (["role=cache"], [], "no instance matches role=cache"),
        (["a"], ["env:"], "env: needs an environment name"),
        (["=db"], [], "invalid selector"),
    ],
)
def test_selectors_that_match_nothing_are_refused(
    targets: list[str], peers: list[str], message: str
) -> None:
    with pytest.raises(InvalidArgument, match=re.escape(message)):
        resolve_sides(targets, peers, LABELS)


def test_a_partition_of_an_environment_with_one_instance_has_an_empty_side() -> None:
    left, right = resolve_sides(["d"], ["env:prod"], LABELS)
    with pytest.raises(InvalidArgument, match="two non-empty sides"):
        check_fault(Fault("x", FaultKind.PARTITION, left, right), LABELS)


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        (Fault("x", FaultKind.PARTITION, ("a",), ()), "two non-empty sides"),
        (Fault("x", FaultKind.PARTITION, ("a",), ("zz",)), "unknown instance(s): zz"),
        (Fault("x", FaultKind.PARTITION, ("a",), ("a", "b")), "both sides"),
        (Fault("x", FaultKind.LINK, ("a",), ("b",), {"delay": "-5ms"}), "cannot be negative"),
        (Fault("x", FaultKind.LINK, ("a",), ("b",), {}), "at least one of"),
        (Fault("x", FaultKind.LINK, ("a",), ("b",), {"loss": "150%"}), "between 0% and 100%"),
        (Fault("x", FaultKind.LINK, ("a",), ("b",), {"rate": "fast"}), "invalid --rate"),
        (Fault("x", FaultKind.PAUSE, ("a",), ("b",)), "it has no other side"),
        (Fault("x", FaultKind.PAUSE, ("a",), duration=-1), "--duration must be positive"),
        (Fault("x", FaultKind.CLOCK, ("a",), params={"skew": "0s"}), "non-zero --skew"),
        (Fault("x", FaultKind.CLOCK, ("a",)), "--skew (e.g. +5s) and/or --drift"),
        (Fault("x", FaultKind.CLOCK, ("a",), params={"drift": "0ppm"}), "non-zero --drift"),
        (Fault("x", FaultKind.CLOCK, ("a",), params={"drift": "2%"}), "invalid --drift"),
        (Fault("x", FaultKind.DISK, ("a",)), "exactly one of --full or --slow"),
    ],
)
def test_bad_faults_are_refused_with_a_reason(fault: Fault, message: str) -> None:
    with pytest.raises(InvalidArgument, match=re.escape(message)):
        check_fault(fault, PLACES)


def test_durations() -> None:
    assert parse_duration("200ms", "d") == pytest.approx(0.2)
    assert parse_duration("-5s", "skew", signed=True) == -5
    with pytest.raises(InvalidArgument):
        parse_duration("soon", "d")


def test_the_fault_table_goes_away_with_the_last_drop() -> None:
    rules = render_drops((("10.0.0.2", "10.0.0.3"),))
    assert "table bridge multiverse_faults {" in rules
    assert "ip saddr 10.0.0.2 ip daddr 10.0.0.3 drop" in rules
    assert render_drops(()) == (
        "table bridge multiverse_faults\ndelete table bridge multiverse_faults\n"
    )


# ---- the master's service over a real store, with the nodes' agents faked -------------------


class _Agents:
    """Records what each node was sent; ``refuse`` makes a node's agent fail."""

    def __init__(self) -> None:
        self.sent: dict[str, NodeFaults] = {}
        self.refuse: set[str] = set()

    def stub(self, node: Node) -> Any:
        return SimpleNamespace(ApplyFaults=node)

    async def call(self, node: Node, method: Any, request: Any) -> None:
        if node.name in self.refuse:
            raise DriverError("no netem here")
        self.sent[node.name] = convert.faults_from_pb(request)


async def _world(
    tmp_path: Path, labels: dict[str, dict[str, str]] | None = None
) -> tuple[Store, dict[str, Node]]:
    store = Store(f"sqlite:///{tmp_path / 'multiverse.db'}")
    store.migrate()
    nodes = {}
    for name in ("n1", "n2"):
        node = Node(
            str(uuid.uuid4()), name, "127.0.0.1:1", "qemu", NodeStatus.READY, {},
            Resources(2, 2**31, 2**34),  # the store refuses an instance its node has no room for
        )  # fmt: skip
        await store.add_node(node, "")
        nodes[name] = node
    for name, node, address in (("a", "n1", "10.0.0.2"), ("b", "n2", "10.0.0.3")):
        instance = Instance(
            str(uuid.uuid4()), InstanceSpec(name=name, labels=(labels or {}).get(name, {})),
            nodes[node].id, DesiredState.RUNNING, InstanceState.RUNNING,
        )  # fmt: skip
        await store.add_instance(instance, _Fixed(address, instance.id))
    return store, nodes


class _Fixed:
    network = "default"

    def __init__(self, address: str, owner: str) -> None:
        self.address, self.owner = address, owner

    def candidates(self, after: str) -> Iterator[str]:
        yield self.address  # a store that found it taken raises below; these tests never do
        raise AssertionError(f"{self.address} is taken")

    def lease(self, address: str) -> Lease:
        return Lease("default", address, self.owner, "instance", mac_for(self.owner))


def test_the_master_pushes_lists_and_heals_faults_when_they_expire(tmp_path: Path) -> None:
    asyncio.run(_pushes_lists_and_heals(tmp_path))


async def _pushes_lists_and_heals(tmp_path: Path) -> None:
    store, _nodes = await _world(tmp_path)
    store.put_network(ClusterNetwork("default", "10.0.0.0/24"))
    agents, events = _Agents(), EventBus()
    faults = Faults(store, agents, events)  # type: ignore[arg-type]
    seen: list[dict[str, Any]] = []

    async def listen() -> None:
        async for event in events.listen():
            seen.append(event)

    listener = asyncio.create_task(listen())
    await asyncio.sleep(0)
    fault = await faults.add(FaultKind.PARTITION, ("a",), ("b",), duration=0.3)
    assert agents.sent["n1"].drops == (("10.0.0.2", "10.0.0.3"),)
    assert agents.sent["n2"].drops == (("10.0.0.3", "10.0.0.2"),)
    # A new master over the same store (a restart) knows it and heals it on time.
    again = Faults(store, agents, events)  # type: ignore[arg-type]
    assert [f.id for f in await again.in_force()] == [fault.id]
    expiry = asyncio.create_task(again.run())
    try:

        async def healed() -> bool:
            return not await store.list_faults()

        assert await events.wait_for(healed, timeout=10)
        await async_wait_until(lambda: agents.sent["n1"].drops == (), timeout=10)
    finally:
        expiry.cancel()
        listener.cancel()
    assert [(e["action"], e["fault"]["id"]) for e in seen] == [
        ("applied", fault.id), ("expired", fault.id),
    ]  # fmt: skip


def test_a_fault_a_node_refuses_is_undone_everywhere(tmp_path: Path) -> None:
    asyncio.run(_refused(tmp_path))


async def _refused(tmp_path: Path) -> None:
    store, _nodes = await _world(tmp_path)
    agents = _Agents()
    agents.refuse.add("n2")
    faults = Faults(store, agents, EventBus())  # type: ignore[arg-type]
    with pytest.raises(DriverError, match="no netem"):
        await faults.add(FaultKind.LINK, ("a",), ("b",), {"delay": "200ms"})
    assert await store.list_faults() == []
    assert agents.sent["n1"] == NodeFaults(generation=agents.sent["n1"].generation)
    with pytest.raises(InvalidArgument, match="unknown instance"):
        await faults.add(FaultKind.PAUSE, ("nosuch",))


def test_the_master_resolves_selectors_when_the_fault_is_added(tmp_path: Path) -> None:
    asyncio.run(_resolves(tmp_path))


async def _resolves(tmp_path: Path) -> None:
    store, nodes = await _world(tmp_path, labels={"a": {ENV_LABEL: "lab"}, "b": {ENV_LABEL: "lab"}})
    agents, events = _Agents(), EventBus()
    faults = Faults(store, agents, events)  # type: ignore[arg-type]
    cut = await faults.add(FaultKind.PARTITION, ("a",), ("env:lab",))
    assert (cut.targets, cut.peers) == (("a",), ("b",))  # the fault keeps the names
    assert agents.sent["n1"].drops == (("10.0.0.2", "10.0.0.3"),)
    await faults.heal(None)
    killed = await faults.add(FaultKind.KILL, ("env:lab",))
    assert killed.targets == ("a", "b")
    assert [s.instance_id for s in agents.sent["n1"].shots] == [(await store.find_instance("a")).id]
    assert [s.instance_id for s in agents.sent["n2"].shots] == [(await store.find_instance("b")).id]
    await faults.heal(None)
    # Resolved once: an instance that joins the environment later is not hit.
    late = Instance(
        str(uuid.uuid4()), InstanceSpec(name="c", labels={ENV_LABEL: "lab"}), nodes["n2"].id,
        DesiredState.RUNNING, InstanceState.RUNNING,
    )  # fmt: skip
    paused = await faults.add(FaultKind.PAUSE, ("env:lab",))
    await store.add_instance(late, _Fixed("10.0.0.4", late.id))
    assert [f.targets for f in await faults.in_force()] == [paused.targets] == [("a", "b")]
    await faults.heal(None)
    sent = dict(agents.sent)
    for targets, peers, message in [
        (("env:nosuch",), (), "no environment nosuch"),
        (("role=db",), (), "no instance matches role=db"),
        (("a", "b", "c"), ("env:lab",), "two non-empty sides"),
    ]:
        kind = FaultKind.PARTITION if peers else FaultKind.KILL
        with pytest.raises(InvalidArgument, match=message):
            await faults.add(kind, targets, peers)
        assert await store.list_faults() == [] and agents.sent == sent  # nothing applied, pushed


class _Driver:
    """Records what the applier does to which VM."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    async def stop(self, vm: SimpleNamespace, force: bool = False) -> None:
        self.calls.append(("stop", vm.name))

    async def pause(self, vm: SimpleNamespace) -> None:
        self.calls.append(("pause", vm.name))

    async def resume(self, vm: SimpleNamespace) -> None:
        self.calls.append(("resume", vm.name))

    async def exec(self, vm: SimpleNamespace, argv: list[str]) -> AsyncIterator[ExecChunk]:
        """A guest without adjtimex: ``command -v`` finds nothing."""
        self.calls.append(("exec", argv[-1]))
        yield ExecChunk(exit_code=1 if "command -v" in argv[-1] else 0)


def test_a_node_applies_one_fault_to_each_of_its_vms_once(tmp_path: Path) -> None:
    asyncio.run(_each_vm_once(tmp_path))


async def _each_vm_once(tmp_path: Path) -> None:
    driver = _Driver()
    vms = {i: SimpleNamespace(name=f"vm-{i}") for i in ("id-b", "id-c")}
    applier = NodeFaultsApplier(driver, vms.get, tmp_path, networked=False)  # type: ignore[arg-type]
    kill = tuple(Shot("f1", FaultKind.KILL, i) for i in vms)
    pause = tuple(Shot("f2", FaultKind.PAUSE, i) for i in vms)
    await applier.converge(NodeFaults(shots=kill + pause, generation=1))
    assert sorted(driver.calls) == [
        ("pause", "vm-id-b"), ("pause", "vm-id-c"), ("stop", "vm-id-b"), ("stop", "vm-id-c"),
    ]  # fmt: skip
    # A restarted agent reads what it did and does not kill again; healing resumes both VMs.
    driver.calls.clear()
    again = NodeFaultsApplier(driver, vms.get, tmp_path, networked=False)  # type: ignore[arg-type]
    await again.converge(NodeFaults(shots=kill + pause, generation=2))
    assert driver.calls == []
    await again.converge(NodeFaults(shots=kill, generation=3))
    assert sorted(driver.calls) == [("resume", "vm-id-b"), ("resume", "vm-id-c")]


def test_the_faults_file_is_written_only_when_what_it_holds_changes(tmp_path: Path) -> None:
    asyncio.run(_written_on_change(tmp_path))


async def _written_on_change(tmp_path: Path) -> None:
    # Every acknowledgement of every report converges: the same faults again write nothing.
    vms = {"id-b": SimpleNamespace(name="vm-b")}
    applier = NodeFaultsApplier(_Driver(), vms.get, tmp_path, networked=False)  # type: ignore[arg-type]
    pause = NodeFaults(shots=(Shot("f1", FaultKind.PAUSE, "id-b"),), generation=1)
    await applier.converge(pause)
    state = tmp_path / "faults.json"
    assert "f1/id-b" in json.loads(state.read_text())["held"]
    state.unlink()
    for _ in range(3):
        await applier.converge(pause)
    assert not state.exists()
    await applier.converge(NodeFaults(generation=2))
    assert json.loads(state.read_text())["held"] == {}


def test_a_restarted_agent_keeps_what_an_older_one_did(tmp_path: Path) -> None:
    asyncio.run(_older_state(tmp_path))


async def _older_state(tmp_path: Path) -> None:
    # An older agent kept its records by fault id alone: they are not done a second time.
    record = {"fault_id": "f1", "kind": "pause", "instance_id": "id-b", "params": []}
    (tmp_path / "faults.json").write_text(json.dumps({"held": {"f1": record}, "generation": 1}))
    driver = _Driver()
    vms = {"id-b": SimpleNamespace(name="vm-b")}
    applier = NodeFaultsApplier(driver, vms.get, tmp_path, networked=False)  # type: ignore[arg-type]
    await applier.converge(NodeFaults(shots=(Shot("f1", FaultKind.PAUSE, "id-b"),), generation=2))
    assert driver.calls == []
    await applier.converge(NodeFaults(generation=3))
    assert driver.calls == [("resume", "vm-b")]


def test_drift_in_a_guest_without_adjtimex_is_refused_clearly(tmp_path: Path) -> None:
    asyncio.run(_no_adjtimex(tmp_path))


async def _no_adjtimex(tmp_path: Path) -> None:
    driver = _Driver()
    vms = {"id-b": SimpleNamespace(name="vm-b")}
    applier = NodeFaultsApplier(driver, vms.get, tmp_path, networked=False)  # type: ignore[arg-type]
    drift = Shot("f1", FaultKind.CLOCK, "id-b", (("drift", "100ppm"),))
    with pytest.raises(DriverError, match="clock: vm-b has no adjtimex"):
        await applier.converge(NodeFaults(shots=(drift,), generation=1))
    assert driver.calls == [("exec", "command -v adjtimex >/dev/null")]  # nothing else ran
    await applier.converge(NodeFaults(generation=2))  # not applied: nothing to undo
    assert len(driver.calls) == 1


def test_the_nfqueue_fallback_gives_each_packet_netems_verdict() -> None:
    """Without netem, the agent's queue reader: paced, then delayed; lost; reordered; no
    duplicates (the verdicts are recorded instead of sent to a kernel queue)."""

    async def verdicts(params: dict[str, str], sizes: list[int]) -> list[Any]:
        queue = LinkQueue(1, params)
        loop = asyncio.get_running_loop()
        sent: list[tuple[int, int]] = []
        queue._loop, queue._verdict = loop, lambda packet, verdict: sent.append((packet, verdict))
        now = loop.time()
        for packet, size in enumerate(sizes):
            queue._schedule(packet, size)
        held = [round(handle.when() - now, 2) for _, handle in sorted(queue._held.items())]
        for handle in queue._held.values():
            handle.cancel()
        return [*sent, *held]

    # 1000 bytes at 8 kbit: a second each on the wire, then 200 ms on the way.
    assert asyncio.run(verdicts({"delay": "200ms", "rate": "8kbit"}, [1000, 1000])) == [1.2, 2.2]
    assert asyncio.run(verdicts({"loss": "100%"}, [60, 60])) == [(0, NF_DROP), (1, NF_DROP)]
    reordered = asyncio.run(verdicts({"delay": "1s", "reorder": "100%"}, [60]))
    assert reordered == [(0, NF_ACCEPT)]  # not delayed: it overtakes those that are
    assert asyncio.run(verdicts({"delay": "1s"}, [60])) == [1.0]
    with pytest.raises(DriverError, match="--duplicate needs the netem qdisc"):
        LinkQueue(1, {"delay": "1s", "duplicate": "1%"})
    assert parse_rate("1mbit") == 1_000_000 and parse_rate("500kbit") == 500_000
