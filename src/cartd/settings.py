"""The one source of configuration.

Every knob is read here and nowhere else, so that an operator can find all of them in one
place (and in the README table).  Upstream pacifica-cartd names stay valid as aliases because
existing deployments set them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_amount(text: str, total: int) -> int:
    """Bytes from `10%` (of `total`), `512MiB`, `2G` or a plain byte count."""
    value = text.strip().lower().replace(" ", "")
    if value.endswith("%"):
        percent = float(value[:-1])
        if not 0 <= percent <= 100:
            raise ValueError(f"percentage {text!r} must be between 0% and 100%")
        return int(total * percent / 100)
    number = value.rstrip("bi")
    unit = number[-1] if number and number[-1] in _UNITS else ""
    try:
        amount = float(number[: len(number) - len(unit)])
    except ValueError:
        raise ValueError(f"{text!r} is not a size (e.g. 10%, 512MiB, 2G, 1048576)") from None
    return int(amount * _UNITS[unit])


def _aliases(name: str, upstream: str | None = None) -> AliasChoices:
    """Accept `CARTD_<NAME>` always, and the upstream spelling where one exists."""
    choices = [f"CARTD_{name}"]
    if upstream:
        choices.append(upstream)
    return AliasChoices(*choices)


class Settings(BaseSettings):
    """Service configuration; field names are the lower-case `CARTD_*` variables."""

    model_config = SettingsConfigDict(
        env_prefix="CARTD_", populate_by_name=True, extra="ignore", frozen=True
    )

    database_url: str = Field(
        "sqlite+aiosqlite:///cartd.db", validation_alias=_aliases("DATABASE_URL")
    )
    volume_path: Path = Field(
        Path("volume"), validation_alias=_aliases("VOLUME_PATH", "VOLUME_PATH")
    )
    archive_interface_url: str = Field(
        "file:./archive",
        validation_alias=_aliases("ARCHIVE_INTERFACE_URL", "ARCHIVE_INTERFACE_URL"),
    )
    lru_buffer_time: float = Field(
        0.0, ge=0, validation_alias=_aliases("LRU_BUFFER_TIME", "LRU_BUFFER_TIME")
    )
    transfer_size: int = Field(
        1024 * 1024, ge=4096, validation_alias=_aliases("TRANSFER_SIZE", "TRANSFER_SIZE")
    )
    # Files at least this big are written around the page cache (direct_write.py); 0: none.
    direct_write_min: int = Field(
        64 * 1024 * 1024, ge=0, validation_alias=_aliases("DIRECT_WRITE_MIN")
    )
    database_connect_attempts: int = Field(
        10,
        ge=1,
        validation_alias=_aliases("DATABASE_CONNECT_ATTEMPTS", "DATABASE_CONNECT_ATTEMPTS"),
    )
    database_connect_wait: float = Field(
        20.0, ge=0, validation_alias=_aliases("DATABASE_CONNECT_WAIT", "DATABASE_CONNECT_WAIT")
    )
    host: str = Field("127.0.0.1", validation_alias=_aliases("HOST"))
    port: int = Field(8081, ge=0, le=65535, validation_alias=_aliases("PORT"))
    # An empty database is always initialised; this upgrades one that is behind (db/migrate.py).
    auto_migrate: bool = Field(False, validation_alias=_aliases("AUTO_MIGRATE"))
    fetch_concurrency: int = Field(8, ge=1, le=256, validation_alias=_aliases("FETCH_CONCURRENCY"))
    max_files_per_cart: int = Field(100_000, ge=1, validation_alias=_aliases("MAX_FILES_PER_CART"))
    max_request_bytes: int = Field(
        64 * 1024 * 1024, ge=1024, validation_alias=_aliases("MAX_REQUEST_BYTES")
    )
    stage_timeout: float = Field(6 * 3600.0, gt=0, validation_alias=_aliases("STAGE_TIMEOUT"))
    status_poll_initial: float = Field(0.5, gt=0, validation_alias=_aliases("STATUS_POLL_INITIAL"))
    status_poll_max: float = Field(30.0, gt=0, validation_alias=_aliases("STATUS_POLL_MAX"))
    retry_initial: float = Field(0.5, gt=0, validation_alias=_aliases("RETRY_INITIAL"))
    retry_max: float = Field(30.0, gt=0, validation_alias=_aliases("RETRY_MAX"))
    archive_unreachable_timeout: float = Field(
        600.0, gt=0, validation_alias=_aliases("ARCHIVE_UNREACHABLE_TIMEOUT")
    )
    archive_concurrency: int = Field(
        8, ge=1, le=256, validation_alias=_aliases("ARCHIVE_CONCURRENCY")
    )
    archive_connect_timeout: float = Field(
        10.0, gt=0, validation_alias=_aliases("ARCHIVE_CONNECT_TIMEOUT")
    )
    archive_read_timeout: float = Field(
        300.0, gt=0, validation_alias=_aliases("ARCHIVE_READ_TIMEOUT")
    )

    cache_low_watermark: str = Field("5%", validation_alias=_aliases("CACHE_LOW_WATERMARK"))
    cache_high_watermark: str = Field("10%", validation_alias=_aliases("CACHE_HIGH_WATERMARK"))
    cache_check_interval: float = Field(
        30.0, gt=0, validation_alias=_aliases("CACHE_CHECK_INTERVAL")
    )
    cart_ttl: float = Field(0.0, ge=0, validation_alias=_aliases("CART_TTL"))
    cart_ttl_max: float = Field(30 * 86400.0, ge=0, validation_alias=_aliases("CART_TTL_MAX"))
    # SIGTERM: staging stops at once; downloads in flight get this many seconds to finish.
    shutdown_grace: int = Field(30, ge=0, validation_alias=_aliases("SHUTDOWN_GRACE"))
    # Live progress: how often in-flight byte counts reach the database, how often an SSE
    # stream re-reads the status, and how long a quiet stream waits before a heartbeat.
    progress_interval: float = Field(2.0, gt=0, validation_alias=_aliases("PROGRESS_INTERVAL"))
    # HEAD answers are kept this long (0: never); other replicas' changes show after it.
    head_cache_ttl: float = Field(
        1.0, ge=0, validation_alias=_aliases("HEAD_CACHE_TTL")
    )
    events_poll_interval: float = Field(
        0.5, gt=0, validation_alias=_aliases("EVENTS_POLL_INTERVAL")
    )
    events_heartbeat: float = Field(15.0, gt=0, validation_alias=_aliases("EVENTS_HEARTBEAT"))
    # Reverse proxies whose X-Forwarded-For / -Proto cartd believes: comma-separated IPs/CIDRs.
    trusted_proxies: str = Field("127.0.0.1", validation_alias=_aliases("TRUSTED_PROXIES"))
    # Access control, off by default (pacifica-cartd has none): `token` checks bearer tokens
    # from a file, `proxy` believes an identity header set by a trusted proxy.
    auth: Literal["none", "token", "proxy"] = Field("none", validation_alias=_aliases("AUTH"))
    auth_tokens_file: Path | None = Field(None, validation_alias=_aliases("AUTH_TOKENS_FILE"))
    auth_header: str = Field("X-Remote-User", validation_alias=_aliases("AUTH_HEADER"))
    # Observability: log format and level, and how long /readyz waits for each check.
    log_format: Literal["auto", "json", "console"] = Field(
        "auto", validation_alias=_aliases("LOG_FORMAT")
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        "info", validation_alias=_aliases("LOG_LEVEL")
    )
    ready_timeout: float = Field(2.0, gt=0, validation_alias=_aliases("READY_TIMEOUT"))
    # Behind a reverse proxy: the path prefix it serves cartd under (see trusted_proxies).
    root_path: str = Field("", validation_alias=_aliases("ROOT_PATH"))
    # Replicas: a claimed file's lease lasts this long unless renewed; a dead replica's
    # files are taken over after at most one lease.  Every CANCEL_POLL_INTERVAL seconds
    # a replica renews its leases and stops fetches whose cart was deleted or failed
    # elsewhere, which bounds how long a DELETE on another replica takes to stop them.
    lease_seconds: float = Field(60.0, gt=0, validation_alias=_aliases("LEASE_SECONDS"))
    cancel_poll_interval: float = Field(
        5.0, gt=0, validation_alias=_aliases("CANCEL_POLL_INTERVAL")
    )

    @field_validator("cache_low_watermark", "cache_high_watermark")
    @classmethod
    def _size_or_percent(cls, value: str) -> str:
        parse_amount(value, total=1)  # raises ValueError with a clear message
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_level(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @field_validator("root_path")
    @classmethod
    def _path_prefix(cls, value: str) -> str:
        """`/cartd/` and `/cartd` mean the same prefix; anything not starting with / is a typo."""
        value = value.rstrip("/")
        if value and not value.startswith("/"):
            raise ValueError("ROOT_PATH must be empty or start with / (e.g. /cartd)")
        return value

    @model_validator(mode="after")
    def _renewals_fit_the_lease(self) -> Settings:
        if self.cancel_poll_interval * 3 > self.lease_seconds:
            raise ValueError(
                "CARTD_CANCEL_POLL_INTERVAL must be at most a third of CARTD_LEASE_SECONDS, "
                "so that a lease is renewed at least twice before it lapses"
            )
        return self

    @field_validator("archive_interface_url")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        if urlsplit(value).scheme not in {"http", "https", "file"}:
            raise ValueError("ARCHIVE_INTERFACE_URL must be an http(s):// or file: URL")
        return value


def env_names(field: str) -> tuple[str, ...]:
    """The environment variables that set `field`, in order of precedence."""
    alias = Settings.model_fields[field].validation_alias
    assert isinstance(alias, AliasChoices)
    return tuple(str(choice) for choice in alias.choices)


def env_sources() -> dict[str, str]:
    """Which variable set each field that the environment sets (as Settings() picks it, case
    ignored), so `cartd config show` can tell an operator where a value came from."""
    present = {name.lower(): name for name in os.environ}
    sources: dict[str, str] = {}
    for field in Settings.model_fields:
        found = [present[name.lower()] for name in env_names(field) if name.lower() in present]
        if found:
            sources[field] = found[0]
    return sources
