"""The store's behaviour, the same on SQLite and on PostgreSQL (a private cluster)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import delete, event, select

from multiverse.core.errors import AlreadyExists, NotFound, Unschedulable
from multiverse.core.model import (
    DesiredState,
    Instance,
    InstanceSpec,
    InstanceState,
    Node,
    NodeStatus,
    Resources,
    Usage,
)
from multiverse.store import repository
from multiverse.store.repository import Change, Store
from multiverse.store.schema import ImageLocationRow, InstanceRow


def _node(index: int, **labels: str) -> Node:
    return Node(f"n{index}", f"node-{index}", "127.0.0.1:1", "fake", NodeStatus.READY, labels,
                Resources(8, 8 << 30, 100 << 30))  # fmt: skip


def _instance(index: int, node: int, **labels: str) -> Instance:
    spec = InstanceSpec(name=f"vm-{index:02d}", cpus=1, memory=1 << 30, disk=1 << 30,
                        labels=labels)  # fmt: skip
    return Instance(f"i{index}", spec, f"n{node}", DesiredState.RUNNING, InstanceState.SCHEDULED)


def _run(db_url: str, scenario: Callable[[Store], Awaitable[None]]) -> None:
    store = Store(db_url)
    store.migrate()
    store.migrate()  # a no-op the second time

    async def run() -> None:
        await scenario(store)

    try:
        asyncio.run(run())
    finally:
        store.close()


def test_nodes_usage_labels_and_pages(db_url: str) -> None:
    async def scenario(store: Store) -> None:
        for index in range(3):
            await store.add_node(_node(index, zone="a" if index < 2 else "b"), f"serial{index}")
        with pytest.raises(AlreadyExists):
            await store.add_node(
                Node("other", "node-0", "", "fake", NodeStatus.JOINING, {}, Resources()), ""
            )
        await store.update_node("n1", admin_labels={"zone": "c"})  # an admin's label wins
        for index in range(5):
            await store.add_instance(_instance(index, index % 2))
        node = await store.get_node("n0")
        assert node.instance_count == 3 and node.allocated == Resources(3, 3 << 30, 3 << 30)
        assert node.free.cpus == 5
        assert (await store.find_node("node-2")).instance_count == 0
        with pytest.raises(NotFound):
            await store.get_node("nope")
        names = [n.name for n in await store.list_nodes(labels={"zone": "a"})]
        assert names == ["node-0"]
        assert [n.name for n in await store.list_nodes(labels={"zone": "c"})] == ["node-1"]
        page = await store.list_nodes(after="node-0", limit=1)
        assert [n.name for n in page] == ["node-1"]

        await store.remove_node("n2")
        assert await store.revoked_serials() == {"serial2"}
        assert [n.name for n in await store.list_nodes()] == ["node-0", "node-1"]

    _run(db_url, scenario)


def test_heartbeats_reach_ready_nodes_only_and_name_the_others(db_url: str) -> None:
    async def scenario(store: Store) -> None:
        await store.add_node(_node(0), "serial0")
        await store.add_node(_node(1), "serial1")
        await store.update_node("n1", status=NodeStatus.NOT_READY)  # found silent meanwhile
        at = repository.now()
        beat = repository.Heartbeat(at, Resources(4, 4 << 30, 50 << 30), Usage(0.5, 1 << 20, 2))
        stale = await store.take_heartbeats({"n0": beat, "n1": beat, "gone": beat})
        assert stale == ["gone", "n1"]
        ready, silent = await store.list_nodes(ids=["n0", "n1"])
        assert ready.last_sync == at and silent.last_sync is None
        assert ready.capacity == beat.capacity and ready.used == beat.used
        assert silent.capacity == Resources(8, 8 << 30, 100 << 30) and silent.used == Usage()
        assert silent.status == NodeStatus.NOT_READY and ready.status == NodeStatus.READY
        assert await store.take_heartbeats({}) == []
        # The health check's question: who, of these statuses, has not been heard from since?
        later = at + timedelta(seconds=1)
        assert [n.id for n in await store.list_nodes(silent={NodeStatus.READY: at})] == []
        assert [n.id for n in await store.list_nodes(silent={NodeStatus.READY: later})] == ["n0"]
        both = {NodeStatus.READY: later, NodeStatus.NOT_READY: at}
        assert [n.id for n in await store.list_nodes(silent=both)] == ["n0", "n1"]
        assert await store.list_nodes(silent={}) == []

    _run(db_url, scenario)


def test_reads_go_on_while_instance_writes_wait_their_turn(db_url: str) -> None:
    # Instance writes wait for each other on the event loop, not on the pool's threads: more
    # of them waiting than the pool has threads must leave a thread for a read.
    async def scenario(store: Store) -> None:
        await store.add_node(_node(0), "serial0")
        await store.add_instance(_instance(0, 0))
        store._instance_writes.acquire()  # a write that takes its time, holding the others
        try:
            writes = [
                asyncio.ensure_future(store.update_instance("i0", message=f"write {index}"))
                for index in range(2 * repository.THREADS)
            ]
            node = await asyncio.wait_for(store.get_node("n0"), timeout=30)
            assert node.instance_count == 1 and not any(write.done() for write in writes)
        finally:
            store._instance_writes.release()
        await asyncio.gather(*writes)
        assert (await store.get_instance("i0")).message.startswith("write ")

    _run(db_url, scenario)


def test_instances_filters_pages_reports(db_url: str) -> None:
    async def scenario(store: Store) -> None:
        await store.add_node(_node(0), "")
        await store.add_node(_node(1), "")
        for index in range(6):
            await store.add_instance(_instance(index, index % 2, tier="web" if index % 3 else "db"))
        with pytest.raises(AlreadyExists):
            await store.add_instance(_instance(0, 1))

        first = await store.list_instances(limit=4)
        rest = await store.list_instances(after=first[-1].name, limit=4)
        assert [i.name for i in first + rest] == [f"vm-{i:02d}" for i in range(6)]
        on_one = await store.list_instances(node_name="node-1")
        assert [i.name for i in on_one] == ["vm-01", "vm-03", "vm-05"]
        assert [i.name for i in await store.list_instances(labels={"tier": "db"})] == [
            "vm-00", "vm-03",
        ]  # fmt: skip

        async def report(
            reported: list[dict[str, Any]], removed: list[str] | None = None
        ) -> list[Change]:
            taken = await store.take_report(
                "n0", capacity=Resources(8, 8 << 30, 100 << 30), used=Usage(1, 2, 3),
                reported=reported, removed=removed, image_digests=["sha256:" + "a" * 64],
            )  # fmt: skip
            assert taken.name == "node-0"
            return taken.changes

        # A full report: newer versions win, older ones are ignored, a deleted one goes.
        reported = [
            {"id": "i0", "state": "Running", "ipv4": "10.0.0.2", "message": "", "version": 3,
             "release": "tiny"},
            {"id": "i2", "state": "Creating", "ipv4": "", "message": "", "version": 1,
             "release": ""},
        ]  # fmt: skip
        changes = await report(reported)
        assert sorted(changes, key=lambda c: c.name) == [
            Change("i0", "vm-00", "Scheduled", "Running"),
            Change("i2", "vm-02", "Scheduled", "Creating"),
        ]
        assert (await store.get_node("n0")).used == Usage(1, 2, 3)
        stale = [{**reported[0], "state": "Stopped", "version": 2}]
        assert await report(stale) == []
        assert (await store.get_instance("i0")).state == InstanceState.RUNNING
        assert [i.name for i in await store.list_instances(state=InstanceState.RUNNING)] == [
            "vm-00"
        ]
        # A delta: what it does not name stays as it was, even an instance being deleted.
        await store.update_instance("i4", desired=DesiredState.DELETED)
        newer = [{**reported[1], "state": "Running", "version": 2}]
        assert await report(newer, removed=[]) == [Change("i2", "vm-02", "Creating", "Running")]
        assert (await store.get_instance("i4")).desired == DesiredState.DELETED
        gone = await report([], removed=["i4"])  # the node says it went
        assert gone == [Change("i4", "vm-04", "Scheduled", "")]
        with pytest.raises(NotFound):
            await store.get_instance("i4")
        await store.update_instance("i2", desired=DesiredState.DELETED)
        assert await report(reported[:1]) == [Change("i2", "vm-02", "Running", "")]  # full

        marked = await store.mark_node_instances("n1", InstanceState.UNKNOWN, "node Down")
        assert len(marked) == 3
        assert (await store.find_instance("vm-01")).message == "node Down"

    _run(db_url, scenario)


def test_a_report_sets_the_nodes_images_unless_it_brings_none(db_url: str) -> None:
    # None: the master knows they did not change since the last report it took (no read, no
    # write); a list, even empty, is what the node holds now.
    async def scenario(store: Store) -> None:
        await store.add_node(_node(0), "")

        def held() -> set[str]:
            at_node = select(ImageLocationRow.digest).where(ImageLocationRow.node_id == "n0")
            with store.engine.connect() as connection:
                return set(connection.scalars(at_node))

        async def report(digests: list[str] | None) -> None:
            await store.take_report(
                "n0", capacity=Resources(8, 8 << 30, 100 << 30), used=Usage(), reported=[],
                removed=[], image_digests=digests,
            )  # fmt: skip

        a, b = "sha256:" + "a" * 64, "sha256:" + "b" * 64
        await report([a, b])
        assert held() == {a, b}
        await report(None)
        assert held() == {a, b}
        await report([b])
        assert held() == {b}
        await report([])
        assert held() == set()

    _run(db_url, scenario)


def test_reports_arriving_together_are_taken_in_one_commit_each_with_its_own_answer(
    db_url: str,
) -> None:
    async def scenario(store: Store) -> None:
        for index in range(3):
            await store.add_node(_node(index), "")
            await store.add_instance(_instance(index, index))
        commits: list[object] = []
        event.listen(store.engine, "commit", commits.append)

        async def report(node: str, instance: str) -> Any:
            item = {"id": instance, "state": "Running", "ipv4": "", "message": "", "version": 1,
                    "release": ""}  # fmt: skip
            return await store.take_report(
                node, capacity=Resources(8, 8 << 30, 100 << 30), used=Usage(),
                reported=[item], removed=[], image_digests=None,
            )  # fmt: skip

        # The first takes its own report at once; the three that arrive meanwhile wait for
        # it and are taken together: two commits, not four. A node removed meanwhile (n9 never
        # existed) fails its own report only.
        taken = await asyncio.gather(
            report("n0", "i0"), report("n1", "i1"), report("n9", "i9"), report("n2", "i2"),
            return_exceptions=True,
        )  # fmt: skip
        assert len(commits) == 2
        assert isinstance(taken[2], NotFound)
        assert [(t.name, t.changes) for t in (taken[0], taken[1], taken[3])] == [
            (f"node-{index}", [Change(f"i{index}", f"vm-{index:02d}", "Scheduled", "Running")])
            for index in range(3)
        ]
        assert {i.state for i in await store.list_instances()} == {InstanceState.RUNNING}

    _run(db_url, scenario)


def test_tokens(db_url: str) -> None:
    async def scenario(store: Store) -> None:
        await store.add_token("t1", "join", "hash", uses_left=1)
        assert await store.consume_token_use("t1")
        assert not await store.consume_token_use("t1")
        assert not await store.consume_token_use("nope")
        await store.revoke_token("t1")
        token = await store.get_token("t1")
        assert token is not None and token["revoked"] and token["uses_left"] == 0
        assert [t["id"] for t in await store.list_tokens("join")] == ["t1"]

    _run(db_url, scenario)


def test_a_token_read_recently_serves_requests_until_revoked_here(db_url: str) -> None:
    """The API's reads of its tokens (max_age): another master's revocation shows once the
    record is older than max_age; this master's own, at once."""

    async def scenario(store: Store) -> None:
        other = Store(db_url)  # a second master on the same database
        try:
            await store.add_token("t1", "api", "hash", role="admin")
            await store.add_token("t2", "api", "hash", role="admin")
            for token_id in ("t1", "t2"):
                fresh = await store.get_token(token_id, max_age=3600)
                assert fresh is not None and not fresh["revoked"]
            await other.revoke_token("t1")
            remembered = await store.get_token("t1", max_age=3600)
            assert remembered is not None and not remembered["revoked"]
            current = await store.get_token("t1")  # no max_age: the store's word
            assert current is not None and current["revoked"]
            await store.revoke_token("t2")
            revoked_here = await store.get_token("t2", max_age=3600)
            assert revoked_here is not None and revoked_here["revoked"]
            assert await store.get_token("nope", max_age=3600) is None
            await store.add_token("nope", "api", "hash", role="viewer")
            assert await store.get_token("nope", max_age=3600) is not None  # misses not kept
        finally:
            other.close()

    _run(db_url, scenario)


