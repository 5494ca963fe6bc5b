"""Domain types: nodes, instances, their specs and states.

These are plain dataclasses; the store, the wire and the API convert to and from them.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from datetime import datetime

from multiverse.core.errors import Conflict, InvalidArgument
from multiverse.core.sizes import GiB, MiB, TiB, format_size, parse_size


class NodeStatus(enum.StrEnum):
    JOINING = "Joining"
    READY = "Ready"
    NOT_READY = "NotReady"
    CORDONED = "Cordoned"
    DRAINING = "Draining"
    DOWN = "Down"
    UNKNOWN = "Unknown"
    # Set up over SSH by the master (`node add`): its message tells the step, then why it failed.
    INSTALLING = "Installing"
    FAILED = "Failed"


class InstanceState(enum.StrEnum):
    """The observed state of an instance, as its worker reports it."""

    PENDING = "Pending"
    SCHEDULED = "Scheduled"
    CREATING = "Creating"
    STARTING = "Starting"
    RUNNING = "Running"
    STOPPING = "Stopping"
    STOPPED = "Stopped"
    DELETING = "Deleting"
    FAILED = "Failed"
    UNKNOWN = "Unknown"

    @property
    def is_transient(self) -> bool:
        return self in _TRANSIENT


_TRANSIENT = {
    InstanceState.PENDING,
    InstanceState.SCHEDULED,
    InstanceState.CREATING,
    InstanceState.STARTING,
    InstanceState.STOPPING,
    InstanceState.DELETING,
}


class DesiredState(enum.StrEnum):
    RUNNING = "running"
    STOPPED = "stopped"
    DELETED = "deleted"


@dataclass(frozen=True)
class Resources:
    """An amount of compute: cpus, and memory and disk in bytes."""

    cpus: int = 0
    memory: int = 0
    disk: int = 0

    def __add__(self, other: Resources) -> Resources:
        return Resources(self.cpus + other.cpus, self.memory + other.memory, self.disk + other.disk)

    def __sub__(self, other: Resources) -> Resources:
        return Resources(self.cpus - other.cpus, self.memory - other.memory, self.disk - other.disk)

    @classmethod
    def parse(cls, text: str) -> Resources:
        """``"cpus=8,memory=16G,disk=100G"`` -> Resources; every key must be given."""
        values: dict[str, str] = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            key, _, value = item.partition("=")
            if key not in ("cpus", "memory", "disk") or not value:
                raise InvalidArgument(
                    f"invalid capacity {item!r}: use cpus=N,memory=SIZE,disk=SIZE"
                )
            values[key] = value
        if len(values) != 3:
            raise InvalidArgument(
                "capacity needs cpus, memory and disk, e.g. cpus=8,memory=16G,disk=100G"
            )
        try:
            cpus = int(values["cpus"])
        except ValueError:
            raise InvalidArgument(f"invalid cpus {values['cpus']!r}") from None
        resources = cls(cpus, parse_size(values["memory"]), parse_size(values["disk"]))
        if min(resources.cpus, resources.memory, resources.disk) <= 0:
            raise InvalidArgument("capacity must be positive")
        return resources

    def shortfalls(self, free: Resources) -> list[str]:
        """What ``free`` lacks to hold ``self``, in words: ``["1 of 2 cpus free"]``."""
        lacks = []
        if self.cpus > free.cpus:
            lacks.append(f"{max(free.cpus, 0)} of {self.cpus} cpus free")
        if self.memory > free.memory:
            lacks.append(
                f"{format_size(max(free.memory, 0))} of {format_size(self.memory)} memory free"
            )
        if self.disk > free.disk:
            lacks.append(f"{format_size(max(free.disk, 0))} of {format_size(self.disk)} disk free")
        return lacks


# Bounds that catch typos (``--memory 1P``) before any scheduler has to say no.
MAX_CPUS = 512
MIN_MEMORY = 16 * MiB
MAX_MEMORY = 16 * TiB
MIN_DISK = 16 * MiB
MAX_DISK = 1024 * TiB
MAX_LABELS = 64
MAX_COUNT = 256  # instances one launch may ask for: a typo in a count should not ask for more
# The label an environment's instances carry (``apply -f``); faults select by it too.
ENV_LABEL = "multiverse.env"
DEFAULT_CPUS = 1
DEFAULT_MEMORY = 1 * GiB
DEFAULT_DISK = 5 * GiB
DEFAULT_IMAGE = "tiny"

_NAME = re.compile(r"^[A-Za-z](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
_LABEL_KEY = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._/-]{0,61}[A-Za-z0-9])?$")
_LABEL_VALUE = re.compile(r"^[A-Za-z0-9._/-]{0,63}$")
_IMAGE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@-]{0,127}$")


def validate_name(name: str, what: str = "instance") -> str:
    """Names as Multipass allows them: letters, digits and hyphens, starting with a letter."""
    if not _NAME.match(name):
        raise InvalidArgument(
            f"invalid {what} name {name!r}: use letters, digits and hyphens, start with a letter, "
            "end with a letter or digit, at most 63 characters"
        )
    return name


def numbered(pattern: str, count: int) -> list[str]:
    """The names of a launch of ``count``: ``pattern`` with ``{n}`` as 1, 2, ... ``count``."""
    if "{n}" not in pattern:
        raise InvalidArgument(f"a count's name needs {{n}}, e.g. {pattern}-{{n}}")
    if not 1 <= count <= MAX_COUNT:
        raise InvalidArgument(f"count must be from 1 to {MAX_COUNT}, not {count}")
    return [validate_name(pattern.replace("{n}", str(n))) for n in range(1, count + 1)]


def validate_labels(labels: dict[str, str]) -> dict[str, str]:
    if len(labels) > MAX_LABELS:
        raise InvalidArgument(f"too many labels: {len(labels)} (at most {MAX_LABELS})")
    for key, value in labels.items():
        if not _LABEL_KEY.match(key):
            raise InvalidArgument(f"invalid label key {key!r}")
        if not _LABEL_VALUE.match(value):
            raise InvalidArgument(f"invalid label value {value!r} for {key!r}")
    return labels


def parse_labels(text: str) -> dict[str, str]:
    """``"zone=a,disk=ssd"`` -> ``{"zone": "a", "disk": "ssd"}``."""
    labels: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise InvalidArgument(f"invalid label {item!r}: use key=value")
        labels[key.strip()] = value.strip()
    return validate_labels(labels)


@dataclass(frozen=True)
class InstanceSpec:
    """What a user asked for when launching an instance."""

    name: str
    cpus: int = DEFAULT_CPUS
    memory: int = DEFAULT_MEMORY
    disk: int = DEFAULT_DISK
    image: str = DEFAULT_IMAGE
    user_data: str = ""
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def resources(self) -> Resources:
        return Resources(self.cpus, self.memory, self.disk)

    def validate(self) -> InstanceSpec:
        validate_name(self.name)
        if not 1 <= self.cpus <= MAX_CPUS:
            raise InvalidArgument(f"cpus must be between 1 and {MAX_CPUS}, not {self.cpus}")
        if not MIN_MEMORY <= self.memory <= MAX_MEMORY:
            raise InvalidArgument(
                f"memory must be between {format_size(MIN_MEMORY)} and {format_size(MAX_MEMORY)}, "
                f"not {format_size(self.memory) if self.memory >= 0 else self.memory}"
            )
        if not MIN_DISK <= self.disk <= MAX_DISK:
            raise InvalidArgument(
                f"disk must be between {format_size(MIN_DISK)} and {format_size(MAX_DISK)}, "
                f"not {format_size(self.disk) if self.disk >= 0 else self.disk}"
            )
        if not _IMAGE.match(self.image):
            raise InvalidArgument(f"invalid image name {self.image!r}")
        validate_labels(self.labels)
        return self


@dataclass(frozen=True)
class Usage:
    """What a host is actually using, as its worker measured it (not what is allocated).

    ``cpus`` is cores busy (a fraction: 0.5 is half a core), memory and disk are bytes.
    """

    cpus: float = 0.0
    memory: int = 0
    disk: int = 0


@dataclass
class Node:
    id: str
    name: str
    address: str
    driver: str
    status: NodeStatus
    labels: dict[str, str]
    capacity: Resources
    allocated: Resources = field(default_factory=Resources)
    used: Usage = field(default_factory=Usage)  # as of its last report
    cordoned: bool = False
    last_sync: datetime | None = None
    version: str = ""
    instance_count: int = 0
    network_mode: str = ""  # "bridge" or "user"; "" before the node said
    # Set by an admin (`node label`); ``labels`` are what the node says of itself at every
    # join. The admin's win: a node cannot talk itself into (or out of) a selector.
    admin_labels: dict[str, str] = field(default_factory=dict)
    # `node add`: the step running, or why the install failed (with the output's last lines).
    message: str = ""
    # `node add`: where and how it was installed (SSH target, host key, root), for a retry
    # and for `node remove --uninstall`. Never a credential.
    install: dict[str, str] = field(default_factory=dict)

    @property
    def effective_labels(self) -> dict[str, str]:
        """The labels placement matches selectors against."""
        return {**self.labels, **self.admin_labels}

    @property
    def free(self) -> Resources:
        return self.capacity - self.allocated

    @property
    def ipv4(self) -> str:
        host = self.address.rsplit(":", 1)[0]
        return host.strip("[]")


@dataclass
class Instance:
    id: str
    spec: InstanceSpec
    node_id: str | None
    desired: DesiredState
    state: InstanceState
    node_name: str = ""
    ipv4: str = ""
    release: str = ""
    message: str = ""
    version: int = 0
    created_at: datetime | None = None
    restarts: int = 0
    moved_from: str | None = None
    held: bool = False
    address: str = ""  # its address on the cluster network, leased by the master ("" none)
    mac: str = ""
    publish: tuple[str, ...] = ()  # node ports forwarded to it: "8080:80/tcp"

    @property
    def name(self) -> str:
        return self.spec.name


def ensure_running(name: str, state: InstanceState) -> None:
    """Exec, shell and info need a Running instance; say how to get there otherwise."""
    if state != InstanceState.RUNNING:
        raise Conflict(
            f"instance {name} is {state.value}, not Running; "
            f"start it with `multiverse start {name}`"
        )


@dataclass(frozen=True)
class GuestStats:
    """Numbers read inside a running guest, as ``multiverse info`` shows them."""

    load: tuple[float, float, float] = (0.0, 0.0, 0.0)
    memory_used: int = 0
    memory_total: int = 0
    disk_used: int = 0
    disk_total: int = 0
    release: str = ""
    ipv4: str = ""


class MigrationKind(enum.StrEnum):
    """How an instance moves: ``cold`` stops it and copies its disk; ``live`` keeps it running."""

    COLD = "cold"
    LIVE = "live"


class MigrationPhase(enum.StrEnum):
    """Where a move stands; ``done`` and ``failed`` are final (a failed move left the instance
    where it was)."""

    PENDING = "pending"
    PREPARING = "preparing"  # live: the target readies an incoming VM
    STOPPING = "stopping"
    TRANSFERRING = "transferring"
    SWITCHING = "switching"
    STARTING = "starting"
    CLEANING = "cleaning"
    ROLLING_BACK = "rolling-back"
    DONE = "done"
    FAILED = "failed"

    @property
    def is_final(self) -> bool:
        return self in (MigrationPhase.DONE, MigrationPhase.FAILED)


@dataclass(frozen=True)
class IncomingEndpoint:
    """Where a target's QEMU waits for a live move: its NBD export of the empty disk and its
    migration listener, both behind TLS with the cluster's certificates (``tls_hostname`` is
    the name in the target node's certificate, which the source checks)."""

    host: str
    nbd_port: int
    migration_port: int
    tls_hostname: str = ""
    login_key: str = ""  # the target node's SSH public key, let into the guest before it moves


@dataclass(frozen=True)
class LiveProgress:
    """How far a live move's sending side is: the disk mirror, then memory, then the
    switch-over; ``downtime`` (seconds the guest was paused) once known."""

    phase: str  # "mirroring", "migrating", "switching", "done"
    disk_done: int = 0
    disk_total: int = 0
    memory_done: int = 0
    memory_total: int = 0
    downtime: float = 0.0
    host_key: str = ""  # the guest's SSH host key as the source knew it (the last one only)


@dataclass(frozen=True)
class Migration:
    """A move of one instance, persisted so that a restarted master finishes it.

    ``desired_after`` is what the user wanted of the instance before the move (a cold move
    stops it on the way): the move leaves it so, wherever it ends.
    """

    id: str
    instance_id: str
    kind: MigrationKind
    source_id: str
    target_id: str
    desired_after: DesiredState
    phase: MigrationPhase = MigrationPhase.PENDING
    attempts: int = 0
    message: str = ""
    bytes_done: int = 0
    bytes_total: int = 0
    created_at: datetime | None = None
