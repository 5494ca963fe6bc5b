"""The master's tables. Migrations in ``migrations/versions`` create exactly these."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, datetime: DateTime(timezone=True)}


class NodeRow(Base):
    __tablename__ = "nodes"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(String(63), unique=True)
    address: Mapped[str] = mapped_column(String(255))
    driver: Mapped[str] = mapped_column(String(32))
    labels: Mapped[dict[str, Any]] = mapped_column(default=dict)  # the node's own, from its join
    admin_labels: Mapped[dict[str, Any]] = mapped_column(default=dict)  # `node label`: these win
    status: Mapped[str] = mapped_column(String(16))
    cordoned: Mapped[bool] = mapped_column(Boolean, default=False)
    cpus: Mapped[int] = mapped_column(Integer, default=0)
    memory: Mapped[int] = mapped_column(BigInteger, default=0)
    disk: Mapped[int] = mapped_column(BigInteger, default=0)
    cert_serial: Mapped[str] = mapped_column(String(64), default="")
    version: Mapped[str] = mapped_column(String(32), default="")
    last_sync: Mapped[datetime | None] = mapped_column(default=None)
    created_at: Mapped[datetime]
    # What its instances take, changed in the same transaction as they are placed, moved or
    # deleted (the Store does it), so no read has to aggregate the instances table.
    allocated_cpus: Mapped[int] = mapped_column(Integer, default=0)
    allocated_memory: Mapped[int] = mapped_column(BigInteger, default=0)
    allocated_disk: Mapped[int] = mapped_column(BigInteger, default=0)
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    # "bridge" (its VMs are on the cluster network) or "user" (no CAP_NET_ADMIN: QEMU's NAT).
    network_mode: Mapped[str] = mapped_column(String(16), default="")
    message: Mapped[str] = mapped_column(Text, default="")  # `node add`: step or failure
    install: Mapped[dict[str, Any]] = mapped_column(default=dict)  # `node add`: where, how
    # What the host measured it uses, as of its last report (cores busy; bytes).
    used_cpus: Mapped[float] = mapped_column(Float, default=0.0)
    used_memory: Mapped[int] = mapped_column(BigInteger, default=0)
    used_disk: Mapped[int] = mapped_column(BigInteger, default=0)


class InstanceRow(Base):
    __tablename__ = "instances"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    # Unique by constraint, so two concurrent launches of one name cannot both succeed.
    name: Mapped[str] = mapped_column(String(63), unique=True)
    node_id: Mapped[str | None] = mapped_column(ForeignKey("nodes.id"), index=True)
    cpus: Mapped[int] = mapped_column(Integer)
    memory: Mapped[int] = mapped_column(BigInteger)
    disk: Mapped[int] = mapped_column(BigInteger)
    image: Mapped[str] = mapped_column(String(128))
    user_data: Mapped[str] = mapped_column(Text, default="")
    labels: Mapped[dict[str, Any]] = mapped_column(default=dict)
    desired: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16))
    ipv4: Mapped[str] = mapped_column(String(64), default="")
    release: Mapped[str] = mapped_column(String(128), default="")
    message: Mapped[str] = mapped_column(Text, default="")
    version: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[datetime]
    # How often the reconciler started it again after it stopped on its own.
    restarts: Mapped[int] = mapped_column(Integer, default=0)
    # The node it was evacuated from (``node restore`` brings it back), and whether a drain
    # stopped it (``node restore`` starts it again).
    moved_from: Mapped[str | None] = mapped_column(String(36), default=None)
    held: Mapped[bool] = mapped_column(Boolean, default=False)


class NetworkRow(Base):
    """The cluster network, fixed at the master's first start (``master --network``)."""

    __tablename__ = "networks"

    name: Mapped[str] = mapped_column(String(63), primary_key=True)
    cidr: Mapped[str] = mapped_column(String(64))
    nat: Mapped[bool] = mapped_column(Boolean, default=True)
    vni: Mapped[int] = mapped_column(Integer, default=77)


