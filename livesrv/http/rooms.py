"""Live rooms over HTTP: the room WebSocket ``/ws/rooms/CHANNEL`` and moderation endpoints.

The logic is in ``chat``; this module adapts aiohttp sockets and the app's bus to it. A chat
message is published to the bus topic ``room:{channel}``; every node holding the room
(this one included) receives it once, stores it in history and fans it out.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import WSMsgType, web

from chat import metrics
from chat.fanout import Seat
from chat.room import Room, Rooms, topic
from chat.settings import ChatSettings
from chat.store import ModerationStore

from ..bus import BusMessage
from ..keys import BUS, DB, NODE_ID, PRESENCE, SETTINGS, VIEWERS
from .auth import json_error, optional_user, read_json, require_user

log = logging.getLogger(__name__)

ROOMS = web.AppKey("rooms", Rooms)
MODERATION_STORE = web.AppKey("moderation_store", ModerationStore)
SOCKETS: web.AppKey[weakref.WeakSet[web.WebSocketResponse]] = web.AppKey("room_sockets")
#: viewers per channel on this node, used while no presence service is wired
LOCAL_VIEWERS: web.AppKey[dict[str, int]] = web.AppKey("local_viewers")

routes = web.RouteTableDef()
#: a channel is a username (see accounts.USERNAME_RE); anything else is a 404, not a room
CHANNEL = "{channel:[A-Za-z0-9_-]{1,32}}"


def _encode(event: dict[str, Any]) -> str:
    return json.dumps(event, separators=(",", ":"), ensure_ascii=False)


def _error(code: str, message: str) -> str:
    metrics.REJECTED.labels(code).inc()
    return _encode({"type": "error", "code": code, "message": message})


def _add_viewer(app: web.Application, channel: str, delta: int) -> None:
    presence = app.get(PRESENCE)
    if presence is not None:
        presence.add(channel, delta)
    counts = app[LOCAL_VIEWERS]
    counts[channel] = counts.get(channel, 0) + delta
    if counts[channel] <= 0:
        del counts[channel]


async def _viewers(app: web.Application, channel: str) -> int:
    presence = app.get(PRESENCE)
    if presence is not None:
        return await presence.count(channel)
    return app[LOCAL_VIEWERS].get(channel, 0)


@routes.get(f"/ws/rooms/{CHANNEL}")
async def room_socket(request: web.Request) -> web.WebSocketResponse:
    app = request.app
    channel = request.match_info["channel"].lower()
    rooms = app[ROOMS]
    bus = app[BUS]
    user = await optional_user(request)
    # no permessage-deflate: the room writes one prebuilt frame to every socket, and a
    # compressed stream (context takeover) would have to be compressed per socket
    ws = web.WebSocketResponse(heartbeat=30, max_msg_size=16 * 1024, compress=False)
    await ws.prepare(request)
    transport = request.transport
    if transport is None:  # the client went away during the handshake
        return ws
    app[SOCKETS].add(ws)
    # room frames are written straight to the transport, whole frames only, so they never
    # interleave with aiohttp's own (pong, close), which it also writes whole
    seat = Seat(transport, user.username if user is not None else None)
    await rooms.open(channel)  # loads the shared history when this node opens the room
    room = rooms.join(channel, seat, since=request.query.get("since") or None)
    _add_viewer(app, channel, +1)
    try:
        seat.send(_encode({"type": "viewers", "count": await _viewers(app, channel)}))
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                reply = await _on_text(rooms, bus.publish, room, user, msg.data)
                if reply is not None:
                    seat.send(reply)
            elif msg.type == WSMsgType.BINARY:
                seat.send(_error("bad_json", "send JSON text frames"))
    finally:
        _add_viewer(app, channel, -1)
        rooms.leave(room, seat)
        app[SOCKETS].discard(ws)
    return ws


async def _on_text(rooms: Rooms, publish: Callable[[str, dict[str, Any]], Awaitable[BusMessage]],
                   room: Room, user: Any, data: str) -> str | None:
    """One client frame: an error frame to send back, or None once the chat is published."""
    try:
        message = json.loads(data)
    except ValueError:
        return _error("bad_json", "frame is not valid JSON")
    if not isinstance(message, dict):
        return _error("bad_json", "frame must be a JSON object")
    if message.get("type") != "chat":
        return _error("unknown_type", f"unknown message type {message.get('type')!r}")
    if user is None:
        return _error("login_required", "log in to chat")
    text = message.get("text")
    if not isinstance(text, str):
        return _error("empty", "text must be a string")
    privileged = user.is_admin or user.channel == room.channel
    refusal = room.moderation.check(user.username, text, privileged=privileged)
    if refusal is not None:
        return _error(*refusal)
    metrics.MESSAGES_IN.inc()
    event = rooms.chat_event(user.username, text)
    await publish(topic(room.channel), event)
    rooms.said(room.channel, event)
    return None


async def _moderate(request: web.Request, action: str) -> web.Response:
    channel = request.match_info["channel"].lower()
    user = await require_user(request)
    if not (user.is_admin or user.channel == channel):
        raise json_error(403, "only the anchor or an admin may moderate this room")
    body = await read_json(request)
    event: dict[str, Any] = {"type": "moderation", "action": action, "by": user.username}
    if action in ("mute", "ban", "unban", "unmute"):
        target = body.get("user")
        if not isinstance(target, str) or not target:
            raise json_error(400, "user is required")
        event["user"] = target.lower()
    if action == "mute":
        seconds = body.get("seconds", 300)
        if not isinstance(seconds, int | float) or seconds <= 0:
            raise json_error(400, "seconds must be a positive number")
        event["until"] = time.time() + float(seconds)
    if action == "slow":
        seconds = body.get("seconds", 0)
        if not isinstance(seconds, int | float) or seconds < 0:
            raise json_error(400, "seconds must be a number >= 0")
        event["seconds"] = float(seconds)
    # kept first (a node starting later loads it), then applied here too: this node may hold
    # no socket of the room (so no subscription)
    await request.app[MODERATION_STORE].record(channel, event)
    request.app[ROOMS].moderation_for(channel).apply(event)
    await request.app[BUS].publish(topic(channel), event)
    return web.json_response({k: v for k, v in event.items() if k != "type"})


for _action in ("mute", "unmute", "ban", "unban", "slow"):
    async def _handler(request: web.Request, _action: str = _action) -> web.Response:
        return await _moderate(request, _action)

    routes.post(f"/api/rooms/{CHANNEL}/{_action}")(_handler)


async def _viewer_loop(app: web.Application) -> None:
    """Every few seconds, tell each room on this node its viewer count if it changed."""
    rooms = app[ROOMS]
    while True:
        await asyncio.sleep(rooms.settings.viewers_interval)
        for room in tuple(rooms.rooms.values()):
            try:
                count = await _viewers(app, room.channel)
            except Exception:
                log.warning("viewer count of %s failed", room.channel, exc_info=True)
                continue
            if count != room.last_viewers:
                room.last_viewers = count
                room.deliver({"type": "viewers", "count": count})


async def _rooms_lifetime(app: web.Application) -> AsyncIterator[None]:
    bus = app[BUS]

    def subscribe(name: str, handler: Callable[[dict[str, Any]], None]) -> Callable[[], None]:
        return bus.subscribe(name, lambda message: handler(message.data))

    settings = app[SETTINGS]
    chat_settings = settings.section("chat", ChatSettings)
    shared = None
    if settings.redis:  # a cluster: every node appends to, and opens rooms from, one history
        from ..room_history import RedisRoomHistory

        shared = RedisRoomHistory(settings.redis, chat_settings.history)
        shared.start()
    rooms = app[ROOMS] = Rooms(chat_settings, app[NODE_ID], subscribe, shared)
    store = app[MODERATION_STORE] = ModerationStore(app[DB])
    await store.migrate()
    for channel, event in await store.load():
        rooms.moderation_for(channel).apply(event)
    task = asyncio.create_task(_viewer_loop(app))
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    rooms.close()
    if shared is not None:
        await shared.close()


async def _close_sockets(app: web.Application) -> None:
    # on_shutdown runs before the server waits for handlers: open sockets would hold it up
    # all at once: one unresponsive client must not hold up the others' goodbyes
    await asyncio.gather(*(ws.close(code=1001, message=b"server shutting down")
                           for ws in tuple(app[SOCKETS])), return_exceptions=True)


def setup(app: web.Application) -> None:
    app[SOCKETS] = weakref.WeakSet()
    app[LOCAL_VIEWERS] = {}
    if VIEWERS not in app:  # the presence service replaces this when it is wired
        app[VIEWERS] = lambda channel: _viewers(app, channel)
    app.add_routes(routes)
    app.cleanup_ctx.append(_rooms_lifetime)
    app.on_shutdown.append(_close_sockets)
