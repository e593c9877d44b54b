"""The ledger's SQLite write path: a whole batch in one hop, on a connection of its own.

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

In the ledger's writer process (``on_loop``) the batch runs on the process's only busy thread,
and checkpoints run beside it (``Checkpointer``) instead of inside its commits.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sqlite3
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

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

log = logging.getLogger(__name__)

_KNOWN_ACCOUNTS_MAX = 200_000
_CACHE_KIB = 64 * 1024
#: WAL frames past which the writer restarts the WAL before its next batch (16 MiB of WAL)
WAL_RESTART_FRAMES = 4000
RESTART_PATIENCE_MS = 50


def usable_for(path: str) -> bool:
    """A file database (not ``:memory:``/``mode=memory``), which a second connection can share."""
    return "mode=memory" not in path and path != ":memory:"


def _connect(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, uri=path.startswith("file:"), check_same_thread=False)
    for pragma in SQLITE_PRAGMAS:
        conn.execute(pragma)
    return conn


class Checkpointer:
    """Copies the WAL back into the database file on a thread and connection of its own.

    SQLite checkpoints inside whichever commit passes ``wal_autocheckpoint`` pages, and that
    commit waits for the copy and its fsyncs. For the ledger's writer that was about half of
    each batch: a batch of 1,000 gifts dirties ~1,000 pages, so nearly every commit paid for a
    checkpoint. Here the writer's connection never checkpoints on commit; after each commit it
    asks this thread for a PASSIVE checkpoint, which copies while the writer goes on with its
    next batch (it blocks neither readers nor the writer).

    The WAL only starts over from its beginning when a write begins with every frame already
    copied and no reader in the WAL, and a writer that never pauses never gives it that moment:
    the WAL would grow without end. So once it holds ``WAL_RESTART_FRAMES`` frames, the writer
    runs a RESTART checkpoint itself before its next batch, which has only what this thread has
    not copied yet left to copy.
    """

    def __init__(self, path: str) -> None:
        self._conn = _connect(path)
        filename = urlsplit(path).path if path.startswith("file:") else path
        try:
            self._index = os.open(f"{filename}-shm", os.O_RDONLY)  # made by the connection above
        except OSError:
            self._conn.close()
            raise
        self._wanted = threading.Event()
        self._lock = threading.Lock()  # one checkpoint at a time (SQLite answers another with BUSY)
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="ledger-checkpoint", daemon=True)
        self._thread.start()

    def committed(self) -> None:
        """The writer committed: copy what it wrote."""
        self._wanted.set()

    def wal_frames(self) -> int:
        """Frames in the WAL now: ``mxFrame`` of the wal-index header (offset 16 of the -shm file,
        native byte order; https://sqlite.org/walformat.html). Read directly because the thread
        that could report it after each checkpoint gets the GIL late under a busy writer."""
        return int.from_bytes(os.pread(self._index, 4, 16), sys.byteorder)

    def before_batch(self, writer: sqlite3.Connection) -> None:
        """Called by the writer before BEGIN: if the WAL is long, make the next write start it over."""
        if self.wal_frames() < WAL_RESTART_FRAMES:
            return
        (patience,) = writer.execute("PRAGMA busy_timeout").fetchone()
        # A RESTART waits for readers still in the WAL (a long statement query, an audit): the
        # batch waits no more than this for them, and the WAL starts over at a later batch.
        writer.execute(f"PRAGMA busy_timeout={RESTART_PATIENCE_MS}")
        try:
            with self._lock:  # after this thread's pass, if one is running: little is left to copy
                writer.execute("PRAGMA wal_checkpoint(RESTART)").fetchall()
        finally:
            writer.execute(f"PRAGMA busy_timeout={int(patience)}")

    def close(self) -> None:
        self._stopping = True
        self._wanted.set()
        self._thread.join()
        self._conn.close()
        os.close(self._index)

    def _run(self) -> None:
        while True:
            self._wanted.wait()
            self._wanted.clear()
            if self._stopping:
                return
            with self._lock:
                try:
                    self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except sqlite3.Error as exc:  # the next commit asks again
                    log.warning("ledger checkpoint failed: %s", exc)


class SqliteBatchWriter:
    def __init__(self, path: str, *, on_loop: bool = False) -> None:
        """``on_loop``: run each batch on the calling (event loop's) thread, blocking it for the
        batch, and checkpoint on a thread of its own (``Checkpointer``): for the ledger's writer
        process, where nothing else needs the loop or the GIL meanwhile."""
        self._path = path
        self._thread = (None if on_loop else
                        ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger-sqlite"))
        self._checkpointer: Checkpointer | None = None
        if on_loop:
            try:
                self._checkpointer = Checkpointer(path)
            except OSError as exc:  # no wal-index file to read: SQLite checkpoints in the commits
                log.warning("the ledger's checkpointer is off (%s)", exc)
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
        if self._checkpointer is not None:
            self._checkpointer.close()
            self._checkpointer = None
        if self._thread is None:
            self._close()
            return
        await asyncio.get_running_loop().run_in_executor(self._thread, self._close)
        self._thread.shutdown(wait=True)

    # -- in the thread ----------------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            conn = _connect(self._path)
            if self._checkpointer is not None:
                conn.execute("PRAGMA wal_autocheckpoint=0")  # the checkpointer's job
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
        if self._checkpointer is not None:
            self._checkpointer.before_batch(conn)
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
            if self._checkpointer is not None:
                self._checkpointer.committed()
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        if len(self._known_accounts) > _KNOWN_ACCOUNTS_MAX:
            self._known_accounts.clear()
        self._known_accounts.update(accounts)
        return plan, ids, now
