"""The statements of the store's hot paths, built once.

Every launch and every node report runs a handful of small statements. Built anew at each
call, on the ORM classes, their expressions (``NodeRow.id == node_id``...) and cache keys cost
SQLAlchemy about three times what running them does (measured here on SQLite: ~290 against
~90 microseconds a statement), and the ORM's unit of work as much again. These are built once,
on the tables, with bound parameters; the store runs them through a plain connection with
the call's values. Bound names differ from the columns' (``new_state``): SQLAlchemy keeps the
columns' names for the values of an INSERT or UPDATE.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, cast

from sqlalchemy import Table, bindparam, delete, func, insert, select, update

from multiverse.core.model import MigrationPhase, NodeStatus, Resources, Usage
from multiverse.store.schema import ImageLocationRow, InstanceRow, LeaseRow, MigrationRow, NodeRow

nodes = cast(Table, NodeRow.__table__)
instances = cast(Table, InstanceRow.__table__)
leases = cast(Table, LeaseRow.__table__)
image_locations = cast(Table, ImageLocationRow.__table__)
migrations = cast(Table, MigrationRow.__table__)

_READY = NodeStatus.READY.value

# ---- a node heard from: its measures, and Ready ----

_MEASURES = ("cpus", "memory", "disk", "used_cpus", "used_memory", "used_disk")
_heard = (
    update(nodes)
    .where(nodes.c.id == bindparam("node"))
    .values(last_sync=bindparam("at"), **{name: bindparam(f"new_{name}") for name in _MEASURES})
)
NODE_REPORTED = _heard.values(status=_READY)  # a report taken whole makes the node Ready
NODE_BEAT = _heard.where(nodes.c.status == _READY)  # a heartbeat counts for Ready nodes only
NODE_OF_REPORT = select(nodes.c.name, nodes.c.status, nodes.c.network_mode).where(
    nodes.c.id == bindparam("node")
)
READY_AMONG = select(nodes.c.id).where(
    nodes.c.id.in_(bindparam("ids", expanding=True)), nodes.c.status == _READY
)


def heard(node_id: str, at: datetime, capacity: Resources, used: Usage) -> dict[str, Any]:
    """The values of :data:`NODE_REPORTED` and :data:`NODE_BEAT`."""
    return {
        "node": node_id, "at": at,
        "new_cpus": capacity.cpus, "new_memory": capacity.memory, "new_disk": capacity.disk,
        "new_used_cpus": used.cpus, "new_used_memory": used.memory, "new_used_disk": used.disk,
    }  # fmt: skip


# ---- room on a node ----

ALLOCATE = (  # also gives back: negative amounts and count
    update(nodes)
    .where(nodes.c.id == bindparam("node"))
    .values(
        allocated_cpus=nodes.c.allocated_cpus + bindparam("need_cpus"),
        allocated_memory=nodes.c.allocated_memory + bindparam("need_memory"),
        allocated_disk=nodes.c.allocated_disk + bindparam("need_disk"),
        instance_count=nodes.c.instance_count + bindparam("count"),
    )
)
ALLOCATE_IF_FITS = ALLOCATE.where(
    nodes.c.allocated_cpus + bindparam("need_cpus") <= nodes.c.cpus,
    nodes.c.allocated_memory + bindparam("need_memory") <= nodes.c.memory,
    nodes.c.allocated_disk + bindparam("need_disk") <= nodes.c.disk,
)


def allocation(node_id: str, need: Resources, count: int) -> dict[str, Any]:
    """The values of :data:`ALLOCATE`: ``count`` instances of ``need`` (-1: one given back)."""
    return {
        "node": node_id, "count": count, "need_cpus": count * need.cpus,
        "need_memory": count * need.memory, "need_disk": count * need.disk,
    }  # fmt: skip


# ---- instances as their nodes tell of them ----

# What a node's word on an instance is checked against and may change, and what deleting it
# gives back.
OBSERVED = (
    instances.c.id, instances.c.name, instances.c.node_id, instances.c.desired,
    instances.c.state, instances.c.ipv4, instances.c.message, instances.c.version,
    instances.c.release, instances.c.cpus, instances.c.memory, instances.c.disk,
)  # fmt: skip
INSTANCE_OBSERVED = select(*OBSERVED).where(instances.c.id == bindparam("id")).with_for_update()
NODE_INSTANCES = select(*OBSERVED).where(instances.c.node_id == bindparam("node")).with_for_update()
NODE_INSTANCES_NAMED = NODE_INSTANCES.where(instances.c.id.in_(bindparam("ids", expanding=True)))
WRITE_OBSERVED = (
    update(instances)
    .where(instances.c.id == bindparam("row_id"))
    .values(
        state=bindparam("new_state"), ipv4=bindparam("new_ipv4"),
        message=bindparam("new_message"), version=bindparam("new_version"),
        release=bindparam("new_release"),
    )
)  # fmt: skip
INSERT_INSTANCE = insert(instances)
STATES_OF = select(instances.c.id, instances.c.name, instances.c.state, instances.c.message).where(
    instances.c.id.in_(bindparam("ids", expanding=True))
)
STANDINGS = select(instances.c.id, instances.c.node_id, instances.c.state, instances.c.desired)
STANDINGS_OF = STANDINGS.where(instances.c.id.in_(bindparam("ids", expanding=True)))
NAMES_TAKEN = select(instances.c.name).where(
    instances.c.name.in_(bindparam("names", expanding=True))
)
DELETE_INSTANCE = delete(instances).where(instances.c.id == bindparam("id"))

# ---- addresses on the cluster network ----

_LEASE = (leases.c.network, leases.c.address, leases.c.owner, leases.c.kind, leases.c.mac,
          leases.c.publish)  # fmt: skip
LEASE_OF = select(*_LEASE).where(leases.c.owner == bindparam("owner"))
LEASES_IN = (
    select(*_LEASE).where(leases.c.network == bindparam("network")).order_by(leases.c.address)
)
ADDRESSES_IN = select(leases.c.address).where(leases.c.network == bindparam("network"))
LEASE_AT = select(leases.c.owner).where(
    leases.c.network == bindparam("network"), leases.c.address == bindparam("address")
)
# Leases of instances gone, whichever way their row went (Store.sweep_leases).
ORPHAN_LEASES = delete(leases).where(
    leases.c.kind == "instance", leases.c.owner.not_in(select(instances.c.id))
)
INSERT_LEASE = insert(leases)
RELEASE = delete(leases).where(leases.c.owner == bindparam("owner"))

# Instances as the API shows them, in name order (pages go by name): their columns, their
# node's name, their address if they have one. BY_IDS: the reconciler's question, at each round.
# repository._instance unpacks these rows by position, in this order: a Row's attribute costs
# ~1 us, an index ~0.1, and a page of 500 instances read 25 attributes of each.
INSTANCE_ROWS = (
    select(
        instances.c.id, instances.c.name, instances.c.node_id, nodes.c.name.label("node_name"),
        instances.c.cpus, instances.c.memory, instances.c.disk, instances.c.image,
        instances.c.user_data, instances.c.labels, instances.c.desired, instances.c.state,
        instances.c.ipv4, instances.c.release, instances.c.message, instances.c.version,
        instances.c.created_at, instances.c.restarts, instances.c.moved_from, instances.c.held,
        leases.c.address.label("lease_address"), leases.c.mac.label("lease_mac"),
        leases.c.publish.label("lease_publish"),
    )
    .outerjoin(nodes, nodes.c.id == instances.c.node_id)
    .outerjoin(leases, leases.c.owner == instances.c.id)
    .order_by(instances.c.name)
)  # fmt: skip
INSTANCES_BY_IDS = INSTANCE_ROWS.where(instances.c.id.in_(bindparam("ids", expanding=True)))
INSTANCE_BY_ID = INSTANCE_ROWS.where(instances.c.id == bindparam("id"))  # no list to expand

# Nodes, in name order, and what the instances being moved to each take there until their
# move ends (an instance takes room on its source and on its target meanwhile).
# Unpacked by position in repository._node, in this order (as INSTANCE_ROWS is).
NODE_ROWS = select(
    nodes.c.id,
    nodes.c.name,
    nodes.c.address,
    nodes.c.driver,
    nodes.c.status,
    nodes.c.labels,
    nodes.c.admin_labels,
    nodes.c.cpus,
    nodes.c.memory,
    nodes.c.disk,
    nodes.c.allocated_cpus,
    nodes.c.allocated_memory,
    nodes.c.allocated_disk,
    nodes.c.used_cpus,
    nodes.c.used_memory,
    nodes.c.used_disk,
    nodes.c.cordoned,
    nodes.c.last_sync,
    nodes.c.version,
    nodes.c.instance_count,
    nodes.c.network_mode,
    nodes.c.message,
    nodes.c.install,
).order_by(nodes.c.name)
NODES_BY_IDS = NODE_ROWS.where(nodes.c.id.in_(bindparam("ids", expanding=True)))
FINAL_PHASES = (MigrationPhase.DONE.value, MigrationPhase.FAILED.value)  # a move that ended
MOVING_TO = (
    select(
        migrations.c.target_id, func.count(instances.c.id),
        func.coalesce(func.sum(instances.c.cpus), 0),
        func.coalesce(func.sum(instances.c.memory), 0),
        func.coalesce(func.sum(instances.c.disk), 0),
    )
    .join(instances, instances.c.id == migrations.c.instance_id)
    .where(migrations.c.phase.not_in(FINAL_PHASES))
    .where(instances.c.node_id != migrations.c.target_id)
    .group_by(migrations.c.target_id)
)  # fmt: skip

# ---- the images a node holds ----

_at_node = image_locations.c.node_id == bindparam("node")
IMAGES_AT = select(image_locations.c.digest).where(_at_node)
IMAGES_GONE = delete(image_locations).where(
    _at_node, image_locations.c.digest.in_(bindparam("digests", expanding=True))
)
IMAGES_NEW = insert(image_locations)
