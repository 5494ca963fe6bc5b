"""The cluster's certificates (wire/pki.py), and proof that gRPC's TLS accepts and refuses them.

The gRPC tests run a real grpc.aio server on loopback with mutual TLS, serving one AgentService
method through a generic handler: what an agent will do, minus the agent.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import ipaddress
import json
import re
import stat
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from multiverse.core.errors import InvalidArgument, Unauthenticated
from multiverse.master.auth import new_secret
from multiverse.wire import pki
from multiverse.wire.v1 import multiverse_pb2 as pb
from multiverse.wire.v1 import multiverse_pb2_grpc as pb_grpc

NODE_ID = "0b6e3f0c-4a1d-4c55-9a43-2f0f6e1b2c3d"


@dataclass
class Pki:
    ca: pki.ClusterCA
    other_ca: pki.ClusterCA
    node: pki.CertKey
    master: pki.CertKey


def _node_cert(ca: pki.ClusterCA, node_id: str = NODE_ID, name: str = "node-a") -> pki.CertKey:
    key_pem, csr_pem = pki.new_key_and_csr(name)
    return pki.CertKey(pki.sign_node_csr(ca, csr_pem, node_id, name), key_pem)


def _self_signed() -> pki.CertKey:
    """A certificate that claims to be a node but that no cluster CA signed."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, NODE_ID)])
    start = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(pki.NODE_URI_PREFIX + NODE_ID)]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return pki.CertKey(cert.public_bytes(serialization.Encoding.PEM), key_pem)


@pytest.fixture(scope="module")
def certs() -> Pki:
    ca = pki.ClusterCA.create()
    return Pki(
        ca, pki.ClusterCA.create("another cluster"), _node_cert(ca), pki.sign_master_client_cert(ca)
    )


# ---- gRPC: mutual TLS with these certificates ----


@dataclass
class Call:
    """What one call ended with: the reply's fields, or the gRPC status."""

    code: grpc.StatusCode
    node_id: str = ""
    kind: str = ""
    peer_identities: tuple[bytes, ...] = ()


