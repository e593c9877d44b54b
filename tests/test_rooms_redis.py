"""Two server processes on the real Redis: chat sent on node A reaches a socket on node B once."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from redis.asyncio import Redis

from livesrv.room_history import history_key
from tests.support.server import ServerProcess, free_port, get_json, post_json

pytestmark = [pytest.mark.e2e, pytest.mark.redis]

WAIT = 10  # a guard against hanging, not a speed assertion


async def chats(ws: aiohttp.ClientWebSocketResponse, within: float) -> list[str] | None:
    """The chat texts of the next frame (batches flattened); None when none came ``within`` s."""
    try:
        msg = await asyncio.wait_for(ws.receive(), within)
    except TimeoutError:
        return None
    assert msg.type == aiohttp.WSMsgType.TEXT, msg
    frame = json.loads(msg.data)
    events = frame["events"] if frame["type"] in ("batch", "history") else [frame]
    return [e["text"] for e in events if e["type"] == "chat"]


async def test_chat_crosses_nodes_once(tmp_path: Path, redis_url: str) -> None:
    config = tmp_path / "livesrv.toml"
    config.write_text("[chat]\nrate = 100.0\nburst = 100\n")
    channel = "room_" + uuid.uuid4().hex[:8]  # the Redis is shared: a channel of our own
    a = ServerProcess(tmp_path / "a", redis=redis_url, node_id="node-a", config=str(config))
    b = ServerProcess(tmp_path / "b", redis=redis_url, node_id="node-b", config=str(config))
    with a, b:
        status, body = post_json(a.url + "/api/auth/register",
                                 {"username": "walt", "password": "pw-walt-12345"})
        assert status == 201, body
        async with aiohttp.ClientSession() as session:
            sender = await session.ws_connect(f"{a.url}/ws/rooms/{channel}", params={"token": body["token"]})
            reader = await session.ws_connect(f"{b.url}/ws/rooms/{channel}")
            # B subscribes to Redis in the background: probe until a message gets through
            await probe(sender, reader, "probe")

            await sender.send_str(json.dumps({"type": "chat", "text": "the one"}))
            await sender.send_str(json.dumps({"type": "chat", "text": "marker"}))
            got: list[str] = []
            while "marker" not in got:
                texts = await chats(reader, WAIT)
                assert texts is not None, f"node B stopped receiving; got {got}"
                got += texts
            assert got.count("the one") == 1
            assert got.index("the one") < got.index("marker")
            await sender.close()
            await reader.close()


async def viewer_count(ws: aiohttp.ClientWebSocketResponse, expected: int, within: float = 30) -> None:
    """Read frames until a ``viewers`` event says ``expected`` (the count goes out on change)."""
    seen: list[int] = []
    async with asyncio.timeout(within):
        while not seen or seen[-1] != expected:
            msg = await ws.receive()
            assert msg.type == aiohttp.WSMsgType.TEXT, msg
            frame = json.loads(msg.data)
            events = frame["events"] if frame["type"] == "batch" else [frame]
            seen += [e["count"] for e in events if e["type"] == "viewers"]
    assert seen[-1] == expected, seen


async def test_viewer_count_is_the_sum_over_both_nodes(tmp_path: Path, redis_url: str) -> None:
    config = tmp_path / "livesrv.toml"
    config.write_text("[chat]\nviewers_interval = 0.2\n")
    channel = "room_" + uuid.uuid4().hex[:8]
    a = ServerProcess(tmp_path / "a", redis=redis_url, node_id="count-a", config=str(config))
    b = ServerProcess(tmp_path / "b", redis=redis_url, node_id="count-b", config=str(config))
    with a, b:
        async with aiohttp.ClientSession() as session:
            on_a = [await session.ws_connect(f"{a.url}/ws/rooms/{channel}") for _ in range(2)]
            on_b = [await session.ws_connect(f"{b.url}/ws/rooms/{channel}") for _ in range(3)]
            # every socket, on either node, is told 5
            for ws in on_a + on_b:
                await viewer_count(ws, 5)
            for ws in on_b[:2]:
                await ws.close()
            for ws in on_a + on_b[2:]:
                await viewer_count(ws, 3)
            for ws in on_a + on_b[2:]:
                await ws.close()


async def test_a_room_opened_on_another_node_starts_from_the_shared_history(
        tmp_path: Path, redis_url: str) -> None:
    config = tmp_path / "livesrv.toml"
    config.write_text("[chat]\nrate = 100.0\nburst = 100\n")
    channel = "room_" + uuid.uuid4().hex[:8]
    a = ServerProcess(tmp_path / "a", redis=redis_url, node_id="hist-a", config=str(config))
    b = ServerProcess(tmp_path / "b", redis=redis_url, node_id="hist-b", config=str(config))
    with a, b:
        status, body = post_json(a.url + "/api/auth/register",
                                 {"username": "nina", "password": "pw-nina-12345"})
        assert status == 201, body
        async with aiohttp.ClientSession() as session:
            # only node A holds the room while these are said
            sender = await session.ws_connect(f"{a.url}/ws/rooms/{channel}", params={"token": body["token"]})
            for i in range(5):
                await sender.send_str(json.dumps({"type": "chat", "text": f"m{i}"}))
            ids: dict[str, str] = {}
            while len(ids) < 5:
                msg = await asyncio.wait_for(sender.receive(), WAIT)
                frame = json.loads(msg.data)
                for event in frame["events"] if frame["type"] == "batch" else [frame]:
                    if event["type"] == "chat":
                        ids[event["text"]] = event["id"]
            # the appends reach Redis in the background: wait until they have
            redis = Redis.from_url(redis_url)
            try:
                async with asyncio.timeout(WAIT):
                    while await redis.llen(history_key(channel)) < 5:  # noqa: ASYNC110
                        await asyncio.sleep(0.05)
            finally:
                await redis.aclose()
            # a viewer who saw m1 on node A reconnects to node B: exactly m2..m4
            reader = await session.ws_connect(f"{b.url}/ws/rooms/{channel}", params={"since": ids["m1"]})
            history = json.loads((await asyncio.wait_for(reader.receive(), WAIT)).data)
            assert history["type"] == "history"
            texts = [e["text"] for e in history["events"]]
            assert texts == ["m2", "m3", "m4"]
            # and a newcomer on node B gets all of it
            fresh = await session.ws_connect(f"{b.url}/ws/rooms/{channel}")
            history = json.loads((await asyncio.wait_for(fresh.receive(), WAIT)).data)
            assert [e["text"] for e in history["events"]] == [f"m{i}" for i in range(5)]
            for ws in (sender, reader, fresh):
                await ws.close()


async def until_text(ws: aiohttp.ClientWebSocketResponse, text: str) -> None:
    got: list[str] = []
    while text not in got:
        texts = await chats(ws, WAIT)
        assert texts is not None, f"{text!r} never arrived; got {got}"
        got += texts


async def probe(sender: aiohttp.ClientWebSocketResponse, reader: aiohttp.ClientWebSocketResponse,
                tag: str, tries: int = 100) -> None:
    """Send until one message crosses (subscriptions are made in the background)."""
    for i in range(tries):
        await sender.send_str(json.dumps({"type": "chat", "text": f"{tag} {i}"}))
        # drain what is there: a frame without chat (viewers) must not end the wait early
        while (texts := await chats(reader, 0.3)) is not None:
            if any(t.startswith(tag) for t in texts):
                return
    raise AssertionError(f"no {tag} message crossed the nodes")


class PrivateRedis:
    """A redis-server of this test's own, so stopping it disturbs no one else."""

    def __init__(self) -> None:
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                                      "--save", "", "--appendonly", "no"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("private redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    redis = PrivateRedis()
    try:
        redis.start()
    except FileNotFoundError:
        pytest.skip("redis-server is not installed")
    try:
        yield redis
    finally:
        redis.stop()


async def wait_ready(server: ServerProcess, ready: bool) -> None:
    deadline = time.monotonic() + 30
    while (get_json(server.url + "/readyz")[0] == 200) != ready:
        assert time.monotonic() < deadline, f"/readyz never became {'ready' if ready else 'unready'}"
        await asyncio.sleep(0.1)


async def test_redis_outage_keeps_local_chat_and_cross_node_comes_back(
        tmp_path: Path, private_redis: PrivateRedis) -> None:
    config = tmp_path / "livesrv.toml"
    config.write_text("[chat]\nrate = 100.0\nburst = 100\n")
    channel = "room_" + uuid.uuid4().hex[:8]
    a = ServerProcess(tmp_path / "a", redis=private_redis.url, node_id="node-a", config=str(config))
    b = ServerProcess(tmp_path / "b", redis=private_redis.url, node_id="node-b", config=str(config))
    with a, b:
        status, body = post_json(a.url + "/api/auth/register",
                                 {"username": "vera", "password": "pw-vera-12345"})
        assert status == 201, body
        async with aiohttp.ClientSession() as session:
            sender = await session.ws_connect(f"{a.url}/ws/rooms/{channel}", params={"token": body["token"]})
            local = await session.ws_connect(f"{a.url}/ws/rooms/{channel}")
            remote = await session.ws_connect(f"{b.url}/ws/rooms/{channel}")
            await probe(sender, remote, "before")

            private_redis.stop()
            await wait_ready(a, False)
            await sender.send_str(json.dumps({"type": "chat", "text": "during the outage"}))
            await until_text(local, "during the outage")  # the room on node A keeps working

            private_redis.start()
            await wait_ready(a, True)
            await wait_ready(b, True)
            await probe(sender, remote, "after")  # resubscribed without a restart
            for ws in (sender, local, remote):
                await ws.close()
