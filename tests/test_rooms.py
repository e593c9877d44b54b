"""Live rooms through the real app factory: the room WebSocket and moderation over HTTP."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import WSMsgType
from aiohttp.client_ws import ClientWebSocketResponse
from aiohttp.test_utils import TestClient, TestServer

from chat import metrics
from livesrv.app import create_app
from livesrv.config import load_settings
from livesrv.http.rooms import ROOMS
from livesrv.keys import BUS

WAIT = 10  # a guard against hanging, not a speed assertion


async def make_client(tmp_path: Path, **chat: Any) -> TestClient:
    settings = load_settings(env={}, data_dir=str(tmp_path), http="127.0.0.1:8080",
                             rtmp="127.0.0.1:1935", node_id="n1")
    settings = dataclasses.replace(settings, tables={"chat": chat})
    client = TestClient(TestServer(create_app(settings, rtmp=False)))
    await client.start_server()
    return client


@pytest.fixture(params=["inline", "threads"])
async def client(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[TestClient]:
    """The app; "threads" sends every room's frames the way a big room's go (on threads,
    straight to aiohttp's sockets)."""
    fanout = {"fanout_threads": 2, "fanout_threshold": 1} if request.param == "threads" else {}
    client = await make_client(tmp_path, banned_words=["spoiler"], rate=0.001, burst=4, **fanout)
    yield client
    await client.close()


async def register(client: TestClient, name: str) -> str:
    response = await client.post("/api/auth/register", json={"username": name, "password": f"pw-{name}-1234"})
    assert response.status == 201, await response.text()
    client.session.cookie_jar.clear()  # each socket says who it is with ?token= (or nothing)
    return (await response.json())["token"]


async def frames(ws: ClientWebSocketResponse) -> AsyncIterator[dict[str, Any]]:
    """Every event the server sends, batches flattened."""
    while True:
        msg = await asyncio.wait_for(ws.receive(), WAIT)
        if msg.type != WSMsgType.TEXT:
            return
        frame = json.loads(msg.data)
        if frame["type"] == "batch":
            for event in frame["events"]:
                yield event
        else:
            yield frame


async def next_event(ws: ClientWebSocketResponse, *types: str) -> dict[str, Any]:
    async for event in frames(ws):
        if event["type"] in types:
            return event
    raise AssertionError(f"socket closed while waiting for {types}")


async def join(client: TestClient, channel: str, token: str | None = None,
               since: str | None = None) -> tuple[ClientWebSocketResponse, list[dict[str, Any]]]:
    query = {k: v for k, v in (("token", token), ("since", since)) if v}
    ws = await client.ws_connect(f"/ws/rooms/{channel}", params=query)
    history = await next_event(ws, "history")
    return ws, history["events"]


async def say(ws: ClientWebSocketResponse, text: str) -> None:
    await ws.send_str(json.dumps({"type": "chat", "text": text}))


async def test_anyone_reads_logged_in_users_chat(client: TestClient) -> None:
    token = await register(client, "alice")
    viewer, history = await join(client, "anchor")
    assert history == []
    assert (await next_event(viewer, "viewers"))["count"] == 1

    await say(viewer, "hello")
    error = await next_event(viewer, "error")
    assert error["code"] == "login_required" and error["message"]

    alice, _ = await join(client, "anchor", token)
    await say(alice, "hi everyone")
    for ws in (viewer, alice):
        event = await next_event(ws, "chat")
        assert event["user"] == "alice" and event["text"] == "hi everyone"
        assert isinstance(event["id"], str) and event["ts"] > 0
    await viewer.close()
    await alice.close()


async def test_history_on_join_and_resume_without_gaps(client: TestClient) -> None:
    tokens = [await register(client, name) for name in ("bob", "cat")]
    sockets = [(await join(client, "room1", token))[0] for token in tokens]
    texts = [f"message {i}" for i in range(6)]
    for i, text in enumerate(texts):
        await say(sockets[i % 2], text)
        await next_event(sockets[0], "chat")
    ids = []
    for _ in texts:
        ids.append((await next_event(sockets[1], "chat"))["id"])
    assert ids == sorted(ids) and len(set(ids)) == 6

    late, history = await join(client, "room1")
    assert [e["text"] for e in history] == texts
    assert [e["id"] for e in history] == ids
    resumed, missed = await join(client, "room1", since=ids[3])
    assert [e["id"] for e in missed] == ids[4:]
    _, nothing = await join(client, "room1", since=ids[-1])
    assert nothing == []
    # after resuming, live events continue with no duplicate
    await say(sockets[0], "after")
    assert (await next_event(resumed, "chat"))["text"] == "after"
    assert (await next_event(late, "chat"))["text"] == "after"


async def test_every_refusal_is_an_error_and_the_room_keeps_working(client: TestClient) -> None:
    token = await register(client, "dave")
    other = await register(client, "erin")
    ws, _ = await join(client, "room2", token)
    cases = [
        ("not json", "bad_json"),
        ("[1,2]", "bad_json"),
        (json.dumps({"type": "dance"}), "unknown_type"),
        (json.dumps({"type": "chat", "text": "   "}), "empty"),
        (json.dumps({"type": "chat", "text": "x" * 201}), "too_long"),
        (json.dumps({"type": "chat", "text": "big SPOILER ahead"}), "blocked_word"),
    ]
    for frame, code in cases:
        await ws.send_str(frame)
        assert (await next_event(ws, "error"))["code"] == code
    await ws.send_bytes(b"\x00")
    assert (await next_event(ws, "error"))["code"] == "bad_json"
    # burst 4 then a refill of one per 1000 s: the fifth message is refused
    for i in range(4):
        await say(ws, f"ok {i}")
        assert (await next_event(ws, "chat", "error"))["type"] == "chat"
    await say(ws, "one too many")
    assert (await next_event(ws, "error"))["code"] == "rate_limited"
    assert not ws.closed
    # the room still works for others
    erin, _ = await join(client, "room2", other)
    await say(erin, "still here")
    assert (await next_event(ws, "chat"))["text"] == "still here"
    rejected = metrics.REJECTED.labels("rate_limited")._value.get()
    assert rejected >= 1


async def test_anchor_mutes_bans_and_slows(client: TestClient) -> None:
    anchor = await register(client, "frank")
    troll = await register(client, "gina")
    outsider = await register(client, "hank")
    auth = {"Authorization": f"Bearer {anchor}"}
    ws, _ = await join(client, "frank", troll)
    anchor_ws, _ = await join(client, "frank", anchor)

    response = await client.post("/api/rooms/frank/mute", json={"user": "gina", "seconds": 60},
                                 headers={"Authorization": f"Bearer {outsider}"})
    assert response.status == 403
    assert (await client.post("/api/rooms/frank/ban", json={"user": "gina"})).status == 401

    response = await client.post("/api/rooms/frank/mute", json={"user": "gina", "seconds": 60}, headers=auth)
    assert response.status == 200
    await say(ws, "la la")
    assert (await next_event(ws, "error"))["code"] == "muted"

    assert (await client.post("/api/rooms/frank/ban", json={"user": "gina"}, headers=auth)).status == 200
    await say(ws, "la la")
    assert (await next_event(ws, "error"))["code"] == "banned"
    # the ban sticks for a new socket too
    ws2, _ = await join(client, "frank", troll)
    await say(ws2, "again")
    assert (await next_event(ws2, "error"))["code"] == "banned"

    assert (await client.post("/api/rooms/frank/unban", json={"user": "gina"}, headers=auth)).status == 200
    await say(ws, "sorry")
    assert (await next_event(ws, "chat"))["text"] == "sorry"

    assert (await client.post("/api/rooms/frank/slow", json={"seconds": 600}, headers=auth)).status == 200
    await say(ws, "one")
    assert (await next_event(ws, "chat", "error"))["code"] == "slow_mode"
    # the anchor is not held by their own slow mode; viewers never see moderation events
    await say(anchor_ws, "welcome")
    assert (await next_event(ws, "chat"))["text"] == "welcome"
    await say(anchor_ws, "again")
    event = await next_event(ws, "chat", "moderation", "error")
    assert event["type"] == "chat" and event["text"] == "again"


async def test_moderation_outlives_a_restart(tmp_path: Path) -> None:
    """Bans, mutes and slow mode are kept in the store: a node started later knows them."""
    client = await make_client(tmp_path, rate=100, burst=100)
    try:
        anchor = await register(client, "ivan")
        troll = await register(client, "judy")
        noisy = await register(client, "kate")
        auth = {"Authorization": f"Bearer {anchor}"}
        for action, body in (("ban", {"user": "judy"}), ("mute", {"user": "kate", "seconds": 600}),
                             ("slow", {"seconds": 600})):
            response = await client.post(f"/api/rooms/ivan/{action}", json=body, headers=auth)
            assert response.status == 200, await response.text()
    finally:
        await client.close()

    client = await make_client(tmp_path, rate=100, burst=100)  # the same data dir: a restart
    try:
        for token, code in ((troll, "banned"), (noisy, "muted")):
            ws, _ = await join(client, "ivan", token)
            await say(ws, "hello again")
            assert (await next_event(ws, "chat", "error"))["code"] == code
        newcomer = await register(client, "leo")
        ws, _ = await join(client, "ivan", newcomer)
        await say(ws, "first")
        assert (await next_event(ws, "chat", "error"))["text"] == "first"
        await say(ws, "second")
        assert (await next_event(ws, "chat", "error"))["code"] == "slow_mode"
        assert (await client.post("/api/rooms/ivan/unban", json={"user": "judy"},
                                  headers={"Authorization": f"Bearer {anchor}"})).status == 200
    finally:
        await client.close()

    client = await make_client(tmp_path, rate=100, burst=100)
    try:
        ws, _ = await join(client, "ivan", troll)
        await say(ws, "thanks")
        assert (await next_event(ws, "chat", "error"))["text"] == "thanks"
    finally:
        await client.close()


async def test_busy_room_batches_events(tmp_path: Path) -> None:
    client = await make_client(tmp_path, batch_interval=0.1)
    try:
        ws = await client.ws_connect("/ws/rooms/busy")
        await next_event(ws, "history")
        bus = client.app[BUS]
        for i in range(60):
            await bus.publish("room:busy", {"type": "gift", "id": str(i), "user": "u", "gift": "rose",
                                            "count": 1, "ts": 0})
            if i % 10 == 0:
                await asyncio.sleep(0)  # let the sender start while the burst goes on
        got: list[str] = []
        batches = 0
        while len(got) < 60:
            msg = await asyncio.wait_for(ws.receive(), WAIT)
            frame = json.loads(msg.data)
            if frame["type"] == "batch":
                batches += 1
                got += [e["id"] for e in frame["events"] if e["type"] == "gift"]
            elif frame["type"] == "gift":
                got.append(frame["id"])
        assert got == [str(i) for i in range(60)]
        assert batches >= 1
    finally:
        await client.close()


async def test_slow_socket_is_dropped_others_get_everything(tmp_path: Path) -> None:
    client = await make_client(tmp_path, send_buffer=64 * 1024, batch_interval=0)
    try:
        good = await client.ws_connect("/ws/rooms/big", max_msg_size=0)
        slow = await client.ws_connect("/ws/rooms/big", max_msg_size=0)
        await next_event(good, "history")
        room = client.app[ROOMS].rooms["big"]
        assert len(room.seats) == 2
        bus = client.app[BUS]
        payload = "x" * 65536
        received = 0
        sent = 0
        # one event at a time, each read by the good socket before the next: the slow one
        # never reads, so its kernel buffers and then its queue fill up
        while len(room.seats) == 2 and sent < 2000:
            await bus.publish("room:big", {"type": "gift", "id": str(sent), "user": "u",
                                           "gift": payload, "count": 1, "ts": 0})
            sent += 1
            event = await next_event(good, "gift")
            assert event["id"] == str(received)
            received += 1
        assert len(room.seats) == 1, "the slow socket was never dropped"
        for i in range(5):  # the room goes on for the others
            await bus.publish("room:big", {"type": "gift", "id": f"after{i}", "user": "u",
                                           "gift": "rose", "count": 1, "ts": 0})
            assert (await next_event(good, "gift"))["id"] == f"after{i}"
        closed = False
        async for _ in frames(slow):
            pass
        closed = True
        assert closed and received == sent
    finally:
        await client.close()


async def test_viewer_count_events(tmp_path: Path) -> None:
    client = await make_client(tmp_path, viewers_interval=0.05)
    try:
        first, _ = await join(client, "watch")
        assert (await next_event(first, "viewers"))["count"] == 1
        second, _ = await join(client, "watch")
        while (await next_event(first, "viewers"))["count"] != 2:
            pass
        await second.close()
        while (await next_event(first, "viewers"))["count"] != 1:
            pass
    finally:
        await client.close()


async def test_metrics_bad_channels_and_shutdown_closes_sockets(tmp_path: Path) -> None:
    client = await make_client(tmp_path)
    try:
        ws, _ = await join(client, "open_room")
        assert (await client.get("/ws/rooms/no%20such%20room")).status == 404
        body = await (await client.get("/metrics")).text()
        for name in ("livesrv_chat_sockets", "livesrv_chat_rooms", "livesrv_chat_messages_in_total",
                     "livesrv_chat_messages_out_total", "livesrv_chat_shed_total",
                     "livesrv_chat_rejected_total", "livesrv_chat_dropped_sockets_total"):
            assert name in body
        closing = asyncio.create_task(client.server.close())
        async for _ in ws:  # the server says goodbye (1001) instead of hanging up
            pass
        await asyncio.wait_for(closing, WAIT)
        assert ws.close_code == 1001
    finally:
        await client.close()


async def test_presence_service_is_told_of_viewers(tmp_path: Path) -> None:
    from livesrv.keys import PRESENCE
    from livesrv.presence import LocalPresence

    settings = load_settings(env={}, data_dir=str(tmp_path), http="127.0.0.1:8080", rtmp="127.0.0.1:1935")
    settings = dataclasses.replace(settings, tables={"chat": {"viewers_interval": 0.1}})
    app = create_app(settings, rtmp=False)
    async with TestClient(TestServer(app)) as client:
        presence = app[PRESENCE]  # wired by the app beside the bus
        assert isinstance(presence, LocalPresence)
        first, _ = await join(client, "counted")
        second, _ = await join(client, "counted")
        assert (await next_event(second, "viewers"))["count"] == 2
        assert presence.local("counted") == 2
        await second.close()
        while presence.local("counted") != 1:  # the server notices the close on its own time
            await next_event(first, "viewers", "history", "chat")
