"""The real server with ``--redis``: /readyz and /metrics follow the bus through a Redis outage
(a private redis-server, killed and restarted on the same port), without restarting the server."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.support.server import ServerProcess, get_json
from tests.test_bus_redis import PrivateRedis, private_redis  # noqa: F401 - fixture

pytestmark = [pytest.mark.e2e, pytest.mark.redis]


def wait_for_bus(server: ServerProcess, healthy: bool, within: float = 30.0) -> dict[str, object]:
    """Poll /readyz until its bus check is ``healthy`` (a bound on waiting, not a speed test)."""
    deadline = time.monotonic() + within
    while True:
        status, body = get_json(server.url + "/readyz")
        if body["checks"]["bus"] is healthy:
            assert status == (200 if body["ready"] else 503)
            return body
        assert time.monotonic() < deadline, f"bus never became healthy={healthy}: {body}"
        time.sleep(0.1)


def metric(server: ServerProcess, name: str) -> float:
    import urllib.request

    with urllib.request.urlopen(server.url + "/metrics", timeout=10) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def test_readyz_follows_redis_outage(tmp_path: Path, private_redis: PrivateRedis) -> None:  # noqa: F811
    with ServerProcess(tmp_path / "server", redis=private_redis.url, node_id="e2e-node") as server:
        wait_for_bus(server, True)
        assert metric(server, "livesrv_bus_healthy") == 1

        private_redis.kill()
        body = wait_for_bus(server, False)
        assert body["ready"] is False
        assert metric(server, "livesrv_bus_healthy") == 0

        private_redis.start()
        wait_for_bus(server, True)
        assert metric(server, "livesrv_bus_healthy") == 1
        assert metric(server, "livesrv_bus_reconnects_total") >= 1
        assert server.proc is not None and server.proc.poll() is None
        assert server.log().count("remote delivery paused") == 1  # one line per outage