async def _serve_and_call(
    server_ca: pki.ClusterCA,
    server_cert: pki.CertKey,
    client_root: bytes,
    client_cert: pki.CertKey | None,
    *,
    server_name: str | None = None,
    revoked: frozenset[str] = frozenset(),
) -> Call:
    """Start an agent-like server (client certs required), make one call, stop the server."""
    seen: dict[str, tuple[bytes, ...]] = {}

    async def start(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        seen["identities"] = tuple(context.peer_identities() or ())
        try:
            identity = pki.check_peer_cert(
                server_ca, pki.peer_cert_of(context.auth_context()), revoked
            )
        except Unauthenticated as exc:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, exc.message)
        return pb.InstanceStatus(id=identity.node_id, message=identity.kind)

    handler = grpc.method_handlers_generic_handler(
        "multiverse.v1.AgentService",
        {
            "Start": grpc.unary_unary_rpc_method_handler(
                start,
                request_deserializer=pb.InstanceRef.FromString,
                response_serializer=pb.InstanceStatus.SerializeToString,
            )
        },
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    credentials = pki.server_credentials(server_ca.cert_pem, server_cert, require_client_auth=True)
    port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    try:
        channel_credentials = pki.channel_credentials(client_root, client_cert)
        async with grpc.aio.secure_channel(
            f"127.0.0.1:{port}", channel_credentials, options=options
        ) as channel:
            stub = pb_grpc.AgentServiceStub(channel)
            try:
                reply = await stub.Start(pb.InstanceRef(id="x"), timeout=10)
            except grpc.aio.AioRpcError as exc:
                return Call(exc.code(), peer_identities=seen.get("identities", ()))
            return Call(grpc.StatusCode.OK, reply.id, reply.message, seen["identities"])
    finally:
        await server.stop(None)


def test_a_node_certificate_is_accepted_and_names_the_node(certs: Pki) -> None:
    agent = _node_cert(certs.ca, str(uuid.uuid4()), "node-b")  # the server side: another node
    call = asyncio.run(
        _serve_and_call(
            certs.ca,
            agent,
            certs.ca.cert_pem,
            certs.node,
            server_name=pki.node_server_name(pki.node_id_of(agent.cert_pem)),
        )
    )
    assert call.code == grpc.StatusCode.OK
    assert (call.kind, call.node_id) == ("node", NODE_ID)
    # gRPC's own view of the peer agrees: the URI SAN is among its identities.
    assert f"{pki.NODE_URI_PREFIX}{NODE_ID}".encode() in call.peer_identities


def test_the_master_client_certificate_is_the_master(certs: Pki) -> None:
    agent = _node_cert(certs.ca)
    call = asyncio.run(
        _serve_and_call(
            certs.ca,
            agent,
            certs.ca.cert_pem,
            certs.master,
            server_name=pki.node_server_name(NODE_ID),
        )
    )
    assert (call.code, call.kind, call.node_id) == (grpc.StatusCode.OK, "master", "")
    assert call.peer_identities == (pki.MASTER_URI.encode(),)


def test_the_master_server_certificate_verifies_by_ip_without_override(certs: Pki) -> None:
    """The CLI and workers dial 127.0.0.1 and check the master's certificate as is."""
    server = pki.issue_server_cert(certs.ca, ["master.example"], ["10.0.0.5"])
    call = asyncio.run(_serve_and_call(certs.ca, server, certs.ca.cert_pem, certs.node))
    assert call.code == grpc.StatusCode.OK


@pytest.mark.parametrize("client", ["self-signed", "other CA", "no certificate"])
def test_clients_without_a_cluster_certificate_are_refused(certs: Pki, client: str) -> None:
    presented = {
        "self-signed": _self_signed(),
        "other CA": _node_cert(certs.other_ca),
        "no certificate": None,
    }[client]
    server = pki.issue_server_cert(certs.ca)
    call = asyncio.run(_serve_and_call(certs.ca, server, certs.ca.cert_pem, presented))
    # Refused in the TLS handshake: the handler never ran.
    assert call.code == grpc.StatusCode.UNAVAILABLE
    assert call.peer_identities == ()


def test_the_client_refuses_a_server_from_another_ca(certs: Pki) -> None:
    """A worker pins the cluster CA: a look-alike master with its own CA gets nothing."""
    impostor = pki.issue_server_cert(certs.other_ca)
    call = asyncio.run(_serve_and_call(certs.ca, impostor, certs.ca.cert_pem, certs.node))
    assert call.code == grpc.StatusCode.UNAVAILABLE


def test_the_master_refuses_an_agent_that_is_another_node(certs: Pki) -> None:
    """Dialled as node A (name override), a server holding node B's certificate is refused."""
    node_b = _node_cert(certs.ca, str(uuid.uuid4()), "node-b")
    call = asyncio.run(
        _serve_and_call(
            certs.ca,
            node_b,
            certs.ca.cert_pem,
            certs.master,
            server_name=pki.node_server_name(NODE_ID),
        )
    )
    assert call.code == grpc.StatusCode.UNAVAILABLE


def test_a_revoked_node_certificate_is_refused(certs: Pki) -> None:
    server = pki.issue_server_cert(certs.ca)
    revoked = frozenset({pki.serial_of(certs.node.cert_pem)})
    call = asyncio.run(
        _serve_and_call(certs.ca, server, certs.ca.cert_pem, certs.node, revoked=revoked)
    )
    assert call.code == grpc.StatusCode.UNAUTHENTICATED
    other = _node_cert(certs.ca, str(uuid.uuid4()), "node-c")
    call = asyncio.run(_serve_and_call(certs.ca, server, certs.ca.cert_pem, other, revoked=revoked))
    assert call.code == grpc.StatusCode.OK


# ---- the CA ----


def test_fingerprint_is_sha256_of_the_der_certificate(certs: Pki) -> None:
    der = certs.ca.cert.public_bytes(serialization.Encoding.DER)
    assert certs.ca.fingerprint == "sha256:" + hashlib.sha256(der).hexdigest()
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", certs.ca.fingerprint)
    pem = certs.ca.cert_pem
    assert pki.fingerprint(pem) == pki.fingerprint(pem.decode()) == pki.fingerprint(der)
    assert certs.other_ca.fingerprint != certs.ca.fingerprint


def test_ca_is_a_ca(certs: Pki) -> None:
    constraints = certs.ca.cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca
    assert pki.verify_signed_by(certs.ca, certs.ca.cert)


def test_ca_save_and_load(tmp_path: Path, certs: Pki) -> None:
    directory = tmp_path / "pki"
    certs.ca.save(directory)
    assert stat.S_IMODE((directory / "ca.key").stat().st_mode) == 0o600
    loaded = pki.ClusterCA.load(directory)
    assert loaded.fingerprint == certs.ca.fingerprint
    assert pki.verify_signed_by(certs.ca, _node_cert(loaded).cert_pem)
    assert pki.ClusterCA.load_or_create(directory).fingerprint == certs.ca.fingerprint
    assert "key" not in repr(loaded).replace("ClusterCA", "")  # no key material in logs


def test_saving_over_a_loose_key_file_makes_it_private(tmp_path: Path, certs: Pki) -> None:
    (tmp_path / "ca.key").write_text("old")
    (tmp_path / "ca.key").chmod(0o644)
    certs.ca.save(tmp_path)
    assert stat.S_IMODE((tmp_path / "ca.key").stat().st_mode) == 0o600
    certs.node.save(tmp_path, "node")
    assert stat.S_IMODE((tmp_path / "node.key").stat().st_mode) == 0o600
    assert pki.CertKey.load(tmp_path, "node") == certs.node
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_load_refuses_a_key_of_another_ca(tmp_path: Path, certs: Pki) -> None:
    certs.ca.save(tmp_path)
    (tmp_path / "ca.crt").write_bytes(certs.other_ca.cert_pem)
    with pytest.raises(InvalidArgument, match="does not match"):
        pki.ClusterCA.load(tmp_path)


def test_load_or_create_creates_once(tmp_path: Path) -> None:
    first = pki.ClusterCA.load_or_create(tmp_path / "new")
    assert pki.ClusterCA.load_or_create(tmp_path / "new").fingerprint == first.fingerprint


# ---- server and master certificates ----


def _sans(cert_pem: bytes) -> x509.SubjectAlternativeName:
    cert = x509.load_pem_x509_certificate(cert_pem)
    return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value


def test_server_certificate_names(certs: Pki) -> None:
    issued = pki.issue_server_cert(certs.ca, ["master.example", "localhost"], ["10.0.0.5", "::1"])
    sans = _sans(issued.cert_pem)
    assert sans.get_values_for_type(x509.DNSName) == ["localhost", "master.example"]
    assert sans.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address(ip) for ip in ("127.0.0.1", "::1", "10.0.0.5")
    ]
    assert pki.verify_signed_by(certs.ca, issued.cert_pem)
    assert "key_pem" not in repr(issued)
    with pytest.raises(Unauthenticated):
        pki.identity_of(issued.cert_pem)  # a server certificate is nobody's client identity


