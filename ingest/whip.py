"""WHIP ingest (RFC 9725): the aiortc shell around ``whip_sdp`` and ``whip_media``.

``WhipIngest(hub, settings)`` holds the sessions. ``await ingest.publish(channel, offer)``
checks the offer, answers it with a receive-only peer connection and returns the session
(its ``id`` names the WHIP resource, its ``answer`` is the SDP to send back); the media that
arrives is turned into a hub publication like an RTMP one: it starts at the first keyframe,
a newer publication of the channel (RTMP or WHIP) replaces it, and ``close`` (DELETE), a
failed or closed connection, or silence ends it.

How encoded frames are taken from aiortc: its ``RTCRtpReceiver`` depacketizes RTP and
reassembles whole encoded frames in its jitter buffer, then puts ``(codec, frame)`` on a
``queue.Queue`` read by a decoder thread, whose decoded pictures feed the receiver's track.
We want the encoded frames (H.264 passes through untouched, there is nothing to decode), and
aiortc offers no public hook for them, so the receiver's queue is replaced by ``_FrameTap``
before the receiver starts: its ``put`` hands frames to the session on the event loop (aiortc
calls it from its RTP handler there) and lets only the end-of-stream ``None`` through, so the
decoder thread idles and then exits as aiortc stops it. The attribute is private: the check in
``_tap`` fails loudly, at the first publish, if an aiortc upgrade renames it.

Keyframes: a browser sends one only when asked (PLI), and HLS segments start at keyframes, so
the session asks every ``keyframe_interval`` seconds (``PublicationAssembler.keyframe_due``),
through the receiver's own PLI sender (also private; same check).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiortc import (
    RTCConfiguration,
    RTCIceServer,
    RTCPeerConnection,
    RTCRtpReceiver,
    RTCRtpTransceiver,
    RTCSessionDescription,
)
from prometheus_client import Counter, Gauge, Histogram

from livesrv.config import ConfigError
from livesrv.hub import Hub, Stream
from livesrv.media import Packet
from livesrv.webrtc_offers import OfferError, Refused

from .whip_media import PublicationAssembler, Start
from .whip_sdp import OfferSummary, check_offer
from .whip_vp8 import Vp8Transcoder

log = logging.getLogger("livesrv.whip")

SESSIONS = Gauge("livesrv_whip_sessions", "Open WHIP sessions (negotiated, connecting or live)")
PUBLISHING = Gauge("livesrv_whip_publishing", "WHIP sessions publishing a live stream")
REJECTED = Counter("livesrv_whip_rejected_total", "WHIP publishes refused", ["reason"])
ENDED = Counter("livesrv_whip_sessions_ended_total", "WHIP sessions ended", ["reason"])
FRAMES_IN = Counter("livesrv_whip_frames_total",
                    "Encoded frames received over WHIP (video access units, audio packets)", ["kind"])
BYTES_IN = Counter("livesrv_whip_received_bytes_total", "Encoded media bytes received over WHIP",
                   ["kind"])
KEYFRAME_REQUESTS = Counter("livesrv_whip_keyframe_requests_total",
                            "Keyframe requests (PLI) sent to WHIP publishers")
TRANSCODED = Counter("livesrv_whip_transcoded_frames_total",
                     "VP8 frames from WHIP publishers encoded to H.264")
SETUP_SECONDS = Histogram("livesrv_whip_setup_seconds",
                          "From a WHIP POST to its stream being live in the hub",
                          buckets=(0.1, 0.25, 0.5, 1, 2, 3, 5, 10, 20))
ANSWER_SECONDS = Histogram("livesrv_whip_answer_seconds",
                           "Time to answer a WHIP offer (ICE gathering included)",
                           buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5))

#: how often each session's timers run (keyframe requests, timeouts)
TICK_SECONDS = 0.25


@dataclass
class WhipSettings:
    """The ``[whip]`` table. ICE (STUN/TURN servers, a public address) is shared with WHEP and
    configured in ``[webrtc]``; the web layer hands it to ``WhipIngest``."""

    #: seconds between keyframe requests (HLS segments are cut at keyframes)
    keyframe_interval: float = 2.0
    #: an offer with video whose video never starts goes live audio-only after this
    start_timeout: float = 10.0
    #: a session that has not connected (ICE + DTLS) by then is dropped
    connect_timeout: float = 20.0
    #: a live session that sends nothing for this long is ended
    media_timeout: float = 10.0
    max_sessions: int = 64
    #: bitrate of the H.264 made from VP8 publishes
    transcode_bitrate: int = 2_500_000

    def __post_init__(self) -> None:
        for name in ("keyframe_interval", "start_timeout", "connect_timeout", "media_timeout"):
            value = getattr(self, name)
            if not 0.2 <= value <= 600:
                raise ConfigError(f"[whip] {name} must be between 0.2 and 600 seconds")
        if self.max_sessions < 1:
            raise ConfigError("[whip] max_sessions must be at least 1")
        if not 100_000 <= self.transcode_bitrate <= 50_000_000:
            raise ConfigError("[whip] transcode_bitrate must be between 100000 and 50000000 b/s")


class WhipBusy(Refused):
    """Too many sessions already (503)."""

    def __init__(self, reason: str) -> None:
        super().__init__(503, reason)


class _FrameTap(queue.Queue):  # type: ignore[type-arg]
    """Stands in for ``RTCRtpReceiver``'s decoder queue (see the module docstring)."""

    def __init__(self, sink: Callable[[str, bytes, int], None]) -> None:
        super().__init__()
        self._sink = sink

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        if item is None:  # aiortc stopping the receiver: let its decoder thread end
            super().put(item, block, timeout)
            return
        codec, frame = item
        self._sink(codec.name, frame.data, frame.timestamp)


