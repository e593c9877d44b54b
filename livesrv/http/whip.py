"""WHIP publishing over HTTP (RFC 9725): ``POST /whip`` and the session resource it creates.

- ``POST /whip`` with ``Authorization: Bearer STREAM_KEY`` and an ``application/sdp`` offer
  -> 201, ``Location: /whip/SESSION``, the SDP answer. A missing or wrong key gets 401 before
  the body is read (nothing is negotiated, nothing published); a body that is not SDP 415;
  an offer we cannot take (malformed, nothing sent, no H.264/VP8/Opus) 400 with the reason.
- ``DELETE /whip/SESSION`` ends the publication (the Location URL is an unguessable
  capability, as RFC 9725 lets it be; the key is not asked for again).
- ``PATCH /whip/SESSION`` -> 405: no trickle ICE or ICE restarts; clients send their
  candidates in the offer (gather first) and publish anew to recover.
- ``OPTIONS`` on both, and CORS headers on every answer, for browser clients of other origins.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web

from ingest.whip import WhipIngest, WhipSettings
from transcode.webrtc import WebRtcSettings
from transcode.webrtc_sdp import add_public_candidates

from ..keys import HUB, SETTINGS
from ..webrtc_offers import MAX_OFFER_BYTES, Refused
from .auth import ACCOUNTS, json_error

WHIP_INGEST = web.AppKey("whip_ingest", WhipIngest)

SDP_TYPE = "application/sdp"
CORS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "OPTIONS, POST, DELETE",
    "Access-Control-Allow-Headers": "Authorization, Content-Type, If-Match",
    "Access-Control-Expose-Headers": "Location, ETag, Accept-Post",
    "Access-Control-Max-Age": "86400",
}

routes = web.RouteTableDef()
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _with_cors(handler: Handler) -> Handler:
    """CORS headers on the answer, errors included (a browser hides a CORS-less error body)."""
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            exc.headers.update(CORS)
            raise
        response.headers.update(CORS)
        return response
    return wrapped


def _unauthorized(message: str) -> web.HTTPException:
    error = json_error(401, message)
    error.headers["WWW-Authenticate"] = 'Bearer realm="whip"'
    return error


@routes.options("/whip")
@_with_cors
async def whip_options(request: web.Request) -> web.Response:
    return web.Response(status=204, headers={"Allow": "OPTIONS, POST", "Accept-Post": SDP_TYPE})


@routes.post("/whip")
@_with_cors
async def whip_publish(request: web.Request) -> web.Response:
    header = request.headers.get("Authorization", "")
    if header[:7].lower() != "bearer " or not header[7:].strip():
        raise _unauthorized("a WHIP publish needs Authorization: Bearer STREAM_KEY")
    channel = await request.app[ACCOUNTS].channel_for_stream_key(header[7:].strip())
    if channel is None:
        raise _unauthorized("wrong stream key")
    if request.content_type != SDP_TYPE:
        raise json_error(415, f"the offer must be sent as Content-Type: {SDP_TYPE}",
                         got=request.content_type)
    if request.content_length is not None and request.content_length > MAX_OFFER_BYTES:
        raise _too_large(request.content_length)
    raw = await request.content.read(MAX_OFFER_BYTES + 1)
    if len(raw) > MAX_OFFER_BYTES:
        raise _too_large(len(raw))
    try:
        offer = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise json_error(400, "the SDP offer is not UTF-8 text") from None
    try:
        session = await request.app[WHIP_INGEST].publish(channel, offer)
    except Refused as exc:  # a bad offer (400), or too many publishers (WhipBusy, 503)
        raise json_error(exc.status, exc.reason) from None
    location = f"/whip/{session.id}"
    return web.Response(status=201, body=session.answer.encode(), content_type=SDP_TYPE,
                        headers={"Location": location, "ETag": f'"{session.id}"'})


def _too_large(size: int) -> web.HTTPException:
    # json_error cannot make a 413: aiohttp's class wants the sizes
    return web.HTTPRequestEntityTooLarge(
        max_size=MAX_OFFER_BYTES, actual_size=size, content_type="application/json",
        text=json.dumps({"error": f"an SDP offer larger than {MAX_OFFER_BYTES} bytes"}))


def _session_or_404(request: web.Request):  # type: ignore[no-untyped-def]
    session = request.app[WHIP_INGEST].get(request.match_info["session"])
    if session is None:
        raise json_error(404, "no such WHIP session (it has ended or never existed)")
    return session


@routes.options("/whip/{session}")
@_with_cors
async def session_options(request: web.Request) -> web.Response:
    return web.Response(status=204, headers={"Allow": "OPTIONS, DELETE"})  # no trickle: PATCH is 405


@routes.delete("/whip/{session}")
@_with_cors
async def session_delete(request: web.Request) -> web.Response:
    session = _session_or_404(request)
    await session.close("deleted")
    return web.Response(status=200, text=json.dumps({"ended": True}), content_type="application/json")


@routes.patch("/whip/{session}")
@_with_cors
async def session_patch(request: web.Request) -> web.Response:
    _session_or_404(request)
    message = ("trickle ICE and ICE restarts are not supported: include every candidate in the "
               "offer, and publish again to recover")
    raise web.HTTPMethodNotAllowed(request.method, ["OPTIONS", "DELETE"],
                                   text=json.dumps({"error": message}),
                                   content_type="application/json")


def setup(app: web.Application) -> None:
    settings = app[SETTINGS].section("whip", WhipSettings)  # a bad [whip] table fails at startup
    # ICE is configured once for WebRTC in and out: the [webrtc] table (STUN/TURN, public_ip)
    rtc = app[SETTINGS].section("webrtc", WebRtcSettings)
    public_ip = rtc.public_ip

    def rewrite_answer(answer: str) -> str:
        return add_public_candidates(answer, public_ip) if public_ip else answer

    async def lifetime(app: web.Application) -> AsyncIterator[None]:
        ingest = WhipIngest(app[HUB], settings, ice_servers=rtc.ice_servers(),
                            rewrite_answer=rewrite_answer)
        app[WHIP_INGEST] = ingest
        yield
        await ingest.close()

    app.cleanup_ctx.append(lifetime)
    app.add_routes(routes)
