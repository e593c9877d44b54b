"""From a WHIP peer's encoded frames to hub publications (sans-IO).

``PublicationAssembler`` is fed whole encoded frames as the WebRTC receiver reassembles them
(H.264 access units in Annex-B, Opus packets), each with its RTP timestamp and arrival time,
and answers with what the shell must do: ``Start`` a publication (or restart it with new
tracks), push a ``Packet``, or nothing. It decides:

- when the stream can start: at the first H.264 keyframe, whose in-band SPS/PPS become the
  track's avcC (the hub and fMP4 keep parameter sets out of band); audio-only offers start at
  their first packet; an offer with video whose video never shows a keyframe starts audio-only
  after ``start_timeout`` and restarts with video once a keyframe comes;
- when a restart is needed: new SPS/PPS mid-stream (a browser that changed resolution), the
  same rule RTMP follows for new sequence headers;
- the timestamps: each track's RTP clock (90 kHz video, 48 kHz Opus) is kept as the hub time
  base (1/90000, 1/48000), counted from the track's first frame and offset by when that first
  frame arrived relative to the session's first frame, which lines audio up with video to
  within network jitter (RTCP sender reports would do better; browsers send both tracks from
  one clock at the same moment, so arrival is close);
- when to ask the sender for a keyframe: browsers send one only when asked (PLI), and HLS cuts
  segments at keyframes, so one is asked for every ``keyframe_interval`` seconds, and sooner
  while waiting for the first one.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

from livesrv.annexb import NAL_IDR, annexb_to_avcc, build_avcc_record, iter_avcc
from livesrv.codecs import CodecConfigError, avcc_parameter_sets, parse_h264_sps
from livesrv.media import Packet, StreamInfo, Track

VIDEO_CLOCK = 90000
AUDIO_CLOCK = 48000
VIDEO_TIME_BASE = Fraction(1, VIDEO_CLOCK)
AUDIO_TIME_BASE = Fraction(1, AUDIO_CLOCK)
#: WebRTC's Opus is always signalled as opus/48000/2
OPUS_TRACK = Track("audio", "opus", AUDIO_TIME_BASE, None, sample_rate=48000, channels=2)
#: while no keyframe has come, ask again this often (a PLI can be lost like any packet)
FIRST_KEYFRAME_RETRY = 0.5


@dataclass(frozen=True)
class Start:
    """Begin a publication with these tracks, ending the session's previous one if any."""

    info: StreamInfo
    restart: str | None = None  # why a running publication is replaced ("new video parameters")


Action = Start | Packet


class _Clock:
    """One track's RTP timestamps -> hub ticks, from its first frame, shifted by its start."""

    __slots__ = ("first", "last", "offset")

    def __init__(self, first: int, offset: int) -> None:
        self.first = first
        self.offset = offset
        self.last: int | None = None

    def ticks(self, timestamp: int) -> int:
        return self.offset + timestamp - self.first


