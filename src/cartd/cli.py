"""The operator's entry points: serve, db upgrade, carts list, purge."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from cartd import admin, fsck, logs, server
from cartd.app import create_app
from cartd.db.migrate import upgrade
from cartd.db.session import (
    SessionFactory,
    create_engine,
    create_session_factory,
    wait_for_database,
)
from cartd.settings import Settings
from cartd.volume import Volume
from cartd.volume_lock import VolumeBusy

T = TypeVar("T")


def _serve(args: argparse.Namespace, settings: Settings) -> None:
    given = (("host", args.host), ("port", args.port), ("root_path", args.root_path))
    overrides = {k: v for k, v in given if v is not None}
    settings = Settings(**{**settings.model_dump(), **overrides})  # validates --root-path
    server.serve(create_app(settings), settings, settings.log_level)


def _fsck(args: argparse.Namespace, settings: Settings) -> None:
    """Exit 0 when database and volume agree (or were repaired), 1 if not, 2 if busy."""
    try:
        outcome = asyncio.run(fsck.fsck(settings, fix=args.repair, checksums=args.checksums))
    except VolumeBusy as exc:
        print(f"cartd fsck: {exc}; stop the service first", file=sys.stderr)
        raise SystemExit(2) from None
    lines, status = fsck.render(outcome, args.repair)
    print("\n".join(lines))
    raise SystemExit(status)


async def _upgrade(settings: Settings) -> None:
    engine = create_engine(settings)
    try:
        await wait_for_database(engine, settings)
        await upgrade(engine)
    finally:
        await engine.dispose()


async def _with_database(
    settings: Settings, action: Callable[[SessionFactory, Volume], Awaitable[T]]
) -> T:
    """Run an admin action against the configured database and volume, then disconnect."""
    engine = create_engine(settings)
    try:
        await wait_for_database(engine, settings)
        return await action(create_session_factory(engine), Volume(settings.volume_path))
    finally:
        await engine.dispose()


def _list_carts(_args: argparse.Namespace, settings: Settings) -> None:
    carts = asyncio.run(_with_database(settings, lambda sessions, _v: admin.list_carts(sessions)))
    print(admin.format_table(carts))


def _purge(args: argparse.Namespace, settings: Settings) -> None:
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
    asyncio.run(_upgrade(settings))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cartd", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the HTTP service and its staging worker")
    serve.add_argument("--host", help="listen address (default 127.0.0.1, CARTD_HOST)")
    serve.add_argument("--port", type=int, help="listen port (default 8081, CARTD_PORT)")
    serve.add_argument(
        "--log-level",
        choices=["critical", "error", "warning", "info", "debug"],
        help="log level (default info, CARTD_LOG_LEVEL)",
    )
    serve.add_argument(
        "--root-path", help="path prefix a reverse proxy serves cartd under (CARTD_ROOT_PATH)"
    )
    db = commands.add_parser("db", help="database maintenance")
    db_commands = db.add_subparsers(dest="db_command", required=True)
    db_commands.add_parser("upgrade", help="apply schema migrations (idempotent)").set_defaults(
        handler=_db_upgrade
    )
    carts = commands.add_parser("carts", help="inspect carts")
    carts_commands = carts.add_subparsers(dest="carts_command", required=True)
    carts_commands.add_parser(
        "list", help="every cart with its state, size and last use (least recent first)"
    ).set_defaults(handler=_list_carts)
    purge = commands.add_parser("purge", help="delete finished carts not used for a while")
    purge.add_argument("--older-than", required=True, help="e.g. 30d, 12h, 90m, 3600")
    purge.set_defaults(handler=_purge)
    check = commands.add_parser(
        "fsck", help="check that the database and the volume agree (service stopped)"
    )
    check.add_argument("--repair", action="store_true", help="fix what it finds")
    check.add_argument(
        "--checksums", action="store_true", help="also re-hash every staged file (slow)"
    )
    check.set_defaults(handler=_fsck)
    serve.set_defaults(handler=_serve)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    settings = Settings()
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
