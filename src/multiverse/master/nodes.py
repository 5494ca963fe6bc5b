"""Node maintenance, as Incus does it: cordon, drain, evacuate and restore.

- cordon: no new instances are placed on the node; uncordon undoes it.
- drain: cordon, then stop the node's running instances (marked, so restore starts them).
- evacuate: cordon, then move every instance of the node to other nodes with its disk (a cold
  move: master/moves.py; it ends running if it was). A node that is away cannot hand its disks
  over: its instances are re-created elsewhere from their specs, with fresh disks. Each
  instance's outcome is reported.
- restore: uncordon, move evacuated instances back the same way, start drained ones.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from typing import Any

from multiverse.core.errors import AlreadyExists, Conflict, MultiverseError, Unauthenticated
from multiverse.core.model import (
    DesiredState,
    Instance,
    InstanceState,
    Node,
    NodeStatus,
    Resources,
    validate_labels,
    validate_name,
)
from multiverse.master import auth
from multiverse.master.cluster import Agents
from multiverse.master.instances import Instances
from multiverse.master.moves import Moves
from multiverse.master.operations import Operation
from multiverse.master.ports import AgentNodeClient
from multiverse.master.scheduler import place
from multiverse.store.repository import Change, Store, now
from multiverse.wire import pki

log = logging.getLogger("multiverse.master")


class Nodes:
    def __init__(self, store: Store, agents: Agents, instances: Instances) -> None:
        self.store = store
        self.agents = agents
        self.instances = instances
        # What else holds state of a node drops it here (the master wires the cluster service).
        self.on_removed: Callable[[str], None] = agents.forget
        self.moves = Moves(store, AgentNodeClient(agents, instances.reconciler.ipam), instances)

    async def set_cordon(self, name: str, cordoned: bool) -> Node:
        node = await self.store.find_node(name)
        await self.store.update_node(node.id, cordoned=cordoned)
        self.instances.view.invalidate()
        self.instances.events.publish("node", name=name, cordoned=cordoned, status=node.status)
        return await self.store.find_node(name)

    async def label(self, name: str, changes: dict[str, str | None]) -> Node:
        """Set (or, with None, remove) an admin's labels on a node; they win over the node's
        own labels of the same keys for placement, and its re-joins do not touch them."""
        node = await self.store.find_node(name)
        labels = dict(node.admin_labels)
        for key, value in changes.items():
            if value is None:
                validate_labels({key: ""})
                labels.pop(key, None)
            else:
                labels[key] = value
        await self.store.update_node(node.id, admin_labels=validate_labels(labels))
        self.instances.view.invalidate()
        self.instances.events.publish("node", name=name, labels=labels, status=node.status)
        return await self.store.find_node(name)

    async def admit(self, token: str, csr_pem: bytes, name: str) -> tuple[Node, bytes]:
        """A new node, proven by a join token: its record (Joining until its agent registers
        over mutual TLS) and its certificate, signed from its CSR (its key stays with it)."""
        record = await auth.verify_token(self.store, auth.JOIN, token)
        validate_name(name, "node")
        found = await self.store.list_nodes(names=[name])
        # A node `node add` is installing joins into the record that tells its install.
        installing = found[0] if found and found[0].status == NodeStatus.INSTALLING else None
        if found and installing is None:
            raise AlreadyExists(f"a node named {name!r} exists already; pick another --name")
        node_id = installing.id if installing else str(uuid.uuid4())
        certificate = pki.sign_node_csr(
            self.agents.ca, csr_pem, node_id, name, self.agents.node_cert_lifetime
        )
        if not await self.store.consume_token_use(str(record["id"])):
            raise Unauthenticated("invalid join token")  # used up: same words as any bad token
        node = Node(
            id=node_id, name=name, address="", driver="", status=NodeStatus.JOINING, labels={},
            capacity=Resources(), last_sync=now(),
        )  # fmt: skip
        if installing:
            await self.store.update_node(
                node_id, status=NodeStatus.JOINING, last_sync=now(),
                cert_serial=pki.serial_of(certificate),
            )  # fmt: skip
        else:
            await self.store.add_node(node, pki.serial_of(certificate))
        self.instances.events.publish("node", name=name, status=NodeStatus.JOINING.value)
        log.info("node %s admitted as %s", name, node_id)
        return node, certificate

    async def remove(self, name: str, force: bool = False) -> Node:
        """Forget the node and revoke its certificate. Its instances must be gone first, or
        ``force``: then they are forgotten too (their VMs stay on that host)."""
        node = await self.store.find_node(name)
        if not force:
            await self.ensure_empty(node, "delete or evacuate them, or use --force")
        await self.store.remove_node(node.id)
        self.instances.view.invalidate()
        self.on_removed(node.id)
        self.instances.events.publish("node", name=name, status="Removed")
        log.info("node %s removed; its certificate is revoked", name)
        return node

    async def ensure_empty(self, node: Node, what_next: str) -> None:
        """Refuse (409) to take away a node that still holds instances; ``what_next`` tells the
        user how to get there."""
        if held := await self._on_node(node):
            names = ", ".join(instance.name for instance in held)
            raise Conflict(f"node {node.name} still holds {names}: {what_next}")

    async def _on_node(self, node: Node) -> list[Instance]:
        return [
            instance
            for instance in await self.store.list_instances(node_id=node.id)
            if instance.desired != DesiredState.DELETED
        ]

    async def drain(self, name: str) -> Operation:
        node = await self.set_cordon(name, True)
        return self.instances.operations.start("drain", name, self._drain(node))

    async def _drain(self, node: Node) -> list[dict[str, Any]]:
        outcomes = []
        for instance in await self._on_node(node):
            if instance.desired != DesiredState.RUNNING:
                outcomes.append({"name": instance.name, "outcome": "already stopped"})
                continue
            try:
                await self._stop(instance, node)
                await self.store.update_instance(instance.id, held=True)
                outcomes.append({"name": instance.name, "outcome": "stopped"})
            except MultiverseError as exc:
                outcomes.append({"name": instance.name, "outcome": f"not stopped: {exc.message}"})
        return outcomes

    async def _stop(self, instance: Instance, node: Node) -> None:
        await self.store.update_instance(instance.id, desired=DesiredState.STOPPED)
        instance.desired = DesiredState.STOPPED
        await self.instances.reconciler.reconcile(instance, node, by_user=True)
        await self.instances.until(instance.id, {InstanceState.STOPPED})

    async def evacuate(self, name: str, *, recreate: bool = False) -> Operation:
        """``recreate``: re-create the instances from their specs (fresh disks) instead of
        moving them, for users who want today's behaviour."""
        node = await self.set_cordon(name, True)
        return self.instances.operations.start("evacuate", name, self._evacuate(node, recreate))

    async def _evacuate(self, node: Node, recreate: bool) -> list[dict[str, Any]]:
        outcomes = []
        for instance in await self._on_node(node):
            others = [n for n in await self.store.list_nodes() if n.id != node.id]
            outcome = await self._move(
                instance, node, others, moved_from=node.id, recreate=recreate
            )
            outcomes.append({"name": instance.name, "outcome": outcome})
        return outcomes

    async def restore(self, name: str) -> Operation:
        node = await self.set_cordon(name, False)
        return self.instances.operations.start("restore", name, self._restore(node))

    async def _restore(self, node: Node) -> list[dict[str, Any]]:
        outcomes = []
        for instance in await self.store.list_instances():
            if instance.moved_from == node.id and instance.node_id:
                current = await self.store.get_node(instance.node_id)
                outcome = await self._move(instance, current, [node], moved_from=None)
                outcomes.append({"name": instance.name, "outcome": outcome})
            elif instance.node_id == node.id and instance.held:
                await self.store.update_instance(
                    instance.id, desired=DesiredState.RUNNING, held=False
                )
                instance.desired = DesiredState.RUNNING
                self.instances.reconciler.kick()
                outcomes.append({"name": instance.name, "outcome": "started again"})
        return outcomes

    async def _move(
        self,
        instance: Instance,
        source: Node,
        targets: list[Node],
        moved_from: str | None,
        *,
        recreate: bool = False,
    ) -> str:
        """Move ``instance`` with its disk to one of ``targets`` (master/moves.py); when its
        node is away, its disk cannot be read: re-create it there from its spec instead."""
        try:
            target = place(instance.spec.resources, targets)
        except MultiverseError as exc:
            return f"stayed on {source.name}: {exc.message}"
        if recreate or source.status != NodeStatus.READY:
            return await self._recreate(instance, source, target, moved_from)
        try:
            _migration, operation = await self.moves.move(instance.name, target.name)
        except MultiverseError as exc:
            return f"stayed on {source.name}: {exc.message}"
        await operation.done.wait()
        if operation.status != "success":
            return f"stayed on {source.name}: {operation.error}"
        await self.store.update_instance(instance.id, moved_from=moved_from)
        return f"moved to {target.name}"

    async def _recreate(
        self, instance: Instance, source: Node, target: Node, moved_from: str | None
    ) -> str:
        """Point the instance at ``target`` with a fresh disk (its old VM stays on ``source``,
        which is away, or is deleted first when reachable). Recorded under the placement lock,
        so launches see the reservation."""
        wanted = instance.desired
        reachable = source.status == NodeStatus.READY
        async with self.instances.placing:
            try:
                place(instance.spec.resources, [target])
                if reachable:
                    if instance.state != InstanceState.STOPPED:
                        await self._stop(instance, source)
                    await self.moves.client.delete(source, instance.id)
            except MultiverseError as exc:
                return f"stayed on {source.name}: {exc.message}"
            await self.store.update_instance(
                instance.id, node_id=target.id, state=InstanceState.SCHEDULED, version=0,
                desired=wanted, moved_from=moved_from, message="", ipv4="",
            )  # fmt: skip
        log.info("instance %s re-created on %s", instance.name, target.name)
        self.instances.reconciler.publish_changes(
            [Change(instance.id, instance.name, instance.state.value, "Scheduled")]
        )
        left = "" if reachable else f"; its old VM is left on {source.name}, which is away"
        return f"moved to {target.name} with a fresh disk{left}"
