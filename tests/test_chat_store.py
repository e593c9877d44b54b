"""Room moderation kept in the store (SQLite and PostgreSQL): what a starting node loads."""

from __future__ import annotations

import time

from chat.moderation import Moderation
from chat.settings import ChatSettings
from chat.store import ModerationStore
from livesrv.db import Database


def event(action: str, **fields: object) -> dict[str, object]:
    return {"type": "moderation", "action": action, "by": "anchor", **fields}


async def test_record_and_load_rebuild_each_rooms_moderation(db: Database) -> None:
    store = ModerationStore(db)
    await store.migrate()
    await store.migrate()  # idempotent: every node migrates on start
    now = time.time()
    await store.record("a", event("ban", user="troll"))
    await store.record("a", event("ban", user="troll"))  # repeated: one row
    await store.record("a", event("mute", user="noisy", until=now + 600))
    await store.record("a", event("mute", user="gone", until=now - 1))  # already over
    await store.record("a", event("slow", seconds=30))
    await store.record("b", event("ban", user="x"))
    await store.record("b", event("unban", user="x"))
    await store.record("b", event("mute", user="y", until=now + 600))
    await store.record("b", event("unmute", user="y"))
    await store.record("b", event("slow", seconds=10))
    await store.record("b", event("slow", seconds=0))  # slow mode off

    loaded = await store.load()
    assert {channel for channel, _ in loaded} == {"a"}
    moderation = Moderation(ChatSettings())
    for _, e in loaded:
        moderation.apply(e)
    assert moderation.banned == {"troll"}
    assert set(moderation.muted_until) == {"noisy"}
    assert moderation.slow_seconds == 30
    # the expired mute was deleted while loading
    assert await db.fetchval("SELECT count(*) FROM room_moderation WHERE target = 'gone'") == 0
