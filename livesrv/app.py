"""The composition root: ``create_app(settings)`` wires every area into one aiohttp app.

Lifetimes are ``cleanup_ctx`` generators, started in order and stopped in reverse: the store
and bus first (everything needs them), the areas next, the RTMP listener last (so a publisher
is only accepted once every output is ready to receive its stream).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from aiohttp import web

from .accounts import Accounts
from .bus import Bus, InProcessBus
from .config import Settings
from .db import Database, open_database
from .http import accounts as accounts_http
from .http import live as live_http
from .http import ops as ops_http
from .http.auth import ACCOUNTS
from .hub import Hub
from .keys import BUS, DB, HUB, NODE_ID, PRESENCE, SETTINGS, VIEWERS
from .presence import open_presence

if TYPE_CHECKING:
    from ingest.rtmp.server import RtmpServer

log = logging.getLogger(__name__)

RTMP_SERVER: web.AppKey[RtmpServer] = web.AppKey("rtmp_server")


def node_id(settings: Settings) -> str:
    return settings.node_id or f"{socket.gethostname()}-{settings.http_address[1]}"


async def open_bus(settings: Settings) -> Bus:
    if settings.redis:
        from .bus_redis import RedisBus

        return RedisBus(settings.redis, node_id=node_id(settings))
    return InProcessBus(node_id=node_id(settings))


def create_app(settings: Settings, *, rtmp: bool = True) -> web.Application:
    """The whole server as one app. ``rtmp=False`` leaves the RTMP listener out (for tests of
    the HTTP side that need no ingest)."""
    app = web.Application(client_max_size=64 * 1024 * 1024)  # short-video uploads need room
    app[SETTINGS] = settings
    app[HUB] = Hub()
    app[NODE_ID] = node_id(settings)
    settings.data_dir.mkdir(parents=True, exist_ok=True)

    ops_http.setup(app)

    async def store(app: web.Application) -> AsyncIterator[None]:
        db: Database = await open_database(settings.database_url)
        accounts = Accounts(db)
        await accounts.migrate()
        app[DB] = db
        app[ACCOUNTS] = accounts
        log.info("store ready (%s)", db.dialect)
        yield
        await db.close()

    async def bus(app: web.Application) -> AsyncIterator[None]:
        event_bus = await open_bus(settings)
        await event_bus.start()
        app[BUS] = event_bus
        # who watches what, across nodes: beside the bus, on the same Redis in a cluster
        presence = open_presence(settings.redis, app[NODE_ID])
        await presence.start()
        app[PRESENCE] = presence
        app[VIEWERS] = presence.count
        ops_http.add_readiness(app, "presence", lambda: presence.healthy)
        yield
        await presence.close()
        await event_bus.close()

    app.cleanup_ctx.append(store)
    app.cleanup_ctx.append(bus)

    accounts_http.setup(app)
    live_http.setup(app)
    _setup_areas(app)
    # after the areas, so on shutdown every stream ends (playlists get ENDLIST, recordings are
    # closed) while the areas are still up, whatever ingest listeners there are
    app.cleanup_ctx.append(_hub_lifetime)

    if rtmp:
        app.cleanup_ctx.append(rtmp_listener)
    return app


async def _hub_lifetime(app: web.Application) -> AsyncIterator[None]:
    yield
    app[HUB].close()


def _setup_areas(app: web.Application) -> None:
    """Each area adds its routes and lifetimes (order matters for routes sharing a prefix)."""
    import importlib

    # TODO(lead): import these directly once every area has landed
    for name in ("ladder", "media", "hls", "rooms", "wallet", "webrtc", "whip", "pages"):
        try:
            module = importlib.import_module(f"livesrv.http.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"livesrv.http.{name}":
                raise
            log.debug("area %s is not built yet", name)  # planned areas land issue by issue
            continue
        module.setup(app)


async def rtmp_listener(app: web.Application) -> AsyncIterator[None]:
    from ingest.rtmp.connection import RtmpLimits
    from ingest.rtmp.server import RtmpServer

    settings = app[SETTINGS]
    accounts = app[ACCOUNTS]

    async def authorize(app_name: str, stream_key: str) -> str | None:
        if app_name.strip("/") != "live":
            return None
        return await accounts.channel_for_stream_key(stream_key)

    host, port = settings.rtmp_address
    server = RtmpServer(app[HUB], authorize, host=host, port=port,
                        limits=settings.section("rtmp", RtmpLimits))
    await server.start()
    app[RTMP_SERVER] = server
    log.info("RTMP ingest listening on rtmp://%s:%d/live", host, server.port)
    ops_http.add_readiness(app, "rtmp", lambda: server.serving)
    yield
    await server.close()
