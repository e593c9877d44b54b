"""The HLS packager: every live stream of the hub as fMP4 (CMAF) HLS, without decoding.

``HlsService`` listens to the hub. For each publication it runs one ``RenditionPackager`` per
rendition (the source, and each ladder rung as the ladder adds it): a task that takes packets
from its own bounded subscription, feeds them to an ``Fmp4Writer`` and cuts a segment when a
video keyframe arrives at least ``segment_seconds`` after the segment began (audio-only streams
are cut by time). Cutting when the next keyframe *arrives* makes every sample duration, and so
every ``EXTINF``, exact.

Low-Latency HLS: within a segment the packager also cuts a part (its own moof+mdat) whenever
one more frame would take the part past ``part_seconds``; the keyframe that cuts a segment
ends its last part, so every segment starts with an independent part. Parts are cut when the
next frame *arrives*, like segments, so their durations are exact too.

A channel's playlists outlive a publication: when the publisher stops they get
``#EXT-X-ENDLIST`` and stay fetchable for ``linger_seconds``; an encoder that reconnects within
that time continues them after an ``EXT-X-DISCONTINUITY`` with a new init segment.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client import Counter, Gauge, Histogram

from livesrv.codecs import codec_string, picture_info
from livesrv.config import ConfigError
from livesrv.hub import Hub, Stream
from livesrv.media import Packet, StreamInfo

from .fmp4 import Fmp4Writer, UnsupportedCodec
from .playlist import MediaPlaylist, Variant, render_multivariant

log = logging.getLogger(__name__)

SEGMENTS = Counter("livesrv_hls_segments_total", "HLS segments cut", ["rendition"])
SEGMENT_SECONDS = Histogram("livesrv_hls_segment_duration_seconds", "Duration of the HLS segments cut",
                            ["rendition"], buckets=(0.5, 1, 1.5, 2, 2.5, 3, 4, 6, 8, 12, 20))
PACKAGED_BYTES = Counter("livesrv_hls_packaged_bytes_total", "Bytes of fMP4 segments packaged",
                         ["rendition"])
PACKAGERS = Gauge("livesrv_hls_packagers", "Rendition packagers running")
CHANNELS = Gauge("livesrv_hls_channels", "Channels with HLS playlists (live or lingering)")
GAPS = Counter("livesrv_hls_packager_gaps_total",
               "Times a packager fell behind and the hub skipped it to the next keyframe", ["rendition"])
PARTS = Counter("livesrv_llhls_parts_total", "LL-HLS partial segments produced", ["rendition"])
UNPACKAGEABLE = Counter("livesrv_hls_unsupported_tracks_total",
                        "Tracks left out of HLS because their codec has no fMP4 mapping", ["kind"])

RENDITION_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}$")  # a safe path segment
#: what the multivariant playlist announces before a rendition has a measured segment
DEFAULT_BANDWIDTH = 2_500_000


@dataclass(frozen=True)
class HlsSettings:
    """The ``[hls]`` table of the config file."""

    #: target segment length; segments are cut at the first keyframe after it
    segment_seconds: float = 2.0
    #: segments listed in a media playlist
    window: int = 6
    #: segments still served (not listed) after they left the window
    grace_segments: int = 2
    #: how long an ended channel's playlists stay fetchable (an encoder may reconnect)
    linger_seconds: float = 30.0
    #: how long a media playlist request waits for the first segment of a new stream
    first_segment_wait_seconds: float = 8.0
    #: the packager's subscription queue (packets) before the hub drops to the next keyframe
    queue_packets: int = 2048
    #: LL-HLS part target (PART-TARGET); 0 turns Low-Latency HLS off. 0.5 s is 15 frames at
    #: 30 fps: PART-HOLD-BACK (3 parts) is then 1.5 s, at two part requests a second per viewer
    part_seconds: float = 0.5
    #: blocking requests (playlist reloads and preload-hint part GETs) held at once, per server;
    #: past it they are answered 503 at once
    max_blocking_requests: int = 10000
    #: a held request is answered 503 after this many target durations (the spec's 3)
    blocking_timeout_targets: float = 3.0

    def __post_init__(self) -> None:
        if not 0.1 <= self.segment_seconds <= 30:
            raise ConfigError("[hls] segment_seconds must be between 0.1 and 30")
        if not 2 <= self.window <= 100:
            raise ConfigError("[hls] window must be between 2 and 100 segments")
        if not 0 <= self.grace_segments <= 20:
            raise ConfigError("[hls] grace_segments must be between 0 and 20")
        if self.linger_seconds < 0 or self.first_segment_wait_seconds < 0:
            raise ConfigError("[hls] linger_seconds and first_segment_wait_seconds must be >= 0")
        if self.queue_packets < 64:
            raise ConfigError("[hls] queue_packets must be at least 64")
        if self.part_seconds and not 0.1 <= self.part_seconds <= self.segment_seconds / 2:
            raise ConfigError("[hls] part_seconds must be 0 (off) or between 0.1 and half of "
                              "segment_seconds")
        if self.max_blocking_requests < 0:
            raise ConfigError("[hls] max_blocking_requests must be >= 0")
        if not 1 <= self.blocking_timeout_targets <= 10:
            raise ConfigError("[hls] blocking_timeout_targets must be between 1 and 10")

    @property
    def low_latency(self) -> bool:
        return self.part_seconds > 0


@dataclass(slots=True)
class RenditionState:
    """What the multivariant playlist needs to know about one rendition of a publication."""

    name: str
    playlist: MediaPlaylist
    stream: Stream | None = None
    codecs: tuple[str, ...] = ()
    resolution: tuple[int, int] | None = None
    frame_rate: float | None = None
    packageable: bool = True
    task: asyncio.Task[None] | None = None


@dataclass(slots=True)
class Channel:
    name: str
    renditions: dict[str, RenditionState] = field(default_factory=dict)
    #: the renditions the multivariant playlist lists now, source first
    listed: list[str] = field(default_factory=list)
    stream: Stream | None = None
    publication: str = ""
    live: bool = False
    linger: asyncio.TimerHandle | None = None

    def variants(self) -> list[Variant]:
        variants = []
        for name in self.listed:
            state = self.renditions.get(name)
            if state is None or not state.packageable or not state.codecs:
                continue
            measured = state.playlist.bandwidth()
            if measured is not None:
                peak, average = measured
            else:
                peak = average = estimate_bandwidth(state.stream)
            variants.append(Variant(f"{name}/index.m3u8", peak, average, state.codecs,
                                    state.resolution, state.frame_rate))
        return variants

    def multivariant(self) -> bytes | None:
        variants = self.variants()
        return render_multivariant(variants) if variants else None


def estimate_bandwidth(stream: Stream | None) -> int:
    """Before the first segment: the ingest rate plus container overhead, else the announced
    bitrates, else a typical live rate."""
    if stream is None:
        return DEFAULT_BANDWIDTH
    if stream.bitrate > 0:
        return int(stream.bitrate * 1.05)
    announced = sum(t.bitrate or 0 for t in (stream.info.video, stream.info.audio) if t is not None)
    return announced or DEFAULT_BANDWIDTH


def describe_tracks(info: StreamInfo, kinds: tuple[str, ...]) -> tuple[tuple[str, ...],
                                                                       tuple[int, int] | None, float | None]:
    """(CODECS, RESOLUTION, FRAME-RATE) of the packaged tracks."""
    codecs = []
    resolution = frame_rate = None
    if "video" in kinds and info.video is not None:
        codecs.append(codec_string(info.video))
        picture = picture_info(info.video)
        if picture is not None:
            resolution = (picture.width, picture.height)
            frame_rate = picture.fps
    if "audio" in kinds and info.audio is not None:
        codecs.append(codec_string(info.audio))
    return tuple(codecs), resolution, frame_rate


class RenditionPackager:
    """One rendition of one publication: packets in, segments into the rendition's playlist."""

    def __init__(self, stream: Stream, state: RenditionState, writer: Fmp4Writer, file_id: str,
                 settings: HlsSettings, *, is_current: Callable[[], bool]) -> None:
        self.stream = stream
        self.state = state
        self.playlist = state.playlist
        self.writer = writer
        #: names this packager's files (init-ID.mp4, ID-SEQ.m4s): unique, so URLs are never reused
        self.file_id = file_id
        self.settings = settings
        self._is_current = is_current
        self._clock_kind = writer.main_kind
        self._has_video = self._clock_kind == "video"
        self._time_base = writer.main_time_base
        self._segment_ticks = settings.segment_seconds / float(self._time_base)
        self._low_latency = settings.low_latency
        # one tick of slack: RTMP's millisecond timestamps jitter (33/34 ms frames), and without
        # it every other 15-frame part would come out one frame short
        self._part_ticks = settings.part_seconds / float(self._time_base) + 1
        self._part_start = 0
        self._part_independent = False
        #: a keyframe ended the open segment: the next part starts a new one (and closes it)
        self._segment_done = False
        self._last_clock_dts: int | None = None
        self._started = False
        #: the hub dropped packets for us (we fell behind): cut at the next keyframe
        self._gap = False
        self._segment_start = 0
        self._segment_wall = 0.0
        self._labels = (SEGMENTS.labels(state.name), SEGMENT_SECONDS.labels(state.name),
                        PACKAGED_BYTES.labels(state.name))
        self._parts = PARTS.labels(state.name)
        # Subscribed here, not when ``run`` starts: a ladder rung is announced and fed by its
        # encoder at once, and packets published before the task's first step would be gone
        # (all but the cached GOP). The packets of this publication also wait here while the
        # previous packager finishes its last segment: the playlist gets its segments in order.
        self.subscription = stream.subscribe(f"hls/{state.name}", maxsize=settings.queue_packets)

    async def run(self, previous: asyncio.Task[None] | None) -> None:
        subscription = self.subscription
        PACKAGERS.inc()
        try:
            if previous is not None and not previous.done():
                await asyncio.wait([previous])  # its failure is its own (logged when it ends)
            self.playlist.add_init(f"init-{self.file_id}.mp4", self.writer.init_segment(),
                                   part_prefix=self.file_id)
            dropped = 0
            while True:
                packet = await subscription.get()
                if packet is None:
                    break
                if subscription.dropped != dropped:
                    dropped = subscription.dropped
                    self._gap = True
                    GAPS.labels(self.state.name).inc()
                batch = subscription.drain()
                if batch:
                    batch.insert(0, packet)
                    self.feed(batch, time.time())
                else:
                    self.feed((packet,), time.time())
            self.finish()
        finally:
            subscription.close()
            PACKAGERS.dec()

    def feed(self, packets: tuple[Packet, ...] | list[Packet], now: float) -> None:
        """Packets that arrived together; ``now`` is the wall clock when the last one did."""
        writer = self.writer
        clock_kind = self._clock_kind
        low_latency = self._low_latency
        for packet in packets:
            kind = packet.kind
            if kind == clock_kind:
                if packet.keyframe or not self._has_video:
                    if not self._started:
                        self._begin(packet, packets, now)
                    elif self._gap:
                        # packets are missing before this keyframe: end the segment where its
                        # own samples end, not at this keyframe, so no sample spans the hole
                        self._gap = False
                        self._cut(None)
                        self._begin(packet, packets, now)
                    elif self._segment_due(packet):
                        self._cut(packet.dts)
                        self._begin(packet, packets, now)
                elif not self._started:
                    continue  # a segment starts with a keyframe: nothing before the first one
                if low_latency:
                    self._maybe_cut_part(packet)
            elif not self._started:
                continue
            writer.add(packet)

    def _segment_due(self, packet: Packet) -> bool:
        """At a keyframe (or any audio frame without video): is the segment long enough?"""
        elapsed = packet.dts - self._segment_start
        if self._has_video or not self._low_latency:
            return elapsed >= self._segment_ticks
        # audio only, with parts: a segment ends where a part does (no sliver of a last part)
        return self._part_due(packet) and elapsed + self._part_ticks / 2 >= self._segment_ticks

    def _part_due(self, packet: Packet) -> bool:
        """Would one more frame (as long as the last one) take the current part past the target?"""
        last = self._last_clock_dts
        if last is None or not self.writer.pending(self._clock_kind):
            return False
        return packet.dts - self._part_start + max(0, packet.dts - last) > self._part_ticks

    def _maybe_cut_part(self, packet: Packet) -> None:
        """Before a frame of the clock track: end the part here when it is due."""
        if self._last_clock_dts is None or not self.writer.pending(self._clock_kind):
            self._last_clock_dts = packet.dts
            self._part_start = packet.dts
            self._part_independent = packet.keyframe or not self._has_video
            return
        due = self._part_due(packet)
        self._last_clock_dts = packet.dts
        if due:
            self._cut_part(packet.dts)
            self._part_start = packet.dts
            self._part_independent = packet.keyframe or not self._has_video

    def _cut_part(self, end_dts: int | None) -> None:
        data = self.writer.flush(end_dts)
        if not data:
            return
        _, closed = self.playlist.add_part(data, self.writer.fragment_duration,
                                           self._part_independent, self._segment_wall,
                                           new_segment=self._segment_done)
        self._segment_done = False
        self._parts.inc()
        if closed is not None:
            self._count_segment(closed.size, closed.duration)

    def _count_segment(self, size: int, duration: float) -> None:
        segments, seconds, packaged = self._labels
        segments.inc()
        seconds.observe(duration)
        packaged.inc(size)

    def _begin(self, packet: Packet, batch: tuple[Packet, ...] | list[Packet], now: float) -> None:
        self._started = True
        self._segment_start = packet.dts
        # A batch is what queued up while we were busy (or the GOP cache on subscribing): its
        # last packet arrived about now, and earlier ones earlier by their timestamp difference.
        latest = next((p.dts for p in reversed(batch) if p.kind == packet.kind), packet.dts)
        behind = float((latest - packet.dts) * self._time_base)
        # ...but never before the previous segment's first packet (a burst's timestamps may say so)
        self._segment_wall = max(now - max(0.0, behind), self._segment_wall)

    def _cut(self, end_dts: int | None) -> None:
        if self._low_latency:
            self._cut_part(end_dts)  # the segment's last part (it closes with the next one)
            self._last_clock_dts = None  # the next segment's first frame starts a new part
            self._segment_done = True
            return
        data = self.writer.flush(end_dts)
        if not data:
            return
        duration = self.writer.fragment_duration
        self.playlist.append(data, duration, self._segment_wall, self.file_id)
        self._count_segment(len(data), duration)

    def finish(self) -> None:
        """The publication ended: the last segment, then ENDLIST unless a newer one took over."""
        if self._started:
            self._cut(None)
            if self._low_latency:
                closed = self.playlist.close_segment(self.file_id)
                if closed is not None:
                    self._count_segment(closed.size, closed.duration)
        if self._is_current():
            self.playlist.end()


