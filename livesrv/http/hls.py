"""HLS over HTTP: the multivariant playlist at ``/live/CHANNEL/index.m3u8``, and below it each
rendition's media playlist (``/live/CHANNEL/RENDITION/index.m3u8``), init segments
(``init-PUB.mp4``), media segments (``PUB-SEQ.m4s``) and LL-HLS parts (``PUB.pN.m4s``), all
served from memory.

Playlists change every part, so plain requests for them are ``no-cache``; a file name is never
reused for other bytes, so segments, parts and inits are ``immutable`` and any HTTP cache in
front may keep them.

Low-Latency HLS blocking (RFC 8216bis 6.2.5.2, 6.2.6): a playlist request with
``_HLS_msn=M[&_HLS_part=P]`` is held until the playlist holds that segment (or part), and a GET
of the part named in ``EXT-X-PRELOAD-HINT`` is held until the part exists. Held requests wait on
the playlist's change future (no polling), are capped per server (``max_blocking_requests``,
503 past it) and answered 503 after ``blocking_timeout_targets`` target durations; a request
for more than two segments past the live edge is answered 400 at once. A blocking playlist
response names one version of the live edge, so CDNs may keep it briefly.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import Counter, Gauge

from transcode.hls import Channel, HlsService, HlsSettings, RenditionState
from transcode.playlist import PLAYLIST_TYPE, MediaPlaylist, rendition_report

from ..keys import HUB, SETTINGS
from .auth import json_error

CORS = {"Access-Control-Allow-Origin": "*"}
PLAYLIST_HEADERS = {**CORS, "Content-Type": PLAYLIST_TYPE, "Cache-Control": "no-cache"}
FILE_CACHE = "public, max-age=31536000, immutable"

BLOCKING = Gauge("livesrv_llhls_blocking_requests",
                 "LL-HLS blocking requests in flight (playlist reloads and preload-hint parts)")
BLOCKING_REFUSED = Counter("livesrv_llhls_blocking_refused_total",
                           "LL-HLS blocking requests answered with an error", ["reason"])


@dataclass(slots=True)
class HeldRequests:
    """How many requests are held now, against the server's cap."""

    limit: int
    count: int = 0


HLS = web.AppKey("hls", HlsService)
HELD = web.AppKey("hls_held", HeldRequests)

routes = web.RouteTableDef()


def _error(status: int, message: str, **headers: str) -> web.HTTPException:
    error = json_error(status, message)
    # players on other origins must be able to read the error; no cache may keep it
    error.headers.update({**CORS, "Cache-Control": "no-store", **headers})
    return error


def _not_found(message: str) -> web.HTTPException:
    return _error(404, message)


def _service(request: web.Request) -> HlsService:
    return request.app[HLS]


def _rendition(request: web.Request) -> tuple[Channel, RenditionState] | None:
    channel = _service(request).channel(request.match_info["channel"])
    state = channel.renditions.get(request.match_info["rendition"]) if channel is not None else None
    if channel is None or state is None:
        return None
    return channel, state


def _directive(request: web.Request, name: str) -> int | None:
    value = request.query.get(name)
    if value is None:
        return None
    if not value.isdigit() or len(value) > 18:  # decimal-integer (RFC 8216 4.2), no sign
        raise _error(400, f"{name} must be a non-negative integer")
    return int(value)


async def _hold(request: web.Request, playlist: MediaPlaylist, ready: Callable[[], bool]) -> None:
    """Wait until ``ready()``: woken by each change of the playlist, bounded in time and in
    how many requests the server holds at once."""
    held = request.app[HELD]
    if held.count >= held.limit:
        BLOCKING_REFUSED.labels("over_capacity").inc()
        raise _error(503, "too many blocking requests held; retry", **{"Retry-After": "1"})
    settings = _service(request).settings
    timeout = settings.blocking_timeout_targets * playlist.target_duration
    held.count += 1
    BLOCKING.inc()
    try:
        async with asyncio.timeout(timeout):
            while not ready():
                # shielded: the future is shared by every waiter of this playlist, and a
                # waiter's timeout or disconnect must not cancel it for the others
                await asyncio.shield(playlist.changed())
    except TimeoutError:
        BLOCKING_REFUSED.labels("timeout").inc()
        raise _error(503, "the requested segment or part did not appear in time",
                     **{"Retry-After": "1"}) from None
    finally:
        held.count -= 1
        BLOCKING.dec()


