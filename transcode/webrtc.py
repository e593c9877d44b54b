"""WHEP egress: live streams to browsers over WebRTC (aiortc), one peer connection per viewer.

    hub Stream --subscription per viewer--> VideoTrack --(packetized once per stream)--> RTCRtpSender
    hub Stream --one subscription--> AudioSource (AAC->Opus once) --tap per viewer--> AudioTrack

What a viewer costs: its own hub subscription and audio tap, and per packet an RTP header
(a copy of one serialized per frame: ``webrtc_sender``), SRTP encryption and the socket.
Packetization (``webrtc_media.VideoPacketizer``) and the Opus encode happen once per stream:
the tracks hand the senders frames that already are RTP payloads.

Sessions end on ``DELETE`` (``close_session``), when their stream ends, when ICE or DTLS fails
or closes (which covers a peer that vanished: aioice stops when consent checks go unanswered),
and when they never connect within ``session_timeout`` seconds.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from aiortc import (
    RTCConfiguration,
    RTCIceServer,
    RTCPeerConnection,
    RTCRtpSender,
    RTCSessionDescription,
)
from aiortc.codecs import CODECS
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from aiortc.rtcrtpparameters import RTCRtcpFeedback, RTCRtpCodecCapability, RTCRtpCodecParameters
from aiortc.rtp import RTCP_PSFB_FIR, RTCP_PSFB_PLI, RtcpPsfbPacket
from prometheus_client import Counter, Gauge, Histogram

from livesrv.config import ConfigError
from livesrv.hub import Hub, Stream, Subscription
from livesrv.webrtc_offers import OfferError, Refused

from . import webrtc_sender
from .webrtc_media import (
    VIDEO_CLOCK,
    AudioSource,
    AudioTap,
    EncodedFrame,
    Unplayable,
    VideoPacketizer,
    choose_video,
)
from .webrtc_sdp import (
    add_public_candidates,
    choose_h264,
    h264_capability_parameters,
    parse_offer,
)

log = logging.getLogger(__name__)

SESSIONS = Gauge("livesrv_webrtc_sessions", "WHEP sessions open")
BYTES_OUT = Counter("livesrv_webrtc_bytes_out_total", "RTP payload bytes sent to WHEP viewers", ["kind"])
_VIDEO_BYTES_OUT = BYTES_OUT.labels("video")  # bound once: these count every frame of every viewer
_AUDIO_BYTES_OUT = BYTES_OUT.labels("audio")
KEYFRAME_REQUESTS = Counter("livesrv_webrtc_keyframe_requests_total",
                            "Keyframe requests (RTCP PLI/FIR) received from WHEP viewers", ["type"])
SETUP_SECONDS = Histogram("livesrv_webrtc_session_setup_seconds",
                          "From the WHEP POST to a connected peer (ICE + DTLS)",
                          buckets=(0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10))
SESSIONS_ENDED = Counter("livesrv_webrtc_sessions_ended_total", "WHEP sessions ended", ["reason"])
REFUSED = Counter("livesrv_webrtc_offers_refused_total", "WHEP offers answered with an error", ["status"])


@dataclass(frozen=True)
class WebRtcSettings:
    """The ``[webrtc]`` table of the config file."""

    #: the address viewers reach this server by when it sits behind 1:1 NAT ("" = none): added
    #: to the answer as a copy of each host candidate
    public_ip: str = ""
    #: STUN servers ("stun:host:port"); none by default: host candidates only
    stun_servers: list[str] = field(default_factory=list)
    #: TURN servers ("turn:host:port?transport=udp"), with their credentials
    turn_servers: list[str] = field(default_factory=list)
    turn_username: str = ""
    turn_password: str = ""
    #: WHEP sessions this server holds at once; past it a POST is answered 503
    max_sessions: int = 500
    #: a session that has not connected (ICE + DTLS) this long after its POST is closed
    session_timeout: float = 30.0

    def __post_init__(self) -> None:
        if self.max_sessions < 1:
            raise ConfigError("[webrtc] max_sessions must be at least 1")
        if not 1 <= self.session_timeout <= 600:
            raise ConfigError("[webrtc] session_timeout must be between 1 and 600 seconds")
        for url in self.stun_servers:
            if not url.startswith("stun:"):
                raise ConfigError(f"[webrtc] stun_servers: {url!r} is not a stun: URL")
        for url in self.turn_servers:
            if not url.startswith(("turn:", "turns:")):
                raise ConfigError(f"[webrtc] turn_servers: {url!r} is not a turn: URL")

    def ice_servers(self) -> list[RTCIceServer]:
        servers = [RTCIceServer(urls=url) for url in self.stun_servers]
        servers += [RTCIceServer(urls=url, username=self.turn_username or None,
                                 credential=self.turn_password or None) for url in self.turn_servers]
        return servers  # an empty list (not None): aiortc would add Google's STUN server


# -- aiortc glue ---------------------------------------------------------------------------------
def _count_keyframe_requests(sender: RTCRtpSender) -> None:
    """Count PLI/FIR from the viewer. The source's keyframes come at the publisher's pace (we
    do not encode), so there is nothing to force; NACKs (retransmission) are aiortc's."""
    handle = sender._handle_rtcp_packet

    async def counting(packet: Any) -> None:
        if isinstance(packet, RtcpPsfbPacket) and packet.fmt in (RTCP_PSFB_PLI, RTCP_PSFB_FIR):
            KEYFRAME_REQUESTS.labels("pli" if packet.fmt == RTCP_PSFB_PLI else "fir").inc()
        await handle(packet)

    sender._handle_rtcp_packet = counting  # type: ignore[method-assign]


