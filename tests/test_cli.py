"""The operator commands: their manual (`--help` everywhere), `config show`, `healthcheck`."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from pydantic import SecretStr

from cartd.cli import parser
from cartd.config_report import MASK, mask_url, shown
from cartd.settings import Settings
from conftest import free_port, run_cartd

CARTD = str(Path(sys.executable).parent / "cartd")


def test_unreachable_database_fails_clearly(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "CARTD_DATABASE_URL": "mysql+aiomysql://root@127.0.0.1:1/none",
        "DATABASE_CONNECT_ATTEMPTS": "2",
        "DATABASE_CONNECT_WAIT": "0",
    }
    result = subprocess.run(
        [CARTD, "db", "upgrade"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    assert "database not reachable (attempt 1/2)" in result.stderr


def _commands(
    node: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[str, ...]]:
    """Every command path of the parser tree: (), ("serve",), ("db",), ("db", "upgrade")..."""
    yield path
    for action in node._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _commands(child, (*path, name))


def _examples(page: str) -> list[list[str]]:
    """The command lines under `Examples:`, without `VAR=value` prefixes or the comment
    column (two or more spaces after the command)."""
    section = page.split("Examples:\n", 1)[1].split("\n\n", 1)[0]
    lines = [line.strip().split("  ", 1)[0] for line in section.splitlines()]
    return [[w for w in shlex.split(line) if "=" not in w or w.startswith("-")] for line in lines]


COMMANDS = list(_commands(parser()))


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: " ".join(("cartd", *p)))
def test_every_help_page_explains_itself(
    path: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    """A new operator can follow each page: what it does, examples that really parse, and
    the exit codes."""
    code, page, _ = run_cartd(capsys, *path, "--help")
    assert code == 0
    usage, description = page.split("\n\n")[:2]
    assert usage.startswith(f"usage: {' '.join(('cartd', *path))}")
    assert len(description.split()) >= 8, f"{path}: no description"
    assert "Exit status" in page
    examples = _examples(page)
    assert examples, f"{path}: no examples"
    for argv in examples:
        assert argv[0] == "cartd"
        assert argv[1 : 1 + len(path)] == list(path) or not path, argv
        parser().parse_args(argv[1:])  # SystemExit(2) if an example is wrong


def test_help_covers_every_command() -> None:
    assert {p[0] for p in COMMANDS if p} == {
        "serve", "healthcheck", "config", "db", "carts", "purge", "fsck", "openapi",
    }  # fmt: skip
    assert {("db", "upgrade"), ("db", "downgrade"), ("db", "status"), ("config", "show")} <= set(
        COMMANDS
    )


def test_config_show_masks_secrets_and_names_sources(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in os.environ:
        if name.startswith("CARTD_") or name in ("VOLUME_PATH", "ARCHIVE_INTERFACE_URL"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("CARTD_DATABASE_URL", "mysql+aiomysql://cartd:hunter2@db/cartd")
    monkeypatch.setenv("ARCHIVE_INTERFACE_URL", "https://ai:s3cret@archive/?token=tok3n&x=1")
    monkeypatch.setenv("VOLUME_PATH", "/srv/cache")
    code, table, _ = run_cartd(capsys, "config", "show")
    assert code == 0
    code, text, _ = run_cartd(capsys, "config", "show", "--json")
    assert code == 0
    for secret in ("hunter2", "s3cret", "tok3n"):
        assert secret not in table + text
    rows = {row["variable"]: row for row in json.loads(text)}
    assert set(rows) == {f"CARTD_{name.upper()}" for name in Settings.model_fields}
    assert rows["CARTD_DATABASE_URL"] == {
        "variable": "CARTD_DATABASE_URL",
        "aliases": [],
        "value": f"mysql+aiomysql://cartd:{MASK}@db/cartd",
        "source": "env CARTD_DATABASE_URL",
    }
    assert rows["CARTD_ARCHIVE_INTERFACE_URL"]["value"] == (
        f"https://ai:{MASK}@archive/?token={MASK}&x=1"
    )
    assert rows["CARTD_VOLUME_PATH"]["source"] == "env VOLUME_PATH"
    assert rows["CARTD_VOLUME_PATH"]["aliases"] == ["VOLUME_PATH"]
    assert (rows["CARTD_PORT"]["value"], rows["CARTD_PORT"]["source"]) == (8081, "default")
    line = next(line for line in table.splitlines() if line.startswith("CARTD_VOLUME_PATH "))
    assert line.split() == ["CARTD_VOLUME_PATH", "/srv/cache", "env", "VOLUME_PATH"]


def test_secret_settings_are_masked_by_name() -> None:
    """Settings added later are covered by their names, with no list to keep up to date."""
    assert shown("auth_token", "abc", "abc") == MASK
    assert shown("client_secret", "abc", "abc") == MASK
    assert shown("db_password", "abc", "abc") == MASK
    assert shown("api_key", "abc", "abc") == MASK
    assert shown("auth_token_file", "/etc/tokens", "/etc/tokens") == "/etc/tokens"
    assert shown("anything", SecretStr("abc"), "**********") == MASK
    assert shown("auth_token", "", "") == ""  # unset stays visibly unset
    assert mask_url("not a url: p@ss") == "not a url: p@ss"


def test_invalid_settings_exit_2_naming_each_without_values(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CARTD_PORT", "hunter2")
    monkeypatch.setenv("CARTD_FETCH_CONCURRENCY", "0")
    code, _, err = run_cartd(capsys, "config", "show")
    assert code == 2
    assert "hunter2" not in err
    assert "CARTD_PORT: Input should be a valid integer" in err
    assert "CARTD_FETCH_CONCURRENCY: Input should be greater than or equal to 1" in err


class _Health(BaseHTTPRequestHandler):
    status = 200
    paths: list[str] = []  # noqa: RUF012 (one server per test)

    def do_GET(self) -> None:
        self.paths.append(self.path)
        body = b'{"status": "ok"}'
        self.send_response(self.status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args: object) -> None:
        pass


@pytest.mark.parametrize(("status", "expected"), [(200, 0), (503, 1)])
def test_healthcheck_asks_healthz_on_the_configured_port(
    status: int,
    expected: int,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    handler = type("Health", (_Health,), {"status": status, "paths": []})
    with ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        monkeypatch.setenv("CARTD_HOST", "0.0.0.0")  # the container's: probe via loopback
        monkeypatch.setenv("CARTD_PORT", str(server.server_address[1]))
        code, out, _ = run_cartd(capsys, "healthcheck")
        server.shutdown()
    assert (code, handler.paths) == (expected, ["/healthz"])
    assert f"/healthz: {status} " in out


def test_healthcheck_fails_when_nothing_listens(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CARTD_PORT", str(free_port()))
    code, out, _ = run_cartd(capsys, "healthcheck", "--timeout", "2")
    assert code == 1
    assert "ConnectError" in out
