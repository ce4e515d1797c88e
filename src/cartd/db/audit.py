"""The read-mostly statements of `cartd fsck`: a snapshot of every live cart and its files.

Kept apart from store.py, whose statements serve the running service; these run only
while the volume lock shows that no service is running.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import and_, exists, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from cartd.db import store
from cartd.db.models import Cart, CartFile, CartState, FileState
from cartd.db.store import LIVE_CART_STATES


@dataclass(frozen=True)
class CartRow:
    id: int
    uid: str
    state: str
    allow_partial: bool = False


@dataclass(frozen=True)
class FileRow:
    id: int
    cart_id: int
    state: str
    size: int | None
    hashtype: str
    hashsum: str


async def live_carts(session: AsyncSession) -> list[CartRow]:
    """Every cart that still owns files on the volume (anything not deleted)."""
    result = await session.execute(
        select(Cart.id, Cart.uid, Cart.state, Cart.allow_partial)
        .where(Cart.state != CartState.DELETED)
        .order_by(Cart.id)
    )
    return [CartRow(*row) for row in result.all()]


async def cart_file_rows(session: AsyncSession, cart_id: int) -> Sequence[FileRow]:
    result = await session.execute(
        select(
            CartFile.id,
            CartFile.cart_id,
            CartFile.state,
            CartFile.size,
            CartFile.hashtype,
            CartFile.hashsum,
        ).where(CartFile.cart_id == cart_id)
    )
    return [FileRow(*row) for row in result.all()]


async def mark_ready(session: AsyncSession, cart_id: int) -> bool:
    """A live cart whose files are all staged is ready; the guard re-checks that in SQL.

    A partial cart finishes by the rule the service applies to it (store.finish_partial).
    """
    now = time.time()
    partial = await session.execute(select(Cart.allow_partial).where(Cart.id == cart_id))
    if partial.scalar():
        return await store.finish_partial(session, cart_id, now)
    unfinished = exists().where(
        and_(CartFile.cart_id == cart_id, CartFile.state != FileState.STAGED)
    )
    result = await session.execute(
        update(Cart)
        .where(Cart.id == cart_id, Cart.state.in_(LIVE_CART_STATES), ~unfinished)
        .values(state=CartState.READY, ready_at=now, last_used_at=now, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]
