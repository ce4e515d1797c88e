"""Operator actions that run beside (or without) the service: listing and purging carts."""

from __future__ import annotations

import re
import time
from datetime import datetime

from cartd.db import store
from cartd.db.models import Cart
from cartd.db.session import SessionFactory
from cartd.db.store import CartUsage
from cartd.volume import Volume

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float:
    """`30d`, `12h`, `90m`, `45s` or plain seconds."""
    match = _DURATION.match(text.lower())
    if not match:
        raise ValueError(f"{text!r} is not a duration (e.g. 30d, 12h, 90m, 3600)")
    return float(match[1]) * _SECONDS[match[2]]


async def purge(sessions: SessionFactory, volume: Volume, older_than: float) -> list[str]:
    """Delete finished carts unused for `older_than` seconds; staging carts are left alone,
    because their fetches belong to a running service."""
    cutoff = time.time() - older_than
    async with sessions.begin() as session:
        candidates = await store.eviction_candidates(session, cutoff)
    purged = []
    for usage in candidates:
        async with sessions.begin() as session:
            unused = (Cart.last_used_at < cutoff, Cart.state.in_(store.FINISHED_CART_STATES))
            if not await store.mark_deleted(session, usage.cart_id, "purged", *unused):
                continue
        await volume.remove_cart(usage.cart_id)
        purged.append(usage.uid)
    return purged


async def list_carts(sessions: SessionFactory) -> list[CartUsage]:
    async with sessions.begin() as session:
        return await store.carts_usage(session)


def _when(stamp: float | None) -> str:
    return datetime.fromtimestamp(stamp).strftime("%Y-%m-%d %H:%M:%S") if stamp else "-"


def format_table(carts: list[CartUsage]) -> str:
    rows = [("CART", "STATE", "FILES", "BYTES", "LAST USED", "CREATED", "EXPIRES")]
    rows += [
        (
            c.uid,
            c.state,
            str(c.files),
            str(c.bytes),
            _when(c.last_used_at),
            _when(c.created_at),
            _when(c.expires_at),
        )
        for c in carts
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in rows
    )
