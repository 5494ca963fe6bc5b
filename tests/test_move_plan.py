"""The cold move's plan against a fake NodeClient (STYLE §5a): which steps run from which
reality, that a failure before the owner switches rolls back (the target cleaned, the
instance left on its source as the user wanted), and that a move resumes mid-way."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, cast

import pytest

from multiverse.core.errors import Conflict, DriverError, InvalidArgument, MultiverseError
from multiverse.core.model import (
    DesiredState,
    IncomingEndpoint,
    Instance,
    InstanceSpec,
    InstanceState,
    LiveProgress,
    Migration,
    MigrationKind,
    MigrationPhase,
    Node,
    NodeStatus,
    Resources,
)
from multiverse.master.cluster import Agents
from multiverse.master.events import EventBus
from multiverse.master.instances import Instances
from multiverse.master.moves import ColdPlan, LivePlan, Moves
from multiverse.master.operations import Operations
from multiverse.master.plan import execute
from multiverse.master.ports import MoveFile, Observation
from multiverse.master.reconciler import Reconciler
from multiverse.store.repository import Store, now


def run(test: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    """Run an async test in its own event loop (the suite has no asyncio plugin)."""

    @functools.wraps(test)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        asyncio.run(test(*args, **kwargs))  # type: ignore[arg-type]

    return wrapper


class FakeNodes:
    """Each node's instances as observations; records the calls made."""

    def __init__(self) -> None:
        self.vms: dict[str, dict[str, Observation]] = {"a": {}, "b": {}}
        self.calls: list[str] = []
        self.fail_import: MultiverseError | None = None

    async def observe(self, node: Node, instance_id: str) -> Observation | None:
        return self.vms[node.id].get(instance_id)

    async def start(self, node: Node, instance_id: str) -> None:
        self.calls.append(f"start {node.id}")
        self.vms[node.id][instance_id] = Observation(InstanceState.RUNNING, 9)

    async def stop(self, node: Node, instance_id: str) -> None:
        self.calls.append(f"stop {node.id}")
        self.vms[node.id][instance_id] = Observation(InstanceState.STOPPED, 5)

    async def delete(self, node: Node, instance_id: str) -> None:
        self.calls.append(f"delete {node.id}")
        self.vms[node.id].pop(instance_id, None)

    async def export(self, node: Node, instance_id: str, target: Node) -> list[MoveFile]:
        self.calls.append(f"export {node.id}->{target.id}")
        return [MoveFile("disk.img", 100, "ab" * 32)]

    async def import_(self, node, instance, source, files, progress) -> None:  # type: ignore[no-untyped-def]
        self.calls.append(f"import {node.id}")
        await progress(50, 100)
        if self.fail_import:
            raise self.fail_import
        self.vms[node.id][instance.id] = Observation(InstanceState.STOPPED, 1)

    async def abort_import(self, node: Node, instance_id: str) -> None:
        self.calls.append(f"abort {node.id}")
        self.vms[node.id].pop(instance_id, None)

    # live moves
    fail_finish: MultiverseError | None = None

    async def prepare_incoming(self, node, instance, listen_host) -> IncomingEndpoint:  # type: ignore[no-untyped-def]
        self.calls.append(f"prepare {node.id} on {listen_host}")
        self.vms[node.id][instance.id] = Observation(InstanceState.STOPPED, 1)
        return IncomingEndpoint(listen_host, 1, 2, login_key="ssh-ed25519 AAA")

    async def migrate_out(self, node, instance_id, to, progress) -> LiveProgress:  # type: ignore[no-untyped-def]
        self.calls.append(f"migrate {node.id} to {to.tls_hostname[:1]}")
        progress(LiveProgress("migrating", 10, 10, 5, 20))
        return LiveProgress("done", 10, 10, 20, 20, downtime=0.05, host_key="key")

    async def abort_migrate_out(self, node: Node, instance_id: str) -> None:
        self.calls.append(f"abort-out {node.id}")

    async def finish_incoming(self, node: Node, instance_id: str, host_key: str) -> Observation:
        self.calls.append(f"finish {node.id} {host_key}")
        if self.fail_finish:
            raise self.fail_finish
        self.vms[node.id][instance_id] = Observation(InstanceState.RUNNING, 2)
        return self.vms[node.id][instance_id]


