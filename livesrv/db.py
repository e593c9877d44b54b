"""The relational store: SQLite for one machine, PostgreSQL for a cluster, one interface.

SQL is written once with ``?`` placeholders and the common subset of both dialects
(``RETURNING``, ``ON CONFLICT``); where a statement must differ (identity columns), a
migration gives one text per dialect. Each area owns its tables and migrates them itself with
``await db.migrate("area", [...])``, so areas never edit a shared schema file.

SQLite runs on two aiosqlite connections (each its own thread): a writer (every write and
transaction, serialised, as SQLite allows one writer at a time) and a reader (WAL lets reads
proceed while a write is in progress). Each statement is a hop to the writer's thread; batch
work (``executemany``) makes one hop for many rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import sqlite3
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

import aiosqlite

log = logging.getLogger(__name__)

Row = Mapping[str, Any]  # sqlite3.Row and asyncpg.Record both index by name and position
Migration = str | Mapping[str, str]  # one SQL script, or one per dialect
T = TypeVar("T")


class DatabaseError(Exception):
    """The store failed or is unreachable."""


class IntegrityError(DatabaseError):
    """A constraint (unique, check, foreign key) refused the write."""


class Executor(ABC):
    """What a transaction and the database itself can run."""

    @abstractmethod
    async def execute(self, sql: str, *args: Any) -> int:
        """Run one statement; the number of rows it changed."""

    @abstractmethod
    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None: ...

    @abstractmethod
    async def fetchall(self, sql: str, *args: Any) -> list[Row]: ...

    async def fetchone(self, sql: str, *args: Any) -> Row | None:
        rows = await self.fetchall(sql, *args)
        return rows[0] if rows else None

    async def copy_rows(self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        """Insert many rows into ``table`` (PostgreSQL: with COPY)."""
        marks = ", ".join("?" * len(columns))
        await self.executemany(f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})", rows)

    async def fetchval(self, sql: str, *args: Any) -> Any:
        row = await self.fetchone(sql, *args)
        return None if row is None else row[0]


class Database(Executor):
    dialect: str  # "sqlite" or "postgresql"
    #: what ``open_database`` opened, for another process to open the same (None: not shareable)
    url: str | None = None

    @abstractmethod
    def transaction(self) -> contextlib.AbstractAsyncContextManager[Executor]:
        """``async with db.transaction() as tx:`` — committed on success, rolled back on error."""

    @abstractmethod
    async def close(self) -> None: ...

    async def ping(self) -> bool:
        try:
            return await self.fetchval("SELECT 1") == 1
        except Exception:
            return False

    async def migrate(self, component: str, migrations: Sequence[Migration]) -> int:
        """Apply the component's migrations not yet applied, in order, each in a transaction.

        Migrations are append-only: version N is ``migrations[N-1]``; never edit a released one.
        Returns the schema version now in force.
        """
        await self.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " component TEXT NOT NULL, version INTEGER NOT NULL,"
            " applied_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP,"
            " PRIMARY KEY (component, version))")
        current = await self.fetchval(
            "SELECT COALESCE(MAX(version), 0) FROM schema_migrations WHERE component = ?", component)
        for version, migration in enumerate(migrations, start=1):
            if version <= current:
                continue
            script = migration if isinstance(migration, str) else migration[self.dialect]
            async with self.transaction() as tx:
                for statement in split_statements(script):
                    await tx.execute(statement)
                await tx.execute(
                    "INSERT INTO schema_migrations (component, version) VALUES (?, ?)",
                    component, version)
            log.info("migrated %s to schema version %d (%s)", component, version, self.dialect)
            current = version
        return current


def split_statements(script: str) -> list[str]:
    """A migration script's statements (separated by ``;`` at the end of a line)."""
    return [s.strip() for s in re.split(r";\s*(?:\n|$)", script) if s.strip()]


# -- SQLite ---------------------------------------------------------------------------------

def _sqlite_error(exc: sqlite3.Error) -> DatabaseError:
    if isinstance(exc, sqlite3.IntegrityError):
        return IntegrityError(str(exc))
    return DatabaseError(str(exc))


#: Set on every connection to a database file: the app's two here and the ledger's own
#: (``gifts.ledger_sqlite``), so that they agree.
SQLITE_PRAGMAS = (
    "PRAGMA journal_mode=WAL",
    # NORMAL is durable against process crashes under WAL (SIGKILL loses nothing committed);
    # only an OS crash can lose the last transactions.
    "PRAGMA synchronous=NORMAL",
    "PRAGMA foreign_keys=ON",
    "PRAGMA busy_timeout=5000",
)


