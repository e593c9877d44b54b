"""WHEP's per-stream media: what is computed once for every viewer of a stream.

- ``choose_video``: which hub Stream a viewer's video comes from. Source H.264 without
  B-frames goes out as it arrived; HEVC, AV1 and H.264 with B-frames (browsers stutter on
  reordered frames over RTP) take the ladder's largest H.264 rung, which never has B-frames.
- ``VideoPacketizer``: AVCC access units to RTP payloads (``webrtc_rtp``), parameter sets in
  front of each keyframe. Viewers read the hub Stream through their own subscriptions (their
  own bounded queues, and a new viewer starts at the cached keyframe), and the first viewer
  to reach a packet packetizes it for all: the result is kept by packet identity.
- ``AudioSource``: the stream's audio as Opus, for all its viewers: AAC is decoded and encoded
  to Opus once per stream in a worker thread (PyAV releases the GIL); Opus (from WHIP) passes
  through. Viewers get it through small bounded ``AudioTap`` queues (the oldest packet is
  dropped for a viewer that falls behind: audio has no keyframes to wait for).
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction

import av

from livesrv.codecs import CodecConfigError, avcc_parameter_sets
from livesrv.hub import Stream, Subscription
from livesrv.media import Packet, Track
from livesrv.webrtc_offers import Refused

from .webrtc_rtp import access_unit_nals, packetize, profile_level_id

log = logging.getLogger(__name__)

VIDEO_CLOCK = 90_000
OPUS_CLOCK = 48_000
#: packetized frames kept per stream: more than a cached GOP a viewer's queue may hold
PACKETIZED_CACHE = 2048
OPUS_FRAME_SAMPLES = 960  # 20 ms, what browsers send and expect
OPUS_BITRATE = 96_000


class Unplayable(Refused):
    """The stream cannot be sent over WHEP now; ``status`` is the HTTP answer (409/415/503)."""


@dataclass(frozen=True, slots=True)
class EncodedFrame:
    """One access unit as RTP payloads; ``timestamp`` in the RTP clock (90 kHz / 48 kHz)."""

    payloads: list[bytes]
    timestamp: int
    size: int


# -- which stream a viewer's video comes from ----------------------------------------------------
def _reorders(stream: Stream) -> bool | None:
    """Whether the stream's video has B-frames (decode order differs from presentation order),
    judged from the cached GOP; None when there is nothing cached to judge from yet."""
    probe = stream.subscribe("whep-probe")  # a copy of the GOP cache, then gone
    try:
        video = [p for p in probe.drain() if p.kind == "video"]
    finally:
        probe.close()
    if not video:
        return None
    return any(p.pts != p.dts for p in video)


def _rung_height(stream: Stream) -> int:
    track = stream.info.video
    return (track.height or 0) if track is not None else 0


def choose_video(stream: Stream) -> tuple[Stream, str]:
    """(the Stream whose H.264 goes to viewers, why it was chosen); ``Unplayable`` if none."""
    video = stream.info.video
    if video is None:
        raise Unplayable(415, "the stream has no video")
    if video.codec == "h264":
        reorders = _reorders(stream)
        if reorders is None:
            raise Unplayable(503, "the stream has not sent a keyframe yet; retry in a moment")
        if not reorders:
            return stream, "source"
        why = "the source H.264 has B-frames"
    else:
        why = f"the source is {video.codec.upper()}"
    rungs = [r for r in stream.renditions.values()
             if not r.ended and r.info.video is not None and r.info.video.codec == "h264"]
    if not rungs:
        raise Unplayable(409, f"{why}, which browsers cannot take over WebRTC, and the ladder has "
                              "no H.264 rendition of it (yet): watch over HLS, or retry shortly")
    return max(rungs, key=_rung_height), why


# -- video ---------------------------------------------------------------------------------------
class VideoPacketizer:
    """Packetizes one Stream's H.264 once for all its viewers."""

    def __init__(self, track: Track) -> None:
        if track.codec != "h264" or not track.extradata:
            raise Unplayable(415, f"cannot send {track.codec} video over WebRTC")
        try:
            sps, pps = avcc_parameter_sets(track.extradata)
        except CodecConfigError as exc:
            raise Unplayable(415, f"the stream's H.264 configuration is unreadable: {exc}") from None
        if not sps or not pps:
            raise Unplayable(415, "the stream's H.264 configuration has no SPS/PPS")
        self.parameter_sets = [*sps, *pps]
        self.length_size = (track.extradata[4] & 3) + 1
        self.profile_level_id = profile_level_id(sps[0])
        self.time_base = Fraction(track.time_base)
        self._cache: OrderedDict[int, tuple[Packet, EncodedFrame]] = OrderedDict()
        self.packetized = 0  # frames packetized (once each, whatever the number of viewers)

    def frame(self, packet: Packet) -> EncodedFrame | None:
        """The RTP payloads of ``packet`` (None for an unreadable one, which is skipped)."""
        key = id(packet)
        hit = self._cache.get(key)
        if hit is not None and hit[0] is packet:
            return hit[1]
        try:
            nals = access_unit_nals(packet.data, packet.keyframe, self.parameter_sets,
                                    self.length_size)
        except CodecConfigError:
            return None
        payloads = packetize(nals)
        frame = EncodedFrame(payloads, int(packet.pts * self.time_base * VIDEO_CLOCK),
                             sum(map(len, payloads)))
        self._cache[key] = (packet, frame)  # the packet is kept too, so its id is not reused
        if len(self._cache) > PACKETIZED_CACHE:
            self._cache.popitem(last=False)
        self.packetized += 1
        return frame