_DECODER_QUEUE = "_RTCRtpReceiver__decoder_queue"


def _tap(receiver: RTCRtpReceiver, sink: Callable[[str, bytes, int], None]) -> None:
    if not isinstance(getattr(receiver, _DECODER_QUEUE, None), queue.Queue) or not hasattr(
            receiver, "_send_rtcp_pli"):
        raise RuntimeError("this aiortc version has no RTCRtpReceiver decoder queue or PLI sender "
                           "to take encoded frames from (see ingest/whip.py)")
    setattr(receiver, _DECODER_QUEUE, _FrameTap(sink))


def _codec_preferences(kind: str, video_codec: str | None) -> list[Any]:
    """Only what we asked for (H.264 when offered, else VP8; Opus), with RTX for video."""
    capabilities = RTCRtpReceiver.getCapabilities(kind).codecs
    if kind == "audio":
        return [c for c in capabilities if c.mimeType.lower() == "audio/opus"]
    wanted = "video/h264" if video_codec == "h264" else "video/vp8"
    return ([c for c in capabilities if c.mimeType.lower() == wanted]
            + [c for c in capabilities if c.mimeType.lower() == "video/rtx"])


class WhipIngest:
    def __init__(self, hub: Hub, settings: WhipSettings | None = None, *,
                 ice_servers: list[RTCIceServer] | None = None,
                 rewrite_answer: Callable[[str], str] | None = None) -> None:
        self.hub = hub
        self.settings = settings or WhipSettings()
        # an empty list, not None: aiortc would otherwise add a public STUN server of its own
        self.ice_servers = list(ice_servers or [])
        #: applied to every SDP answer (e.g. a public address's candidates behind 1:1 NAT)
        self.rewrite_answer = rewrite_answer
        self.sessions: dict[str, WhipSession] = {}

    def rtc_configuration(self) -> RTCConfiguration:
        return RTCConfiguration(iceServers=list(self.ice_servers))

    async def publish(self, channel: str, offer: str) -> WhipSession:
        """A negotiated session for this offer; OfferError (400) or WhipBusy (503) otherwise."""
        try:
            summary = check_offer(offer)
        except OfferError:
            REJECTED.labels("bad_offer").inc()
            raise
        if len(self.sessions) >= self.settings.max_sessions:
            REJECTED.labels("too_many_sessions").inc()
            raise WhipBusy(f"{self.settings.max_sessions} WHIP sessions are open already")
        # An encoder that reconnects before its first attempt went live: only the newest counts.
        for other in list(self.sessions.values()):
            if other.channel == channel and other.stream is None:
                await other.close("superseded by a newer publish")
        session = WhipSession(self, channel, summary)
        self.sessions[session.id] = session
        SESSIONS.inc()
        try:
            await session.negotiate(offer)
        except Exception as exc:
            await session.close("negotiation failed")
            REJECTED.labels("negotiation").inc()
            if isinstance(exc, OfferError):
                raise
            log.warning("whip %s: negotiation failed: %s: %s", channel, type(exc).__name__, exc)
            raise OfferError(400, f"the offer could not be negotiated: {exc}") from None
        return session

    def get(self, session_id: str) -> WhipSession | None:
        return self.sessions.get(session_id)

    async def close(self) -> None:
        await asyncio.gather(*(s.close("server shutting down") for s in list(self.sessions.values())),
                             return_exceptions=True)


