"""The operator's entry points; `cartd --help` (text in cli_help.py) is their manual.

Commands import the service's machinery (FastAPI, SQLAlchemy, Alembic) when they run, not
here: the container's HEALTHCHECK runs `cartd healthcheck` every 30 seconds, and it should
cost a fraction of a second, not the ~1 s that importing the whole service takes.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

from pydantic import ValidationError

from cartd import cli_help as pages
from cartd.settings import Settings, env_sources

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

    from sqlalchemy.ext.asyncio import AsyncEngine

    from cartd.db.migrate import SchemaStatus
    from cartd.db.session import SessionFactory
    from cartd.volume import Volume

T = TypeVar("T")
log = logging.getLogger(__name__)


def _serve(args: argparse.Namespace, settings: Settings) -> None:
    """Apply the schema policy before uvicorn starts, so a refusal is one clear line on
    stderr and exit 1 rather than a lifespan traceback."""
    from cartd import server
    from cartd.api.auth import AuthConfigError
    from cartd.app import create_app
    from cartd.db.migrate import SchemaMismatch, SchemaState

    given = (("host", args.host), ("port", args.port), ("root_path", args.root_path))
    overrides = {k: v for k, v in given if v is not None}
    settings = Settings(**{**settings.model_dump(), **overrides})  # validates --root-path
    accepted, schema = _prepare_apart(settings)
    if isinstance(schema, str):
        raise SystemExit(f"cartd serve: database not usable: {schema}")
    if not accepted:
        raise SystemExit(f"cartd serve: {SchemaMismatch(schema)}")
    if schema.state is not SchemaState.CURRENT:
        log.info("database schema upgraded: %s -> %s", schema.revision or "empty", schema.head)
    try:
        app = create_app(settings)
    except AuthConfigError as exc:  # the operator's fix is in the message, not a traceback
        raise SystemExit(f"cartd serve: {exc}") from None
    server.serve(app, settings, settings.log_level)


def _prepare_apart(settings: Settings) -> tuple[bool, SchemaStatus | str]:
    """Apply the schema policy in a forked child: whether it accepted the schema, and the
    status it found, or what went wrong.

    Creating or upgrading the schema imports Alembic, Mako and Pygments, about 10 MB that
    the server would keep for good (modules are never unloaded) and never use again: the
    app's own check at start-up reads alembic_version without them.  Nothing runs in
    the server yet (no thread, no event loop), so forking here is safe.
    """
    import multiprocessing

    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_prepare_in_child, args=(settings, send), name="schema")
    child.start()
    send.close()
    try:
        outcome: tuple[bool, SchemaStatus | str] = receive.recv()
    except EOFError:  # the child died without a word; its status is known once reaped
        child.join()
        return False, f"the schema check exited with status {child.exitcode}"
    child.join()
    return outcome


def _prepare_in_child(settings: Settings, send: Connection) -> None:
    from cartd.db import migrate

    try:
        status = asyncio.run(
            _with_engine(settings, lambda e: migrate.prepare(e, settings.auto_migrate))
        )
    except migrate.SchemaMismatch as exc:
        send.send((False, exc.status))
    except Exception as exc:
        send.send((False, str(exc)))
    else:
        send.send((True, status))


def _openapi(args: argparse.Namespace, settings: Settings) -> None:
    """No database or volume needed: the document follows from the code alone."""
    from cartd.api import openapi
    from cartd.app import create_app

    text = openapi.render(create_app(settings).openapi())
    if args.output is None:
        sys.stdout.write(text)
    else:
        Path(args.output).write_text(text, encoding="utf-8")


def _fsck(args: argparse.Namespace, settings: Settings) -> None:
    """Exit 0 when database and volume agree (or were repaired), 1 if not, 2 if busy."""
    from cartd import fsck
    from cartd.volume_lock import VolumeBusy

    try:
        outcome = asyncio.run(fsck.fsck(settings, fix=args.repair, checksums=args.checksums))
    except VolumeBusy as exc:
        print(f"cartd fsck: {exc}; stop the service first", file=sys.stderr)
        raise SystemExit(2) from None
    lines, status = fsck.render(outcome, args.repair)
    print("\n".join(lines))
    raise SystemExit(status)


async def _with_engine(settings: Settings, action: Callable[[AsyncEngine], Awaitable[T]]) -> T:
    """Run `action` once the database answers, then disconnect."""
    from cartd.db.session import create_engine, wait_for_database

    engine = create_engine(settings)
    try:
        await wait_for_database(engine, settings)
        return await action(engine)
    finally:
        await engine.dispose()


async def _with_database(
    settings: Settings, action: Callable[[SessionFactory, Volume], Awaitable[T]]
) -> T:
    """Run an admin action against the configured database and volume, then disconnect.
    A schema not at head is refused: its tables may not have the columns the action uses."""
    from cartd.db import migrate
    from cartd.db.session import create_session_factory
    from cartd.volume import Volume

    async def run(engine: AsyncEngine) -> T:
        await migrate.require_current(engine)
        return await action(create_session_factory(engine), Volume(settings.volume_path))

    return await _with_engine(settings, run)


def _list_carts(_args: argparse.Namespace, settings: Settings) -> None:
    from cartd import admin

    carts = asyncio.run(_with_database(settings, lambda sessions, _v: admin.list_carts(sessions)))
    print(admin.format_table(carts))


def _purge(args: argparse.Namespace, settings: Settings) -> None:
    from cartd import admin

    try:
        older_than = admin.parse_duration(args.older_than)
    except ValueError as exc:
        raise SystemExit(f"cartd purge: {exc}") from None
    purged = asyncio.run(
        _with_database(settings, lambda sessions, volume: admin.purge(sessions, volume, older_than))
    )
    for uid in purged:
        print(f"purged {uid}")
    print(f"{len(purged)} carts purged")


def _db_upgrade(_args: argparse.Namespace, settings: Settings) -> None:
    from cartd.db import migrate

    before = asyncio.run(_with_engine(settings, migrate.upgrade))
    if before.state is migrate.SchemaState.CURRENT:
        print(f"database schema already at {before.head}: nothing to do")
    else:
        print(f"database schema upgraded: {before.revision or 'empty'} -> {before.head}")


def _db_downgrade(args: argparse.Namespace, settings: Settings) -> None:
    from cartd.db import migrate

    asyncio.run(_with_engine(settings, lambda engine: migrate.downgrade(engine, args.revision)))
    print(f"database schema at {args.revision}")


def _db_status(_args: argparse.Namespace, settings: Settings) -> None:
    from cartd.db import migrate
    from cartd.db.migrate import SchemaState

    status = asyncio.run(_with_engine(settings, migrate.status))
    print(status.describe())
    codes = {SchemaState.CURRENT: 0, SchemaState.EMPTY: 1, SchemaState.BEHIND: 1}
    raise SystemExit(codes.get(status.state, 3))


def _config_show(args: argparse.Namespace, settings: Settings) -> None:
    from cartd import config_report

    table = config_report.rows(settings, env_sources())
    print(config_report.render_json(table) if args.json else config_report.render_table(table))


def _healthcheck(args: argparse.Namespace, settings: Settings) -> None:
    from cartd.healthcheck import default_url, probe

    healthy, line = probe(args.url or default_url(settings), args.timeout)
    print(line)
    raise SystemExit(0 if healthy else 1)


def _command(
    commands: Any, name: str, summary: str, text: tuple[str, str]
) -> argparse.ArgumentParser:
    """A subcommand whose --help page is `text` (description, epilog) from cli_help."""
    return cast(
        argparse.ArgumentParser,
        commands.add_parser(
            name,
            help=summary,
            description=text[0],
            epilog=text[1],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        ),
    )


def _add_serve(commands: Any) -> None:
    serve = _command(
        commands,
        "serve",
        "run the HTTP service and its staging worker",
        (pages.SERVE, pages.SERVE_EPILOG),
    )
    serve.add_argument("--host", help="listen address (default: CARTD_HOST, 127.0.0.1)")
    serve.add_argument("--port", type=int, help="listen port (default: CARTD_PORT, 8081)")
    serve.add_argument(
        "--log-level",
        choices=["critical", "error", "warning", "info", "debug"],
        help="log level (default info, CARTD_LOG_LEVEL)",
    )
    serve.add_argument(
        "--root-path", help="path prefix a reverse proxy serves cartd under (CARTD_ROOT_PATH)"
    )
    serve.set_defaults(handler=_serve)
    check = _command(
        commands,
        "healthcheck",
        "ask a running service whether it is alive",
        (pages.HEALTHCHECK, pages.HEALTHCHECK_EPILOG),
    )
    check.add_argument("--url", help="what to GET (default: http://127.0.0.1:CARTD_PORT/healthz)")
    check.add_argument("--timeout", type=float, default=3.0, help="seconds (default 3)")
    check.set_defaults(handler=_healthcheck)


def _add_db(commands: Any) -> None:
    db = _command(
        commands, "db", "database schema: status, upgrade, downgrade", (pages.DB, pages.DB_EPILOG)
    )
    sub = db.add_subparsers(dest="db_command", required=True, metavar="SUBCOMMAND")
    _command(
        sub,
        "status",
        "the schema's revision against this cartd's",
        (pages.DB_STATUS, pages.DB_STATUS_EPILOG),
    ).set_defaults(handler=_db_status)
    _command(
        sub,
        "upgrade",
        "create or upgrade the schema to this cartd's (idempotent)",
        (pages.DB_UPGRADE, pages.DB_UPGRADE_EPILOG),
    ).set_defaults(handler=_db_upgrade)
    down = _command(
        sub,
        "downgrade",
        "step the schema back, for a rollback",
        (pages.DB_DOWNGRADE, pages.DB_DOWNGRADE_EPILOG),
    )
    down.add_argument("revision", metavar="REVISION", help="e.g. 0002, or base (drops all)")
    down.set_defaults(handler=_db_downgrade)


def _add_config(commands: Any) -> None:
    config = _command(
        commands, "config", "inspect the configuration", (pages.CONFIG, pages.CONFIG_EPILOG)
    )
    sub = config.add_subparsers(dest="config_command", required=True, metavar="SUBCOMMAND")
    show = _command(
        sub,
        "show",
        "print the effective settings, secrets masked",
        (pages.CONFIG_SHOW, pages.CONFIG_SHOW_EPILOG),
    )
    show.add_argument("--json", action="store_true", help="print JSON instead of a table")
    show.set_defaults(handler=_config_show)


def _add_carts(commands: Any) -> None:
    carts = _command(commands, "carts", "inspect carts", (pages.CARTS, pages.CARTS_EPILOG))
    sub = carts.add_subparsers(dest="carts_command", required=True, metavar="SUBCOMMAND")
    _command(
        sub,
        "list",
        "every cart with its state, size and last use (least recent first)",
        (pages.CARTS_LIST, pages.CARTS_LIST_EPILOG),
    ).set_defaults(handler=_list_carts)
    purge = _command(
        commands,
        "purge",
        "delete finished carts not used for a while",
        (pages.PURGE, pages.PURGE_EPILOG),
    )
    purge.add_argument("--older-than", required=True, help="e.g. 30d, 12h, 90m, 3600")
    purge.set_defaults(handler=_purge)
    check = _command(
        commands,
        "fsck",
        "check that the database and the volume agree",
        (pages.FSCK, pages.FSCK_EPILOG),
    )
    check.add_argument("--repair", action="store_true", help="fix what it finds")
    check.add_argument(
        "--checksums", action="store_true", help="also re-hash every staged file (slow)"
    )
    check.set_defaults(handler=_fsck)


def _add_openapi(commands: Any) -> None:
    spec = _command(
        commands,
        "openapi",
        "print the OpenAPI document (make openapi writes docs/openapi.json)",
        (pages.OPENAPI, pages.OPENAPI_EPILOG),
    )
    spec.add_argument("--output", "-o", help="write it to this file instead of stdout")
    spec.set_defaults(handler=_openapi)


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(
        prog="cartd",
        description=pages.MAIN,
        epilog=pages.MAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = root.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_serve, _add_config, _add_db, _add_carts, _add_openapi):
        add(commands)
    return root


def _settings() -> Settings:
    """Settings, or exit 2 naming each invalid one (without echoing values: secrets)."""
    try:
        return Settings()
    except ValidationError as exc:
        lines = [
            f"  {'.'.join(str(part) for part in error['loc'])}: {error['msg']}"
            for error in exc.errors(include_input=False, include_url=False)
        ]
        print("cartd: invalid configuration:\n" + "\n".join(lines), file=sys.stderr)
        raise SystemExit(2) from None


def main(argv: Sequence[str] | None = None) -> None:
    from cartd import logs

    args = parser().parse_args(argv)
    settings = _settings()
    if getattr(args, "log_level", None):
        settings = settings.model_copy(update={"log_level": args.log_level})
    logs.configure(settings.log_format, settings.log_level)
    if args.command == "serve":
        args.handler(args, settings)
        return
    try:
        args.handler(args, settings)
    except Exception as exc:  # an operator wants the cause, not a traceback
        raise SystemExit(f"cartd {args.command} failed: {exc}") from None


if __name__ == "__main__":
    main()