def test_server_certificate_refuses_bad_names(certs: Pki) -> None:
    with pytest.raises(InvalidArgument, match="invalid IP address"):
        pki.issue_server_cert(certs.ca, ips=["10.0.0.300"])
    with pytest.raises(InvalidArgument, match="invalid DNS name"):
        pki.issue_server_cert(certs.ca, dns_names=["a b"])
    with pytest.raises(InvalidArgument, match="days"):
        pki.issue_server_cert(certs.ca, days=0)


def test_certificates_do_not_outlive_the_ca() -> None:
    short = pki.ClusterCA.create(days=10)
    issued = x509.load_pem_x509_certificate(pki.issue_server_cert(short, days=365).cert_pem)
    assert issued.not_valid_after_utc == short.cert.not_valid_after_utc


def test_master_client_certificate(certs: Pki) -> None:
    identity = pki.check_peer_cert(certs.ca, certs.master.cert_pem)
    assert (identity.kind, identity.node_id) == ("master", "")
    with pytest.raises(Unauthenticated, match="not a node"):
        pki.node_id_of(certs.master.cert_pem)


# ---- node certificates ----


def test_node_certificate_identity(certs: Pki) -> None:
    cert = x509.load_pem_x509_certificate(certs.node.cert_pem)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == NODE_ID
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value == (
        "node-a"
    )
    assert _sans(certs.node.cert_pem).get_values_for_type(x509.UniformResourceIdentifier) == [
        f"multiverse://node/{NODE_ID}"
    ]
    der = cert.public_bytes(serialization.Encoding.DER)
    for form in (certs.node.cert_pem, certs.node.cert_pem.decode(), der, cert):
        assert pki.node_id_of(form) == NODE_ID
    assert pki.node_server_name(NODE_ID) == f"{NODE_ID}.node.multiverse"
    key = serialization.load_pem_private_key(certs.node.key_pem, password=None)
    assert key.public_key() == cert.public_key()


