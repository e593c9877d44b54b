"""The ladder's worker thread: decode a stream's video once, scale and encode every active rung
with libx264, pass AAC through (or encode other audio to AAC once), and measure how far behind
the source it is so its ``Governor`` can shed and restore rungs. It talks to the event loop
only through its ``Inbox`` (packets in) and a ``deliver`` callback (batches of events out)."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from fractions import Fraction
from typing import Any

import av
from av.video.frame import PictureType
from av.video.reformatter import VideoReformatter
from prometheus_client import Counter, Gauge

from livesrv.annexb import annexb_to_avcc, build_avcc_record
from livesrv.media import Packet, StreamInfo, Track

from .decoders import DecoderError, create_decoder
from .ladder_governor import Drop, Governor, Restore
from .ladder_settings import SCALERS, LadderSettings, RungPlan

log = logging.getLogger(__name__)

RUNGS_DROPPED = Counter("livesrv_ladder_rungs_dropped_total",
                        "Ladder rungs dropped because encoding fell behind the source", ["rung"])
RUNGS_RESTORED = Counter("livesrv_ladder_rungs_restored_total",
                         "Dropped ladder rungs added back once there was headroom", ["rung"])
SKIPPED_PACKETS = Counter("livesrv_ladder_skipped_packets_total",
                          "Source packets the ladder skipped (its queue overflowed) to catch up")
DECODE_ERRORS = Counter("livesrv_ladder_decode_errors_total", "Source packets the ladder could not decode")
WORKERS = Gauge("livesrv_ladder_workers", "Ladder worker threads running")

AAC_RATES = frozenset({96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000,
                       11025, 8000})

# -- the worker's inbox -----------------------------------------------------------------------
class Inbox:
    """Packets from the event loop to the worker thread, bounded in media time: when the queued
    video spans more than ``max_ticks`` (in the VIDEO track's time base) the queue is emptied
    and refilled from the next video keyframe (the worker catches up instead of drifting
    further behind)."""

    def __init__(self, max_ticks: int) -> None:
        self._cond = threading.Condition()
        self._items: deque[Packet] = deque()
        self._max_ticks = max_ticks
        #: dts of the oldest queued video packet. The span is measured on video alone: audio
        #: has its own time base (WHIP: 48 kHz beside 90 kHz video), so its timestamps cannot
        #: be subtracted from video's, and it may head the queue.
        self._first_video: int | None = None
        self._skip_to_keyframe = False
        self.closed = False
        self.aborted = False
        #: the newest source video timestamp seen (worker reads it to measure its lag)
        self.newest: int | None = None
        self.skipped = 0

    def put(self, packets: list[Packet]) -> None:
        items = self._items
        skipped = 0
        with self._cond:
            if self.closed:
                return
            for packet in packets:
                is_key = packet.kind == "video" and packet.keyframe
                if packet.kind == "video":
                    self.newest = packet.dts
                    first = self._first_video
                    if first is not None and packet.dts - first > self._max_ticks:
                        skipped += len(items)
                        items.clear()
                        self._first_video = None
                        self._skip_to_keyframe = True
                if self._skip_to_keyframe:
                    if not is_key:
                        skipped += 1
                        continue
                    self._skip_to_keyframe = False
                items.append(packet)
                if packet.kind == "video" and self._first_video is None:
                    self._first_video = packet.dts
            self._cond.notify()
        if skipped:
            self.skipped += skipped
            SKIPPED_PACKETS.inc(skipped)
            log.warning("ladder fell %d packets behind its queue bound; skipping to a keyframe", skipped)

    def take(self) -> list[Packet] | None:
        """Everything queued (waiting for something), or None once closed and drained."""
        with self._cond:
            while not self._items and not self.closed:
                self._cond.wait()
            if self.aborted or not self._items:
                return None
            batch = list(self._items)
            self._items.clear()
            self._first_video = None
            return batch

    def close(self, *, abort: bool = False) -> None:
        with self._cond:
            self.closed = True
            if abort:
                self.aborted = True
                self._items.clear()
                self._first_video = None
            self._cond.notify()


# -- the worker thread ------------------------------------------------------------------------
#: events from the worker to the loop (tuples: built per packet, so no dataclass overhead)
#: ("start", rung, StreamInfo) | ("video", rung, Packet) | ("audio", Packet) | ("stop", rung, why)
Event = tuple[Any, ...]

#: how often (seconds) the worker looks at its load and hands results to the loop mid-batch
LOOK_SECONDS = 0.1
_EWMA = 0.1  # weight of the newest frame in a rung's cost average


class _Rung:
    """A rung's encoder and measurements, owned by the worker thread."""

    __slots__ = (
        "_interval",
        "active",
        "cost",
        "encoder",
        "fps",
        "frames_out",
        "info",
        "last_in",
        "last_out",
        "plan",
        "scaler",
        "window_frames",
        "window_start",
    )

    def __init__(self, plan: RungPlan, time_base: Fraction) -> None:
        self.plan = plan
        self.active = True
        self.encoder: Any = None
        #: kept per rung: it caches the swscale context (filter tables) between frames
        self.scaler = VideoReformatter()
        self.info: StreamInfo | None = None  # known once the encoder produced SPS/PPS
        self.last_in: int | None = None  # source pts of the last frame sent to the encoder
        self.last_out: int | None = None  # pts of the last packet out of the encoder
        self.cost = 0.0  # EWMA of worker seconds per frame (scale + encode)
        self.frames_out = 0
        self.fps = 0.0
        self.window_frames = 0
        self.window_start = time.monotonic()
        # frames closer than this to the previous one are skipped to respect max_fps (10% slack
        # absorbs millisecond rounding of the source's timestamps)
        self._interval = round(0.9 / plan.max_fps / time_base)

    def wants(self, pts: int, keyframe: bool) -> bool:
        if keyframe:
            return True
        return self.last_in is None or pts - self.last_in >= self._interval

    def seconds_per_second(self) -> float:
        return self.cost * (self.plan.fps or self.plan.max_fps)


class LadderWorker(threading.Thread):
    """Decode once, scale and encode every active rung; results go to ``deliver`` in batches."""

    def __init__(self, channel: str, info: StreamInfo, plans: list[RungPlan], settings: LadderSettings,
                 inbox: Inbox, deliver: Callable[[list[Event]], None]) -> None:
        super().__init__(name=f"ladder {channel}", daemon=True)
        assert info.video is not None
        self.channel = channel
        self.source = info
        self.settings = settings
        self.inbox = inbox
        self.deliver = deliver
        self.time_base = Fraction(info.video.time_base)
        self.rungs = {plan.name: _Rung(plan, self.time_base) for plan in plans}
        self.governor = Governor(settings.governor, {p.name: p.pixel_rate for p in plans},
                                 started=time.monotonic())
        self.busy = 0.0  # fraction of wall time spent working, smoothed
        self.lag = 0.0  # seconds of media behind the newest source packet
        self.position: int | None = None  # dts of the last source video packet decoded
        self._interpolation = SCALERS[settings.scaler]
        self._source_keys: deque[int] = deque()  # pts of source keyframes not yet decoded
        self._audio = _AudioPath(info.audio, settings.audio_kbps)
        self._held_audio: deque[Packet] = deque()
        self._decoder: Any = None
        self._window_start = time.monotonic()
        self._window_work = 0.0
        self._work_from = self._window_start

    # -- thread body ------------------------------------------------------------------------
    def run(self) -> None:
        WORKERS.inc()
        try:
            self._decoder = self._open_decoder()
            self._loop()
        except Exception:
            log.exception("ladder of %s failed; its rungs stop", self.channel)
            self.inbox.close(abort=True)  # the feeder's packets are dropped from now on
            self.deliver([("stop", name, "failed") for name, r in self.rungs.items() if r.info])
        finally:
            WORKERS.dec()
            self.deliver([("end",)])

    def _open_decoder(self) -> Any:
        video = self.source.video
        assert video is not None
        decoder = create_decoder(video)  # DecoderError fails the worker: no rungs without a picture
        decoder.thread_type = "AUTO"
        return decoder

    def _loop(self) -> None:
        last_look = time.monotonic()
        while True:
            batch = self.inbox.take()
            if batch is None:
                break
            self._work_from = time.monotonic()
            out: list[Event] = []
            for packet in batch:
                if packet.kind != "video":
                    self._audio_in(packet, out)
                    continue
                self._video(packet, out)
                now = time.monotonic()
                if now - last_look >= LOOK_SECONDS:
                    # a burst is one big batch: look at the load (and hand on results) inside it
                    last_look = now
                    self._look(now, out)
                    self.deliver(out)
                    out = []
            now = time.monotonic()
            self._window_work += now - self._work_from  # the work of this batch, before waiting
            self._work_from = now
            if now - last_look >= LOOK_SECONDS:
                last_look = now
                self._look(now, out)
            else:
                self._release_audio(out, final=False)
            if out:
                self.deliver(out)
        if self.inbox.aborted:
            return
        out = []
        self._flush(out)
        if out:
            self.deliver(out)

    def _look(self, now: float, out: list[Event]) -> None:
        # the busy fraction over windows of about a second, smoothed
        self._window_work += now - self._work_from
        self._work_from = now
        span = now - self._window_start
        if span >= 1.0:
            self.busy += 0.5 * (min(1.0, self._window_work / span) - self.busy)
            self._window_start = now
            self._window_work = 0.0
        self._release_audio(out, final=False)
        self._govern(now, out)

    # -- video ------------------------------------------------------------------------------
    def _video(self, packet: Packet, out: list[Event]) -> None:
        if packet.keyframe:
            self._source_keys.append(packet.pts)
        av_packet = av.Packet(packet.data)
        av_packet.pts = packet.pts
        av_packet.dts = packet.dts
        self.position = packet.dts
        try:
            frames = self._decoder.decode(av_packet)
        except av.error.FFmpegError as exc:
            DECODE_ERRORS.inc()
            log.debug("ladder of %s: undecodable packet at %d: %s", self.channel, packet.dts, exc)
            return
        for frame in frames:
            self._frame(frame, out)

    def _is_source_key(self, frame: Any) -> bool:
        keys = self._source_keys
        pts = frame.pts
        while keys and keys[0] < pts:
            keys.popleft()  # keyframes whose picture was never output (undecodable)
        if keys and keys[0] == pts:
            keys.popleft()
            return True
        return False

    def _frame(self, frame: Any, out: list[Event]) -> None:
        pts = frame.pts
        if pts is None:
            return
        keyframe = self._is_source_key(frame)
        interpolation = self._interpolation
        threads = self.settings.scaler_threads
        # rungs run largest first: with ``cascade`` each scales from the previous rung's picture
        # (a 1080p source is read once, by the 720p scaler, not once per rung)
        base = frame
        cascade = self.settings.cascade
        for rung in self.rungs.values():
            if not rung.active:
                continue
            if rung.encoder is None:
                if not keyframe:
                    continue  # a (re)started rung begins at a source keyframe: aligned IDRs
                rung.encoder = self._open_encoder(rung.plan)
            if not rung.wants(pts, keyframe):
                continue
            began = time.perf_counter()
            plan = rung.plan
            if base.width < plan.width or base.height < plan.height:
                base = frame  # never scale up from a smaller rung
            scaled = rung.scaler.reformat(base, plan.width, plan.height, "yuv420p",
                                          interpolation=interpolation, threads=threads)
            if cascade:
                base = scaled  # x264 copies its input: the picture may be read again
            scaled.pts = pts
            scaled.time_base = self.time_base
            scaled.pict_type = PictureType.I if keyframe else PictureType.NONE
            rung.last_in = pts
            self._emit(rung, rung.encoder.encode(scaled), out)
            rung.cost += _EWMA * ((time.perf_counter() - began) - rung.cost)

    def _open_encoder(self, plan: RungPlan) -> Any:
        encoder = av.CodecContext.create("libx264", "w")
        encoder.width, encoder.height, encoder.pix_fmt = plan.width, plan.height, "yuv420p"
        encoder.time_base = self.time_base
        encoder.framerate = Fraction(plan.fps or plan.max_fps).limit_denominator(1001)
        encoder.bit_rate = plan.bitrate
        encoder.thread_type = "FRAME"  # as FFmpeg's CLI does: frame threads, best throughput
        encoder.thread_count = self.settings.encoder_threads
        options = {"preset": plan.preset, "profile": plan.profile, "forced-idr": "1",
                   "maxrate": str(plan.bitrate * 3 // 2), "bufsize": str(plan.bitrate * 2),
                   # keyframes only where the source has them (forced): aligned across rungs
                   "x264-params": "keyint=infinite:scenecut=0:bframes=0"}
        if self.settings.tune:
            options["tune"] = self.settings.tune
        encoder.options = options
        encoder.open()
        return encoder

    def _emit(self, rung: _Rung, packets: list[Any], out: list[Event]) -> None:
        for av_packet in packets:
            payload, sps, pps = annexb_to_avcc(bytes(av_packet))
            if rung.info is None:
                if not (sps and pps):
                    continue  # cannot happen with x264 (headers precede the first IDR)
                plan = rung.plan
                video = Track("video", "h264", self.time_base, build_avcc_record(sps, pps),
                              width=plan.width, height=plan.height, fps=plan.fps,
                              bitrate=plan.bitrate)
                rung.info = StreamInfo(video, self._audio.track)
                out.append(("start", rung.plan.name, rung.info))
            pts = av_packet.pts
            # no B-frames: decode order is presentation order
            out.append(("video", rung.plan.name,
                        Packet("video", pts, pts, bool(av_packet.is_keyframe), payload)))
            rung.last_out = pts
            rung.frames_out += 1
            rung.window_frames += 1

    # -- audio ------------------------------------------------------------------------------
    def _audio_in(self, packet: Packet, out: list[Event]) -> None:
        for converted in self._audio.convert(packet):
            self._held_audio.append(converted)

    def _release_audio(self, out: list[Event], *, final: bool) -> None:
        """Hand on the audio the rungs' video has caught up with, so each rung's packets stay
        interleaved as the source's are (the encoders hold a few frames back)."""
        held = self._held_audio
        if not held:
            return
        started = [r.last_out for r in self.rungs.values() if r.active and r.info is not None]
        if not started:
            if final or len(held) > 256:
                held.clear()  # no rung to carry it yet
            return
        horizon = None if final else min(x for x in started if x is not None)
        audio_tb = self._audio.time_base
        while held:
            packet = held[0]
            if horizon is not None and packet.dts * audio_tb > horizon * self.time_base:
                break
            out.append(("audio", held.popleft()))

    # -- load -------------------------------------------------------------------------------
    def _govern(self, now: float, out: list[Event]) -> None:
        newest = self.inbox.newest
        if newest is not None and self.position is not None:
            self.lag = max(0.0, float((newest - self.position) * self.time_base))
        for rung in self.rungs.values():
            elapsed = now - rung.window_start
            if elapsed >= 1.0:
                rung.fps = rung.window_frames / elapsed
                rung.window_frames = 0
                rung.window_start = now
        costs = {name: rung.seconds_per_second() for name, rung in self.rungs.items()}
        decision = self.governor.observe(now, self.lag, self.busy, costs)
        if isinstance(decision, Drop):
            rung = self.rungs[decision.rung]
            rung.active = False
            rung.encoder = None  # its queued frames are not worth the CPU: discard, no flush
            rung.last_in = rung.last_out = None
            rung.fps = 0.0
            was_started = rung.info is not None
            rung.info = None
            RUNGS_DROPPED.labels(decision.rung).inc()
            log.warning("ladder of %s is %.1f s behind the source: dropping rung %s",
                        self.channel, decision.lag, decision.rung)
            if was_started:
                out.append(("stop", decision.rung, "dropped"))
        elif isinstance(decision, Restore):
            rung = self.rungs[decision.rung]
            rung.active = True  # its encoder opens at the next source keyframe
            RUNGS_RESTORED.labels(decision.rung).inc()
            log.warning("ladder of %s keeps up again (load %.2f): restoring rung %s",
                        self.channel, decision.busy, decision.rung)

    # -- end of stream ----------------------------------------------------------------------
    def _flush(self, out: list[Event]) -> None:
        try:
            for frame in self._decoder.decode(None):
                self._frame(frame, out)
        except av.error.FFmpegError:
            pass
        for rung in self.rungs.values():
            if rung.active and rung.encoder is not None:
                self._emit(rung, rung.encoder.encode(None), out)
        for packet in self._audio.flush():
            self._held_audio.append(packet)
        self._release_audio(out, final=True)

    # -- for metrics (read from the loop thread) --------------------------------------------
    def rung_lag(self, rung: _Rung) -> float:
        newest = self.inbox.newest
        if newest is None or rung.last_out is None:
            return 0.0
        return max(0.0, float((newest - rung.last_out) * self.time_base))


class _AudioPath:
    """AAC passes through untouched; other codecs are decoded and encoded to AAC once."""

    def __init__(self, track: Track | None, kbps: int) -> None:
        self.track: Track | None = None
        self.time_base = Fraction(track.time_base) if track is not None else Fraction(1, 1000)
        self._decoder: Any = None
        self._encoder: Any = None
        self._anchor: int | None = None  # source timestamp of the first decoded sample
        self._samples = 0
        if track is None:
            return
        if track.codec == "aac":
            self.track = track
            return
        try:
            self._decoder = create_decoder(track)
            rate = track.sample_rate if track.sample_rate in AAC_RATES else 48000
            channels = 1 if track.channels == 1 else 2
            encoder = av.CodecContext.create("aac", "w")
            encoder.sample_rate = rate
            encoder.layout = "mono" if channels == 1 else "stereo"
            encoder.format = "fltp"
            encoder.bit_rate = kbps * 1000
            encoder.time_base = Fraction(1, rate)
            encoder.open()
        except (DecoderError, av.error.FFmpegError, ValueError) as exc:
            log.warning("ladder: cannot transcode %s audio to AAC (%s); rungs carry no audio",
                        track.codec, exc)
            self._decoder = None
            return
        self._encoder = encoder
        self.track = Track("audio", "aac", track.time_base, bytes(encoder.extradata or b""),
                           sample_rate=rate, channels=channels, bitrate=kbps * 1000)

    def convert(self, packet: Packet) -> Iterator[Packet]:
        if self._encoder is None:
            if self.track is not None:
                yield packet  # AAC: the very same packet
            return
        av_packet = av.Packet(packet.data)
        av_packet.pts = av_packet.dts = packet.pts
        try:
            frames = self._decoder.decode(av_packet)
        except av.error.FFmpegError:
            DECODE_ERRORS.inc()
            return
        for frame in frames:
            yield from self._encode(frame, packet.pts)

    def _encode(self, frame: Any, source_pts: int | None) -> Iterator[Packet]:
        encoder = self._encoder
        if frame is not None:
            if self._anchor is None:
                self._anchor = source_pts or 0
            frame.pts = self._samples
            frame.time_base = encoder.time_base
            self._samples += frame.samples * encoder.sample_rate // (frame.sample_rate or encoder.sample_rate)
        assert self._anchor is not None
        for out in encoder.encode(frame):
            if out.pts is None or out.pts < 0:
                continue  # the encoder's priming packet would start before the source
            ticks = self._anchor + round(out.pts * encoder.time_base / self.time_base)
            yield Packet("audio", ticks, ticks, True, bytes(out))

    def flush(self) -> Iterator[Packet]:
        if self._encoder is None or self._anchor is None:
            return
        yield from self._encode(None, None)
