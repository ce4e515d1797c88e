"""Initial schema: carts and their files.

Revision ID: 0001
Revises:
Create Date: 2026-11-28
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# Binary collation: cart ids are case-sensitive, and MariaDB's default collation would
# make /ABC and /abc the same cart.
_MYSQL: dict[str, Any] = {
    "mysql_charset": "utf8mb4",
    "mysql_collate": "utf8mb4_bin",
    "mysql_engine": "InnoDB",
}


def upgrade() -> None:
    op.create_table(
        "carts",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("uid", sa.String(128), nullable=False, index=True),
        sa.Column("active_uid", sa.String(128), nullable=True, unique=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("message", sa.Text, nullable=False),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("file_count", sa.Integer, nullable=False),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.Column("updated_at", sa.Double, nullable=False),
        sa.Column("ready_at", sa.Double, nullable=True),
        sa.Column("last_used_at", sa.Double, nullable=False),
        sa.Column("deleted_at", sa.Double, nullable=True),
        **_MYSQL,
    )
    op.create_table(
        "cart_files",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column(
            "cart_id", sa.Integer, sa.ForeignKey("carts.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("position", sa.Integer, nullable=False),
        sa.Column("archive_id", sa.String(1024), nullable=False),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("hashtype", sa.String(32), nullable=False),
        sa.Column("hashsum", sa.String(256), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("size", sa.BigInteger, nullable=True),
        sa.Column("bytes_staged", sa.BigInteger, nullable=False),
        sa.Column("mtime", sa.Double, nullable=True),
        sa.Column("error", sa.Text, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("updated_at", sa.Double, nullable=False),
        **_MYSQL,
    )
    op.create_index("ix_cart_files_cart_position", "cart_files", ["cart_id", "position"])
    op.create_index("ix_cart_files_claim", "cart_files", ["state", "cart_id", "position"])


def downgrade() -> None:
    op.drop_table("cart_files")
    op.drop_table("carts")
