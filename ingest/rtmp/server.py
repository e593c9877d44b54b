"""The asyncio shell around the sans-IO RTMP core: a listener, one session per connection.

``RtmpServer(hub, authorize, host=..., port=...)``: ``await start()``, ``port``, ``serving``,
``await close()``. ``authorize(app, stream_key)`` returns the channel for a good key or None.

Each session is an ``asyncio.Protocol``: bytes go straight into the ``ServerConnection``, whose
events are handled in one synchronous batch per read (no task, no await on the media path).
The one await (authorization) pauses reading and parks the unhandled events until it returns.
"""

from __future__ import annotations

import asyncio
import logging
import traceback
from collections.abc import Awaitable, Callable
from typing import cast

from prometheus_client import Counter, Gauge

from livesrv.hub import Hub, Stream
from livesrv.media import Packet, Track

from .chunks import PartialBudget
from .connection import RtmpLimits, ServerConnection
from .errors import ProtocolTimeout, RemoteProtocolError
from .events import (
    AudioMessage,
    CloseStream,
    ConnectRequest,
    CreateStream,
    DeleteStream,
    Event,
    FCPublish,
    FCUnpublish,
    MediaMessage,
    Metadata,
    PlayRequest,
    PublishRequest,
    ReleaseStream,
    VideoMessage,
)
from .flv import FlvAdapter

__all__ = ["RtmpLimits", "RtmpServer"]

log = logging.getLogger("livesrv.rtmp")

Authorize = Callable[[str, str], Awaitable[str | None]]

CONNECTIONS = Gauge("livesrv_rtmp_connections", "Open RTMP connections")
PUBLISHING = Gauge("livesrv_rtmp_publishing", "RTMP connections publishing a live stream")
REJECTED = Counter("livesrv_rtmp_rejected_total", "RTMP publishes or plays refused", ["reason"])
PROTOCOL_ERRORS = Counter("livesrv_rtmp_protocol_errors_total",
                          "RTMP connections closed for a protocol error, a limit or a timeout")
INTERNAL_ERRORS = Counter("livesrv_rtmp_internal_errors_total",
                          "RTMP connections closed because handling their input raised (a bug)")
RECEIVED_BYTES = Counter("livesrv_rtmp_received_bytes_total", "Bytes received over RTMP")

#: how often every session's timeouts are checked
TICK_SECONDS = 1.0