async def _setup(
    tmp_path: Path, desired: DesiredState = DesiredState.RUNNING, driver: str = "fake"
) -> tuple[Moves, FakeNodes, Store]:
    store = Store.for_data_dir(tmp_path)
    store.migrate()  # the alembic chain, 0007 (migrations) included
    for node_id in ("a", "b"):
        node = Node(
            id=node_id, name=f"node-{node_id}", address="x:1", driver=driver,
            status=NodeStatus.READY, labels={}, capacity=Resources(4, 8 << 30, 100 << 30),
        )  # fmt: skip
        await store.add_node(node, "")
    await store.add_instance(
        Instance(
            id="i1", spec=InstanceSpec(name="vm"), node_id="a", desired=desired,
            state=InstanceState.RUNNING if desired == DesiredState.RUNNING
            else InstanceState.STOPPED, created_at=now(),
        )
    )  # fmt: skip
    events = EventBus()
    agents = cast(Agents, None)  # the plan speaks to nodes only through the fake
    reconciler = Reconciler(store, agents, events)
    instances = Instances(store, agents, reconciler, Operations(events), events)
    nodes = FakeNodes()
    nodes.vms["a"]["i1"] = Observation(
        InstanceState.RUNNING if desired == DesiredState.RUNNING else InstanceState.STOPPED
    )
    return Moves(store, nodes, instances, poll=0.01, retry_delay=0.01), nodes, store


@run
async def test_a_cold_move_runs_every_step_once_in_order(tmp_path: Path) -> None:
    moves, nodes, store = await _setup(tmp_path)
    migration, operation = await moves.move("vm", "node-b", MigrationKind.COLD)
    assert "i1" in moves.instances.reconciler.paused  # the plan owns it now
    assert (await store.get_node("b")).allocated.cpus == 1  # counted on the target while moving
    await operation.done.wait()
    assert operation.status == "success", operation.error
    assert nodes.calls == [
        "stop a", "export a->b", "import b", "start b", "delete a",
    ]  # fmt: skip
    instance = await store.get_instance("i1")
    assert (instance.node_id, instance.desired) == ("b", DesiredState.RUNNING)
    done = await store.get_migration(migration.id)
    assert done.phase == MigrationPhase.DONE and done.bytes_done == done.bytes_total == 100
    assert "i1" not in moves.instances.reconciler.paused
    assert (await store.get_node("b")).allocated.cpus == 1
    assert (await store.get_node("a")).allocated.cpus == 0


@run
async def test_a_stopped_instance_is_not_started_on_the_target(tmp_path: Path) -> None:
    moves, nodes, store = await _setup(tmp_path, DesiredState.STOPPED)
    _migration, operation = await moves.move("vm", "node-b")
    await operation.done.wait()
    assert nodes.calls == ["export a->b", "import b", "delete a"]
    assert (await store.get_instance("i1")).state == InstanceState.STOPPED


@pytest.mark.parametrize(
    ("on_source", "on_target", "owner", "expected"),
    [
        (InstanceState.RUNNING, None, "a", "stop-on-source"),
        (InstanceState.STOPPED, None, "a", "transfer"),
        (InstanceState.STOPPED, InstanceState.STOPPED, "a", "switch-owner"),
        (InstanceState.STOPPED, InstanceState.STOPPED, "b", "start-on-target"),
        (InstanceState.STOPPED, InstanceState.RUNNING, "b", "delete-on-source"),
        (None, InstanceState.RUNNING, "b", None),
    ],
)
@run
async def test_the_plan_resumes_from_reality(
    tmp_path: Path,
    on_source: InstanceState | None,
    on_target: InstanceState | None,
    owner: str,
    expected: str | None,
) -> None:
    moves, nodes, store = await _setup(tmp_path)
    migration = await store.add_migration(
        Migration(id="m1", instance_id="i1", kind=MigrationKind.COLD, source_id="a",
                  target_id="b", desired_after=DesiredState.RUNNING)
    )  # fmt: skip
    nodes.vms = {"a": {}, "b": {}}
    if on_source:
        nodes.vms["a"]["i1"] = Observation(on_source)
    if on_target:
        nodes.vms["b"]["i1"] = Observation(on_target)
    await store.update_instance("i1", node_id=owner)
    steps = [s for s in await ColdPlan(moves, migration.id).steps() if await s.should_do()]
    assert (steps[0].name if steps else None) == expected


