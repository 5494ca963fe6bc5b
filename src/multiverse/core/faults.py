"""Faults injected into an environment from outside its guests: the model, its validation and
the pure computation of what each node must do for the faults in force.

The master keeps faults in the store and sends every node its :class:`NodeFaults` (with each
sync acknowledgement, and at once when a fault is added or healed); the node converges to it:
nftables drops for partitions, netem (or an NFQUEUE) on taps for links, QMP stop for pauses,
and one-shot actions (kill, reboot, clock steps, disk fill) run once per fault id and VM.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from multiverse.core.errors import InvalidArgument
from multiverse.core.model import ENV_LABEL

__all__ = [
    "Fault",
    "FaultKind",
    "LinkRule",
    "NodeFaults",
    "Placement",
    "ScheduledFault",
    "Shot",
    "check_fault",
    "node_faults",
    "parse_duration",
    "parse_percent",
    "parse_ppm",
    "parse_scheduled",
    "resolve_sides",
]


class FaultKind(enum.StrEnum):
    PARTITION = "partition"  # targets / peers cannot reach each other
    LINK = "link"  # netem on the path from targets[0] to peers (or to everyone)
    PAUSE = "pause"  # the VM frozen (QMP stop) while the fault lasts
    KILL = "kill"  # hard power off once; desired state stays running
    REBOOT = "reboot"  # hard reset once
    CLOCK = "clock"  # the guest's clock stepped by ``skew`` and/or run off by ``drift``
    DISK = "disk"  # the data disk filled (``full``) or throttled (``slow``)


# Kinds that act on each target VM itself: no other side.
ON_VMS = frozenset({FaultKind.PAUSE, FaultKind.KILL, FaultKind.REBOOT, FaultKind.CLOCK,
                    FaultKind.DISK})  # fmt: skip
LINK_PARAMS = ("delay", "jitter", "loss", "duplicate", "reorder", "rate")
_DURATION = re.compile(r"^([+-]?\d+(?:\.\d+)?)(ms|s|m|h|us)?$")
_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_RATE = re.compile(r"^\d+(?:\.\d+)?(bit|kbit|mbit|gbit)$")
_PPM = re.compile(r"^([+-]?\d+(?:\.\d+)?)\s*ppm$")
# A guest kernel's clock runs at most 10% off: its tick may be 9000..11000 µs per 10 ms.
MAX_DRIFT_PPM = 100_000


def parse_duration(text: str, what: str, *, signed: bool = False) -> float:
    """Seconds from ``100ms``, ``5s``, ``2m``, ``1.5``; negative only when ``signed``."""
    match = _DURATION.match(str(text).strip())
    if match is None:
        raise InvalidArgument(f"invalid {what} {text!r}: use e.g. 100ms, 5s or 2m")
    seconds = float(match.group(1)) * _UNITS[match.group(2)]
    if seconds < 0 and not signed:
        raise InvalidArgument(f"{what} cannot be negative: {text!r}")
    return seconds


def parse_percent(text: str, what: str) -> float:
    """A percentage from ``5%`` or ``5``, within 0..100."""
    try:
        value = float(str(text).strip().removesuffix("%"))
    except ValueError:
        raise InvalidArgument(f"invalid {what} {text!r}: use a percentage like 5%") from None
    if not 0 <= value <= 100:
        raise InvalidArgument(f"{what} must be between 0% and 100%: {text!r}")
    return value


def parse_ppm(text: str, what: str) -> float:
    """Parts per million from ``100ppm`` or ``-20ppm`` (+ runs fast), within ±10%."""
    match = _PPM.match(str(text).strip().lower())
    if match is None:
        raise InvalidArgument(f"invalid {what} {text!r}: use e.g. 100ppm or -20ppm")
    ppm = float(match.group(1))
    if abs(ppm) > MAX_DRIFT_PPM:
        raise InvalidArgument(f"{what} must be within ±{MAX_DRIFT_PPM}ppm (10%): {text!r}")
    return ppm


@dataclass(frozen=True)
class Fault:
    """One fault: what it hits (instance names), how, since when and until when."""

    id: str
    kind: FaultKind
    targets: tuple[str, ...]  # partition: one side; link: the origin; others: the VMs hit
    peers: tuple[str, ...] = ()  # partition: the other side; link: --to (empty: everyone)
    params: Mapping[str, str] = field(default_factory=dict)
    one_way: bool = False  # partition: only targets -> peers is cut
    started_at: datetime | None = None
    duration: float | None = None  # seconds; None: until healed

    @property
    def expires_at(self) -> datetime | None:
        if self.started_at is None or self.duration is None:
            return None
        return self.started_at + timedelta(seconds=self.duration)

    def json(self) -> dict[str, object]:
        expires = self.expires_at
        return {
            "id": self.id,
            "kind": self.kind.value,
            "targets": list(self.targets),
            "peers": list(self.peers),
            "params": dict(self.params),
            "one_way": self.one_way,
            "started_at": self.started_at.isoformat() if self.started_at else None,
            "duration": self.duration,
            "expires_at": expires.isoformat() if expires else None,
        }


def check_fault(fault: Fault, known: Iterable[str]) -> Fault:
    """The fault if it makes sense for these instance names; InvalidArgument otherwise.

    Parameters are normalised (``delay`` in ms etc. stay as the user wrote them, but checked),
    so that nodes never see a value they cannot apply.
    """
    names = set(known)
    if fault.duration is not None and fault.duration <= 0:
        raise InvalidArgument("--duration must be positive")
    if not fault.targets:
        raise InvalidArgument(f"a {fault.kind.value} fault needs an instance")
    if fault.kind == FaultKind.PARTITION and not fault.peers:
        raise InvalidArgument("a partition needs two non-empty sides: A,B / C,D")
    unknown = sorted({*fault.targets, *fault.peers} - names)
    if unknown:
        raise InvalidArgument(f"unknown instance(s): {', '.join(unknown)}")
    if fault.kind == FaultKind.PARTITION and set(fault.targets) & set(fault.peers):
        both = ", ".join(sorted(set(fault.targets) & set(fault.peers)))
        raise InvalidArgument(f"an instance cannot be on both sides of a partition: {both}")
    if fault.kind in ON_VMS and fault.peers:
        raise InvalidArgument(f"a {fault.kind.value} fault hits instances, it has no other side")
    if fault.kind == FaultKind.LINK:
        if len(fault.targets) != 1:
            raise InvalidArgument("a link fault starts from one instance: link A --to B")
        if fault.targets[0] in fault.peers:
            raise InvalidArgument("a link fault cannot go from an instance to itself")
        _check_link(fault.params)
    elif fault.kind == FaultKind.CLOCK:
        unknown = sorted(set(fault.params) - {"skew", "drift"})
        if unknown or not fault.params:
            raise InvalidArgument("clock needs --skew (e.g. +5s) and/or --drift (e.g. 100ppm)")
        if "skew" in fault.params and not parse_duration(
            fault.params["skew"], "--skew", signed=True
        ):
            raise InvalidArgument("clock needs a non-zero --skew, e.g. +5s or -2m")
        if "drift" in fault.params and not parse_ppm(fault.params["drift"], "--drift"):
            raise InvalidArgument("clock needs a non-zero --drift, e.g. 100ppm or -50ppm")
    elif fault.kind == FaultKind.DISK:
        full, slow = fault.params.get("full") == "true", fault.params.get("slow", "")
        if full == bool(slow):
            raise InvalidArgument("disk needs exactly one of --full or --slow 10ms")
        if slow and parse_duration(slow, "--slow") <= 0:
            raise InvalidArgument("--slow must be positive")
    return fault


def _check_link(params: Mapping[str, str]) -> None:
    unknown = sorted(set(params) - set(LINK_PARAMS))
    if unknown:
        raise InvalidArgument(f"unknown link parameter(s): {', '.join(unknown)}")
    if not params:
        raise InvalidArgument(
            "a link fault needs at least one of --delay, --loss, --duplicate, --reorder, --rate"
        )
    for name in ("delay", "jitter"):
        if name in params:
            parse_duration(params[name], f"--{name}")
    if "jitter" in params and "delay" not in params:
        raise InvalidArgument("--jitter needs --delay")
    for name in ("loss", "duplicate", "reorder"):
        if name in params:
            parse_percent(params[name], f"--{name}")
    if "reorder" in params and "delay" not in params:
        raise InvalidArgument("--reorder needs --delay (netem reorders by not delaying some)")
    if "rate" in params and not _RATE.match(params["rate"].strip().lower()):
        raise InvalidArgument(f"invalid --rate {params['rate']!r}: use e.g. 1mbit or 500kbit")


# ---- instances chosen by environment or label ----------------------------------------------


def _selector(item: str) -> tuple[str, str] | None:
    """``env:NAME`` or ``KEY=VALUE`` as a (label, value) to match; None for an instance name
    (names have neither ``:`` nor ``=``)."""
    if item.startswith("env:"):
        if not item[4:]:
            raise InvalidArgument("env: needs an environment name, e.g. env:lab")
        return ENV_LABEL, item[4:]
    key, sep, value = item.partition("=")
    if not sep:
        return None
    if not key:
        raise InvalidArgument(f"invalid selector {item!r}: use KEY=VALUE, e.g. role=db")
    return key, value


def _side(
    items: Iterable[str], labels: Mapping[str, Mapping[str, str]]
) -> tuple[list[str], list[str]]:
    """(named, selected): the instance names given, and those the selectors match."""
    named: list[str] = []
    selected: list[str] = []
    for item in items:
        selector = _selector(item)
        if selector is None:
            named.append(item)  # checked by check_fault: unknown names are refused there
            continue
        key, value = selector
        matched = sorted(name for name, have in labels.items() if have.get(key) == value)
        if not matched:
            raise InvalidArgument(
                f"no environment {value} (no instance carries it)"
                if key == ENV_LABEL and item.startswith("env:")
                else f"no instance matches {item}"
            )
        selected += matched
    return named, selected


def resolve_sides(
    targets: Iterable[str], peers: Iterable[str], labels: Mapping[str, Mapping[str, str]]
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Both sides of a fault as instance names, from names, ``env:NAME`` and ``KEY=VALUE``
    (``labels``: every instance's labels by name). Resolved once, when the fault is added: an
    instance that joins the environment later is not hit.

    A selector never takes an instance named on the other side, so ``partition a / env:lab``
    cuts ``a`` from the rest of its own environment."""
    named_left, selected_left = _side(targets, labels)
    named_right, selected_right = _side(peers, labels)
    left = [*named_left, *(n for n in selected_left if n not in named_right)]
    right = [*named_right, *(n for n in selected_right if n not in named_left)]
    return tuple(dict.fromkeys(left)), tuple(dict.fromkeys(right))


