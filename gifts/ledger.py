"""The coin ledger: double entry, append-only, idempotent by key, built for a hot anchor.

Every ``post()`` is a posting: a balanced group of legs, each debiting one account and
crediting another. Postings and their entries are only ever inserted; each account's balance is
cached in ``ledger_balances`` and ``audit()`` checks the cache against the entries.

The write path is a group commit. ``post()`` validates, enqueues and awaits a future; one
writer task per Ledger takes everything queued (up to ``max_batch``) and applies it in ONE
transaction: lock the balances of every account the batch touches (PostgreSQL: ``FOR UPDATE``
in account order, so writers on several nodes never deadlock), look up the batch's keys
(replays), decide each request in memory against those locked balances (``ledger_core``), then
insert postings and entries in bulk and update each touched account ONCE with its net change.
Thousands of gifts to one anchor therefore cost one row update of the anchor per batch rather
than one per gift, and batches grow by themselves with the load (whatever queued while the
previous batch was being written).

By default the writer is a process of its own (``ledger_process`` here, ``ledger_writer``
there, ``ledger_wire`` between them): posts go to it as they come, it runs the same write loop
(batches, retries, the funds check) and answers batch by batch, and this process's event loop
never waits for the SQL, nor the SQL for the loop. Inside whichever process writes, a batch on a
SQLite file runs in one hop on the ledger's own connection (``ledger_sqlite``); on PostgreSQL
(and in-memory SQLite) statement by statement through ``db`` (``ledger_sql``), each statement
taking the whole batch as arrays.

Crash safety: futures are resolved only after COMMIT, and a batch is one transaction, so a
SIGKILL loses exactly the posts whose callers had no answer yet, and nothing is half-applied.
Balances live in SQL only; the writer keeps no money state between batches.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import random
import sqlite3
import time
from collections.abc import Sequence
from typing import Any

from livesrv.db import Database, DatabaseError, Executor, Row

from . import ledger_metrics as metrics
from .ledger_core import (
    PLATFORM,
    Audit,
    Entry,
    InsufficientFunds,
    InvalidRequest,
    KeyConflict,
    LedgerError,
    Leg,
    Plan,
    Posting,
    Request,
    check_account,
    clearing,
    earnings,
    follower_answer,
    legs_signature,
    plan_batch,
    validate,
    wallet,
)
from .ledger_process import WriterProcess
from .ledger_sql import MIGRATIONS, write_statements
from .ledger_sqlite import SqliteBatchWriter, usable_for

__all__ = [
    "PLATFORM",
    "Audit",
    "Entry",
    "InsufficientFunds",
    "InvalidRequest",
    "KeyConflict",
    "Ledger",
    "LedgerError",
    "Leg",
    "Posting",
    "clearing",
    "earnings",
    "wallet",
]

log = logging.getLogger(__name__)

_NO_CURSOR = 2**62
#: The most posts one batch transaction takes. Batches only grow this big when that many posts
#: queued during the last commit (2,000 viewers gifting at once). On SQLite a bigger batch
#: shares one commit's fixed costs (WAL header, checkpoint, pages touched twice) among more posts:
#: 2,000 against 1,000 gave 17.8k and 18.8k posts/s against 16.0k and 17.1k in two paired runs
#: of bench/ledger_transfers.py. On PostgreSQL, where rows cost more than commits: +11 % once,
#: -11 % once, so no difference within noise.
MAX_BATCH = 2000
_KNOWN_ACCOUNTS_MAX = 200_000
#: with a writer process, posts go to it at the end of each turn of the event loop, or as soon as
#: this many are waiting: when one answer wakes 2,000 callers, the writer starts on the first of
#: their next posts while the loop is still making the rest, instead of idling until all 2,000
#: are made (bench/ledger_transfers.py, SQLite: 19.8-20.0k posts/s flushing once a turn;
#: 23.6k, 24.7k and 23.6k flushing every 128, 256 and 512)
_FLUSH_EVERY = 256
_RETRYABLE_SQLSTATES = {"40001", "40P01"}  # serialization failure, deadlock detected


class _RetryBatch(Exception):
    """The batch must run again from the start (another node raced one of its keys in)."""


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, _RetryBatch):
        return True
    if isinstance(exc, DatabaseError) and getattr(exc.__cause__, "sqlstate", None) in _RETRYABLE_SQLSTATES:
        return True
    # SQLite: another process holds the write lock past busy_timeout
    text = str(exc).lower()
    return isinstance(exc, (DatabaseError, sqlite3.OperationalError)) and ("locked" in text or "busy" in text)


Answer = Posting | BaseException
#: a post waiting: request, its caller's answer (None in the writer process), time.monotonic()
_Item = tuple[Request, "asyncio.Future[Posting] | None", float]


#: where a Ledger writes its batches (the ``writer`` setting)
WRITERS = ("process", "thread", "loop", "statements")


class Ledger:
    def __init__(self, db: Database, *, max_batch: int = MAX_BATCH, max_attempts: int = 8,
                 writer: str = "process") -> None:
        """``writer``: where batches are written.

        - ``process`` (the default): in a process of its own (``gifts.ledger_writer``), so that
          this process's event loop and the batch's SQL never wait for each other's turn on the
          GIL (``ledger_process``);
        - ``thread``: in this process; on a SQLite file, on the ledger's own connection and
          thread (``ledger_sqlite``), on PostgreSQL statement by statement on the event loop;
        - ``loop``: on a SQLite file, on the event loop's own thread, blocking it for the
          batch (the writer process's way: nothing else runs there);
        - ``statements``: statement by statement through ``db``.

        A database no other process or connection can open (in-memory SQLite) is always
        written statement by statement.
        """
        if max_batch < 1 or max_attempts < 1:
            raise ValueError("max_batch and max_attempts must be at least 1")
        if writer not in WRITERS:
            raise ValueError(f"writer must be one of {', '.join(WRITERS)}")
        self._db = db
        self._sql = write_statements(db.dialect)
        path = getattr(db, "path", None)
        shareable = db.dialect != "sqlite" or (isinstance(path, str) and usable_for(path))
        if not shareable or (writer == "process" and db.url is None):
            writer = "statements"
        self._writer_kind = writer
        self._sqlite_writer = (SqliteBatchWriter(path, on_loop=writer == "loop")
                               if writer in ("thread", "loop") and db.dialect == "sqlite" else None)
        self._max_batch = max_batch
        self._max_attempts = max_attempts
        self._pending: collections.deque[_Item] = collections.deque()
        self._wakeup = asyncio.Event()
        self._closing = False
        self._running = False
        self._writer: asyncio.Task[None] | None = None
        self._process: WriterProcess | None = None
        self._flush_scheduled = False
        self._known_accounts: set[str] = set()  # balance rows known to exist (rows are never deleted)

    @classmethod
    async def open(cls, db: Database, **settings: Any) -> Ledger:
        """Migrate the "ledger" area and start the writer."""
        ledger = cls(db, **settings)
        await db.migrate("ledger", MIGRATIONS)
        await ledger.start()
        return ledger

    async def start(self) -> None:
        """Start the writer (``open()`` does; the tables must exist)."""
        if self._writer_kind == "process":
            assert self._db.url is not None
            child_writer = "loop" if self._db.dialect == "sqlite" else "statements"
            self._process = WriterProcess(self._db.url, [
                "--writer", child_writer, "--max-batch", str(self._max_batch),
                "--max-attempts", str(self._max_attempts)], self._settle)
            await self._process.start()
        else:
            self._writer = asyncio.create_task(self._write_loop(), name="ledger-writer")
        self._running = True

    @property
    def writer(self) -> str:
        """Where this ledger's batches are written (see ``__init__``)."""
        return self._writer_kind

    @property
    def writing(self) -> bool:
        """Open, and its writer running (a writer process that stopped is being replaced)."""
        alive = self._process is None or self._process.pid is not None
        return self._running and not self._closing and alive

    @property
    def writer_pid(self) -> int | None:
        """The writer process's id (``writer="process"``, while one runs)."""
        return None if self._process is None else self._process.pid

    async def close(self) -> None:
        """Apply everything already queued, then stop the writer."""
        self._closing = True
        if self._process is not None:
            self._flush()
            await self._process.close()
            self._process = None
        self._wakeup.set()
        if self._writer is not None:
            await self._writer
            self._writer = None
        if self._sqlite_writer is not None:
            await self._sqlite_writer.close()
            self._sqlite_writer = None

    # -- writing ----------------------------------------------------------------------------

    async def post(self, legs: Sequence[Leg], *, key: str, kind: str, memo: dict | None = None) -> Posting:
        """Record the legs atomically, once per key.

        The same key again answers the first Posting with ``replayed=True`` (nothing moves);
        the same key with other legs raises KeyConflict. InsufficientFunds when a debited
        non-clearing account would go below zero; nothing moves then.
        """
        checked_legs, checked_memo, memo_json, lines = validate(legs, key, kind, memo)
        if self._closing or not self._running:
            raise LedgerError("the ledger is closed")
        request = Request(key, kind, checked_legs, checked_memo, legs_signature(checked_legs), memo_json,
                          lines)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Posting] = loop.create_future()
        self._pending.append((request, future, time.monotonic()))
        if self._process is None:
            self._wakeup.set()
        elif len(self._pending) >= _FLUSH_EVERY:
            self._flush()
        elif not self._flush_scheduled:
            # everything posted in this turn of the loop goes to the writer in one frame
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return await future

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._pending and self._process is not None:
            items = list(self._pending)
            self._pending.clear()
            self._process.submit(items)

    async def _write_loop(self) -> None:
        while True:
            if not self._pending:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            count = min(len(self._pending), self._max_batch)
            items = [self._pending.popleft() for _ in range(count)]
            try:
                await self._write(items)
            except Exception as exc:  # never let the writer die: the next batch may well succeed
                log.exception("ledger batch failed")
                self._deliver(items, exc, 0)

    async def _write(self, items: list[_Item], retries: int = 0) -> None:
        batch = [request for request, _, _ in items]
        outcome: tuple[Plan, dict[str, int], float] | BaseException
        for attempt in range(self._max_attempts):
            try:
                outcome = await self._apply(batch)
                break
            except Exception as exc:
                if _retryable(exc) and attempt + 1 < self._max_attempts:
                    retries += 1
                    await asyncio.sleep(random.uniform(0, min(0.002 * 2**attempt, 0.1)))
                    continue
                if len(items) > 1:
                    # Something refused the batch as a whole (a constraint, a value the store
                    # rejects): apply each post alone, so the culprit fails alone.
                    log.warning("ledger batch of %d failed (%s); applying its posts one by one",
                                len(items), exc)
                    for item in items:
                        await self._write([item], retries)
                        retries = 0
                    return
                if isinstance(exc, _RetryBatch) or _retryable(exc):
                    exc = LedgerError(f"the ledger gave up after {self._max_attempts} attempts: {exc}")
                outcome = exc
                break
        self._deliver(items, outcome, retries)

    def _deliver(self, items: Sequence[_Item], outcome: tuple[Plan, dict[str, int], float] | BaseException,
                 retries: int) -> None:
        """A batch is decided (or failed as a whole): answer its callers."""
        self._settle(items, _answers([request for request, _, _ in items], outcome), retries)

    def _settle(self, items: Sequence[_Item], answers: Sequence[Answer], retries: int) -> None:
        """Resolve each caller's future with its answer (in order), and count the batch."""
        recorded: collections.Counter[str] = collections.Counter()
        replays = refused_funds = conflicts = 0
        for (request, future, _), answer in zip(items, answers, strict=True):
            if isinstance(answer, Posting):
                if answer.replayed:
                    replays += 1
                else:
                    recorded[request.kind] += 1
            elif isinstance(answer, InsufficientFunds):
                refused_funds += 1
            elif isinstance(answer, KeyConflict):
                conflicts += 1
            if future is not None and not future.done():
                if isinstance(answer, Posting):
                    future.set_result(answer)
                else:
                    future.set_exception(answer)
        for kind, count in recorded.items():
            metrics.POSTINGS.labels(kind).inc(count)
        if replays:
            metrics.REPLAYS.inc(replays)
        if refused_funds:
            metrics.INSUFFICIENT_FUNDS.inc(refused_funds)
        if conflicts:
            metrics.KEY_CONFLICTS.inc(conflicts)
        if retries:
            metrics.BATCH_RETRIES.inc(retries)
        metrics.BATCH_SIZE.observe(len(items))
        answered = time.monotonic()
        metrics.WRITE_SECONDS.observe_many([answered - started for _, _, started in items])

    async def _apply(self, batch: list[Request]) -> tuple[Plan, dict[str, int], float]:
        """One transaction for the whole batch: (plan, posting ids by key, time)."""
        if self._sqlite_writer is not None:
            return await self._sqlite_writer.apply(batch)
        return await self._apply_statements(batch)

    async def _apply_statements(self, batch: list[Request]) -> tuple[Plan, dict[str, int], float]:
        """The batch statement by statement through ``db`` (PostgreSQL, in-memory SQLite)."""
        # from the statement lines, not the legs: the writer process's requests carry no legs
        accounts = sorted({account for request in batch for account, _, _ in request.lines})
        new_accounts = [account for account in accounts if account not in self._known_accounts]
        if new_accounts and self._sql.ensure_accounts_outside:
            await self._sql.ensure_accounts(self._db, new_accounts)
        keys = list(dict.fromkeys(request.key for request in batch))
        now = time.time()
        async with self._db.transaction() as tx:
            if new_accounts and not self._sql.ensure_accounts_outside:
                await self._sql.ensure_accounts(tx, new_accounts)
            balances = await self._sql.lock_balances(tx, accounts)
            if len(balances) != len(accounts):  # a balance row we believed in is missing
                self._known_accounts.difference_update(accounts)
                raise _RetryBatch("balance rows missing")
            # Keys are looked up only now, under the balance locks: a concurrent writer with the
            # same key and legs touches the same rows, so it has either committed (visible here)
            # or waits for us.
            existing = await self._sql.find_postings(tx, keys)
            plan = plan_batch(batch, existing, balances)
            ids: dict[str, int] = {}
            if plan.accepted:
                ids = await self._sql.insert_postings(
                    tx, [(r.key, r.kind, r.signature, r.memo_json, now) for r in plan.accepted])
                if len(ids) != len(plan.accepted):
                    # another node recorded one of these keys (with other accounts) after our
                    # look-up: start again, the look-up will see it
                    raise _RetryBatch("key recorded concurrently")
                await self._sql.record(tx, [
                    (ids[r.key], account, amount, counterparty)
                    for r in plan.accepted for account, amount, counterparty in r.lines], plan.deltas)
        if len(self._known_accounts) > _KNOWN_ACCOUNTS_MAX:
            self._known_accounts.clear()
        self._known_accounts.update(accounts)
        return plan, ids, now

    # -- reading ----------------------------------------------------------------------------

    async def balance(self, account: str) -> int:
        value = await self._db.fetchval("SELECT balance FROM ledger_balances WHERE account = ?",
                                        check_account(account))
        return int(value or 0)

    async def statement(self, account: str, *, before: int | None = None, limit: int = 50) -> list[Entry]:
        """The account's entries, newest first: one per posting that changed it.

        ``before`` is a posting id cursor (the ``posting_id`` of the last entry of the previous
        page).
        """
        check_account(account)
        _check_limit(limit)
        if before is not None and (type(before) is not int or before < 1):
            raise InvalidRequest("before must be a posting id")
        rows = await self._db.fetchall(
            "SELECT e.posting_id, e.account, e.amount, e.counterparty, p.kind, p.memo, p.created_at"
            " FROM ledger_entries e JOIN ledger_postings p ON p.id = e.posting_id"
            " WHERE e.account = ? AND e.posting_id < ? ORDER BY e.posting_id DESC LIMIT ?",
            account, _NO_CURSOR if before is None else before, limit)
        return [Entry(int(row[0]), row[1], int(row[2]), row[3], row[4], json.loads(row[5]), float(row[6]))
                for row in rows]

    async def top_senders(self, account: str, *, since: float | None = None,
                          limit: int = 10) -> list[tuple[str, int]]:
        """Sums credited to ``account`` by each debited account, largest first (ties by name).

        ``since`` is resolved to the first posting recorded at or after it (posting ids grow
        with time; entries carry no time of their own, which keeps the hot insert path to one
        index per entry).
        """
        check_account(account)
        _check_limit(limit)
        first = 0
        if since is not None:
            first = await self._db.fetchval("SELECT MIN(id) FROM ledger_postings WHERE created_at >= ?",
                                            float(since))
            if first is None:
                return []
        rows = await self._db.fetchall(
            "SELECT counterparty, SUM(amount) AS total FROM ledger_entries"
            " WHERE account = ? AND posting_id >= ? AND amount > 0"
            " GROUP BY counterparty ORDER BY total DESC, counterparty LIMIT ?",
            account, int(first), limit)
        return [(row[0], int(row[1])) for row in rows]

    async def audit(self) -> Audit:
        """Check the books, on one consistent snapshot (SQLite: under the write lock)."""
        async with self._db.transaction() as tx:
            if self._db.dialect == "postgresql":
                await tx.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            return await _audit(tx)