class PublicationAssembler:
    def __init__(self, *, video: bool, audio: bool, start_timeout: float = 10.0,
                 keyframe_interval: float = 2.0, created: float = 0.0) -> None:
        self.expects_video = video
        self.expects_audio = audio
        self.start_timeout = start_timeout
        self.keyframe_interval = keyframe_interval
        self.created = created
        self.info: StreamInfo | None = None
        self._t0: float | None = None  # arrival of the session's first frame
        self._clocks: dict[str, _Clock] = {}
        self._avcc: bytes | None = None
        self._last_keyframe_at: float | None = None
        self._last_request_at: float | None = None
        #: frames that could not be used (before the start, out of order, unreadable)
        self.dropped = 0

    @property
    def live(self) -> bool:
        return self.info is not None

    # -- input --------------------------------------------------------------------------------
    def video_h264(self, annexb: bytes, timestamp: int, arrival: float) -> list[Action]:
        """One H.264 access unit (Annex-B) with its RTP timestamp (unwrapped, 90 kHz)."""
        payload, sps, pps = annexb_to_avcc(annexb)
        keyframe = _has_idr(payload)
        clock = self._clock("video", timestamp, arrival, VIDEO_CLOCK)
        ticks = clock.ticks(timestamp)
        if clock.last is not None and ticks <= clock.last:
            self.dropped += 1  # a late duplicate: the hub wants increasing timestamps
            return []
        actions: list[Action] = []
        if keyframe:
            self._last_keyframe_at = arrival
            if sps and pps:
                try:
                    record = build_avcc_record(sps, pps)
                    parse_h264_sps(sps[0])  # a size we can read, or no start on it
                except CodecConfigError:
                    record = None
                if record is not None and record != self._avcc:
                    actions.extend(self._video_parameters(record))
        info = self.info
        if info is None or info.video is None:
            self.dropped += 1
            return actions
        if not payload:
            return actions
        clock.last = ticks
        actions.append(Packet("video", ticks, ticks, keyframe, payload))
        return actions

    def audio_opus(self, data: bytes, timestamp: int, arrival: float) -> list[Action]:
        """One Opus packet with its RTP timestamp (unwrapped, 48 kHz)."""
        clock = self._clock("audio", timestamp, arrival, AUDIO_CLOCK)
        ticks = clock.ticks(timestamp)
        if clock.last is not None and ticks <= clock.last:
            self.dropped += 1
            return []
        actions: list[Action] = []
        if self.info is None and not self.expects_video:
            actions.append(self._start(StreamInfo(None, OPUS_TRACK)))
        info = self.info
        if info is None or info.audio is None or not data:
            self.dropped += 1
            return actions
        clock.last = ticks
        actions.append(Packet("audio", ticks, ticks, True, data))
        return actions

    def tick(self, now: float) -> list[Action]:
        """Timers: an offer with video whose video never starts goes live with its audio."""
        if (self.info is None and self.expects_video and self.expects_audio
                and "audio" in self._clocks and now - self.created >= self.start_timeout):
            return [self._start(StreamInfo(None, OPUS_TRACK))]
        return []

    def keyframe_due(self, now: float) -> bool:
        """Whether to ask the sender for a keyframe now (the caller sends a PLI and says so)."""
        if not self.expects_video:
            return False
        last_request = self._last_request_at
        if self._last_keyframe_at is None or self.info is None or self.info.video is None:
            return last_request is None or now - last_request >= FIRST_KEYFRAME_RETRY
        reference = max(self._last_keyframe_at, last_request or 0.0)
        return now - reference >= self.keyframe_interval

    def keyframe_requested(self, now: float) -> None:
        self._last_request_at = now

    # -- internals ----------------------------------------------------------------------------
    def _clock(self, kind: str, timestamp: int, arrival: float, rate: int) -> _Clock:
        clock = self._clocks.get(kind)
        if clock is None:
            if self._t0 is None:
                self._t0 = arrival
            clock = _Clock(timestamp, round((arrival - self._t0) * rate))
            self._clocks[kind] = clock
        return clock

    def _video_parameters(self, record: bytes) -> list[Action]:
        self._avcc = record
        picture = parse_h264_sps(_first_sps(record))
        video = Track("video", "h264", VIDEO_TIME_BASE, record, width=picture.width,
                      height=picture.height, fps=picture.fps)
        audio = OPUS_TRACK if self.expects_audio else None
        restart = None
        if self.info is not None:
            restart = "new video parameters" if self.info.video is not None else "video arrived"
        return [self._start(StreamInfo(video, audio), restart)]

    def _start(self, info: StreamInfo, restart: str | None = None) -> Start:
        self.info = info
        return Start(info, restart)


def _has_idr(avcc_payload: bytes) -> bool:
    try:
        return any(nal and nal[0] & 0x1F == NAL_IDR for nal in iter_avcc(avcc_payload))
    except CodecConfigError:
        return False


def _first_sps(record: bytes) -> bytes:
    return avcc_parameter_sets(record)[0][0]


def vp8_is_keyframe(frame: bytes) -> bool:
    """RFC 6386 9.1: bit 0 of the frame tag is 0 for a key frame."""
    return bool(frame) and not frame[0] & 1
