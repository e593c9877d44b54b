"""The room logic of ``chat`` on its own: moderation, history, sampling and fan-out, the frames
read back from real socket pairs (the room writes to real asyncio transports)."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from collections.abc import AsyncIterator
from typing import Any

import pytest

from chat.fanout import Seat
from chat.history import History
from chat.moderation import Moderation, TokenBucket
from chat.room import Rooms
from chat.settings import ChatSettings
from chat.wsframe import text_frame


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


def parse_frames(data: bytes) -> tuple[list[bytes], bytes]:
    """Unmasked server frames (RFC 6455 §5.2) → payloads, and the incomplete rest."""
    payloads = []
    while len(data) >= 2:
        assert data[0] == 0x81, "FIN + text"
        size, offset = data[1] & 0x7F, 2
        assert not data[1] & 0x80, "server frames are not masked"
        if size == 126:
            if len(data) < 4:
                break
            size, offset = struct.unpack("!H", data[2:4])[0], 4
        elif size == 127:
            if len(data) < 10:
                break
            size, offset = struct.unpack("!Q", data[2:10])[0], 10
        if len(data) < offset + size:
            break
        payloads.append(data[offset:offset + size])
        data = data[offset + size:]
    return payloads, data


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 200_000])
def test_text_frame_lengths(size: int) -> None:
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    frame = text_frame(payload)
    assert parse_frames(frame) == ([payload], b"")
    if size:
        assert parse_frames(frame[:-1]) == ([], frame[:-1])


class Viewer:
    """A real socket pair: the room writes to one end's asyncio transport, the test reads the
    other end and parses the frames."""

    def __init__(self, transport: asyncio.WriteTransport, peer: socket.socket, user: str | None) -> None:
        self.seat = Seat(transport, user)
        self.peer = peer
        self.frames: list[dict[str, Any]] = []
        self._rest = b""

    @classmethod
    async def open(cls, user: str | None = None, *, rcvbuf: int | None = None) -> Viewer:
        ours, peer = socket.socketpair()
        if rcvbuf is not None:
            for sock, option in ((peer, socket.SO_RCVBUF), (ours, socket.SO_SNDBUF)):
                sock.setsockopt(socket.SOL_SOCKET, option, rcvbuf)
        peer.setblocking(False)
        transport, _ = await asyncio.get_running_loop().create_connection(asyncio.Protocol, sock=ours)
        return cls(transport, peer, user)  # type: ignore[arg-type]

    async def read_until(self, done: Any, limit: float = 10.0) -> list[dict[str, Any]]:
        """Read frames until ``done(frames)``; every frame so far."""
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(limit):
            while not done(self.frames):
                chunk = await loop.sock_recv(self.peer, 1 << 20)
                assert chunk, "the room closed the socket"
                payloads, self._rest = parse_frames(self._rest + chunk)
                self.frames += [json.loads(p) for p in payloads]
        return self.frames

    def events(self) -> list[dict[str, Any]]:
        return [e for f in self.frames for e in (f["events"] if f["type"] == "batch" else [f])]

    def close(self) -> None:
        self.seat.transport.close()
        self.peer.close()


def ends(frames: list[dict[str, Any]]) -> bool:
    last = frames[-1] if frames else None
    return last is not None and (last.get("id") == "end" or (
        last["type"] == "batch" and last["events"][-1].get("id") == "end"))


class Bus:
    """The room's subscription, called directly as the bus would."""

    def __init__(self) -> None:
        self.handlers: dict[str, Any] = {}

    def subscribe(self, topic: str, handler: Any) -> Any:
        self.handlers[topic] = handler
        return lambda: self.handlers.pop(topic)


@pytest.fixture(params=["inline", "threads"])
def fanout(request: pytest.FixtureRequest) -> dict[str, int]:
    """Frames written by the event loop's thread, or on threads (a big room's path), the same."""
    if request.param == "inline":
        return {"fanout_threads": 1}
    return {"fanout_threads": 3, "fanout_threshold": 1}


@pytest.fixture
async def viewers() -> AsyncIterator[list[Viewer]]:
    opened: list[Viewer] = []
    yield opened
    for viewer in opened:
        viewer.close()


