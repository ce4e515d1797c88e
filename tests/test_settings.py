"""Upstream pacifica-cartd environment names keep working next to the CARTD_ ones."""

from __future__ import annotations

from pathlib import Path

import pytest

from cartd.settings import Settings


def test_defaults_need_no_setup(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("VOLUME_PATH", "ARCHIVE_INTERFACE_URL", "CARTD_DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)
    settings = Settings()
    assert settings.database_url.startswith("sqlite+aiosqlite:///")
    assert settings.archive_interface_url == "file:./archive"
    assert (settings.host, settings.port) == ("127.0.0.1", 8081)
    assert settings.transfer_size == 1024 * 1024
    assert settings.fetch_concurrency == 8


def test_upstream_aliases(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VOLUME_PATH", "/srv/cache")
    monkeypatch.setenv("ARCHIVE_INTERFACE_URL", "http://archive:8080/")
    monkeypatch.setenv("LRU_BUFFER_TIME", "60")
    monkeypatch.setenv("TRANSFER_SIZE", "65536")
    monkeypatch.setenv("DATABASE_CONNECT_ATTEMPTS", "3")
    monkeypatch.setenv("DATABASE_CONNECT_WAIT", "7")
    settings = Settings()
    assert settings.volume_path == Path("/srv/cache")
    assert settings.archive_interface_url == "http://archive:8080/"
    assert settings.lru_buffer_time == 60
    assert settings.transfer_size == 65536
    assert (settings.database_connect_attempts, settings.database_connect_wait) == (3, 7)


def test_prefixed_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CARTD_VOLUME_PATH", "/a")
    monkeypatch.setenv("CARTD_FETCH_CONCURRENCY", "3")
    monkeypatch.setenv("CARTD_DATABASE_URL", "mysql+aiomysql://u:p@db/cartd")
    settings = Settings()
    assert (settings.volume_path, settings.fetch_concurrency) == (Path("/a"), 3)
    assert settings.database_url == "mysql+aiomysql://u:p@db/cartd"


def test_rejects_unknown_archive_scheme(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ARCHIVE_INTERFACE_URL", "ftp://archive/")
    with pytest.raises(ValueError, match="ARCHIVE_INTERFACE_URL"):
        Settings()


def test_readme_documents_every_setting() -> None:
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    for name, field in Settings.model_fields.items():
        assert f"`CARTD_{name.upper()}`" in readme, f"README lacks CARTD_{name.upper()}"
        assert field.validation_alias is not None
