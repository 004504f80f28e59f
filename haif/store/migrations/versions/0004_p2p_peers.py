"""P2P peers: a Noise public key mapped to a tenant.

Revision ID: 0004
Revises: 0003
Create Date: 2025-01-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from haif.store.models import UtcDateTime

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "p2p_peers",
        sa.Column("public_key", sa.String(64), nullable=False),
        sa.Column("tenant_id", sa.Integer(), nullable=False),
        sa.Column("created_at", UtcDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["tenant_id"],
            ["tenants.id"],
            name=op.f("fk_p2p_peers_tenant_id_tenants"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("public_key", name=op.f("pk_p2p_peers")),
    )
    op.create_index(op.f("ix_p2p_peers_tenant_id"), "p2p_peers", ["tenant_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_p2p_peers_tenant_id"), table_name="p2p_peers")
    op.drop_table("p2p_peers")
