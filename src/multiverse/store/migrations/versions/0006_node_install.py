"""Nodes the master installs over SSH (`node add`): the step or failure in words, and where
and how the node was installed (for a retry and `node remove --uninstall`).

Revision ID: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("nodes") as table:
        table.add_column(sa.Column("message", sa.Text(), nullable=False, server_default=""))
        table.add_column(sa.Column("install", sa.JSON(), nullable=False, server_default="{}"))


def downgrade() -> None:
    with op.batch_alter_table("nodes") as table:
        table.drop_column("install")
        table.drop_column("message")