def test_a_callers_identity_is_parsed_once_per_certificate(
    certs: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An agent asks who called at every call: the same certificate is parsed once; another
    certificate is parsed for itself; one without an identity is refused every time."""
    parsed: list[bytes] = []
    identity_of = pki.identity_of

    def counted(cert: pki.CertInput) -> pki.PeerIdentity:
        parsed.append(bytes(cert) if isinstance(cert, bytes) else b"")
        return identity_of(cert)

    monkeypatch.setattr(pki, "identity_of", counted)
    pki._identity_of_pem.cache_clear()  # what earlier tests of this process left there
    server = pki.issue_server_cert(certs.ca, ["localhost"])
    for _ in range(3):
        assert pki.peer_identity_of({"x509_pem_cert": [certs.master.cert_pem]}).kind == "master"
        node = pki.peer_identity_of({"x509_pem_cert": [certs.node.cert_pem]})
        assert (node.kind, node.node_id) == ("node", NODE_ID)
        with pytest.raises(Unauthenticated, match="no multiverse identity"):
            pki.peer_identity_of({"x509_pem_cert": [server.cert_pem]})
    assert parsed.count(certs.master.cert_pem) == 1
    assert parsed.count(certs.node.cert_pem) == 1
    assert parsed.count(server.cert_pem) == 3
    with pytest.raises(Unauthenticated, match="no client certificate"):
        pki.peer_identity_of({})


def test_a_csr_cannot_choose_its_identity(certs: Pki) -> None:
    """Whatever the CSR asks for (the master's URI, another CN), the master writes its own."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "master")]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(pki.MASTER_URI)]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )
    cert_pem = pki.sign_node_csr(certs.ca, csr, NODE_ID, "node-a")
    identity = pki.check_peer_cert(certs.ca, cert_pem)
    assert (identity.kind, identity.node_id) == ("node", NODE_ID)
    assert pki.MASTER_URI not in _sans(cert_pem).get_values_for_type(x509.UniformResourceIdentifier)


def _csr_with_key(key: Any) -> bytes:
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "n")]))
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )


def _tampered_csr() -> bytes:
    """A CSR whose public key was swapped after signing: no proof of holding the key."""
    first = x509.load_pem_x509_csr(pki.new_key_and_csr("a")[1])
    other = x509.load_pem_x509_csr(pki.new_key_and_csr("b")[1])
    der = first.public_bytes(serialization.Encoding.DER)
    first_key = first.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    other_key = other.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    forged = x509.load_der_x509_csr(der.replace(first_key, other_key))
    return forged.public_bytes(serialization.Encoding.PEM)