# ---- what each node must do ----------------------------------------------------------------


@dataclass(frozen=True)
class Placement:
    """Where an instance runs and its address on the cluster network ("" when it has none)."""

    id: str
    node_id: str | None
    address: str = ""


@dataclass(frozen=True)
class LinkRule:
    """The path into ``instance_id``'s tap slowed (netem or NFQUEUE), for the packets coming
    from ``sources`` (all if empty)."""

    fault_id: str
    instance_id: str
    sources: tuple[str, ...]
    params: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Shot:
    """An action on one VM of this node: held (pause, disk slow) or once per fault id."""

    fault_id: str
    kind: FaultKind
    instance_id: str
    params: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class NodeFaults:
    """Everything one node must realise for the faults in force; empty: nothing at all."""

    drops: tuple[tuple[str, str], ...] = ()  # (source address, destination address)
    links: tuple[LinkRule, ...] = ()
    shots: tuple[Shot, ...] = ()
    generation: int = 0  # when the master computed it; older ones are ignored by nodes


def node_faults(faults: Iterable[Fault], placements: Mapping[str, Placement],
                node_id: str, generation: int = 0) -> NodeFaults:  # fmt: skip
    """What ``node_id`` must do: pure, so each rule is unit-tested without a network.

    - a partition drops, on the node of each sender, its packets to the other side: a guest's
      frames always enter its own node's bridge first, so within one host and across hosts
      alike, and nothing inside the guests changes;
    - a link fault A --to B puts netem on B's tap for packets from A (A --to everyone: on every
      other instance's tap), so the path A→B is slowed where it ends, on B's node;
    - the other kinds act on the VM itself, on its node.
    Instances without an address (user-mode networking) cannot be partitioned or slowed.
    """
    drops: set[tuple[str, str]] = set()
    links: list[LinkRule] = []
    shots: list[Shot] = []
    here = {name for name, p in placements.items() if p.node_id == node_id}
    for fault in faults:
        if fault.kind == FaultKind.PARTITION:
            pairs = [(fault.targets, fault.peers)]
            if not fault.one_way:
                pairs.append((fault.peers, fault.targets))
            for senders, receivers in pairs:
                for sender in senders:
                    source = placements[sender].address if sender in placements else ""
                    if sender not in here or not source:
                        continue
                    for receiver in receivers:
                        target = placements.get(receiver)
                        if target is not None and target.address:
                            drops.add((source, target.address))
        elif fault.kind == FaultKind.LINK:
            origin = placements.get(fault.targets[0])
            if origin is None or not origin.address:
                continue
            receivers = fault.peers or tuple(n for n in placements if n != fault.targets[0])
            for receiver in receivers:
                if receiver in here and placements[receiver].address:
                    links.append(
                        LinkRule(fault.id, placements[receiver].id, (origin.address,),
                                 tuple(sorted(fault.params.items())))
                    )  # fmt: skip
        else:
            shots.extend(
                Shot(fault.id, fault.kind, placements[name].id,
                     tuple(sorted(fault.params.items())))
                for name in fault.targets if name in here
            )  # fmt: skip
    return NodeFaults(tuple(sorted(drops)), tuple(links), tuple(shots), generation)


