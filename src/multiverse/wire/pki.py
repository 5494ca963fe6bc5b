"""The cluster's certificates: one CA per cluster, and what it signs.

Why this shape:

- The master creates a CA at init. Its listeners (gRPC :1337, HTTPS :1338) present a server
  certificate from it; join tokens and the CLI config pin the CA by its fingerprint
  (``sha256:<hex of the DER certificate>``, as kubeadm prints it), so a client needs no prior
  trust store and no one in the middle can pose as the master.
- A worker makes its own key and sends only a CSR with its join token; the private key never
  leaves the host. The master ignores everything the CSR asks for except the public key and
  writes the identity itself (node id in the subject CN and in the URI SAN
  ``multiverse://node/<uuid>``), so a node cannot ask to be another node, or the master.
- The node certificate serves both ways: as the client certificate of the worker's Sync stream,
  and as the server certificate of its agent listener. Its DNS SAN ``<uuid>.node.multiverse``
  (:func:`node_server_name`) is what the master passes as ``grpc.ssl_target_name_override``, so
  the master checks that it reached *that* node, whatever address the node has today.
- The master calls agents with its own client certificate (URI SAN ``multiverse://master``);
  agents accept only that identity.
- TLS checks the chain and the dates; revocation is ours: the master keeps the serials of
  removed nodes, and :func:`check_peer_cert` refuses them. Serials are 159-bit numbers, too big
  for a database integer, so they travel as lowercase hex strings (:func:`serial_of`).

Keys are ECDSA P-256: gRPC's BoringSSL takes it for servers and clients alike (tests/test_pki.py
shows it), it is small and fast, and every TLS stack knows it. Ed25519 is not an option: with
grpcio 1.85 the handshake fails with NO_COMMON_SIGNATURE_ALGORITHMS.

Everything here is a pure function of its inputs, except :meth:`ClusterCA.load`,
:meth:`ClusterCA.save` and :meth:`CertKey.save`, which name their files.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import functools
import hashlib
import ipaddress
import json
import re
import uuid
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from multiverse.core.errors import InvalidArgument, Unauthenticated
from multiverse.core.files import write_private

NODE_URI_PREFIX = "multiverse://node/"
MASTER_URI = "multiverse://master"
NODE_DNS_SUFFIX = ".node.multiverse"
CA_CERT_FILE = "ca.crt"
CA_KEY_FILE = "ca.key"

CA_DAYS = 3650
CERT_DAYS = 365
# A node certificate's default life; workers renew theirs when a third of it is left
# (:func:`renewal_due`), so it never runs out while the node is in touch with its master.
NODE_CERT_LIFETIME = dt.timedelta(days=CERT_DAYS)
MIN_CERT_LIFETIME = dt.timedelta(seconds=10)
# Certificates start a little in the past, so a node whose clock lags the master's still
# accepts a certificate issued a moment ago; by a tenth of a short life at most, so that
# backdating does not eat the life of a certificate issued for seconds (as tests do).
CLOCK_SKEW = dt.timedelta(minutes=5)
# A CSR is a few hundred bytes; anything far larger is hostile and is refused before parsing.
MAX_CSR_BYTES = 16 * 1024
_CURVE = ec.SECP256R1
_ACCEPTED_CURVES = ("secp256r1", "secp384r1")

CertInput = bytes | str | x509.Certificate


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(_CURVE())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def as_cert(cert: CertInput) -> x509.Certificate:
    """A certificate from PEM (bytes or str), DER bytes, or an already parsed one.

    Callers get certificates from files (PEM), from gRPC's auth context (PEM) and from
    databases (DER); one entry point keeps every other function indifferent to that.
    """
    if isinstance(cert, x509.Certificate):
        return cert
    data = cert.encode() if isinstance(cert, str) else cert
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except ValueError as exc:
        raise InvalidArgument("not a valid X.509 certificate") from exc


def fingerprint(cert: CertInput) -> str:
    """``sha256:<hex>`` of the DER certificate: the form join tokens and configs pin."""
    der = as_cert(cert).public_bytes(serialization.Encoding.DER)
    return "sha256:" + hashlib.sha256(der).hexdigest()


_FINGERPRINT = re.compile(r"sha256:[0-9a-f]{64}")


def serial_of(cert: CertInput) -> str:
    """The serial as lowercase hex: what the master stores for a revoked certificate."""
    return format(as_cert(cert).serial_number, "x")


@dataclass(frozen=True)
class CertKey:
    """A certificate and its private key, both PEM: what a TLS listener or client presents."""

    cert_pem: bytes
    key_pem: bytes = field(repr=False)

    def save(self, directory: Path, stem: str) -> None:
        """``<stem>.crt`` (0644) and ``<stem>.key`` (0600) in ``directory``."""
        write_private(directory / f"{stem}.key", self.key_pem)
        write_private(directory / f"{stem}.crt", self.cert_pem, 0o644)

    @staticmethod
    def load(directory: Path, stem: str) -> CertKey:
        return CertKey(
            (directory / f"{stem}.crt").read_bytes(), (directory / f"{stem}.key").read_bytes()
        )


@dataclass(frozen=True)
class ClusterCA:
    """The cluster's certificate authority: its certificate and its private key."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey = field(repr=False)

    @staticmethod
    def create(name: str = "multiverse cluster CA", days: int = CA_DAYS) -> ClusterCA:
        key = _new_key()
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "multiverse"),
                x509.NameAttribute(NameOID.COMMON_NAME, name),
            ]
        )
        start = _now() - CLOCK_SKEW
        public = key.public_key()
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(start + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .sign(key, hashes.SHA256())
        )
        return ClusterCA(cert, key)

    @staticmethod
    def load(directory: Path) -> ClusterCA:
        """The CA kept in ``directory`` (``ca.crt``, ``ca.key``)."""
        cert = x509.load_pem_x509_certificate((directory / CA_CERT_FILE).read_bytes())
        key = serialization.load_pem_private_key(
            (directory / CA_KEY_FILE).read_bytes(), password=None
        )
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise InvalidArgument(f"{directory / CA_KEY_FILE} is not an EC private key")
        if key.public_key() != cert.public_key():
            raise InvalidArgument(f"{directory / CA_KEY_FILE} does not match {CA_CERT_FILE}")
        return ClusterCA(cert, key)

    @staticmethod
    def load_or_create(directory: Path) -> ClusterCA:
        """What ``master`` init wants: the existing CA, or a new one saved there."""
        if (directory / CA_CERT_FILE).exists():
            return ClusterCA.load(directory)
        ca = ClusterCA.create()
        ca.save(directory)
        return ca

    def save(self, directory: Path) -> None:
        """``ca.key`` (0600) first, then ``ca.crt``: a crash leaves no certificate without key."""
        write_private(directory / CA_KEY_FILE, _key_pem(self.key))
        write_private(directory / CA_CERT_FILE, self.cert_pem, 0o644)

    @property
    def cert_pem(self) -> bytes:
        return _cert_pem(self.cert)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.cert)

    def _issue(
        self,
        public_key: ec.EllipticCurvePublicKey,
        subject: x509.Name,
        sans: Sequence[x509.GeneralName],
        usages: Sequence[x509.ObjectIdentifier],
        lifetime: dt.timedelta,
    ) -> x509.Certificate:
        check_lifetime(lifetime)
        issued = _now()
        start = issued - min(CLOCK_SKEW, lifetime / 10)
        # Never outlive the CA: a client would refuse the chain anyway, and later than a
        # server's own certificate, which confuses whoever debugs it.
        end = min(issued + lifetime, self.cert.not_valid_after_utc)
        ca_ski = self.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage(list(usages)), critical=False)
            .add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                critical=False,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .sign(self.key, hashes.SHA256())
        )


