"""`cartd serve` and `cartd db upgrade`: the operator's entry points."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence

import uvicorn

from cartd import fsck
from cartd.app import create_app
from cartd.db.migrate import upgrade
from cartd.db.session import create_engine, wait_for_database
from cartd.settings import Settings
from cartd.volume_lock import VolumeBusy


def _serve(args: argparse.Namespace, settings: Settings) -> None:
    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    settings = settings.model_copy(update=overrides)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=30,
    )


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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cartd", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the HTTP service and its staging worker")
    serve.add_argument("--host", help="listen address (default 127.0.0.1, CARTD_HOST)")
    serve.add_argument("--port", type=int, help="listen port (default 8081, CARTD_PORT)")
    serve.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )
    db = commands.add_parser("db", help="database maintenance")
    db_commands = db.add_subparsers(dest="db_command", required=True)
    db_commands.add_parser("upgrade", help="apply schema migrations (idempotent)")
    check = commands.add_parser(
        "fsck", help="check that the database and the volume agree (service stopped)"
    )
    check.add_argument("--repair", action="store_true", help="fix what it finds")
    check.add_argument(
        "--checksums", action="store_true", help="also re-hash every staged file (slow)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    settings = Settings()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # httpx logs every archive request at INFO: three lines per staged file is noise, and
    # formatting them costs real CPU on carts of many small files.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if args.command == "serve":
        _serve(args, settings)
    elif args.command == "fsck":
        _fsck(args, settings)
    elif args.command == "db" and args.db_command == "upgrade":
        try:
            asyncio.run(_upgrade(settings))
        except Exception as exc:  # an operator wants the cause, not a traceback
            raise SystemExit(f"cartd db upgrade failed: {exc}") from None


if __name__ == "__main__":
    main()
