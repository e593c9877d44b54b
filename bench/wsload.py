"""Cheap WebSocket viewers for load generation: raw asyncio Protocols, no client library.

A load generator holding 10,000 room viewers on the same 2 cores as the server must cost far
less per socket than the server does, or it measures itself. So:

- the opening handshake (RFC 6455 §4) is done by hand: a GET with ``Upgrade: websocket`` and a
  random ``Sec-WebSocket-Key``; the answer must be ``101`` with the matching
  ``Sec-WebSocket-Accept``. No extension is offered (no permessage-deflate), so server frames
  are plain.
- an ordinary ``Viewer`` then only counts the bytes it reads: no frame parsing. Reading is still
  needed (the kernel buffer is drained, so the server sees a live reader and never finds it
  slow), parsing is not.
- a ``Probe`` (one viewer in K) parses frames with ``FrameParser``, answers pings with (masked)
  pongs and hands every text message to a callback with the time its bytes were read.

Every viewer sends an unsolicited, masked pong now and then (``keepalive_frame``; allowed by
RFC 6455 §5.5.3): the server's heartbeat then never has to ping viewers that do not parse. Every
socket does it, probes included, so probes cost the server exactly what other viewers cost.

The sans-IO parts (``upgrade_request``, ``check_upgrade_response``, ``client_frame``,
``FrameParser``) do no I/O and are usable on their own.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import struct
import time
from collections.abc import Callable
from typing import cast

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
OP_CONTINUATION, OP_TEXT, OP_BINARY = 0x0, 0x1, 0x2
OP_CLOSE, OP_PING, OP_PONG = 0x8, 0x9, 0xA
#: a response head larger than this is not a WebSocket handshake answer
MAX_HEAD = 16 * 1024


class HandshakeError(Exception):
    """The server did not accept the upgrade (status, missing or wrong accept key)."""


class FrameError(Exception):
    """Bytes that are not a valid stream of server frames."""


# ---------------------------------------------------------------- handshake (sans-IO)

def new_key() -> str:
    return base64.b64encode(os.urandom(16)).decode()


def accept_for(key: str) -> str:
    """The ``Sec-WebSocket-Accept`` a server must answer to ``key`` (RFC 6455 §4.2.2)."""
    return base64.b64encode(hashlib.sha1(key.encode() + GUID).digest()).decode()


def upgrade_request(host: str, path: str, key: str) -> bytes:
    return (f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n").encode()


def check_upgrade_response(head: bytes, key: str) -> None:
    """Raise ``HandshakeError`` unless ``head`` (up to the blank line) accepts the upgrade."""
    lines = head.decode("latin-1").split("\r\n")
    status = lines[0].split(" ", 2)
    if len(status) < 2 or status[1] != "101":
        raise HandshakeError(f"upgrade refused: {lines[0]!r}")
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    if headers.get("sec-websocket-accept") != accept_for(key):
        raise HandshakeError("wrong or missing Sec-WebSocket-Accept")
    if "sec-websocket-extensions" in headers:  # none was offered: frames would not be plain
        raise HandshakeError(f"unrequested extension {headers['sec-websocket-extensions']!r}")


# ---------------------------------------------------------------- frames (sans-IO)

def _mask(payload: bytes, key: bytes) -> bytes:
    if not payload:
        return payload
    # XOR as one big integer: far faster in Python than byte by byte
    repeated = (key * (len(payload) // 4 + 1))[:len(payload)]
    masked = int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")
    return masked.to_bytes(len(payload), "big")


def client_frame(opcode: int, payload: bytes = b"") -> bytes:
    """One whole client frame: FIN set, masked with a fresh random key (RFC 6455 §5.3)."""
    size = len(payload)
    if size < 126:
        header = struct.pack("!BB", 0x80 | opcode, 0x80 | size)
    elif size < 1 << 16:
        header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, size)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, size)
    key = os.urandom(4)
    return header + key + _mask(payload, key)


def keepalive_frame() -> bytes:
    """An empty unsolicited pong: proof of life that needs no answer."""
    return client_frame(OP_PONG)


class FrameParser:
    """Server frames in, whole messages out: ``feed(bytes) -> [(opcode, payload), ...]``.

    Handles frames split across reads and several frames per read, 7/16/64-bit lengths, and
    fragmented messages (control frames may arrive between the fragments and are returned at
    once). Server frames are unmasked; a masked one is unmasked anyway. No extension is
    negotiated, so any RSV bit is an error.
    """

    def __init__(self, max_message: int = 64 * 1024 * 1024) -> None:
        self._buffer = bytearray()
        self._max = max_message
        self._fragments: list[bytes] = []
        self._fragment_opcode: int | None = None
        self._fragment_size = 0

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        buffer = self._buffer
        buffer += data
        messages: list[tuple[int, bytes]] = []
        pos, end = 0, len(buffer)
        while end - pos >= 2:
            first, second = buffer[pos], buffer[pos + 1]
            if first & 0x70:
                raise FrameError("RSV bits set, but no extension was negotiated")
            fin, opcode = first & 0x80, first & 0x0F
            masked, size = second & 0x80, second & 0x7F
            header = 2
            if size == 126:
                if end - pos < 4:
                    break
                size = struct.unpack_from("!H", buffer, pos + 2)[0]
                header = 4
            elif size == 127:
                if end - pos < 10:
                    break
                size = struct.unpack_from("!Q", buffer, pos + 2)[0]
                header = 10
            if size > self._max:
                raise FrameError(f"frame of {size} bytes is over the limit")
            if masked:
                header += 4
            if end - pos < header + size:
                break
            payload = bytes(buffer[pos + header:pos + header + size])
            if masked:
                payload = _mask(payload, bytes(buffer[pos + header - 4:pos + header]))
            pos += header + size
            message = self._frame(fin, opcode, size, payload)
            if message is not None:
                messages.append(message)
        del buffer[:pos]
        return messages

    def _frame(self, fin: int, opcode: int, size: int,
               payload: bytes) -> tuple[int, bytes] | None:
        if opcode >= 0x8:
            if not fin or size > 125:
                raise FrameError("control frames are whole and at most 125 bytes")
            return opcode, payload
        if opcode == OP_CONTINUATION:
            if self._fragment_opcode is None:
                raise FrameError("continuation frame outside a fragmented message")
        elif opcode in (OP_TEXT, OP_BINARY):
            if self._fragment_opcode is not None:
                raise FrameError("new message before the previous one was finished")
            if fin:
                return opcode, payload
            self._fragment_opcode, self._fragments, self._fragment_size = opcode, [], 0
        else:
            raise FrameError(f"reserved opcode {opcode:#x}")
        self._fragments.append(payload)
        self._fragment_size += size
        if self._fragment_size > self._max:
            raise FrameError("fragmented message over the limit")
        if not fin:
            return None
        whole = (self._fragment_opcode, b"".join(self._fragments))
        self._fragment_opcode, self._fragments = None, []
        return whole


# ---------------------------------------------------------------- protocols

class Viewer(asyncio.Protocol):
    """A room viewer that reads everything and parses nothing once the upgrade is done."""

    def __init__(self, host: str, path: str) -> None:
        self.host, self.path = host, path
        self.key = new_key()
        self.transport: asyncio.Transport | None = None
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.open = False
        self.lost = False  # the connection ended (by the server, or by us at the end)
        self.received = 0  # bytes read after the handshake
        self._head = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(upgrade_request(self.host, self.path, self.key))

    def data_received(self, data: bytes) -> None:
        if self.open:  # the hot path of 10,000 sockets: count and return
            self.received += len(data)
            return
        self._head += data
        end = self._head.find(b"\r\n\r\n")
        if end < 0:
            if len(self._head) > MAX_HEAD:
                self._fail(HandshakeError("no end to the response head"))
            return
        try:
            check_upgrade_response(bytes(self._head[:end]), self.key)
        except HandshakeError as exc:
            self._fail(exc)
            return
        rest = bytes(self._head[end + 4:])
        self._head = bytearray()
        self.open = True
        if not self.opened.done():
            self.opened.set_result(None)
        if rest:  # frames that came in the same read as the head
            self.data_received(rest)

    def _fail(self, exc: Exception) -> None:
        if not self.opened.done():
            self.opened.set_exception(exc)
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if not self.opened.done():
            self.opened.set_exception(exc or ConnectionError("closed during the handshake"))

    def send(self, frame: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(frame)


#: a probe's text messages: (payload, time.time() when the bytes carrying it were read)
OnText = Callable[[bytes, float], None]


class Probe(Viewer):
    """A viewer that parses its frames: text messages go to ``on_text``, pings get pongs."""

    def __init__(self, host: str, path: str, on_text: OnText) -> None:
        super().__init__(host, path)
        self.parser = FrameParser()
        self.on_text = on_text
        self.server_closed = False  # the server sent a close frame
        self.error: str | None = None  # what made the frame stream unreadable

    def data_received(self, data: bytes) -> None:
        if not self.open:
            super().data_received(data)
            return
        now = time.time()  # before parsing: parsing earlier frames must not add latency
        self.received += len(data)
        try:
            messages = self.parser.feed(data)
        except FrameError as exc:  # counted by the caller; raising here would only be logged
            self.error = str(exc)
            self._fail(exc)
            return
        for opcode, payload in messages:
            if opcode == OP_TEXT:
                self.on_text(payload, now)
            elif opcode == OP_PING:
                self.send(client_frame(OP_PONG, payload))
            elif opcode == OP_CLOSE:
                self.server_closed = True
                self.send(client_frame(OP_CLOSE, payload[:2]))  # echo the status code
                if self.transport is not None:
                    self.transport.close()