def check_lifetime(lifetime: dt.timedelta) -> dt.timedelta:
    """``lifetime`` if a certificate may be issued for that long; InvalidArgument otherwise."""
    if not MIN_CERT_LIFETIME <= lifetime <= dt.timedelta(days=CA_DAYS):
        raise InvalidArgument(
            f"a certificate's lifetime must be between {MIN_CERT_LIFETIME.seconds}s and "
            f"{CA_DAYS} days, not {lifetime}"
        )
    return lifetime


# ---- the master's certificates ----


def issue_server_cert(
    ca: ClusterCA,
    dns_names: Iterable[str] = (),
    ips: Iterable[str] = (),
    days: int = CERT_DAYS,
) -> CertKey:
    """The certificate of the master's gRPC and HTTPS listeners.

    localhost, 127.0.0.1 and ::1 are always in it, so the CLI and an all-in-one worker on the
    master's machine reach it by any of those names.
    """
    names = list(dict.fromkeys(["localhost", *dns_names]))
    try:
        addresses = list(
            dict.fromkeys(ipaddress.ip_address(ip) for ip in ["127.0.0.1", "::1", *ips])
        )
    except ValueError as exc:
        raise InvalidArgument(f"invalid IP address for the server certificate: {exc}") from exc
    for name in names:
        if not name or len(name) > 253 or any(c.isspace() for c in name):
            raise InvalidArgument(f"invalid DNS name for the server certificate: {name!r}")
    sans: list[x509.GeneralName] = [x509.DNSName(name) for name in names]
    sans += [x509.IPAddress(address) for address in addresses]
    key = _new_key()
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "multiverse"),
            x509.NameAttribute(NameOID.COMMON_NAME, "multiverse master"),
        ]
    )
    usages = [ExtendedKeyUsageOID.SERVER_AUTH]
    cert = ca._issue(key.public_key(), subject, sans, usages, dt.timedelta(days=days))
    return CertKey(_cert_pem(cert), _key_pem(key))