class LeaseRow(Base):
    """An address of the cluster network held by an instance or a node (its gateway address).

    The primary key (network, address) is what makes a double allocation impossible, whatever
    races: the second insert of an address fails and the allocator picks again.
    """

    __tablename__ = "network_leases"

    network: Mapped[str] = mapped_column(String(63), primary_key=True)
    address: Mapped[str] = mapped_column(String(64), primary_key=True)
    # The instance's or the node's id; one address each.
    owner: Mapped[str] = mapped_column(String(36), unique=True)
    kind: Mapped[str] = mapped_column(String(16))  # "instance" or "node"
    mac: Mapped[str] = mapped_column(String(17), default="")
    publish: Mapped[str] = mapped_column(String(255), default="")  # "8080:80/tcp,..."


class RevokedCertificateRow(Base):
    """Certificates of removed nodes: TLS would still accept them, the master does not."""

    __tablename__ = "revoked_certificates"

    serial: Mapped[str] = mapped_column(String(64), primary_key=True)
    node_name: Mapped[str] = mapped_column(String(63))
    revoked_at: Mapped[datetime]


class TokenRow(Base):
    """Join tokens and API tokens; only a hash of the secret is kept."""

    __tablename__ = "tokens"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    kind: Mapped[str] = mapped_column(String(8))  # "join" or "api"
    role: Mapped[str] = mapped_column(String(16), default="")
    description: Mapped[str] = mapped_column(String(255), default="")
    secret_hash: Mapped[str] = mapped_column(String(64))
    expires_at: Mapped[datetime | None] = mapped_column(default=None)
    uses_left: Mapped[int | None] = mapped_column(Integer, default=None)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime]


class MasterRow(Base):
    """A master process sharing this database (several on PostgreSQL); each refreshes its own
    row every second, and the one holding the leader lock says so."""

    __tablename__ = "masters"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    api: Mapped[str] = mapped_column(String(255))
    cluster: Mapped[str] = mapped_column(String(255))
    leader: Mapped[bool] = mapped_column(Boolean, default=False)
    started_at: Mapped[datetime]
    last_seen: Mapped[datetime]


class ImageRow(Base):
    """An image of the master's store; its files are blobs named by their sha256."""

    __tablename__ = "images"

    digest: Mapped[str] = mapped_column(String(71), primary_key=True)  # "sha256:" + 64 hex
    name: Mapped[str] = mapped_column(String(128), unique=True)
    aliases: Mapped[list[str]] = mapped_column(JSON, default=list)
    kind: Mapped[str] = mapped_column(String(16))
    architecture: Mapped[str] = mapped_column(String(16))
    size: Mapped[int] = mapped_column(BigInteger)
    manifest: Mapped[dict[str, Any]]  # the image.json, as workers get it
    created_at: Mapped[datetime]


class ImageLocationRow(Base):
    """Which node holds which image in its cache, as the node's last report said."""

    __tablename__ = "image_locations"

    digest: Mapped[str] = mapped_column(String(71), primary_key=True)
    node_id: Mapped[str] = mapped_column(
        ForeignKey("nodes.id", ondelete="CASCADE"), primary_key=True
    )


class FaultRow(Base):
    """A fault in force; healing deletes it (the events tell its history)."""

    __tablename__ = "faults"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    targets: Mapped[list[str]] = mapped_column(JSON)
    peers: Mapped[list[str]] = mapped_column(JSON)
    params: Mapped[dict[str, Any]] = mapped_column()
    one_way: Mapped[bool] = mapped_column(Boolean, default=False)
    started_at: Mapped[datetime]
    duration: Mapped[float | None] = mapped_column(Float, default=None)


class MigrationRow(Base):
    """Moves of instances between nodes (master/moves.py); kept after they end, as a log."""

    __tablename__ = "migrations"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    instance_id: Mapped[str] = mapped_column(String(36), index=True)
    kind: Mapped[str] = mapped_column(String(8))
    source_id: Mapped[str] = mapped_column(String(36))
    target_id: Mapped[str] = mapped_column(String(36))
    desired_after: Mapped[str] = mapped_column(String(16))
    phase: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    message: Mapped[str] = mapped_column(Text, default="")
    bytes_done: Mapped[int] = mapped_column(BigInteger, default=0)
    bytes_total: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[datetime]
