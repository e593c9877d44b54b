"""``livesrv serve`` and ``livesrv users …``."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from typing import Any

from .config import ConfigError, Settings, load_settings

log = logging.getLogger("livesrv")


def _add_core_flags(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS: a flag given before a subcommand is not overwritten by the subcommand's default,
    # so `livesrv users --data-dir D add NAME` and `livesrv users add NAME --data-dir D` both work
    parser.argument_default = argparse.SUPPRESS
    parser.add_argument("--config", help="a TOML file of settings")
    parser.add_argument("--http", help="HTTP listen address HOST:PORT (default 0.0.0.0:8080)")
    parser.add_argument("--rtmp", help="RTMP listen address HOST:PORT (default 0.0.0.0:1935)")
    parser.add_argument("--data-dir", dest="data_dir", help="where data lives (default ./var)")
    parser.add_argument("--redis", help="Redis URL for a cluster bus (default: in-process)")
    parser.add_argument("--database", help="database URL (default: SQLite in the data dir)")
    parser.add_argument("--public-url", dest="public_url",
                        help="the URL viewers and encoders reach this server by")
    parser.add_argument("--log-level", dest="log_level", help="DEBUG, INFO, WARNING (default INFO)")
    parser.add_argument("--node-id", dest="node_id", help="this node's name in a cluster")


def _settings(args: argparse.Namespace) -> Settings:
    flags = {k: getattr(args, k, None) for k in
             ("http", "rtmp", "data_dir", "redis", "database", "public_url", "log_level", "node_id")}
    return load_settings(getattr(args, "config", None), **flags)


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )


async def _serve(settings: Settings) -> None:
    from aiohttp import web

    from . import gc_policy
    from .app import create_app

    app = create_app(settings)
    runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=5)
    await runner.setup()  # runs every cleanup_ctx: store, bus, areas, RTMP listener
    host, port = settings.http_address
    site = web.TCPSite(runner, host, port, reuse_address=True)
    await site.start()
    gc_policy.apply()  # after start-up: what exists now lives as long as the process
    log.info("HTTP listening on http://%s:%d (data in %s)", host, port, settings.data_dir.resolve())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down")
    await runner.cleanup()


async def _users(args: argparse.Namespace, settings: Settings) -> dict[str, Any] | list[Any]:
    from .accounts import AccountError, Accounts
    from .db import open_database

    db = await open_database(settings.database_url)
    try:
        accounts = Accounts(db)
        await accounts.migrate()
        if args.users_command == "add":
            try:
                user, generated = await accounts.create_user(args.name, args.password,
                                                             is_admin=args.admin)
            except AccountError as exc:
                raise SystemExit(f"livesrv: {exc}") from None
            token = await accounts.create_session(user)
            result: dict[str, Any] = {"username": user.username, "stream_key": user.stream_key,
                                      "is_admin": user.is_admin, "token": token}
            if generated:
                result["password"] = generated
            return result
        if args.users_command == "rotate-key":
            user = await accounts.get(args.name)
            if user is None:
                raise SystemExit(f"livesrv: no user {args.name!r}")
            return {"username": user.username, "stream_key": await accounts.rotate_stream_key(user)}
        rows = await db.fetchall("SELECT username, is_admin, created_at FROM users ORDER BY id")
        return [dict(row) for row in rows]
    finally:
        await db.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="livesrv", description="live streaming server")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the server (everything in one process)")
    _add_core_flags(serve)
    users = commands.add_parser("users", help="manage users")
    _add_core_flags(users)
    user_commands = users.add_subparsers(dest="users_command", required=True)
    add = user_commands.add_parser("add", help="create a user; prints JSON with the stream key")
    _add_core_flags(add)
    add.argument_default = None
    add.add_argument("name")
    add.add_argument("--password", help="(default: generated and printed)")
    add.add_argument("--admin", action="store_true", help="make the user an operator")
    rotate = user_commands.add_parser("rotate-key", help="give a user a new stream key")
    _add_core_flags(rotate)
    rotate.argument_default = None
    rotate.add_argument("name")
    _add_core_flags(user_commands.add_parser("list", help="list users"))
    args = parser.parse_args(argv)

    try:
        settings = _settings(args)
    except ConfigError as exc:
        parser.error(str(exc))
    _setup_logging(settings.log_level if args.command == "serve" else "WARNING")

    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; Windows lacks it
        uvloop = None
    run = uvloop.run if uvloop is not None else asyncio.run

    if args.command == "serve":
        try:
            run(_serve(settings))
        except KeyboardInterrupt:
            pass
        except OSError as exc:  # a port in use, an unwritable data dir
            log.error("cannot start: %s", exc)
            raise SystemExit(1) from None
    else:
        print(json.dumps(run(_users(args, settings))))


if __name__ == "__main__":
    main()