@run
async def test_a_failed_transfer_rolls_back_to_the_source(tmp_path: Path) -> None:
    moves, nodes, store = await _setup(tmp_path)
    nodes.fail_import = DriverError("disk.img arrived damaged (sha256 differs)")
    migration, operation = await moves.move("vm", "node-b")
    await operation.done.wait()
    assert operation.status == "failure" and "rolled back" in operation.error
    assert nodes.calls.count("import b") == moves.retry_limit
    assert nodes.calls[-1] == "abort b" and nodes.vms["b"] == {}
    instance = await store.get_instance("i1")
    # Still the source's, still wanted running: the reconciler starts it there again.
    assert (instance.node_id, instance.desired) == ("a", DesiredState.RUNNING)
    assert (await store.get_migration(migration.id)).phase == MigrationPhase.FAILED
    assert "i1" not in moves.instances.reconciler.paused
    assert (await store.get_node("b")).allocated.cpus == 0  # the reservation is gone


@run
async def test_a_second_move_of_a_moving_instance_is_refused(tmp_path: Path) -> None:
    moves, _nodes, store = await _setup(tmp_path)
    _migration, operation = await moves.move("vm", "node-b")
    with pytest.raises(MultiverseError, match="being moved"):
        await moves.move("vm", "node-b")
    with pytest.raises(MultiverseError, match="being moved"):
        await moves.instances.stop("vm")
    await operation.done.wait()
    assert (await store.get_instance("i1")).node_id == "b"


# ---- live moves ----

NODE_B = "00000000-0000-4000-8000-00000000000b"


async def _live_setup(tmp_path: Path) -> tuple[Moves, FakeNodes, Store]:
    """Two qemu nodes; the target's id is a uuid, as the TLS name it must show is made of it."""
    moves, nodes, store = await _setup(tmp_path, driver="qemu")
    target = await store.get_node("b")
    await store.add_node(dataclasses.replace(target, id=NODE_B, name="node-c"), "")
    nodes.vms[NODE_B] = {}
    return moves, nodes, store


@run
async def test_a_live_move_hands_over_then_cleans_the_source(tmp_path: Path) -> None:
    moves, nodes, store = await _live_setup(tmp_path)
    migration, operation = await moves.move("vm", "node-c", MigrationKind.LIVE)
    await operation.done.wait()
    assert operation.status == "success", operation.error
    # The target listens on its agent's host; the source checks the target's certificate name.
    assert nodes.calls == [
        "prepare 00000000-0000-4000-8000-00000000000b on x", "migrate a to 0",
        "finish 00000000-0000-4000-8000-00000000000b key", "delete a",
    ]  # fmt: skip
    assert (await store.get_instance("i1")).node_id == NODE_B
    figures = operation.json()["figures"]
    assert figures["kind"] == "live" and figures["phase"] == "done"
    assert figures["memory_bytes_sent"] == 20 and figures["disk_bytes_sent"] == 10
    assert figures["downtime_ms"] >= 50  # QEMU's downtime, and until the target ran
    assert (await store.get_migration(migration.id)).bytes_done == 10


