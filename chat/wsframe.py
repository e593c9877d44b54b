"""WebSocket server frames (RFC 6455 §5.2), built once and written to many sockets.

A server's frames are never masked, so the bytes of a frame do not depend on the socket: the
room builds a frame once per flush and every viewer's transport gets the same ``bytes``.
Sans-IO: bytes in, bytes out.
"""

from __future__ import annotations

import struct

_FIN_TEXT = 0x81  # FIN + opcode 1 (text)


def text_frame(payload: bytes) -> bytes:
    """One unfragmented, unmasked text frame carrying ``payload`` (UTF-8 JSON)."""
    size = len(payload)
    if size < 126:
        header = bytes((_FIN_TEXT, size))
    elif size < 1 << 16:
        header = struct.pack("!BBH", _FIN_TEXT, 126, size)
    else:
        header = struct.pack("!BBQ", _FIN_TEXT, 127, size)
    return header + payload
