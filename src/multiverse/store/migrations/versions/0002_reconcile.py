"""Reconciliation bookkeeping: restarts, evacuation and drain marks.

Revision ID: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("instances") as table:
        table.add_column(sa.Column("restarts", sa.Integer(), nullable=False, server_default="0"))
        table.add_column(sa.Column("moved_from", sa.String(36), nullable=True))
        table.add_column(sa.Column("held", sa.Boolean(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("instances") as table:
        table.drop_column("held")
        table.drop_column("moved_from")
        table.drop_column("restarts")