# -- audio ---------------------------------------------------------------------------------------
class OpusTranscoder:
    """AAC access units in, 20 ms Opus packets out (48 kHz stereo); runs in a worker thread."""

    def __init__(self, track: Track) -> None:
        self.time_base = Fraction(track.time_base)
        self.decoder = av.CodecContext.create("aac", "r")
        if track.extradata:
            self.decoder.extradata = track.extradata
        self.resampler = av.AudioResampler(format="s16", layout="stereo", rate=OPUS_CLOCK,
                                           frame_size=OPUS_FRAME_SAMPLES)
        encoder = av.CodecContext.create("libopus", "w")
        encoder.sample_rate = OPUS_CLOCK
        encoder.layout = "stereo"
        encoder.format = "s16"
        encoder.bit_rate = OPUS_BITRATE
        encoder.time_base = Fraction(1, OPUS_CLOCK)
        encoder.options = {"application": "lowdelay", "frame_duration": "20"}
        self.encoder = encoder
        self.errors = 0

    def transcode(self, packets: list[Packet]) -> list[EncodedFrame]:
        out: list[EncodedFrame] = []
        for packet in packets:
            av_packet = av.Packet(packet.data)
            av_packet.pts = av_packet.dts = packet.pts
            av_packet.time_base = self.time_base
            try:
                frames = self.decoder.decode(av_packet)
                for frame in frames:
                    for chunk in self.resampler.resample(frame):
                        for encoded in self.encoder.encode(chunk):
                            data = bytes(encoded)
                            pts = encoded.pts if encoded.pts is not None else 0
                            stamp = int(pts * encoded.time_base * OPUS_CLOCK) if encoded.time_base else pts
                            out.append(EncodedFrame([data], stamp, len(data)))
            except (av.FFmpegError, ValueError) as exc:  # one bad AAC frame must not end audio
                self.errors += 1
                if self.errors <= 3:
                    log.info("AAC->Opus: skipped a frame: %s", exc)
        return out


class AudioTap:
    """One viewer's bounded queue of Opus frames."""

    __slots__ = ("_queue", "_waiter", "closed", "dropped")

    def __init__(self, maxsize: int = 50) -> None:
        self._queue: deque[EncodedFrame] = deque(maxlen=maxsize)  # 1 s of 20 ms packets
        self._waiter: asyncio.Future[None] | None = None
        self.closed = False
        self.dropped = 0

    def offer(self, frame: EncodedFrame) -> None:
        if len(self._queue) == self._queue.maxlen:
            self.dropped += 1
        self._queue.append(frame)
        self._wake()

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def close(self) -> None:
        self.closed = True
        self._wake()

    async def get(self) -> EncodedFrame | None:
        while not self._queue:
            if self.closed:
                return None
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        return self._queue.popleft()


class AudioSource:
    """The audio of one publication as Opus, fanned out to the viewers' taps."""

    def __init__(self, stream: Stream, on_idle: Callable[[AudioSource], None]) -> None:
        track = stream.info.audio
        if track is None or track.codec not in ("aac", "opus"):
            raise Unplayable(415, "no AAC or Opus audio")
        self.stream = stream
        self.track = track
        self._on_idle = on_idle
        self._taps: set[AudioTap] = set()
        self._task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None

    def tap(self) -> AudioTap:
        tap = AudioTap()
        self._taps.add(tap)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"whep audio {self.stream.channel}")
        return tap

    def untap(self, tap: AudioTap) -> None:
        tap.close()
        self._taps.discard(tap)
        if not self._taps:
            self.stop()

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        for tap in tuple(self._taps):
            tap.close()
        self._taps.clear()
        self._on_idle(self)

    async def _run(self) -> None:
        # live audio only: a joining viewer's video starts at the cached keyframe, but audio
        # from seconds ago would only have to be thrown away by the browser's jitter buffer
        sub: Subscription = self.stream.subscribe("whep-audio", maxsize=256, from_keyframe=False)
        transcoder = OpusTranscoder(self.track) if self.track.codec == "aac" else None
        if transcoder is not None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"opus-{self.stream.channel}")
        loop = asyncio.get_running_loop()
        time_base = Fraction(self.track.time_base)
        try:
            while True:
                first = await sub.get()
                if first is None:
                    break
                batch = [p for p in (first, *sub.drain()) if p.kind == "audio"]
                if not batch:
                    continue
                if transcoder is None:
                    frames = [EncodedFrame([p.data], int(p.pts * time_base * OPUS_CLOCK), len(p.data))
                              for p in batch]
                else:
                    frames = await loop.run_in_executor(self._executor, transcoder.transcode, batch)
                for frame in frames:
                    for tap in self._taps:
                        tap.offer(frame)
        finally:
            sub.close()
            for tap in tuple(self._taps):
                tap.close()
            if self._executor is not None:
                self._executor.shutdown(wait=False)
