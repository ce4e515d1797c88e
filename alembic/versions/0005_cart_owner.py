"""Cart owners: each identity has a namespace of cart ids of its own (access control).

Every existing cart gets the owner "", the identity of every request with CARTD_AUTH=none,
so nothing changes for a service without access control.  The unique index that makes two
concurrent POSTs of one id collide moves from `active_uid` to (`owner`, `active_uid`).

Downgrading cannot keep two owners' carts of the same id: carts with an owner are marked
deleted ("purged"), which is what they become to a service without access control anyway,
and the next start-up or `cartd fsck --repair` frees their files.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-28
"""

from __future__ import annotations

import time

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

NEW_UNIQUE = "uq_carts_owner_active_uid"
# 0001 left the unique constraint on active_uid unnamed: MariaDB calls it after the column,
# SQLite not at all, so batch mode names it by this convention to be able to drop it.
_CONVENTION = {"uq": "uq_%(table_name)s_%(column_0_name)s"}


def _old_unique_name() -> str:
    mysql = op.get_bind().dialect.name in ("mysql", "mariadb")
    return "active_uid" if mysql else "uq_carts_active_uid"


def upgrade() -> None:
    with op.batch_alter_table("carts", naming_convention=_CONVENTION) as batch:
        batch.add_column(sa.Column("owner", sa.String(255), nullable=False, server_default=""))
        batch.drop_constraint(_old_unique_name(), type_="unique")
        batch.create_unique_constraint(NEW_UNIQUE, ["owner", "active_uid"])


def downgrade() -> None:
    carts = sa.table(
        "carts",
        sa.column("owner", sa.String),
        sa.column("state", sa.String),
        sa.column("active_uid", sa.String),
        sa.column("deleted_at", sa.Double),
        sa.column("deleted_reason", sa.String),
    )
    op.execute(
        carts.update()
        .where(carts.c.owner != "", carts.c.state != "deleted")
        .values(state="deleted", active_uid=None, deleted_at=time.time(), deleted_reason="purged")
    )
    with op.batch_alter_table("carts", naming_convention=_CONVENTION) as batch:
        batch.drop_constraint(NEW_UNIQUE, type_="unique")
        batch.drop_column("owner")
        batch.create_unique_constraint(_old_unique_name(), ["active_uid"])