def test_usage_is_kept_on_the_node_and_concurrent_placements_cannot_overfill(
    db_url: str,
) -> None:
    async def scenario(store: Store) -> None:
        small = Node("s", "small", "", "fake", NodeStatus.READY, {}, Resources(2, 8 << 30, 1 << 40))
        await store.add_node(small, "")
        await store.add_node(_node(1), "")
        tries = [_instance(index, 0) for index in range(6)]
        tries = [Instance(i.id, i.spec, "s", i.desired, i.state) for i in tries]
        outcomes = await asyncio.gather(
            *(store.add_instance(instance) for instance in tries), return_exceptions=True
        )
        assert sum(not isinstance(outcome, Exception) for outcome in outcomes) == 2
        assert all(isinstance(o, Unschedulable) for o in outcomes if isinstance(o, Exception))
        node = await store.get_node("s")
        assert node.allocated.cpus == 2 and node.instance_count == 2

        placed = [i.id for i in await store.list_instances(node_id="s")]
        await store.update_instance(placed[0], node_id="n1")  # moved: usage moves with it
        assert (await store.get_node("s")).allocated.cpus == 1
        assert (await store.get_node("n1")).instance_count == 1
        await store.delete_instance(placed[1])
        node = await store.get_node("s")
        assert node.allocated == Resources(0, 0, 0) and node.instance_count == 0

    _run(db_url, scenario)


