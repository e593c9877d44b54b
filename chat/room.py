"""Rooms on this node: each subscribes to its bus topic while it has sockets, keeps history,
applies moderation and fans events out (encoded once per room, then queued per socket)."""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable
from typing import Any

from . import metrics
from .fanout import Outbox
from .history import History
from .moderation import Moderation
from .settings import ChatSettings

Subscribe = Callable[[str, Callable[[dict[str, Any]], None]], Callable[[], None]]


def topic(channel: str) -> str:
    return f"room:{channel}"


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
    def __init__(self, channel: str, settings: ChatSettings, moderation: Moderation) -> None:
        self.channel = channel
        self.settings = settings
        self.moderation = moderation
        self.history = History(settings.history)
        self.outboxes: set[Outbox] = set()
        self.meter = RateMeter()
        self.shed = 0
        self._credit = 0.0  # the sampler's accumulator: keeps limit/rate of the chat events
        self.last_viewers: int | None = None
        self.unsubscribe: Callable[[], None] | None = None

    @property
    def busy(self) -> bool:
        return self.meter.rate >= self.settings.busy_rate

    def on_bus(self, data: dict[str, Any]) -> None:
        kind = data.get("type")
        if kind == "moderation":  # internal: applied on every node, never shown to viewers
            self.moderation.apply(data)
            return
        if kind == "chat":
            self.history.append(data)  # history is complete even when delivery is sampled
            if self._sampled_out():
                self.shed += 1
                metrics.SHED.inc()
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

    def deliver(self, event: dict[str, Any]) -> None:
        """Encode once, queue the same string to every socket."""
        if event.get("type") != "chat":
            self.meter.tick()
        text = json.dumps(event, separators=(",", ":"), ensure_ascii=False)
        for outbox in tuple(self.outboxes):
            if outbox.push(text):
                metrics.MESSAGES_OUT.inc()


class Rooms:
    """The registry of this node's rooms."""

    def __init__(self, settings: ChatSettings, node: str, subscribe: Subscribe) -> None:
        self.settings = settings
        self.node = node
        self._subscribe = subscribe
        self.rooms: dict[str, Room] = {}
        #: moderation outlives a room's sockets on this node (a ban should stick)
        self.moderation: dict[str, Moderation] = {}
        self._seq = itertools.count(1)

    def moderation_for(self, channel: str) -> Moderation:
        found = self.moderation.get(channel)
        if found is None:
            found = self.moderation[channel] = Moderation(self.settings)
        return found

    def join(self, channel: str, outbox: Outbox, since: str | None = None) -> Room:
        """Attach ``outbox`` and queue its history first, in one step (no await): nothing
        delivered in between can be missed or repeated."""
        room = self.rooms.get(channel)
        if room is None:
            room = self.rooms[channel] = Room(channel, self.settings, self.moderation_for(channel))
            room.unsubscribe = self._subscribe(topic(channel), room.on_bus)
            metrics.ROOMS.inc()
        history = {"type": "history", "events": room.history.since(since)}
        outbox.push(json.dumps(history, separators=(",", ":"), ensure_ascii=False), standalone=True)
        room.outboxes.add(outbox)
        metrics.SOCKETS.inc()
        return room

    def leave(self, room: Room, outbox: Outbox) -> None:
        if outbox not in room.outboxes:
            return
        room.outboxes.discard(outbox)
        metrics.SOCKETS.dec()
        if not room.outboxes and self.rooms.get(room.channel) is room:
            del self.rooms[room.channel]
            metrics.ROOMS.dec()
            if room.unsubscribe is not None:
                room.unsubscribe()

    def new_id(self) -> str:
        """Sortable by time: ``<ms>-<node>-<seq>``, zero-padded so string order is time order."""
        return f"{int(time.time() * 1000):013d}-{self.node}-{next(self._seq):08d}"

    def chat_event(self, user: str, text: str) -> dict[str, Any]:
        return {"type": "chat", "id": self.new_id(), "user": user, "text": text, "ts": time.time()}
