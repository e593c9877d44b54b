"""The hub: the registry of live streams, and the fan-out from one publisher to many consumers.

A ``Stream`` never blocks its publisher. Each consumer has its own bounded queue; a consumer
that falls behind has its queue emptied and resumes at the next video keyframe (so it decodes
cleanly), and the drop is counted. A consumer that joins late starts at the last keyframe
(the GOP cache), so players and packagers never wait a whole GOP for a decodable frame.

Everything here runs on the event loop thread. Consumers that do CPU work (encoders) take
packets here and hand them to their own worker thread.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from .media import Packet, StreamInfo

log = logging.getLogger(__name__)

#: Upper bounds of the GOP cache: a publisher with a 60 s keyframe interval must not make
#: every stream hold a minute of video in memory.
GOP_CACHE_MAX_PACKETS = 1200
GOP_CACHE_MAX_BYTES = 16 * 1024 * 1024

DEFAULT_QUEUE_PACKETS = 512


class Subscription:
    """One consumer's bounded, lossy-at-keyframes view of a stream.

    ``await sub.get()`` returns the next packet, or ``None`` once the stream has ended and the
    queue is drained. ``async for packet in sub`` does the same until the end.
    """

    __slots__ = (
        "_has_video",
        "_queue",
        "_skip_to_keyframe",
        "_stream",
        "_waiter",
        "closed",
        "dropped",
        "maxsize",
        "name",
    )

    def __init__(self, stream: Stream, name: str, maxsize: int) -> None:
        self._stream = stream
        self.name = name
        self.maxsize = maxsize
        self._queue: deque[Packet] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._has_video = stream.info.video is not None
        self._skip_to_keyframe = False
        self.closed = False
        #: packets this consumer lost because it was too slow
        self.dropped = 0

    @property
    def stream(self) -> Stream:
        return self._stream

    def __len__(self) -> int:
        return len(self._queue)

    def _offer(self, packet: Packet) -> None:
        if self._skip_to_keyframe:
            if not (packet.keyframe and packet.kind == "video"):
                self.dropped += 1
                return
            self._skip_to_keyframe = False
        queue = self._queue
        if len(queue) >= self.maxsize:
            self.dropped += len(queue)
            queue.clear()
            if self._has_video and not (packet.keyframe and packet.kind == "video"):
                self._skip_to_keyframe = True
                self.dropped += 1
                log.info("consumer %s of %s fell behind; skipping to the next keyframe",
                         self.name, self._stream.channel)
                return
        queue.append(packet)
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def get_nowait(self) -> Packet | None:
        """The next queued packet, or ``None`` when nothing is queued right now."""
        return self._queue.popleft() if self._queue else None

    def drain(self) -> list[Packet]:
        """Everything queued now, in one batch (for consumers that work in batches)."""
        items = list(self._queue)
        self._queue.clear()
        return items

    async def get(self) -> Packet | None:
        while not self._queue:
            if self.closed or self._stream.ended:
                return None
            loop = asyncio.get_running_loop()
            self._waiter = loop.create_future()
            await self._waiter
        return self._queue.popleft()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Packet:
        packet = await self.get()
        if packet is None:
            raise StopAsyncIteration
        return packet

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._queue.clear()
            self._stream._subscriptions.discard(self)
            self._wake()


class Stream:
    """One publication of a channel: its tracks, its GOP cache and its consumers."""

    def __init__(self, channel: str, info: StreamInfo, *, source: str,
                 on_replaced: Callable[[], None] | None = None, rendition: str = "source") -> None:
        self.channel = channel
        self.info = info
        self.source = source  # "rtmp", "whip", "ladder", ...
        #: "source" for what the publisher sent; a rung's name ("720p") for the ladder's outputs
        self.rendition = rendition
        #: the ladder's outputs of this publication, by rung name (empty on a rendition itself)
        self.renditions: dict[str, Stream] = {}
        self._rendition_listeners: list[Callable[[Stream], None]] = []
        self.started_at = time.time()
        self.ended = False
        self.end_reason = ""
        self.bytes_in = 0
        self.packets_in = 0
        self._on_replaced = on_replaced
        self._subscriptions: set[Subscription] = set()
        self._gop: list[Packet] = []
        self._gop_bytes = 0
        self._ended_event = asyncio.Event()
        # bitrate over a sliding window of about two seconds
        self._rate_window: deque[tuple[float, int]] = deque()
        self._rate_bytes = 0

    # -- publisher side -------------------------------------------------------------------
    def push(self, packet: Packet) -> None:
        """Hand one packet to every consumer. Never blocks, never awaits."""
        if self.ended:
            return
        size = len(packet.data)
        self.bytes_in += size
        self.packets_in += 1
        self._account_rate(size)
        if packet.kind == "video" or self.info.video is None:
            if packet.keyframe and packet.kind == "video":
                self._gop = [packet]
                self._gop_bytes = size
            elif self._gop or self.info.video is None:
                self._append_gop(packet, size)
        elif self._gop:
            self._append_gop(packet, size)
        for sub in tuple(self._subscriptions):
            sub._offer(packet)

    def _append_gop(self, packet: Packet, size: int) -> None:
        gop = self._gop
        gop.append(packet)
        self._gop_bytes += size
        if len(gop) > GOP_CACHE_MAX_PACKETS or self._gop_bytes > GOP_CACHE_MAX_BYTES:
            # Too long a GOP to cache whole: keep none rather than a cache that cannot start a
            # decoder; late joiners then wait for the next keyframe.
            self._gop = []
            self._gop_bytes = 0

    def _account_rate(self, size: int) -> None:
        now = time.monotonic()
        window = self._rate_window
        window.append((now, size))
        self._rate_bytes += size
        while window and now - window[0][0] > 2.0:
            self._rate_bytes -= window.popleft()[1]

    @property
    def bitrate(self) -> float:
        """Ingest bits per second over the last two seconds."""
        window = self._rate_window
        if len(window) < 2:
            return 0.0
        span = max(window[-1][0] - window[0][0], 0.5)
        return self._rate_bytes * 8 / span

    def end(self, reason: str = "unpublished") -> None:
        if self.ended:
            return
        self.ended = True
        self.end_reason = reason
        self._ended_event.set()
        for sub in tuple(self._subscriptions):
            sub._wake()
        for child in self.renditions.values():
            child.end(reason)

    # -- renditions (the ladder's rungs) ----------------------------------------------------
    def add_rendition(self, name: str, info: StreamInfo) -> Stream:
        """A derived stream of this publication (a ladder rung), fanned out like the source.

        It is not in the hub's registry (the channel is still this publication); outputs that
        package every rendition learn of it through ``watch_renditions``.
        """
        if self.ended:
            raise RuntimeError(f"{self.channel} has ended")
        old = self.renditions.get(name)
        if old is not None:
            old.end("replaced")
        child = Stream(self.channel, info, source="ladder", rendition=name)
        self.renditions[name] = child
        for listener in tuple(self._rendition_listeners):
            try:
                listener(child)
            except Exception:
                log.exception("a rendition listener failed for %s/%s", self.channel, name)
        return child

    def remove_rendition(self, name: str, reason: str = "dropped") -> None:
        """Stop a rung (the ladder sheds rungs it cannot encode in real time)."""
        child = self.renditions.pop(name, None)
        if child is not None:
            child.end(reason)

    def watch_renditions(self, listener: Callable[[Stream], None]) -> None:
        """Call ``listener`` for every rendition, those existing now and those added later."""
        self._rendition_listeners.append(listener)
        for child in tuple(self.renditions.values()):
            listener(child)

    async def wait_ended(self) -> None:
        await self._ended_event.wait()

    # -- consumer side --------------------------------------------------------------------
    def subscribe(self, name: str, *, maxsize: int = DEFAULT_QUEUE_PACKETS,
                  from_keyframe: bool = True) -> Subscription:
        """A new consumer; it starts at the cached keyframe unless ``from_keyframe`` is false."""
        sub = Subscription(self, name, maxsize)
        if from_keyframe:
            gop = self._gop
            if gop and len(gop) <= maxsize:
                sub._queue.extend(gop)
            elif self.info.video is not None:
                # No cached GOP (none yet, or too long to cache) or one longer than this queue:
                # its tail would start mid-GOP, undecodable. Start at the next keyframe instead.
                sub._skip_to_keyframe = True
        self._subscriptions.add(sub)
        return sub

    @property
    def consumers(self) -> int:
        return len(self._subscriptions)

    @property
    def dropped_packets(self) -> int:
        """Packets lost by the consumers subscribed now because they were too slow."""
        return sum(sub.dropped for sub in self._subscriptions)

    def describe(self) -> dict[str, Any]:
        return {
            "channel": self.channel,
            "source": self.source,
            "started_at": self.started_at,
            "bitrate": round(self.bitrate),
            "bytes_in": self.bytes_in,
            "video": None if self.info.video is None else self.info.video.codec,
            "audio": None if self.info.audio is None else self.info.audio.codec,
        }


StreamListener = Callable[["Stream"], None]


class Hub:
    """Which channels are live, and who gets told when one starts or ends."""

    def __init__(self) -> None:
        self._streams: dict[str, Stream] = {}
        self._on_start: list[StreamListener] = []
        self._on_end: list[StreamListener] = []

    def add_listener(self, *, on_start: StreamListener | None = None,
                     on_end: StreamListener | None = None) -> None:
        """Outputs (packagers, recorders, thumbnails) register here when the app is wired."""
        if on_start is not None:
            self._on_start.append(on_start)
        if on_end is not None:
            self._on_end.append(on_end)

    def start(self, channel: str, info: StreamInfo, *, source: str,
              on_replaced: Callable[[], None] | None = None) -> Stream:
        """Begin a publication. A live publication of the same channel is ended and its
        publisher told (``on_replaced``): the newest connection wins, as encoders reconnect."""
        old = self._streams.get(channel)
        if old is not None:
            log.info("channel %s: new %s publish replaces the running one", channel, source)
            self._finish(old, "replaced")
            if old._on_replaced is not None:
                try:
                    old._on_replaced()
                except Exception:  # a publisher's close hook must not stop the new publish
                    log.exception("channel %s: closing the replaced publisher failed", channel)
        stream = Stream(channel, info, source=source, on_replaced=on_replaced)
        self._streams[channel] = stream
        log.info("channel %s is live (%s, video=%s audio=%s)", channel, source,
                 info.video and info.video.codec, info.audio and info.audio.codec)
        for listener in tuple(self._on_start):
            try:
                listener(stream)
            except Exception:
                log.exception("a stream-start listener failed for %s", channel)
        return stream

    def stop(self, stream: Stream, reason: str = "unpublished") -> None:
        """End a publication, if it is still the channel's current one."""
        if self._streams.get(stream.channel) is stream:
            self._finish(stream, reason)
        else:
            stream.end(reason)

    def _finish(self, stream: Stream, reason: str) -> None:
        self._streams.pop(stream.channel, None)
        stream.end(reason)
        log.info("channel %s ended (%s) after %.1f s, %d bytes in", stream.channel, reason,
                 time.time() - stream.started_at, stream.bytes_in)
        for listener in tuple(self._on_end):
            try:
                listener(stream)
            except Exception:
                log.exception("a stream-end listener failed for %s", stream.channel)

    def get(self, channel: str) -> Stream | None:
        return self._streams.get(channel)

    def streams(self) -> list[Stream]:
        return list(self._streams.values())

    def close(self) -> None:
        for stream in list(self._streams.values()):
            self._finish(stream, "shutdown")
