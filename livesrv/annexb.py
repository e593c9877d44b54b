"""H.264 framing conversions: Annex-B (start codes) <-> AVCC (length-prefixed NAL units).

Encoders (libx264 through PyAV) and WebRTC speak Annex-B: NAL units separated by
``00 00 01`` / ``00 00 00 01`` start codes, parameter sets (SPS/PPS) in-band before each IDR.
The hub speaks AVCC (see ``livesrv.media``): every NAL unit prefixed by its 4-byte length and
the parameter sets kept out of band in an AVCDecoderConfigurationRecord (``avcC``).

The ladder converts its encoders' output with ``annexb_to_avcc`` and builds the rung's track
extradata with ``build_avcc_record``, and so does WHIP ingest with what browsers send; WHEP
egress walks the AVCC NAL units (``iter_avcc``) to packetize them. It lives in the
shared kernel because both ``ingest`` and ``transcode`` need it and neither may import the other.
"""

from __future__ import annotations

from collections.abc import Iterable

from livesrv.codecs import BitReader, CodecConfigError, avcc_parameter_sets, unescape_rbsp

NAL_SLICE = 1
NAL_IDR = 5
NAL_SEI = 6
NAL_SPS = 7
NAL_PPS = 8
NAL_AUD = 9

START_CODE = b"\x00\x00\x00\x01"
#: NAL types that belong in the avcC record (or nowhere: access unit delimiters), not in samples
OUT_OF_BAND = frozenset({NAL_SPS, NAL_PPS, NAL_AUD})

#: profiles whose avcC carries the chroma format / bit depth extension (ISO/IEC 14496-15 5.3.3.1.2)
_EXTENDED_PROFILES = frozenset({100, 110, 122, 144})


def split_annexb(data: bytes) -> list[bytes]:
    """The NAL units of an Annex-B byte stream, without start codes or trailing zero bytes."""
    nals: list[bytes] = []
    find = data.find
    start = find(b"\x00\x00\x01")
    if start < 0:
        return [data.rstrip(b"\x00")] if data.strip(b"\x00") else []
    start += 3
    while True:
        nxt = find(b"\x00\x00\x01", start)
        if nxt < 0:
            nal = data[start:].rstrip(b"\x00")
            if nal:
                nals.append(nal)
            return nals
        # the zero byte of a 4-byte start code (and any trailing_zero_8bits) ends up here
        nal = data[start:nxt].rstrip(b"\x00")
        if nal:
            nals.append(nal)
        start = nxt + 3


def nal_type(nal: bytes) -> int:
    return nal[0] & 0x1F


def annexb_to_avcc(data: bytes) -> tuple[bytes, list[bytes], list[bytes]]:
    """(AVCC payload, SPS units, PPS units) of one Annex-B access unit.

    Parameter sets and access unit delimiters are taken out of the payload: the hub keeps the
    parameter sets in the track's avcC, and MP4/HLS players expect samples without them.
    """
    parts: list[bytes] = []
    sps: list[bytes] = []
    pps: list[bytes] = []
    for nal in split_annexb(data):
        kind = nal[0] & 0x1F
        if kind == NAL_SPS:
            sps.append(nal)
        elif kind == NAL_PPS:
            pps.append(nal)
        elif kind != NAL_AUD:
            parts.append(len(nal).to_bytes(4, "big"))
            parts.append(nal)
    return b"".join(parts), sps, pps


def iter_avcc(payload: bytes, length_size: int = 4) -> Iterable[bytes]:
    """The NAL units of an AVCC (length-prefixed) payload; a truncated unit is an error."""
    pos = 0
    end = len(payload)
    while pos < end:
        if pos + length_size > end:
            raise CodecConfigError("AVCC payload ends inside a length prefix")
        size = int.from_bytes(payload[pos:pos + length_size], "big")
        pos += length_size
        if pos + size > end:
            raise CodecConfigError("AVCC NAL unit truncated")
        yield payload[pos:pos + size]
        pos += size


def avcc_to_annexb(payload: bytes, length_size: int = 4) -> bytes:
    """An AVCC payload as Annex-B (4-byte start codes)."""
    return b"".join(START_CODE + nal for nal in iter_avcc(payload, length_size))


def avcc_record_to_annexb(record: bytes) -> bytes:
    """The SPS and PPS of an avcC record as Annex-B, to put in front of an IDR."""
    sps, pps = avcc_parameter_sets(record)
    return b"".join(START_CODE + nal for nal in (*sps, *pps))


def build_avcc_record(sps: list[bytes], pps: list[bytes]) -> bytes:
    """An AVCDecoderConfigurationRecord (4-byte NAL lengths) for these parameter sets."""
    if not sps or not pps:
        raise CodecConfigError("an avcC record needs at least one SPS and one PPS")
    first = sps[0]
    if len(first) < 4 or nal_type(first) != NAL_SPS:
        raise CodecConfigError("not an H.264 SPS")
    profile, compatibility, level = first[1], first[2], first[3]
    out = bytearray((1, profile, compatibility, level, 0xFF, 0xE0 | len(sps)))
    for nal in sps:
        out += len(nal).to_bytes(2, "big") + nal
    out.append(len(pps))
    for nal in pps:
        out += len(nal).to_bytes(2, "big") + nal
    if profile in _EXTENDED_PROFILES:
        chroma, luma_depth, chroma_depth = _sps_chroma(first)
        out += bytes((0xFC | chroma, 0xF8 | luma_depth, 0xF8 | chroma_depth, 0))  # 0 SPS-ext
    return bytes(out)


def _sps_chroma(sps: bytes) -> tuple[int, int, int]:
    """(chroma_format_idc, bit_depth_luma_minus8, bit_depth_chroma_minus8) of a High-profile SPS."""
    reader = BitReader(unescape_rbsp(sps[4:]))
    reader.ue()  # seq_parameter_set_id
    chroma = reader.ue()
    if chroma == 3:
        reader.skip(1)  # separate_colour_plane_flag
    return chroma & 3, reader.ue() & 7, reader.ue() & 7