@pytest.mark.parametrize(
    ("make_csr", "node_id", "words"),
    [
        (lambda: b"not a csr", NODE_ID, "not a valid PEM"),
        (lambda: b"x" * 20000, NODE_ID, "too large"),
        (_tampered_csr, NODE_ID, "not signed by its own key"),
        (lambda: _csr_with_key(rsa.generate_private_key(65537, 2048)), NODE_ID, "ECDSA"),
        (lambda: _csr_with_key(ec.generate_private_key(ec.SECP521R1())), NODE_ID, "ECDSA"),
        (lambda: pki.new_key_and_csr("n")[1], "not-a-uuid", "invalid node id"),
        (lambda: pki.new_key_and_csr("n")[1], NODE_ID.upper(), "invalid node id"),
    ],
    ids=["garbage", "huge", "tampered", "rsa", "p521", "bad-id", "uppercase-id"],
)
def test_bad_csrs_are_refused(
    certs: Pki, make_csr: Callable[[], bytes], node_id: str, words: str
) -> None:
    with pytest.raises(InvalidArgument, match=words):
        pki.sign_node_csr(certs.ca, make_csr(), node_id, "node-a")


# ---- verification and revocation ----


def test_verify_signed_by(certs: Pki) -> None:
    assert pki.verify_signed_by(certs.ca, certs.node.cert_pem)
    assert not pki.verify_signed_by(certs.other_ca, certs.node.cert_pem)
    assert not pki.verify_signed_by(certs.ca, _self_signed().cert_pem)
    assert not pki.verify_signed_by(certs.ca, certs.other_ca.cert)
    assert not pki.verify_signed_by(certs.ca, b"garbage")


def test_check_peer_cert_refusals(certs: Pki) -> None:
    with pytest.raises(Unauthenticated, match="not signed by this cluster"):
        pki.check_peer_cert(certs.ca, _self_signed().cert_pem)
    with pytest.raises(Unauthenticated, match="not signed by this cluster"):
        pki.check_peer_cert(certs.ca, _node_cert(certs.other_ca).cert_pem)
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=366)
    with pytest.raises(Unauthenticated, match="expired"):
        pki.check_peer_cert(certs.ca, certs.node.cert_pem, now=later)
    earlier = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    with pytest.raises(Unauthenticated, match="not valid yet"):
        pki.check_peer_cert(certs.ca, certs.node.cert_pem, now=earlier)


def test_revocation_by_serial(certs: Pki) -> None:
    serial = pki.serial_of(certs.node.cert_pem)
    assert re.fullmatch(r"[0-9a-f]+", serial)
    assert int(serial, 16) == x509.load_pem_x509_certificate(certs.node.cert_pem).serial_number
    other = _node_cert(certs.ca)  # the same node, certified again: a new serial
    assert pki.serial_of(other.cert_pem) != serial
    revoked = {serial}
    assert pki.is_revoked(certs.node.cert_pem, revoked)
    assert not pki.is_revoked(other.cert_pem, revoked)
    with pytest.raises(Unauthenticated, match="revoked"):
        pki.check_peer_cert(certs.ca, certs.node.cert_pem, revoked)
    assert pki.check_peer_cert(certs.ca, other.cert_pem, revoked).node_id == NODE_ID


def test_peer_cert_of_needs_a_certificate(certs: Pki) -> None:
    assert pki.peer_cert_of({"x509_pem_cert": [certs.node.cert_pem]}) == certs.node.cert_pem
    with pytest.raises(Unauthenticated, match="no client certificate"):
        pki.peer_cert_of({"transport_security_type": [b"ssl"]})


def test_ca_matching_fingerprint(certs: Pki) -> None:
    pem = certs.ca.cert_pem
    assert pki.ca_matching_fingerprint(pem, certs.ca.fingerprint) == pem
    assert pki.ca_matching_fingerprint(pem, certs.ca.fingerprint.upper().replace("SHA", "sha"))
    with pytest.raises(Unauthenticated, match="does not match"):
        pki.ca_matching_fingerprint(certs.other_ca.cert_pem, certs.ca.fingerprint)


# ---- join tokens ----


