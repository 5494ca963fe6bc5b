"""A worker's link to its master: certificates renewed before they expire (issue 10, item 8),
reconnects with jittered backoff (item 11).

The master signs node certificates for 30 s here, so a renewal (at a third of the life left)
and the first certificate's expiry both happen within the test.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from harness import Cluster, new_cluster, wait_until

from multiverse.core.errors import InvalidArgument
from multiverse.wire import pki
from multiverse.wire.v1 import multiverse_pb2 as pb
from multiverse.wire.v1 import multiverse_pb2_grpc as pb_grpc
from multiverse.worker.sync import retry_delay

LIFE = "30s"


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


async def _renew_as(cluster: Cluster, own: pki.CertKey) -> tuple[str, bytes]:
    """Ask for a renewal with ``own`` as the client certificate: the status code's name, and
    the new certificate when it is OK."""
    ca_pem = (cluster.root / "master" / "pki" / "ca.crt").read_bytes()
    credentials = pki.channel_credentials(ca_pem, own)
    request = pb.RenewRequest(csr=pki.csr_for_key(own.key_pem, "node-a").decode())
    async with grpc.aio.secure_channel(f"127.0.0.1:{cluster.grpc_port}", credentials) as channel:
        try:
            reply = await pb_grpc.ClusterServiceStub(channel).Renew(request, timeout=15)
        except grpc.aio.AioRpcError as exc:
            return exc.code().name, b""
    return "OK", reply.certificate.encode()


def test_a_worker_renews_its_certificate_and_works_past_the_first_expiry(tmp_path: Path) -> None:
    with new_cluster(tmp_path) as cluster:
        cluster.start_master("--node-cert-ttl", LIFE)
        cluster.start_worker("node-a")
        path = tmp_path / "node-a" / "pki" / "node.crt"
        key = (tmp_path / "node-a" / "pki" / "node.key").read_bytes()
        first = _cert(path)
        assert first.not_valid_after_utc - dt.datetime.now(dt.UTC) < dt.timedelta(seconds=31)

        wait_until(lambda: _cert(path).serial_number != first.serial_number, timeout=60)
        renewed = _cert(path)
        assert renewed.not_valid_after_utc > first.not_valid_after_utc
        assert pki.node_id_of(renewed) == cluster.node("node-a")["id"]
        assert (tmp_path / "node-a" / "pki" / "node.key").read_bytes() == key
        assert "renewed its certificate" in cluster.master.output()  # type: ignore[union-attr]

        # Past the first certificate's end, every connection is made anew, both ways: the
        # worker's Sync to a restarted master, and the master's calls to the worker's agent,
        # whose listener must now serve the renewed certificate.
        wait_until(lambda: dt.datetime.now(dt.UTC) > first.not_valid_after_utc, timeout=60)
        assert cluster.master is not None
        cluster.master.stop()
        cluster.start_master("--node-cert-ttl", LIFE)
        wait_until(lambda: cluster.node("node-a").get("status") == "Ready", timeout=60)
        cluster.ok("launch", "--name", "after-expiry", "--node", "node-a")
        assert cluster.instances()["after-expiry"]["state"] == "Running"

        # The expired first certificate is refused; the current one still renews.
        cluster.workers["node-a"].kill()
        expired = pki.CertKey(first.public_bytes(Encoding.PEM), key)
        assert asyncio.run(_renew_as(cluster, expired))[0] == "UNAVAILABLE"
        code, fresh = asyncio.run(_renew_as(cluster, pki.CertKey(path.read_bytes(), key)))
        assert code == "OK"

        # A removed node's certificate is revoked: it cannot renew its way back in.
        cluster.ok("node", "remove", "node-a", "--force")
        assert asyncio.run(_renew_as(cluster, pki.CertKey(fresh, key)))[0] == "UNAUTHENTICATED"

        # A worker that was away past its certificate's end says what to do.
        last = _cert(path).not_valid_after_utc
        wait_until(lambda: dt.datetime.now(dt.UTC) > last, timeout=60)
        again = cluster.start_worker("node-a", wait=False)
        assert again.process is not None and again.process.wait(timeout=60) != 0
        assert "certificate expired while it was away" in again.output()


def test_renewal_is_due_at_a_third_of_the_life_left_and_lifetimes_are_bounded() -> None:
    ca = pki.ClusterCA.create()
    _, csr = pki.new_key_and_csr("node-a")
    node_id = "6f1c2b9e-0d7a-4c1e-9a43-2f5b8e7d1c00"
    for life in (dt.timedelta(seconds=30), dt.timedelta(days=365)):
        cert = x509.load_pem_x509_certificate(pki.sign_node_csr(ca, csr, node_id, "a", life))
        issued = dt.datetime.now(dt.UTC)
        assert abs(cert.not_valid_after_utc - (issued + life)) < dt.timedelta(seconds=5)
        left = cert.not_valid_after_utc - pki.renewal_due(cert)
        whole = cert.not_valid_after_utc - cert.not_valid_before_utc
        assert abs(left - whole / 3) < dt.timedelta(seconds=1)
        assert pki.renewal_due(cert) > issued  # backdating never makes it due at once
    for bad in (dt.timedelta(seconds=9), dt.timedelta(days=3651)):
        with pytest.raises(InvalidArgument, match="lifetime"):
            pki.sign_node_csr(ca, csr, node_id, "a", bad)


def test_a_master_refuses_a_node_certificate_lifetime_out_of_bounds(tmp_path: Path) -> None:
    with new_cluster(tmp_path) as cluster:
        result = cluster.cli("master", "--data-dir", str(tmp_path / "m"), "--node-cert-ttl", "5s")
        assert result.code != 0 and "lifetime must be between 10s" in result.err
        assert not (tmp_path / "m").exists()


def test_reconnect_delays_grow_capped_and_jittered() -> None:
    for attempt in range(12):
        delays = [retry_delay(attempt) for _ in range(200)]
        assert all(0 <= d <= min(5.0, 0.5 * 2**attempt) for d in delays)
        assert len(set(delays)) > 1  # jittered: workers do not all come back at once
    assert max(retry_delay(3) for _ in range(200)) > 2.0  # grows past the first step
    assert retry_delay(10**6) <= 5.0
