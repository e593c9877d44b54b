"""The ledger writer's checkpointer (``gifts.ledger_sqlite.Checkpointer``) on a real SQLite file:
a writer that commits batch after batch without a pause never checkpoints itself, the
database file receives its pages, and the WAL still starts over instead of growing for ever."""

from __future__ import annotations

import contextlib
import random
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gifts import ledger_sqlite
from gifts.ledger_sqlite import Checkpointer
from livesrv.db import SQLITE_PRAGMAS

FRAME = 4096 + 24


def write_without_pause(path: Path, checkpointer: Checkpointer | None, batches: int, seed: int = 1) -> int:
    """Batches of random-key inserts, back to back, as the writer process runs them; the WAL's
    largest size in frames (the file never shrinks: its size is the peak)."""
    conn = sqlite3.connect(path, isolation_level=None)
    for pragma in SQLITE_PRAGMAS:
        conn.execute(pragma)
    conn.execute("PRAGMA wal_autocheckpoint=0")
    conn.execute("CREATE TABLE IF NOT EXISTS t (k TEXT PRIMARY KEY, v BLOB NOT NULL) WITHOUT ROWID")
    rng = random.Random(seed)
    for _ in range(batches):
        if checkpointer is not None:
            checkpointer.before_batch(conn)
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany("INSERT INTO t VALUES (?, ?)",
                         [(f"{rng.random():.17f}", b"x" * 100) for _ in range(300)])
        conn.execute("COMMIT")
        if checkpointer is not None:
            checkpointer.committed()
    conn.close()
    return int((path.parent / (path.name + "-wal")).stat().st_size / FRAME)


@contextlib.contextmanager
def checkpointed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                 restart_frames: int) -> Iterator[tuple[Path, Checkpointer]]:
    """A new WAL database and a Checkpointer for it, restarting the WAL past ``restart_frames``."""
    monkeypatch.setattr(ledger_sqlite, "WAL_RESTART_FRAMES", restart_frames)
    path = tmp_path / "busy.db"
    sqlite3.connect(path).execute("PRAGMA journal_mode=WAL").connection.close()
    checkpointer = Checkpointer(str(path))
    try:
        yield path, checkpointer
    finally:
        checkpointer.close()


def test_the_wal_starts_over_under_a_writer_that_never_pauses(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    with checkpointed(tmp_path, monkeypatch, restart_frames=500) as (path, checkpointer):
        peak = write_without_pause(path, checkpointer, batches=400)
    # ~120,000 rows of ~130 bytes: ~4,000 pages of table, each batch dirtying hundreds of them
    assert peak < 2000, peak  # the limit and one batch (each dirties up to ~600 pages)
    assert path.stat().st_size > 8 * 1024 * 1024  # the checkpointer copied the pages home
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT COUNT(*) FROM t").fetchone()[0] == 400 * 300
    conn.close()


def test_without_the_writer_waiting_the_wal_keeps_growing(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Why ``before_batch`` exists: with checkpoints beside a writer that never pauses, a batch
    seldom begins with every frame copied, so the WAL seldom starts over."""
    with checkpointed(tmp_path, monkeypatch, restart_frames=10**9) as (path, checkpointer):  # never
        peak = write_without_pause(path, checkpointer, batches=400)
    assert peak > 10_000, peak


def test_a_reader_in_the_wal_delays_the_restart_not_the_writer(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    with checkpointed(tmp_path, monkeypatch, restart_frames=500) as (path, checkpointer):
        write_without_pause(path, checkpointer, batches=5)
        reader = sqlite3.connect(path, isolation_level=None)
        reader.execute("BEGIN")
        reader.execute("SELECT COUNT(*) FROM t").fetchone()  # a snapshot that pins the WAL
        started = time.perf_counter()
        write_without_pause(path, checkpointer, batches=40, seed=2)  # restarts tried, each in vain
        assert time.perf_counter() - started < 5.0  # never the 5 s of busy_timeout
        assert checkpointer.wal_frames() > 2000  # the WAL could not start over meanwhile
        reader.execute("COMMIT")
        reader.close()
        write_without_pause(path, checkpointer, batches=5, seed=3)
        assert checkpointer.wal_frames() < 1500  # and does once the reader is gone


def test_a_file_uri_finds_its_wal_index(tmp_path: Path) -> None:
    path = tmp_path / "uri.db"
    sqlite3.connect(path).execute("PRAGMA journal_mode=WAL").connection.close()
    checkpointer = Checkpointer(f"file:{path}?mode=rwc")
    try:
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute("PRAGMA wal_autocheckpoint=0")
        conn.execute("CREATE TABLE t (v BLOB)")
        conn.execute("INSERT INTO t VALUES (zeroblob(100000))")  # ~25 pages
        assert checkpointer.wal_frames() > 20
        conn.close()
    finally:
        checkpointer.close()
