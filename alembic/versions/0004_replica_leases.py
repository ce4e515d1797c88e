"""Replica leases: who fetches a file until when, its space promise, download holds.

Several cartd replicas share one database.  A `staging` file row names the replica that
claimed it (`lease_owner`) and the moment its claim lapses unless renewed
(`lease_expires`); `reserved` is the space that fetch promised itself on the shared
volume.  A cart row's `held_until` keeps its files from eviction while a replica
(`held_by`) streams them.  The one-row `cartd_locks` table serialises space reservations
across replicas.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("cart_files") as batch:
        batch.add_column(sa.Column("lease_owner", sa.String(64), nullable=True))
        batch.add_column(sa.Column("lease_expires", sa.Double, nullable=True))
        batch.add_column(sa.Column("reserved", sa.BigInteger, nullable=True))
    with op.batch_alter_table("carts") as batch:
        batch.add_column(sa.Column("held_until", sa.Double, nullable=True))
        batch.add_column(sa.Column("held_by", sa.String(64), nullable=True))
    locks = op.create_table(
        "cartd_locks",
        sa.Column("name", sa.String(32), primary_key=True),
        mysql_charset="utf8mb4",
        mysql_collate="utf8mb4_bin",
    )
    op.bulk_insert(locks, [{"name": "space"}])


def downgrade() -> None:
    op.drop_table("cartd_locks")
    with op.batch_alter_table("carts") as batch:
        batch.drop_column("held_by")
        batch.drop_column("held_until")
    with op.batch_alter_table("cart_files") as batch:
        batch.drop_column("reserved")
        batch.drop_column("lease_expires")
        batch.drop_column("lease_owner")
