"""Moderation that outlives a node: bans, mutes and slow mode, kept in the store.

Every node applies moderation events from the bus to its rooms in memory; the node that took
the request also records the resulting state here, so a node that starts (or restarts) later
loads the bans of every room instead of forgetting them.
"""

from __future__ import annotations

import time
from typing import Any

from livesrv.db import Database

MIGRATIONS = ["""
CREATE TABLE room_moderation (
    channel TEXT NOT NULL,
    target TEXT NOT NULL,            -- the user banned or muted; '' for the room's slow mode
    kind TEXT NOT NULL,              -- 'ban', 'mute' or 'slow'
    until_ts DOUBLE PRECISION,       -- a mute's end (wall clock); NULL otherwise
    seconds DOUBLE PRECISION,        -- slow mode's interval; NULL otherwise
    by_user TEXT NOT NULL,
    at_ts DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (channel, target, kind)
)
"""]

_UPSERT = ("INSERT INTO room_moderation (channel, target, kind, until_ts, seconds, by_user, at_ts)"
           " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (channel, target, kind) DO UPDATE SET"
           " until_ts = excluded.until_ts, seconds = excluded.seconds,"
           " by_user = excluded.by_user, at_ts = excluded.at_ts")
_DELETE = "DELETE FROM room_moderation WHERE channel = ? AND target = ? AND kind = ?"


class ModerationStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def migrate(self) -> None:
        await self.db.migrate("chat", MIGRATIONS)

    async def record(self, channel: str, event: dict[str, Any]) -> None:
        """Keep the state ``event`` (as it travels on the bus) leaves the room in."""
        action, by, now = event["action"], event.get("by", ""), time.time()
        target = str(event.get("user", ""))
        if action == "ban":
            await self.db.execute(_UPSERT, channel, target, "ban", None, None, by, now)
        elif action == "mute":
            await self.db.execute(_UPSERT, channel, target, "mute", float(event["until"]), None, by, now)
        elif action == "unmute":
            await self.db.execute(_DELETE, channel, target, "mute")
        elif action == "unban":  # unban also lifts a mute, as Moderation.apply does
            async with self.db.transaction() as tx:
                await tx.execute(_DELETE, channel, target, "ban")
                await tx.execute(_DELETE, channel, target, "mute")
        elif action == "slow":
            seconds = float(event.get("seconds", 0))
            if seconds > 0:
                await self.db.execute(_UPSERT, channel, "", "slow", None, seconds, by, now)
            else:
                await self.db.execute(_DELETE, channel, "", "slow")

    async def load(self) -> list[tuple[str, dict[str, Any]]]:
        """``(channel, event)`` pairs that rebuild every room's moderation; expired mutes are
        deleted instead."""
        now = time.time()
        await self.db.execute("DELETE FROM room_moderation WHERE kind = 'mute' AND until_ts <= ?", now)
        rows = await self.db.fetchall(
            "SELECT channel, target, kind, until_ts, seconds FROM room_moderation ORDER BY channel")
        events = []
        for channel, target, kind, until, seconds in rows:
            event: dict[str, Any] = {"type": "moderation", "action": kind, "user": target}
            if kind == "mute":
                event["until"] = until
            elif kind == "slow":
                event = {"type": "moderation", "action": "slow", "seconds": seconds}
            events.append((channel, event))
        return events
