"""Combos: the same gift sent again and again by one user in one room is shown as one running
count ("Rose x12") while each repeat comes within ``window`` seconds of the previous one.

Sans-IO: time is passed in. The count sums the gifts' counts (10 roses then 5 roses = 15).
State is per node: in a cluster, repeats served by another node start their own count there,
which only affects display.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class _Run:
    total: int
    last: float


class Combos:
    def __init__(self, window: float, max_runs: int = 100_000) -> None:
        self.window = window
        self.max_runs = max_runs
        self._runs: dict[tuple[str, str, str], _Run] = {}

    def _current(self, key: tuple[str, str, str], now: float) -> _Run | None:
        run = self._runs.get(key)
        if run is None or now - run.last > self.window:
            return None
        return run

    def peek(self, channel: str, user: str, gift: str, count: int, now: float) -> int:
        """What ``add`` would return, without recording anything."""
        run = self._current((channel, user, gift), now)
        return count + (run.total if run else 0)

    def add(self, channel: str, user: str, gift: str, count: int, now: float) -> int:
        """Record ``count`` more of ``gift``; the combo's running total including them."""
        key = (channel, user, gift)
        run = self._current(key, now)
        if run is None:
            if len(self._runs) >= self.max_runs:
                self.prune(now)
            run = self._runs[key] = _Run(0, now)
        run.total += count
        run.last = max(run.last, now)
        return run.total

    def prune(self, now: float) -> None:
        """Forget runs that ended (called when the table is full; cheap enough then)."""
        self._runs = {k: r for k, r in self._runs.items() if now - r.last <= self.window}
        if len(self._runs) >= self.max_runs:  # all active: drop the oldest half
            keep = sorted(self._runs.items(), key=lambda item: item[1].last)[len(self._runs) // 2:]
            self._runs = dict(keep)

    def __len__(self) -> int:
        return len(self._runs)
