"""Shared fixtures. Services (Redis, PostgreSQL) are real; with ``CI`` set, a missing one fails
the tests that need it instead of skipping them."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.support.procfs import running
from tests.support.server import ServerProcess

POSTGRES_URL = os.environ.get("LIVESRV_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("LIVESRV_TEST_REDIS", "redis://127.0.0.1:6379/0")


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def require_service(name: str, host: str, port: int) -> None:
    if _reachable(host, port):
        return
    message = f"{name} is not reachable at {host}:{port}"
    if os.environ.get("CI"):
        pytest.fail(message + " (CI is set: services are required)")
    pytest.skip(message)


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A PostgreSQL URL with a schema of its own, dropped afterwards."""
    require_service("PostgreSQL", "127.0.0.1", 5432)
    schema = "t_" + uuid.uuid4().hex[:12]
    yield f"{POSTGRES_URL}?schema={schema}"

    async def drop() -> None:
        import asyncpg

        conn = await asyncpg.connect(POSTGRES_URL)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()

    asyncio.run(drop())


@pytest.fixture
def redis_url() -> str:
    require_service("Redis", "127.0.0.1", 6379)
    return REDIS_URL


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each test that takes this runs on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'test.db'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[object]:
    from livesrv.db import open_database

    database = await open_database(database_url)
    yield database
    await database.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    """Debian's Chromium through Playwright, one per test module; hls.js must be installed too."""
    from tests.support.browser import chromium, require_browser

    require_browser(hls_js=True)
    with chromium() as browser:
        yield browser


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    """The real server as a process, embedded defaults, on free ports."""
    proc = ServerProcess(tmp_path / "server")
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(autouse=True)
def normal_scheduling() -> None:
    """Each test starts at normal priority, and so does everything it starts (a scheduling
    policy is inherited). The test process was once found at SCHED_FIFO 99 partway through a
    run, by a cause not yet found; the Chromium it then launched spun at that priority while
    exiting and could not be killed, and the run hung."""
    if hasattr(os, "sched_getscheduler") and os.sched_getscheduler(0) != os.SCHED_OTHER:
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))


#: every process this test session starts inherits it: how to tell ours from another session's
SESSION_MARK = f"LIVESRV_TEST_SESSION={uuid.uuid4().hex}"
os.environ["LIVESRV_TEST_SESSION"] = SESSION_MARK.split("=", 1)[1]


def _our_ledger_writers() -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if b"gifts.ledger_writer" not in (proc / "cmdline").read_bytes():
                continue
            ours = SESSION_MARK.encode() in (proc / "environ").read_bytes().split(b"\0")
            if ours and running(int(proc.name)):
                pids.append(int(proc.name))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return pids


@pytest.fixture(scope="session", autouse=True)
def no_ledger_writer_outlives_the_tests() -> Iterator[None]:
    """Every ledger writer process a test started (in a ledger, a server, a server it killed)
    has exited by the end of the session: an orphan writer would hold a database open for ever."""
    yield
    if not Path("/proc").is_dir():
        return
    deadline = time.monotonic() + 15
    left = _our_ledger_writers()
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = _our_ledger_writers()
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert not left, f"ledger writer processes outlived their servers: {left}"
