"""WHEP over HTTP (draft-ietf-wish-whep): ``POST /whep/CHANNEL`` with an SDP offer is answered
``201 Created`` with the SDP answer and the session's URL in ``Location``; ``DELETE`` on that
URL ends the session.

ICE is not trickled: the answer carries every candidate this server gathered (host candidates,
plus STUN/TURN ones when configured), and a viewer's offer is expected to carry its own (browsers
do once gathering completes; the watch page waits for it). ``PATCH`` on a session is therefore
answered ``405`` with ``Allow``, as the WHEP draft lets a server that does not support trickle
or ICE restarts do.

Errors are JSON ``{"error": reason}``: 404 for a channel that is not live, 400 for a malformed
offer, 415 for an offer or stream without a common H.264 profile, 409 when the source cannot go
to browsers and the ladder has no H.264 rendition yet, 503 when the server is full.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from aiohttp import web

from transcode.webrtc import WebRtcSettings, WhepService

from ..keys import HUB, SETTINGS
from ..webrtc_offers import MAX_OFFER_BYTES, Refused
from .auth import json_error

WHEP = web.AppKey("whep", WhepService)
CORS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Expose-Headers": "Location",
}
PREFLIGHT = {
    **CORS,
    "Access-Control-Allow-Methods": "POST, DELETE, OPTIONS",
    "Access-Control-Allow-Headers": "Content-Type, Authorization, If-Match",
    "Access-Control-Max-Age": "86400",
}

routes = web.RouteTableDef()


def _error(status: int, message: str, **headers: str) -> web.HTTPException:
    error = json_error(status, message)
    error.headers.update({**CORS, "Cache-Control": "no-store", **headers})
    return error


@routes.post("/whep/{channel}")
async def offer(request: web.Request) -> web.Response:
    if request.content_type != "application/sdp":
        raise _error(415, "the offer must be sent as Content-Type: application/sdp")
    body = await request.content.read(MAX_OFFER_BYTES + 1)
    if len(body) > MAX_OFFER_BYTES:
        # json_error cannot build 413 (aiohttp's class wants the sizes), so it is built here
        raise web.HTTPRequestEntityTooLarge(
            MAX_OFFER_BYTES, len(body), headers=CORS, content_type="application/json",
            text=json.dumps({"error": f"the offer is larger than {MAX_OFFER_BYTES} bytes"}))
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise _error(400, "the offer is not UTF-8 text") from None
    channel = request.match_info["channel"]
    try:
        answer = await request.app[WHEP].offer(channel, text)
    except Refused as exc:
        headers = {"Retry-After": "1"} if exc.status == 503 else {}
        raise _error(exc.status, exc.reason, **headers) from None
    location = f"/whep/{channel}/{answer.session.id}"
    return web.Response(status=201, text=answer.sdp, content_type="application/sdp",
                        headers={**CORS, "Location": location, "Cache-Control": "no-store"})


@routes.delete("/whep/{channel}/{session}")
async def delete(request: web.Request) -> web.Response:
    service = request.app[WHEP]
    session = service.session(request.match_info["session"])
    if session is None or session.channel != request.match_info["channel"]:
        raise _error(404, "no such WHEP session (it may have ended already)")
    await service.close_session(session.id, "deleted")
    return web.Response(status=200, headers=CORS)


@routes.patch("/whep/{channel}/{session}")
async def patch(request: web.Request) -> web.Response:
    # json_error cannot build 405 (aiohttp's class wants the method and the allowed ones)
    message = ("this server does not take trickled ICE candidates or ICE restarts: put every "
               "candidate in the offer (send it once ICE gathering is complete)")
    raise web.HTTPMethodNotAllowed(request.method, ["DELETE", "OPTIONS"], headers=CORS,
                                   content_type="application/json",
                                   text=json.dumps({"error": message}))


@routes.route("OPTIONS", "/whep/{channel}")
@routes.route("OPTIONS", "/whep/{channel}/{session}")
async def preflight(request: web.Request) -> web.Response:
    return web.Response(status=204, headers={**PREFLIGHT, "Accept-Post": "application/sdp"})


def setup(app: web.Application) -> None:
    settings = app[SETTINGS].section("webrtc", WebRtcSettings)  # a bad table fails at startup

    async def whep(app: web.Application) -> AsyncIterator[None]:
        service = WhepService(app[HUB], settings)
        service.start()
        app[WHEP] = service
        yield
        await service.close()

    app.cleanup_ctx.append(whep)
    app.add_routes(routes)
