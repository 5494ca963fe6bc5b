"""What each node measured it uses (cores busy, memory and disk bytes), from its reports.

Revision ID: 0010
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("nodes") as table:
        table.add_column(sa.Column("used_cpus", sa.Float, nullable=False, server_default="0"))
        table.add_column(
            sa.Column("used_memory", sa.BigInteger, nullable=False, server_default="0")
        )
        table.add_column(sa.Column("used_disk", sa.BigInteger, nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("nodes") as table:
        table.drop_column("used_disk")
        table.drop_column("used_memory")
        table.drop_column("used_cpus")
