"""Cache policy: per-cart expiry and the reason a cart was deleted.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("carts") as batch:
        batch.add_column(sa.Column("expires_at", sa.Double, nullable=True))
        batch.add_column(
            sa.Column("deleted_reason", sa.String(16), nullable=False, server_default="")
        )
        batch.create_index("ix_carts_state_last_used", ["state", "last_used_at"])
        batch.create_index("ix_carts_expires_at", ["expires_at"])


def downgrade() -> None:
    with op.batch_alter_table("carts") as batch:
        batch.drop_index("ix_carts_expires_at")
        batch.drop_index("ix_carts_state_last_used")
        batch.drop_column("deleted_reason")
        batch.drop_column("expires_at")
