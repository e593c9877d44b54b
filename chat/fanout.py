"""A room's outbound side: the sockets of a chunk get the very same frame bytes.

The room (``chat/room.py``) joins the events a chunk of its sockets is owed into one frame (a
single event, or ``{"type":"batch","events":[...]}``), builds the WebSocket frame once and
writes that ``bytes`` object to every transport of the chunk. Per viewer and per frame the work
is one buffer-size check and one ``transport.write``: no per-socket queue, task, copy or
encoding.

The room never waits for a socket. A transport whose write buffer (what the kernel would not
take yet) is past ``send_buffer`` bytes is a slow viewer: it is aborted, and the room moves on.

Almost all of the time is the kernel's: one ``write(2)`` per socket (~8 µs on loopback, where
the receiving side's TCP work is done in the sender's call). :class:`Writer` can spread a
chunk's writes over threads (``[chat] fanout_threads``): ``os.write`` releases the GIL, so the
kernel work runs on several cores while the event loop waits for the chunk. On two cores shared
with other work it did not help (docs/BENCHMARKS.md), so by default the loop's thread writes.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

from . import metrics
from .wsframe import text_frame

log = logging.getLogger(__name__)


class Seat:
    """One socket's place in a room: where its frames go, and whose socket it is."""

    __slots__ = ("cursor", "dropped", "fd", "transport", "user")

    def __init__(self, transport: asyncio.WriteTransport, user: str | None = None) -> None:
        self.transport = transport
        self.user = user  # the logged-in username, for delivering their own sampled-out chat
        self.dropped = False
        self.cursor = 0  # the number of the next room event this socket is owed (chat/room.py)
        #: the socket's descriptor, for direct writes while the transport holds nothing back;
        #: -1 where bytes must go through the transport (TLS, or no socket)
        self.fd = _plain_fd(transport)

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


def _plain_fd(transport: asyncio.BaseTransport) -> int:
    if transport.get_extra_info("sslcontext") is not None:
        return -1  # the socket carries TLS records, not our bytes
    sock = transport.get_extra_info("socket")
    try:
        return sock.fileno() if sock is not None else -1
    except (AttributeError, OSError):
        return -1


def _write_fds(fds: Sequence[int], frame: bytes) -> list[tuple[int, int]]:
    """``os.write`` the frame to each descriptor (GIL released in each call); the writes that
    did not take it all, as (index, bytes written, -1 for an error)."""
    write = os.write
    size = len(frame)
    short: list[tuple[int, int]] = []
    for index, fd in enumerate(fds):
        try:
            written = write(fd, frame)
        except BlockingIOError:
            written = 0
        except OSError:  # reset, broken pipe: the transport learns it on its own
            written = -1
        if written != size:
            short.append((index, written))
    return short


class Writer:
    """Writes one frame to many seats; to ``threshold`` seats or more, on ``threads`` threads
    (the calling one included). The room calls it once per frame: for the seats of a chunk
    that share a cursor, which is nearly all of the chunk."""

    def __init__(self, threads: int, threshold: int) -> None:
        self.threads = max(1, threads)
        self.threshold = threshold
        self._pool = (ThreadPoolExecutor(self.threads - 1, thread_name_prefix="room-fanout")
                      if self.threads > 1 else None)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def write_all(self, seats: Sequence[Seat], frame: bytes, send_buffer: int) -> list[Seat]:
        """As :func:`write_all`; the seats found too slow (not written)."""
        if self._pool is None or len(seats) < self.threshold:
            return write_all(seats, frame, send_buffer)
        slow: list[Seat] = []
        direct: list[Seat] = []
        for seat in seats:
            transport = seat.transport
            held = transport.get_write_buffer_size()
            if held > send_buffer:
                slow.append(seat)
            elif transport.is_closing():
                continue
            elif held or seat.fd < 0:
                transport.write(frame)  # behind what the transport holds: keep the order
            else:
                direct.append(seat)
        if not direct:
            return slow
        # Direct writes while the transport holds nothing: the kernel gets the bytes in order,
        # and nothing else writes to these sockets meanwhile (this thread waits below).
        step = -(-len(direct) // self.threads)
        parts = [direct[i:i + step] for i in range(0, len(direct), step)]
        futures = [self._pool.submit(_write_fds, [seat.fd for seat in part], frame)
                   for part in parts[1:]]
        shorts = [_write_fds([seat.fd for seat in parts[0]], frame)]
        shorts += [future.result() for future in futures]
        rest = memoryview(frame)
        for part, short in zip(parts, shorts, strict=True):
            for index, written in short:
                if written >= 0:  # the kernel took part of it: the transport sends the rest
                    part[index].transport.write(rest[written:])
        return slow
