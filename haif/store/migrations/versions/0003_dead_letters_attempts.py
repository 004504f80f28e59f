"""Dead letters (the DLQ's table) and jobs.attempts.

Revision ID: 0003
Revises: 0002
Create Date: 2025-01-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from haif.store.models import UtcDateTime

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # batch: SQLite cannot ALTER a column in; existing jobs count as one attempt.
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("attempts", sa.Integer(), server_default="1", nullable=False))
    op.create_table(
        "dead_letters",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("tenant_id", sa.Integer(), nullable=False),
        sa.Column("tenant", sa.String(64), nullable=False),
        sa.Column("model", sa.String(256), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("error_type", sa.String(64), nullable=False),
        sa.Column("error_code", sa.String(64), nullable=False),
        sa.Column("error", sa.String(1024), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("trace_id", sa.String(32), nullable=True),
        sa.Column("traceparent", sa.String(55), nullable=True),
        sa.Column("request_id", sa.String(128), nullable=False),
        sa.Column("idempotency_key", sa.String(255), nullable=True),
        sa.Column("created_at", UtcDateTime(), nullable=False),
        sa.Column("dead_at", UtcDateTime(), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("body_truncated", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_dead_letters")),
    )
    op.create_index(op.f("ix_dead_letters_dead_at"), "dead_letters", ["dead_at"])
    op.create_index("ix_dead_letters_tenant_dead", "dead_letters", ["tenant", "dead_at"])


def downgrade() -> None:
    op.drop_index("ix_dead_letters_tenant_dead", table_name="dead_letters")
    op.drop_index(op.f("ix_dead_letters_dead_at"), table_name="dead_letters")
    op.drop_table("dead_letters")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("attempts")
