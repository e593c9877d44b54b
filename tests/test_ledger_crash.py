"""SIGKILL a process in the middle of a flood of posts: what its callers were told is in the
books, nothing is half-applied, and the ledger opens and posts again afterwards."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from pathlib import Path

import pytest

from gifts.ledger import InsufficientFunds, Ledger, Leg, clearing, earnings, wallet
from gifts.ledger_core import legs_from_signature
from livesrv.db import open_database
from tests.support.procfs import running

ROOT = Path(__file__).resolve().parents[1]
ANSWERS_BEFORE_KILL = 3000
SANDBOX = clearing("sandbox")

# The child posts from 64 concurrent tasks and prints one line per answer it got, after the
# ledger answered (that is, after the batch's COMMIT): "ok KEY POSTING_ID" or "nsf KEY".
CHILD = r"""
import asyncio, random, sys
from gifts.ledger import InsufficientFunds, Ledger, Leg, PLATFORM, clearing, earnings, wallet
from livesrv.db import open_database
from tests.support.procfs import running

async def worker(ledger, task):
    rng = random.Random(task)
    i = 0
    while True:
        viewer = rng.randrange(30)
        if rng.random() < 0.3:
            key, kind = f"r-{task}-{i}", "recharge"
            legs = [Leg(clearing("sandbox"), wallet(viewer), rng.randrange(1, 200))]
        else:
            key, kind, coins = f"g-{task}-{i}", "gift", rng.randrange(5, 60)
            legs = [Leg(wallet(viewer), earnings(1), coins - coins // 5),
                    Leg(wallet(viewer), PLATFORM, coins // 5)]
        try:
            posting = await ledger.post(legs, key=key, kind=kind)
        except InsufficientFunds:
            sys.stdout.write(f"nsf {key}\n")
        else:
            sys.stdout.write(f"ok {key} {posting.id}\n")
        sys.stdout.flush()
        i += 1

async def main(url):
    ledger = await Ledger.open(await open_database(url))
    sys.stdout.write(f"ready {ledger.writer_pid}\n")
    sys.stdout.flush()
    await asyncio.gather(*(worker(ledger, task) for task in range(64)))

import uvloop
uvloop.run(main(sys.argv[1]))  # as `livesrv serve` runs: its subprocess pipes are socket pairs
"""


async def test_sigkill_mid_load_loses_nothing_answered(database_url: str) -> None:
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD, database_url, cwd=ROOT, stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert child.stdout is not None
    answered: dict[str, int] = {}
    refused: set[str] = set()

    def take(line: bytes) -> None:
        fields = line.decode().split()
        if fields and fields[0] == "ok":
            answered[fields[1]] = int(fields[2])
        elif fields and fields[0] == "nsf":
            refused.add(fields[1])

    try:
        ready = (await asyncio.wait_for(child.stdout.readline(), 60)).split()
        assert ready[0] == b"ready"
        writer_pid = int(ready[1])  # the ledger's writer process, the child's child
        while len(answered) < ANSWERS_BEFORE_KILL:
            line = await asyncio.wait_for(child.stdout.readline(), 60)
            assert line, "the child exited before it was killed"
            take(line)
    finally:
        with contextlib.suppress(ProcessLookupError):
            child.send_signal(signal.SIGKILL)
    for line in (await child.stdout.read()).splitlines():  # answered before the kill, still in the pipe
        take(line)
    assert await child.wait() == -signal.SIGKILL
    # its writer sees its input close, answers into the void what it holds, and exits
    for _ in range(200):
        if not running(writer_pid):
            break
        await asyncio.sleep(0.05)
    assert not running(writer_pid), "the ledger's writer outlived its process"

    db = await open_database(database_url)
    ledger = await Ledger.open(db)
    try:
        audit = await ledger.audit()
        assert audit.ok, audit
        stored = {row[0]: int(row[1]) for row in await db.fetchall("SELECT key, id FROM ledger_postings")}
        missing = {key: posting_id for key, posting_id in answered.items() if stored.get(key) != posting_id}
        assert missing == {}
        assert refused.isdisjoint(stored)  # each key is posted once: a refused one moved nothing
        rows = await db.fetchall("SELECT account, balance FROM ledger_balances")
        balances = {row[0]: int(row[1]) for row in rows}
        assert sum(v for account, v in balances.items() if account != SANDBOX) == -balances[SANDBOX]
        # the ledger takes posts again, keys included: an answered key replays, a new one posts
        some_key, some_id = next(iter(answered.items()))
        stored_legs = await db.fetchval("SELECT legs FROM ledger_postings WHERE key = ?", some_key)
        replay = await ledger.post(legs_from_signature(stored_legs), key=some_key,
                                   kind="recharge" if some_key.startswith("r-") else "gift")
        assert replay.replayed and replay.id == some_id
        await ledger.post([Leg(SANDBOX, wallet(999), 10)], key="after-crash", kind="recharge")
        with pytest.raises(InsufficientFunds):
            await ledger.post([Leg(wallet(999), earnings(1), 11)], key="after-crash-gift", kind="gift")
        assert (await ledger.audit()).ok
    finally:
        await ledger.close()
        await db.close()
