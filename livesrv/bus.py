"""The event bus: publish to a topic, subscribe to topics; in-process or across nodes.

Messages are dicts, encoded once with msgpack and stamped with the sending node and a
per-node sequence id, so a receiver can drop its own echoes and measure lag. Delivery is at
most once (Redis pub/sub semantics): anything a client must not miss is re-readable from the
store (chat history, wallet records); the bus only notifies.

Topics used by the house: ``room:{channel}`` (chat, gifts, viewer counts of one room).
"""

from __future__ import annotations

import itertools
import logging
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class BusMessage:
    topic: str
    node: str  # the node that published it
    id: int  # per-node sequence number
    ts: float  # wall-clock time of publishing, for lag metrics
    data: dict[str, Any]
    #: the msgpack encoding as it travelled, so relays never re-encode
    raw: bytes


Handler = Callable[[BusMessage], None]


def encode(topic: str, node: str, seq: int, data: dict[str, Any]) -> bytes:
    return msgpack.packb([node, seq, time.time(), data], use_bin_type=True)


def decode(topic: str, raw: bytes) -> BusMessage:
    node, seq, ts, data = msgpack.unpackb(raw, raw=False)
    return BusMessage(topic=topic, node=node, id=seq, ts=ts, data=data, raw=raw)


class Bus(ABC):
    """Handlers run on the event loop and must not block: hand work to a queue if needed."""

    def __init__(self, node_id: str | None = None) -> None:
        self.node_id = node_id or uuid.uuid4().hex[:12]
        self._seq = itertools.count(1)
        self._handlers: dict[str, set[Handler]] = {}

    @abstractmethod
    async def start(self) -> None: ...

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    async def publish(self, topic: str, data: dict[str, Any]) -> BusMessage:
        """Send ``data`` to every subscriber of ``topic`` on every node (this one included)."""

    @property
    def healthy(self) -> bool:
        """False while the bus cannot reach other nodes (local delivery still works)."""
        return True

    async def flush(self, within: float = 5.0) -> bool:
        """Wait until the subscriptions made so far receive other nodes' messages (a room that
        subscribes, then flushes, then reads history misses nothing in between). True when done;
        in-process subscriptions take effect at once."""
        return True

    def subscribe(self, topic: str, handler: Handler) -> Callable[[], None]:
        """Call ``handler`` for each message on ``topic``; returns the unsubscribe function."""
        first = topic not in self._handlers
        self._handlers.setdefault(topic, set()).add(handler)
        if first:
            self._topic_added(topic)

        def unsubscribe() -> None:
            handlers = self._handlers.get(topic)
            if handlers is None:
                return
            handlers.discard(handler)
            if not handlers:
                del self._handlers[topic]
                self._topic_removed(topic)

        return unsubscribe

    def _topic_added(self, topic: str) -> None:
        """A node-wide subscription is needed for ``topic`` (Redis: SUBSCRIBE)."""

    def _topic_removed(self, topic: str) -> None:
        """No local handler is left for ``topic`` (Redis: UNSUBSCRIBE)."""

    def _next_message(self, topic: str, data: dict[str, Any]) -> BusMessage:
        seq = next(self._seq)
        raw = encode(topic, self.node_id, seq, data)
        return BusMessage(topic=topic, node=self.node_id, id=seq, ts=time.time(), data=data, raw=raw)

    def _dispatch(self, message: BusMessage) -> None:
        for handler in tuple(self._handlers.get(message.topic, ())):
            try:
                handler(message)
            except Exception:
                log.exception("bus handler for %s failed", message.topic)


class InProcessBus(Bus):
    """The embedded default: one process, delivery is a function call."""

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        self._handlers.clear()

    async def publish(self, topic: str, data: dict[str, Any]) -> BusMessage:
        message = self._next_message(topic, data)
        self._dispatch(message)
        return message
