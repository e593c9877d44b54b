"""Thumbnails and recordings over HTTP.

- ``GET /live/CHANNEL/thumb.jpg``: the channel's latest thumbnail, from memory, with an ETag
  (a player list polling it gets 304s until it changes).
- ``GET|PUT /api/me/recording``: the logged-in anchor's recording switch.
- ``GET /api/me/recordings``: their recordings (name, size, started, duration, url).
- ``GET|DELETE /recordings/CHANNEL/FILE``: one recording, for its channel's owner or an admin.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web

from transcode.record import RecordingService, RecordingStore, RecordSettings
from transcode.thumbs import ThumbnailService, ThumbSettings

from ..accounts import User
from ..keys import DB, HUB, SETTINGS
from .auth import json_error, read_json, require_user

THUMBS = web.AppKey("thumbs", ThumbnailService)
RECORDINGS = web.AppKey("recordings", RecordingService)

routes = web.RouteTableDef()


# -- thumbnails ---------------------------------------------------------------------------------
@routes.get("/live/{channel}/thumb.jpg")
async def thumbnail(request: web.Request) -> web.Response:
    thumb = request.app[THUMBS].get(request.match_info["channel"])
    if thumb is None:
        live = request.app[HUB].get(request.match_info["channel"]) is not None
        error = json_error(404, "no thumbnail yet" if live else "channel is not live")
        error.headers["Access-Control-Allow-Origin"] = "*"
        raise error
    interval = request.app[THUMBS].settings.interval_seconds
    headers = {"ETag": thumb.etag, "Access-Control-Allow-Origin": "*",
               # a list page may reuse it for a fraction of the refresh interval, no longer
               "Cache-Control": f"public, max-age={max(0, int(interval // 2))}"}
    matches = _etags(request.headers.get("If-None-Match", ""))
    if thumb.etag in matches or "*" in matches:
        return web.Response(status=304, headers=headers)
    return web.Response(body=thumb.jpeg, content_type="image/jpeg", headers=headers)


def _etags(header: str) -> set[str]:
    return {tag.strip().removeprefix("W/") for tag in header.split(",") if tag.strip()}


# -- recordings ---------------------------------------------------------------------------------
def _url(channel: str, name: str) -> str:
    return f"/recordings/{channel}/{name}"


async def _switch(request: web.Request, user: User) -> web.Response:
    service = request.app[RECORDINGS]
    enabled = await service.store.is_enabled(user.channel)
    recorder = service.recorder(user.channel)
    return web.json_response({
        "enabled": enabled,
        "recording": None if recorder is None else {
            "name": recorder.path.name, "url": _url(user.channel, recorder.path.name),
            "duration": round(recorder.duration, 3), "size": recorder.bytes_written},
    })


@routes.get("/api/me/recording")
async def get_switch(request: web.Request) -> web.Response:
    return await _switch(request, await require_user(request))


@routes.put("/api/me/recording")
async def put_switch(request: web.Request) -> web.Response:
    user = await require_user(request)
    body = await read_json(request)
    enabled = body.get("enabled")
    if not isinstance(enabled, bool):
        raise json_error(400, '"enabled" must be true or false')
    await request.app[RECORDINGS].set_enabled(user.channel, enabled)
    return await _switch(request, user)


@routes.get("/api/me/recordings")
async def list_recordings(request: web.Request) -> web.Response:
    user = await require_user(request)
    files = await asyncio.to_thread(request.app[RECORDINGS].list_files, user.channel)
    return web.json_response([{**f.describe(), "url": _url(user.channel, f.name)} for f in files],
                             headers={"Cache-Control": "no-cache"})


async def _owned_file(request: web.Request) -> tuple[str, Path]:
    user = await require_user(request)
    channel = request.match_info["channel"]
    if channel != user.channel and not user.is_admin:
        raise json_error(403, "only the channel's owner may read its recordings")
    path = request.app[RECORDINGS].path_for(channel, request.match_info["name"])
    if path is None:
        raise json_error(404, "no such recording")
    return channel, path


@routes.get("/recordings/{channel}/{name}")
async def download(request: web.Request) -> web.StreamResponse:
    _, path = await _owned_file(request)
    # FileResponse answers Range requests, so a browser's <video> can seek in it
    return web.FileResponse(path, headers={"Content-Type": "video/mp4",
                                           "Cache-Control": "private, no-cache"})


@routes.delete("/recordings/{channel}/{name}")
async def delete(request: web.Request) -> web.Response:
    _, path = await _owned_file(request)
    # any recorder still writing it, not only the live publication's: a stopping one or a
    # replaced publication's is still writing its last fragment
    if request.app[RECORDINGS].is_writing(path):
        raise json_error(409, "this recording is still being written")
    await asyncio.to_thread(path.unlink, missing_ok=True)
    return web.Response(status=204)


def setup(app: web.Application) -> None:
    settings = app[SETTINGS]
    thumb_settings = settings.section("thumbs", ThumbSettings)  # bad tables fail at startup
    record_settings = settings.section("recordings", RecordSettings)
    root = (Path(record_settings.directory) if record_settings.directory
            else settings.data_dir / "recordings").resolve()

    async def services(app: web.Application) -> AsyncIterator[None]:
        thumbs = ThumbnailService(app[HUB], thumb_settings)
        thumbs.start()
        app[THUMBS] = thumbs
        store = RecordingStore(app[DB])
        await store.migrate()
        recordings = RecordingService(app[HUB], store, root, record_settings)
        recordings.start()
        app[RECORDINGS] = recordings
        yield
        await recordings.close()  # every file complete before the process goes
        await thumbs.close()

    app.cleanup_ctx.append(services)
    app.add_routes(routes)
