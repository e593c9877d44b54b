"""The room logic of ``chat`` on its own: moderation, history, sampling, per-socket outboxes."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from chat.fanout import Outbox
from chat.history import History
from chat.moderation import Moderation, TokenBucket
from chat.room import Rooms
from chat.settings import ChatSettings


def test_token_bucket_bursts_then_refills() -> None:
    bucket = TokenBucket(rate=2.0, burst=3, now=0.0)
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.take(0.5)  # one token back after half a second at 2/s
    assert not bucket.take(0.5)
    assert [bucket.take(100.0) for _ in range(4)] == [True, True, True, False]  # capped at burst


def test_moderation_rules() -> None:
    mod = Moderation(ChatSettings(max_length=10, banned_words=["Badword"], rate=1000, burst=1000))
    assert mod.check("u", "hi", now=0) is None
    assert mod.check("u", "  ", now=0)[0] == "empty"
    assert mod.check("u", "x" * 11, now=0)[0] == "too_long"
    assert mod.check("u", "a BADWORD", now=0)[0] == "blocked_word"
    mod.apply({"action": "slow", "seconds": 5})
    assert mod.check("u", "hi", now=1)[0] == "slow_mode"
    assert mod.check("u", "hi", now=6) is None
    assert mod.check("anchor", "hi", now=6, privileged=True) is None
    assert mod.check("anchor", "hi", now=6, privileged=True) is None  # slow mode spares the anchor
    mod.apply({"action": "mute", "user": "u", "until": 1e12})
    assert mod.check("u", "hi", now=20)[0] == "muted"
    mod.apply({"action": "ban", "user": "u"})
    assert mod.check("u", "hi", now=20)[0] == "banned"
    mod.apply({"action": "unban", "user": "u"})
    assert mod.check("u", "hi", now=30) is None


def test_idle_users_are_forgotten(monkeypatch) -> None:
    from chat import moderation

    monkeypatch.setattr(moderation, "PRUNE_AT", 3)
    mod = Moderation(ChatSettings(rate=1, burst=2))
    for user in ("a", "b", "c"):
        assert mod.check(user, "hi", now=0) is None
    assert mod.check("d", "hi", now=100) is None  # a, b and c are full again: forgotten
    assert set(mod._buckets) == {"d"}


def test_history_since() -> None:
    history = History(3)
    for i in range(5):
        history.append({"id": f"{i:03d}", "text": str(i)})
    assert [e["id"] for e in history.since(None)] == ["002", "003", "004"]
    assert [e["id"] for e in history.since("003")] == ["004"]
    assert history.since("004") == []
    # older than what is kept: all of it (the gap is unavoidable)
    assert [e["id"] for e in history.since("000")] == ["002", "003", "004"]


class FakeSocket:
    def __init__(self) -> None:
        self.frames: list[Any] = []
        self.aborted = False
        self.gate = asyncio.Event()
        self.gate.set()
        self.done = asyncio.Event()  # set when the test's closing "end" frame arrives

    async def send(self, text: str) -> None:
        await self.gate.wait()
        frame = json.loads(text)
        self.frames.append(frame)
        if frame["type"] == "end" or (frame["type"] == "batch" and frame["events"][-1]["type"] == "end"):
            self.done.set()

    def abort(self) -> None:
        self.aborted = True


async def test_room_encodes_once_samples_and_keeps_full_history() -> None:
    subscribed: dict[str, Any] = {}

    def subscribe(topic: str, handler: Any) -> Any:
        subscribed[topic] = handler
        return lambda: subscribed.pop(topic)

    rooms = Rooms(ChatSettings(sample_rate=10, busy_rate=1e9, queue_size=10_000), "n1", subscribe)
    socket = FakeSocket()
    outbox = Outbox(socket.send, socket.abort, limit=10_000, batch_interval=0.1, busy=lambda: False)
    room = rooms.join("r", outbox)
    assert "room:r" in subscribed
    for i in range(200):
        subscribed["room:r"](rooms.chat_event("u", str(i)))
    # the sampler keeps about sample_rate per second; everything is in history
    assert room.shed > 0 and room.shed < 200
    assert len(room.history.since(None)) == 100
    task = asyncio.create_task(outbox.run())
    outbox.push('{"type":"end"}')
    await asyncio.wait_for(socket.done.wait(), 10)
    outbox.close()
    await task
    events = [e for f in socket.frames for e in (f["events"] if f["type"] == "batch" else [f])]
    assert socket.frames[0]["type"] == "history"  # never inside a batch
    assert len([e for e in events if e["type"] == "chat"]) == 200 - room.shed
    rooms.leave(room, outbox)
    assert subscribed == {} and rooms.rooms == {}


async def test_a_full_outbox_is_dropped_not_waited_for() -> None:
    socket = FakeSocket()
    socket.gate.clear()  # the socket does not take anything
    outbox = Outbox(socket.send, socket.abort, limit=3, batch_interval=0.1, busy=lambda: False)
    task = asyncio.create_task(outbox.run())
    assert outbox.push('{"type":"chat"}')
    await asyncio.sleep(0)  # the sender takes it and blocks on the socket
    assert all(outbox.push('{"type":"chat"}') for _ in range(3))
    assert not outbox.push('{"type":"chat"}')
    assert outbox.dropped and socket.aborted
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
