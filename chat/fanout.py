"""One socket's outbound side: a bounded queue of already-encoded events and a sender task.

The room never waits for a socket: it appends to the queue and moves on. A socket whose queue
is full is dropped (``abort``), so one slow viewer costs the room nothing. When the room is
busy, the sender waits ``batch_interval`` and sends everything queued as one ``batch`` frame,
built by joining the encoded events (no re-encoding).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable

from . import metrics

log = logging.getLogger(__name__)


class Outbox:
    def __init__(self, send: Callable[[str], Awaitable[None]], abort: Callable[[], None], *,
                 limit: int, batch_interval: float, busy: Callable[[], bool]) -> None:
        self._send = send
        self._abort = abort
        self._limit = limit
        self._batch_interval = batch_interval
        self._busy = busy
        #: (text, standalone): standalone frames (history) are never put inside a batch
        self._queue: deque[tuple[str, bool]] = deque()
        self._wake = asyncio.Event()
        self.dropped = False
        self.closed = False

    def push(self, text: str, *, standalone: bool = False) -> bool:
        if self.dropped or self.closed:
            return False
        if len(self._queue) >= self._limit:
            self.dropped = True
            metrics.DROPPED_SOCKETS.inc()
            log.info("dropping a slow room socket (%d events queued)", len(self._queue))
            self._queue.clear()
            self._wake.set()
            self._abort()
            return False
        self._queue.append((text, standalone))
        self._wake.set()
        return True

    def close(self) -> None:
        self.closed = True
        self._wake.set()

    async def run(self) -> None:
        """Send until closed or dropped; errors of a dead connection end it quietly."""
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                if self.dropped or self.closed:
                    return
                if self._busy() and self._queue:
                    await asyncio.sleep(self._batch_interval)
                while self._queue and not self.dropped:
                    await self._send(self._next_frame())
        except (ConnectionError, RuntimeError, asyncio.CancelledError):
            return

    def _next_frame(self) -> str:
        text, standalone = self._queue.popleft()
        if standalone or not self._queue or self._queue[0][1]:
            return text
        events = [text]
        while self._queue and not self._queue[0][1]:
            events.append(self._queue.popleft()[0])
        return '{"type":"batch","events":[' + ",".join(events) + "]}"