def sign_master_client_cert(ca: ClusterCA, name: str = "master", days: int = CERT_DAYS) -> CertKey:
    """The certificate the master presents to agents; its identity is ``multiverse://master``.

    ``name`` (say, the host of one of several masters) is for people reading the certificate;
    agents look only at the URI.
    """
    key = _new_key()
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "multiverse masters"),
            x509.NameAttribute(NameOID.COMMON_NAME, name[:64] or "master"),
        ]
    )
    sans = [x509.UniformResourceIdentifier(MASTER_URI)]
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    cert = ca._issue(key.public_key(), subject, sans, usages, dt.timedelta(days=days))
    return CertKey(_cert_pem(cert), _key_pem(key))


# ---- node certificates ----


def node_server_name(node_id: str) -> str:
    """The DNS SAN of a node's certificate: the master's ``ssl_target_name_override``."""
    return f"{_canonical_uuid(node_id)}{NODE_DNS_SUFFIX}"


def _canonical_uuid(node_id: str) -> str:
    try:
        parsed = uuid.UUID(node_id)
    except (ValueError, TypeError, AttributeError) as exc:
        raise InvalidArgument(f"invalid node id {node_id!r}: expected a UUID") from exc
    if str(parsed) != node_id:
        raise InvalidArgument(f"invalid node id {node_id!r}: expected a lowercase dashed UUID")
    return node_id


def new_key_and_csr(node_name: str) -> tuple[bytes, bytes]:
    """Worker side: a fresh private key and a CSR for it, both PEM.

    The CSR's subject carries the node's name only as a hint for the operator; the master
    writes the real identity when it signs.
    """
    key_pem = _key_pem(_new_key())
    return key_pem, csr_for_key(key_pem, node_name)


def csr_for_key(key_pem: bytes, node_name: str) -> bytes:
    """A CSR (PEM) for a key the worker holds already: what a renewal sends.

    Renewing keeps the key, so only the certificate file changes, in one atomic rename: a crash
    mid-renewal can never leave a key that does not match its certificate.
    """
    key = serialization.load_pem_private_key(key_pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise InvalidArgument("the node's key is not an EC private key")
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_name[:64] or "-")]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def renewal_due(cert: CertInput) -> dt.datetime:
    """When a worker renews its certificate: once a third of its life is left.

    A third leaves room to retry through a master outage of that long (four months for the
    default year), as kubelet's rotation does at 70-90 % of the life.
    """
    parsed = as_cert(cert)
    start, end = parsed.not_valid_before_utc, parsed.not_valid_after_utc
    return start + (end - start) * 2 / 3