async def test_room_samples_chat_keeps_full_history_and_writes_one_frame(
        viewers: list[Viewer], fanout: dict[str, int]) -> None:
    bus = Bus()
    rooms = Rooms(ChatSettings(sample_rate=10, linger_seconds=0, **fanout), "n1", bus.subscribe)
    viewers += [await Viewer.open(), await Viewer.open("u"), await Viewer.open("anchor")]
    room = None
    for viewer in viewers:
        room = rooms.join("anchor", viewer.seat)
    assert room is not None and "room:anchor" in bus.handlers
    for i in range(200):
        bus.handlers["room:anchor"](rooms.chat_event("u", f"u{i}"))
    for i in range(20):
        bus.handlers["room:anchor"](rooms.chat_event("anchor", f"a{i}"))
    room.deliver({"type": "viewers", "count": 3, "id": "end"})
    # the sampler keeps about sample_rate per second; everything is in history
    assert 0 < room.shed < 200
    assert len(room.history.since(None)) == 100
    for viewer in viewers:
        await viewer.read_until(ends)
        assert viewer.frames[0]["type"] == "history"
    anonymous, author, anchor = (v.events() for v in viewers)
    chats = [[e["text"] for e in events if e["type"] == "chat"] for events in (anonymous, author, anchor)]
    # the anchor's own messages are never shed; what others get is the same sample
    assert chats[0] == chats[2] and len(chats[0]) == 220 - room.shed
    assert [t for t in chats[0] if t.startswith("a")] == [f"a{i}" for i in range(20)]
    # the author sees every one of their messages, in order
    assert [t for t in chats[1] if t.startswith("u")] == [f"u{i}" for i in range(200)]
    rooms.leave(room, viewers[0].seat)
    assert "anchor" in rooms.rooms
    for viewer in viewers[1:]:
        rooms.leave(room, viewer.seat)
    assert bus.handlers == {} and rooms.rooms == {}


async def test_busy_room_batches_and_a_joiner_gets_each_event_once(
        viewers: list[Viewer], fanout: dict[str, int]) -> None:
    bus = Bus()
    rooms = Rooms(ChatSettings(batch_interval=0.05, sample_rate=1e9, **fanout), "n1", bus.subscribe)
    viewers += [await Viewer.open(), await Viewer.open()]
    room = rooms.join("r", viewers[0].seat)
    for i in range(30):  # the first goes out at once, the rest waits for the next frame
        bus.handlers["room:r"](rooms.chat_event("u", str(i)))
    # a joiner while events are pending: they are in its history, and not sent to it again
    rooms.join("r", viewers[1].seat)
    for i in range(30, 60):
        bus.handlers["room:r"](rooms.chat_event("u", str(i)))
    room.deliver({"type": "viewers", "count": 2, "id": "end"})
    first, second = viewers
    await first.read_until(ends)
    await second.read_until(ends)
    assert [e["text"] for e in first.events() if e["type"] == "chat"] == [str(i) for i in range(60)]
    history = second.frames[0]
    assert history["type"] == "history"
    seen = [e["text"] for e in history["events"]]
    seen += [e["text"] for e in second.events() if e["type"] == "chat"]
    assert seen == [str(i) for i in range(60)]
    assert any(f["type"] == "batch" for f in first.frames), "a busy room batches"
    assert len(first.frames) < 30


async def test_a_big_room_is_written_in_chunks_and_late_chunks_get_what_arrived_meanwhile(
        viewers: list[Viewer], fanout: dict[str, int]) -> None:
    bus = Bus()
    rooms = Rooms(ChatSettings(batch_interval=0, sample_rate=1e9, flush_chunk=2, **fanout), "n1",
                  bus.subscribe)
    viewers += [await Viewer.open() for _ in range(7)]
    room = None
    for viewer in viewers:
        room = rooms.join("r", viewer.seat)
    assert room is not None
    bus.handlers["room:r"](rooms.chat_event("u", "0"))  # a quiet room: the pass starts at once
    assert room.writing, "7 seats, 2 a turn: the rest is written in later turns"
    writing: list[bool] = []

    def arrives(i: int) -> None:  # chat read by the loop between two chunks of the pass
        writing.append(room.writing)
        bus.handlers["room:r"](rooms.chat_event("u", str(i)))

    loop = asyncio.get_running_loop()
    for i in range(1, 30):
        loop.call_soon(arrives, i)
    loop.call_soon(room.deliver, {"type": "viewers", "count": 7, "id": "end"})
    for viewer in viewers:
        await viewer.read_until(ends)
        # every event once, in order, whichever chunk the viewer was in
        assert [e["text"] for e in viewer.events() if e["type"] == "chat"] == [str(i) for i in range(30)]
    frames = [len([f for f in v.frames if f["type"] != "history"]) for v in viewers]
    # the first chunk had only "0"; the next pass brought it the rest. The chunks written after
    # the rest arrived got everything in the same pass, in one frame.
    assert frames[:2] == [2, 2] and frames[-1] == 1
    assert writing and all(writing)
    async with asyncio.timeout(5):  # a last pass, for the chunks written before the rest came
        while room.writing:  # noqa: ASYNC110 - the pass is the room's own
            await asyncio.sleep(0)
    assert not room._log, "once every seat has every event, the room keeps none"
    rooms.close()