_registered: set[str] = set()


def h264_capability(profile: str) -> RTCRtpCodecCapability:
    """aiortc's codec capability for sending H.264 of ``profile``, registered on first use.

    aiortc matches offered H.264 formats against its table by profile and packetization mode;
    its table lists the baselines only, so the profiles we pass through are added to it."""
    parameters = h264_capability_parameters(profile)
    if profile not in _registered:
        if not any(c.mimeType == "video/H264" and c.parameters == parameters for c in CODECS["video"]):
            # payload types are shared by audio and video under BUNDLE (in offers aiortc makes)
            used = {c.payloadType for kind in CODECS.values() for c in kind}
            pt = next(p for p in range(96, 128) if p not in used and p + 1 not in used)
            CODECS["video"] += [
                RTCRtpCodecParameters(mimeType="video/H264", clockRate=90000, payloadType=pt,
                                      rtcpFeedback=[RTCRtcpFeedback(type="nack"),
                                                    RTCRtcpFeedback(type="nack", parameter="pli"),
                                                    RTCRtcpFeedback(type="goog-remb")],
                                      parameters=dict(parameters)),
                RTCRtpCodecParameters(mimeType="video/rtx", clockRate=90000, payloadType=pt + 1,
                                      parameters={"apt": pt}),
            ]
        _registered.add(profile)
    return RTCRtpCodecCapability(mimeType="video/H264", clockRate=90000, parameters=dict(parameters))


RTX_CAPABILITY = RTCRtpCodecCapability(mimeType="video/rtx", clockRate=90000)


class VideoTrack(MediaStreamTrack):
    """One viewer's video: its hub subscription, packetized once per stream.

    A viewer starts at the cached keyframe. Those cached frames (and whatever arrived while
    ICE and DTLS were set up) are already late when sending starts; sent with their own
    timestamps they would make the browser's jitter buffer hold everything after them that
    much longer, so they are stamped 1 ms apart (the browser decodes through them at once)
    and every later frame keeps that offset."""

    kind = "video"

    def __init__(self, subscription: Subscription, packetizer: VideoPacketizer) -> None:
        super().__init__()
        self.subscription = subscription
        self.packetizer = packetizer
        self._backlog: int | None = None  # packets already queued when sending starts
        self._shift = 0
        self._shift_ticks = 0
        self._last_pts: int | None = None
        self.frames = 0
        self.bytes = 0

    async def recv(self) -> EncodedFrame:  # type: ignore[override]
        while True:
            if self._backlog is None:
                self._backlog = len(self.subscription)
            packet = await self.subscription.get()
            if packet is None:
                self.stop()
                raise MediaStreamError
            backlog = self._backlog > 0
            if backlog:
                self._backlog -= 1
            if packet.kind != "video":
                continue
            frame = self.packetizer.frame(packet)
            if frame is None:
                continue
            if backlog and self._last_pts is not None and packet.pts - self._last_pts > 1:
                self._shift += packet.pts - self._last_pts - 1
                # in RTP ticks, computed when it changes (Fraction arithmetic: not per frame)
                self._shift_ticks = round(self._shift * self.packetizer.time_base * VIDEO_CLOCK)
            self._last_pts = packet.pts
            timestamp = frame.timestamp - self._shift_ticks
            self.frames += 1
            self.bytes += frame.size
            _VIDEO_BYTES_OUT.inc(frame.size)
            return EncodedFrame(frame.payloads, timestamp, frame.size)

    def stop(self) -> None:
        self.subscription.close()
        super().stop()