async def _open_sqlite(path: str) -> aiosqlite.Connection:
    conn = await aiosqlite.connect(path, isolation_level=None, uri=path.startswith("file:"))
    conn.row_factory = sqlite3.Row
    for pragma in SQLITE_PRAGMAS:
        await conn.execute(pragma)
    return conn


class _SqliteExecutor(Executor):
    """Statements on one aiosqlite connection (each one a hop to its thread)."""

    def __init__(self, conn: aiosqlite.Connection) -> None:
        self._conn = conn

    async def execute(self, sql: str, *args: Any) -> int:
        try:
            cursor = await self._conn.execute(sql, args)
        except sqlite3.Error as exc:
            raise _sqlite_error(exc) from exc
        return cursor.rowcount

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        try:
            await self._conn.executemany(sql, list(rows))
        except sqlite3.Error as exc:
            raise _sqlite_error(exc) from exc

    async def fetchall(self, sql: str, *args: Any) -> list[Row]:
        try:
            return list(await self._conn.execute_fetchall(sql, args))
        except sqlite3.Error as exc:
            raise _sqlite_error(exc) from exc


class SqliteDatabase(Database):
    dialect = "sqlite"

    def __init__(self, writer: aiosqlite.Connection, reader: aiosqlite.Connection, path: str) -> None:
        self.path = path
        self._writer = writer
        self._reader = reader
        self._write_lock = asyncio.Lock()
        self._writes = _SqliteExecutor(writer)
        self._reads = _SqliteExecutor(reader)

    @classmethod
    async def connect(cls, path: str) -> SqliteDatabase:
        if path == ":memory:":  # one in-memory database shared by both connections
            path = f"file:livesrv-{id(cls)}-{time.monotonic_ns()}?mode=memory&cache=shared"
        else:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        writer = await _open_sqlite(path)
        reader = await _open_sqlite(path)
        return cls(writer, reader, path)

    async def execute(self, sql: str, *args: Any) -> int:
        async with self._write_lock:
            return await self._writes.execute(sql, *args)

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        async with self._write_lock:
            await self._writes.executemany(sql, rows)

    async def fetchall(self, sql: str, *args: Any) -> list[Row]:
        return await self._reads.fetchall(sql, *args)

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Executor]:
        async with self._write_lock:
            await self._writer.execute("BEGIN IMMEDIATE")
            try:
                yield self._writes
            except BaseException:
                await self._writer.execute("ROLLBACK")
                raise
            else:
                await self._writer.execute("COMMIT")

    async def close(self) -> None:
        await self._reader.close()
        await self._writer.close()


# -- PostgreSQL -----------------------------------------------------------------------------

_PLACEHOLDER = re.compile(r"\?")


def to_postgres(sql: str) -> str:
    """``?`` placeholders to ``$1, $2, …`` (our SQL never has a literal ``?``)."""
    counter = iter(range(1, 10_000))
    return _PLACEHOLDER.sub(lambda _m: f"${next(counter)}", sql)