async def test_a_slow_socket_is_dropped_and_the_room_goes_on(
        viewers: list[Viewer], fanout: dict[str, int]) -> None:
    bus = Bus()
    rooms = Rooms(ChatSettings(batch_interval=0, send_buffer=64 * 1024, **fanout), "n1", bus.subscribe)
    good, slow = await Viewer.open(), await Viewer.open(rcvbuf=4096)
    viewers += [good, slow]
    room = rooms.join("r", good.seat)
    rooms.join("r", slow.seat)
    payload = "x" * 16384
    sent = 0
    # the good viewer reads everything; the slow one reads nothing
    while slow.seat in room.seats:
        assert sent < 10_000, "the slow socket was never dropped"
        room.deliver({"type": "gift", "id": str(sent), "gift": payload})
        sent += 1
        await good.read_until(lambda frames, n=sent: len(frames) >= n + 1)
    assert slow.seat.dropped and slow.seat.transport.is_closing()
    room.deliver({"type": "viewers", "count": 1, "id": "end"})
    await good.read_until(ends)
    assert [e["id"] for e in good.events() if e["type"] == "gift"] == [str(i) for i in range(sent)]
    rooms.leave(room, slow.seat)  # the handler's own leave, after the drop: harmless
    assert list(room.seats) == [good.seat]


async def test_an_empty_room_lingers_with_its_history_then_is_forgotten(viewers: list[Viewer]) -> None:
    bus = Bus()
    rooms = Rooms(ChatSettings(linger_seconds=0.3), "n1", bus.subscribe)
    viewers += [await Viewer.open(), await Viewer.open()]
    room = rooms.join("r", viewers[0].seat)
    rooms.leave(room, viewers[0].seat)
    # nobody is in the room, but it still hears the bus: the next joiner gets what was said
    bus.handlers["room:r"](rooms.chat_event("u", "while empty"))
    assert rooms.join("r", viewers[1].seat) is room
    await viewers[1].read_until(lambda frames: frames and frames[0]["type"] == "history")
    assert [e["text"] for e in viewers[1].frames[0]["events"]] == ["while empty"]
    rooms.leave(room, viewers[1].seat)
    async with asyncio.timeout(10):
        while rooms.rooms:  # noqa: ASYNC110 - the linger timer is the room's own
            await asyncio.sleep(0.05)
    assert bus.handlers == {}


class SlowSharedHistory:
    """A shared history whose answer the test releases (the order of events is the point)."""

    def __init__(self, events: list[dict[str, Any]]) -> None:
        self.events = events
        self.appended: list[tuple[str, dict[str, Any]]] = []
        self.release = asyncio.Event()

    def append(self, channel: str, event: dict[str, Any]) -> None:
        self.appended.append((channel, event))

    async def recent(self, channel: str) -> list[dict[str, Any]]:
        await self.release.wait()
        return self.events


async def test_opening_a_room_merges_the_shared_history_with_what_arrives_meanwhile(
        viewers: list[Viewer]) -> None:
    bus = Bus()
    older = [{"type": "chat", "id": f"0000000000001-a-{i:08d}", "user": "a", "text": f"old{i}"}
             for i in range(3)]
    both = {"type": "chat", "id": "9999999999999-a-00000001", "user": "a", "text": "arrived both ways"}
    shared = SlowSharedHistory([*older, both])
    rooms = Rooms(ChatSettings(linger_seconds=5), "n1", bus.subscribe, shared)
    viewers.append(await Viewer.open())
    first = asyncio.create_task(rooms.open("r"))
    second = asyncio.create_task(rooms.open("r"))
    await asyncio.sleep(0.05)
    assert "room:r" in bus.handlers, "subscribed before loading"
    # while the shared history loads, a message arrives over the bus (and is also in Redis)
    bus.handlers["room:r"](dict(both))
    assert not first.done() and not second.done()
    shared.release.set()
    room = await first
    assert await second is room
    assert rooms.join("r", viewers[0].seat) is room  # as the handler does: no await between
    await viewers[0].read_until(lambda frames: frames and frames[0]["type"] == "history")
    texts = [e["text"] for e in viewers[0].frames[0]["events"]]
    assert texts == ["old0", "old1", "old2", "arrived both ways"]
    rooms.said("r", {"id": "x"})
    assert shared.appended == [("r", {"id": "x"})]


async def test_frames_the_kernel_takes_in_part_arrive_whole_and_in_order(viewers: list[Viewer]) -> None:
    """Small socket buffers: direct writes from the threads come up short, the transport sends
    the rest, and the next frames queue behind it."""
    bus = Bus()
    rooms = Rooms(ChatSettings(batch_interval=0, fanout_threads=3, fanout_threshold=1,
                               send_buffer=1 << 24), "n1", bus.subscribe)
    viewers += [await Viewer.open(rcvbuf=4096) for _ in range(6)]
    room = None
    for viewer in viewers:
        room = rooms.join("r", viewer.seat)
    assert room is not None
    payload = "y" * 50_000  # more than the kernel takes at once
    for i in range(20):
        room.deliver({"type": "gift", "id": str(i), "gift": payload})
    room.deliver({"type": "viewers", "count": 6, "id": "end"})
    for viewer in viewers:
        await viewer.read_until(ends)
        assert [e["id"] for e in viewer.events() if e["type"] == "gift"] == [str(i) for i in range(20)]
        assert all(e["gift"] == payload for e in viewer.events() if e["type"] == "gift")
    rooms.close()