def _token(certs: Pki) -> pki.JoinToken:
    return pki.JoinToken(
        ("10.0.0.1:1337", "master.example:1337", "[fd00::1]:1337"),
        certs.ca.fingerprint,
        "0123456789abcdef",
        new_secret(),
    )


def test_join_token_round_trip(certs: Pki) -> None:
    token = _token(certs)
    text = token.encode()
    assert text.startswith("mvj1.")
    assert re.fullmatch(r"mvj1\.[A-Za-z0-9_-]+", text)  # one word to copy: no padding, no +/
    assert pki.JoinToken.decode(text) == token
    assert pki.JoinToken.decode(f"  {text}\n") == token  # pasted with a newline
    assert token.credential == f"mvj.0123456789abcdef.{token.secret}"
    assert token.secret not in repr(token)


def _encoded(payload: object) -> str:
    raw = json.dumps(payload).encode()
    return "mvj1." + base64.urlsafe_b64encode(raw).decode().rstrip("=")


_SECRET = "s" * 43
_GOOD = {
    "addresses": ["10.0.0.1:1337"],
    "ca": "sha256:" + "a" * 64,
    "id": "0123456789abcdef",
    "secret": _SECRET,
}

MALFORMED = [
    ("", "must start with 'mvj1.'"),
    ("mvj.0123.secret", "must start with 'mvj1.'"),
    ("mvj1.", "damaged"),
    ("mvj1.!!!!", "damaged"),
    ("mvj1." + base64.urlsafe_b64encode(b"\xff\xfe").decode(), "damaged"),
    (_encoded(_GOOD) + "=", "damaged"),
    ("mvj1." + "A" * 5000, "too long"),
    (_encoded([1, 2]), "expected the fields"),
    (_encoded({k: v for k, v in _GOOD.items() if k != "ca"}), "expected the fields"),
    (_encoded({**_GOOD, "extra": 1}), "expected the fields"),
    (_encoded({**_GOOD, "addresses": "10.0.0.1:1337"}), "list of HOST:PORT"),
    (_encoded({**_GOOD, "addresses": [1337]}), "list of HOST:PORT"),
    (_encoded({**_GOOD, "addresses": []}), "no master address"),
    (_encoded({**_GOOD, "addresses": ["10.0.0.1"]}), "bad master address"),
    (_encoded({**_GOOD, "addresses": ["10.0.0.1:99999"]}), "bad master address"),
    (_encoded({**_GOOD, "addresses": ["a b:1"]}), "bad master address"),
    (_encoded({**_GOOD, "addresses": ["h:1"] * 17}), "too many"),
    (_encoded({**_GOOD, "ca": "a" * 64}), "fingerprint"),
    (_encoded({**_GOOD, "ca": "sha256:" + "A" * 64}), "fingerprint"),
    (_encoded({**_GOOD, "ca": None}), "ca must be a string"),
    (_encoded({**_GOOD, "id": ""}), "bad token id"),
    (_encoded({**_GOOD, "id": 7}), "id must be a string"),
    (_encoded({**_GOOD, "secret": "short"}), "bad secret"),
    (_encoded({**_GOOD, "secret": _SECRET + "/"}), "bad secret"),
]


def test_the_malformed_cases_start_from_a_good_token() -> None:
    assert pki.JoinToken.decode(_encoded(_GOOD)).secret == _SECRET


@pytest.mark.parametrize(("text", "words"), MALFORMED, ids=range(len(MALFORMED)))
def test_malformed_join_tokens_are_refused_clearly(text: str, words: str) -> None:
    with pytest.raises(InvalidArgument, match=re.escape(words)) as raised:
        pki.JoinToken.decode(text)
    message = raised.value.message
    assert message.startswith("invalid join token")
    assert _SECRET not in message and "sssss" not in message  # never echo the secret


def test_join_token_constructor_checks_too(certs: Pki) -> None:
    with pytest.raises(InvalidArgument, match="fingerprint"):
        pki.JoinToken(("h:1",), "md5:00", "ab", _SECRET)
