"""Rollouts (a model's stable and canary versions, the canary's weight) and worker drains.

Revision ID: 0006
Revises: 0005
Create Date: 2025-01-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from haif.store.models import UtcDateTime

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "rollouts",
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("base_version", sa.String(64), nullable=False),
        sa.Column("stable_version", sa.String(64), nullable=False),
        sa.Column("canary_version", sa.String(64), nullable=True),
        sa.Column("canary_weight", sa.Integer(), server_default="0", nullable=False),
        sa.Column("canary_status", sa.String(16), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("auto_rollbacks", sa.Integer(), server_default="0", nullable=False),
        sa.Column("generation", sa.Integer(), server_default="1", nullable=False),
        sa.Column("updated_at", UtcDateTime(), nullable=False),
        sa.CheckConstraint(
            "canary_weight >= 0 AND canary_weight <= 100", name=op.f("ck_rollouts_canary_weight")
        ),
        sa.PrimaryKeyConstraint("model", name=op.f("pk_rollouts")),
    )
    op.create_table(
        "worker_drains",
        sa.Column("worker_id", sa.String(256), nullable=False),
        sa.Column("requested_at", UtcDateTime(), nullable=False),
        sa.Column("done_at", UtcDateTime(), nullable=True),
        sa.Column("outcome", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("worker_id", name=op.f("pk_worker_drains")),
    )


def downgrade() -> None:
    op.drop_table("worker_drains")
    op.drop_table("rollouts")
