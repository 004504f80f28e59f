"""jobs.end_user: the request's `user` (its end user, as the client named them).

Revision ID: 0005
Revises: 0004
Create Date: 2025-01-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # batch: SQLite cannot ALTER a column in; existing jobs have no end user.
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("end_user", sa.String(256), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("end_user")