class _PgExecutor(Executor):
    def __init__(self, conn: Any) -> None:
        self._conn = conn

    async def execute(self, sql: str, *args: Any) -> int:
        import asyncpg

        try:
            status = await self._conn.execute(to_postgres(sql), *args)
        except asyncpg.IntegrityConstraintViolationError as exc:
            raise IntegrityError(str(exc)) from exc
        except asyncpg.PostgresError as exc:
            raise DatabaseError(str(exc)) from exc
        tail = status.rsplit(" ", 1)[-1]
        return int(tail) if tail.isdigit() else 0

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        import asyncpg

        try:
            await self._conn.executemany(to_postgres(sql), list(rows))
        except asyncpg.IntegrityConstraintViolationError as exc:
            raise IntegrityError(str(exc)) from exc
        except asyncpg.PostgresError as exc:
            raise DatabaseError(str(exc)) from exc

    async def copy_rows(self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        # COPY's binary rows skip the executor's per-row work of INSERT … SELECT FROM unnest(…):
        # 6,000 ledger entries in 20 ms instead of 31
        import asyncpg

        try:
            await self._conn.copy_records_to_table(table, records=rows, columns=list(columns))
        except asyncpg.IntegrityConstraintViolationError as exc:
            raise IntegrityError(str(exc)) from exc
        except asyncpg.PostgresError as exc:
            raise DatabaseError(str(exc)) from exc

    async def fetchall(self, sql: str, *args: Any) -> list[Row]:
        import asyncpg

        try:
            return await self._conn.fetch(to_postgres(sql), *args)
        except asyncpg.IntegrityConstraintViolationError as exc:
            raise IntegrityError(str(exc)) from exc
        except asyncpg.PostgresError as exc:
            raise DatabaseError(str(exc)) from exc


async def _reset_connection(conn: Any) -> None:
    """What a connection going back to the pool needs here: no open transaction.

    asyncpg's default reset (advisory unlock, CLOSE ALL, UNLISTEN, RESET ALL) is one more round
    trip per statement run on the pool, about a third of a small request's time on PostgreSQL
    (gift benchmark: 1,336 → 2,059/s without it). Nothing here uses session state: the
    search_path comes with the connection's server_settings, isolation is set per transaction.
    """
    if conn.is_in_transaction():
        await conn.execute("ROLLBACK")


class PostgresDatabase(Database):
    dialect = "postgresql"

    def __init__(self, pool: Any) -> None:
        self._pool = pool
        self._direct = _PgExecutor(pool)  # a pool runs single statements on any connection

    @classmethod
    async def connect(cls, url: str, *, min_size: int = 2, max_size: int = 10) -> PostgresDatabase:
        """``postgresql://user@host:port/db?schema=NAME`` — ``schema`` sets the search_path
        (tests and several deployments can share one database)."""
        import asyncpg

        parts = urlsplit(url)
        query = parse_qs(parts.query)
        schema = query.pop("schema", [None])[0]
        dsn = parts._replace(query="&".join(f"{k}={v[0]}" for k, v in query.items())).geturl()
        # plan_cache_mode: PostgreSQL plans a prepared statement afresh for its first five runs,
        # then may keep one generic plan for the connection's life. On tables that start empty (a
        # new deployment, a test's or benchmark's schema) that generic plan can be a sequential
        # scan, kept until autovacuum's next ANALYZE: the ledger's key look-up (`key = ANY($1)`)
        # then took 11.7 ms a batch instead of 1, and HTTP gifts ran at half speed in 5 of 19
        # runs of bench/gifts_http.py. Planned with their values every time: 6 runs of 6 at full
        # speed, the look-up 0.6-0.8 ms, and the ledger's own bench unchanged within noise.
        server_settings = {"application_name": "livesrv", "plan_cache_mode": "force_custom_plan"}
        if schema:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,62}", schema):
                raise DatabaseError(f"bad schema name {schema!r}")
            server_settings["search_path"] = schema
        try:
            pool = await asyncpg.create_pool(dsn, min_size=min_size, max_size=max_size,
                                             server_settings=server_settings, reset=_reset_connection)
            if schema:
                async with pool.acquire() as conn:
                    await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
        except (OSError, asyncpg.PostgresError) as exc:
            raise DatabaseError(f"cannot connect to PostgreSQL: {exc}") from exc
        return cls(pool)

    async def execute(self, sql: str, *args: Any) -> int:
        return await self._direct.execute(sql, *args)

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        await self._direct.executemany(sql, rows)

    async def fetchall(self, sql: str, *args: Any) -> list[Row]:
        return await self._direct.fetchall(sql, *args)

    async def copy_rows(self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        await self._direct.copy_rows(table, columns, rows)

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Executor]:
        async with self._pool.acquire() as conn, conn.transaction():
            yield _PgExecutor(conn)

    async def close(self) -> None:
        await self._pool.close()


async def open_database(url: str) -> Database:
    """``sqlite:///path/to/file.db``, ``sqlite://:memory:`` or ``postgresql://…``."""
    db: Database
    if url.startswith("sqlite://"):
        path = url.removeprefix("sqlite://")
        path = path[1:] if path.startswith("/") and path[1:] == ":memory:" else path
        db = await SqliteDatabase.connect(path or ":memory:")
    elif url.startswith(("postgresql://", "postgres://")):
        db = await PostgresDatabase.connect(url)
    else:
        raise DatabaseError(f"unsupported database URL {url!r} (sqlite:///… or postgresql://…)")
    db.url = url
    return db
