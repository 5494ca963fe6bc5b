"""What each node's instances take, kept on the node's row as instances come and go, so that
reading nodes (every report, every placement) never aggregates the instances table.

Revision ID: 0011
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

_COLUMNS = ("allocated_cpus", "allocated_memory", "allocated_disk", "instance_count")


def upgrade() -> None:
    with op.batch_alter_table("nodes") as table:
        for name in _COLUMNS:
            small = name in ("allocated_cpus", "instance_count")
            kind = sa.Integer() if small else sa.BigInteger()
            table.add_column(sa.Column(name, kind, nullable=False, server_default="0"))
    mine = "FROM instances WHERE node_id = nodes.id"
    op.execute(
        "UPDATE nodes SET"
        f" allocated_cpus = (SELECT COALESCE(SUM(cpus), 0) {mine}),"
        f" allocated_memory = (SELECT COALESCE(SUM(memory), 0) {mine}),"
        f" allocated_disk = (SELECT COALESCE(SUM(disk), 0) {mine}),"
        f" instance_count = (SELECT COUNT(*) {mine})"
    )


def downgrade() -> None:
    with op.batch_alter_table("nodes") as table:
        for name in reversed(_COLUMNS):
            table.drop_column(name)