def _answers(batch: Sequence[Request], outcome: tuple[Plan, dict[str, int], float] | BaseException
             ) -> list[Answer]:
    """The answer to each request of the batch, in order."""
    if isinstance(outcome, BaseException):
        return [outcome] * len(batch)
    plan, ids, now = outcome
    answers: list[Answer] = []
    by_request: dict[int, Answer] = {}
    for request in batch:
        after = plan.balances_after.get(id(request))
        if after is not None:
            answer: Answer = Posting(ids[request.key], request.key, request.kind, request.legs, request.memo,
                                     now, replayed=False, balances=after)
        else:
            leader = plan.followers.get(id(request))
            answer = (plan.answers[id(request)] if leader is None else
                      follower_answer(request, leader, by_request[id(leader)]))
        by_request[id(request)] = answer
        answers.append(answer)
    return answers


def _check_limit(limit: int) -> None:
    if type(limit) is not int or not 0 < limit <= 1000:
        raise InvalidRequest("limit must be in 1..1000")


async def _audit(tx: Executor) -> Audit:
    counts: Row | None = await tx.fetchone(
        "SELECT (SELECT COUNT(*) FROM ledger_postings),"
        " (SELECT COUNT(DISTINCT posting_id) FROM ledger_entries),"
        " (SELECT COALESCE(SUM(balance), 0) FROM ledger_balances)")
    assert counts is not None
    postings, with_entries, total = int(counts[0]), int(counts[1]), int(counts[2])
    unbalanced = [int(row[0]) for row in await tx.fetchall(
        "SELECT posting_id FROM ledger_entries GROUP BY posting_id HAVING SUM(amount) <> 0"
        " ORDER BY posting_id LIMIT 20")]
    mismatched = [row[0] for row in await tx.fetchall(
        "SELECT b.account FROM ledger_balances b"
        " LEFT JOIN (SELECT account, SUM(amount) AS total FROM ledger_entries GROUP BY account) e"
        " ON e.account = b.account WHERE b.balance <> COALESCE(e.total, 0)"
        " UNION ALL"
        " SELECT e.account FROM (SELECT DISTINCT account FROM ledger_entries) e"
        " LEFT JOIN ledger_balances b ON b.account = e.account WHERE b.account IS NULL"
        " LIMIT 20")]
    negative = [row[0] for row in await tx.fetchall(
        "SELECT account FROM ledger_balances WHERE balance < 0 AND account NOT LIKE 'clearing:%'"
        " ORDER BY account LIMIT 100")]
    return Audit(postings=postings, balanced=not unbalanced and with_entries == postings,
                 cached_match=not mismatched, negative=negative, total=total,
                 unbalanced=unbalanced, mismatched=mismatched)

