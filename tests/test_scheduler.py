"""Placement rules, alone: no processes, no store."""

from __future__ import annotations

import itertools
import random

import pytest

from multiverse.core.errors import Unschedulable
from multiverse.core.model import Node, NodeStatus, Resources
from multiverse.core.sizes import GiB
from multiverse.master.scheduler import (
    Request,
    _fits,
    place,
    place_all,
    place_many,
    reserved,
    spread_conflict,
    why_not,
)


def node(
    name: str,
    cpus: int = 4,
    memory: int = 8,
    used_cpus: int = 0,
    used_memory: int = 0,
    status: NodeStatus = NodeStatus.READY,
    cordoned: bool = False,
    labels: dict[str, str] | None = None,
    count: int = 0,
) -> Node:
    return Node(
        id=name,
        name=name,
        address="127.0.0.1:1",
        driver="fake",
        status=status,
        labels=labels or {},
        capacity=Resources(cpus, memory * GiB, 100 * GiB),
        allocated=Resources(used_cpus, used_memory * GiB, 0),
        cordoned=cordoned,
        instance_count=count,
    )


NEED = Resources(1, 1 * GiB, 1 * GiB)


def test_spread_prefers_the_emptiest_and_binpack_the_fullest() -> None:
    nodes = [
        node("a", used_cpus=2, used_memory=2, count=2),
        node("b"),
        node("c", used_cpus=1, used_memory=1, count=1),
    ]
    assert place(NEED, nodes).name == "b"
    assert place(NEED, nodes, strategy="binpack").name == "a"


def test_equal_nodes_take_turns_by_instance_count_then_name() -> None:
    assert place(NEED, [node("b"), node("a")]).name == "a"


def test_unfit_nodes_are_skipped_and_each_reason_is_told() -> None:
    nodes = [
        node("full", used_cpus=4, used_memory=4),
        node("down", status=NodeStatus.NOT_READY),
        node("closed", cordoned=True),
        node("elsewhere", labels={"zone": "b"}),
    ]
    with pytest.raises(Unschedulable) as caught:
        place(NEED, nodes, selector={"zone": "a"})
    message = caught.value.message
    assert "full: label zone=a does not match" in message
    assert "down: not ready (NotReady)" in message
    assert "closed: cordoned" in message
    assert "elsewhere: label zone=a does not match" in message
    assert (
        place(NEED, [*nodes, node("ok", labels={"zone": "a"})], selector={"zone": "a"}).name == "ok"
    )


def test_shortfalls_name_what_is_missing() -> None:
    assert why_not(node("a", cpus=2, used_cpus=1), Resources(2, GiB, GiB), {}) == "1 of 2 cpus free"
    assert "memory free" in str(why_not(node("a", memory=1), Resources(1, 2 * GiB, GiB), {}))
    assert why_not(node("a"), NEED, {}) is None


def test_no_nodes_at_all() -> None:
    with pytest.raises(Unschedulable, match="no nodes"):
        place(NEED, [])


def test_an_admins_label_wins_over_the_nodes_own() -> None:
    told = node("told", labels={"zone": "a", "disk": "ssd"})
    told.admin_labels = {"zone": "b"}
    assert why_not(told, NEED, {"zone": "b", "disk": "ssd"}) is None
    assert why_not(told, NEED, {"zone": "a"}) == "label zone=a does not match"
    assert place(
        NEED, [told, node("other", labels={"zone": "a"})], selector={"zone": "a"}
    ).name == ("other")


def test_avoided_nodes_are_refused_with_their_reason() -> None:
    nodes = [node("a"), node("b", used_cpus=3, count=3)]
    assert place(NEED, nodes, avoid={"a": "holds web-1 of the same spread group"}).name == "b"
    with pytest.raises(Unschedulable, match="a: holds web-1 of the same spread group; b: cord"):
        place(NEED, [node("a"), node("b", cordoned=True)], avoid={"a": spread_conflict("web-1")})


def test_place_all_spreads_a_group_and_counts_what_it_placed() -> None:
    nodes = [node("a", cpus=2), node("b", cpus=2), node("c", cpus=2)]
    web = [Request(f"web-{n}", NEED, spread_group="web") for n in (1, 2, 3)]
    placed = place_all(web, nodes)
    assert sorted(item.name for item in placed.values()) == ["a", "b", "c"]
    # Members held already count; unrelated instances may share a node.
    placed = place_all(
        [Request("web-2", NEED, spread_group="web"), Request("db", NEED)],
        nodes,
        holding={"web": {"a": "web-1"}},
    )
    assert placed["web-2"].name != "a"
    with pytest.raises(Unschedulable) as caught:
        place_all([*web, Request("web-4", NEED, spread_group="web")], nodes)
    assert caught.value.message.startswith(
        "cannot place web-4: no node can hold the instance: a: holds web-"
    )
    # Resources run out too: each placement sees the ones before it.
    with pytest.raises(Unschedulable, match=r"cannot place x-4: .*a: 0 of 2 cpus free") as full:
        place_all([Request(f"x-{n}", Resources(2, GiB, GiB)) for n in (1, 2, 3, 4)], nodes)
    assert full.value.reasons["a"] == "0 of 2 cpus free"  # also as data, node by node