def test_a_batch_of_instances_is_recorded_in_one_transaction_all_or_none(db_url: str) -> None:
    async def scenario(store: Store) -> None:
        small = Node("s", "small", "", "fake", NodeStatus.READY, {}, Resources(3, 8 << 30, 1 << 40))
        await store.add_node(small, "")
        await store.add_node(_node(1), "")
        # A name taken, last in the batch: the two before it are not recorded either.
        await store.add_instance(_instance(9, 1))
        taken = [_instance(1, 1), _instance(2, 0), _instance(9, 1)]
        taken[1] = Instance("i2", taken[1].spec, "s", DesiredState.RUNNING, InstanceState.SCHEDULED)
        with pytest.raises(AlreadyExists, match="vm-09"):
            await store.add_instances([(instance, None) for instance in taken])
        # No room for the third on the small node: nothing taken on either node.
        full = [
            Instance(f"f{n}", _instance(10 + n, 0).spec, node, DesiredState.RUNNING,
                     InstanceState.SCHEDULED)
            for n, node in enumerate(["n1", "s", "s", "s", "s"])
        ]  # fmt: skip
        with pytest.raises(Unschedulable):
            await store.add_instances([(instance, None) for instance in full])
        assert [i.name for i in await store.list_instances()] == ["vm-09"]
        assert (await store.get_node("s")).instance_count == 0
        assert (await store.get_node("n1")).allocated.cpus == 1
        # What fits goes in whole, usage counted on each node.
        added = await store.add_instances([(instance, None) for instance in full[:4]])
        assert [i.id for i in added] == ["f0", "f1", "f2", "f3"]
        assert (await store.get_node("s")).allocated.cpus == 3
        assert (await store.get_node("n1")).instance_count == 2

    _run(db_url, scenario)


