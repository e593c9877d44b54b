"""Thumbnails: a JPEG of every live stream, refreshed every few seconds, from keyframes only.

``ThumbnailService`` listens to the hub and runs one small task per publication. Every
``interval_seconds`` the task subscribes to the stream, takes its first video keyframe (the
hub's GOP cache starts with the latest one, so usually at once; otherwise it waits for the
next, dropping everything else unread) and closes the subscription again. So between two
thumbnails a stream costs nothing at all: no per-packet work, no queue.

The keyframe is decoded, scaled and encoded as JPEG in a worker thread (PyAV releases the
GIL), never on the event loop. Each stream keeps its own decoder, created lazily on the first
thumbnail and flushed after each one, so it holds no frames between thumbnails. The workers
are a small shared pool: when all of them are busy, a stream's thumbnail is skipped (and
counted) rather than queued, so a machine short of CPU makes fewer thumbnails, never a backlog.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction

import av
from prometheus_client import Counter, Histogram

from livesrv.config import ConfigError
from livesrv.hub import GOP_CACHE_MAX_PACKETS, Hub, Stream
from livesrv.media import Packet, Track

from .decoders import DECODERS, DecoderError, create_decoder

log = logging.getLogger(__name__)

THUMBNAILS = Counter("livesrv_thumbnails_total", "Thumbnails made from keyframes")
DECODE_SECONDS = Histogram("livesrv_thumbnail_decode_seconds",
                           "Time to decode, scale and JPEG-encode one keyframe",
                           buckets=(.002, .005, .01, .025, .05, .1, .25, .5, 1, 2.5))
SKIPPED = Counter("livesrv_thumbnails_skipped_total",
                  "Thumbnails skipped because every thumbnail worker was busy")
FAILED = Counter("livesrv_thumbnail_failures_total", "Keyframes that could not be made a thumbnail")



@dataclass(frozen=True)
class ThumbSettings:
    """The ``[thumbs]`` table of the config file."""

    #: seconds between two thumbnails of a stream
    interval_seconds: float = 5.0
    #: thumbnail width in pixels (height follows the picture's aspect); smaller pictures keep theirs
    width: int = 640
    #: JPEG quantiser, 2 (best, largest) to 31 (worst, smallest)
    quality: int = 5
    #: decodes running at once across all streams; more are skipped, not queued
    workers: int = 1

    def __post_init__(self) -> None:
        if not 0.1 <= self.interval_seconds <= 3600:
            raise ConfigError("[thumbs] interval_seconds must be between 0.1 and 3600")
        if not 16 <= self.width <= 3840:
            raise ConfigError("[thumbs] width must be between 16 and 3840 pixels")
        if not 2 <= self.quality <= 31:
            raise ConfigError("[thumbs] quality must be between 2 and 31")
        if not 1 <= self.workers <= 16:
            raise ConfigError("[thumbs] workers must be between 1 and 16")


@dataclass(frozen=True, slots=True)
class Thumbnail:
    """One JPEG, as served."""

    jpeg: bytes
    etag: str
    width: int
    height: int
    #: the keyframe's presentation time, in the track's time base
    pts: int
    made_at: float


class ThumbnailError(Exception):
    """A keyframe that cannot be decoded (broken data, or a codec without a decoder)."""


def scaled_size(width: int, height: int, max_width: int) -> tuple[int, int]:
    """``max_width`` wide (never wider than the picture) at the picture's aspect, both even
    (JPEG's 4:2:0 chroma wants even sizes)."""
    target = min(width, max_width)
    target_height = max(2, round(height * target / width / 2) * 2)
    return max(2, target - target % 2), target_height


class KeyframeDecoder:
    """A stream's decoder: one keyframe in, one JPEG out. Used from one worker at a time."""

    def __init__(self, track: Track, settings: ThumbSettings) -> None:
        if track.codec not in DECODERS:
            raise ThumbnailError(f"no thumbnail decoder for {track.codec!r}")
        self._track = track
        self._settings = settings
        self._decoder: av.CodecContext | None = None

    def _context(self) -> av.CodecContext:
        if self._decoder is None:
            try:
                context = create_decoder(self._track)
            except DecoderError as exc:
                raise ThumbnailError(str(exc)) from exc
            # One thread: frame threading would hold the frame back until more packets come,
            # and every extra thread keeps its own buffers for as long as the stream lives.
            context.thread_count = 1
            self._decoder = context
        return self._decoder

    def make(self, packet: Packet) -> Thumbnail:
        started = time.perf_counter()
        decoder = self._context()
        try:
            # decode, then drain: a lone keyframe comes out at once instead of after the
            # decoder's reorder delay; flushing leaves the decoder empty for the next one
            frames = decoder.decode(av.Packet(packet.data))
            frames += decoder.decode(None)
        except (av.FFmpegError, ValueError) as exc:
            raise ThumbnailError(f"keyframe does not decode: {exc}") from exc
        finally:
            decoder.flush_buffers()
        if not frames:
            raise ThumbnailError("keyframe decoded to no picture")
        frame = frames[-1]
        width, height = scaled_size(frame.width, frame.height, self._settings.width)
        try:
            jpeg = self._jpeg(frame, width, height)
        except (av.FFmpegError, ValueError) as exc:
            raise ThumbnailError(f"picture does not encode as JPEG: {exc}") from exc
        DECODE_SECONDS.observe(time.perf_counter() - started)
        etag = '"' + hashlib.blake2b(jpeg, digest_size=12).hexdigest() + '"'
        return Thumbnail(jpeg, etag, width, height, packet.pts, time.time())


    def _jpeg(self, frame: av.VideoFrame, width: int, height: int) -> bytes:
        picture = frame.reformat(width=width, height=height, format="yuvj420p",
                                 interpolation="BILINEAR")
        encoder = av.CodecContext.create("mjpeg", "w")
        encoder.width = width
        encoder.height = height
        encoder.pix_fmt = "yuvj420p"
        encoder.time_base = Fraction(1, 1)
        # a fixed quantiser: JPEG size follows the picture, not a bitrate guess
        encoder.qmin = encoder.qmax = self._settings.quality
        return b"".join(bytes(p) for p in encoder.encode(picture) + encoder.encode(None))


class ThumbnailService:
    """Keeps the latest thumbnail of every live channel; the HTTP layer reads ``get()``."""

    def __init__(self, hub: Hub, settings: ThumbSettings) -> None:
        self.hub = hub
        self.settings = settings
        self._thumbs: dict[str, tuple[Stream, Thumbnail]] = {}
        self._tasks: dict[Stream, asyncio.Task[None]] = {}
        self._pool = ThreadPoolExecutor(settings.workers, thread_name_prefix="thumbs")
        self._busy = 0
        self._closed = False

    def start(self) -> None:
        self.hub.add_listener(on_start=self._on_start, on_end=self._on_end)
        for stream in self.hub.streams():  # streams that went live before we were wired
            self._on_start(stream)

    async def close(self) -> None:
        self._closed = True
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        self._thumbs.clear()
        # a decode still running finishes in its thread; wait for it off the loop
        await asyncio.to_thread(self._pool.shutdown, wait=True, cancel_futures=True)

    def get(self, channel: str) -> Thumbnail | None:
        """The latest thumbnail of the channel's current publication, if it has one yet."""
        entry = self._thumbs.get(channel)
        if entry is None:
            return None
        stream, thumb = entry
        return thumb if self.hub.get(channel) is stream else None

    # -- hub events -------------------------------------------------------------------------
    def _on_start(self, stream: Stream) -> None:
        if self._closed or stream.info.video is None or stream in self._tasks:
            return
        task = asyncio.get_running_loop().create_task(self._run(stream),
                                                      name=f"thumbs {stream.channel}")
        self._tasks[stream] = task
        task.add_done_callback(lambda t: self._done(stream, t))

    def _on_end(self, stream: Stream) -> None:
        entry = self._thumbs.get(stream.channel)
        if entry is not None and entry[0] is stream:
            del self._thumbs[stream.channel]

    def _done(self, stream: Stream, task: asyncio.Task[None]) -> None:
        self._tasks.pop(stream, None)
        if not task.cancelled() and task.exception() is not None:
            log.error("thumbnails of %s failed", stream.channel, exc_info=task.exception())

    # -- one publication --------------------------------------------------------------------
    async def _run(self, stream: Stream) -> None:
        track = stream.info.video
        assert track is not None
        try:
            decoder = KeyframeDecoder(track, self.settings)
        except ThumbnailError as exc:
            log.warning("channel %s gets no thumbnails: %s", stream.channel, exc)
            return
        loop = asyncio.get_running_loop()
        interval = self.settings.interval_seconds
        failures = 0
        while not stream.ended:
            keyframe = await next_keyframe(stream)
            if keyframe is None:
                break
            due = loop.time() + interval
            thumb = await self._make(decoder, keyframe)
            if isinstance(thumb, Thumbnail):
                failures = 0
                if not stream.ended:
                    self._thumbs[stream.channel] = (stream, thumb)
            elif thumb is not None:
                FAILED.inc()
                failures += 1
                # say it once, not every interval of a long broken stream
                if failures == 1:
                    log.warning("channel %s: no thumbnail from its keyframe: %s", stream.channel, thumb)
            try:
                async with asyncio.timeout_at(due):
                    await stream.wait_ended()
            except TimeoutError:
                pass

    async def _make(self, decoder: KeyframeDecoder, keyframe: Packet) -> Thumbnail | str | None:
        """A thumbnail, an error message, or None when every worker was busy (skipped)."""
        # (only the event loop touches the count: no lock needed)
        if self._busy >= self.settings.workers:
            SKIPPED.inc()
            return None
        self._busy += 1
        try:
            thumb = await asyncio.get_running_loop().run_in_executor(self._pool, decoder.make,
                                                                     keyframe)
        except ThumbnailError as exc:
            return str(exc)
        finally:
            self._busy -= 1
        THUMBNAILS.inc()
        return thumb


async def next_keyframe(stream: Stream) -> Packet | None:
    """The stream's latest cached video keyframe, else the next one; None if it ends first."""
    # room for the whole GOP cache, so the queue starts at its keyframe (a smaller queue
    # would get the cache's tail)
    subscription = stream.subscribe("thumbs", maxsize=GOP_CACHE_MAX_PACKETS)
    try:
        while True:
            packet = await subscription.get()
            if packet is None:
                return None
            if packet.kind == "video" and packet.keyframe:
                return packet
            # take what else queued up in one batch; only a keyframe's type is looked at
            for packet in subscription.drain():
                if packet.keyframe and packet.kind == "video":
                    return packet
    finally:
        subscription.close()