def sign_node_csr(
    ca: ClusterCA,
    csr_pem: bytes | str,
    node_id: str,
    node_name: str,
    lifetime: dt.timedelta = NODE_CERT_LIFETIME,
) -> bytes:
    """Master side: the node's certificate (PEM) for the key in ``csr_pem``.

    The CSR must be well formed, self-signed by its key (proof the worker holds it) and use an
    EC key gRPC accepts. Its subject and extensions are ignored: the certificate says what the
    master decided (``node_id``, ``node_name``), nothing the worker asked for.
    """
    node_id = _canonical_uuid(node_id)
    if not node_name or len(node_name) > 63:
        raise InvalidArgument("node name must be 1 to 63 characters")
    data = csr_pem.encode() if isinstance(csr_pem, str) else csr_pem
    if len(data) > MAX_CSR_BYTES:
        raise InvalidArgument(f"certificate request too large (over {MAX_CSR_BYTES} bytes)")
    try:
        csr = x509.load_pem_x509_csr(data)
    except ValueError as exc:
        raise InvalidArgument("not a valid PEM certificate signing request") from exc
    if not csr.is_signature_valid:
        raise InvalidArgument("the certificate request is not signed by its own key")
    public = csr.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey) or public.curve.name not in (
        _ACCEPTED_CURVES
    ):
        raise InvalidArgument(
            "the certificate request's key must be ECDSA P-256 or P-384 "
            "(make it with multiverse's worker)"
        )
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "multiverse nodes"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, node_name),
            x509.NameAttribute(NameOID.COMMON_NAME, node_id),
        ]
    )
    sans = [
        x509.UniformResourceIdentifier(NODE_URI_PREFIX + node_id),
        x509.DNSName(node_server_name(node_id)),
    ]
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH]
    return _cert_pem(ca._issue(public, subject, sans, usages, lifetime))


# ---- identities and checks ----


@dataclass(frozen=True)
class PeerIdentity:
    """Who a certificate speaks for: a node (with its id) or the master."""

    kind: Literal["node", "master"]
    node_id: str  # "" for the master
    serial: str


def _uris(cert: x509.Certificate) -> list[str]:
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return list(sans.get_values_for_type(x509.UniformResourceIdentifier))


def identity_of(cert: CertInput) -> PeerIdentity:
    """The identity in a certificate's URI SAN; raises Unauthenticated when it has none.

    Only the URI counts: it is the one part the master always writes itself. A certificate with
    two identities is refused rather than guessed at.
    """
    parsed = as_cert(cert)
    found: list[PeerIdentity] = []
    for uri in _uris(parsed):
        if uri == MASTER_URI:
            found.append(PeerIdentity("master", "", serial_of(parsed)))
        elif uri.startswith(NODE_URI_PREFIX):
            node_id = uri.removeprefix(NODE_URI_PREFIX)
            try:
                _canonical_uuid(node_id)
            except InvalidArgument:
                continue
            found.append(PeerIdentity("node", node_id, serial_of(parsed)))
    if len(found) != 1:
        raise Unauthenticated("the certificate carries no multiverse identity")
    return found[0]


def node_id_of(cert: CertInput) -> str:
    """The node id of a node certificate; raises Unauthenticated for any other certificate."""
    identity = identity_of(cert)
    if identity.kind != "node":
        raise Unauthenticated("not a node certificate")
    return identity.node_id


def verify_signed_by(ca: ClusterCA, cert: CertInput) -> bool:
    """Whether ``cert`` names the CA as its issuer and carries the CA's valid signature."""
    try:
        as_cert(cert).verify_directly_issued_by(ca.cert)
    except (ValueError, TypeError, InvalidSignature, InvalidArgument):
        return False
    return True


def is_revoked(cert: CertInput, revoked_serials: Collection[str]) -> bool:
    """Whether the certificate's serial (lowercase hex, see :func:`serial_of`) is revoked."""
    return serial_of(cert) in revoked_serials


