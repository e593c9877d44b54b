"""Accounts over HTTP: register, login, logout, me, stream-key rotation."""

from __future__ import annotations

from aiohttp import web

from ..accounts import AccountError, User
from ..keys import SETTINGS
from .auth import ACCOUNTS, SESSION_COOKIE, json_error, read_json, request_token, require_user

routes = web.RouteTableDef()


def going_live_urls(request: web.Request, user: User) -> dict[str, str]:
    """Where this user's encoder should point: from the public URL when configured, else
    from the Host the browser used to reach us."""
    settings = request.app[SETTINGS]
    base = (settings.public_url or f"{request.scheme}://{request.host}").rstrip("/")
    host = base.split("://", 1)[-1].split("/", 1)[0].rsplit(":", 1)[0].strip("[]")
    rtmp_port = settings.rtmp_address[1]
    rtmp_host = f"[{host}]" if ":" in host else host
    return {
        "rtmp_url": f"rtmp://{rtmp_host}:{rtmp_port}/live",
        "rtmp_full_url": f"rtmp://{rtmp_host}:{rtmp_port}/live/{user.stream_key}",
        "whip_url": f"{base}/whip",
    }


def _login_response(request: web.Request, payload: dict, token: str, status: int) -> web.Response:
    response = web.json_response(payload, status=status)
    response.set_cookie(SESSION_COOKIE, token, httponly=True, samesite="Lax", path="/",
                        secure=request.secure, max_age=30 * 24 * 3600)
    return response


@routes.post("/api/auth/register")
async def register(request: web.Request) -> web.Response:
    body = await read_json(request)
    accounts = request.app[ACCOUNTS]
    try:
        user, _ = await accounts.create_user(body.get("username", ""), body.get("password", ""))
    except AccountError as exc:
        raise json_error(exc.status, str(exc)) from None
    token = await accounts.create_session(user)
    return _login_response(request, {"user": user.public(), "token": token}, token, 201)


@routes.post("/api/auth/login")
async def login(request: web.Request) -> web.Response:
    body = await read_json(request)
    accounts = request.app[ACCOUNTS]
    user = await accounts.authenticate(body.get("username", ""), body.get("password", ""))
    if user is None:
        raise json_error(401, "wrong username or password")
    token = await accounts.create_session(user)
    return _login_response(request, {"token": token, "user": user.public()}, token, 200)


@routes.post("/api/auth/logout")
async def logout(request: web.Request) -> web.Response:
    token = request_token(request)
    if token:
        await request.app[ACCOUNTS].end_session(token)
    response = web.json_response({"ok": True})
    response.del_cookie(SESSION_COOKIE, path="/")
    return response


@routes.get("/api/me")
async def me(request: web.Request) -> web.Response:
    user = await require_user(request)
    return web.json_response({**user.private(), **going_live_urls(request, user)})


@routes.patch("/api/me")
async def update_me(request: web.Request) -> web.Response:
    user = await require_user(request)
    body = await read_json(request)
    try:
        user = await request.app[ACCOUNTS].update_profile(
            user, title=body.get("title"), display_name=body.get("display_name"))
    except AccountError as exc:
        raise json_error(exc.status, str(exc)) from None
    return web.json_response({**user.private(), **going_live_urls(request, user)})


@routes.post("/api/me/stream-key")
async def rotate_stream_key(request: web.Request) -> web.Response:
    """A new stream key; the old one stops working for new publishes at once."""
    user = await require_user(request)
    key = await request.app[ACCOUNTS].rotate_stream_key(user)
    return web.json_response({"stream_key": key})


@routes.get("/api/users/{username}")
async def get_user(request: web.Request) -> web.Response:
    user = await request.app[ACCOUNTS].get(request.match_info["username"])
    if user is None:
        raise json_error(404, "no such user")
    return web.json_response({**user.public(), "title": user.title})


def setup(app: web.Application) -> None:
    """The routes; ``app[ACCOUNTS]`` is set by the store's lifetime in ``livesrv.app``."""
    app.add_routes(routes)
