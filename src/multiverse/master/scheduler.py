"""Placement: which node gets a new instance. Pure functions over core types, and the
in-memory view of the nodes they are given (:class:`NodeView`).

Feasible nodes are Ready, not cordoned, carry the requested labels (an admin's label wins over
the node's own of the same key) and have room for the
instance after everything already placed on them. Among those, ``spread`` picks the emptiest
(what Nomad and Kubernetes do by default) and ``binpack`` the fullest.

Anti-affinity (an environment's ``spread: true`` group) comes in as ``avoid``: nodes that must
not be chosen, each with the reason (which member of the group it holds already).
:func:`place_all` places several instances in turn on a copy of the nodes, so that an
environment is refused with the scheduler's explanation before any of it is created.
"""

from __future__ import annotations

import asyncio
import dataclasses
import heapq
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from multiverse.core.errors import Unschedulable
from multiverse.core.model import Node, NodeStatus, Resources
from multiverse.store.repository import Store

Strategy = Literal["spread", "binpack"]
# Feasible nodes compared at each placement, at most (see :func:`place`).
SCORED = 100


def why_not(node: Node, need: Resources, selector: Mapping[str, str]) -> str | None:
    """The reason ``node`` cannot take an instance needing ``need``, or None if it can."""
    if node.cordoned:
        return "cordoned"
    if node.status != NodeStatus.READY:
        return f"not ready ({node.status.value})"
    for key, value in selector.items():
        if node.effective_labels.get(key) != value:
            return f"label {key}={value} does not match"
    lacks = need.shortfalls(node.free)
    return ", ".join(lacks) if lacks else None


def _fits(node: Node, need: Resources, selector: Mapping[str, str]) -> bool:
    """``why_not(...) is None``, in plain arithmetic: placement asks it of every node at
    every launch (a thousand nodes: a millisecond less per launch than building the reasons)."""
    capacity, allocated = node.capacity, node.allocated
    return (
        not node.cordoned
        and node.status == NodeStatus.READY
        and allocated.cpus + need.cpus <= capacity.cpus
        and allocated.memory + need.memory <= capacity.memory
        and allocated.disk + need.disk <= capacity.disk
        and all(node.effective_labels.get(key) == value for key, value in selector.items())
    )


def _used_fraction(node: Node, need: Resources) -> float:
    """How full the node would be with the instance, averaged over cpu, memory and disk."""
    capacity, allocated = node.capacity, node.allocated
    return (
        ((allocated.cpus + need.cpus) / capacity.cpus if capacity.cpus else 1.0)
        + ((allocated.memory + need.memory) / capacity.memory if capacity.memory else 1.0)
        + ((allocated.disk + need.disk) / capacity.disk if capacity.disk else 1.0)
    ) / 3


def place(
    need: Resources,
    nodes: Sequence[Node],
    *,
    selector: Mapping[str, str] | None = None,
    strategy: Strategy = "spread",
    avoid: Mapping[str, str] | None = None,
    scored: int | None = None,
    start: int = 0,
) -> Node:
    """The best node for ``need``; raises Unschedulable saying why each node was refused.

    ``avoid`` maps node ids that must not be chosen to why (anti-affinity). ``scored``: compare
    only the first that many feasible nodes, found from index ``start`` on and wrapping round,
    as Kubernetes' percentageOfNodesToScore and Nomad's limit iterator do: at a thousand nodes
    comparing every one at each launch cost more than the rest of placement, and a caller
    that moves ``start`` on at each placement spreads as well. Only "nothing fits" needs
    every node looked at.
    """
    feasible = _window(need, nodes, selector or {}, avoid or {}, scored, start)
    if not feasible:
        raise _refusal(need, nodes, selector or {}, avoid or {})
    return min(feasible, key=_score(need, strategy))


def place_many(
    need: Resources,
    nodes: Sequence[Node],
    count: int,
    *,
    selector: Mapping[str, str] | None = None,
    strategy: Strategy = "spread",
    avoid: Mapping[str, str] | None = None,
    scored: int | None = None,
    start: int = 0,
) -> list[Node]:
    """The nodes for ``count`` instances of ``need``, placed in turn, each seeing the room the
    ones before it took (each node as it was before its instance). The batch compares one
    window of feasible nodes, kept in a heap by score, instead of finding a window for each
    instance: a launch of fifty scanned fifty windows of a hundred nodes, a quarter of the
    master while it placed. Once that window is full, :func:`place` looks further.
    """
    score = _score(need, strategy)
    nodes = list(nodes)
    positions = {node.id: index for index, node in enumerate(nodes)}
    window = _window(need, nodes, selector or {}, avoid or {}, scored, start)
    heap = [(score(node), index, node) for index, node in enumerate(window)]
    heapq.heapify(heap)
    chosen = []
    for _ in range(count):
        from_window = bool(heap)
        if from_window:
            _, index, node = heapq.heappop(heap)
        else:
            node = place(
                need, nodes, selector=selector, strategy=strategy, avoid=avoid, scored=scored
            )
        chosen.append(node)
        nodes[positions[node.id]] = taken = reserved(node, need)
        if from_window and _fits(taken, need, selector or {}):
            heapq.heappush(heap, (score(taken), index, taken))
    return chosen


