"""Who is asking: the session token from ``Authorization: Bearer``, the session cookie, or
(for WebSockets, which browsers cannot give headers) ``?token=``."""

from __future__ import annotations

import json

from aiohttp import web

from ..accounts import Accounts, User

ACCOUNTS = web.AppKey("accounts", Accounts)
SESSION_COOKIE = "livesrv_session"
_USER = web.RequestKey("livesrv.user", object)  # the request-scoped cache of optional_user


def request_token(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    if header[:7].lower() == "bearer ":
        return header[7:].strip() or None
    return request.cookies.get(SESSION_COOKIE) or request.query.get("token") or None


async def optional_user(request: web.Request) -> User | None:
    """The logged-in user, or None for an anonymous request."""
    if _USER in request:
        return request[_USER]  # type: ignore[return-value]
    token = request_token(request)
    user = await request.app[ACCOUNTS].user_for_token(token) if token else None
    request[_USER] = user
    return user


_ERROR_CLASSES: dict[int, type[web.HTTPException]] = {
    cls.status_code: cls
    for cls in (web.HTTPBadRequest, web.HTTPUnauthorized, web.HTTPPaymentRequired,
                web.HTTPForbidden, web.HTTPNotFound, web.HTTPMethodNotAllowed, web.HTTPConflict,
                web.HTTPGone, web.HTTPRequestEntityTooLarge, web.HTTPUnsupportedMediaType,
                web.HTTPUnprocessableEntity, web.HTTPTooManyRequests,
                web.HTTPInternalServerError, web.HTTPServiceUnavailable)
}


def json_error(status: int, message: str, **extra: object) -> web.HTTPException:
    """An HTTP error with a JSON body ``{"error": message, ...}``, to raise."""
    cls = _ERROR_CLASSES.get(status, web.HTTPBadRequest)
    return cls(text=json.dumps({"error": message, **extra}), content_type="application/json")


async def require_user(request: web.Request) -> User:
    """The logged-in user; 401 with a JSON error otherwise."""
    user = await optional_user(request)
    if user is None:
        raise json_error(401, "login required")
    return user


async def read_json(request: web.Request, *, max_bytes: int = 64 * 1024) -> dict:
    """The request's JSON object body; 400/413 with a clear message otherwise."""
    if request.content_length is not None and request.content_length > max_bytes:
        raise json_error(413, f"body larger than {max_bytes} bytes")
    raw = await request.content.read(max_bytes + 1)
    if len(raw) > max_bytes:
        raise json_error(413, f"body larger than {max_bytes} bytes")
    try:
        body = json.loads(raw or b"null")
    except (ValueError, UnicodeDecodeError) as exc:
        raise json_error(400, f"body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise json_error(400, "body must be a JSON object")
    return body
