"""The agent tells Running the moment the guest answers, without waiting for anything slower."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest
from harness import async_wait_until

from multiverse.core.model import GuestStats, InstanceSpec, InstanceState
from multiverse.drivers.base import VMConfig
from multiverse.drivers.fake import ALLOW_ENV, FakeDriver
from multiverse.worker.agent import Agent
from multiverse.worker.localstore import LocalStore


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
