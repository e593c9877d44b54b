"""Fragmented MP4 (CMAF) writer: hub packets in, ISO-BMFF bytes out. Sans-IO, no decoding.

We write the boxes ourselves instead of running PyAV's mp4 muxer per stream: the hub's payloads
are already MP4 samples (AVCC/HVCC length-prefixed NAL units, raw AAC/Opus), so a fragment is a
small ``moof`` header plus every payload joined once into ``mdat``; and the packager can cut a
fragment after any packet, which LL-HLS parts need (a segment is then several moof+mdat pairs).

Usage::

    writer = Fmp4Writer(info)          # UnsupportedCodec if no track can be packaged
    init = writer.init_segment()       # ftyp + moov
    writer.add(packet)                 # per packet: buffered, nothing copied
    fragment = writer.flush(end_dts)   # moof + mdat of what was added since the last flush

Timelines: video uses a 90 kHz timescale; audio uses its sample rate, and each AAC access unit
lasts exactly its frame length (1024 samples) so the millisecond timestamps of RTMP do not make
audio durations jitter; the audio clock is re-anchored to the packet timestamps only when they
drift by more than a frame. Opus packets last what their TOC byte says.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from fractions import Fraction
from itertools import pairwise

from livesrv.codecs import (
    AudioSpecificConfig,
    CodecConfigError,
    build_asc,
    opus_samples,
    parse_asc,
    picture_info,
)
from livesrv.media import Packet, StreamInfo, Track

VIDEO_TIMESCALE = 90000
MOVIE_TIMESCALE = 1000

VIDEO_CODECS = {"h264": (b"avc1", b"avcC"), "hevc": (b"hvc1", b"hvcC"), "av1": (b"av01", b"av1C")}
AUDIO_CODECS = frozenset({"aac", "opus"})

# sample_flags (ISO 14496-12 8.8.3.1): a sync sample depends on nothing; others are non-sync
# samples that depend on others. Players find random access points from these.
SYNC_SAMPLE_FLAGS = 0x02000000
NON_SYNC_SAMPLE_FLAGS = 0x01010000

_UNITY_MATRIX = struct.pack(">9I", 0x10000, 0, 0, 0, 0x10000, 0, 0, 0, 0x40000000)


class UnsupportedCodec(ValueError):
    """A track whose codec has no fMP4 mapping here (VP8, MP3, ...)."""


# -- box helpers --------------------------------------------------------------------------------
def box(kind: bytes, *payload: bytes) -> bytes:
    body = b"".join(payload)
    return struct.pack(">I4s", 8 + len(body), kind) + body


def full_box(kind: bytes, version: int, flags: int, *payload: bytes) -> bytes:
    return box(kind, struct.pack(">I", (version << 24) | flags), *payload)


def _descriptor(tag: int, payload: bytes) -> bytes:
    """An MPEG-4 descriptor (ISO 14496-1) with the variable-length size field."""
    size = len(payload)
    size_bytes = bytearray([size & 0x7F])
    size >>= 7
    while size:
        size_bytes.insert(0, 0x80 | (size & 0x7F))
        size >>= 7
    return bytes([tag]) + bytes(size_bytes) + payload


# -- per-track state ----------------------------------------------------------------------------
@dataclass(slots=True)
class _TrackState:
    track_id: int
    track: Track
    timescale: int
    # dts * num // den converts the hub's time base to the track timescale without floats
    num: int
    den: int
    asc: AudioSpecificConfig | None = None
    #: audio: where the next access unit starts on our smoothed clock (track timescale)
    next_time: int | None = None
    last_duration: int = 0
    last_time: int = -1
    times: list[int] = field(default_factory=list)
    durations: list[int] = field(default_factory=list)  # audio: known per packet
    offsets: list[int] = field(default_factory=list)  # video: composition offsets
    flags: list[int] = field(default_factory=list)
    payloads: list[bytes] = field(default_factory=list)

    def to_timescale(self, value: int) -> int:
        return value * self.num // self.den


def _state_for(track_id: int, track: Track) -> _TrackState:
    if track.kind == "video":
        if track.codec not in VIDEO_CODECS:
            raise UnsupportedCodec(f"video codec {track.codec!r} cannot be packaged as fMP4")
        if not track.extradata:
            raise UnsupportedCodec(f"{track.codec} track has no decoder configuration record")
        timescale = VIDEO_TIMESCALE
        asc = None
    else:
        if track.codec not in AUDIO_CODECS:
            raise UnsupportedCodec(f"audio codec {track.codec!r} cannot be packaged as fMP4")
        asc = None
        if track.codec == "aac":
            try:
                asc = parse_asc(track.extradata) if track.extradata else None
            except CodecConfigError:
                asc = None
            if asc is None:
                if not track.sample_rate or not track.channels:
                    raise UnsupportedCodec("AAC track has neither AudioSpecificConfig nor rate/channels")
                asc = parse_asc(build_asc(track.sample_rate, track.channels))
            timescale = asc.sample_rate
        else:
            timescale = 48000  # Opus always runs at 48 kHz inside
    ratio = Fraction(track.time_base) * timescale
    return _TrackState(track_id, track, timescale, ratio.numerator, ratio.denominator, asc)


# -- sample entries -----------------------------------------------------------------------------
def _visual_sample_entry(state: _TrackState, width: int, height: int) -> bytes:
    track = state.track
    entry_kind, config_kind = VIDEO_CODECS[track.codec]
    return box(
        entry_kind,
        bytes(6), struct.pack(">H", 1),  # reserved, data_reference_index
        bytes(16),  # pre_defined, reserved, pre_defined[3]
        struct.pack(">HHII", width, height, 0x00480000, 0x00480000),  # 72 dpi
        bytes(4), struct.pack(">H", 1),  # reserved, frame_count
        bytes(32),  # compressorname
        struct.pack(">Hh", 0x0018, -1),  # depth, pre_defined
        box(config_kind, track.extradata or b""),
    )


def _audio_sample_entry(kind: bytes, channels: int, sample_rate: int, *children: bytes) -> bytes:
    rate_field = sample_rate << 16 if sample_rate < 65536 else 0
    return box(kind, bytes(6), struct.pack(">H", 1), bytes(8),
               struct.pack(">HHHHI", channels, 16, 0, 0, rate_field), *children)


def _esds(track_id: int, asc: bytes, bitrate: int) -> bytes:
    decoder_config = _descriptor(4, struct.pack(">BB", 0x40, 0x15) + bytes(3)  # AAC, audio stream
                                 + struct.pack(">II", bitrate, bitrate) + _descriptor(5, asc))
    es = _descriptor(3, struct.pack(">HB", track_id & 0xFFFF, 0) + decoder_config
                     + _descriptor(6, b"\x02"))
    return full_box(b"esds", 0, 0, es)


def _dops(track: Track) -> bytes:
    """dOps from an OpusHead (little-endian) when we have one, else from channels alone."""
    head = track.extradata or b""
    if head.startswith(b"OpusHead") and len(head) >= 19:
        channels, pre_skip, rate, gain, family = struct.unpack_from("<BHIhB", head, 9)
        body = struct.pack(">BBHIhB", 0, channels, pre_skip, rate, gain, family)
        if family != 0:
            body += head[19:]  # channel mapping table: stream counts and mapping, byte for byte
        return box(b"dOps", body)
    channels = track.channels or 2
    return box(b"dOps", struct.pack(">BBHIhB", 0, channels, 0, track.sample_rate or 48000, 0, 0))


def _sample_entry(state: _TrackState, width: int, height: int) -> bytes:
    track = state.track
    if track.kind == "video":
        return _visual_sample_entry(state, width, height)
    if track.codec == "aac":
        asc = state.asc
        assert asc is not None
        config = track.extradata if track.extradata else build_asc(asc.sample_rate, asc.channels)
        channels = asc.channels or track.channels or 2
        return _audio_sample_entry(b"mp4a", channels, asc.sample_rate,
                                   _esds(state.track_id, config, track.bitrate or 0))
    channels = track.channels or 2
    return _audio_sample_entry(b"Opus", channels, 48000, _dops(track))


def _trak(state: _TrackState) -> bytes:
    track = state.track
    video = track.kind == "video"
    width = height = 0
    if video:
        picture = picture_info(track)
        width, height = (picture.width, picture.height) if picture else (0, 0)
    tkhd = full_box(b"tkhd", 0, 3,  # enabled | in_movie
                    struct.pack(">IIIII", 0, 0, state.track_id, 0, 0), bytes(8),
                    struct.pack(">hhhH", 0, 0, 0 if video else 0x0100, 0), _UNITY_MATRIX,
                    struct.pack(">II", width << 16, height << 16))
    mdhd = full_box(b"mdhd", 0, 0, struct.pack(">IIIIHH", 0, 0, state.timescale, 0, 0x55C4, 0))  # und
    handler, name = (b"vide", b"VideoHandler\x00") if video else (b"soun", b"SoundHandler\x00")
    hdlr = full_box(b"hdlr", 0, 0, bytes(4), handler, bytes(12), name)
    media_header = full_box(b"vmhd", 0, 1, bytes(8)) if video else full_box(b"smhd", 0, 0, bytes(4))
    dinf = box(b"dinf", full_box(b"dref", 0, 0, struct.pack(">I", 1), full_box(b"url ", 0, 1)))
    stbl = box(b"stbl",
               full_box(b"stsd", 0, 0, struct.pack(">I", 1), _sample_entry(state, width, height)),
               full_box(b"stts", 0, 0, bytes(4)), full_box(b"stsc", 0, 0, bytes(4)),
               full_box(b"stsz", 0, 0, bytes(8)), full_box(b"stco", 0, 0, bytes(4)))
    return box(b"trak", tkhd, box(b"mdia", mdhd, hdlr, box(b"minf", media_header, dinf, stbl)))


# -- the writer ---------------------------------------------------------------------------------
class Fmp4Writer:
    """One publication's tracks as an init segment and a sequence of fragments."""

    def __init__(self, info: StreamInfo, *, skip_unsupported: bool = True) -> None:
        self._states: dict[str, _TrackState] = {}
        self._info = info
        #: why a track of the stream is not packaged (empty when every track is)
        self.skipped: dict[str, str] = {}
        for track in (info.video, info.audio):
            if track is None:
                continue
            try:
                self._states[track.kind] = _state_for(len(self._states) + 1, track)
            except UnsupportedCodec as exc:
                if not skip_unsupported:
                    raise
                self.skipped[track.kind] = str(exc)
        if not self._states:
            raise UnsupportedCodec("; ".join(self.skipped.values()) or "the stream has no tracks")
        self.sequence_number = 0
        #: the duration in seconds of the last fragment flushed, on its main track (video when
        #: packaged, else audio): exactly what its samples add up to, for EXTINF
        self.fragment_duration = 0.0

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(self._states)

    @property
    def main_kind(self) -> str:
        """The track fragments are cut by: video when packaged (at its keyframes), else audio."""
        return "video" if "video" in self._states else "audio"

    @property
    def main_time_base(self) -> Fraction:
        """The hub time base of the main track's packets."""
        track = self._info.track(self.main_kind)  # type: ignore[arg-type]
        assert track is not None
        return Fraction(track.time_base)

    def timescale(self, kind: str) -> int:
        return self._states[kind].timescale

    def init_segment(self) -> bytes:
        ftyp = box(b"ftyp", b"iso6", struct.pack(">I", 0), b"iso6cmfcisommp41dash")
        states = list(self._states.values())
        mvhd = full_box(b"mvhd", 0, 0, struct.pack(">IIII", 0, 0, MOVIE_TIMESCALE, 0),
                        struct.pack(">IH", 0x00010000, 0x0100), bytes(10), _UNITY_MATRIX, bytes(24),
                        struct.pack(">I", len(states) + 1))
        mvex = box(b"mvex", *(full_box(b"trex", 0, 0, struct.pack(">IIIII", s.track_id, 1, 0, 0, 0))
                              for s in states))
        return ftyp + box(b"moov", mvhd, *(_trak(s) for s in states), mvex)

    # -- samples ----------------------------------------------------------------------------------
    def add(self, packet: Packet) -> None:
        """Buffer one packet for the next fragment (packets of an unpackaged track are ignored)."""
        state = self._states.get(packet.kind)
        if state is None:
            return
        time = state.to_timescale(packet.dts)
        if packet.kind == "video":
            # decode times must rise; a publisher's repeated or negative dts must not break trun
            time = max(time, state.last_time + 1, 0)
            state.times.append(time)
            state.offsets.append(state.to_timescale(packet.pts) - state.to_timescale(packet.dts))
            state.flags.append(SYNC_SAMPLE_FLAGS if packet.keyframe else NON_SYNC_SAMPLE_FLAGS)
        else:
            frame = state.asc.frame_length if state.asc is not None else opus_samples(packet.data)
            expected = state.next_time
            if expected is None or time - expected > frame:
                # first packet, or a real gap in the audio: re-anchor to the packet's timestamp;
                # the previous sample (if still pending) absorbs the gap so trun has no hole
                time = max(time, 0)
                if state.times:
                    state.durations[-1] = time - state.times[-1]
            elif expected - time > frame and not state.times:
                # our clock ran ahead of the timestamps: step back, but only at a fragment's
                # start (inside one, samples cannot overlap)
                time = max(time, 0)
            else:
                time = expected  # within a frame of the smoothed clock: keep exact frame lengths
            state.times.append(time)
            state.durations.append(frame)
            state.next_time = time + frame
        state.last_time = time
        state.payloads.append(packet.data)

    def pending(self, kind: str) -> int:
        state = self._states.get(kind)
        return len(state.times) if state is not None else 0

    def flush(self, end_dts: int | None = None) -> bytes:
        """One ``moof`` + ``mdat`` holding every pending sample, or b"" when none is pending.

        ``end_dts`` (hub time base) is where the next fragment's video begins, when known: it
        makes the duration of the last video sample exact. Without it the last sample lasts as
        long as the one before it.
        """
        trafs: list[tuple[bytes, bytes, int, int, int]] = []
        payloads: list[bytes] = []
        for state in self._states.values():
            count = len(state.times)
            if not count:
                continue
            times = state.times
            if state.track.kind == "video":
                durations = [b - a for a, b in pairwise(times)]
                last = durations[-1] if durations else state.last_duration
                if end_dts is not None:
                    end = state.to_timescale(end_dts)
                    if end > times[-1]:
                        last = end - times[-1]
                if not last:
                    last = state.timescale // 30
                durations.append(last)
                state.last_duration = last
                flat = []
                for entry in zip(durations, map(len, state.payloads), state.flags, state.offsets):
                    flat.extend(entry)
                entries = struct.pack(f">{4 * count}I", *(v & 0xFFFFFFFF for v in flat))
                tr_flags = 0xF01  # data offset, duration, size, flags, composition offset
                tfhd = full_box(b"tfhd", 0, 0x020000, struct.pack(">I", state.track_id))
            else:
                flat = []
                for entry in zip(state.durations, map(len, state.payloads)):
                    flat.extend(entry)
                entries = struct.pack(f">{2 * count}I", *flat)
                tr_flags = 0x301  # data offset, duration, size; flags from tfhd
                tfhd = full_box(b"tfhd", 0, 0x020020,  # default-base-is-moof, default flags
                                struct.pack(">II", state.track_id, SYNC_SAMPLE_FLAGS))
            if not trafs:  # video comes first: it is the main track when present
                self.fragment_duration = (sum(durations) if state.track.kind == "video"
                                          else sum(state.durations)) / state.timescale
            tfdt = full_box(b"tfdt", 1, 0, struct.pack(">Q", times[0]))
            track_bytes = sum(map(len, state.payloads))
            trafs.append((tfhd + tfdt, entries, count, tr_flags, track_bytes))
            payloads.extend(state.payloads)
            state.times = []
            state.durations = []
            state.offsets = []
            state.flags = []
            state.payloads = []
        if not trafs:
            return b""
        self.sequence_number += 1
        mfhd = full_box(b"mfhd", 0, 0, struct.pack(">I", self.sequence_number))
        # Every size is known before the offsets are: moof = header + mfhd + trafs, where each
        # traf = header + tfhd/tfdt + trun header (20 bytes) + entries.
        moof_size = 8 + len(mfhd) + sum(8 + len(head) + 20 + len(entries)
                                        for head, entries, *_ in trafs)
        data_offset = moof_size + 8  # first byte of mdat's payload, relative to moof's start
        mdat_size = 8 + sum(track_bytes for *_, track_bytes in trafs)
        parts = [struct.pack(">I4s", moof_size, b"moof"), mfhd]
        for head, entries, count, tr_flags, track_bytes in trafs:
            parts.append(struct.pack(">I4s", 8 + len(head) + 20 + len(entries), b"traf"))
            parts.append(head)
            parts.append(struct.pack(">I4sIIi", 20 + len(entries), b"trun", (1 << 24) | tr_flags,
                                     count, data_offset))
            parts.append(entries)
            data_offset += track_bytes  # the next track's samples follow this one's in mdat
        parts.append(struct.pack(">I4s", mdat_size, b"mdat"))
        parts.extend(payloads)
        return b"".join(parts)