class RtmpServer:
    def __init__(self, hub: Hub, authorize: Authorize, *, host: str = "0.0.0.0", port: int = 1935,
                 limits: RtmpLimits | None = None) -> None:
        self.hub = hub
        self.authorize = authorize
        self.host = host
        self.port = port
        self.limits = limits or RtmpLimits()
        #: bytes of unfinished RTMP messages held by all sessions together
        self.partial_budget = PartialBudget(self.limits.max_partial_bytes_total)
        self.sessions: set[RtmpSession] = set()
        self._server: asyncio.Server | None = None
        self._ticker: asyncio.Task[None] | None = None

    @property
    def serving(self) -> bool:
        return self._server is not None and self._server.is_serving()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: RtmpSession(self), self.host, self.port,
                                                backlog=1024, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]
        self._ticker = loop.create_task(self._tick())

    async def close(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None
        if self._server is not None:
            self._server.close()
        for session in list(self.sessions):
            session.close("server shutting down")
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(TICK_SECONDS)
            now = loop.time()
            for session in list(self.sessions):
                session.check_timers(now)


class RtmpSession(asyncio.Protocol):
    """One RTMP connection. At most one publication at a time."""

    def __init__(self, server: RtmpServer) -> None:
        self.server = server
        self.limits = server.limits
        self.loop = asyncio.get_running_loop()
        self.conn = ServerConnection(self.limits, now=self.loop.time(), budget=server.partial_budget)
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self._parked: list[Event] = []  # events waiting for an authorization to finish
        self._blocked = False
        self._reading_paused = False
        self._closed = False
        # the publication
        self.channel: str | None = None
        self.publish_stream_id = 0
        self.adapter: FlvAdapter | None = None
        self.stream: Stream | None = None
        self._pending: list[Packet] = []
        self._pending_bytes = 0
        self._start_timer: asyncio.TimerHandle | None = None
        self._auth_task: asyncio.Task[None] | None = None

    # -- asyncio.Protocol ------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCPTransport does not subclass asyncio.Transport (no isinstance check here)
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            self.peer = f"{peer[0]}:{peer[1]}"
        self.server.sessions.add(self)
        CONNECTIONS.inc()
        if len(self.server.sessions) > self.limits.max_connections:
            REJECTED.labels("too_many_connections").inc()
            log.warning("rtmp %s refused: %d connections already open", self.peer,
                        self.limits.max_connections)
            self.close("too many connections", flush=False)
        elif self.server.partial_budget.spent:
            REJECTED.labels("memory_budget").inc()
            log.warning("rtmp %s refused: the budget for unfinished messages (%d bytes) is spent",
                        self.peer, self.server.partial_budget.limit)
            self.close("memory budget spent", flush=False)

    def data_received(self, data: bytes) -> None:
        RECEIVED_BYTES.inc(len(data))
        self.conn.receive_data(data, self.loop.time())
        if self._blocked:
            # Waiting for authorization: hold what came, but read no more until it is done.
            self._pause_reading()
            return
        self._process(None)

    def eof_received(self) -> bool:
        self.conn.receive_data(b"")
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._blocked = False
        self.conn.close()  # gives back what its reader held to the server-wide budget
        self.server.sessions.discard(self)
        CONNECTIONS.dec()
        if self._auth_task is not None:
            self._auth_task.cancel()
        self._end_publication("disconnected")
        self._parked.clear()

    def pause_writing(self) -> None:
        # The peer is not reading what we send: stop reading what it sends, so neither
        # direction buffers without bound.
        self._pause_reading()

    def resume_writing(self) -> None:
        if not self._blocked:
            self._resume_reading()

    def _pause_reading(self) -> None:
        if not self._reading_paused and self.transport is not None and not self._closed:
            self._reading_paused = True
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._reading_paused and self.transport is not None and not self._closed:
            self._reading_paused = False
            self.transport.resume_reading()

    # -- closing ---------------------------------------------------------------------------------
    def close(self, reason: str, *, flush: bool = True) -> None:
        """Close the connection (after sending what is queued when ``flush``)."""
        if self._closed or self.transport is None:
            return
        self._closed = True
        self.conn.close()
        if flush:
            self._flush()
            self.transport.close()
        else:
            self.transport.abort()
        log.debug("rtmp %s closed: %s", self.peer, reason)

    def check_timers(self, now: float) -> None:
        if self._closed:
            return
        try:
            self.conn.handle_timer(now)
        except ProtocolTimeout as exc:
            self._protocol_error(exc)

    def _protocol_error(self, exc: RemoteProtocolError) -> None:
        PROTOCOL_ERRORS.inc()
        what = f" ({self.channel})" if self.channel else ""
        log.warning("rtmp %s%s closed: %s", self.peer, what, exc.reason)
        self._end_publication("protocol error")
        self.close(exc.reason, flush=False)

    def _internal_error(self, exc: Exception) -> None:
        INTERNAL_ERRORS.inc()
        frames = traceback.extract_tb(exc.__traceback__)
        where = f" at {frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno}" if frames else ""
        what = f" ({self.channel})" if self.channel else ""
        log.error("rtmp %s%s closed: internal error handling its input: %s: %s%s",
                  self.peer, what, type(exc).__name__, str(exc)[:200], where)
        self._end_publication("internal error")
        self.close("internal error", flush=False)

    def _flush(self) -> None:
        data = self.conn.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    # -- events ----------------------------------------------------------------------------------
    def _process(self, parked: list[Event] | None) -> None:
        """Handle events (the parked ones first) until none are left or one must wait."""
        try:
            events = parked or self.conn.next_events()
            while events and not self._closed:
                for index, event in enumerate(events):
                    if self._handle(event):
                        # An authorization is running: park the rest until it is done.
                        self._parked = events[index + 1:]
                        self._blocked = True
                        self._pause_reading()
                        self._flush()
                        return
                    if self._closed:
                        return
                events = self.conn.next_events()
        except RemoteProtocolError as exc:
            self._protocol_error(exc)
            return
        except Exception as exc:
            # A bug of ours tripped over this peer's input. Left to asyncio it becomes a
            # traceback per read ("data_received() call failed", or "Task exception was never
            # retrieved" after an authorization) and a half-open session with reading paused:
            # instead one line naming the peer and where it failed, and the connection closed.
            self._internal_error(exc)
            return
        if self.conn.peer_closed and not self._closed:
            self.close("peer closed")
            return
        self._flush()

    def _handle(self, event: Event) -> bool:
        """Act on one event; True when handling continues later (an await is running)."""
        kind = type(event)
        if kind is VideoMessage or kind is AudioMessage:  # nearly every event: the cheap path
            self._media(cast(MediaMessage, event), kind is VideoMessage)
            return False
        conn = self.conn
        if isinstance(event, Metadata):
            if self.adapter is not None:
                self.adapter.set_metadata(event.values)
                if self.stream is None:
                    self._maybe_start()
        elif isinstance(event, ConnectRequest):
            conn.accept_connect(event)
        elif isinstance(event, ReleaseStream):
            conn.accept_release_stream(event)
        elif isinstance(event, FCPublish):
            conn.accept_fcpublish(event)
        elif isinstance(event, CreateStream):
            conn.accept_create_stream(event)
        elif isinstance(event, PublishRequest):
            return self._publish(event)
        elif isinstance(event, FCUnpublish):
            conn.accept_fcunpublish(event)
            self._end_publication("unpublished")
        elif isinstance(event, DeleteStream | CloseStream):
            stream_id = event.deleted_stream_id if isinstance(event, DeleteStream) else event.stream_id
            if stream_id == self.publish_stream_id:
                self._end_publication("unpublished")
            conn.streams.discard(stream_id)
        elif isinstance(event, PlayRequest):
            REJECTED.labels("play").inc()
            log.info("rtmp %s refused: play %r (no RTMP playback)", self.peer, event.name[:64])
            conn.refuse_play(event)
        return False

    def _media(self, message: MediaMessage, video: bool) -> None:
        adapter = self.adapter
        if adapter is None or message.stream_id != self.publish_stream_id:
            return  # not publishing (yet), or another message stream: nothing to do with it
        if video:
            out = adapter.video(message.timestamp, message.payload)
        else:
            out = adapter.audio(message.timestamp, message.payload)
        if out is None:
            return
        if type(out) is Packet:
            stream = self.stream
            if stream is not None:
                stream.push(out)
            else:
                self._hold(out)
        else:
            self._track_changed(cast(Track, out))

    # -- publishing ------------------------------------------------------------------------------
    def _publish(self, request: PublishRequest) -> bool:
        if self.adapter is not None:
            self.conn.reject_publish(request, "NetStream.Publish.BadName", "already publishing")
            return False
        key = request.name.split("?", 1)[0].strip()
        if not key:
            self._refuse(request, "no_key", "NetStream.Publish.BadName", "no stream key")
            return False
        self._auth_task = self.loop.create_task(self._authorize(request, key))
        return True

    async def _authorize(self, request: PublishRequest, key: str) -> None:
        try:
            # "live?token=…" or "live/" name the same application
            app = self.conn.app.split("?", 1)[0].strip("/")
            channel = await self.server.authorize(app, key)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("rtmp %s: authorizing a publish failed", self.peer)
            if not self._closed:
                self._refuse(request, "error", "NetStream.Publish.Denied", "authorization failed")
            return
        finally:
            self._auth_task = None
        if self._closed:
            return
        if channel is None:
            self._refuse(request, "bad_key", "NetStream.Publish.Denied", "wrong stream key")
            return
        self.channel = channel
        self.publish_stream_id = request.stream_id
        self.adapter = FlvAdapter()
        self.conn.accept_publish(request, channel)
        self._flush()
        PUBLISHING.inc()
        self._start_timer = self.loop.call_later(self.limits.start_timeout, self._start_timeout)
        # carry on with what arrived meanwhile
        self._blocked = False
        parked, self._parked = self._parked, []
        self._process(parked)
        if not self._closed and not self._blocked:
            self._resume_reading()

    def _refuse(self, request: PublishRequest, reason: str, code: str, description: str) -> None:
        REJECTED.labels(reason).inc()
        log.warning("rtmp %s refused: %s (app %r)", self.peer, description, self.conn.app[:64])
        self.conn.reject_publish(request, code, description)
        self.close(description)

    def _hold(self, packet: Packet) -> None:
        """Media arriving before the stream can start is held, within bounds."""
        self._pending.append(packet)
        self._pending_bytes += len(packet.data)
        if (self._pending_bytes > self.limits.max_pending_bytes
                or len(self._pending) > self.limits.max_pending_packets):
            self._start_now()

    def _track_changed(self, track: Track) -> None:
        stream = self.stream
        if stream is None:
            self._maybe_start()
            return
        live = stream.info.track(track.kind)
        if live == track:
            return
        # New codec parameters mid-stream: a new publication, so consumers start afresh.
        log.info("rtmp %s: %s sent new %s parameters; restarting the publication",
                 self.peer, self.channel, track.kind)
        self.server.hub.stop(stream, "new codec parameters")
        self.stream = None
        self._start_now()

    def _maybe_start(self) -> None:
        if self.adapter is not None and self.adapter.ready():
            self._start_now()

    def _start_timeout(self) -> None:
        self._start_timer = None
        if self.stream is None and not self._closed:
            try:
                self._start_now()
            except Exception as exc:  # what the peer sent, failing outside _process (see there)
                self._internal_error(exc)

    def _start_now(self) -> None:
        adapter = self.adapter
        if adapter is None or self.channel is None or self._closed:
            return
        info = adapter.stream_info()
        if info.video is None and info.audio is None:
            # Nothing decodable yet: drop what is held (it cannot be played) and keep waiting.
            self._pending.clear()
            self._pending_bytes = 0
            return
        if self._start_timer is not None:
            self._start_timer.cancel()
            self._start_timer = None
        self.stream = self.server.hub.start(self.channel, info, source="rtmp",
                                            on_replaced=self._replaced)
        log.info("rtmp %s publishing %s (%s)", self.peer, self.channel, adapter.describe())
        pending, self._pending = self._pending, []
        self._pending_bytes = 0
        stream = self.stream
        for packet in pending:
            if info.track(packet.kind) is not None:
                stream.push(packet)

    def _replaced(self) -> None:
        """Another connection published this channel: this one is done."""
        log.info("rtmp %s: %s was taken over by a new publish; closing this connection",
                 self.peer, self.channel)
        self.stream = None
        self._end_publication("replaced")
        self.close("replaced by a new publish")

    def _end_publication(self, reason: str) -> None:
        if self._start_timer is not None:
            self._start_timer.cancel()
            self._start_timer = None
        if self.adapter is not None:
            PUBLISHING.dec()
        stream = self.stream
        self.stream = None
        self.adapter = None
        self._pending.clear()
        self._pending_bytes = 0
        if stream is not None:
            self.server.hub.stop(stream, reason)
            log.info("rtmp %s: %s stopped publishing (%s)", self.peer, self.channel, reason)
        self.publish_stream_id = 0