def test_the_quick_fit_test_agrees_with_the_reasons() -> None:
    # place() tests each node with plain arithmetic and builds reasons only when nothing fits:
    # the two must agree on every node, or a launch is refused with no reason given.
    rng = random.Random(7)
    statuses = [NodeStatus.READY, NodeStatus.NOT_READY, NodeStatus.DOWN]
    for index, (status, cordoned, zone) in enumerate(
        itertools.product(statuses, [False, True], ["a", "b", None])
    ):
        for _ in range(20):
            candidate = node(
                f"n{index}", cpus=rng.randint(0, 3), memory=rng.randint(0, 3),
                used_cpus=rng.randint(0, 3), used_memory=rng.randint(0, 3), status=status,
                cordoned=cordoned, labels={"zone": zone} if zone else None,
            )  # fmt: skip
            for selector in ({}, {"zone": "a"}):
                assert _fits(candidate, NEED, selector) == (
                    why_not(candidate, NEED, selector) is None
                ), (candidate, selector)


def test_a_large_cluster_compares_a_window_of_nodes_and_finds_room_anywhere() -> None:
    # Only `scored` feasible nodes are compared, from `start` on and wrapping round: the
    # emptiest node outside that window is not chosen; a full node does not count towards it.
    nodes = [node(f"n{i:03d}", used_cpus=2, count=2) for i in range(300)]
    nodes[250] = node("n250")  # the emptiest of all, outside the first window
    nodes[5] = node("n005", used_cpus=1, count=1)
    assert place(NEED, nodes, scored=100).name == "n005"
    assert place(NEED, nodes, scored=100, start=200).name == "n250"
    assert place(NEED, nodes).name == "n250"  # no limit: every node compared
    nodes[1:101] = [node(f"f{i:03d}", used_cpus=4) for i in range(100)]  # full: not counted
    nodes[150] = node("n150", used_cpus=1, count=1)  # so the window reaches it: n000, n101...
    assert place(NEED, nodes, scored=100).name == "n150"
    # The window wraps round: from 290, nodes 290..299 and then 0..89.
    wrapped = [node(f"w{i:03d}", used_cpus=2, count=2) for i in range(300)]
    wrapped[3] = node("w003")
    assert place(NEED, wrapped, scored=100, start=290).name == "w003"
    # Nothing fits anywhere: refused, with the reason of every node, not only a window's.
    full = [node(f"x{i:03d}", used_cpus=4) for i in range(300)]
    with pytest.raises(Unschedulable) as refused:
        place(NEED, full, scored=100, start=17)
    assert len(refused.value.reasons) == 300


@pytest.mark.parametrize("strategy", ["spread", "binpack"])
def test_a_batch_places_as_one_at_a_time_would_on_one_window(strategy: str) -> None:
    """A launch of many compares one window of feasible nodes for the whole batch: each
    instance goes where :func:`place` over that window, seeing the ones before it, would put
    it."""
    rng = random.Random(7)
    nodes = [
        node(f"n{i:03d}", cpus=8, used_cpus=(used := rng.randrange(0, 8)), count=used)
        for i in range(40)
    ]
    batch = place_many(NEED, nodes, 30, strategy=strategy, scored=10, start=5)  # type: ignore[arg-type]
    current = list(nodes)
    one_by_one = []
    window = [n.id for n in current[5:] + current[:5] if _fits(n, NEED, {})][:10]
    for _ in range(30):
        candidates = [n for n in current if n.id in window and _fits(n, NEED, {})]
        chosen = place(NEED, candidates or current, strategy=strategy)  # type: ignore[arg-type]
        one_by_one.append(chosen.name)
        current = [reserved(n, NEED) if n.id == chosen.id else n for n in current]
    assert [n.name for n in batch] == one_by_one
    assert len(batch) == 30


def test_a_batch_looks_past_its_full_window_and_is_refused_when_nothing_fits() -> None:
    nodes = [node(f"n{i}", cpus=2, used_cpus=1, count=1) for i in range(6)]
    # A window of two nodes with one place each: the other two instances go further.
    names = [n.name for n in place_many(NEED, nodes, 4, scored=2)]
    assert names[:2] == ["n0", "n1"] and len(set(names)) == 4
    assert [n.name for n in place_many(NEED, nodes, 6, scored=2)] == [f"n{i}" for i in range(6)]
    with pytest.raises(Unschedulable):
        place_many(NEED, nodes, 7, scored=2)
    # A node avoided is not chosen, by the window or past it.
    avoided = place_many(NEED, nodes, 5, avoid={"n0": "holds vm-1"}, scored=2)
    assert "n0" not in {n.name for n in avoided}
