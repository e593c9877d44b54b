"""Who may say what in a room: length, emptiness, banned words, rate, mute, ban, slow mode.

The state is applied in memory on every node (actions travel over the bus); bans, mutes and
slow mode are also kept in the store (chat/store.py), so a node starting later knows them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from .settings import ChatSettings


class TokenBucket:
    """``burst`` messages at once, then ``rate`` per second."""

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.stamp = now

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


#: per-user state kept before idle users are forgotten (a busy room sees many one-time chatters)
PRUNE_AT = 10_000


@dataclass
class Moderation:
    settings: ChatSettings
    muted_until: dict[str, float] = field(default_factory=dict)
    banned: set[str] = field(default_factory=set)
    slow_seconds: float = 0.0
    _buckets: dict[str, TokenBucket] = field(default_factory=dict)
    _last_sent: dict[str, float] = field(default_factory=dict)

    def apply(self, action: dict) -> None:
        """An action as it travels on the bus (``{"type":"moderation","action",...}``)."""
        kind = action.get("action")
        user = str(action.get("user", ""))
        if kind == "mute":
            self.muted_until[user] = float(action.get("until", 0))
        elif kind == "unmute":
            self.muted_until.pop(user, None)
        elif kind == "ban":
            self.banned.add(user)
        elif kind == "unban":
            self.banned.discard(user)
            self.muted_until.pop(user, None)
        elif kind == "slow":
            self.slow_seconds = max(0.0, float(action.get("seconds", 0)))

    def check(self, user: str, text: str, *, privileged: bool = False,
              now: float | None = None) -> tuple[str, str] | None:
        """``(code, message)`` when the message is refused, None when it may be sent."""
        now = time.monotonic() if now is None else now
        wall = time.time()
        if not privileged:  # the anchor and admins cannot lock themselves out
            if user in self.banned:
                return "banned", "you are banned from this room"
            until = self.muted_until.get(user, 0.0)
            if until > wall:
                return "muted", f"you are muted for {int(until - wall) + 1} more seconds"
        if not text.strip():
            return "empty", "message is empty"
        if len(text) > self.settings.max_length:
            return "too_long", f"message is longer than {self.settings.max_length} characters"
        lowered = text.lower()
        for word in self.settings.banned_words:
            if word and word.lower() in lowered:
                return "blocked_word", "message contains a blocked word"
        if not privileged and self.slow_seconds > 0:
            last = self._last_sent.get(user)
            if last is not None and now - last < self.slow_seconds:
                return "slow_mode", f"slow mode: one message every {self.slow_seconds:g} seconds"
        bucket = self._buckets.get(user)
        if bucket is None:
            if len(self._buckets) >= PRUNE_AT:
                self._prune(now)
            bucket = self._buckets[user] = TokenBucket(self.settings.rate, self.settings.burst, now)
        if not bucket.take(now):
            return "rate_limited", "too many messages, slow down"
        self._last_sent[user] = now
        return None

    def _prune(self, now: float) -> None:
        """Forget users whose bucket is full again and whose slow-mode wait is over: they are
        indistinguishable from newcomers."""
        refill = self.settings.burst / self.settings.rate if self.settings.rate > 0 else float("inf")
        idle = max(refill, self.slow_seconds)
        for user, bucket in list(self._buckets.items()):
            if now - bucket.stamp > idle:
                del self._buckets[user]
                self._last_sent.pop(user, None)
