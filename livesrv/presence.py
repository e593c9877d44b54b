"""Presence: how many viewers each room has, on this node and across the cluster.

Each node counts its own viewers synchronously (``add`` is called on every socket open and
close, so it must be cheap and must not touch the network). ``RedisPresence`` publishes this
node's counts to Redis from a heartbeat task: one hash per channel, ``{node_id: "incarnation:count"}``,
plus one liveness key per node with a TTL. A field only counts while its node's liveness key
holds the same incarnation, so a node that dies (or restarts under the same id) drops out within
``ttl`` without anyone having to clean up after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from abc import ABC, abstractmethod

from prometheus_client import Gauge

log = logging.getLogger(__name__)

PRESENCE_HEALTHY = Gauge("livesrv_presence_healthy", "1 while presence can reach Redis (or is local)")

#: how long a cross-node count may be reused before asking Redis again
COUNT_CACHE_SECONDS = 1.0


#: the most any one step of close() may take (a goodbye to Redis is worth a try, not a hang)
CLOSE_STEP_SECONDS = 2.0


def channel_key(channel: str) -> str:
    return f"presence:room:{channel}"


def node_key(node_id: str) -> str:
    return f"presence:node:{node_id}"


class Presence(ABC):
    def __init__(self) -> None:
        self._local: dict[str, int] = {}

    def add(self, channel: str, delta: int) -> None:
        """This node's viewers of ``channel`` changed by ``delta`` (sync, no I/O)."""
        count = max(0, self._local.get(channel, 0) + delta)
        if count:
            self._local[channel] = count
        else:
            self._local.pop(channel, None)
        self._changed(channel)

    def local(self, channel: str) -> int:
        return self._local.get(channel, 0)

    @abstractmethod
    async def count(self, channel: str) -> int:
        """Viewers of ``channel`` across all nodes (may be up to ~1 s old)."""

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    @property
    def healthy(self) -> bool:
        return True

    def _changed(self, channel: str) -> None:
        """Hook: ``channel``'s local count changed."""


class LocalPresence(Presence):
    """One node: the local count is the whole count."""

    async def count(self, channel: str) -> int:
        return self.local(channel)


