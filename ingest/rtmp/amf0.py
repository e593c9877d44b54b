"""AMF0, the encoding of RTMP commands and metadata.

Python values map to AMF0 as: float/int → number, bool → boolean, str → string (long string
past 65535 bytes), dict → object, ``EcmaArray`` → ECMA array, list/tuple → strict array,
None → null, ``UNDEFINED`` → undefined, ``AmfDate`` → date. Decoding gives the same types
back, so a round trip is exact. Malformed input raises ``AmfError`` (a remote protocol error):
truncation, unknown markers, absurd lengths and too-deep nesting never escape as another error.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from .errors import AmfError

NUMBER = 0x00
BOOLEAN = 0x01
STRING = 0x02
OBJECT = 0x03
NULL = 0x05
UNDEFINED_MARKER = 0x06
ECMA_ARRAY = 0x08
OBJECT_END = 0x09
STRICT_ARRAY = 0x0A
DATE = 0x0B
LONG_STRING = 0x0C
TYPED_OBJECT = 0x10

#: Nesting deeper than this is refused: a hostile peer must not exhaust the stack.
MAX_DEPTH = 32

_DOUBLE = struct.Struct(">d")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_DATE = struct.Struct(">dh")


class _Undefined:
    __slots__ = ()

    def __repr__(self) -> str:
        return "UNDEFINED"


UNDEFINED: Any = _Undefined()


class EcmaArray(dict):  # type: ignore[type-arg]
    """An AMF0 ECMA array (an associative array; onMetaData is usually one)."""


@dataclass(frozen=True, slots=True)
class AmfDate:
    milliseconds: float  # since the Unix epoch, UTC
    timezone: int = 0  # minutes; "reserved, should be 0" in the spec, kept for round trips


# -- encoding ---------------------------------------------------------------------------------
def encode(*values: Any) -> bytes:
    out = bytearray()
    for value in values:
        _encode(out, value, 0)
    return bytes(out)


def _encode_key(out: bytearray, key: str) -> None:
    raw = key.encode()
    if not raw:
        raise ValueError("AMF0 property names cannot be empty (that is the object-end marker)")
    if len(raw) > 0xFFFF:
        raise ValueError("AMF0 property names are limited to 65535 bytes")
    out += _U16.pack(len(raw))
    out += raw


def _encode(out: bytearray, value: Any, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise ValueError("AMF0 value nested too deeply")
    if value is None:
        out.append(NULL)
    elif value is UNDEFINED:
        out.append(UNDEFINED_MARKER)
    elif isinstance(value, bool):
        out.append(BOOLEAN)
        out.append(1 if value else 0)
    elif isinstance(value, int | float):
        out.append(NUMBER)
        out += _DOUBLE.pack(float(value))
    elif isinstance(value, str):
        raw = value.encode()
        if len(raw) > 0xFFFF:
            out.append(LONG_STRING)
            out += _U32.pack(len(raw))
        else:
            out.append(STRING)
            out += _U16.pack(len(raw))
        out += raw
    elif isinstance(value, AmfDate):
        out.append(DATE)
        out += _DATE.pack(value.milliseconds, value.timezone)
    elif isinstance(value, EcmaArray):
        out.append(ECMA_ARRAY)
        out += _U32.pack(len(value))
        _encode_properties(out, value, depth)
    elif isinstance(value, dict):
        out.append(OBJECT)
        _encode_properties(out, value, depth)
    elif isinstance(value, list | tuple):
        out.append(STRICT_ARRAY)
        out += _U32.pack(len(value))
        for item in value:
            _encode(out, item, depth + 1)
    else:
        raise TypeError(f"cannot encode {type(value).__name__} as AMF0")


def _encode_properties(out: bytearray, mapping: dict[str, Any], depth: int) -> None:
    for key, item in mapping.items():
        _encode_key(out, str(key))
        _encode(out, item, depth + 1)
    out += b"\x00\x00\x09"


# -- decoding ---------------------------------------------------------------------------------
def decode(data: bytes | memoryview) -> list[Any]:
    """Every value in ``data`` (a command is a sequence of values)."""
    data = bytes(data)
    values: list[Any] = []
    pos = 0
    end = len(data)
    while pos < end:
        value, pos = _decode(data, pos, 0)
        values.append(value)
    return values


def decode_one(data: bytes, pos: int = 0) -> tuple[Any, int]:
    """One value at ``pos``; returns it and the position after it."""
    return _decode(data, pos, 0)


def _need(data: bytes, pos: int, n: int) -> None:
    if pos + n > len(data):
        raise AmfError("truncated AMF0 value")


def _decode(data: bytes, pos: int, depth: int) -> tuple[Any, int]:
    if depth > MAX_DEPTH:
        raise AmfError("AMF0 value nested too deeply")
    _need(data, pos, 1)
    marker = data[pos]
    pos += 1
    if marker == NUMBER:
        _need(data, pos, 8)
        return _DOUBLE.unpack_from(data, pos)[0], pos + 8
    if marker == BOOLEAN:
        _need(data, pos, 1)
        return data[pos] != 0, pos + 1
    if marker == STRING:
        return _decode_utf8(data, pos, 2)
    if marker == LONG_STRING:
        return _decode_utf8(data, pos, 4)
    if marker == OBJECT:
        obj: dict[str, Any] = {}
        return obj, _decode_properties(data, pos, depth, obj)
    if marker == TYPED_OBJECT:
        _class_name, pos = _decode_utf8(data, pos, 2)
        obj = {}
        return obj, _decode_properties(data, pos, depth, obj)
    if marker == ECMA_ARRAY:
        _need(data, pos, 4)
        # The count is a hint only (encoders get it wrong); the end marker is what counts.
        array = EcmaArray()
        return array, _decode_properties(data, pos + 4, depth, array, lenient_end=True)
    if marker == STRICT_ARRAY:
        _need(data, pos, 4)
        count = _U32.unpack_from(data, pos)[0]
        pos += 4
        if count > len(data) - pos:  # every element takes at least one byte
            raise AmfError(f"AMF0 strict array claims {count} elements, more than the bytes left")
        items = []
        for _ in range(count):
            item, pos = _decode(data, pos, depth + 1)
            items.append(item)
        return items, pos
    if marker == NULL:
        return None, pos
    if marker == UNDEFINED_MARKER:
        return UNDEFINED, pos
    if marker == DATE:
        _need(data, pos, 10)
        millis, tz = _DATE.unpack_from(data, pos)
        return AmfDate(millis, tz), pos + 10
    if marker == OBJECT_END:
        raise AmfError("AMF0 object-end marker outside an object")
    raise AmfError(f"unsupported AMF0 marker 0x{marker:02x}")


def _decode_utf8(data: bytes, pos: int, width: int) -> tuple[str, int]:
    _need(data, pos, width)
    length = _U16.unpack_from(data, pos)[0] if width == 2 else _U32.unpack_from(data, pos)[0]
    pos += width
    _need(data, pos, length)
    try:
        text = data[pos:pos + length].decode()
    except UnicodeDecodeError:
        # Some encoders put Latin-1 in metadata; keep the value rather than refuse the stream.
        text = data[pos:pos + length].decode("latin-1")
    return text, pos + length


def _decode_properties(data: bytes, pos: int, depth: int, into: dict[str, Any], *,
                       lenient_end: bool = False) -> int:
    while True:
        if lenient_end and pos == len(data):
            # Some encoders end an ECMA array at the end of the message without the marker.
            return pos
        _need(data, pos, 2)
        key_len = _U16.unpack_from(data, pos)[0]
        if key_len == 0:
            _need(data, pos, 3)
            if data[pos + 2] != OBJECT_END:
                raise AmfError("AMF0 empty property name without the object-end marker")
            return pos + 3
        key, pos = _decode_utf8(data, pos, 2)
        value, pos = _decode(data, pos, depth + 1)
        into[key] = value
