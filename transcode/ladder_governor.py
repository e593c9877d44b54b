"""Which rungs of a ladder run now: shed the most expensive when encoding falls behind, add them
back when there is headroom again. Sans-IO: measurements and time (``now``) are passed in, the
answer is a decision; the ladder's worker thread applies it.

Signals:
- ``lag``: seconds of media the worker is behind the newest source packet. It grows without
  bound exactly when the machine cannot encode the ladder in real time (or a burst arrived),
  so it is what triggers a drop: when it is above ``max_lag_seconds`` and not shrinking
  (shrinking lag is a backlog being worked off; dropping more would overshoot).
- ``busy``: the fraction of wall time the worker spent working (not waiting for packets) lately,
  and ``costs``: each rung's worker seconds per second of media. A dropped rung comes back only
  when ``busy`` plus that rung's last measured cost still leaves room (``restore_load``), lag
  has been low for a while, and not sooner after each repeated drop (backoff): hysteresis, so a
  rung that does not fit is not flapped in and out.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class GovernorSettings:
    #: lag above which the most expensive active rung is dropped
    max_lag_seconds: float = 2.0
    #: lag below which the ladder counts as keeping up
    restore_lag_seconds: float = 0.5
    #: how long it must keep up before a dropped rung is tried again (doubled per repeat drop)
    restore_after_seconds: float = 15.0
    #: no decision this soon after the start or after the previous change (let lag react)
    settle_seconds: float = 3.0
    #: worker load (busy fraction) the ladder may reach with a restored rung
    restore_load: float = 0.75
    #: the backoff of ``restore_after_seconds`` stops doubling here
    max_restore_after_seconds: float = 300.0


@dataclass(frozen=True, slots=True)
class Drop:
    rung: str
    lag: float


@dataclass(frozen=True, slots=True)
class Restore:
    rung: str
    busy: float


@dataclass(slots=True)
class _Dropped:
    times: int
    cost: float | None


@dataclass
class Governor:
    """``rungs`` maps each rung to its static expense (pixels per second it encodes)."""

    settings: GovernorSettings
    rungs: dict[str, float]
    started: float
    active: set[str] = field(default_factory=set)
    dropped: dict[str, _Dropped] = field(default_factory=dict)
    #: how often each rung was dropped in this publication (for the restore backoff)
    drops: dict[str, int] = field(default_factory=dict)
    _last_change: float = 0.0
    _low_since: float | None = None
    _previous_lag: float | None = None

    def __post_init__(self) -> None:
        self.active = set(self.rungs)
        self._last_change = self.started

    def observe(self, now: float, lag: float, busy: float,
                costs: dict[str, float]) -> Drop | Restore | None:
        """One look at the measurements; at most one change per call."""
        s = self.settings
        settled = now - self._last_change >= s.settle_seconds
        # lag that shrinks is a backlog being worked off faster than real time: the ladder as it
        # is keeps up, so a drop now would only overshoot
        catching_up = self._previous_lag is not None and lag < self._previous_lag
        self._previous_lag = lag
        if lag > s.max_lag_seconds:
            self._low_since = None
            if settled and self.active and not catching_up:
                victim = max(self.active, key=lambda name: self.rungs[name])
                return self._drop(now, victim, lag, costs.get(victim))
            return None
        if lag >= s.restore_lag_seconds:
            self._low_since = None
            return None
        if self._low_since is None:
            self._low_since = now
        if not self.dropped or not settled:
            return None
        candidate = min(self.dropped, key=lambda name: self.rungs[name])
        info = self.dropped[candidate]
        wait = min(s.restore_after_seconds * 2 ** (info.times - 1), s.max_restore_after_seconds)
        if now - self._low_since < wait:
            return None
        if busy + (info.cost or 0.0) > s.restore_load:
            return None
        del self.dropped[candidate]
        self.active.add(candidate)
        self._last_change = now
        self._low_since = None
        return Restore(candidate, busy)

    def _drop(self, now: float, rung: str, lag: float, cost: float | None) -> Drop:
        self.active.discard(rung)
        times = self.drops[rung] = self.drops.get(rung, 0) + 1
        self.dropped[rung] = _Dropped(times, cost)
        self._last_change = now
        return Drop(rung, lag)
