"""A receive buffer with consume/commit/rollback, as wsproto's frame parser has.

Parsers ``consume`` what they need; when a unit turns out incomplete they ``rollback`` to
the last ``commit`` and wait for more bytes, so no parser ever keeps half-read state of its
own. The buffer is an immutable ``bytes`` plus a read offset: feeding bytes into an empty
buffer costs no copy at all (the common case when a whole read is parsed), and slices handed
out as ``memoryview`` stay valid because the underlying ``bytes`` never changes.
"""

from __future__ import annotations


class ReceiveBuffer:
    __slots__ = ("_data", "_mark", "_pos")

    def __init__(self) -> None:
        self._data = b""
        self._pos = 0  # tentative read position
        self._mark = 0  # last committed position

    def feed(self, data: bytes) -> None:
        if self._mark >= len(self._data):
            self._data = bytes(data)
            self._pos -= self._mark
            self._mark = 0
        else:
            # Only the unparsed tail is copied (a partial header: a few bytes).
            self._data = self._data[self._mark:] + data
            self._pos -= self._mark
            self._mark = 0

    def __len__(self) -> int:
        """Bytes available from the tentative position."""
        return len(self._data) - self._pos

    @property
    def committed_len(self) -> int:
        """Bytes held that are not yet committed (what a limit on buffering should count)."""
        return len(self._data) - self._mark

    def consume(self, n: int) -> memoryview | None:
        """The next ``n`` bytes (zero-copy), or None when fewer are buffered."""
        pos = self._pos
        end = pos + n
        if end > len(self._data):
            return None
        self._pos = end
        return memoryview(self._data)[pos:end]

    def consume_at_most(self, n: int) -> memoryview:
        pos = self._pos
        end = min(pos + n, len(self._data))
        self._pos = end
        return memoryview(self._data)[pos:end]

    def commit(self) -> None:
        self._mark = self._pos
        if self._mark >= len(self._data) and self._data:
            self._data = b""
            self._pos = self._mark = 0

    def rollback(self) -> None:
        self._pos = self._mark

    # -- for the chunk reader's hot loop: direct, position-based access ----------------------
    @property
    def raw(self) -> bytes:
        return self._data

    @property
    def position(self) -> int:
        return self._pos

    def advance_to(self, pos: int) -> None:
        self._pos = pos
