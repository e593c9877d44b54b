"""H.264 over RTP (RFC 6184), the wire format of WHEP video: pure functions, no I/O.

The hub carries AVCC access units with the parameter sets out of band (``livesrv.media``);
an RTP receiver needs them in band. ``access_unit_nals`` puts SPS and PPS in front of every
keyframe (a viewer that joins, or recovers from loss, can decode from any IDR) and drops
what a receiver must not see (access unit delimiters, stray parameter sets, filler).
``packetize`` then cuts the NAL units into RTP payloads (packetization-mode 1): small units
are aggregated into STAP-A packets (the parameter sets travel as one), large ones fragmented
into FU-A packets, none longer than ``max_payload``.

This is done once per stream for all its viewers (``webrtc_media``); only encryption and the
RTP header are per viewer.
"""

from __future__ import annotations

from collections.abc import Iterable

from livesrv.annexb import NAL_AUD, NAL_IDR, NAL_PPS, NAL_SPS, iter_avcc

NAL_FILLER = 12
NAL_STAP_A = 24
NAL_FU_A = 28
#: fits a 1200-byte RTP payload in the smallest path MTU WebRTC plans for, after the RTP
#: header (12), header extensions (~16) and SRTP's authentication tag (10)
DEFAULT_MAX_PAYLOAD = 1200
#: units never sent: delimiters and filler carry nothing, and parameter sets are sent by us
#: (from the track's avcC) in front of each keyframe, so a publisher's in-band copies go
_DROPPED = frozenset({NAL_AUD, NAL_FILLER, NAL_SPS, NAL_PPS})


def access_unit_nals(payload: bytes, keyframe: bool, parameter_sets: list[bytes],
                     length_size: int = 4) -> list[bytes]:
    """The NAL units to send for one AVCC access unit: parameter sets first on keyframes."""
    nals = [nal for nal in iter_avcc(payload, length_size) if nal and (nal[0] & 0x1F) not in _DROPPED]
    if keyframe or any((nal[0] & 0x1F) == NAL_IDR for nal in nals):
        return [*parameter_sets, *nals]
    return nals


def packetize(nals: Iterable[bytes], max_payload: int = DEFAULT_MAX_PAYLOAD) -> list[bytes]:
    """RTP payloads (packetization-mode 1) for the NAL units of one access unit, in order."""
    payloads: list[bytes] = []
    pending: list[bytes] = []  # small units waiting to be aggregated into one STAP-A
    pending_size = 1  # the STAP-A header byte

    def flush() -> None:
        nonlocal pending, pending_size
        if len(pending) == 1:
            payloads.append(pending[0])  # a single unit needs no aggregation header
        elif pending:
            nri = max(nal[0] & 0x60 for nal in pending)
            parts = [bytes((nri | NAL_STAP_A,))]
            for nal in pending:
                parts.append(len(nal).to_bytes(2, "big"))
                parts.append(nal)
            payloads.append(b"".join(parts))
        pending = []
        pending_size = 1

    for nal in nals:
        if len(nal) > max_payload:
            flush()
            payloads.extend(_fragment(nal, max_payload))
            continue
        if pending_size + 2 + len(nal) > max_payload:
            flush()
        pending.append(nal)
        pending_size += 2 + len(nal)
    flush()
    return payloads


def _fragment(nal: bytes, max_payload: int) -> list[bytes]:
    """FU-A fragments of one NAL unit (its header byte is carried in the FU indicator/header)."""
    header = nal[0]
    indicator = bytes(((header & 0xE0) | NAL_FU_A,))
    kind = header & 0x1F
    chunk = max_payload - 2
    body = memoryview(nal)[1:]
    out = []
    for start in range(0, len(body), chunk):
        first = start == 0
        last = start + chunk >= len(body)
        fu_header = kind | (0x80 if first else 0) | (0x40 if last else 0)
        out.append(indicator + bytes((fu_header,)) + body[start:start + chunk])
    return out


# -- profile-level-id (RFC 6184 8.1) -----------------------------------------------------------
#: profiles by (profile_idc, constraint flags that matter): the names SDP offers use
CONSTRAINED_BASELINE = "constrained-baseline"
BASELINE = "baseline"
MAIN = "main"
CONSTRAINED_HIGH = "constrained-high"
HIGH = "high"

#: which decoders can decode a stream of each profile (a decoder of a wider profile decodes
#: every narrower one: constrained baseline is the common subset of baseline, main and high)
DECODABLE_BY = {
    CONSTRAINED_BASELINE: (CONSTRAINED_BASELINE, BASELINE, MAIN, CONSTRAINED_HIGH, HIGH),
    BASELINE: (BASELINE,),
    MAIN: (MAIN, HIGH),
    CONSTRAINED_HIGH: (CONSTRAINED_HIGH, HIGH),
    HIGH: (HIGH,),
}


def profile_name(profile_idc: int, constraints: int) -> str | None:
    """The profile an SPS's (or a profile-level-id's) first two bytes describe, None if other."""
    if profile_idc == 0x42:
        return CONSTRAINED_BASELINE if constraints & 0x40 else BASELINE
    if profile_idc == 0x4D:
        return CONSTRAINED_BASELINE if constraints & 0x80 else MAIN
    if profile_idc == 0x58:
        return CONSTRAINED_BASELINE if constraints & 0xC0 == 0xC0 else (
            BASELINE if constraints & 0x80 else None)
    if profile_idc == 0x64:
        return CONSTRAINED_HIGH if constraints & 0x0C == 0x0C else HIGH
    return None


def parse_profile_level_id(value: str) -> tuple[str | None, int]:
    """(profile name or None, level_idc) of an SDP ``profile-level-id`` (6 hex digits)."""
    if len(value) != 6:
        raise ValueError(f"profile-level-id {value!r} is not 6 hex digits")
    raw = bytes.fromhex(value)
    level = raw[2]
    if level == 11 and raw[1] & 0x10 and raw[0] in (0x42, 0x4D, 0x58):
        level = 9  # level 1b is written as 1.1 with constraint_set3
    return profile_name(raw[0], raw[1]), level


def profile_level_id(sps: bytes) -> str:
    """The ``profile-level-id`` (hex) of an SPS NAL unit: its profile, constraints and level."""
    if len(sps) < 4:
        raise ValueError("SPS too short")
    return sps[1:4].hex()