def test_a_row_deleted_under_a_write_is_a_change_to_nothing(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An agent's answer about an instance (observe_instance) read the row, then a report on
    another of the pool's threads deleted it before the answer was written: SQLAlchemy's
    StaleDataError reached the API as a 500. Now the delete waits for the answer (PostgreSQL
    locks the row) or the answer is taken again and finds the row gone (SQLite)."""

    async def scenario(store: Store) -> None:
        await store.add_node(_node(0), "")
        await store.add_instance(_instance(0, 0))
        await store.update_instance("i0", desired=DesiredState.DELETED)
        observe = repository._observe
        deleter: list[threading.Thread] = []

        def delete_row() -> None:
            with store.engine.begin() as other:
                other.execute(delete(InstanceRow).where(InstanceRow.id == "i0"))

        def deleted_meanwhile(row: Any, item: dict[str, Any]) -> Change | None:
            if not deleter:  # the first time only: the report's delete comes in between
                deleter.append(threading.Thread(target=delete_row))
                deleter[0].start()
                deleter[0].join(timeout=1)  # done, or waiting for this transaction's lock
            return observe(row, item)

        monkeypatch.setattr(repository, "_observe", deleted_meanwhile)
        item = {"id": "i0", "state": "Stopped", "ipv4": "", "message": "", "version": 9,
                "release": ""}  # fmt: skip
        await store.observe_instance("i0", item)  # no StaleDataError
        deleter[0].join(timeout=30)
        assert not deleter[0].is_alive()
        with pytest.raises(NotFound):
            await store.get_instance("i0")

    _run(db_url, scenario)


def test_a_report_read_before_an_owner_switch_does_not_undo_it(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A live move switches the instance to its target while the source deletes its copy:
    the source's report (Deleting) was read before the switch and written after it, so the
    instance showed Deleting on its new node. Either order must end on the target, Running."""

    async def scenario(store: Store) -> None:
        for index in (0, 1):
            await store.add_node(_node(index), "")
        await store.add_instance(_instance(0, 0))
        # Running already: the switch's write of Running is no change to the row it read.
        await store.update_instance("i0", state=InstanceState.RUNNING, version=8)
        observe = repository._observe
        report_read, switched = threading.Event(), threading.Event()

        def slow_report(row: Any, item: dict[str, Any]) -> Change | None:
            report_read.set()
            switched.wait(timeout=2)  # let the switch try to pass it
            return observe(row, item)

        monkeypatch.setattr(repository, "_observe", slow_report)

        async def switch() -> None:
            await asyncio.get_running_loop().run_in_executor(None, report_read.wait, 30)
            await store.update_instance("i0", node_id="n1", state=InstanceState.RUNNING, version=1)
            switched.set()

        deleting = {"id": "i0", "state": "Deleting", "ipv4": "", "message": "", "version": 9,
                    "release": ""}  # fmt: skip
        await asyncio.gather(
            store.take_report(
                "n0", capacity=Resources(8, 8 << 30, 100 << 30), used=Usage(0, 0, 0),
                reported=[deleting], removed=[], image_digests=[],
            ),
            switch(),
        )  # fmt: skip
        instance = await store.get_instance("i0")
        assert (instance.node_id, instance.state) == ("n1", InstanceState.RUNNING)

    _run(db_url, scenario)


def test_an_agents_answer_and_a_report_do_not_undo_each_other(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The agent's answer to a stop (Stopping, version 5) was read, then a report with the
    node's newer word (Stopped, version 6) was taken on another thread, then the answer was
    written over it: the master showed Stopping until the next full report, a minute later.
    Each must see the other's write, in whichever order they run."""

    async def scenario(store: Store) -> None:
        await store.add_node(_node(0), "")
        await store.add_instance(_instance(0, 0))
        observe = repository._observe
        answer_read, report_done = threading.Event(), threading.Event()

        def slow_answer(row: Any, item: dict[str, Any]) -> Change | None:
            if item["version"] == 5:  # the agent's answer: let the report try to pass it
                answer_read.set()
                report_done.wait(timeout=2)
            return observe(row, item)

        monkeypatch.setattr(repository, "_observe", slow_answer)

        def status(state: str, version: int) -> dict[str, Any]:
            return {"id": "i0", "state": state, "ipv4": "", "message": "", "version": version,
                    "release": ""}  # fmt: skip

        async def report() -> None:
            await asyncio.get_running_loop().run_in_executor(None, answer_read.wait, 30)
            await store.take_report(
                "n0", capacity=Resources(8, 8 << 30, 100 << 30), used=Usage(0, 0, 0),
                reported=[status("Stopped", 6)], removed=[], image_digests=[],
            )  # fmt: skip
            report_done.set()

        await asyncio.gather(store.observe_instance("i0", status("Stopping", 5)), report())
        instance = await store.get_instance("i0")
        assert (instance.state, instance.version) == (InstanceState.STOPPED, 6)

    _run(db_url, scenario)


def test_agents_answers_that_arrive_together_go_in_one_transaction(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A launch of many has 64 agent calls open at once; their answers, arriving while the
    store is busy, are taken in one transaction (as reports are), each with its own change,
    an answer about an instance gone answered with none."""

    async def scenario(store: Store) -> None:
        await store.add_node(_node(0), "")
        for index in range(6):
            await store.add_instance(_instance(index, 0))
        batches: list[int] = []
        observe_instances = store._observe_instances

        async def counted(items: list[tuple[str, dict[str, Any]]]) -> list[Change | None]:
            batches.append(len(items))
            return await observe_instances(items)

        monkeypatch.setattr(store, "_observe_instances", counted)

        def creating(index: int) -> dict[str, Any]:
            return {"id": f"i{index}", "state": "Creating", "ipv4": "", "message": "",
                    "version": 1, "release": ""}  # fmt: skip

        async with store._turn():  # busy: the answers wait together
            answers = [
                asyncio.create_task(store.observe_instance(f"i{index}", creating(index)))
                for index in [*range(6), 9]
            ]
            await asyncio.sleep(0.05)
        changes = await asyncio.gather(*answers)
        assert batches == [7]
        assert [(c.instance_id, c.old, c.new) if c else None for c in changes] == [
            *[(f"i{index}", "Scheduled", "Creating") for index in range(6)],
            None,
        ]
        states = {i.id: i.state for i in await store.list_instances()}
        assert set(states.values()) == {InstanceState.CREATING}

    _run(db_url, scenario)


def test_many_ids_are_asked_for_a_statements_worth_at_a_time(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full pass may ask for tens of thousands of instances by id, more parameters than a
    statement takes: they go in chunks, and every one is found."""

    async def scenario(store: Store) -> None:
        await store.add_node(_node(0), "")
        for index in range(5):
            await store.add_instance(_instance(index, 0))
        monkeypatch.setattr(repository, "IDS_AT_ONCE", 2)
        ids = [f"i{index}" for index in range(5)] + ["gone"]
        assert sorted(i.id for i in await store.list_instances(ids=ids)) == ids[:5]
        assert sorted(s.id for s in await store.standings(ids=ids)) == ids[:5]

    _run(db_url, scenario)
