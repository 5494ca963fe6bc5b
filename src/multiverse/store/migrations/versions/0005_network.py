"""The cluster network: its definition, the addresses leased to instances and nodes (unique per
network by the primary key), and each node's network mode.

Revision ID: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "networks",
        sa.Column("name", sa.String(63), primary_key=True),
        sa.Column("cidr", sa.String(64), nullable=False),
        sa.Column("nat", sa.Boolean, nullable=False),
        sa.Column("vni", sa.Integer, nullable=False),
    )
    op.create_table(
        "network_leases",
        sa.Column("network", sa.String(63), primary_key=True),
        sa.Column("address", sa.String(64), primary_key=True),
        sa.Column("owner", sa.String(36), nullable=False, unique=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("mac", sa.String(17), nullable=False),
        sa.Column("publish", sa.String(255), nullable=False),
    )
    with op.batch_alter_table("nodes") as table:
        table.add_column(
            sa.Column("network_mode", sa.String(16), nullable=False, server_default="")
        )


def downgrade() -> None:
    with op.batch_alter_table("nodes") as table:
        table.drop_column("network_mode")
    op.drop_table("network_leases")
    op.drop_table("networks")
