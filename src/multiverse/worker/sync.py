"""The worker's side of the cluster service: join once, then keep the master informed.

The identity the master gave (node id and name in ``<data-dir>/node.json``; the certificate,
its key and the cluster CA under ``<data-dir>/pki/``, all 0600) lets a restarted worker re-join
as the same node without a join token, over mutual TLS. Reports go out at once on every change
and every ``interval`` seconds otherwise; a lost stream is reopened with jittered, capped
backoff and the first report on it is a full one. The certificate is renewed over the same
mutual TLS when a third of its life is left (:func:`renew_forever`); new connections, the
agent's listener included, present the renewed one.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import random
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx

from multiverse import __version__
from multiverse.core.errors import (
    InvalidArgument,
    MultiverseError,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)
from multiverse.core.files import write_private
from multiverse.wire import convert, pki
from multiverse.wire.v1 import multiverse_pb2 as pb
from multiverse.wire.v1 import multiverse_pb2_grpc as pb_grpc
from multiverse.worker.agent import Agent, Told

log = logging.getLogger("multiverse.worker")

# Seconds between full reports on a stream: a safety net under the deltas, cheap at this pace.
FULL_REPORT_EVERY = 60.0
# Seconds a report waits after the change that woke it, for the changes right behind it: an
# instance's steps (Creating, Starting, Running, its release) and the VMs launched together
# go in one report, not one each, and the master takes one report instead of several.
REPORT_GATHER = 0.02


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
        """The agent listener's TLS; it follows :attr:`cert` as renewals replace it."""
        return pki.reloading_server_credentials(self.ca_pem, lambda: self.cert)

    def expired(self) -> bool:
        return pki.as_cert(self.cert.cert_pem).not_valid_after_utc <= dt.datetime.now(dt.UTC)


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
        first = masters_of(master)[0] if master else join_token.addresses[0]
        identity = await asyncio.to_thread(admit, join_token, first, name, data_dir)
        master = master or first
    if identity.expired():
        raise Unauthenticated(
            f"this node's certificate expired while it was away (it renews only while running); "
            f"remove the node on the master (`multiverse node remove {identity.name}`), delete "
            f"{data_dir / 'node.json'} and join again with a new token"
        )
    request = pb.JoinRequest(
        network_mode="bridge" if agent.network is not None else "user",
        name=identity.name,
        agent_address=advertise,
        driver=driver,
        labels=labels,
        capacity=convert.resources_to_pb(await agent.driver.capacity()),
        version=__version__,
    )
    for address in masters_of(master):
        async with grpc.aio.secure_channel(address, identity.channel_credentials()) as channel:
            try:
                await pb_grpc.ClusterServiceStub(channel).Join(request, timeout=15)
                break
            except grpc.aio.AioRpcError as exc:
                failed = convert.error_from_rpc(exc, f"master {address}")
                if not isinstance(failed, Unavailable):
                    raise failed from exc
    else:
        raise failed
    return identity


def masters_of(master: str) -> list[str]:
    """``--master`` names one master or several, comma-separated (masters sharing one
    PostgreSQL): a worker syncs with one and moves to the next when it is lost."""
    return [item.strip() for item in master.split(",") if item.strip()]


def retry_delay(attempt: int, base: float = 0.5, cap: float = 5.0) -> float:
    """Seconds to wait before retry number ``attempt`` (0 for the first): "full jitter"
    exponential backoff, uniform in [0, min(cap, base * 2**attempt)].

    The jitter spreads the reconnects of many workers after a master restart, so that they do
    not all arrive in the same instant; the cap keeps a returning master found within seconds.
    """
    return random.uniform(0, min(cap, base * 2 ** min(attempt, 32)))


async def sync_forever(master: str, identity: Identity, agent: Agent, interval: float) -> None:
    """Push reports to the master until cancelled, reconnecting as often as it takes."""
    attempt = 0
    masters = masters_of(master)
    while True:
        master = masters[attempt % len(masters)]  # after a loss, the next one
        try:
            credentials = identity.channel_credentials()  # the newest certificate
            async with grpc.aio.secure_channel(
                master, credentials, convert.GRPC_CHANNEL_OPTIONS
            ) as channel:
                stub = pb_grpc.ClusterServiceStub(channel)
                reporter = Reporter(agent, interval)
                call = stub.Sync(reporter.reports())
                async for ack in call:
                    attempt = 0
                    if ack.full:
                        reporter.want_full = True
                        agent.changed.set()  # now, not at the next interval
                    await _apply_network(agent, ack)
                    await _apply_faults(agent, ack)
        except grpc.aio.AioRpcError as exc:
            delay = retry_delay(attempt)
            why = exc.code().name
            if identity.expired():
                why += " (this node's certificate has expired: admit it again with a join token)"
            log.warning("sync with %s lost: %s; retrying in %.1fs", master, why, delay)
        else:
            delay = retry_delay(attempt)
        attempt += 1
        await asyncio.sleep(delay)


