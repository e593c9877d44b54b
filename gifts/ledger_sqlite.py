"""The ledger's SQLite write path: a whole batch in one hop to a thread of its own.

Through ``livesrv.db`` every statement is a hop from the event loop to SQLite's thread and
back, and each hop back waits for its turn behind whatever the loop has queued (after a
batch of 1,000 commits, that is 1,000 callers waking up and posting again). A batch is ~8
statements, so the loop and SQLite took turns instead of working at once. Here the batch's
transaction runs start to finish on a dedicated connection in a dedicated thread (one hop),
while the loop answers the previous batch's callers and queues the next one.

The connection is an ordinary second writer on the same file: ``BEGIN IMMEDIATE`` serialises
it with the database's own writer (and other processes) through SQLite's lock and
``busy_timeout``, exactly like two processes, with the pragmas of ``livesrv.db`` (WAL,
``synchronous=NORMAL``: a SIGKILL loses nothing committed). In-memory databases (shared cache, where
SQLite reports a held lock as an error instead of waiting) keep the generic path.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from livesrv.db import SQLITE_PRAGMAS, DatabaseError, IntegrityError

from .ledger_core import Plan, Request, plan_batch
from .ledger_sql import (
    SQLITE_ADD_TO_BALANCE,
    SQLITE_BALANCES,
    SQLITE_ENSURE_ACCOUNTS,
    SQLITE_INSERT_ENTRY,
    SQLITE_INSERT_POSTING,
    SQLITE_NEXT_ID,
    SQLITE_POSTINGS,
    stored_postings,
)

_KNOWN_ACCOUNTS_MAX = 200_000
_CACHE_KIB = 64 * 1024


def usable_for(path: str) -> bool:
    """A file database (not ``:memory:``/``mode=memory``), which a second connection can share."""
    return "mode=memory" not in path and path != ":memory:"


class SqliteBatchWriter:
    def __init__(self, path: str, *, on_loop: bool = False) -> None:
        """``on_loop``: run each batch on the calling (event loop's) thread, blocking it for the
        batch: for the ledger's writer process, where nothing else needs the loop meanwhile."""
        self._path = path
        self._thread = (None if on_loop else
                        ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger-sqlite"))
        self._conn: sqlite3.Connection | None = None  # opened, used and closed in the thread only
        self._known_accounts: set[str] = set()

    async def apply(self, batch: Sequence[Request]) -> tuple[Plan, dict[str, int], float]:
        """Decide and record the batch in one transaction; (plan, posting ids by key, time)."""
        try:
            if self._thread is None:
                return self._apply(batch)
            return await asyncio.get_running_loop().run_in_executor(self._thread, self._apply, batch)
        except sqlite3.IntegrityError as exc:
            raise IntegrityError(str(exc)) from exc
        except sqlite3.Error as exc:
            raise DatabaseError(str(exc)) from exc

    async def close(self) -> None:
        if self._thread is None:
            self._close()
            return
        await asyncio.get_running_loop().run_in_executor(self._thread, self._close)
        self._thread.shutdown(wait=True)

    # -- in the thread ----------------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            conn = sqlite3.connect(self._path, isolation_level=None, uri=self._path.startswith("file:"),
                                   check_same_thread=False)
            for pragma in SQLITE_PRAGMAS:
                conn.execute(pragma)
            # The entries of 10,000 wallets span thousands of pages; SQLite's default 2 MiB
            # cache re-reads most of them every batch (64 MiB: 10 to 15 % less a batch).
            conn.execute(f"PRAGMA cache_size=-{_CACHE_KIB}")
            self._conn = conn
        return self._conn

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _apply(self, batch: Sequence[Request]) -> tuple[Plan, dict[str, int], float]:
        conn = self._connection()
        accounts = sorted({account for request in batch for account, _, _ in request.lines})
        new_accounts = [account for account in accounts if account not in self._known_accounts]
        keys = list(dict.fromkeys(request.key for request in batch))
        conn.execute("BEGIN IMMEDIATE")  # the database's one write lock, for the whole batch
        try:
            now = time.time()
            if new_accounts:
                conn.execute(SQLITE_ENSURE_ACCOUNTS, (json.dumps(new_accounts),))
            balances = json.loads(conn.execute(SQLITE_BALANCES, (json.dumps(accounts),)).fetchone()[0])
            existing = stored_postings(conn.execute(SQLITE_POSTINGS, (json.dumps(keys),)))
            plan = plan_batch(batch, existing, balances)
            ids: dict[str, int] = {}
            if plan.accepted:
                # sole writer under BEGIN IMMEDIATE: the next ids are ours to take, in order
                first = int(conn.execute(SQLITE_NEXT_ID).fetchone()[0])
                ids = {request.key: first + n for n, request in enumerate(plan.accepted)}
                conn.executemany(SQLITE_INSERT_POSTING,
                                 [(ids[r.key], r.key, r.kind, r.signature, r.memo_json, now)
                                  for r in plan.accepted])
                conn.executemany(SQLITE_INSERT_ENTRY, [(ids[r.key], account, amount, counterparty)
                                                       for r in plan.accepted
                                                       for account, amount, counterparty in r.lines])
                conn.executemany(SQLITE_ADD_TO_BALANCE,
                                 [(delta, account) for account, delta in plan.deltas.items()])
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        if len(self._known_accounts) > _KNOWN_ACCOUNTS_MAX:
            self._known_accounts.clear()
        self._known_accounts.update(accounts)
        return plan, ids, now
