"""The agent tells Running the moment the guest answers, without waiting for anything slower;
its reports name only what changed."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from pathlib import Path

import pytest
from harness import async_wait_until

from multiverse.core.model import GuestStats, InstanceSpec, InstanceState
from multiverse.drivers.base import VMConfig
from multiverse.drivers.fake import ALLOW_ENV, FakeDriver
from multiverse.worker.agent import Agent
from multiverse.worker.localstore import LocalStore, VMRecord
from multiverse.worker.sync import Reporter


class SlowStatsDriver(FakeDriver):
    """A fake whose guest takes until ``answer`` is set to run the stats command."""

    def __init__(self, state_dir: Path) -> None:
        super().__init__(state_dir)
        self.answer = asyncio.Event()
        self.asked = asyncio.Event()

    async def stats(self, vm: VMConfig) -> GuestStats:
        self.asked.set()
        await self.answer.wait()
        return await super().stats(vm)


def test_running_is_told_before_the_guests_release_is_known(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ALLOW_ENV, "1")

    async def scenario() -> None:
        driver = SlowStatsDriver(tmp_path / "fake")
        agent = Agent(driver, LocalStore(tmp_path / "agent.db"))
        try:
            record = await agent.launch(str(uuid.uuid4()), InstanceSpec(name="quick"))
            await asyncio.wait_for(driver.asked.wait(), 30)
            assert record.state == InstanceState.RUNNING and record.release == ""
            told = record.version
            driver.answer.set()
            await async_wait_until(lambda: record.release == "Fake 1.0", 30)
            assert record.state == InstanceState.RUNNING and record.version > told
        finally:
            await agent.shutdown()
            agent.store.close()

    asyncio.run(scenario())


def test_a_report_after_the_first_names_only_what_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Deltas (issue 13): a node with many instances tells the master of one change by
    sending that one, and of a deletion by its id; the master asks, it gets everything."""
    monkeypatch.setenv(ALLOW_ENV, "1")

    async def scenario() -> None:
        agent = Agent(FakeDriver(tmp_path / "fake"), LocalStore(tmp_path / "agent.db"))
        reporter = Reporter(agent, interval=3600)
        reports = reporter.reports()
        try:
            records = [
                await agent.launch(str(uuid.uuid4()), InstanceSpec(name=f"vm-{index}"))
                for index in range(3)
            ]
            await async_wait_until(
                lambda: all(r.state == InstanceState.RUNNING and r.release for r in records), 30
            )
            first = await anext(reports)
            assert not first.delta and len(first.instances) == 3
            await agent.stop(records[1].id)
            await async_wait_until(lambda: records[1].state == InstanceState.STOPPED, 30)
            second = await anext(reports)
            assert second.delta and {i.name for i in second.instances} == {"vm-1"}
            await agent.delete(records[2].id)
            await async_wait_until(lambda: records[2].id not in agent.records, 30)
            third = await anext(reports)
            assert third.delta and not third.instances and list(third.removed) == [records[2].id]
            reporter.want_full = True  # as the master's ack asks
            agent.changed.set()
            fourth = await anext(reports)
            assert not fourth.delta and {i.name for i in fourth.instances} == {"vm-0", "vm-1"}
        finally:
            await reports.aclose()
            await agent.shutdown()
            agent.store.close()

    asyncio.run(scenario())


def test_changes_close_together_go_in_one_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three launches and every step of each (Creating, Starting, Running, the release) within
    the gather time: one report with all three as they ended, not one report per step."""
    monkeypatch.setenv(ALLOW_ENV, "1")

    async def scenario() -> None:
        agent = Agent(FakeDriver(tmp_path / "fake"), LocalStore(tmp_path / "agent.db"))
        reporter = Reporter(agent, interval=3600, gather=1.0)
        reports = reporter.reports()
        try:
            assert not (await anext(reports)).instances  # the first, full, of nothing yet
            records = [
                await agent.launch(str(uuid.uuid4()), InstanceSpec(name=f"vm-{index}"))
                for index in range(3)
            ]
            second = await anext(reports)
            assert second.delta
            assert {(i.name, i.state, bool(i.release)) for i in second.instances} == {
                (f"vm-{index}", "Running", True) for index in range(3)
            }
            assert all(record.version >= 3 for record in records)  # it saw every step
            # Nothing more: the next report waits for a change (none comes within a second).
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(anext(reports), 1.0)
        finally:
            await reports.aclose()
            await agent.shutdown()
            agent.store.close()

    asyncio.run(scenario())


def test_the_local_store_writes_the_spec_a_record_holds_now(tmp_path: Path) -> None:
    """Each record's spec is turned into JSON once, not at every step of its VM: a record
    given another spec must still have that one written."""
    store = LocalStore(tmp_path / "agent.db")
    record = VMRecord(id="a", spec=InstanceSpec(name="vm-a", labels={"tier": "web"}))
    store.save(record)
    record.state, record.version = InstanceState.RUNNING, 2
    store.save(record)
    record.spec = dataclasses.replace(record.spec, labels={"tier": "db"})
    store.save(record)
    store.close()
    again = LocalStore(tmp_path / "agent.db")
    try:
        [loaded] = again.load()
        assert (loaded.spec.labels, loaded.state, loaded.version) == (
            {"tier": "db"}, InstanceState.RUNNING, 2,
        )  # fmt: skip
        again.remove("a")
        assert again.load() == []
    finally:
        again.close()
