"""``livesrv.db`` on a real SQLite file and a real PostgreSQL schema: what the ledger's write
path relies on beyond plain statements."""

from __future__ import annotations

import pytest

from livesrv.db import Database, IntegrityError


async def test_copy_rows_inserts_every_row_or_none(db: Database) -> None:
    await db.execute("CREATE TABLE copied (k TEXT PRIMARY KEY, v BIGINT NOT NULL, note TEXT NOT NULL)")
    rows = [(f"k{i}", i * 10**12, "é ü 漢字" if i % 2 else "") for i in range(3000)]
    await db.copy_rows("copied", ("k", "v", "note"), rows)
    async with db.transaction() as tx:  # inside a transaction too (where the ledger uses it)
        await tx.copy_rows("copied", ("note", "k", "v"), [("x", "extra", -1)])
    assert await db.fetchval("SELECT COUNT(*) FROM copied") == 3001
    assert tuple(await db.fetchone("SELECT k, v, note FROM copied WHERE k = 'k2999'") or ()) == rows[-1]
    with pytest.raises(IntegrityError):
        async with db.transaction() as tx:
            await tx.copy_rows("copied", ("k", "v", "note"), [("new", 1, ""), ("k7", 1, "")])
    assert await db.fetchval("SELECT COUNT(*) FROM copied WHERE k = 'new'") == 0
