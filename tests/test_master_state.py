"""The master's memory stays bounded (issue 10, item 12): the operations registry by count
and age, and a removed node leaves no state behind (images, agent channel, backoff)."""

from __future__ import annotations

import asyncio
import tomllib
import uuid
from pathlib import Path

import grpc
import pytest
from harness import free_port

from multiverse.core.errors import NotFound
from multiverse.core.model import (
    DesiredState,
    Instance,
    InstanceSpec,
    InstanceState,
    Node,
    NodeStatus,
    Resources,
)
from multiverse.master.events import EventBus
from multiverse.master.operations import Operations
from multiverse.master.server import Master, MasterConfig, client_config_text
from multiverse.store.repository import now
from multiverse.wire.v1 import multiverse_pb2 as pb


async def _quick() -> str:
    return "done"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_an_operation_that_never_ends_does_not_pin_the_table() -> None:
    async def scenario() -> None:
        operations = Operations(EventBus(), keep=3)
        forever = asyncio.Event()
        stuck = operations.start("drain", "gone-node", forever.wait())
        quick = []
        for i in range(5):
            quick.append(operations.start("start", f"vm{i}", _quick()))
            await operations.wait(quick[-1].id, 5)
            assert len(operations) <= 3
        latest = operations.start("stop", "vm9", _quick())
        assert len(operations) == 3
        assert operations.get(stuck.id).status == "running"
        # Finished ones went first; the newest are all still there to look up.
        assert operations.get(latest.id) is latest
        assert operations.get(quick[-1].id).status == "success"
        with pytest.raises(NotFound):
            operations.get(quick[0].id)
        # More operations than the table holds, none finished: the oldest is dropped from the
        # table even though it runs on (its task is not cancelled).
        running = [operations.start("drain", f"n{i}", forever.wait()) for i in range(3)]
        assert len(operations) == 3
        with pytest.raises(NotFound):
            operations.get(stuck.id)
        assert operations.get(running[-1].id).status == "running"
        assert not stuck.done.is_set()
        forever.set()
        await operations.wait(running[-1].id, 5)
        await asyncio.wait_for(stuck.done.wait(), 5)
        await asyncio.wait_for(latest.done.wait(), 5)
        await operations.close()

    asyncio.run(scenario())


def test_finished_operations_expire_by_age() -> None:
    async def scenario() -> None:
        clock = Clock()
        operations = Operations(EventBus(), keep=100, keep_for=60, clock=clock)
        old = operations.start("start", "vm1", _quick())
        await operations.wait(old.id, 5)
        forever = asyncio.Event()
        pending = operations.start("drain", "n1", forever.wait())
        clock.now += 59
        await operations.wait(operations.start("start", "vm2", _quick()).id, 5)
        assert operations.get(old.id).status == "success"  # not old enough yet
        clock.now += 2
        await operations.wait(operations.start("start", "vm3", _quick()).id, 5)
        with pytest.raises(NotFound):
            operations.get(old.id)
        assert operations.get(pending.id).status == "running"  # running ones do not expire
        forever.set()
        await operations.wait(pending.id, 5)
        await operations.close()

    asyncio.run(scenario())


def test_a_removed_node_leaves_no_state_in_the_master(tmp_path: Path) -> None:
    async def scenario() -> None:
        master = Master(MasterConfig(data_dir=tmp_path))
        try:
            await _remove_and_check(master)
        finally:
            await master.agents.close()
            master.store.close()

    asyncio.run(scenario())


async def _remove_and_check(master: Master) -> None:
    node = Node(
        str(uuid.uuid4()), "gone", f"127.0.0.1:{free_port()}", "fake", NodeStatus.READY, {},
        Resources(2, 2**30, 2**30), last_sync=now(),
    )  # fmt: skip
    await master.store.add_node(node, "1234")
    spec = InstanceSpec(name="vm", cpus=1, memory=2**20, disk=2**20)
    instance = Instance(
        str(uuid.uuid4()), spec, node.id, DesiredState.RUNNING, InstanceState.SCHEDULED
    )
    await master.store.add_instance(instance)  # placed while the node had room
    report = pb.NodeReport(images=[pb.ImageInfo(name="tiny", kind="disk", digest="sha256:0")])
    await master.cluster.apply(node.id, report)
    assert [image["nodes"] for image in await master.cluster.image_catalog()] == [["gone"]]
    await master.reconciler.reconcile_all()  # its agent is unreachable: the launch backs off
    assert master.reconciler._backoff
    _, channel, _ = master.agents._channels[node.id]

    await master.nodes.remove("gone", force=True)

    assert master.cluster.images == {}
    assert master.agents._channels == {}
    await asyncio.gather(*master.agents._closing)
    assert channel.get_state() == grpc.ChannelConnectivity.SHUTDOWN
    await master.reconciler.reconcile_all()
    assert master.reconciler._backoff == {}


def test_the_client_config_reads_back_whatever_its_values_hold() -> None:
    # Written with tomli-w: quotes and backslashes in a value cannot break the file (the old
    # hand-written f-string produced TOML that tomllib refused for a token with a quote).
    ca_pem = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
    text = client_config_text('https://h:1/"x\\', 'tok"en\\', ca_pem)
    assert tomllib.loads(text) == {
        "server": 'https://h:1/"x\\',
        "token": 'tok"en\\',
        "ca_certificate": ca_pem.decode(),
    }
    assert "ca_certificate" not in tomllib.loads(client_config_text("http://h:1", "t", None))