class RedisPresence(Presence):
    def __init__(self, url: str, node_id: str, ttl: float = 15) -> None:
        super().__init__()
        self.url = url
        self.node_id = node_id
        self.ttl = ttl
        # a fresh token per process: fields written by an earlier life of this node id are ignored
        self.incarnation = uuid.uuid4().hex[:12]
        self._redis = None  # redis.asyncio.Redis, created in start()
        self._dirty: set[str] = set()
        self._published: set[str] = set()  # channels with a field of ours in Redis
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._healthy = False
        self._cache: dict[str, tuple[float, int]] = {}  # channel -> (monotonic time, others' sum)

    @property
    def healthy(self) -> bool:
        return self._healthy

    @property
    def interval(self) -> float:
        # three heartbeats per ttl: one lost beat does not make the node vanish
        return self.ttl / 3

    async def start(self) -> None:
        from redis.asyncio import Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        # no hidden retries: a failed beat is reported, and the next beat is the retry
        timeout = max(0.5, min(2.0, self.interval))
        self._redis = Redis.from_url(self.url, socket_timeout=timeout, socket_connect_timeout=timeout,
                                     retry=Retry(NoBackoff(), 0))
        await self._beat()  # first beat inline, so counts are visible as soon as start returns
        self._task = asyncio.create_task(self._run(), name=f"presence-{self.node_id}")

    async def close(self) -> None:
        # Every step is bounded in time: a heartbeat cancelled in the middle of a pipeline can
        # leave redis-py waiting on a reply that never comes, and shutdown must not hang on it.
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                async with asyncio.timeout(CLOSE_STEP_SECONDS):
                    await self._task
            self._task = None
        if self._redis is not None:
            # leave at once rather than after ttl: a clean shutdown should not inflate counts
            with contextlib.suppress(Exception):
                async with asyncio.timeout(CLOSE_STEP_SECONDS):
                    await self._redis.delete(node_key(self.node_id))
            with contextlib.suppress(Exception):
                async with asyncio.timeout(CLOSE_STEP_SECONDS):
                    await self._redis.aclose()
            self._redis = None
        PRESENCE_HEALTHY.set(0)

    def _changed(self, channel: str) -> None:
        self._dirty.add(channel)
        self._wake.set()

    async def _run(self) -> None:
        deadline = time.monotonic() + self.interval
        while True:
            # wake early when counts change, so other nodes see joins within a round trip
            # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancel (close would hang)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    await self._wake.wait()
            full = time.monotonic() >= deadline
            await self._beat(full=full)
            if not self._healthy:
                await asyncio.sleep(min(self.interval, 1.0))  # don't spin on every join while down
            if full:
                deadline = time.monotonic() + self.interval

    async def _beat(self, full: bool = True) -> None:
        """Write changed counts; on a full beat also refresh liveness and every count we hold."""
        assert self._redis is not None
        self._wake.clear()
        # after an outage our liveness key may have expired: refresh everything, not just changes
        full = full or not self._healthy
        dirty, self._dirty = self._dirty, set()
        channels = (set(self._local) | self._published | dirty) if full else dirty
        ttl_ms = int(self.ttl * 1000)
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                if full:
                    pipe.set(node_key(self.node_id), self.incarnation, px=ttl_ms)
                for channel in channels:
                    count = self._local.get(channel, 0)
                    if count:
                        pipe.hset(channel_key(channel), self.node_id, f"{self.incarnation}:{count}")
                        # the hash itself goes away once no live node refreshes it
                        pipe.pexpire(channel_key(channel), ttl_ms)
                    else:
                        pipe.hdel(channel_key(channel), self.node_id)
                await pipe.execute()
        except Exception as exc:
            # write everything again next time: Redis may have lost it (restart, failover)
            self._dirty |= channels | set(self._local)
            self._set_healthy(False, exc)
            return
        for channel in channels:
            if self._local.get(channel):
                self._published.add(channel)
            else:
                self._published.discard(channel)
        self._set_healthy(True)

    def _set_healthy(self, healthy: bool, exc: BaseException | None = None) -> None:
        if healthy != self._healthy:
            if healthy:
                log.info("presence: Redis reachable (%s)", self.node_id)
            else:
                log.warning("presence: Redis unreachable, counting this node only: %s", exc)
        self._healthy = healthy
        PRESENCE_HEALTHY.set(1 if healthy else 0)

    async def count(self, channel: str) -> int:
        """Our own count is always fresh; the other nodes' sum comes from Redis at most once a second."""
        now = time.monotonic()
        cached = self._cache.get(channel)
        if cached is not None and now - cached[0] < COUNT_CACHE_SECONDS:
            return self.local(channel) + cached[1]
        others = cached[1] if cached is not None else 0
        if self._redis is not None:
            try:
                others = await self._others(channel)
            except Exception as exc:
                self._set_healthy(False, exc)  # keep the last known sum while Redis is away
        self._cache[channel] = (now, others)
        if len(self._cache) > 10_000:  # bounded: rooms come and go
            self._cache.clear()
        return self.local(channel) + others

    async def _others(self, channel: str) -> int:
        assert self._redis is not None
        fields: dict[bytes, bytes] = await self._redis.hgetall(channel_key(channel))
        fields.pop(self.node_id.encode(), None)
        if not fields:
            return 0
        nodes = list(fields)
        alive = await self._redis.mget([node_key(n.decode()) for n in nodes])
        total = 0
        stale: list[bytes] = []
        for node, incarnation in zip(nodes, alive, strict=True):
            token, _, count = fields[node].partition(b":")
            if incarnation is not None and incarnation == token:
                total += int(count)
            else:
                stale.append(node)
        if stale:
            # a dead node's fields would otherwise live as long as the room; if the node is in fact
            # alive (it lost its key in an outage), its next full beat writes them again
            await self._redis.hdel(channel_key(channel), *stale)
        return total


def open_presence(redis_url: str | None, node_id: str) -> Presence:
    if redis_url:
        return RedisPresence(redis_url, node_id)
    return LocalPresence()