async def renew(master: str, identity: Identity, data_dir: Path) -> None:
    """Get a new certificate for this node's key over mutual TLS; keep it and use it from now.

    Only the certificate file changes (atomically): the key stays, so no crash can part them.
    """
    csr = pki.csr_for_key(identity.cert.key_pem, identity.name)
    master = masters_of(master)[0]
    async with grpc.aio.secure_channel(master, identity.channel_credentials()) as channel:
        try:
            reply = await pb_grpc.ClusterServiceStub(channel).Renew(
                pb.RenewRequest(csr=csr.decode()), timeout=15
            )
        except grpc.aio.AioRpcError as exc:
            raise convert.error_from_rpc(exc, f"master {master}") from exc
    renewed = pki.CertKey(reply.certificate.encode(), identity.cert.key_pem)
    cert = pki.as_cert(renewed.cert_pem)
    if (
        pki.node_id_of(cert) != identity.node_id
        or cert.public_key() != pki.as_cert(identity.cert.cert_pem).public_key()
    ):
        raise Unauthenticated("the master answered the renewal with another node's certificate")
    write_private(data_dir / "pki" / "node.crt", renewed.cert_pem, 0o644)
    identity.cert = renewed
    log.info("node certificate renewed, valid until %s", cert.not_valid_after_utc.isoformat())


async def renew_forever(master: str, identity: Identity, data_dir: Path) -> None:
    """Renew the certificate each time a third of its life is left, until cancelled.

    Failures are retried with backoff until the certificate runs out; a refusal (this node was
    removed, its certificate revoked) ends the loop: asking again cannot help.
    """
    attempt = 0
    while True:
        due = pki.renewal_due(identity.cert.cert_pem)
        await asyncio.sleep(max((due - dt.datetime.now(dt.UTC)).total_seconds(), 0.0))
        try:
            await renew(master, identity, data_dir)
            attempt = 0
        except (Unauthenticated, PermissionDenied) as exc:
            log.error("the master refused to renew this node's certificate: %s", exc.message)
            return
        except MultiverseError as exc:
            delay = retry_delay(attempt, base=1.0, cap=60.0)
            attempt += 1
            log.warning("certificate renewal failed: %s; retrying in %.1fs", exc.message, delay)
            await asyncio.sleep(delay)


async def _apply_network(agent: Agent, ack: pb.SyncAck) -> None:
    """The cluster network as the master says it is now; a failure is logged and retried with
    the next acknowledgement, and never ends the stream."""
    plan = convert.plan_from_pb(ack.network) if ack.HasField("network") else None
    if plan is None:
        return
    try:
        await agent.apply_network(plan)
    except Exception:  # the next sync tries again
        log.exception("setting up the cluster network failed")


async def _apply_faults(agent: Agent, ack: pb.SyncAck) -> None:
    """The faults in force as the master says; how a restarted worker gets them back. A
    failure is logged and retried with the next acknowledgement."""
    if agent.faults is None:
        return
    try:
        await agent.apply_faults(convert.faults_from_pb(ack.faults))
    except MultiverseError as exc:
        log.warning("applying the faults failed: %s", exc.message)
    except Exception:  # the next sync tries again
        log.exception("applying the faults failed")


class Reporter:
    """One stream's reports: full at first, every ``FULL_REPORT_EVERY`` seconds and when the
    master asks (its ack says ``full``); deltas in between, so that a change costs the master
    work for what changed, not for all the node holds. The stream is ordered and reliable while
    it lives, and a new stream starts with a full report, so a delta is never lost unseen."""

    def __init__(self, agent: Agent, interval: float, gather: float = REPORT_GATHER) -> None:
        self.agent = agent
        self.interval = interval
        self.gather = gather
        self.want_full = True
        self._told: dict[str, Told] = {}
        self._full_at = 0.0

    async def reports(self) -> AsyncIterator[pb.NodeReport]:
        while True:
            self.agent.changed.clear()
            full = self.want_full or time.monotonic() - self._full_at >= FULL_REPORT_EVERY
            report = await self.agent.report(None if full else self._told)
            self._told = self.agent.told()  # no await since the report: the same records
            if full:
                self.want_full, self._full_at = False, time.monotonic()
            yield report
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.agent.changed.wait(), timeout=self.interval)
            if self.agent.changed.is_set():
                await asyncio.sleep(self.gather)


async def observe_forever(agent: Agent, interval: float) -> None:
    """Check the hypervisor's view of every VM, so a VM dying behind our back is seen."""
    while True:
        await asyncio.sleep(interval)
        try:
            await agent.observe()
        except Exception:  # keep observing whatever one round hit
            log.exception("observing the hypervisor failed")