@pytest.mark.parametrize(
    ("on_target", "owner", "expected"),
    [
        (None, "a", "transfer-live"),
        (InstanceState.STOPPED, "a", "transfer-live"),  # an incoming VM: sent again
        (InstanceState.RUNNING, "a", "hand-over"),  # handed over: only forward
        (InstanceState.RUNNING, NODE_B, "hand-over"),  # switched already: the source goes
    ],
)
@run
async def test_the_live_plan_resumes_from_reality(
    tmp_path: Path, on_target: InstanceState | None, owner: str, expected: str
) -> None:
    moves, nodes, store = await _live_setup(tmp_path)
    migration = await store.add_migration(
        Migration(id="m1", instance_id="i1", kind=MigrationKind.LIVE, source_id="a",
                  target_id=NODE_B, desired_after=DesiredState.RUNNING)
    )  # fmt: skip
    if on_target:
        nodes.vms[NODE_B]["i1"] = Observation(on_target)
    await store.update_instance("i1", node_id=owner)
    steps = [s for s in await LivePlan(moves, migration.id).steps() if await s.should_do()]
    assert steps[0].name == expected
    if expected == "hand-over":  # the owner switches (if it did not) and the source copy goes
        nodes.calls.clear()
        await steps[0].do()
        await steps[0].verify()
        assert (await store.get_instance("i1")).node_id == NODE_B
        assert nodes.calls == ["delete a"] and "i1" not in nodes.vms["a"]


@run
async def test_a_failed_hand_over_lets_the_source_run_on_at_once(tmp_path: Path) -> None:
    moves, nodes, store = await _live_setup(tmp_path)
    nodes.fail_finish = DriverError("the target's agent went away")
    _migration, operation = await moves.move("vm", "node-c", MigrationKind.LIVE)
    await operation.done.wait()
    assert operation.status == "failure" and "rolled back" in operation.error
    finishes = [i for i, call in enumerate(nodes.calls) if call.startswith("finish")]
    assert len(finishes) == moves.retry_limit
    assert all(nodes.calls[i + 1] == "abort-out a" for i in finishes)  # before anything else
    assert nodes.calls[-1] == f"abort {NODE_B}" and nodes.vms[NODE_B] == {}
    assert (await store.get_instance("i1")).node_id == "a"


@run
async def test_live_moves_that_cannot_work_are_refused_up_front(tmp_path: Path) -> None:
    moves, nodes, store = await _setup(tmp_path)  # fake nodes: no live moves
    with pytest.raises(InvalidArgument, match="cannot move instances live; use --cold"):
        await moves.move("vm", "node-b", MigrationKind.LIVE)
    await store.update_instance("i1", state=InstanceState.STOPPED)
    with pytest.raises(Conflict, match="needs it Running"):
        await moves.move("vm", "node-b", MigrationKind.LIVE)
    assert nodes.calls == [] and await store.list_migrations(active=True) == []


@run
async def test_a_driver_that_cannot_move_disks_is_refused_before_any_stop(tmp_path: Path) -> None:
    moves, nodes, store = await _setup(tmp_path, driver="multipass")
    with pytest.raises(InvalidArgument, match="multipass driver cannot move instances"):
        await moves.move("vm", "node-b", MigrationKind.COLD)
    assert nodes.calls == [] and await store.list_migrations(active=True) == []


@run
async def test_a_final_step_ends_its_plan_without_another_look() -> None:
    """The last step of a plan, checked out, ends it: a look at every party after it would
    find nothing left to do, and costs a live move's hand-over a round of questions."""
    looks = 0
    done: list[str] = []

    @dataclasses.dataclass
    class Step:
        name: str
        final: bool = False

        async def should_do(self) -> bool:
            return self.name not in done

        async def do(self) -> None:
            done.append(self.name)

        async def verify(self) -> None:
            pass

    class Plan:
        name = "test"

        async def steps(self) -> list[Step]:
            nonlocal looks
            looks += 1
            return [Step("first"), Step("last", final=True)]

    assert await execute(Plan()) == ["first", "last"]
    assert looks == 2  # before each step; none after the final one
