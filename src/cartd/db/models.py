"""The two tables.  Every state a cart or file can be in is a row value here.

Times are float epoch seconds (DOUBLE): portable between SQLite and MariaDB, free of
time-zone surprises, and cheap to compare for LRU ordering.
"""

from __future__ import annotations

from enum import StrEnum

from sqlalchemy import (
    BigInteger,
    Boolean,
    Double,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class CartState(StrEnum):
    WAITING = "waiting"
    STAGING = "staging"
    READY = "ready"
    ERROR = "error"
    DELETED = "deleted"


class FileState(StrEnum):
    WAITING = "waiting"
    STAGING = "staging"
    STAGED = "staged"
    ERROR = "error"


class Base(DeclarativeBase):
    pass


class Cart(Base):
    """A client's cart.  `active_uid` equals `uid` until deletion, then NULL.

    The unique index on (`owner`, `active_uid`) lets a deleted cart's id be reused while
    still making two concurrent POSTs of one id collide in the database rather than in
    memory.  Each owner has a namespace of cart ids of its own (schema 0005): with access
    control on, one identity's cart id says nothing about another's.
    """

    __tablename__ = "carts"
    # Binary collation on MariaDB: cart ids are case-sensitive (the migration says the same).
    __table_args__ = (
        UniqueConstraint("owner", "active_uid", name="uq_carts_owner_active_uid"),
        {"mysql_charset": "utf8mb4", "mysql_collate": "utf8mb4_bin"},
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    uid: Mapped[str] = mapped_column(String(128), index=True)
    active_uid: Mapped[str | None] = mapped_column(String(128))
    # The identity that created the cart; "" when access control is off (CARTD_AUTH=none).
    owner: Mapped[str] = mapped_column(String(255), default="")
    state: Mapped[str] = mapped_column(String(16), default=CartState.WAITING)
    message: Mapped[str] = mapped_column(Text, default="")
    fingerprint: Mapped[str] = mapped_column(String(64))
    file_count: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[float] = mapped_column(Double)
    updated_at: Mapped[float] = mapped_column(Double)
    ready_at: Mapped[float | None] = mapped_column(Double, default=None)
    last_used_at: Mapped[float] = mapped_column(Double)
    deleted_at: Mapped[float | None] = mapped_column(Double, default=None)
    expires_at: Mapped[float | None] = mapped_column(Double, default=None, index=True)
    # Why it left: "deleted" (a client), "evicted" (LRU), "expired" (TTL), "purged" (admin).
    deleted_reason: Mapped[str] = mapped_column(String(16), default="")
    # Options chosen at POST: every download carries MANIFEST.*; failed files do not fail
    # the cart, whose bundle then lists them in ERRORS.json.
    manifest: Mapped[bool] = mapped_column(Boolean, default=False)
    allow_partial: Mapped[bool] = mapped_column(Boolean, default=False)
    # While some replica streams this cart's files (renewed as it streams): no replica
    # may evict them or delete its directory before then.
    held_until: Mapped[float | None] = mapped_column(Double, default=None)
    held_by: Mapped[str | None] = mapped_column(String(64), default=None)


class CartFile(Base):
    """One archive file of a cart.  Its bytes live at `volume/carts/<cart id>/<file id>`."""

    __tablename__ = "cart_files"
    __table_args__ = (
        Index("ix_cart_files_cart_position", "cart_id", "position"),
        Index("ix_cart_files_claim", "state", "cart_id", "position"),
        {"mysql_charset": "utf8mb4", "mysql_collate": "utf8mb4_bin"},
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    cart_id: Mapped[int] = mapped_column(ForeignKey("carts.id", ondelete="CASCADE"))
    position: Mapped[int] = mapped_column(Integer)
    archive_id: Mapped[str] = mapped_column(String(1024))
    path: Mapped[str] = mapped_column(Text)
    hashtype: Mapped[str] = mapped_column(String(32))
    hashsum: Mapped[str] = mapped_column(String(256))
    state: Mapped[str] = mapped_column(String(16), default=FileState.WAITING)
    size: Mapped[int | None] = mapped_column(BigInteger, default=None)
    bytes_staged: Mapped[int] = mapped_column(BigInteger, default=0)
    mtime: Mapped[float | None] = mapped_column(Double, default=None)
    error: Mapped[str] = mapped_column(Text, default="")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    updated_at: Mapped[float] = mapped_column(Double)
    # Computed while staging, for zip headers and MANIFEST.sha256; NULL for files staged
    # before schema 0003 (a download computes and saves them on first need).
    crc32: Mapped[int | None] = mapped_column(BigInteger, default=None)
    sha256: Mapped[str | None] = mapped_column(String(64), default=None)
    # A `staging` row's lease: the replica fetching it, until when (renewed while it
    # fetches), and the bytes that fetch promised itself on the shared volume.
    lease_owner: Mapped[str | None] = mapped_column(String(64), default=None)
    lease_expires: Mapped[float | None] = mapped_column(Double, default=None)
    reserved: Mapped[int | None] = mapped_column(BigInteger, default=None)


class Lock(Base):
    """Named rows that replicas lock (SELECT ... FOR UPDATE) to serialise a decision."""

    __tablename__ = "cartd_locks"
    __table_args__ = ({"mysql_charset": "utf8mb4", "mysql_collate": "utf8mb4_bin"},)

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
