"""Rooms on this node: each subscribes to its bus topic while it has sockets, keeps history,
applies moderation and fans events out (each encoded once, then written in rounds over the
room's sockets, one frame per chunk of sockets: see ``Room`` and ``chat/fanout.py``)."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from . import metrics
from .fanout import Seat, Writer, batch_text, write_all
from .history import History
from .moderation import Moderation
from .settings import ChatSettings
from .wsframe import text_frame

Subscribe = Callable[[str, Callable[[dict[str, Any]], None]], Callable[[], None]]


class SharedHistory(Protocol):
    """Room history kept beyond this node (livesrv.room_history.RedisRoomHistory)."""

    def append(self, channel: str, event: dict[str, Any]) -> None: ...

    async def recent(self, channel: str) -> list[dict[str, Any]]: ...


def topic(channel: str) -> str:
    return f"room:{channel}"


def _encode(event: dict[str, Any]) -> str:
    return json.dumps(event, separators=(",", ":"), ensure_ascii=False)


class RateMeter:
    """Events per second over the last whole second (cheap: two counters)."""

    def __init__(self) -> None:
        self._window = int(time.monotonic())
        self._count = 0
        self.last_rate = 0.0

    def tick(self) -> None:
        self._roll()
        self._count += 1

    def _roll(self) -> None:
        now = int(time.monotonic())
        if now != self._window:
            self.last_rate = self._count if now == self._window + 1 else 0.0
            self._window, self._count = now, 0

    @property
    def rate(self) -> float:
        self._roll()
        return max(self.last_rate, float(self._count))


class Room:
    """One room on this node: its seats, history, sampler and the events on their way out.

    Delivery is a ring over the seats, not a frame per room: a *pass* walks the seats
    ``flush_chunk`` at a time, one chunk per turn of the event loop, and each chunk is sent
    every event that arrived since that chunk's last write, as one frame built once for the
    chunk. An event that arrives while a pass is under way still reaches the chunks not written
    yet in that pass, so a socket waits at most one pass period for an event (not a frame's
    wait plus its whole write). Passes start at most once per ``batch_interval``: a quiet room
    sends an event at once, a busy one a frame per socket per interval, and a room too big to
    write in one interval goes round as fast as its writes allow.

    Small chunks matter as much as the ring: everything an event goes through before it is in
    the room (the sender's WebSocket, the bus from Redis) waits for the chunk being written.
    At 10,000 viewers on two cores, 2,500-socket chunks (~25 ms) put 50-70 ms into the bus hop
    alone; 250-socket chunks (~2 ms) halved the p99 (docs/BENCHMARKS.md).
    """

    def __init__(self, channel: str, settings: ChatSettings, moderation: Moderation,
                 writer: Writer | None = None) -> None:
        self.channel = channel
        self.settings = settings
        self.writer = writer
        self.moderation = moderation
        self.history = History(settings.history)
        #: insertion-ordered, O(1) removal; a pass walks a snapshot of it
        self.seats: dict[Seat, None] = {}
        #: a logged-in user's own seats: their chat is shown to them even when sampled out
        self.own_seats: dict[str, set[Seat]] = {}
        self.meter = RateMeter()
        self.shed = 0
        self._credit = 0.0  # the sampler's accumulator: keeps limit/rate of the chat events
        #: encoded events not yet written to every seat; ``_log[0]`` is event number ``_base``
        #: (a seat's ``cursor`` is the number of the next event it is owed)
        self._log: list[str] = []
        self._base = 0
        #: authors' own copies of their shed messages: (event number it goes before, text)
        self._own: dict[Seat, list[tuple[int, str]]] = {}
        self._timer: asyncio.TimerHandle | None = None  # the next pass, when it must wait
        self._next_pass = 0.0  # the monotonic time from which the next pass may start
        self._pass: Sequence[Seat] = ()  # the seats of the pass under way, in order
        self._pass_at = 0  # how many of them have been written
        self._pass_started = 0.0
        self._pass_floor = 0  # the end of the log when the pass began: every seat has it after
        self._next_chunk: asyncio.Handle | None = None
        self.last_viewers: int | None = None
        self.unsubscribe: Callable[[], None] | None = None
        #: set while the shared history is being loaded: joiners wait for it
        self.loading: asyncio.Future[None] | None = None
        #: set while the room has no seats: it is forgotten when this fires
        self.forget_timer: asyncio.TimerHandle | None = None

    @property
    def writing(self) -> bool:
        """A pass is under way (written a chunk at a time)."""
        return self._next_chunk is not None

    def on_bus(self, data: dict[str, Any]) -> None:
        kind = data.get("type")
        if kind == "moderation":  # internal: applied on every node, never shown to viewers
            self.moderation.apply(data)
            return
        if kind == "chat":
            self.history.append(data)  # history is complete even when delivery is sampled
            if data.get("user") != self.channel and self._sampled_out():  # never the anchor's
                self.shed += 1
                metrics.SHED.inc()
                self._deliver_to_author(data)
                return
        self.deliver(data)

    def _sampled_out(self) -> bool:
        self.meter.tick()
        rate = self.meter.rate
        if rate <= self.settings.sample_rate:
            return False
        self._credit += self.settings.sample_rate / rate
        if self._credit >= 1:
            self._credit -= 1
            return False
        return True

    def _deliver_to_author(self, event: dict[str, Any]) -> None:
        """Whoever sent a shed message still sees it (as danmaku apps do); nobody else does.

        It goes into the author's own copy of their next frame, at its place among the room's
        events (ids stay in order: a resume relies on them)."""
        seats = self.own_seats.get(event.get("user", ""))
        if not seats:
            return
        entry = (self._base + len(self._log), _encode(event))
        for seat in seats:
            self._own.setdefault(seat, []).append(entry)
        self._wake()

    def deliver(self, event: dict[str, Any]) -> None:
        """Encode once, for every seat's next frame."""
        self._log.append(_encode(event))
        self._wake()

    def _wake(self) -> None:
        """Start a pass now if the room may (an event in a quiet room goes out at once), or
        when it may; nothing to do while one is under way (its end looks for more)."""
        if self._timer is not None or self._next_chunk is not None:
            return
        wait = self._next_pass - time.monotonic()
        if wait <= 0:
            self._start_pass()
        else:
            self._timer = asyncio.get_running_loop().call_later(wait, self._start_pass)

    def _start_pass(self) -> None:
        self._timer = None
        self._pass_started = time.monotonic()
        self._next_pass = self._pass_started + self.settings.batch_interval
        self._pass = tuple(self.seats)  # joins and drops during the pass change self.seats
        self._pass_at = 0
        self._pass_floor = self._base + len(self._log)
        self._write_chunk()

    def _write_chunk(self) -> None:
        """The next chunk of the pass: each seat gets the events since its last frame. Seats
        that share a cursor (nearly all of a chunk) share one frame, built here once."""
        start = self._pass_at
        chunk = self._pass[start:start + self.settings.flush_chunk]
        self._pass_at = start + len(chunk)
        end = self._base + len(self._log)
        seats, own = self.seats, self._own
        groups: dict[int, list[Seat]] = {}
        for seat in chunk:
            cursor = seat.cursor
            if (cursor == end and seat not in own) or seat not in seats:
                continue
            seat.cursor = end
            if own and seat in own:
                self._write_own(seat, cursor, own.pop(seat))
            else:
                group = groups.get(cursor)
                if group is None:
                    group = groups[cursor] = []
                group.append(seat)
        for cursor, group in groups.items():
            events = self._log[cursor - self._base:]
            self._write_frame(group, text_frame(batch_text(events).encode()), len(events))
        if self._pass_at < len(self._pass):
            self._next_chunk = asyncio.get_running_loop().call_soon(self._write_chunk)
        else:
            self._end_pass()

    def _write_own(self, seat: Seat, cursor: int, own: list[tuple[int, str]]) -> None:
        """A frame for one seat: the room's events since ``cursor`` with its author's own shed
        messages in their places."""
        merged = self._log[cursor - self._base:]
        for number, text in reversed(own):  # from the back: the places stay valid
            merged.insert(number - cursor, text)
        seat.send(batch_text(merged))
        metrics.FRAMES_OUT.inc()
        metrics.MESSAGES_OUT.inc(len(merged))

    def _write_frame(self, seats: Sequence[Seat], frame: bytes, events: int) -> None:
        if self.writer is not None:
            slow = self.writer.write_all(seats, frame, self.settings.send_buffer)
        else:
            slow = write_all(seats, frame, self.settings.send_buffer)
        for seat in slow:
            seat.drop(f"{seat.transport.get_write_buffer_size()} bytes unsent")
            self.remove(seat)
        reached = len(seats) - len(slow)
        metrics.FRAMES_OUT.inc(reached)
        metrics.BYTES_OUT.inc(reached * len(frame))
        metrics.MESSAGES_OUT.inc(reached * events)

    def _end_pass(self) -> None:
        self._next_chunk = None
        self._pass = ()
        # every seat has had the events up to the floor (those seated since were owed none)
        del self._log[:self._pass_floor - self._base]
        self._base = self._pass_floor
        metrics.FLUSH_SECONDS.observe(time.monotonic() - self._pass_started)
        if (self._log and self.seats) or self._own:
            self._wake()  # what arrived during the pass, for the seats written before it came

    def add(self, seat: Seat) -> None:
        """Seat someone who was just sent the history: the events logged so far are in it (or
        happened before they came), so they are owed only what comes next."""
        seat.cursor = self._base + len(self._log)
        self.seats[seat] = None
        metrics.SOCKETS.inc()
        if seat.user is not None:
            self.own_seats.setdefault(seat.user, set()).add(seat)

    def remove(self, seat: Seat) -> bool:
        """Take ``seat`` out; False if it was not here (already dropped)."""
        if seat not in self.seats:
            return False
        del self.seats[seat]
        self._own.pop(seat, None)
        metrics.SOCKETS.dec()
        if seat.user is not None:
            own = self.own_seats.get(seat.user)
            if own is not None:
                own.discard(seat)
                if not own:
                    del self.own_seats[seat.user]
        return True

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._next_chunk is not None:
            self._next_chunk.cancel()
            self._next_chunk = None
        self._pass = ()
        self._log.clear()
        self._own.clear()


class Rooms:
    """The registry of this node's rooms.

    A room is held while it has seats, and ``linger_seconds`` after the last one leaves: still
    subscribed, so its history stays current for the next joiner (a viewer reloading the page
    gets what was said meanwhile). With a shared history (Redis), a room this node opens
    starts from the history every node appends to.
    """

    def __init__(self, settings: ChatSettings, node: str, subscribe: Subscribe,
                 shared: SharedHistory | None = None) -> None:
        self.settings = settings
        self.node = node
        self._subscribe = subscribe
        self.shared = shared
        self.writer = Writer(settings.fanout_threads or min(4, os.cpu_count() or 1),
                             settings.fanout_threshold)
        self.rooms: dict[str, Room] = {}
        #: moderation outlives a room's sockets on this node (a ban should stick)
        self.moderation: dict[str, Moderation] = {}
        self._seq = itertools.count(1)

    def moderation_for(self, channel: str) -> Moderation:
        found = self.moderation.get(channel)
        if found is None:
            found = self.moderation[channel] = Moderation(self.settings)
        return found

    def _room(self, channel: str) -> Room:
        """The room, created and subscribed if this node does not hold it (seatless: it
        lingers until someone joins)."""
        room = self.rooms.get(channel)
        if room is None:
            room = self.rooms[channel] = Room(channel, self.settings, self.moderation_for(channel),
                                              self.writer)
            room.unsubscribe = self._subscribe(topic(channel), room.on_bus)
            metrics.ROOMS.inc()
            self._linger(room)
        return room

    async def open(self, channel: str) -> Room:
        """The room, with the shared history loaded when this node opens it. Subscribed before
        loading: what arrives meanwhile is merged, so nothing falls between the two."""
        room = self._room(channel)
        if room.loading is not None:
            await asyncio.shield(room.loading)
        elif self.shared is not None and not room.history.loaded:
            room.loading = asyncio.get_running_loop().create_future()
            try:
                room.history.merge(await self.shared.recent(channel))
            finally:
                room.history.loaded = True
                room.loading.set_result(None)
                room.loading = None
                if not room.seats:  # nobody joined (the caller went away): linger again
                    self._linger(room)
        return room

    def join(self, channel: str, seat: Seat, since: str | None = None) -> Room:
        """Seat ``seat`` and send its history first, in one step (no await): nothing
        delivered in between can be missed or repeated."""
        room = self._room(channel)
        if room.forget_timer is not None:
            room.forget_timer.cancel()
            room.forget_timer = None
        seat.send(_encode({"type": "history", "events": room.history.since(since)}))
        room.add(seat)  # what the room logged so far is in that history: not sent to it again
        return room

    def leave(self, room: Room, seat: Seat) -> None:
        """Idempotent: a seat the room dropped as slow has left already (and is counted)."""
        room.remove(seat)
        if not room.seats and self.rooms.get(room.channel) is room:
            if self.settings.linger_seconds <= 0:
                self._forget(room)
            else:
                self._linger(room)

    def close(self) -> None:
        for room in self.rooms.values():
            room.close()
        self.writer.close()

    def said(self, channel: str, event: dict[str, Any]) -> None:
        """A chat message this node accepted: into the shared history (the bus delivers it)."""
        if self.shared is not None:
            self.shared.append(channel, event)

    def _linger(self, room: Room) -> None:
        if room.forget_timer is None:
            room.forget_timer = asyncio.get_running_loop().call_later(
                self.settings.linger_seconds, self._forget, room)

    def _forget(self, room: Room) -> None:
        if room.forget_timer is not None:
            room.forget_timer.cancel()
            room.forget_timer = None
        if room.seats or room.loading is not None or self.rooms.get(room.channel) is not room:
            return
        del self.rooms[room.channel]
        metrics.ROOMS.dec()
        room.close()
        if room.unsubscribe is not None:
            room.unsubscribe()

    def new_id(self) -> str:
        """Sortable by time: ``<ms>-<node>-<seq>``, zero-padded so string order is time order."""
        return f"{int(time.time() * 1000):013d}-{self.node}-{next(self._seq):08d}"

    def chat_event(self, user: str, text: str) -> dict[str, Any]:
        return {"type": "chat", "id": self.new_id(), "user": user, "text": text, "ts": time.time()}
