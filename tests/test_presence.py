"""Presence: local counting, and counts summed across nodes through a real Redis, with nodes that
crash (stop heartbeating) dropping out after ttl, and a Redis outage."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable

import pytest

from livesrv.presence import LocalPresence, RedisPresence, open_presence
from tests.test_bus_redis import PrivateRedis, private_redis  # noqa: F401 - fixture

pytestmark = pytest.mark.redis


async def eventually(condition: Callable[[], Awaitable[bool]], within: float = 15.0) -> None:
    """Wait for ``condition`` (a bound on waiting, not a speed requirement)."""
    deadline = time.monotonic() + within
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


def channel() -> str:
    return "test-" + uuid.uuid4().hex[:8]


def crash(presence: RedisPresence) -> None:
    """Stop heartbeating without the clean goodbye ``close`` sends, like a killed process."""
    assert presence._task is not None
    presence._task.cancel()


async def test_local_presence_counts_and_never_goes_negative() -> None:
    presence = open_presence(None, "n1")
    assert isinstance(presence, LocalPresence)
    presence.add("c", 2)
    presence.add("c", -1)
    assert await presence.count("c") == 1
    presence.add("c", -5)
    assert await presence.count("c") == 0
    assert presence.healthy


async def test_counts_from_two_nodes_sum(redis_url: str) -> None:
    a = RedisPresence(redis_url, "a-" + uuid.uuid4().hex[:6], ttl=3)
    b = RedisPresence(redis_url, "b-" + uuid.uuid4().hex[:6], ttl=3)
    await a.start()
    await b.start()
    try:
        room = channel()
        a.add(room, 2)
        b.add(room, 3)
        assert await a.count(room) >= 2  # own viewers are counted at once
        for node in (a, b):
            await eventually(lambda node=node: _is(node.count(room), 5))
        b.add(room, -3)
        await eventually(lambda: _is(a.count(room), 2))
        assert await a.count(channel()) == 0
    finally:
        await a.close()
        await b.close()


async def test_clean_close_leaves_at_once_and_crash_leaves_after_ttl(redis_url: str) -> None:
    ttl = 0.9
    a = RedisPresence(redis_url, "a-" + uuid.uuid4().hex[:6], ttl=ttl)
    b = RedisPresence(redis_url, "b-" + uuid.uuid4().hex[:6], ttl=ttl)
    c = RedisPresence(redis_url, "c-" + uuid.uuid4().hex[:6], ttl=ttl)
    for node in (a, b, c):
        await node.start()
    try:
        room = channel()
        a.add(room, 4)
        c.add(room, 1)
        await eventually(lambda: _is(b.count(room), 5))
        # several heartbeats pass: live nodes stay counted beyond their ttl
        await asyncio.sleep(ttl * 2)
        assert await b.count(room) == 5

        crash(a)
        await eventually(lambda: _is(b.count(room), 1))
        await c.close()
        await eventually(lambda: _is(b.count(room), 0))
    finally:
        for node in (a, b, c):
            await node.close()


async def test_restart_under_same_node_id_forgets_old_counts(redis_url: str) -> None:
    node_id = "r-" + uuid.uuid4().hex[:6]
    observer = RedisPresence(redis_url, "o-" + uuid.uuid4().hex[:6], ttl=5)
    first = RedisPresence(redis_url, node_id, ttl=5)
    await observer.start()
    await first.start()
    room = channel()
    second = RedisPresence(redis_url, node_id, ttl=5)
    try:
        first.add(room, 7)
        await eventually(lambda: _is(observer.count(room), 7))
        crash(first)
        await second.start()  # the same node id, back before the old ttl ran out, with no viewers
        await eventually(lambda: _is(observer.count(room), 0))
    finally:
        for node in (first, second, observer):
            await node.close()


async def test_redis_outage(private_redis: PrivateRedis) -> None:  # noqa: F811 - fixture
    a = RedisPresence(private_redis.url, "a-" + uuid.uuid4().hex[:6], ttl=1.5)
    b = RedisPresence(private_redis.url, "b-" + uuid.uuid4().hex[:6], ttl=1.5)
    await a.start()
    await b.start()
    try:
        room = channel()
        a.add(room, 1)
        b.add(room, 2)
        await eventually(lambda: _is(a.count(room), 3))
        assert a.healthy

        private_redis.kill()
        a.add(room, 1)  # still cheap and sync while Redis is away
        await eventually(lambda: _healthy_is(a, False))
        assert await a.count(room) >= 2  # our own viewers at least

        private_redis.start()  # empty: every node must write its counts again
        await eventually(lambda: _healthy_is(a, True))
        await eventually(lambda: _healthy_is(b, True))
        await eventually(lambda: _is(b.count(room), 4))
    finally:
        await a.close()
        await b.close()


async def _healthy_is(presence: RedisPresence, healthy: bool) -> bool:
    return presence.healthy == healthy


async def _is(count: Awaitable[int], expected: int) -> bool:
    return await count == expected
