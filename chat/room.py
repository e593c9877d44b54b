"""Rooms on this node: each subscribes to its bus topic while it has sockets, keeps history,
applies moderation and fans events out (encoded once per room into one frame, written to every
socket; see ``chat/fanout.py``)."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
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


#: after a frame that took T to write, the next waits at least _PACE * T: a node too busy for
#: its rooms sends fewer, fuller frames rather than competing with itself. Measured at 10k
#: viewers and 1,000 msg/s on two cores (bench/rooms_fanout.py): 0 (frames back to back) was
#: the best p99 on one node but doubled it on two nodes sharing the cores; 1 (the rule before
#: frames were chunked) was worst on one node; 0.5 held both near their best.
_PACE = 0.5


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


@dataclass(eq=False, slots=True)
class _Flight:
    """A frame on its way to a room's seats: those of ``seats`` before ``written`` have it."""

    seats: Sequence[Seat]
    frame: bytes
    events: int
    started: float
    written: int = 0


class Room:
    """One room on this node: its seats, history, sampler and the pending frame."""

    def __init__(self, channel: str, settings: ChatSettings, moderation: Moderation,
                 writer: Writer | None = None) -> None:
        self.channel = channel
        self.settings = settings
        self.writer = writer
        self.moderation = moderation
        self.history = History(settings.history)
        #: insertion-ordered, O(1) removal; iterated once per flush
        self.seats: dict[Seat, None] = {}
        #: a logged-in user's own seats: their chat is shown to them even when sampled out
        self.own_seats: dict[str, set[Seat]] = {}
        self.meter = RateMeter()
        self.shed = 0
        self._credit = 0.0  # the sampler's accumulator: keeps limit/rate of the chat events
        self._pending: list[str] = []  # encoded events waiting for the next flush
        #: authors' own copies of their shed messages: (index into _pending, text)
        self._own: dict[Seat, list[tuple[int, str]]] = {}
        #: newcomers since the last flush: how many pending events their history covered
        self._skip: dict[Seat, int] = {}
        self._flush_timer: asyncio.TimerHandle | None = None
        self._next_flush = 0.0  # the monotonic time from which the next frame may go
        self._in_flight: _Flight | None = None  # the frame being written, chunk by chunk
        self._next_chunk: asyncio.Handle | None = None
        self.last_viewers: int | None = None
        self.unsubscribe: Callable[[], None] | None = None
        #: set while the shared history is being loaded: joiners wait for it
        self.loading: asyncio.Future[None] | None = None
        #: set while the room has no seats: it is forgotten when this fires
        self.forget_timer: asyncio.TimerHandle | None = None

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

        It goes into the author's own copy of the next frame, at its place among the room's
        events (ids stay in order: a resume relies on them), instead of costing a flush."""
        seats = self.own_seats.get(event.get("user", ""))
        if not seats:
            return
        entry = (len(self._pending), _encode(event))
        for seat in seats:
            self._own.setdefault(seat, []).append(entry)
        self._schedule()

    def deliver(self, event: dict[str, Any]) -> None:
        """Encode once, into the next frame."""
        self._pending.append(_encode(event))
        self._schedule()

    def _schedule(self) -> None:
        """At most one frame per ``batch_interval``: an event in a quiet room goes out at once;
        in a busy room the events of the interval share the next frame. (Batching is decided
        by time, not by a measured rate: a flush to many sockets takes long enough that a rate
        measured on flushed events would never look busy.) While a frame is still being
        written, the next one waits for it: the last chunk schedules it."""
        if self._flush_timer is not None or self._in_flight is not None:
            return
        wait = self._next_flush - time.monotonic()
        if wait <= 0:
            self.flush()
        else:
            self._flush_timer = asyncio.get_running_loop().call_later(wait, self.flush)

    def flush(self) -> None:
        """The pending events as one frame, built once, written to every seat.

        A big room's frame is written ``flush_chunk`` seats at a time, each chunk in its own
        turn of the event loop: between chunks the loop reads chat, serves other rooms and
        answers requests, instead of standing still for the whole frame (~120 ms for 10,000
        sockets on two cores). Nothing else writes to a seat while its chunk is written (the
        loop waits for the chunk's threads), so every frame reaches each socket whole and in
        order."""
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        if self._in_flight is not None:
            return  # the frame being written schedules the next one when it is done
        if not self._pending and not self._own:
            self._skip.clear()
            return
        started = time.monotonic()
        self._next_flush = started + self.settings.batch_interval
        events, self._pending = self._pending, []
        own, self._own = self._own, {}
        skip, self._skip = self._skip, {}
        seats: tuple[Seat, ...] | list[Seat] = tuple(self.seats)  # a drop below changes seats
        if own or skip:  # the few seats with a frame of their own (below) are left out here
            seats = [seat for seat in seats if seat not in own and seat not in skip]
        for seat in own.keys() | skip.keys():
            if seat not in self.seats:
                continue
            first = skip.get(seat, 0)
            merged = events[first:]
            for index, text in reversed(own.get(seat, ())):  # from the back: indexes stay valid
                merged.insert(index - first, text)
            if merged:
                seat.send(batch_text(merged))
                metrics.FRAMES_OUT.inc()
                metrics.MESSAGES_OUT.inc(len(merged))
        if not events:
            return
        frame = text_frame(batch_text(events).encode())
        self._in_flight = _Flight(seats, frame, len(events), started)
        self._write_chunk()

    def _write_chunk(self) -> None:
        flight = self._in_flight
        if flight is None:  # the room was closed meanwhile
            return
        chunk = flight.seats[flight.written:flight.written + self.settings.flush_chunk]
        flight.written += len(chunk)
        if self.writer is not None:
            slow = self.writer.write_all(chunk, flight.frame, self.settings.send_buffer)
        else:
            slow = write_all(chunk, flight.frame, self.settings.send_buffer)
        for seat in slow:
            seat.drop(f"{seat.transport.get_write_buffer_size()} bytes unsent")
            self.remove(seat)
        reached = len(chunk) - len(slow)
        metrics.FRAMES_OUT.inc(reached)
        metrics.BYTES_OUT.inc(reached * len(flight.frame))
        metrics.MESSAGES_OUT.inc(reached * flight.events)
        if flight.written < len(flight.seats):
            self._next_chunk = asyncio.get_running_loop().call_soon(self._write_chunk)
            return
        self._next_chunk = None
        self._in_flight = None
        ended = time.monotonic()
        metrics.FLUSH_SECONDS.observe(ended - flight.started)
        self._next_flush = max(self._next_flush, ended + _PACE * (ended - flight.started))
        if self._pending or self._own:
            self._schedule()

    def seat_newcomer(self, seat: Seat) -> None:
        """Seat someone who was just sent the history: the events pending now are in it (or
        happened before they came), so their first frame starts after them."""
        if self._pending:
            self._skip[seat] = len(self._pending)
        self.add(seat)

    def add(self, seat: Seat) -> None:
        self.seats[seat] = None
        metrics.SOCKETS.inc()
        if seat.user is not None:
            self.own_seats.setdefault(seat.user, set()).add(seat)

    def remove(self, seat: Seat) -> bool:
        """Take ``seat`` out; False if it was not here (already dropped)."""
        if seat not in self.seats:
            return False
        del self.seats[seat]
        metrics.SOCKETS.dec()
        if seat.user is not None:
            own = self.own_seats.get(seat.user)
            if own is not None:
                own.discard(seat)
                if not own:
                    del self.own_seats[seat.user]
        return True

    def close(self) -> None:
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        if self._next_chunk is not None:
            self._next_chunk.cancel()
            self._next_chunk = None
        self._in_flight = None
        self._pending.clear()
        self._own.clear()
        self._skip.clear()


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
        room.seat_newcomer(seat)  # the pending chat is in that history: not sent to it again
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
