"""The RTMP chunk stream: messages cut into chunks, interleaved over chunk stream ids.

``ChunkReader`` turns received bytes into whole ``Message``s; ``ChunkWriter`` does the
reverse. Both are sans-IO. The reader applies the two control messages that change how the
following bytes parse (Set Chunk Size, Abort) itself, at the exact point they arrive, and
still reports them so the connection can see them.

Performance and memory: the reader walks the receive buffer by position with
``struct.unpack_from``. A message that arrives whole in one chunk is one ``bytes`` slice; any
other message is copied once into ONE ``bytearray`` sized from its header, so a message costs
one object and one copy whatever its chunk size (per-chunk ``bytes`` pieces joined at the end
cost a second copy, and at tiny chunk sizes 14-21x the payload in object overhead). No per-byte
Python work happens on media payloads.

What a peer makes us hold is counted when a message's header announces it (that is when its
buffer is allocated), per connection (``max_partial_bytes``) and, through a shared
``PartialBudget``, across all connections of a server.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

from .buffer import ReceiveBuffer
from .errors import LocalProtocolError, RemoteProtocolError

# message type ids
SET_CHUNK_SIZE = 1
ABORT = 2
ACKNOWLEDGEMENT = 3
USER_CONTROL = 4
WINDOW_ACK_SIZE = 5
SET_PEER_BANDWIDTH = 6
AUDIO = 8
VIDEO = 9
DATA_AMF3 = 15
SHARED_OBJECT_AMF3 = 16
COMMAND_AMF3 = 17
DATA_AMF0 = 18
SHARED_OBJECT_AMF0 = 19
COMMAND_AMF0 = 20
AGGREGATE = 22

KNOWN_TYPES = frozenset({1, 2, 3, 4, 5, 6, 8, 9, 15, 16, 17, 18, 19, 20, 22})

DEFAULT_CHUNK_SIZE = 128
#: Smallest chunk size a peer may set. Each chunk costs a pass of the Python header loop, so
#: tiny chunks turn a peer's bytes into our CPU many times over. 128 is the spec's default;
#: FFmpeg and OBS raise it (to 4096) and never lower it; SRS refuses anything below 128 too.
MIN_CHUNK_SIZE = 128
MAX_CHUNK_SIZE = 0x7FFFFFFF
MIN_CSID = 2
MAX_CSID = 65599
EXTENDED = 0xFFFFFF

_U24_PAIR = struct.Struct(">I")  # read 4 bytes and shift: cheaper than three byte reads
_U32 = struct.Struct(">I")
_U32LE = struct.Struct("<I")
_HEADER_SIZE = (11, 7, 3, 0)


class Message:
    """One complete RTMP message. A plain slotted class: one is made per media frame."""

    __slots__ = ("csid", "payload", "stream_id", "timestamp", "type_id")

    def __init__(self, csid: int, type_id: int, stream_id: int, timestamp: int,
                 payload: bytes | bytearray) -> None:
        self.csid = csid
        self.type_id = type_id
        self.stream_id = stream_id
        self.timestamp = timestamp  # milliseconds, 32-bit (wraps)
        self.payload = payload

    def __repr__(self) -> str:
        return (f"Message(csid={self.csid}, type={self.type_id}, stream={self.stream_id}, "
                f"ts={self.timestamp}, {len(self.payload)} bytes)")


class PartialBudget:
    """Bytes of unfinished messages held by all the readers sharing it (one per server): each
    connection is bounded, but thousands of bounded connections are not, without this."""

    __slots__ = ("limit", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    @property
    def spent(self) -> bool:
        return self.used >= self.limit


class _ChunkStream:
    __slots__ = ("buf", "delta", "ext", "ext_value", "length", "received", "reserved", "stream_id",
                 "timestamp", "type_id", "view")

    def __init__(self) -> None:
        self.timestamp = 0
        self.delta = 0
        self.length = 0
        self.type_id = 0
        self.stream_id = 0
        self.ext = False  # the last header of this chunk stream used an extended timestamp
        self.ext_value = 0
        self.buf: bytearray | None = None  # the current message, allocated at its first chunk
        self.view: memoryview | None = None  # on ``buf``: what the chunks are copied through
        self.received = 0  # bytes of the current message received so far
        self.reserved = 0  # bytes counted against the limits for the current message


class ChunkReader:
    """Bytes in, complete messages out. Raises ``RemoteProtocolError`` on bad input or when a
    limit is exceeded; after that the reader must not be used again."""

    def __init__(self, *, max_message_size: int = 16 * 1024 * 1024,
                 max_partial_bytes: int = 32 * 1024 * 1024, max_chunk_streams: int = 64,
                 min_chunk_size: int = MIN_CHUNK_SIZE, budget: PartialBudget | None = None) -> None:
        self.chunk_size = DEFAULT_CHUNK_SIZE
        self.min_chunk_size = min_chunk_size
        self.max_message_size = max_message_size
        #: bytes of unfinished messages across all chunk streams (what a hostile peer could
        #: make us hold by starting many messages and finishing none), counted as announced
        self.max_partial_bytes = max_partial_bytes
        self.max_chunk_streams = max_chunk_streams
        self.partial_bytes = 0
        self.budget = budget
        self._buffer = ReceiveBuffer()
        self._streams: dict[int, _ChunkStream] = {}
        self._current: _ChunkStream | None = None  # the chunk whose payload we are inside
        self._current_csid = 0
        self._chunk_left = 0

    def feed(self, data: bytes) -> None:
        self._buffer.feed(data)

    @property
    def buffered(self) -> int:
        return self._buffer.committed_len

    def read_messages(self) -> list[Message]:
        """Every message completed by the bytes fed so far, in order."""
        out: list[Message] = []
        rbuf = self._buffer
        data = rbuf.raw
        pos = rbuf.position
        end = len(data)
        view = memoryview(data)
        streams = self._streams
        try:
            while pos < end:
                cs = self._current
                if cs is not None:
                    # inside a chunk's payload: take what is there (maybe not all of it yet)
                    n = self._chunk_left
                    if n > end - pos:
                        n = end - pos
                    received = cs.received
                    if received == 0 and n == cs.length:
                        # the whole message in one chunk, all received: one slice, no buffer
                        # (the slice is the very same object when it spans all of ``data``)
                        pos += n
                        cs.received = n
                        self._chunk_left = 0
                        self._current = None
                        self._complete(cs, self._current_csid, data[pos - n:pos], out)
                        continue
                    target = cs.view
                    if target is None:
                        cs.buf = bytearray(cs.length)
                        target = cs.view = memoryview(cs.buf)
                    # Through memoryviews on both sides: one memcpy. (``bytearray[a:b] = x``
                    # first copies any x that is not a bytearray into a new one.)
                    target[received:received + n] = view[pos:pos + n]
                    pos += n
                    cs.received = received + n
                    self._chunk_left -= n
                    if self._chunk_left == 0:
                        self._current = None
                        if cs.received >= cs.length:
                            buf = cs.buf
                            assert buf is not None
                            self._complete(cs, self._current_csid, buf, out)
                    continue

                # -- a chunk header: basic header, then the message header of its fmt --------
                start = pos
                b0 = data[pos]
                fmt = b0 >> 6
                csid = b0 & 0x3F
                pos += 1
                if csid == 0:
                    if pos >= end:
                        pos = start
                        break
                    csid = data[pos] + 64
                    pos += 1
                elif csid == 1:
                    if pos + 2 > end:
                        pos = start
                        break
                    csid = data[pos] + (data[pos + 1] << 8) + 64
                    pos += 2
                hsize = _HEADER_SIZE[fmt]
                if pos + hsize > end:
                    pos = start
                    break
                cs = streams.get(csid)
                if cs is None:
                    if fmt != 0:
                        # fmt 1/2/3 reuse fields of an earlier header that never came
                        raise RemoteProtocolError(f"chunk stream {csid} starts with a type-{fmt} header")
                    if len(streams) >= self.max_chunk_streams:
                        raise RemoteProtocolError(f"more than {self.max_chunk_streams} chunk streams")
                    cs = streams[csid] = _ChunkStream()
                # received == 0: no message in progress on this chunk stream (a message's first
                # chunk always carries at least one byte)
                new_message = fmt != 3 or cs.received == 0
                if fmt == 0:
                    field = _U24_PAIR.unpack_from(data, pos - 1)[0] & 0xFFFFFF
                    length = _U24_PAIR.unpack_from(data, pos + 2)[0] & 0xFFFFFF
                    type_id = data[pos + 6]
                    stream_id = _U32LE.unpack_from(data, pos + 7)[0]
                elif fmt == 1:
                    field = _U24_PAIR.unpack_from(data, pos - 1)[0] & 0xFFFFFF
                    length = _U24_PAIR.unpack_from(data, pos + 2)[0] & 0xFFFFFF
                    type_id = data[pos + 6]
                    stream_id = cs.stream_id
                elif fmt == 2:
                    field = _U24_PAIR.unpack_from(data, pos - 1)[0] & 0xFFFFFF
                    length = cs.length
                    type_id = cs.type_id
                    stream_id = cs.stream_id
                else:
                    field = -1
                    length = cs.length
                    type_id = cs.type_id
                    stream_id = cs.stream_id
                pos += hsize
                if fmt != 3:
                    ext = field == EXTENDED
                    if ext:
                        if pos + 4 > end:
                            pos = start
                            break
                        field = _U32.unpack_from(data, pos)[0]
                        pos += 4
                elif new_message:
                    ext = cs.ext
                    if ext:
                        if pos + 4 > end:
                            pos = start
                            break
                        field = _U32.unpack_from(data, pos)[0]
                        pos += 4
                    else:
                        field = cs.delta
                else:
                    # A continuation chunk. Writers differ on whether it repeats the extended
                    # timestamp (the spec and FFmpeg/OBS: yes; some: no): skip it when the next
                    # four bytes equal it, as SRS and nginx-rtmp do.
                    if cs.ext:
                        if pos + 4 > end:
                            pos = start
                            break
                        if _U32.unpack_from(data, pos)[0] == cs.ext_value:
                            pos += 4
                    ext = cs.ext

                if new_message:
                    if cs.reserved:  # a new header before the last message was complete
                        self._release(cs)
                    if length > self.max_message_size:
                        raise RemoteProtocolError(
                            f"message of {length} bytes exceeds the limit of {self.max_message_size}")
                    if fmt == 0:
                        cs.timestamp = field
                    else:
                        cs.timestamp = (cs.timestamp + field) & 0xFFFFFFFF
                    cs.delta = field
                    cs.ext = ext
                    cs.ext_value = field
                    cs.length = length
                    cs.type_id = type_id
                    cs.stream_id = stream_id
                    if length == 0:
                        self._complete(cs, csid, b"", out)
                        continue
                    self._reserve(cs, length)
                left = cs.length - cs.received
                self._chunk_left = left if left < self.chunk_size else self.chunk_size
                self._current = cs
                self._current_csid = csid
        finally:
            rbuf.advance_to(pos)
            rbuf.commit()
        return out

    def _reserve(self, cs: _ChunkStream, length: int) -> None:
        """Count a message announced by its header against the limits, before its buffer
        exists: the header is what makes us allocate it, not the bytes that follow."""
        if self.partial_bytes + length > self.max_partial_bytes:
            raise RemoteProtocolError("too many bytes of unfinished messages")
        budget = self.budget
        if budget is not None:
            if budget.used + length > budget.limit:
                raise RemoteProtocolError("server-wide limit of bytes in unfinished messages reached")
            budget.used += length
        self.partial_bytes += length
        cs.reserved = length

    def _release(self, cs: _ChunkStream) -> None:
        reserved = cs.reserved
        if reserved:
            self.partial_bytes -= reserved
            if self.budget is not None:
                self.budget.used -= reserved
            cs.reserved = 0
        if cs.view is not None:
            cs.view.release()  # the finished bytearray goes on without an export pinning it
            cs.view = None
        cs.buf = None
        cs.received = 0

    def release(self) -> None:
        """Give back everything held (the connection is closed or failed): its unfinished
        messages must stop counting against the server-wide budget."""
        for cs in self._streams.values():
            self._release(cs)
        self._current = None
        self._chunk_left = 0

    def _complete(self, cs: _ChunkStream, csid: int, payload: bytes | bytearray,
                  out: list[Message]) -> None:
        self._release(cs)
        type_id = cs.type_id
        if type_id == SET_CHUNK_SIZE:
            self._apply_chunk_size(payload)
        elif type_id == ABORT:
            self._abort(payload)
        out.append(Message(csid, type_id, cs.stream_id, cs.timestamp, payload))

    def _apply_chunk_size(self, payload: bytes | bytearray) -> None:
        if len(payload) < 4:
            raise RemoteProtocolError("Set Chunk Size message shorter than 4 bytes")
        size = _U32.unpack_from(payload, 0)[0] & 0x7FFFFFFF  # the top bit must be 0
        if size < 1 or size < self.min_chunk_size:
            raise RemoteProtocolError(f"Set Chunk Size to {size}, below the minimum of "
                                      f"{max(1, self.min_chunk_size)}")
        self.chunk_size = size

    def _abort(self, payload: bytes | bytearray) -> None:
        if len(payload) < 4:
            raise RemoteProtocolError("Abort message shorter than 4 bytes")
        csid = _U32.unpack_from(payload, 0)[0]
        cs = self._streams.get(csid)
        if cs is not None and cs.reserved:
            self._release(cs)
            if self._current is cs:
                self._current = None
                self._chunk_left = 0


# -- writing ----------------------------------------------------------------------------------
def basic_header(fmt: int, csid: int) -> bytes:
    if csid < MIN_CSID or csid > MAX_CSID:
        raise LocalProtocolError(f"chunk stream id {csid} is outside 2..65599")
    if csid < 64:
        return bytes(((fmt << 6) | csid,))
    if csid < 320:
        return bytes((fmt << 6, csid - 64))
    rest = csid - 64
    return bytes(((fmt << 6) | 1, rest & 0xFF, rest >> 8))


class ChunkWriter:
    """Messages in, chunk bytes out. Compresses headers the way FFmpeg and OBS do: a type-0
    header first on a chunk stream (and whenever the message stream changes or time goes
    backwards), type 1 for a new length or type, type 2 for a new delta only, type 3 when the
    delta repeats too."""

    def __init__(self, chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        self.chunk_size = chunk_size
        # csid -> (timestamp, field, length, type_id, stream_id, last fmt)
        self._last: dict[int, tuple[int, int, int, int, int, int]] = {}

    def write(self, csid: int, type_id: int, stream_id: int, timestamp: int,
              payload: bytes | bytearray | memoryview, *, fmt: int | None = None) -> bytes:
        """The chunks of one message. ``fmt`` forces a header type (tests use it)."""
        parts: list[bytes | memoryview] = []
        self.write_into(parts, csid, type_id, stream_id, timestamp, payload, fmt=fmt)
        return b"".join(parts)

    def write_into(self, parts: list[bytes | memoryview], csid: int, type_id: int, stream_id: int,
                   timestamp: int, payload: bytes | bytearray | memoryview, *,
                   fmt: int | None = None) -> None:
        length = len(payload)
        if length > 0xFFFFFF:
            raise LocalProtocolError("RTMP messages are limited to 16 MiB")
        timestamp &= 0xFFFFFFFF
        last = self._last.get(csid)
        if fmt is None:
            if last is None or last[4] != stream_id or timestamp < last[0]:
                fmt = 0
            elif last[2] != length or last[3] != type_id:
                fmt = 1
            elif timestamp - last[0] != last[1] or last[5] == 0:
                fmt = 2
            else:
                fmt = 3
        elif fmt != 0 and last is None:
            raise LocalProtocolError(f"a type-{fmt} header needs an earlier header on chunk stream {csid}")
        field = timestamp if fmt == 0 else timestamp - last[0]  # type: ignore[index]
        ext = field >= EXTENDED
        short = EXTENDED if ext else field
        header = basic_header(fmt, csid)
        if fmt == 0:
            header += (short.to_bytes(3, "big") + length.to_bytes(3, "big") + bytes((type_id,))
                       + _U32LE.pack(stream_id))
        elif fmt == 1:
            header += short.to_bytes(3, "big") + length.to_bytes(3, "big") + bytes((type_id,))
        elif fmt == 2:
            header += short.to_bytes(3, "big")
        elif fmt == 3 and last is not None and field != last[1]:
            raise LocalProtocolError("a type-3 header must repeat the previous delta")
        ext_bytes = _U32.pack(field) if ext else b""
        self._last[csid] = (timestamp, field, length, type_id, stream_id, fmt)
        size = self.chunk_size
        view = memoryview(payload)
        parts.append(header + ext_bytes)
        parts.append(view[:size])
        if length > size:
            continuation = basic_header(3, csid) + ext_bytes
            for offset in range(size, length, size):
                parts.append(continuation)
                parts.append(view[offset:offset + size])

    def control(self, type_id: int, payload: bytes) -> bytes:
        """A protocol control message: chunk stream 2, message stream 0."""
        if type_id == SET_CHUNK_SIZE:
            data = self.write(2, type_id, 0, 0, payload)
            self.chunk_size = _U32.unpack_from(payload, 0)[0]  # applies to what follows it
            return data
        return self.write(2, type_id, 0, 0, payload)


def set_chunk_size(size: int) -> bytes:
    if not 1 <= size <= MAX_CHUNK_SIZE:
        raise LocalProtocolError("chunk size must be within 1..0x7FFFFFFF")
    return _U32.pack(size)


def iter_aggregate(payload: bytes, base_timestamp: int) -> Iterable[tuple[int, int, bytes]]:
    """The (type_id, timestamp, payload) sub-messages of an Aggregate message: FLV tags whose
    timestamps are shifted so the first one lands on the aggregate's own timestamp."""
    pos = 0
    end = len(payload)
    first: int | None = None
    while pos + 11 <= end:
        type_id = payload[pos]
        size = int.from_bytes(payload[pos + 1:pos + 4], "big")
        ts = int.from_bytes(payload[pos + 4:pos + 7], "big") | (payload[pos + 7] << 24)
        pos += 11
        if pos + size > end:
            raise RemoteProtocolError("aggregate message truncated")
        if first is None:
            first = ts
        yield type_id, (base_timestamp + ts - first) & 0xFFFFFFFF, payload[pos:pos + size]
        pos += size + 4  # the FLV "previous tag size"
