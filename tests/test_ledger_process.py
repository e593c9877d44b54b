"""The ledger's writer process (``gifts.ledger_process``) on a real SQLite file and a real
PostgreSQL schema: killed in the middle of a flood of posts, it fails exactly the posts it had
not answered, a new one starts, and posting the failed keys again records each once."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from gifts.ledger import PLATFORM, Ledger, LedgerError, Leg, Posting, clearing, earnings, wallet
from gifts.ledger_process import URL_VARIABLE
from gifts.ledger_wire import MAX_FRAME, READY, FrameReader
from livesrv.db import Database, open_database

ROOT = Path(__file__).resolve().parents[1]

SANDBOX = clearing("sandbox")


def gift(viewer: int, coins: int) -> list[Leg]:
    return [Leg(wallet(viewer), earnings(7), coins - coins // 5), Leg(wallet(viewer), PLATFORM, coins // 5)]


def writer_starts() -> float:
    return REGISTRY.get_sample_value("livesrv_ledger_writer_starts_total") or 0.0


async def test_a_killed_writer_fails_what_it_held_and_is_replaced(db: Database) -> None:
    ledger = await Ledger.open(db)
    try:
        assert ledger.writer == "process"
        for viewer in range(20):
            await ledger.post([Leg(SANDBOX, wallet(viewer), 10_000)], key=f"r{viewer}", kind="recharge")
        first_writer = ledger.writer_pid
        assert first_writer is not None and ledger.writing
        starts = writer_starts()

        legs = {f"g{task}-{i}": gift(task % 20, 5 + i % 7) for task in range(100) for i in range(40)}

        async def poster(task: int) -> list[tuple[str, Posting | BaseException]]:
            results = []
            for i in range(40):
                key = f"g{task}-{i}"
                try:
                    results.append((key, await ledger.post(legs[key], key=key, kind="gift")))
                except LedgerError as exc:
                    results.append((key, exc))
            return results

        posters = [asyncio.create_task(poster(task)) for task in range(100)]
        for _ in range(2000):  # until the flood is being written
            if await ledger.balance(PLATFORM):
                break
            await asyncio.sleep(0.005)
        os.kill(first_writer, signal.SIGKILL)
        outcomes = [outcome for results in await asyncio.gather(*posters) for outcome in results]

        failed = [key for key, outcome in outcomes if isinstance(outcome, LedgerError)]
        assert failed, "the kill came after the flood"
        assert all("post it again with the same key" in str(outcome) for _, outcome in outcomes
                   if isinstance(outcome, LedgerError))
        assert ledger.writer_pid not in (None, first_writer) and writer_starts() == starts + 1
        assert ledger.writing

        # every key again, with its own legs: the answered ones replay, each failed one lands once
        again = {key: await ledger.post(legs[key], key=key, kind="gift") for key, _ in outcomes}
        for key, outcome in outcomes:
            if isinstance(outcome, Posting):
                assert again[key].replayed and again[key].id == outcome.id
        stored = await db.fetchall(
            "SELECT key, COUNT(*) FROM ledger_postings WHERE kind = 'gift' GROUP BY key")
        assert {row[0] for row in stored} == set(again) and all(int(row[1]) == 1 for row in stored)
        sent = sum(sum(leg.amount for leg in posting.legs) for posting in again.values())
        assert await ledger.balance(earnings(7)) + await ledger.balance(PLATFORM) == sent
        assert (await ledger.audit()).ok
    finally:
        await ledger.close()


async def test_close_stops_the_writer(db: Database) -> None:
    ledger = await Ledger.open(db)
    pid = ledger.writer_pid
    assert pid is not None
    # enough that the last batch's answers overflow the pipe (64 KiB) and wait in the writer
    posts = [asyncio.ensure_future(ledger.post([Leg(SANDBOX, wallet(i), 1)], key=f"r{i}", kind="recharge"))
             for i in range(5000)]
    await asyncio.sleep(0)
    await ledger.close()  # answers what was queued first
    assert all(isinstance(post.result(), Posting) for post in posts)
    assert ledger.writer_pid is None
    with pytest.raises(ProcessLookupError):  # exited, and reaped by the event loop
        os.kill(pid, 0)


async def test_the_writer_stops_at_a_corrupt_request_stream(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    db = await open_database(url)
    await (await Ledger.open(db, writer="thread")).close()  # the tables
    await db.close()
    writer = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gifts.ledger_writer", stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, env={**os.environ, URL_VARIABLE: url, "PYTHONPATH": str(ROOT)})
    assert writer.stdin is not None and writer.stdout is not None
    reader = FrameReader()
    messages: list[object] = []
    while not messages:
        messages = reader.feed(await asyncio.wait_for(writer.stdout.read(4096), 30))
    assert messages == [[READY]]
    writer.stdin.write((MAX_FRAME + 1).to_bytes(4, "big") + b"not a frame")
    await writer.stdin.drain()
    assert await asyncio.wait_for(writer.wait(), 30) == 0  # it stops; it does not guess
