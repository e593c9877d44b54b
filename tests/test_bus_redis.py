"""The bus over a real Redis: cross-node delivery, echo suppression, unsubscribe, and an outage
of a private redis-server (never the machine's) that is killed and restarted on the same port."""

from __future__ import annotations

import asyncio
import logging
import shutil
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY
from redis.asyncio import Redis

from livesrv.bus import BusMessage, InProcessBus
from livesrv.bus_redis import RedisBus
from tests.support.server import free_port

pytestmark = pytest.mark.redis


async def eventually(condition: Callable[[], bool], within: float = 10.0) -> None:
    """Wait for ``condition`` (a bound on waiting, not a speed requirement)."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


class PrivateRedis:
    """A redis-server of this test's own, on a fixed free port, that can die and come back."""

    def __init__(self, workdir: Path) -> None:
        if shutil.which("redis-server") is None:
            pytest.skip("redis-server is not installed")
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            probe = subprocess.run(["redis-cli", "-p", str(self.port), "ping"], capture_output=True)
            if probe.stdout.strip() == b"PONG":
                return
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("private redis-server did not start")
            time.sleep(0.05)

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.kill()


class Inbox:
    def __init__(self) -> None:
        self.messages: list[BusMessage] = []

    def __call__(self, message: BusMessage) -> None:
        self.messages.append(message)

    def data(self) -> list[dict[str, Any]]:
        return [m.data for m in self.messages]


@pytest.fixture
async def buses(redis_url: str) -> AsyncIterator[tuple[RedisBus, RedisBus]]:
    a = RedisBus(redis_url, node_id="a-" + uuid.uuid4().hex[:6])
    b = RedisBus(redis_url, node_id="b-" + uuid.uuid4().hex[:6])
    await a.start()
    await b.start()
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()


def sample(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


def topic() -> str:
    return f"room:test-{uuid.uuid4().hex[:8]}"


async def test_in_process_bus_delivers_and_unsubscribes() -> None:
    bus = InProcessBus()
    inbox = Inbox()
    unsubscribe = bus.subscribe("room:x", inbox)
    await bus.publish("room:x", {"n": 1})
    unsubscribe()
    await bus.publish("room:x", {"n": 2})
    assert inbox.data() == [{"n": 1}]
    assert await bus.flush()


async def test_message_reaches_other_node_once_and_own_node_once(buses: tuple[RedisBus, RedisBus]) -> None:
    a, b = buses
    assert a.healthy and b.healthy
    t = topic()
    at_a, at_b = Inbox(), Inbox()
    a.subscribe(t, at_a)
    b.subscribe(t, at_b)
    assert await a.flush() and await b.flush()
    received_before = sample("livesrv_bus_received_total")
    lag_before = sample("livesrv_bus_lag_seconds_count")

    sent = await a.publish(t, {"type": "chat", "text": "hi"})
    assert at_a.data() == [{"type": "chat", "text": "hi"}]  # local delivery is immediate
    await eventually(lambda: len(at_b.messages) == 1)
    received = at_b.messages[0]
    assert (received.node, received.id, received.data) == (a.node_id, sent.id, sent.data)

    # B answers after it has A's message, so Redis delivers A's echo to A before B's marker:
    # once A has the marker, a duplicate (an undropped echo) would already be there
    await b.publish(t, {"marker": 1})
    await eventually(lambda: len(at_a.messages) == 2)
    assert at_a.data() == [{"type": "chat", "text": "hi"}, {"marker": 1}]
    assert at_b.data() == [{"type": "chat", "text": "hi"}, {"marker": 1}]
    # one remote receipt on each node; echoes are not counted as received
    assert sample("livesrv_bus_received_total") - received_before == 2
    assert sample("livesrv_bus_lag_seconds_count") - lag_before == 2


async def test_unsubscribe_stops_delivery(buses: tuple[RedisBus, RedisBus], redis_url: str) -> None:
    a, b = buses
    t, marker_topic = topic(), topic()
    at_b, markers = Inbox(), Inbox()
    a.subscribe(t, Inbox())
    unsubscribe = b.subscribe(t, at_b)
    b.subscribe(marker_topic, markers)
    assert await a.flush() and await b.flush()

    unsubscribe()
    # the last handler gone, B's node leaves the Redis channel too (A stays)
    redis = Redis.from_url(redis_url)
    try:
        async def subscribers() -> int:
            return dict(await redis.pubsub_numsub(t))[t.encode()]

        deadline = time.monotonic() + 10
        while await subscribers() != 1:
            assert time.monotonic() < deadline, "B did not UNSUBSCRIBE"
            await asyncio.sleep(0.02)
    finally:
        await redis.aclose()

    await a.publish(t, {"n": 1})
    await a.publish(marker_topic, {"after": 1})  # same connection, so it arrives after {"n": 1} would
    await eventually(lambda: len(markers.messages) == 1)
    assert at_b.messages == []


async def test_redis_outage_and_recovery(private_redis: PrivateRedis,
                                         caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="livesrv.bus_redis")
    a = RedisBus(private_redis.url, node_id="a-" + uuid.uuid4().hex[:6], timeout=1.0)
    b = RedisBus(private_redis.url, node_id="b-" + uuid.uuid4().hex[:6], timeout=1.0)
    await a.start()
    await b.start()
    try:
        t = topic()
        at_a, at_b = Inbox(), Inbox()
        a.subscribe(t, at_a)
        b.subscribe(t, at_b)
        assert await a.flush() and await b.flush()
        await a.publish(t, {"n": 1})
        await eventually(lambda: at_b.data() == [{"n": 1}])

        private_redis.kill()
        await eventually(lambda: not a.healthy and not b.healthy)
        dropped = a.dropped
        await a.publish(t, {"n": 2})  # neither raises nor waits for Redis
        assert at_a.data() == [{"n": 1}, {"n": 2}]  # local delivery goes on
        assert a.dropped == dropped + 1
        # a topic joined during the outage must be subscribed on reconnect as well
        late_topic = topic()
        late = Inbox()
        b.subscribe(late_topic, late)

        private_redis.start()  # same port: the buses find it again by themselves
        await eventually(lambda: a.healthy and b.healthy, within=30)
        assert await a.flush() and await b.flush()
        await a.publish(t, {"n": 3})
        await a.publish(late_topic, {"late": 1})
        await eventually(lambda: at_b.data() == [{"n": 1}, {"n": 3}] and late.data() == [{"late": 1}])

        for bus in (a, b):
            lines = [r for r in caplog.records if bus.node_id in r.getMessage()]
            warnings = [r for r in lines if r.levelno == logging.WARNING]
            assert len(warnings) == 1, "one warning per outage, not one per retry"
            assert any("reachable again" in r.getMessage() for r in lines)
    finally:
        await a.close()
        await b.close()


async def test_start_without_redis_is_degraded_not_fatal(tmp_path: Path) -> None:
    server = PrivateRedis(tmp_path)  # a free port, nothing listening yet
    bus = RedisBus(server.url, timeout=0.5)
    await bus.start()
    try:
        assert not bus.healthy
        inbox = Inbox()
        bus.subscribe("room:x", inbox)
        await bus.publish("room:x", {"n": 1})
        assert inbox.data() == [{"n": 1}]
        server.start()
        try:
            assert await bus.flush(within=30)
        finally:
            server.kill()
    finally:
        await bus.close()
