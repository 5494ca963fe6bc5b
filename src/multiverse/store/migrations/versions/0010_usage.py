"""What each node's instances take, kept on the node's row as instances come and go, so that
reading nodes (every report, every placement) never aggregates the instances table.

Revision ID: 0010
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

_COLUMNS = ("used_cpus", "used_memory", "used_disk", "instance_count")


def upgrade() -> None:
    with op.batch_alter_table("nodes") as table:
        for name in _COLUMNS:
            kind = sa.Integer() if name in ("used_cpus", "instance_count") else sa.BigInteger()
            table.add_column(sa.Column(name, kind, nullable=False, server_default="0"))
    op.execute(
        "UPDATE nodes SET"
        " used_cpus = (SELECT COALESCE(SUM(cpus), 0) FROM instances WHERE node_id = nodes.id),"
        " used_memory = (SELECT COALESCE(SUM(memory), 0) FROM instances WHERE node_id = nodes.id),"
        " used_disk = (SELECT COALESCE(SUM(disk), 0) FROM instances WHERE node_id = nodes.id),"
        " instance_count = (SELECT COUNT(*) FROM instances WHERE node_id = nodes.id)"
    )


def downgrade() -> None:
    with op.batch_alter_table("nodes") as table:
        for name in reversed(_COLUMNS):
            table.drop_column(name)
