"""RTMP audio/video message bodies (FLV tag bodies) → the hub's Track and Packet.

Legacy FLV: H.264 (codec id 7), HEVC (codec id 12, the widespread Chinese extension), AAC,
MP3. Enhanced RTMP (veovera v1/v2): the IsExHeader bit, packet types SequenceStart,
CodedFrames, CodedFramesX, SequenceEnd, Metadata; FourCCs hvc1, av01, vp09, avc1 for video and
Opus, mp4a for audio. Configuration records are kept exactly as received (avcC, hvcC, av1C,
vpcC, AudioSpecificConfig): they are what fMP4 writes.

Payloads are handed on zero-copy up to one ``bytes()`` of a memoryview slice: the tag header
is cut off, the AVCC length-prefixed NAL units pass as received.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from livesrv.codecs import (
    CodecConfigError,
    PictureInfo,
    avcc_parameter_sets,
    hvcc_nal_units,
    parse_asc,
    parse_h264_sps,
    parse_hevc_sps,
)
from livesrv.media import Packet, StreamInfo, Track

log = logging.getLogger(__name__)


def _picture(codec: str, record: bytes) -> PictureInfo | None:
    """Size (and frame rate, when the VUI has it) from the SPS in a video config record.

    None when the record is not what it claims: dimensions are nice to have (metadata may give
    them), never a reason to refuse a stream."""
    try:
        if codec == "h264":
            sps = avcc_parameter_sets(record)[0]
            picture = parse_h264_sps(sps[0]) if sps else None
        elif codec == "hevc":
            sps = hvcc_nal_units(record, 33)
            picture = parse_hevc_sps(sps[0]) if sps else None
        else:
            return None
    except CodecConfigError:
        return None
    return picture if picture and picture.width > 0 and picture.height > 0 else None

# legacy FLV codec ids
FLV_AVC = 7
FLV_HEVC = 12
FLV_AAC = 10
FLV_MP3 = 2
FLV_EX_AUDIO = 9  # enhanced RTMP audio: a FourCC follows

# enhanced RTMP packet types
SEQUENCE_START = 0
CODED_FRAMES = 1
SEQUENCE_END = 2
CODED_FRAMES_X = 3
EX_METADATA = 4

VIDEO_FOURCC = {b"avc1": "h264", b"hvc1": "hevc", b"av01": "av1", b"vp09": "vp9"}
AUDIO_FOURCC = {b"Opus": "opus", b"mp4a": "aac"}
#: onMetaData's videocodecid may be a FourCC packed in a number (enhanced RTMP)
_FOURCC_NUMBERS = {int.from_bytes(k, "big"): v for k, v in VIDEO_FOURCC.items()}
_VIDEO_CODEC_IDS = {7: "h264", 12: "hevc", **_FOURCC_NUMBERS}
_AUDIO_CODEC_IDS = {10: "aac", 2: "mp3", **{int.from_bytes(k, "big"): v for k, v in AUDIO_FOURCC.items()}}
_MP3_RATES = (5512, 11025, 22050, 44100)


def _si24(data: bytes | memoryview, pos: int) -> int:
    value = (data[pos] << 16) | (data[pos + 1] << 8) | data[pos + 2]
    return value - 0x1000000 if value & 0x800000 else value


#: Upper bounds of onMetaData numbers we use. AMF0 numbers are doubles: the peer can send
#: Infinity, NaN, 1e300 or -5, and int() of the first two raises (OverflowError/ValueError).
MAX_FPS = 240.0
MAX_DIMENSION = 16384  # the largest H.264/HEVC level's width or height
MAX_KBPS = 1_000_000  # onMetaData's data rates are kb/s: 1 Gb/s is far past any encoder


def _num(meta: dict[str, Any], key: str, upper: float) -> float | None:
    """``meta[key]`` when it is a finite number in (0, upper]; None otherwise (absent, not a
    number, absurd): metadata is a hint from the peer, never trusted as is."""
    value = meta.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    if not (math.isfinite(value) and 0 < value <= upper):
        return None
    return value


class FlvAdapter:
    """Per publishing connection: turns tag bodies into Tracks (on sequence headers) and
    Packets. ``video()``/``audio()`` return a ``Track`` when a sequence header arrives (the
    caller compares it with the live one), a ``Packet`` for media, or None for anything to
    skip (end of sequence, command frames, media before its configuration, unknown codecs)."""

    def __init__(self) -> None:
        self.metadata: dict[str, Any] | None = None
        self.video_track: Track | None = None
        self.audio_track: Track | None = None
        self._warned: set[str] = set()

    # -- metadata ------------------------------------------------------------------------------
    def set_metadata(self, values: dict[str, Any]) -> None:
        self.metadata = values

    def announced(self) -> tuple[bool, bool]:
        """(video, audio): which tracks onMetaData says are coming."""
        meta = self.metadata or {}
        video = "videocodecid" in meta or bool(meta.get("hasVideo")) or "width" in meta
        audio = "audiocodecid" in meta or bool(meta.get("hasAudio")) or "audiosamplerate" in meta
        return video, audio

    def ready(self) -> bool:
        """Whether every announced track has its configuration (so the stream can start)."""
        if self.metadata is None:
            return self.video_track is not None and self.audio_track is not None
        video, audio = self.announced()
        if not video and not audio:
            return self.video_track is not None or self.audio_track is not None
        return ((not video or self.video_track is not None)
                and (not audio or self.audio_track is not None))

    def stream_info(self) -> StreamInfo:
        return StreamInfo(self.video_track, self.audio_track, dict(self.metadata or {}))

    def describe(self) -> str:
        parts = []
        v, a = self.video_track, self.audio_track
        if v is not None:
            size = f" {v.width}x{v.height}" if v.width and v.height else ""
            parts.append(f"{v.codec}{size}")
        if a is not None:
            rate = f" {a.sample_rate} Hz" if a.sample_rate else ""
            parts.append(f"{a.codec}{rate}")
        return " + ".join(parts) or "no tracks"

    def _warn_once(self, what: str) -> None:
        if what not in self._warned:
            self._warned.add(what)
            log.info("rtmp: skipping %s", what)

    # -- video -----------------------------------------------------------------------------------
    def video(self, timestamp: int, payload: bytes | bytearray) -> Packet | Track | None:
        if len(payload) < 2:
            return None
        b0 = payload[0]
        if b0 & 0x80:
            return self._ex_video(timestamp, payload)
        frame_type = b0 >> 4
        codec_id = b0 & 0x0F
        if frame_type == 5:
            return None  # video info / command frame
        if codec_id != FLV_AVC and codec_id != FLV_HEVC:
            self._warn_once(f"FLV video codec id {codec_id}")
            return None
        if len(payload) < 5:
            return None
        packet_type = payload[1]
        codec = "h264" if codec_id == FLV_AVC else "hevc"
        if packet_type == 0:
            return self._video_config(codec, bytes(memoryview(payload)[5:]))
        if packet_type != 1:
            return None  # end of sequence
        track = self.video_track
        if track is None or track.codec != codec:
            return None  # nothing decodes before its configuration
        return Packet("video", timestamp, timestamp + _si24(payload, 2), frame_type == 1,
                      bytes(memoryview(payload)[5:]))

    def _ex_video(self, timestamp: int, payload: bytes | bytearray) -> Packet | Track | None:
        if len(payload) < 5:
            return None
        b0 = payload[0]
        frame_type = (b0 >> 4) & 0x07
        packet_type = b0 & 0x0F
        fourcc = bytes(payload[1:5])
        codec = VIDEO_FOURCC.get(fourcc)
        if codec is None:
            self._warn_once(f"enhanced RTMP video {fourcc!r}")
            return None
        if packet_type == SEQUENCE_START:
            return self._video_config(codec, bytes(memoryview(payload)[5:]))
        if packet_type in (CODED_FRAMES, CODED_FRAMES_X):
            if frame_type == 5:
                return None
            track = self.video_track
            if track is None or track.codec != codec:
                return None
            # CodedFrames of avc1/hvc1 carry a composition time offset; av01/vp09 and
            # CodedFramesX do not.
            if packet_type == CODED_FRAMES and (codec == "h264" or codec == "hevc"):
                if len(payload) < 8:
                    return None
                pts = timestamp + _si24(payload, 5)
                start = 8
            else:
                pts = timestamp
                start = 5
            return Packet("video", timestamp, pts, frame_type == 1, bytes(memoryview(payload)[start:]))
        if packet_type != SEQUENCE_END and packet_type != EX_METADATA:
            self._warn_once(f"enhanced RTMP video packet type {packet_type}")
        return None

    def _video_config(self, codec: str, record: bytes) -> Track | None:
        if not record:
            return None
        current = self.video_track
        if current is not None and current.codec == codec and current.extradata == record:
            return None  # a repeated sequence header (encoders resend it) changes nothing
        picture = _picture(codec, record)
        dims = (picture.width, picture.height) if picture else None
        meta = self.metadata or {}
        if dims is None:
            width, height = _num(meta, "width", MAX_DIMENSION), _num(meta, "height", MAX_DIMENSION)
            dims = (int(width), int(height)) if width and height and width >= 1 and height >= 1 else None
        fps = (_num(meta, "framerate", MAX_FPS) or _num(meta, "fps", MAX_FPS)
               or (picture.fps if picture else None))
        rate = _num(meta, "videodatarate", MAX_KBPS)
        self.video_track = Track("video", codec, extradata=record,
                                 width=dims[0] if dims else None, height=dims[1] if dims else None,
                                 fps=fps or None, bitrate=int(rate * 1000) if rate else None)
        return self.video_track

    # -- audio -----------------------------------------------------------------------------------
    def audio(self, timestamp: int, payload: bytes | bytearray) -> Packet | Track | None:
        if len(payload) < 2:
            return None
        b0 = payload[0]
        sound_format = b0 >> 4
        if sound_format == FLV_AAC:
            if payload[1] == 0:
                return self._audio_config("aac", bytes(memoryview(payload)[2:]))
            track = self.audio_track
            if track is None or track.codec != "aac":
                return None
            return Packet("audio", timestamp, timestamp, True, bytes(memoryview(payload)[2:]))
        if sound_format == FLV_MP3:
            track = self.audio_track
            if track is None or track.codec != "mp3":
                channels = 2 if b0 & 1 else 1
                new = Track("audio", "mp3", sample_rate=_MP3_RATES[(b0 >> 2) & 3], channels=channels)
                self.audio_track = new
                return new
            return Packet("audio", timestamp, timestamp, True, bytes(memoryview(payload)[1:]))
        if sound_format == FLV_EX_AUDIO:
            return self._ex_audio(timestamp, payload)
        self._warn_once(f"FLV audio format {sound_format}")
        return None

    def _ex_audio(self, timestamp: int, payload: bytes | bytearray) -> Packet | Track | None:
        if len(payload) < 5:
            return None
        packet_type = payload[0] & 0x0F
        fourcc = bytes(payload[1:5])
        codec = AUDIO_FOURCC.get(fourcc)
        if codec is None:
            self._warn_once(f"enhanced RTMP audio {fourcc!r}")
            return None
        if packet_type == SEQUENCE_START:
            return self._audio_config(codec, bytes(memoryview(payload)[5:]))
        if packet_type == CODED_FRAMES:
            track = self.audio_track
            if track is None or track.codec != codec:
                if codec != "opus":
                    return None
                # Opus needs no configuration record; start with the usual 48 kHz stereo.
                self.audio_track = Track("audio", "opus", sample_rate=48000, channels=2)
                return self.audio_track
            return Packet("audio", timestamp, timestamp, True, bytes(memoryview(payload)[5:]))
        return None

    def _audio_config(self, codec: str, record: bytes) -> Track | None:
        current = self.audio_track
        if current is not None and current.codec == codec and current.extradata == record:
            return None
        meta = self.metadata or {}
        sample_rate: int | None = None
        channels: int | None = None
        if codec == "aac":
            try:
                asc = parse_asc(record)
            except CodecConfigError:
                return None  # an AAC stream without a usable config cannot be packaged
            sample_rate, channels = asc.sample_rate, asc.channels
        elif codec == "opus":
            sample_rate = 48000
            channels = record[9] if len(record) >= 19 and record[:8] == b"OpusHead" else 2
        if channels == 0:  # AAC channel config 0: described in-band; trust the metadata
            channels = 2 if meta.get("stereo") else 1
        rate = _num(meta, "audiodatarate", MAX_KBPS)
        self.audio_track = Track("audio", codec, extradata=record or None, sample_rate=sample_rate,
                                 channels=channels, bitrate=int(rate * 1000) if rate else None)
        return self.audio_track


def metadata_codec(meta: dict[str, Any], kind: str) -> str | None:
    """The codec onMetaData announces for a kind, when it names one we know."""
    value = meta.get("videocodecid" if kind == "video" else "audiocodecid")
    table = _VIDEO_CODEC_IDS if kind == "video" else _AUDIO_CODEC_IDS
    if isinstance(value, int | float) and not isinstance(value, bool):
        # int() of Infinity or NaN raises; no codec id is either
        return table.get(int(value)) if math.isfinite(value) else None
    if isinstance(value, str):
        raw = value.encode()[:4]
        return (VIDEO_FOURCC if kind == "video" else AUDIO_FOURCC).get(raw)
    return None
