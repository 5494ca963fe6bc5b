"""The worker's side of the cluster service: join once, then keep the master informed.

The identity the master gave (node id, node secret, agent secret) is kept in
``<data-dir>/node.json`` (0600), so a restarted worker re-joins as the same node without a
join token. Reports go out at once on every change and every ``interval`` seconds otherwise;
a lost stream is reopened with capped backoff and the first report on it is a full one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc

from multiverse import __version__
from multiverse.core.errors import MultiverseError
from multiverse.wire import convert
from multiverse.wire.v1 import multiverse_pb2 as pb
from multiverse.wire.v1 import multiverse_pb2_grpc as pb_grpc
from multiverse.worker.agent import Agent

log = logging.getLogger("multiverse.worker")


@dataclass
class Identity:
    node_id: str
    name: str
    node_secret: str
    agent_secret: str

    @staticmethod
    def load(path: Path) -> Identity | None:
        return Identity(**json.loads(path.read_text())) if path.exists() else None

    def save(self, path: Path) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as file:
            json.dump(asdict(self), file)


async def join(
    master: str,
    *,
    token: str,
    identity_file: Path,
    name: str,
    advertise: str,
    driver: str,
    labels: dict[str, str],
    agent: Agent,
) -> Identity:
    """Join the cluster, or re-join as the node this data directory already is."""
    known = Identity.load(identity_file)
    if known is None and not token:
        raise MultiverseError(
            "this worker has not joined yet: pass --token (multiverse token create)"
        )
    request = pb.JoinRequest(
        token="" if known else token,
        node_id=known.node_id if known else "",
        node_secret=known.node_secret if known else "",
        name=known.name if known else name,
        agent_address=advertise,
        driver=driver,
        labels=labels,
        capacity=convert.resources_to_pb(await agent.driver.capacity()),
        version=__version__,
    )
    async with grpc.aio.insecure_channel(master) as channel:
        try:
            reply = await pb_grpc.ClusterServiceStub(channel).Join(request, timeout=15)
        except grpc.aio.AioRpcError as exc:
            raise convert.error_from_rpc(exc, f"master {master}") from exc
    identity = Identity(
        node_id=reply.node_id,
        name=reply.name,
        node_secret=reply.node_secret or (known.node_secret if known else ""),
        agent_secret=reply.agent_secret,
    )
    identity.save(identity_file)
    return identity


async def sync_forever(master: str, identity: Identity, agent: Agent, interval: float) -> None:
    """Push reports to the master until cancelled, reconnecting as often as it takes."""
    metadata = (("node-id", identity.node_id), ("node-secret", identity.node_secret))
    backoff = 0.5
    while True:
        try:
            async with grpc.aio.insecure_channel(master) as channel:
                stub = pb_grpc.ClusterServiceStub(channel)
                call = stub.Sync(_reports(agent, interval), metadata=metadata)
                async for _ack in call:
                    backoff = 0.5
        except grpc.aio.AioRpcError as exc:
            log.warning(
                "sync with %s lost: %s; retrying in %.1fs", master, exc.code().name, backoff
            )
        await asyncio.sleep(backoff)
        backoff = min(backoff * 2, 5.0)


async def _reports(agent: Agent, interval: float) -> object:
    while True:
        agent.changed.clear()
        yield await agent.report()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(agent.changed.wait(), timeout=interval)


async def observe_forever(agent: Agent, interval: float) -> None:
    """Check the hypervisor's view of every VM, so a VM dying behind our back is seen."""
    while True:
        await asyncio.sleep(interval)
        try:
            await agent.observe()
        except Exception:  # keep observing whatever one round hit
            log.exception("observing the hypervisor failed")
