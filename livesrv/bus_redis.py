"""The bus across nodes: Redis pub/sub, one Redis channel per topic.

Shape of a connection ("session"): one pub/sub connection that a reader task drains, a syncer
task that turns ``_topic_added/_topic_removed`` into batched SUBSCRIBE/UNSUBSCRIBE, and a sender
task that PUBLISHes the already-encoded bytes from a bounded outbox in pipelines. Any error ends
the whole session; the supervisor reconnects with backoff and the new session subscribes to every
topic again, so an outage needs no restart.

Messages from this node are delivered to local handlers inside ``publish`` (no round trip), and
their echo from Redis is recognised by the node id and dropped. While Redis is away, remote
delivery is dropped and counted (the bus is at most once; clients re-read history), local
delivery goes on, and ``publish`` neither raises nor waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from typing import Any

from prometheus_client import Counter, Gauge, Histogram
from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from .bus import Bus, BusMessage, decode

log = logging.getLogger(__name__)

PUBLISHED = Counter("livesrv_bus_published_total", "Bus messages sent to Redis by this node")
RECEIVED = Counter("livesrv_bus_received_total", "Bus messages received from other nodes")
DROPPED = Counter("livesrv_bus_dropped_total",
                  "Bus messages not sent to other nodes (Redis down, outbox full)")
RECONNECTS = Counter("livesrv_bus_reconnects_total", "Bus reconnections to Redis after a failure")
HEALTHY = Gauge("livesrv_bus_healthy", "1 while the bus is connected to Redis")
LAG = Histogram("livesrv_bus_lag_seconds", "From publishing on one node to receipt on another",
                buckets=(.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5))

#: cap on one PUBLISH pipeline: big enough to amortise round trips, small enough to stay fair
SEND_BATCH = 256
BACKOFF_MIN = 0.1
BACKOFF_MAX = 5.0


class RedisBus(Bus):
    def __init__(self, url: str, node_id: str | None = None, *, outbox: int = 10_000,
                 timeout: float = 2.0) -> None:
        super().__init__(node_id)
        self.url = url
        self.timeout = timeout
        #: a channel of our own, always subscribed, so the pub/sub socket is read (and a dead
        #: Redis noticed) even while no room is open on this node
        self.control_topic = f"bus:node:{self.node_id}"
        self._outbox: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue(outbox)
        self._changes = asyncio.Event()  # the wanted topic set changed
        self._progress = asyncio.Event()  # health or confirmed subscriptions changed (for flush)
        self._subscribed: set[str] = set()  # topics SUBSCRIBE was sent for in this session
        self._confirmed: set[str] = set()  # topics Redis confirmed in this session
        self._healthy = False
        self._outage_logged = False
        self._task: asyncio.Task[None] | None = None
        self.dropped = 0

    @property
    def healthy(self) -> bool:
        return self._healthy

    async def start(self) -> None:
        self._task = asyncio.create_task(self._supervise(), name=f"bus-{self.node_id}")
        # give the first connection a moment; if Redis is down we still start (degraded, /readyz
        # says so) and keep retrying in the background
        await self.flush(self.timeout)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            # bounded: a task cancelled inside a redis-py call can wait on a reply that never
            # comes, and shutdown must not hang on it
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                async with asyncio.timeout(2.0):
                    await self._task
            self._task = None
        self._handlers.clear()
        self._set_healthy(False)

    async def publish(self, topic: str, data: dict[str, Any]) -> BusMessage:
        message = self._next_message(topic, data)
        self._dispatch(message)  # this node's handlers at once, not after the echo
        if not self._healthy:
            self._drop(1)
            return message
        try:
            self._outbox.put_nowait((topic, message.raw))
        except asyncio.QueueFull:
            self._drop(1)
        return message

    async def flush(self, within: float = 5.0) -> bool:
        """Wait until every topic subscribed so far is confirmed by Redis, so messages other nodes
        publish from now on arrive here. False if that did not happen within ``within`` seconds."""
        deadline = time.monotonic() + within
        while not (self._healthy and set(self._handlers) <= self._confirmed):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._progress.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):  # not wait_for: it may swallow a cancel on 3.11
                    await self._progress.wait()
        return True

    # subscriptions: recorded at once, sent to Redis by the syncer (several joins, one SUBSCRIBE)

    def _topic_added(self, topic: str) -> None:
        self._changes.set()

    def _topic_removed(self, topic: str) -> None:
        self._changes.set()

    # connection lifecycle

    async def _supervise(self) -> None:
        delay = BACKOFF_MIN
        connected_before = False
        while True:
            try:
                await self._session(reconnect=connected_before)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any failure means: reconnect
                error: BaseException = exc
            else:
                error = ConnectionError("session ended")
            if self._healthy:
                connected_before = True
                delay = BACKOFF_MIN  # it was up: the first retry is quick
            self._set_healthy(False)
            self._discard_outbox()
            if not self._outage_logged:
                self._outage_logged = True
                log.warning("bus %s: Redis at %s unreachable, remote delivery paused (%s); retrying",
                            self.node_id, self.url, _first_error(error))
            # jitter keeps a whole cluster from reconnecting in lockstep after a Redis restart
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, BACKOFF_MAX)

    async def _session(self, reconnect: bool) -> None:
        client = Redis.from_url(self.url, socket_connect_timeout=self.timeout, socket_timeout=self.timeout,
                                health_check_interval=5, retry=Retry(NoBackoff(), 0))
        # the session owns reconnection: redis-py's own retries would resubscribe behind our back
        pubsub = client.pubsub()
        try:
            self._confirmed = set()
            topics = set(self._handlers)
            await pubsub.subscribe(self.control_topic, *topics)
            self._subscribed = topics
            self._changes.set()  # topics may have changed while SUBSCRIBE was in flight
            if reconnect:
                RECONNECTS.inc()
            self._set_healthy(True)
            if self._outage_logged:
                self._outage_logged = False
                log.info("bus %s: Redis at %s reachable again, %d topics resubscribed",
                         self.node_id, self.url, len(topics))
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._read(pubsub))
                tasks.create_task(self._sync(pubsub))
                tasks.create_task(self._send(client))
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()
            with contextlib.suppress(Exception):
                await client.aclose()

    async def _read(self, pubsub: PubSub) -> None:
        while True:
            # a bounded wait, so redis-py's health check PING runs on a quiet connection too
            item = await pubsub.get_message(timeout=1.0)
            if item is None:
                continue
            kind = item["type"]
            channel = item["channel"]
            topic = channel.decode() if isinstance(channel, bytes) else str(channel)
            if kind == "message":
                self._received(topic, item["data"])
            elif kind == "subscribe":
                self._confirmed.add(topic)
                self._progress.set()
            elif kind == "unsubscribe":
                self._confirmed.discard(topic)

    def _received(self, topic: str, raw: bytes) -> None:
        try:
            message = decode(topic, raw)
        except Exception:
            log.warning("bus: undecodable message on %s dropped", topic)
            return
        if message.node == self.node_id:
            return  # our own echo: already delivered locally by publish
        RECEIVED.inc()
        LAG.observe(max(0.0, time.time() - message.ts))
        self._dispatch(message)

    async def _sync(self, pubsub: PubSub) -> None:
        while True:
            await self._changes.wait()
            self._changes.clear()
            wanted = set(self._handlers)
            added, removed = wanted - self._subscribed, self._subscribed - wanted
            self._subscribed = wanted
            if added:
                await pubsub.subscribe(*added)
            if removed:
                await pubsub.unsubscribe(*removed)

    async def _send(self, client: Redis) -> None:
        while True:
            batch = [await self._outbox.get()]
            while len(batch) < SEND_BATCH and not self._outbox.empty():
                batch.append(self._outbox.get_nowait())
            try:
                async with client.pipeline(transaction=False) as pipe:
                    for topic, raw in batch:
                        pipe.publish(topic, raw)
                    await pipe.execute()
            except Exception:
                self._drop(len(batch))
                raise
            PUBLISHED.inc(len(batch))

    def _discard_outbox(self) -> None:
        count = 0
        while not self._outbox.empty():
            self._outbox.get_nowait()
            count += 1
        if count:
            self._drop(count)

    def _drop(self, count: int) -> None:
        self.dropped += count
        DROPPED.inc(count)

    def _set_healthy(self, healthy: bool) -> None:
        self._healthy = healthy
        HEALTHY.set(1 if healthy else 0)
        self._progress.set()


def _first_error(error: BaseException) -> BaseException:
    """The cause inside a TaskGroup's ExceptionGroup, for a readable log line."""
    while isinstance(error, BaseExceptionGroup) and error.exceptions:
        error = error.exceptions[0]
    return error
