"""Bundle options: per-cart manifest and partial flags, per-file CRC-32 and SHA-256.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("carts") as batch:
        batch.add_column(
            sa.Column("manifest", sa.Boolean, nullable=False, server_default=sa.false())
        )
        batch.add_column(
            sa.Column("allow_partial", sa.Boolean, nullable=False, server_default=sa.false())
        )
    # Nullable: files staged before this revision have neither; downloads fill them in.
    with op.batch_alter_table("cart_files") as batch:
        batch.add_column(sa.Column("crc32", sa.BigInteger, nullable=True))
        batch.add_column(sa.Column("sha256", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("cart_files") as batch:
        batch.drop_column("sha256")
        batch.drop_column("crc32")
    with op.batch_alter_table("carts") as batch:
        batch.drop_column("allow_partial")
        batch.drop_column("manifest")