class HlsService:
    """Packages every stream of the hub; the HTTP layer reads ``channel(name)``."""

    def __init__(self, hub: Hub, settings: HlsSettings) -> None:
        self.hub = hub
        self.settings = settings
        self._channels: dict[str, Channel] = {}
        self._last_id = 0
        self._closed = False

    def start(self) -> None:
        self.hub.add_listener(on_start=self._on_start, on_end=self._on_end)
        for stream in self.hub.streams():  # streams that went live before we were wired
            self._on_start(stream)

    async def close(self) -> None:
        self._closed = True
        tasks = []
        for channel in self._channels.values():
            if channel.linger is not None:
                channel.linger.cancel()
            for state in channel.renditions.values():
                if state.task is not None and not state.task.done():
                    state.task.cancel()
                    tasks.append(state.task)
                state.playlist.release()
        self._channels.clear()
        CHANNELS.set(0)
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    def channel(self, name: str) -> Channel | None:
        return self._channels.get(name)

    def channels(self) -> list[Channel]:
        return list(self._channels.values())

    # -- hub events -------------------------------------------------------------------------
    def _new_id(self) -> str:
        # milliseconds since the epoch, strictly increasing: names stay unique across restarts
        value = max(int(time.time() * 1000), self._last_id + 1)
        self._last_id = value
        return format(value, "x")

    def _on_start(self, stream: Stream) -> None:
        if self._closed:
            return
        channel = self._channels.get(stream.channel)
        if channel is None:
            channel = self._channels[stream.channel] = Channel(stream.channel)
            CHANNELS.set(len(self._channels))
        if channel.linger is not None:
            channel.linger.cancel()
            channel.linger = None
        channel.stream = stream
        channel.publication = self._new_id()
        channel.live = True
        channel.listed = []
        self._package(channel, stream, "source")
        stream.watch_renditions(lambda child: self._on_rendition(channel, stream, child))

    def _on_rendition(self, channel: Channel, parent: Stream, child: Stream) -> None:
        if self._closed or channel.stream is not parent or parent.ended:
            return
        if not RENDITION_NAME.match(child.rendition) or child.rendition == "source":
            log.warning("channel %s: rendition name %r cannot be a path; not packaged",
                        channel.name, child.rendition)
            return
        self._package(channel, child, child.rendition)

    def _package(self, channel: Channel, stream: Stream, name: str) -> None:
        state = channel.renditions.get(name)
        if state is None:
            state = channel.renditions[name] = RenditionState(name, MediaPlaylist(
                window=self.settings.window, grace=self.settings.grace_segments,
                target_seconds=self.settings.segment_seconds,
                part_target=self.settings.part_seconds or None))
        state.stream = stream
        try:
            writer = Fmp4Writer(stream.info)
        except UnsupportedCodec as exc:
            log.warning("channel %s/%s cannot be packaged as HLS: %s", channel.name, name, exc)
            for kind in ("video", "audio"):
                if stream.info.track(kind) is not None:  # type: ignore[arg-type]
                    UNPACKAGEABLE.labels(kind).inc()
            state.packageable = False
            state.playlist.end()
            return
        for kind, reason in writer.skipped.items():
            log.warning("channel %s/%s: %s track left out of HLS: %s", channel.name, name, kind, reason)
            UNPACKAGEABLE.labels(kind).inc()
        state.packageable = True
        state.codecs, state.resolution, state.frame_rate = describe_tracks(stream.info, writer.kinds)
        if name not in channel.listed:
            channel.listed.append(name)
        publication = channel.publication

        def is_current() -> bool:
            # (called from within the packager's task) no newer publication, and no newer
            # packager of this rendition (the ladder may restart a rung): then ENDLIST is due
            return channel.publication == publication and state.task is asyncio.current_task()

        packager = RenditionPackager(stream, state, writer, self._new_id(), self.settings,
                                     is_current=is_current)
        previous = state.task
        task = asyncio.get_running_loop().create_task(packager.run(previous),
                                                      name=f"hls {channel.name}/{name}")
        # a task cancelled before its first step never runs its ``finally``
        task.add_done_callback(lambda _: packager.subscription.close())
        state.task = task
        task.add_done_callback(lambda t: self._packager_done(channel, name, publication, t))

    def _packager_done(self, channel: Channel, name: str, publication: str,
                       task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("HLS packager of %s/%s failed", channel.name, name, exc_info=task.exception())
            channel.renditions[name].playlist.end()
        if self._closed or name == "source":
            return
        state = channel.renditions.get(name)
        if (state is not None and state.task is task and channel.publication == publication
                and channel.live and name in channel.listed):
            # a rung the ladder dropped while the source goes on: no longer offered to players
            channel.listed.remove(name)
        # its playlist stays fetchable (ended) for a while, then goes unless the rung came back
        asyncio.get_running_loop().call_later(self.settings.linger_seconds, self._drop_rendition,
                                              channel, name, task)

    def _drop_rendition(self, channel: Channel, name: str, task: asyncio.Task[None]) -> None:
        state = channel.renditions.get(name)
        if state is None or state.task is not task or name in channel.listed:
            return
        del channel.renditions[name]
        state.playlist.release()

    def _on_end(self, stream: Stream) -> None:
        channel = self._channels.get(stream.channel)
        if channel is None or channel.stream is not stream or self._closed:
            return
        channel.live = False
        loop = asyncio.get_running_loop()
        channel.linger = loop.call_later(self.settings.linger_seconds, self._expire, channel)

    def _expire(self, channel: Channel) -> None:
        if channel.live or self._channels.get(channel.name) is not channel:
            return
        del self._channels[channel.name]
        CHANNELS.set(len(self._channels))
        for state in channel.renditions.values():
            if state.task is not None and not state.task.done():
                state.task.cancel()
            state.playlist.release()
        log.info("channel %s: HLS playlists removed after lingering", channel.name)