def check_peer_cert(
    ca: ClusterCA,
    cert: CertInput,
    revoked_serials: Collection[str] = frozenset(),
    *,
    now: dt.datetime | None = None,
) -> PeerIdentity:
    """The identity of a peer certificate that the CA signed, that is in date and not revoked.

    gRPC checks the chain and dates during the handshake already; this is the second look the
    servers take (revocation above all), and the whole check where no TLS stack did the first.
    Every refusal raises Unauthenticated with words that reveal nothing secret.
    """
    parsed = as_cert(cert)
    if not verify_signed_by(ca, parsed):
        raise Unauthenticated("the certificate is not signed by this cluster's CA")
    moment = now or _now()
    if not parsed.not_valid_before_utc <= moment <= parsed.not_valid_after_utc:
        raise Unauthenticated("the certificate has expired or is not valid yet")
    if is_revoked(parsed, revoked_serials):
        raise Unauthenticated("the certificate has been revoked")
    return identity_of(parsed)


def peer_identity_of(auth_context: Mapping[str, Iterable[bytes]]) -> PeerIdentity:
    """The identity of a gRPC caller's certificate (see :func:`identity_of`), parsed once per
    certificate: an agent checks every call, and a launch storm parsed the master's same
    certificate hundreds of times a second. Only the certificate's own contents are read, so
    keeping the answer is safe; revocation and dates are :func:`check_peer_cert`'s."""
    return _identity_of_pem(peer_cert_of(auth_context))


@functools.lru_cache(maxsize=64)
def _identity_of_pem(pem: bytes) -> PeerIdentity:
    return identity_of(pem)


def peer_cert_of(auth_context: Mapping[str, Iterable[bytes]]) -> bytes:
    """The peer's certificate (PEM) from ``context.auth_context()`` of a gRPC servicer.

    gRPC puts the whole verified certificate under ``x509_pem_cert``; parsing it ourselves
    beats relying on which SAN gRPC picks as the "peer identity".
    """
    values = list(auth_context.get("x509_pem_cert", ()))
    if not values:
        raise Unauthenticated("no client certificate")
    return values[0]


def ca_matching_fingerprint(ca_pem: bytes, expected: str) -> bytes:
    """``ca_pem`` if its fingerprint is ``expected``; the worker's first, pinned, contact.

    A joining worker fetches the CA without trusting anyone yet, then keeps it only if it is the
    one its join token names (as kubeadm's discovery-token-ca-cert-hash).
    """
    if fingerprint(ca_pem) != expected.lower():
        raise Unauthenticated(
            "the master's CA does not match the fingerprint in the join token; "
            "check the master address or create a new token"
        )
    return ca_pem


# ---- gRPC credentials ----


def server_credentials(
    ca_pem: bytes, own: CertKey, *, require_client_auth: bool
) -> grpc.ServerCredentials:
    """TLS for a gRPC listener: the master's (clients optional at Join) or an agent's (required)."""
    return grpc.ssl_server_credentials(
        [(own.key_pem, own.cert_pem)],
        root_certificates=ca_pem,
        require_client_auth=require_client_auth,
    )


def reloading_server_credentials(
    ca_pem: bytes, current: Callable[[], CertKey]
) -> grpc.ServerCredentials:
    """TLS for an agent's listener (client certificates required) that serves whatever
    ``current()`` returns at each new handshake: a renewed certificate is used without a
    restart, and connections made before keep theirs."""
    served = current()

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        nonlocal served
        latest = current()
        if latest == served:
            return None  # gRPC keeps the configuration it has
        served = latest
        return grpc.ssl_server_certificate_configuration(
            [(latest.key_pem, latest.cert_pem)], root_certificates=ca_pem
        )

    initial = grpc.ssl_server_certificate_configuration(
        [(served.key_pem, served.cert_pem)], root_certificates=ca_pem
    )
    return grpc.dynamic_ssl_server_credentials(
        initial,
        fetch,  # type: ignore[arg-type]  # grpc-stubs: but gRPC documents None as "unchanged"
        require_client_authentication=True,
    )


def channel_credentials(ca_pem: bytes, own: CertKey | None = None) -> grpc.ChannelCredentials:
    """TLS for a gRPC channel that trusts only the cluster's CA, with a client cert if given."""
    return grpc.ssl_channel_credentials(
        root_certificates=ca_pem,
        private_key=own.key_pem if own else None,
        certificate_chain=own.cert_pem if own else None,
    )


# ---- join tokens ----