def _window(
    need: Resources,
    nodes: Sequence[Node],
    selector: Mapping[str, str],
    avoid: Mapping[str, str],
    scored: int | None,
    start: int,
) -> list[Node]:
    """The first ``scored`` feasible nodes (all of them: None) from index ``start`` on."""
    count = len(nodes)
    feasible = []
    for offset in range(count):
        node = nodes[(start + offset) % count]
        if node.id not in avoid and _fits(node, need, selector):
            feasible.append(node)
            if len(feasible) == scored:
                break
    return feasible


def _refusal(
    need: Resources, nodes: Sequence[Node], selector: Mapping[str, str], avoid: Mapping[str, str]
) -> Unschedulable:
    """Why no node can take ``need``, node by node."""
    if not nodes:
        return Unschedulable("no node can hold the instance: the cluster has no nodes")
    refused = {}
    for node in nodes:
        reason = avoid.get(node.id) or why_not(node, need, selector)
        if reason is not None:
            refused[node.name] = reason
    told = "; ".join(f"{name}: {why}" for name, why in refused.items())
    return Unschedulable(f"no node can hold the instance: {told}", refused)


def _score(need: Resources, strategy: Strategy) -> Callable[[Node], tuple[float, int, str]]:
    """The key the best node has the least of. Ties break on fewer instances, then on the
    name, so equal nodes take turns."""
    sign = 1 if strategy == "spread" else -1
    return lambda node: (sign * _used_fraction(node, need), sign * node.instance_count, node.name)


class NodeView:
    """The nodes as placement sees them, kept in memory so that a launch reads no database.

    It is reloaded from the store when older than ``max_age`` seconds or when told that nodes
    changed (:meth:`invalidate`: status transitions, cordon, labels), and it counts what this
    master places meanwhile (:meth:`reserve`). Five seconds, because a reload of a thousand
    nodes takes ~0.1 s of the master's CPU. It may be optimistic (another master placed
    too): the store's conditional insert is the judge, and a refused placement reloads it.
    """

    def __init__(self, store: Store, max_age: float = 5.0) -> None:
        self.store = store
        self.max_age = max_age
        self._nodes: dict[str, Node] = {}
        self._loaded = -float("inf")
        self._loading = asyncio.Lock()

    def invalidate(self) -> None:
        self._loaded = -float("inf")

    async def nodes(self) -> list[Node]:
        if time.monotonic() - self._loaded > self.max_age:
            async with self._loading:  # one reload for everybody waiting on it
                if time.monotonic() - self._loaded > self.max_age:
                    started = time.monotonic()
                    self._nodes = {node.id: node for node in await self.store.list_nodes()}
                    self._loaded = started
        return list(self._nodes.values())

    def reserve(self, node_id: str, need: Resources, count: int = 1) -> None:
        """Count ``need`` as taken on the node (negative ``count``: given back)."""
        node = self._nodes.get(node_id)
        if node is not None:
            self._nodes[node_id] = reserved(node, need, count)


def reserved(node: Node, need: Resources, count: int = 1) -> Node:
    """``node`` with ``need`` taken (negative ``count``: given back)."""
    allocated = node.allocated + need if count > 0 else node.allocated - need
    instance_count = node.instance_count + count
    return dataclasses.replace(node, allocated=allocated, instance_count=instance_count)


def spread_conflict(holder: str) -> str:
    """Why a node is refused to a member of a spread group: it holds ``holder`` already."""
    return f"holds {holder} of the same spread group"


@dataclass(frozen=True)
class Request:
    """One instance to place among several (:func:`place_all`)."""

    name: str
    need: Resources
    selector: Mapping[str, str] = field(default_factory=dict)
    spread_group: str = ""  # members of one group never share a node; "" for no such rule


def place_all(
    requests: Sequence[Request],
    nodes: Sequence[Node],
    *,
    holding: Mapping[str, Mapping[str, str]] | None = None,
) -> dict[str, Node]:
    """Where each request would go, placed in turn, each seeing the ones before it.

    ``holding`` maps a spread group to the nodes (id -> instance name) that hold members of it
    already. Raises Unschedulable naming the first request that fits nowhere and why.
    """
    nodes = list(nodes)
    taken = {group: dict(held) for group, held in (holding or {}).items()}
    placed: dict[str, Node] = {}
    for request in requests:
        avoid = {}
        if request.spread_group:
            held = taken.setdefault(request.spread_group, {})
            avoid = {node_id: spread_conflict(name) for node_id, name in held.items()}
        try:
            node = place(request.need, nodes, selector=request.selector, avoid=avoid)
        except Unschedulable as exc:
            message = f"cannot place {request.name}: {exc.message}"
            raise Unschedulable(message, exc.reasons) from None
        placed[request.name] = node
        if request.spread_group:
            taken[request.spread_group][node.id] = request.name
        nodes = [
            dataclasses.replace(
                other, allocated=other.allocated + request.need,
                instance_count=other.instance_count + 1,
            )
            if other.id == node.id
            else other
            for other in nodes
        ]  # fmt: skip
    return placed