def _rendition_reports(channel: Channel, name: str) -> bytes:
    """EXT-X-RENDITION-REPORT lines for the other renditions a player may switch to."""
    lines = []
    for other in channel.listed:
        state = channel.renditions.get(other)
        if other == name or state is None or not state.packageable:
            continue
        line = rendition_report(f"../{other}/index.m3u8", state.playlist)
        if line is not None:
            lines.append(line)
    return ("\n".join(lines) + "\n").encode() if lines else b""


@routes.get("/live/{channel}/index.m3u8")
async def multivariant(request: web.Request) -> web.Response:
    channel = _service(request).channel(request.match_info["channel"])
    body = channel.multivariant() if channel is not None else None
    if body is None:
        raise _not_found("channel is not live")
    return web.Response(body=body, headers=PLAYLIST_HEADERS)


@routes.get("/live/{channel}/{rendition}/index.m3u8")
async def media_playlist(request: web.Request) -> web.Response:
    service = _service(request)
    found = _rendition(request)
    if found is None or not found[1].packageable:
        raise _not_found("channel is not live")
    channel, state = found
    playlist = state.playlist
    msn = _directive(request, "_HLS_msn")
    part = _directive(request, "_HLS_part")
    headers = PLAYLIST_HEADERS
    if part is not None and msn is None:
        raise _error(400, "_HLS_part needs _HLS_msn")
    if msn is not None:
        if not playlist.ended and playlist.too_far_ahead(msn):
            BLOCKING_REFUSED.labels("too_far_ahead").inc()
            raise _error(400, f"_HLS_msn={msn} is more than two segments past the live edge")
        if not playlist.has_reached(msn, part):
            await _hold(request, playlist, lambda: playlist.has_reached(msn, part))
        # this URL names one point of the live edge: any later playlist answers it too, so
        # caches in front may share the response for a while
        cache = f"public, max-age={int(playlist.target_duration * 3)}"
        headers = {**PLAYLIST_HEADERS, "Cache-Control": cache}
    elif not playlist.has_segments and not playlist.ended:
        # a player that arrives with the stream waits for the first segment instead of
        # getting an empty playlist it would have to poll
        try:
            async with asyncio.timeout(service.settings.first_segment_wait_seconds):
                await playlist.wait_for_segment()
        except TimeoutError:
            pass
        if not playlist.has_segments:
            raise _error(503, "no segment yet", **{"Retry-After": "1"})
    body = playlist.render()
    if playlist.part_target is not None and len(channel.listed) > 1:
        body += _rendition_reports(channel, state.name)
    return web.Response(body=body, headers=headers)


@routes.get("/live/{channel}/{rendition}/{name:[^/]+\\.(?:m4s|mp4)}")
async def media_file(request: web.Request) -> web.StreamResponse:
    found = _rendition(request)
    name = request.match_info["name"]
    playlist = found[1].playlist if found is not None else None
    chunks = playlist.chunks(name) if playlist is not None else None
    if chunks is None and playlist is not None and name == playlist.preload_hint:
        # the part the playlist hints at: answer as soon as it is produced (or never comes,
        # when the publication ends or restarts first: then 404)
        await _hold(request, playlist,
                    lambda: playlist.chunks(name) is not None or playlist.preload_hint != name)
        chunks = playlist.chunks(name)
    if chunks is None:
        raise _not_found("no such segment (it may have left the live window)")
    headers = {**CORS, "Content-Type": "video/mp4", "Cache-Control": FILE_CACHE}
    if len(chunks) == 1:
        return web.Response(body=chunks[0], headers=headers)
    # an LL-HLS segment: its parts one after the other, never joined into a copy
    response = web.StreamResponse(headers=headers)
    response.content_length = sum(map(len, chunks))
    await response.prepare(request)
    for chunk in chunks:
        await response.write(chunk)
    await response.write_eof()
    return response


def setup(app: web.Application) -> None:
    settings = app[SETTINGS].section("hls", HlsSettings)  # a bad [hls] table fails at startup
    app[HELD] = HeldRequests(settings.max_blocking_requests)

    async def packager(app: web.Application) -> AsyncIterator[None]:
        service = HlsService(app[HUB], settings)
        service.start()
        app[HLS] = service
        yield
        await service.close()

    app.cleanup_ctx.append(packager)
    app.add_routes(routes)
