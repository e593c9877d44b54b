"""A room's outbound side: every socket gets the very same frame bytes, written in one pass.

The room collects encoded events and, once per flush, joins them into one frame (a single event,
or ``{"type":"batch","events":[...]}``), builds the WebSocket frame once and writes that ``bytes``
object to every viewer's transport. Per viewer and per flush the work is one buffer-size check
and one ``transport.write``: no per-socket queue, task, copy or encoding.

The room never waits for a socket. A transport whose write buffer (what the kernel would not
take yet) is past ``send_buffer`` bytes is a slow viewer: it is aborted, and the room moves on.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

from . import metrics
from .wsframe import text_frame

log = logging.getLogger(__name__)


class Seat:
    """One socket's place in a room: where its frames go, and whose socket it is."""

    __slots__ = ("dropped", "transport", "user")

    def __init__(self, transport: asyncio.WriteTransport, user: str | None = None) -> None:
        self.transport = transport
        self.user = user  # the logged-in username, for delivering their own sampled-out chat
        self.dropped = False

    def send(self, text: str) -> None:
        """One frame to this socket alone, now (history, an error, the first viewer count)."""
        if not self.dropped and not self.transport.is_closing():
            self.transport.write(text_frame(text.encode()))

    def drop(self, reason: str) -> None:
        """Close the connection without a goodbye: a slow reader would not read one either."""
        if self.dropped:
            return
        self.dropped = True
        metrics.DROPPED_SOCKETS.inc()
        log.info("dropping a room socket: %s", reason)
        self.transport.abort()


def batch_text(events: list[str]) -> str:
    """One frame's JSON for already-encoded events: joined, never re-encoded."""
    if len(events) == 1:
        return events[0]
    return '{"type":"batch","events":[' + ",".join(events) + "]}"


def write_all(seats: Iterable[Seat], frame: bytes, send_buffer: int) -> list[Seat]:
    """Write ``frame`` to every seat's transport; the seats found too slow (not written).

    This is the per-viewer hot loop: keep it to a size check and a write.
    """
    slow: list[Seat] = []
    for seat in seats:
        transport = seat.transport
        if transport.get_write_buffer_size() > send_buffer:
            slow.append(seat)
        elif not transport.is_closing():
            transport.write(frame)
    return slow
