"""Nodes are known by their certificates: the serial of each node's certificate, the serials of
revoked ones; the shared node secrets of the first schema go.

Revision ID: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("nodes") as table:
        table.add_column(sa.Column("cert_serial", sa.String(64), nullable=False, server_default=""))
        table.drop_column("secret_hash")
    op.create_table(
        "revoked_certificates",
        sa.Column("serial", sa.String(64), primary_key=True),
        sa.Column("node_name", sa.String(63), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("revoked_certificates")
    with op.batch_alter_table("nodes") as table:
        table.add_column(sa.Column("secret_hash", sa.String(64), nullable=False, server_default=""))
        table.drop_column("cert_serial")
