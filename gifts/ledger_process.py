"""The server's side of the ledger's writer process (``gifts.ledger_writer``).

Why a process: in one process, the event loop (answering callers, taking new posts) and the
batch's SQL share one GIL. SQLite's thread gives the GIL up at every step of SQLite and then
waits for it behind the loop; PostgreSQL's round trips wait behind the loop's other work while
the backend sits idle. Measured on the 2-core benchmark machine, the process never used more
than one core (SQLite: 85-96 % of one; PostgreSQL: client 46 % and backend 52 %, taking turns).
With the writer in a process of its own, the server's loop and the writer each have a core
(``bench/ledger_transfers.py``; docs/BENCHMARKS.md).

The server hands every post to the writer as soon as the loop iteration that made it ends
(one frame per iteration), and the writer batches whatever has arrived whenever it is free, so
it never waits for the server to come round to it. Answers come back one frame per batch, in
the order posted (``ledger_wire``).

If the writer stops (killed, crashed), the posts it had not answered fail with LedgerError
(whether they were recorded is unknown; the same key again is safe), and a new writer starts at
once; posts made meanwhile wait for it (if it cannot start, they fail, and the next post tries
again). A writer outlives its server by one batch at most: it exits when its input closes.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import ledger_metrics as metrics
from .ledger_core import LedgerError, Posting, Request
from .ledger_wire import READY, FrameReader, WireError, decode_answers, encode_requests

log = logging.getLogger(__name__)

#: the writer's database URL travels in its environment, not its command line (which ``ps``
#: shows every user of the machine; the URL may hold a password)
URL_VARIABLE = "LIVESRV_LEDGER_URL"
START_TIMEOUT = 60.0
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[1])

Item = tuple[Request, "asyncio.Future[Posting] | None", float]
Settle = Callable[[Sequence[Item], Sequence["Posting | BaseException"], int], None]


class WriterProcess:
    def __init__(self, url: str, arguments: Sequence[str], settle: Settle) -> None:
        """``arguments``: the writer's command-line options; ``settle(items, answers, retries)``
        is called with each batch's answers, in the order the items were submitted."""
        self._url = url
        self._arguments = list(arguments)
        self._settle = settle
        self._in_flight: collections.deque[Item] = collections.deque()  # submitted, not answered
        self._waiting: list[Item] = []  # submitted while no writer was running
        self._transport: asyncio.SubprocessTransport | None = None
        self._stdin: asyncio.WriteTransport | None = None
        self._starting: asyncio.Task[None] | None = None
        self._exited: asyncio.Future[None] | None = None
        self._closing = False

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()
        exited: asyncio.Future[None] = loop.create_future()
        env = dict(os.environ)
        env[URL_VARIABLE] = self._url
        # the writer imports this package from wherever the server did (a checkout, a venv)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
        transport, _ = await loop.subprocess_exec(
            lambda: _Protocol(self, ready, exited), sys.executable, "-m", "gifts.ledger_writer",
            *self._arguments, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=None,
            env=env)
        self._exited = exited
        try:
            await asyncio.wait_for(asyncio.shield(ready), START_TIMEOUT)
        except BaseException:
            transport.kill()
            await asyncio.shield(exited)
            raise
        self._transport = transport
        self._stdin = transport.get_pipe_transport(0)  # type: ignore[assignment]
        metrics.WRITER_STARTS.inc()
        log.info("ledger writer process %d started", transport.get_pid())

    @property
    def pid(self) -> int | None:
        """The running writer's process id (None while there is none)."""
        return None if self._transport is None else self._transport.get_pid()

    def submit(self, items: Sequence[Item]) -> None:
        if self._stdin is None:
            self._waiting.extend(items)
            if self._starting is None and not self._closing:
                self._starting = asyncio.create_task(self._restart(), name="ledger-writer-restart")
            return
        self._in_flight.extend(items)
        self._stdin.write(encode_requests([request for request, _, _ in items]))

    async def close(self) -> None:
        """Answer everything submitted, then stop the writer."""
        self._closing = True
        if self._starting is not None:
            await asyncio.gather(self._starting, return_exceptions=True)
        if self._stdin is not None:
            self._stdin.close()  # the writer applies what it has, answers, and exits
        if self._exited is not None:
            await asyncio.shield(self._exited)  # _stopped() has closed the transport by then
        self._fail(self._waiting, LedgerError("the ledger is closed"))

    # -- from the protocol -------------------------------------------------------------------

    def _answered(self, message: list[Any]) -> None:
        count = len(message[2])
        if count > len(self._in_flight):
            raise WireError(f"{count} answers for {len(self._in_flight)} requests in flight")
        items = [self._in_flight.popleft() for _ in range(count)]
        retries, answers = decode_answers([request for request, _, _ in items], message)
        self._settle(items, answers, retries)

    def _stopped(self, transport: asyncio.SubprocessTransport, reason: str) -> None:
        if transport is not self._transport:
            return
        self._transport = self._stdin = None
        transport.close()
        if self._in_flight or not self._closing:
            log.error("the ledger's writer process stopped (%s) with %d posts unanswered", reason,
                      len(self._in_flight))
        self._fail(list(self._in_flight), LedgerError(
            f"the ledger's writer stopped ({reason}): whether this post was recorded is unknown;"
            " post it again with the same key"))
        self._in_flight.clear()
        if not self._closing and self._starting is None:  # a replacement, before the next post asks
            self._starting = asyncio.create_task(self._restart(), name="ledger-writer-restart")

    def _fail(self, items: Sequence[Item], error: LedgerError) -> None:
        if items:
            self._settle(items, [error] * len(items), 0)

    async def _restart(self) -> None:
        try:
            await self.start()
        except Exception as exc:  # the next post tries again
            log.exception("could not start the ledger's writer process")
            waiting, self._waiting = self._waiting, []
            self._fail(waiting, LedgerError(f"the ledger's writer could not start: {exc}"))
        else:
            waiting, self._waiting = self._waiting, []
            if waiting:
                self.submit(waiting)
        finally:
            self._starting = None


class _Protocol(asyncio.SubprocessProtocol):
    def __init__(self, owner: WriterProcess, ready: asyncio.Future[None],
                 exited: asyncio.Future[None]) -> None:
        self._owner = owner
        self._ready = ready
        self._exited = exited
        self._reader = FrameReader()
        self._transport: asyncio.SubprocessTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        try:
            for message in self._reader.feed(data):
                if not self._ready.done():
                    if message != [READY]:
                        raise WireError(f"expected {READY!r} first, got {message!r:.100}")
                    self._ready.set_result(None)
                    continue
                self._owner._answered(message)
        except (WireError, ValueError, TypeError, IndexError) as exc:
            # never guess which answer is whose: stop this writer, fail what it had
            log.error("the ledger's writer process sent a bad frame: %s", exc)
            assert self._transport is not None
            self._transport.kill()

    def connection_lost(self, exc: Exception | None) -> None:
        # every pipe closed and the process reaped: nothing more will be answered
        assert self._transport is not None
        status = self._transport.get_returncode()
        reason = f"exit status {status}"
        if not self._ready.done():
            self._ready.set_exception(LedgerError(f"the ledger's writer exited while starting ({reason})"))
        self._owner._stopped(self._transport, reason)
        if not self._exited.done():
            self._exited.set_result(None)