class AudioTrack(MediaStreamTrack):
    """One viewer's audio: Opus frames from the stream's shared ``AudioSource``."""

    kind = "audio"

    def __init__(self, source: AudioSource, tap: AudioTap) -> None:
        super().__init__()
        self.source = source
        self.tap = tap
        self.frames = 0

    async def recv(self) -> EncodedFrame:  # type: ignore[override]
        frame = await self.tap.get()
        if frame is None:
            self.stop()
            raise MediaStreamError
        self.frames += 1
        _AUDIO_BYTES_OUT.inc(frame.size)
        return frame

    def stop(self) -> None:
        self.source.untap(self.tap)
        super().stop()


# -- sessions ------------------------------------------------------------------------------------
@dataclass(eq=False)
class Session:
    id: str
    channel: str
    stream: Stream
    pc: RTCPeerConnection
    video: VideoTrack
    audio: AudioTrack | None
    rendition: str
    profile: str
    created: float = field(default_factory=time.monotonic)
    connected_at: float | None = None
    closed: bool = False

    def describe(self) -> dict[str, Any]:
        return {"id": self.id, "channel": self.channel, "rendition": self.rendition,
                "profile": self.profile, "state": self.pc.connectionState,
                "video_frames": self.video.frames, "video_bytes": self.video.bytes,
                "audio_frames": self.audio.frames if self.audio is not None else 0}


@dataclass(frozen=True, slots=True)
class Answer:
    session: Session
    sdp: str


