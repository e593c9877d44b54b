"""The ledger's writer process: ``python -m gifts.ledger_writer`` (started by ``gifts.ledger``).

Reads requests from stdin, applies them in batches with the ledger's own write path (group
commit, retries, a refused batch split into single posts), and writes each batch's answers
to stdout (``ledger_wire``). The database URL comes in the environment (``LIVESRV_LEDGER_URL``).

It batches whatever has arrived each time it is free. On SQLite it runs each batch on its
only thread, start to finish (``--writer loop``): nothing else here needs the GIL meanwhile,
and the requests that arrive wait in the pipe. On PostgreSQL (``--writer statements``) the
batch's statements run on its event loop, which has nothing else to do, so their round trips
are never queued behind other work. It exits once its input is closed (the server closed the
ledger, or died) and everything read has been answered.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from livesrv import gc_policy
from livesrv.db import open_database

from .ledger import MAX_BATCH, Ledger
from .ledger_core import Plan, Request
from .ledger_process import URL_VARIABLE
from .ledger_wire import READY, FrameReader, WireError, decode_requests, encode_answers, frame

log = logging.getLogger("gifts.ledger_writer")
_READ_SIZE = 1 << 20
_DRAIN_TRIES = 3000  # 30 s for the server to read the last answers


class _ServedLedger(Ledger):
    """A Ledger whose posts come from the pipe and whose answers go back down it."""

    def __init__(self, *args: Any, output: asyncio.WriteTransport, **settings: Any) -> None:
        super().__init__(*args, **settings)
        self._output = output

    def enqueue(self, requests: list[Request]) -> None:
        self._pending.extend([(request, None, 0.0) for request in requests])
        self._wakeup.set()

    def _deliver(self, items: Sequence[Any], outcome: tuple[Plan, dict[str, int], float] | BaseException,
                 retries: int) -> None:
        if self._output.is_closing():  # the server is gone: nobody to answer (the batch is committed)
            return
        try:
            self._output.write(encode_answers([request for request, _, _ in items], outcome, retries))
        except (OSError, RuntimeError) as exc:
            log.warning("could not answer a batch of %d: %s", len(items), exc)


async def serve(url: str, writer: str, max_batch: int, max_attempts: int) -> None:
    loop = asyncio.get_running_loop()
    # frames go to a copy of stdout; stdout itself now points at stderr, so a stray print()
    # from any library lands in the log instead of in the middle of a frame
    frames = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)
    output, _ = await loop.connect_write_pipe(asyncio.Protocol, frames)
    db = await open_database(url)
    ledger = _ServedLedger(db, writer=writer, max_batch=max_batch, max_attempts=max_attempts,
                           output=output)  # type: ignore[arg-type]
    await ledger.start()
    gc_policy.apply()

    finished: asyncio.Future[None] = loop.create_future()
    reader = FrameReader()
    stdin = sys.stdin.fileno()
    os.set_blocking(stdin, False)

    def stop_reading() -> None:
        loop.remove_reader(stdin)
        if not finished.done():
            finished.set_result(None)

    def readable() -> None:
        # everything the pipe holds now, in one go: it all joins the next batch
        while True:
            try:
                data = os.read(stdin, _READ_SIZE)
            except BlockingIOError:
                return
            except OSError as exc:  # the server's end torn down (a socket pair: ECONNRESET)
                log.warning("the server's side of the pipe is gone: %s", exc)
                data = b""
            if not data:
                stop_reading()
                return
            try:
                messages = reader.feed(data)
            except WireError as exc:  # never guess where the next request starts
                log.error("the server sent a bad frame: %s", exc)
                stop_reading()
                return
            for message in messages:
                ledger.enqueue(decode_requests(message))

    loop.add_reader(stdin, readable)
    output.write(frame([READY]))
    try:
        await finished
    finally:
        try:
            await ledger.close()
        finally:
            await db.close()
        # the last answers may still sit in the transport's buffer (a full pipe): hand them over
        # before the loop, and this process, end
        for _ in range(_DRAIN_TRIES):
            if not output.get_write_buffer_size() or output.is_closing():
                break
            await asyncio.sleep(0.01)
        output.close()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--writer", choices=("loop", "thread", "statements"), default="loop")
    parser.add_argument("--max-batch", type=int, default=MAX_BATCH)
    parser.add_argument("--max-attempts", type=int, default=8)
    args = parser.parse_args(argv)
    url = os.environ.get(URL_VARIABLE)
    if not url:
        raise SystemExit(f"{URL_VARIABLE} is not set")
    # Ctrl-C in a terminal reaches the whole process group: the server closes the ledger, and
    # this process ends when it has answered what it holds
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s ledger-writer[{os.getpid()}] %(levelname)s %(message)s")
    status = 0
    try:
        try:
            import uvloop
        except ImportError:
            asyncio.run(serve(url, args.writer, args.max_batch, args.max_attempts))
        else:
            uvloop.run(serve(url, args.writer, args.max_batch, args.max_attempts))
    except BaseException:
        log.exception("the ledger's writer failed")
        status = 1
    finally:
        # Never linger: a worker thread left behind (a store connection's, had closing failed)
        # would keep the interpreter from exiting, and an orphan writer holds the database open.
        # Everything committed is on disk; a transaction cut short is rolled back by the store.
        logging.shutdown()
        os._exit(status)


if __name__ == "__main__":
    main()
