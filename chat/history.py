"""The last N chat events of a room, for joiners (``history``) and resumes (``?since=ID``)."""

from __future__ import annotations

from collections import deque
from typing import Any


class History:
    def __init__(self, size: int) -> None:
        self._events: deque[dict[str, Any]] = deque(maxlen=size)
        self.loaded = False  # the shared history has been merged in (once per room)

    def append(self, event: dict[str, Any]) -> None:
        self._events.append(event)

    def merge(self, events: list[dict[str, Any]]) -> None:
        """Add events loaded from elsewhere (the shared history) to those received meanwhile:
        one copy of each id, in id (time) order, the newest ``size`` kept."""
        by_id = {event["id"]: event for event in events if isinstance(event.get("id"), str)}
        by_id.update((event["id"], event) for event in self._events)
        self._events.clear()
        self._events.extend(by_id[key] for key in sorted(by_id))

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
