"""The worker's side of the cluster service: join once, then keep the master informed.

The identity the master gave (node id and name in ``<data-dir>/node.json``; the certificate,
its key and the cluster CA under ``<data-dir>/pki/``, all 0600) lets a restarted worker re-join
as the same node without a join token, over mutual TLS. Reports go out at once on every change
and every ``interval`` seconds otherwise; a lost stream is reopened with capped backoff and the
first report on it is a full one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx

from multiverse import __version__
from multiverse.core.errors import InvalidArgument, Unavailable
from multiverse.core.files import write_private
from multiverse.wire import convert, pki
from multiverse.wire.v1 import multiverse_pb2 as pb
from multiverse.wire.v1 import multiverse_pb2_grpc as pb_grpc
from multiverse.worker.agent import Agent

log = logging.getLogger("multiverse.worker")


@dataclass
class Identity:
    """Who this worker is in its cluster: its node id and name, and the certificate the
    cluster CA signed for it (its key never left this host)."""

    node_id: str
    name: str
    ca_pem: bytes
    cert: pki.CertKey

    @staticmethod
    def load(data_dir: Path) -> Identity | None:
        path = data_dir / "node.json"
        if not path.exists():
            return None
        known = json.loads(path.read_text())
        return Identity(
            known["node_id"],
            known["name"],
            (data_dir / "pki" / "ca.crt").read_bytes(),
            pki.CertKey.load(data_dir / "pki", "node"),
        )

    def save(self, data_dir: Path) -> None:
        self.cert.save(data_dir / "pki", "node")
        write_private(data_dir / "pki" / "ca.crt", self.ca_pem)
        write_private(
            data_dir / "node.json",
            json.dumps({"node_id": self.node_id, "name": self.name}).encode(),
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return pki.channel_credentials(self.ca_pem, self.cert)

    def server_credentials(self) -> grpc.ServerCredentials:
        return pki.server_credentials(self.ca_pem, self.cert, require_client_auth=True)


def admit(token: pki.JoinToken, master: str, name: str, data_dir: Path) -> Identity:
    """A first join: get this node's certificate from the master's API with the join token.

    The CA is fetched first without trusting the connection, then kept only if it has the
    token's fingerprint; from there on every connection checks the master against it. The
    node's private key is made here and never sent."""
    host = master.rsplit(":", 1)[0]
    api_port = token.addresses[1].rsplit(":", 1)[1] if len(token.addresses) > 1 else "1338"
    base = f"https://{host}:{api_port}/api/v1"
    try:
        answer = httpx.get(f"{base}/cluster/ca", verify=False, timeout=15)  # pinned below
        answer.raise_for_status()
        ca_pem = pki.ca_matching_fingerprint(
            str(answer.json()["certificate"]).encode(), token.ca_fingerprint
        )
        key_pem, csr_pem = pki.new_key_and_csr(name)
        body = {"token": token.credential, "csr": csr_pem.decode(), "name": name}
        context = ssl.create_default_context(cadata=ca_pem.decode())
        answer = httpx.post(f"{base}/cluster/join", json=body, verify=context, timeout=30)
        reply = answer.json()
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
        raise Unavailable(f"cannot reach the master's API at {base}: {exc}") from exc
    if answer.is_error:
        error = reply.get("error", {}) if isinstance(reply, dict) else {}
        raise convert.error_from_code(
            str(error.get("code", "")), str(error.get("message", f"HTTP {answer.status_code}"))
        )
    identity = Identity(
        reply["node_id"], reply["name"], ca_pem, pki.CertKey(reply["certificate"].encode(), key_pem)
    )
    identity.save(data_dir)
    return identity


async def join(
    master: str,
    *,
    token: str,
    data_dir: Path,
    name: str,
    advertise: str,
    driver: str,
    labels: dict[str, str],
    agent: Agent,
) -> Identity:
    """Join the cluster (a first time with a token), then tell the master over mutual TLS
    where this node's agent is and what it offers; a node that joined before needs no token."""
    identity = Identity.load(data_dir)
    if identity is None:
        if not token:
            raise InvalidArgument(
                "this worker has not joined yet: give it a join token "
                "(MULTIVERSE_JOIN_TOKEN or --token-file; see `multiverse token create`)"
            )
        join_token = pki.JoinToken.decode(token)
        master = master or join_token.addresses[0]
        identity = await asyncio.to_thread(admit, join_token, master, name, data_dir)
    request = pb.JoinRequest(
        name=identity.name,
        agent_address=advertise,
        driver=driver,
        labels=labels,
        capacity=convert.resources_to_pb(await agent.driver.capacity()),
        version=__version__,
    )
    async with grpc.aio.secure_channel(master, identity.channel_credentials()) as channel:
        try:
            await pb_grpc.ClusterServiceStub(channel).Join(request, timeout=15)
        except grpc.aio.AioRpcError as exc:
            raise convert.error_from_rpc(exc, f"master {master}") from exc
    return identity


async def sync_forever(master: str, identity: Identity, agent: Agent, interval: float) -> None:
    """Push reports to the master until cancelled, reconnecting as often as it takes."""
    backoff = 0.5
    while True:
        try:
            credentials = identity.channel_credentials()
            async with grpc.aio.secure_channel(
                master, credentials, convert.GRPC_CHANNEL_OPTIONS
            ) as channel:
                stub = pb_grpc.ClusterServiceStub(channel)
                call = stub.Sync(_reports(agent, interval))
                async for _ack in call:
                    backoff = 0.5
        except grpc.aio.AioRpcError as exc:
            log.warning(
                "sync with %s lost: %s; retrying in %.1fs", master, exc.code().name, backoff
            )
        await asyncio.sleep(backoff)
        backoff = min(backoff * 2, 5.0)


async def _reports(agent: Agent, interval: float) -> AsyncIterator[pb.NodeReport]:
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