JOIN_TOKEN_PREFIX = "mvj1."
MAX_JOIN_TOKEN_LENGTH = 4096
_TOKEN_FIELDS = {"addresses", "ca", "id", "secret"}
_TOKEN_ID = re.compile(r"[0-9a-f]{1,64}")
_TOKEN_SECRET = re.compile(r"[A-Za-z0-9_-]{16,128}")
_ADDRESS = re.compile(r"(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+):[0-9]{1,5}")


@dataclass(frozen=True)
class JoinToken:
    """What a worker needs to join: where the master is, which CA to trust, and the secret.

    Encoded as ``mvj1.<base64url(json)>``, one string to copy, like kubeadm's and Incus's join
    tokens. The secret is kept out of ``repr`` so a logged token object leaks nothing.
    """

    addresses: tuple[str, ...]
    ca_fingerprint: str
    token_id: str
    secret: str = field(repr=False)

    def __post_init__(self) -> None:
        _check_token(self)

    @property
    def credential(self) -> str:
        """The part the master checks: ``mvj.<id>.<secret>``, as master/auth.py issues it."""
        return f"mvj.{self.token_id}.{self.secret}"

    def encode(self) -> str:
        body = json.dumps(
            {
                "addresses": list(self.addresses),
                "ca": self.ca_fingerprint,
                "id": self.token_id,
                "secret": self.secret,
            },
            separators=(",", ":"),
            sort_keys=True,
        )
        return JOIN_TOKEN_PREFIX + base64.urlsafe_b64encode(body.encode()).decode().rstrip("=")

    @staticmethod
    def decode(token: str) -> JoinToken:
        """The token in ``token``; raises InvalidArgument saying what is wrong (never echoing it,
        since a damaged token still holds most of a secret)."""
        token = token.strip()
        if len(token) > MAX_JOIN_TOKEN_LENGTH:
            raise InvalidArgument("invalid join token: too long")
        if not token.startswith(JOIN_TOKEN_PREFIX):
            raise InvalidArgument(
                f"invalid join token: it must start with {JOIN_TOKEN_PREFIX!r}; "
                "copy the whole output of `multiverse token create`"
            )
        payload = token.removeprefix(JOIN_TOKEN_PREFIX)
        try:
            raw = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
            if base64.urlsafe_b64encode(raw).decode().rstrip("=") != payload:
                raise ValueError("not canonical base64url")
            data = json.loads(raw)
        except (binascii.Error, ValueError) as exc:
            raise InvalidArgument(
                "invalid join token: damaged (not base64url JSON); copy it again"
            ) from exc
        if not isinstance(data, dict) or set(data) != _TOKEN_FIELDS:
            raise InvalidArgument(
                f"invalid join token: expected the fields {', '.join(sorted(_TOKEN_FIELDS))}"
            )
        addresses = data["addresses"]
        if not isinstance(addresses, list) or not all(isinstance(a, str) for a in addresses):
            raise InvalidArgument("invalid join token: addresses must be a list of HOST:PORT")
        for key in ("ca", "id", "secret"):
            if not isinstance(data[key], str):
                raise InvalidArgument(f"invalid join token: {key} must be a string")
        return JoinToken(tuple(addresses), data["ca"], data["id"], data["secret"])


def _check_token(token: JoinToken) -> None:
    if not token.addresses:
        raise InvalidArgument("invalid join token: no master address")
    if len(token.addresses) > 16:
        raise InvalidArgument("invalid join token: too many master addresses (at most 16)")
    for address in token.addresses:
        match = _ADDRESS.fullmatch(address)
        if match is None or not 0 < int(address.rsplit(":", 1)[1]) <= 65535:
            raise InvalidArgument(f"invalid join token: bad master address {address[:80]!r}")
    if not _FINGERPRINT.fullmatch(token.ca_fingerprint):
        raise InvalidArgument("invalid join token: the CA fingerprint must be sha256:<64 hex>")
    if not _TOKEN_ID.fullmatch(token.token_id):
        raise InvalidArgument("invalid join token: bad token id")
    if not _TOKEN_SECRET.fullmatch(token.secret):
        raise InvalidArgument("invalid join token: bad secret")
