"""The last N chat events of a room, for joiners (``history``) and resumes (``?since=ID``)."""

from __future__ import annotations

from collections import deque
from typing import Any


class History:
    def __init__(self, size: int) -> None:
        self._events: deque[dict[str, Any]] = deque(maxlen=size)

    def append(self, event: dict[str, Any]) -> None:
        self._events.append(event)

    def since(self, last_id: str | None) -> list[dict[str, Any]]:
        """Events after ``last_id``. Found in history: exactly those after it (no gap, no
        duplicate). Not found: ids sort by time, so the newer ones; an id older than the
        whole history gets all of it (the best we have)."""
        events = list(self._events)
        if not last_id:
            return events
        for index in range(len(events) - 1, -1, -1):
            if events[index]["id"] == last_id:
                return events[index + 1:]
        return [event for event in events if event["id"] > last_id]
