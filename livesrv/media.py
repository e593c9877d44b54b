"""The neutral media unit every ingest produces and every output consumes.

Payloads are stored the way MP4 stores samples, because that is what RTMP carries and what
fMP4 wants, so the common path (RTMP in, HLS out) never rewrites a byte:

- H.264 / HEVC: NAL units each prefixed by a 4-byte big-endian length (AVCC / HVCC), the
  parameter sets living in the track's ``extradata`` (AVCDecoderConfigurationRecord /
  HEVCDecoderConfigurationRecord).
- AV1: low-overhead OBU stream, ``extradata`` = AV1CodecConfigurationRecord.
- VP8: raw frames, no extradata.
- AAC: raw access units, ``extradata`` = AudioSpecificConfig.
- Opus: raw packets, ``extradata`` optional (OpusHead when known).

Outputs that need another framing (WebRTC wants Annex-B) convert once per stream, not per viewer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from typing import Literal

TrackKind = Literal["video", "audio"]

VIDEO_CODECS = frozenset({"h264", "hevc", "av1", "vp8", "vp9"})
AUDIO_CODECS = frozenset({"aac", "opus", "mp3"})

#: RTMP/FLV timestamps are milliseconds; it is the default time base of the hub.
MILLISECONDS = Fraction(1, 1000)


@dataclass(frozen=True, slots=True)
class Track:
    """What a consumer must know about one elementary stream before its first packet."""

    kind: TrackKind
    codec: str  # "h264", "hevc", "av1", "vp8", "aac", "opus", ...
    time_base: Fraction = MILLISECONDS
    extradata: bytes | None = None
    # video
    width: int | None = None
    height: int | None = None
    fps: float | None = None
    # audio
    sample_rate: int | None = None
    channels: int | None = None
    # nominal bitrate in bits/s when the publisher announced one (onMetaData), else None
    bitrate: int | None = None


@dataclass(frozen=True, slots=True)
class Packet:
    """One encoded access unit. Timestamps are integers in the track's ``time_base``."""

    kind: TrackKind
    dts: int
    pts: int
    keyframe: bool
    data: bytes


@dataclass(frozen=True, slots=True)
class StreamInfo:
    """The tracks of a live stream, fixed for the lifetime of a publication.

    A publisher that changes codec parameters mid-stream (new sequence header) starts a new
    publication; consumers see the old one end and the new one begin.
    """

    video: Track | None
    audio: Track | None
    metadata: dict[str, object] = field(default_factory=dict)

    def track(self, kind: TrackKind) -> Track | None:
        return self.video if kind == "video" else self.audio
