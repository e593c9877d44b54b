"""Typed aiohttp application keys for the services every area shares.

An area's own services get keys defined in that area's ``livesrv.http`` module.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from aiohttp import web

from .config import Settings
from .hub import Hub

if TYPE_CHECKING:
    from .bus import Bus
    from .db import Database

SETTINGS = web.AppKey("settings", Settings)
HUB = web.AppKey("hub", Hub)
DB: web.AppKey[Database] = web.AppKey("db")
BUS: web.AppKey[Bus] = web.AppKey("bus")
#: a stable id of this process in a cluster (stamped on bus messages)
NODE_ID = web.AppKey("node_id", str)

#: how many viewers a channel has now, across all nodes (set by the rooms area; 0 without it)
VIEWERS: web.AppKey[Callable[[str], Awaitable[int]]] = web.AppKey("viewers")

if TYPE_CHECKING:
    from .presence import Presence

#: who is watching which room, across nodes (livesrv/presence.py; set with the bus)
PRESENCE: web.AppKey[Presence] = web.AppKey("presence")
