"""Fault validation and the pure per-node rules (issue 19), without a network."""

from __future__ import annotations

import pytest

from multiverse.core.errors import InvalidArgument
from multiverse.core.faults import (
    Fault,
    FaultKind,
    LinkRule,
    Placement,
    check_fault,
    node_faults,
    parse_duration,
)
from multiverse.worker.faults import render_drops

PLACES = {
    "a": Placement("id-a", "n1", "10.0.0.2"),
    "b": Placement("id-b", "n2", "10.0.0.3"),
    "c": Placement("id-c", "n2", "10.0.0.4"),
}


def partition(one_way: bool = False) -> Fault:
    return Fault("f1", FaultKind.PARTITION, ("a",), ("b", "c"), one_way=one_way)


def test_a_partition_drops_on_each_senders_node_both_ways() -> None:
    assert node_faults([partition()], PLACES, "n1").drops == (
        ("10.0.0.2", "10.0.0.3"), ("10.0.0.2", "10.0.0.4"),
    )  # fmt: skip
    assert node_faults([partition()], PLACES, "n2").drops == (
        ("10.0.0.3", "10.0.0.2"), ("10.0.0.4", "10.0.0.2"),
    )  # fmt: skip
    # b and c, on the same side, keep reaching each other: no pair between them.
    assert node_faults([partition(one_way=True)], PLACES, "n2").drops == ()


def test_a_link_slows_the_receivers_tap_for_the_senders_packets() -> None:
    link = Fault("f2", FaultKind.LINK, ("a",), ("b",), {"delay": "200ms"})
    rule = LinkRule("f2", "id-b", ("10.0.0.2",), (("delay", "200ms"),))
    assert node_faults([link], PLACES, "n2").links == (rule,)
    assert node_faults([link], PLACES, "n1").links == ()
    everyone = Fault("f3", FaultKind.LINK, ("a",), (), {"loss": "5%"})
    assert {r.instance_id for r in node_faults([everyone], PLACES, "n2").links} == {"id-b", "id-c"}


def test_vm_faults_go_to_the_vms_node_only() -> None:
    pause = Fault("f4", FaultKind.PAUSE, ("b",))
    assert [s.instance_id for s in node_faults([pause], PLACES, "n2").shots] == ["id-b"]
    assert node_faults([pause], PLACES, "n1").shots == ()


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        (Fault("x", FaultKind.PARTITION, ("a",), ()), "two non-empty sides"),
        (Fault("x", FaultKind.PARTITION, ("a",), ("zz",)), "unknown instance(s): zz"),
        (Fault("x", FaultKind.PARTITION, ("a",), ("a", "b")), "both sides"),
        (Fault("x", FaultKind.LINK, ("a",), ("b",), {"delay": "-5ms"}), "cannot be negative"),
        (Fault("x", FaultKind.LINK, ("a",), ("b",), {}), "at least one of"),
        (Fault("x", FaultKind.LINK, ("a",), ("b",), {"loss": "150%"}), "between 0% and 100%"),
        (Fault("x", FaultKind.LINK, ("a",), ("b",), {"rate": "fast"}), "invalid --rate"),
        (Fault("x", FaultKind.PAUSE, ("a", "b")), "exactly one instance"),
        (Fault("x", FaultKind.PAUSE, ("a",), duration=-1), "--duration must be positive"),
        (Fault("x", FaultKind.CLOCK, ("a",), params={"skew": "0s"}), "non-zero --skew"),
        (Fault("x", FaultKind.DISK, ("a",)), "exactly one of --full or --slow"),
    ],
)
def test_bad_faults_are_refused_with_a_reason(fault: Fault, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_fault(fault, PLACES)


def test_durations() -> None:
    assert parse_duration("200ms", "d") == pytest.approx(0.2)
    assert parse_duration("-5s", "skew", signed=True) == -5
    with pytest.raises(InvalidArgument):
        parse_duration("soon", "d")


def test_the_fault_table_goes_away_with_the_last_drop() -> None:
    rules = render_drops((("10.0.0.2", "10.0.0.3"),))
    assert "table bridge multiverse_faults {" in rules
    assert "ip saddr 10.0.0.2 ip daddr 10.0.0.3 drop" in rules
    assert render_drops(()) == (
        "table bridge multiverse_faults\ndelete table bridge multiverse_faults\n"
    )