# ---- a schedule of faults (the ``faults:`` section of an environment file) -----------------


@dataclass(frozen=True)
class ScheduledFault:
    """``at`` seconds after the environment is up, add the fault ``body`` (the API's form)."""

    at: float
    body: Mapping[str, Any]

    def describe(self) -> str:
        body = self.body
        what = " / ".join(
            ",".join(side) for side in (body["targets"], body.get("peers", ())) if side
        )
        params = " ".join(f"--{k} {v}" for k, v in body.get("params", {}).items())
        span = f" for {body['duration']}" if body.get("duration") else ""
        return " ".join(filter(None, (body["kind"], what, params))) + span


_SCHEDULE_KEYS = {"at", "for", "one-way", *(k.value for k in FaultKind)}


def parse_scheduled(entry: Any, labels: Mapping[str, Mapping[str, str]]) -> ScheduledFault:
    """One entry of a schedule, e.g. ``{at: 30s, partition: "a / b,c", for: 20s}``,
    ``{at: 5s, link: {from: a, to: b, delay: 100ms}}``, ``{at: 0s, pause: b, for: 5s}``,
    ``{at: 1m, clock: {name: b, skew: +5s}}``, ``{at: 0s, disk: {name: b, full: true}}``.
    Checked as the API checks a fault, against the environment's instances (their ``labels``
    by name): sides may use env:NAME and KEY=VALUE, sent as the names they select."""
    if not isinstance(entry, dict):
        raise InvalidArgument("each fault must be a mapping with at and one kind")
    unknown = sorted(set(entry) - _SCHEDULE_KEYS)
    if unknown:
        raise InvalidArgument(f"unknown key(s) {', '.join(map(repr, unknown))} in a fault")
    kinds = [k for k in FaultKind if k.value in entry]
    if len(kinds) != 1:
        raise InvalidArgument(f"a fault names exactly one kind: {', '.join(FaultKind)}")
    kind, value = kinds[0], entry[kinds[0].value]
    at = parse_duration(str(entry.get("at", "0s")), "at")
    duration = parse_duration(str(entry["for"]), "for") if "for" in entry else None
    peers: tuple[str, ...] = ()
    params: dict[str, str] = {}
    if kind == FaultKind.PARTITION:
        if not isinstance(value, str) or value.count("/") != 1:
            raise InvalidArgument('a partition is written "a,b / c,d"')
        left, right = value.split("/")
        targets = tuple(n.strip() for n in left.split(",") if n.strip())
        peers = tuple(n.strip() for n in right.split(",") if n.strip())
    elif isinstance(value, dict):
        options = {str(k): v for k, v in value.items()}
        first = options.pop("from" if kind == FaultKind.LINK else "name", None)
        targets = (str(first),) if first else ()
        to = options.pop("to", "") if kind == FaultKind.LINK else ""
        peers = tuple(n.strip() for n in str(to or "").split(",") if n.strip())
        params = {k: ("true" if v is True else str(v)) for k, v in options.items()}
    else:
        targets = (str(value),)
    targets, peers = resolve_sides(targets, peers, labels)
    fault = Fault("scheduled", kind, targets, peers, params, bool(entry.get("one-way")),
                  duration=duration)  # fmt: skip
    check_fault(fault, labels)
    body = {"kind": kind.value, "targets": list(targets), "peers": list(peers),
            "params": params, "one_way": fault.one_way,
            "duration": str(entry["for"]) if "for" in entry else None}  # fmt: skip
    return ScheduledFault(at, body)
