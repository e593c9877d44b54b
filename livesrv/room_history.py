"""The last chat events of each room, shared by every node through Redis.

A node holds a room's history in memory only while it holds the room; a viewer who joins a
room on a node that did not hold it would get no history, and one who reconnects to another
node could not resume. So the node that accepts a chat message also appends it to a capped
Redis list per room, and a node opening a room loads that list first (chat.room.Rooms.open).

Appends never hold up chat: they go through a bounded queue to one writer task that pipelines
them; with Redis away they are dropped and counted (local rooms keep working, and the bus
reports the outage).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

from prometheus_client import Counter
from redis.asyncio import Redis

log = logging.getLogger(__name__)

DROPPED = Counter("livesrv_chat_history_dropped_total",
                  "Chat events not added to the shared room history (Redis away, queue full)")
LOAD_ERRORS = Counter("livesrv_chat_history_load_errors_total",
                      "Rooms opened without the shared history (Redis away)")

#: a room nobody speaks in for a day loses its history
KEY_TTL_SECONDS = 86_400
WRITE_BATCH = 256
TIMEOUT = 2.0


def history_key(channel: str) -> str:
    return f"chat:history:{channel}"


class RedisRoomHistory:
    def __init__(self, url: str, size: int, *, queue: int = 10_000) -> None:
        self.size = size
        self._redis = Redis.from_url(url, socket_timeout=TIMEOUT, socket_connect_timeout=TIMEOUT)
        self._queue: asyncio.Queue[tuple[str, str]] = asyncio.Queue(queue)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._write(), name="chat-history")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                async with asyncio.timeout(TIMEOUT):
                    await self._task
            self._task = None
        with contextlib.suppress(Exception):
            async with asyncio.timeout(TIMEOUT):
                await self._redis.aclose()

    def append(self, channel: str, event: dict[str, Any]) -> None:
        """Queue ``event`` for the room's shared history (sync, never waits)."""
        try:
            self._queue.put_nowait((channel, json.dumps(event, separators=(",", ":"), ensure_ascii=False)))
        except asyncio.QueueFull:
            DROPPED.inc()

    async def recent(self, channel: str) -> list[dict[str, Any]]:
        """The room's last ``size`` events, oldest first; [] when Redis cannot say."""
        try:
            async with asyncio.timeout(TIMEOUT):
                raw = await self._redis.lrange(history_key(channel), -self.size, -1)
        except Exception as exc:  # Redis away: the room opens with what this node has
            LOAD_ERRORS.inc()
            log.warning("room %s opened without its shared history: %s", channel, exc)
            return []
        events = []
        for item in raw:
            with contextlib.suppress(ValueError):
                events.append(json.loads(item))
        return events

    async def _write(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < WRITE_BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                grouped: dict[str, list[str]] = {}
                for channel, text in batch:
                    grouped.setdefault(channel, []).append(text)
                async with asyncio.timeout(TIMEOUT), self._redis.pipeline(transaction=False) as pipe:
                    for channel, texts in grouped.items():
                        key = history_key(channel)
                        pipe.rpush(key, *texts)
                        pipe.ltrim(key, -self.size, -1)
                        pipe.expire(key, KEY_TTL_SECONDS)
                    await pipe.execute()
            except Exception as exc:
                DROPPED.inc(len(batch))
                log.debug("shared room history: %d events dropped: %s", len(batch), exc)
