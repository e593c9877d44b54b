"""What is live: ``GET /api/live`` and ``GET /api/live/{channel}``."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from ..hub import Stream
from ..keys import HUB, SETTINGS, VIEWERS
from .auth import ACCOUNTS, json_error

routes = web.RouteTableDef()


def base_url(request: web.Request) -> str:
    settings = request.app[SETTINGS]
    return (settings.public_url or f"{request.scheme}://{request.host}").rstrip("/")


async def describe(request: web.Request, stream: Stream) -> dict[str, Any]:
    base = base_url(request)
    channel = stream.channel
    viewers = request.app.get(VIEWERS)
    user = await request.app[ACCOUNTS].get(channel)
    video = stream.info.video
    return {
        "channel": channel,
        "title": (user.title if user and user.title else f"{channel} is live"),
        "display_name": user.display_name if user else channel,
        "viewers": await viewers(channel) if viewers else 0,
        "started_at": datetime.fromtimestamp(stream.started_at, UTC).isoformat(),
        "source": stream.source,
        "video": None if video is None else {"codec": video.codec, "width": video.width,
                                             "height": video.height, "fps": video.fps},
        "audio": None if stream.info.audio is None else {"codec": stream.info.audio.codec},
        "renditions": ["source", *stream.renditions],
        "hls": f"{base}/live/{channel}/index.m3u8",
        "whep": f"{base}/whep/{channel}",
        "thumbnail": f"{base}/live/{channel}/thumb.jpg",
        "watch": f"{base}/watch/{channel}",
    }


@routes.get("/api/live")
async def list_live(request: web.Request) -> web.Response:
    streams = sorted(request.app[HUB].streams(), key=lambda s: s.started_at, reverse=True)
    items = await asyncio.gather(*(describe(request, s) for s in streams))
    items.sort(key=lambda item: item["viewers"], reverse=True)
    return web.json_response(items, headers={"Cache-Control": "no-cache"})


@routes.get("/api/live/{channel}")
async def get_live(request: web.Request) -> web.Response:
    stream = request.app[HUB].get(request.match_info["channel"])
    if stream is None:
        raise json_error(404, "channel is not live")
    return web.json_response(await describe(request, stream), headers={"Cache-Control": "no-cache"})


def setup(app: web.Application) -> None:
    app.add_routes(routes)
