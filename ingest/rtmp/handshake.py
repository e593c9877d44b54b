"""The RTMP handshake: C0 C1 C2 from the client, S0 S1 S2 from us.

Two flavours exist. The plain one (in the spec) just echoes: S2 = C1. The "complex" or digest
one (what Flash, FFmpeg and OBS send: C1 carries a non-zero version at bytes 4..7 and an
HMAC-SHA256 digest at a position derived from C1 itself) expects S1 and S2 to carry digests
made with Adobe's well-known keys; clients that check (FFmpeg when playing, Flash) refuse a
plain echo. We answer in the flavour the client used: digest when C1's digest is valid,
plain echo otherwise.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct

from .errors import RemoteProtocolError

RTMP_VERSION = 3
HANDSHAKE_SIZE = 1536
DIGEST_SIZE = 32

# The keys are public constants of the protocol (every RTMP implementation carries them).
_KEY_TAIL = bytes((
    0xF0, 0xEE, 0xC2, 0x4A, 0x80, 0x68, 0xBE, 0xE8, 0x2E, 0x00, 0xD0, 0xD1, 0x02, 0x9E, 0x7E, 0x57,
    0x6E, 0xEC, 0x5D, 0x2D, 0x29, 0x80, 0x6F, 0xAB, 0x93, 0xB8, 0xE6, 0x36, 0xCF, 0xEB, 0x31, 0xAE,
))
CLIENT_KEY = b"Genuine Adobe Flash Player 001" + _KEY_TAIL  # 30 + 32 bytes
SERVER_KEY = b"Genuine Adobe Flash Media Server 001" + _KEY_TAIL  # 36 + 32 bytes
CLIENT_KEY_SHORT = CLIENT_KEY[:30]
SERVER_KEY_SHORT = SERVER_KEY[:36]

#: What we announce in S1's version field (FMS-like, so strict clients take the digest path).
SERVER_VERSION = bytes((0x0D, 0x0E, 0x0A, 0x0D))
CLIENT_VERSION = bytes((0x09, 0x00, 0x7C, 0x02))  # what FFmpeg sends

# The two C1 layouts: the digest sits after the time+version (schema 0, FFmpeg's) or after
# the 764-byte key block (schema 1, Flash's). Each gives (offset-bytes position, base).
_SCHEMAS = ((8, 12), (772, 776))


def digest_position(block: bytes, schema: int) -> int:
    at, base = _SCHEMAS[schema]
    return (block[at] + block[at + 1] + block[at + 2] + block[at + 3]) % 728 + base


def _hmac(key: bytes, message: bytes) -> bytes:
    return hmac.new(key, message, hashlib.sha256).digest()


def _digest_at(block: bytes, pos: int, key: bytes) -> bytes:
    return _hmac(key, block[:pos] + block[pos + DIGEST_SIZE:])


def find_digest(block: bytes, key: bytes) -> tuple[int, bytes] | None:
    """``(schema, digest)`` when ``block`` (a C1 or S1) carries a valid digest for ``key``."""
    for schema in (0, 1):
        pos = digest_position(block, schema)
        digest = block[pos:pos + DIGEST_SIZE]
        if hmac.compare_digest(digest, _digest_at(block, pos, key)):
            return schema, digest
    return None


def imprint_digest(block: bytearray, schema: int, key: bytes) -> bytes:
    """Write the digest of ``block`` for ``key`` into it; returns the digest."""
    pos = digest_position(bytes(block), schema)
    digest = _digest_at(bytes(block), pos, key)
    block[pos:pos + DIGEST_SIZE] = digest
    return digest


def response_digest(block: bytes, peer_digest: bytes, key: bytes) -> bytes:
    """The digest closing an S2 (or C2): HMAC of its first 1504 bytes with a key derived from
    the peer's C1 (or S1) digest."""
    return _hmac(_hmac(key, peer_digest), block[:HANDSHAKE_SIZE - DIGEST_SIZE])


def server_response(c0: int, c1: bytes, *, epoch: int = 0, random: bytes | None = None) -> tuple[bytes, bool]:
    """S0 + S1 + S2 for a client's C0 and C1; also whether the digest flavour was used.

    ``random`` (1536 * 2 bytes) makes the output deterministic for tests; by default it comes
    from the OS.
    """
    if c0 != RTMP_VERSION:
        # 6 = RTMPE (encrypted), 8/9 = RTMPE variants: not supported; anything else is garbage.
        raise RemoteProtocolError(f"unsupported RTMP version {c0} in C0")
    if len(c1) != HANDSHAKE_SIZE:
        raise RemoteProtocolError("C1 must be 1536 bytes")
    noise = random if random is not None else os.urandom(2 * HANDSHAKE_SIZE)
    s1 = bytearray(noise[:HANDSHAKE_SIZE])
    s1[0:4] = struct.pack(">I", epoch & 0xFFFFFFFF)
    found = find_digest(c1, CLIENT_KEY_SHORT) if c1[4:8] != b"\x00\x00\x00\x00" else None
    if found is None:
        s1[4:8] = b"\x00\x00\x00\x00"
        # Plain handshake: S2 echoes C1 (its time, and our read time as time2).
        s2 = bytearray(c1)
        s2[4:8] = struct.pack(">I", epoch & 0xFFFFFFFF)
        return bytes((RTMP_VERSION,)) + bytes(s1) + bytes(s2), False
    schema, c1_digest = found
    s1[4:8] = SERVER_VERSION
    imprint_digest(s1, schema, SERVER_KEY_SHORT)
    s2 = bytearray(noise[HANDSHAKE_SIZE:])
    s2[HANDSHAKE_SIZE - DIGEST_SIZE:] = response_digest(bytes(s2), c1_digest, SERVER_KEY)
    return bytes((RTMP_VERSION,)) + bytes(s1) + bytes(s2), True


# -- the client side (tests and the load generator) --------------------------------------------
def client_hello(*, digest: bool = True, random: bytes | None = None) -> bytes:
    """C0 + C1; with ``digest`` a C1 carrying a schema-0 digest, as FFmpeg sends."""
    noise = random if random is not None else os.urandom(HANDSHAKE_SIZE)
    c1 = bytearray(noise[:HANDSHAKE_SIZE])
    c1[0:4] = b"\x00\x00\x00\x00"
    if digest:
        c1[4:8] = CLIENT_VERSION
        imprint_digest(c1, 0, CLIENT_KEY_SHORT)
    else:
        c1[4:8] = b"\x00\x00\x00\x00"
    return bytes((RTMP_VERSION,)) + bytes(c1)


def verify_server_response(c1: bytes, s1: bytes, s2: bytes) -> bool:
    """Whether S1/S2 answer C1 correctly in the flavour C1 used (for tests and clients)."""
    c1_found = find_digest(c1, CLIENT_KEY_SHORT) if c1[4:8] != b"\x00\x00\x00\x00" else None
    if c1_found is None:
        return s2[8:] == c1[8:]
    if find_digest(s1, SERVER_KEY_SHORT) is None:
        return False
    expected = response_digest(s2, c1_found[1], SERVER_KEY)
    return hmac.compare_digest(expected, s2[HANDSHAKE_SIZE - DIGEST_SIZE:])


def client_c2(s1: bytes) -> bytes:
    """C2: the plain echo of S1 (servers do not check C2's digest in practice; nor do we)."""
    return bytes(s1)