class WhepService:
    """Every WHEP session of this server."""

    def __init__(self, hub: Hub, settings: WebRtcSettings) -> None:
        self.hub = hub
        self.settings = settings
        self.sessions: dict[str, Session] = {}
        self._packetizers: dict[int, tuple[Stream, VideoPacketizer]] = {}
        self._audio: dict[int, AudioSource] = {}
        self._reaper: asyncio.Task[None] | None = None
        self._closing: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        self.hub.add_listener(on_end=self._on_stream_end)
        self._reaper = asyncio.get_running_loop().create_task(self._reap(), name="whep reaper")

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
        await asyncio.gather(*(self.close_session(s.id, "shutdown") for s in list(self.sessions.values())),
                             return_exceptions=True)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    # -- offers -----------------------------------------------------------------------------
    async def offer(self, channel: str, sdp: str) -> Answer:
        """Answer a viewer's offer; raises ``Refused`` (``OfferError``, ``Unplayable``) with the
        HTTP status and the reason."""
        started = time.monotonic()
        try:
            return await self._offer(channel, sdp, started)
        except Refused as exc:
            REFUSED.labels(str(exc.status)).inc()
            raise

    async def _offer(self, channel: str, sdp: str, started: float) -> Answer:
        stream = self.hub.get(channel)
        if stream is None:
            raise Unplayable(404, "channel is not live")
        offer = parse_offer(sdp)
        if len(self.sessions) >= self.settings.max_sessions:
            raise Unplayable(503, "this server holds as many WebRTC viewers as it may; watch over HLS")
        video_stream, why = choose_video(stream)
        packetizer = self._packetizer(video_stream)
        profile = choose_h264(offer, packetizer.profile_level_id)
        capability = h264_capability(profile)

        pc = RTCPeerConnection(RTCConfiguration(iceServers=self.settings.ice_servers()))
        subscription = video_stream.subscribe("whep")
        video = VideoTrack(subscription, packetizer)
        audio: AudioTrack | None = None
        try:
            transceiver = pc.addTransceiver(video, direction="sendonly")
            transceiver.setCodecPreferences([capability, RTX_CAPABILITY])
            webrtc_sender.install(transceiver.sender)
            _count_keyframe_requests(transceiver.sender)
            source = self._audio_source(stream) if offer.has_opus else None
            if source is not None:
                audio = AudioTrack(source, source.tap())
                audio_transceiver = pc.addTransceiver(audio, direction="sendonly")
                webrtc_sender.install(audio_transceiver.sender)
            await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
            await pc.setLocalDescription(await pc.createAnswer())
        except Refused:
            await self._discard(pc, video, audio)
            raise
        except Exception as exc:  # aiortc's refusal of an offer it cannot use
            await self._discard(pc, video, audio)
            raise OfferError(400, f"cannot answer this offer: {exc}") from None
        answer = pc.localDescription.sdp
        if self.settings.public_ip:
            answer = add_public_candidates(answer, self.settings.public_ip)
        session = Session(secrets.token_urlsafe(16), channel, stream, pc, video, audio,
                          video_stream.rendition, profile, created=started)
        self.sessions[session.id] = session
        SESSIONS.set(len(self.sessions))

        @pc.on("connectionstatechange")
        def on_state() -> None:
            state = pc.connectionState
            if state == "connected" and session.connected_at is None:
                session.connected_at = time.monotonic()
                SETUP_SECONDS.observe(session.connected_at - session.created)
            elif state in ("failed", "closed"):
                self._close_later(session.id, f"connection {state}")

        log.info("WHEP session %s: %s (%s, %s; %s)", session.id, channel, video_stream.rendition,
                 profile, why)
        return Answer(session, answer)

    async def _discard(self, pc: RTCPeerConnection, video: VideoTrack, audio: AudioTrack | None) -> None:
        video.stop()
        if audio is not None:
            audio.stop()
        await pc.close()

    def _packetizer(self, stream: Stream) -> VideoPacketizer:
        key = id(stream)
        entry = self._packetizers.get(key)
        if entry is None or entry[0] is not stream:
            if stream.info.video is None:
                raise Unplayable(415, "the stream has no video")
            entry = (stream, VideoPacketizer(stream.info.video))
            self._packetizers[key] = entry
        return entry[1]

    def _audio_source(self, stream: Stream) -> AudioSource | None:
        source = self._audio.get(id(stream))
        if source is not None and source.stream is stream:
            return source
        if stream.info.audio is None or stream.info.audio.codec not in ("aac", "opus"):
            return None
        source = AudioSource(stream, self._audio_idle)
        self._audio[id(stream)] = source
        return source

    def _audio_idle(self, source: AudioSource) -> None:
        if self._audio.get(id(source.stream)) is source:
            del self._audio[id(source.stream)]

    # -- ending sessions --------------------------------------------------------------------
    def session(self, session_id: str) -> Session | None:
        return self.sessions.get(session_id)

    async def close_session(self, session_id: str, reason: str = "deleted") -> bool:
        session = self.sessions.pop(session_id, None)
        if session is None:
            return False
        session.closed = True
        SESSIONS.set(len(self.sessions))
        SESSIONS_ENDED.labels(reason.split(" ")[0]).inc()
        log.info("WHEP session %s of %s ended: %s", session.id, session.channel, reason)
        session.video.stop()
        if session.audio is not None:
            session.audio.stop()
        await session.pc.close()
        return True

    def _close_later(self, session_id: str, reason: str) -> None:
        if session_id not in self.sessions:
            return
        task = asyncio.get_running_loop().create_task(self.close_session(session_id, reason))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def _on_stream_end(self, stream: Stream) -> None:
        for session in list(self.sessions.values()):
            if session.stream is stream:
                self._close_later(session.id, "stream ended")
        for key, (packetized, _) in list(self._packetizers.items()):
            if packetized is stream or packetized.ended:
                del self._packetizers[key]

    async def _reap(self) -> None:
        """Close what will never connect, and what failed without telling (belt and braces:
        aiortc reports most failures through connectionstatechange)."""
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for session in list(self.sessions.values()):
                state = session.pc.connectionState
                if state in ("failed", "closed"):
                    self._close_later(session.id, f"connection {state}")
                elif session.connected_at is None and now - session.created > self.settings.session_timeout:
                    self._close_later(session.id, "timeout (never connected)")
                elif session.stream.ended or session.video.subscription.stream.ended:
                    # the publication ended, or the ladder dropped the rung this viewer had
                    self._close_later(session.id, "stream ended")