class WhipSession:
    def __init__(self, ingest: WhipIngest, channel: str, summary: OfferSummary) -> None:
        self.ingest = ingest
        self.hub = ingest.hub
        self.settings = ingest.settings
        self.channel = channel
        self.summary = summary
        self.id = secrets.token_urlsafe(18)
        self.loop = asyncio.get_running_loop()
        self.created = time.monotonic()
        self.answer = ""
        self.pc = RTCPeerConnection(ingest.rtc_configuration())
        self.assembler = PublicationAssembler(
            video=summary.video is not None, audio=summary.audio,
            start_timeout=self.settings.start_timeout,
            keyframe_interval=self.settings.keyframe_interval, created=self.loop.time())
        self.stream: Stream | None = None
        self.closed = False
        self.end_reason = ""
        self.connected = False
        self._last_media = self.loop.time()
        self._went_live = False
        self._receivers: dict[str, RTCRtpReceiver] = {}
        self._transcoder: Vp8Transcoder | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._pli_tasks: set[asyncio.Task[None]] = set()

    # -- negotiation ----------------------------------------------------------------------------
    async def negotiate(self, offer: str) -> str:
        began = time.perf_counter()
        pc = self.pc
        for kind, wanted in (("video", self.summary.video is not None), ("audio", self.summary.audio)):
            if not wanted:
                continue
            # Made before the offer is applied, so setRemoteDescription uses these transceivers
            # (with our codec preferences and tapped receivers) for the offer's sections.
            transceiver: RTCRtpTransceiver = pc.addTransceiver(kind, direction="recvonly")
            transceiver.setCodecPreferences(_codec_preferences(kind, self.summary.video))
            _tap(transceiver.receiver, self._frame)
            self._receivers[kind] = transceiver.receiver
        pc.on("connectionstatechange", self._connection_state)
        await pc.setRemoteDescription(RTCSessionDescription(sdp=offer, type="offer"))
        await pc.setLocalDescription(await pc.createAnswer())
        answer = pc.localDescription.sdp
        rewrite = self.ingest.rewrite_answer
        self.answer = rewrite(answer) if rewrite is not None else answer
        ANSWER_SECONDS.observe(time.perf_counter() - began)
        if self.summary.video == "vp8":
            self._transcoder = Vp8Transcoder(self._transcoded, self._transcoder_wants_keyframe,
                                             keyframe_seconds=self.settings.keyframe_interval,
                                             bitrate=self.settings.transcode_bitrate,
                                             name=f"whip-vp8-{self.channel}")
        self._ticker = self.loop.create_task(self._tick())
        log.info("whip %s: session %s negotiated (video=%s audio=%s)", self.channel, self.id[:8],
                 self.summary.video, "opus" if self.summary.audio else None)
        return self.answer

    def _connection_state(self) -> None:
        state = self.pc.connectionState
        if state == "connected":
            self.connected = True
            self._last_media = self.loop.time()
        elif state in ("failed", "closed") and not self.closed:
            self.loop.create_task(self.close("connection " + state))

    # -- media (on the event loop) --------------------------------------------------------------
    def _frame(self, codec: str, data: bytes, timestamp: int) -> None:
        """One encoded frame from a receiver (called by aiortc's RTP handler, on the loop)."""
        if self.closed:
            return
        now = self.loop.time()
        self._last_media = now
        kind = "audio" if codec == "opus" else "video"
        FRAMES_IN.labels(kind).inc()
        BYTES_IN.labels(kind).inc(len(data))
        try:
            if codec == "H264":
                self._act(self.assembler.video_h264(data, timestamp, now))
            elif codec == "VP8":
                if self._transcoder is not None:
                    self._transcoder.submit(data, timestamp)
            elif codec == "opus":
                self._act(self.assembler.audio_opus(data, timestamp, now))
        except Exception as exc:
            self._internal_error(exc)

    def _transcoded(self, annexb: bytes, timestamp: int) -> None:
        """From the VP8 transcoder's thread: hop onto the loop."""
        TRANSCODED.inc()
        self.loop.call_soon_threadsafe(self._transcoded_on_loop, annexb, timestamp)

    def _transcoded_on_loop(self, annexb: bytes, timestamp: int) -> None:
        if self.closed:
            return
        try:
            self._act(self.assembler.video_h264(annexb, timestamp, self.loop.time()))
        except Exception as exc:
            self._internal_error(exc)

    def _internal_error(self, exc: Exception) -> None:
        """A bug of ours tripped over this peer's media: one log line and the session ends,
        rather than a traceback per packet inside aiortc's RTP handling."""
        log.error("whip %s: internal error handling its media: %s: %s", self.channel,
                  type(exc).__name__, str(exc)[:200], exc_info=exc)
        self.loop.create_task(self.close("internal error"))

    def _transcoder_wants_keyframe(self) -> None:
        self.loop.call_soon_threadsafe(self._request_keyframe)

    def _act(self, actions: list[Start | Packet]) -> None:
        for action in actions:
            if type(action) is Packet:
                stream = self.stream
                if stream is not None:
                    stream.push(action)
            elif isinstance(action, Start):
                self._start(action)

    def _start(self, start: Start) -> None:
        old = self.stream
        if old is not None:
            log.info("whip %s: %s; restarting the publication", self.channel, start.restart)
            self.stream = None
            self.hub.stop(old, start.restart or "restarted")
        self.stream = self.hub.start(self.channel, start.info, source="whip",
                                     on_replaced=self._replaced)
        if not self._went_live:
            self._went_live = True
            PUBLISHING.inc()
            SETUP_SECONDS.observe(time.monotonic() - self.created)
        log.info("whip %s: live (video=%s audio=%s)", self.channel,
                 start.info.video and start.info.video.codec, start.info.audio and start.info.audio.codec)

    def _replaced(self) -> None:
        """A newer publication of the channel (RTMP or WHIP) took over: this one is done."""
        log.info("whip %s: taken over by a new publish; closing session %s", self.channel, self.id[:8])
        self.stream = None
        self.loop.create_task(self.close("replaced"))

    # -- keyframes and timers -------------------------------------------------------------------
    def _request_keyframe(self) -> None:
        receiver = self._receivers.get("video")
        if receiver is None or self.closed or not self.connected:
            return
        self.assembler.keyframe_requested(self.loop.time())
        for source in receiver.getSynchronizationSources():
            KEYFRAME_REQUESTS.inc()
            task = self.loop.create_task(receiver._send_rtcp_pli(source.source))
            self._pli_tasks.add(task)
            task.add_done_callback(self._pli_tasks.discard)

    async def _tick(self) -> None:
        settings = self.settings
        while not self.closed:
            await asyncio.sleep(TICK_SECONDS)
            now = self.loop.time()
            if not self.connected:
                if now - self.assembler.created > settings.connect_timeout:
                    await self.close("never connected")
                    return
                continue
            if now - self._last_media > settings.media_timeout:
                await self.close("no media")
                return
            # Once running, the VP8 transcoder makes its own keyframes (and asks for VP8 ones
            # itself after a loss); until then, and for H.264 always, ask the sender.
            wants_keyframes = self._transcoder is None or self.stream is None
            if wants_keyframes and self.assembler.keyframe_due(now):
                self._request_keyframe()
            self._act(self.assembler.tick(now))

    # -- the end --------------------------------------------------------------------------------
    async def close(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        self.end_reason = reason
        if self.ingest.sessions.pop(self.id, None) is not None:
            SESSIONS.dec()
        ENDED.labels(reason.split(" ", 1)[0]).inc()
        if self._ticker is not None and self._ticker is not asyncio.current_task():
            self._ticker.cancel()
        stream = self.stream
        self.stream = None
        if stream is not None:
            self.hub.stop(stream, "unpublished" if reason == "deleted" else reason)
        if self._went_live:
            PUBLISHING.dec()
        if self._transcoder is not None:
            self._transcoder.close()
        log.info("whip %s: session %s ended (%s)", self.channel, self.id[:8], reason)
        try:
            await self.pc.close()
        except Exception:  # a half-set-up connection can fail to close; nothing more to free
            log.debug("whip %s: closing the peer connection failed", self.channel, exc_info=True)
