"""Sending gifts and the leaderboards.

A gift of ``count * price`` coins is one ledger posting of two legs: viewer wallet → anchor
earnings and viewer wallet → platform. The platform's share is rounded down
(``total * share // 100``), so rounding always favours the anchor (a 1-coin rose at 30 % is
all the anchor's); legs of 0 coins are left out. The posting is keyed
``gift:{viewer_id}:{idempotency_key}``: a retried request moves nothing, returns the first
result and publishes nothing. Only then is the ``gift`` event published to the room: the
ledger is the truth, the bus only notifies.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from . import metrics
from .catalog import Catalog, Gift
from .combo import Combos
from .ledger import PLATFORM, Ledger, Leg, earnings, wallet
from .settings import GiftSettings

MAX_COUNT = 999
MAX_KEY_LENGTH = 128
LEADERBOARD_TTL = 1.0  # seconds a leaderboard is served from memory

Publish = Callable[[str, dict[str, Any]], Awaitable[object]]  # (channel, event)


class GiftError(ValueError):
    """A gift request that cannot be sent; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class GiftResult:
    id: str
    gift: Gift
    count: int
    combo: int
    balance: int  # the viewer's balance after the request (now, for a replay)
    replayed: bool
    event: dict[str, Any]


def split(total: int, platform_share: int) -> tuple[int, int]:
    """(anchor's part, platform's part) of ``total`` coins; see the module docstring."""
    platform = total * platform_share // 100
    return total - platform, platform


def check_count(count: object) -> int:
    if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= MAX_COUNT:
        raise GiftError(f"count must be an integer 1..{MAX_COUNT}")
    return count


def check_key(key: object) -> str:
    if not isinstance(key, str) or not 0 < len(key) <= MAX_KEY_LENGTH:
        raise GiftError(f"idempotency_key must be a string of 1..{MAX_KEY_LENGTH} characters")
    return key


def gift_key(viewer_id: int, idempotency_key: str) -> str:
    return f"gift:{viewer_id}:{idempotency_key}"


class GiftService:
    def __init__(self, ledger: Ledger, catalog: Catalog, settings: GiftSettings, publish: Publish,
                 clock: Callable[[], float] = time.time) -> None:
        self.ledger = ledger
        self.catalog = catalog
        self.settings = settings
        self.publish = publish
        self.clock = clock
        self.combos = Combos(settings.combo_seconds)
        self._boards: dict[tuple[int, float | None, int], tuple[float, list[tuple[str, int]]]] = {}

    def gift(self, gift_id: object) -> Gift:
        gift = self.catalog.gifts.get(gift_id) if isinstance(gift_id, str) else None
        if gift is None:
            raise GiftError(f"unknown gift {gift_id!r}", 404)
        return gift

    async def send(self, *, viewer_id: int, viewer_name: str, anchor_id: int, channel: str,
                   gift_id: object, count: object, idempotency_key: object) -> GiftResult:
        """Send a gift; ``GiftError`` for a bad request, ``ledger.InsufficientFunds`` when the
        wallet does not cover it, ``ledger.KeyConflict`` for a key reused for another gift."""
        gift = self.gift(gift_id)
        count = check_count(count)
        key = check_key(idempotency_key)
        if viewer_id == anchor_id:
            raise GiftError("you cannot send gifts to yourself")
        total = gift.price * count
        anchor_part, platform_part = split(total, self.settings.platform_share)
        source = wallet(viewer_id)
        legs = [Leg(source, account, amount)
                for account, amount in ((earnings(anchor_id), anchor_part), (PLATFORM, platform_part))
                if amount > 0]
        now = self.clock()
        # the combo is decided before posting so a replay can return the first result; it is
        # only counted once the posting went through
        combo = self.combos.peek(channel, viewer_name, gift.id, count, now)
        posting = await self.ledger.post(
            legs, key=gift_key(viewer_id, key), kind="gift",
            memo={"gift": gift.id, "count": count, "channel": channel, "combo": combo})
        # the balance right after this gift, as its batch applied it; a replay has none (its
        # coins moved earlier), so it reads the wallet as it is now
        balance = posting.balances.get(source)
        if balance is None:
            balance = await self.ledger.balance(source)
        event_id = f"gift-{posting.id}"
        if posting.replayed:
            memo = posting.memo
            return GiftResult(event_id, gift, count, int(memo.get("combo", combo)), balance, True,
                              self._event(event_id, viewer_name, gift, count, posting.created_at,
                                          int(memo.get("combo", combo))))
        combo = self.combos.add(channel, viewer_name, gift.id, count, now)
        event = self._event(event_id, viewer_name, gift, count, now, combo)
        metrics.GIFTS.inc(count)
        metrics.GIFT_COINS.inc(total)
        await self.publish(channel, event)
        return GiftResult(event_id, gift, count, combo, balance, False, event)

    @staticmethod
    def _event(event_id: str, user: str, gift: Gift, count: int, ts: float, combo: int) -> dict[str, Any]:
        return {"type": "gift", "id": event_id, "user": user, "gift": gift.id, "count": count, "ts": ts,
                "name": gift.name, "price": gift.price, "combo": combo}

    async def top_senders(self, anchor_id: int, *, since: float | None,
                          limit: int = 10) -> list[tuple[str, int]]:
        """Accounts that gave the anchor the most since ``since`` (None: ever), largest first;
        served from memory for ``LEADERBOARD_TTL`` (a hot room asks many times a second)."""
        now = time.monotonic()
        cache_key = (anchor_id, since, limit)
        cached = self._boards.get(cache_key)
        if cached is not None and cached[0] > now:
            return cached[1]
        board = await self.ledger.top_senders(earnings(anchor_id), since=since, limit=limit)
        if len(self._boards) > 10_000:
            self._boards = {k: v for k, v in self._boards.items() if v[0] > now}
        self._boards[cache_key] = (now + LEADERBOARD_TTL, board)
        return board
