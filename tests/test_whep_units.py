"""WHEP's pure parts: H.264 RTP packetization (checked against aiortc's depacketizer), the
profile chosen from an offer, offer validation, public-address candidates."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest
from aioice.ice import StunProtocol
from aiortc import RTCConfiguration, RTCPeerConnection, RTCRtpSender
from aiortc.codecs.h264 import h264_depayload
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from aiortc.rtcdtlstransport import State
from aiortc.rtcrtpparameters import (
    RTCRtcpParameters,
    RTCRtpCodecParameters,
    RTCRtpHeaderExtensionParameters,
    RTCRtpSendParameters,
)
from aiortc.rtp import HeaderExtensionsMap, RtpPacket
from pylibsrtp import Policy, Session

from livesrv.annexb import START_CODE
from livesrv.webrtc_offers import OfferError
from transcode import webrtc_sender
from transcode.webrtc import h264_capability
from transcode.webrtc_media import EncodedFrame
from transcode.webrtc_rtp import (
    NAL_FU_A,
    NAL_STAP_A,
    access_unit_nals,
    packetize,
    parse_profile_level_id,
    profile_name,
)
from transcode.webrtc_sdp import add_public_candidates, choose_h264, parse_offer

SPS = bytes((0x67, 0x64, 0x00, 0x1F)) + bytes(range(1, 12))
PPS = bytes((0x68, 0xEE, 0x3C, 0x80))


def avcc(*nals: bytes) -> bytes:
    return b"".join(len(n).to_bytes(4, "big") + n for n in nals)


def depacketize(payloads: list[bytes]) -> bytes:
    return b"".join(h264_depayload(p) for p in payloads)


def test_keyframes_get_parameter_sets_and_lose_delimiters() -> None:
    idr = bytes((0x65,)) + bytes(3000)
    aud = bytes((0x09, 0xF0))
    stale_sps = bytes((0x67, 0x42, 0, 0x1E))
    nals = access_unit_nals(avcc(aud, stale_sps, idr), True, [SPS, PPS])
    assert nals == [SPS, PPS, idr]
    p_frame = bytes((0x41,)) + bytes(500)
    assert access_unit_nals(avcc(aud, p_frame), False, [SPS, PPS]) == [p_frame]


@pytest.mark.parametrize("size", [1, 100, 1199, 1200, 1201, 5000, 20000])
def test_packetize_round_trips_through_aiortc(size: int) -> None:
    big = bytes((0x65,)) + bytes((i * 7) & 0xFF for i in range(size))
    nals = [SPS, PPS, big]
    payloads = packetize(nals, max_payload=1200)
    assert all(len(p) <= 1200 for p in payloads)
    assert depacketize(payloads) == b"".join(START_CODE + n for n in nals)
    assert payloads[0][0] & 0x1F == NAL_STAP_A  # SPS+PPS travel as one aggregation packet
    if len(big) > 1200:
        assert {p[0] & 0x1F for p in payloads[1:]} == {NAL_FU_A}


def test_profiles() -> None:
    assert profile_name(0x42, 0xC0) == "constrained-baseline"
    assert profile_name(0x42, 0x00) == "baseline"
    assert profile_name(0x4D, 0x40) == "main"
    assert profile_name(0x64, 0x00) == "high"
    assert profile_name(0x64, 0x0C) == "constrained-high"
    assert parse_profile_level_id("640c1f") == ("constrained-high", 31)
    assert profile_name(0x7A, 0) is None  # High 4:2:2: no browser decodes it


def _offer_sdp(profiles: tuple[str, ...], *, audio: bool = True) -> str:
    async def make() -> str:
        for profile in profiles:
            h264_capability(profile)
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        pc.addTransceiver("video", direction="recvonly")
        if audio:
            pc.addTransceiver("audio", direction="recvonly")
        await pc.setLocalDescription(await pc.createOffer())  # with its host candidates
        sdp = pc.localDescription.sdp
        await pc.close()
        return sdp

    return asyncio.run(make())


def _with_only(sdp: str, keep: set[str]) -> str:
    """The offer with H.264 formats of other profile-level-ids removed from the video m-line."""
    lines = sdp.splitlines()
    drop = set()
    for line in lines:
        if line.startswith("a=fmtp:") and "profile-level-id=" in line:
            pt, _, params = line[7:].partition(" ")
            if params.split("profile-level-id=")[1][:6] not in keep:
                drop.add(pt)
    out = []
    for line in lines:
        if line.startswith("m=video"):
            parts = line.split(" ")
            line = " ".join(parts[:3] + [p for p in parts[3:] if p not in drop])
        elif any(line.startswith(f"a={kind}:{pt} ") for pt in drop for kind in ("rtpmap", "fmtp", "rtcp-fb")):
            continue
        out.append(line)
    return "\r\n".join(out) + "\r\n"


def test_choose_h264_takes_the_narrowest_offered_decoder_of_the_streams_profile() -> None:
    sdp = _offer_sdp(("main", "high"))
    offer = parse_offer(sdp)
    assert choose_h264(offer, "42c01f") == "constrained-baseline"
    assert choose_h264(offer, "4d401f") == "main"
    assert choose_h264(offer, "640028") == "high"
    only_baselines = parse_offer(_with_only(sdp, {"42001f", "42e01f"}))
    assert choose_h264(only_baselines, "42c01f") == "constrained-baseline"
    with pytest.raises(OfferError) as refused:
        choose_h264(only_baselines, "640028")
    assert refused.value.status == 415 and "high" in refused.value.reason


@pytest.mark.parametrize(("text", "status", "words"), [
    ("", 400, "empty"),
    ("hello", 400, "malformed"),
    ("v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n", 400, "no media"),
])
def test_bad_offers(text: str, status: int, words: str) -> None:
    with pytest.raises(OfferError) as error:
        parse_offer(text)
    assert error.value.status == status and words in error.value.reason


def test_offer_without_ice_credentials_is_malformed() -> None:
    sdp = "\r\n".join(line for line in _offer_sdp(()).splitlines() if not line.startswith("a=ice-pwd"))
    with pytest.raises(OfferError, match="ice-ufrag/ice-pwd"):
        parse_offer(sdp + "\r\n")


def test_public_candidates_copy_host_candidates() -> None:
    sdp = _offer_sdp(())
    assert "a=candidate:" in sdp
    edited = add_public_candidates(sdp, "203.0.113.7")
    assert " 203.0.113.7 " in edited
    assert edited.count("a=candidate:") > sdp.count("a=candidate:")


# -- the lean RTP send loop (transcode/webrtc_sender.py) on a real aiortc RTCRtpSender ------------
_SRTP_KEY = bytes(range(30))  # 16 bytes of key, 14 of salt (AES128_CM_SHA1_80)


class _RecordingDtls(asyncio.DatagramProtocol):
    """Stands in for a connected DTLS transport under an RTCRtpSender, with the state of aiortc's
    that the lean loop uses: an SRTP session, and a nominated ICE pair whose protocol is
    aioice's own on a real UDP socket. What arrives on the other end, decrypted, is in
    ``sent``, and so is what aiortc's own path (``_send_rtp``: retransmissions) is given."""

    state = "connected"
    _state = State.CONNECTED
    _stats_id = "transport_test"

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self._tx_srtp = Session(Policy(key=_SRTP_KEY, ssrc_type=Policy.SSRC_ANY_OUTBOUND))
        self._rx_srtp = Session(Policy(key=_SRTP_KEY, ssrc_type=Policy.SSRC_ANY_INBOUND))
        self._RTCDtlsTransport__tx_bytes = 0
        self._RTCDtlsTransport__tx_packets = 0
        self.transport: Any = None

    @classmethod
    async def open(cls) -> _RecordingDtls:
        loop = asyncio.get_running_loop()
        dtls = cls()
        receiving, _ = await loop.create_datagram_endpoint(lambda: dtls, local_addr=("127.0.0.1", 0))
        _, protocol = await loop.create_datagram_endpoint(lambda: StunProtocol(None),  # type: ignore[arg-type]
                                                          local_addr=("127.0.0.1", 0))
        pair = SimpleNamespace(protocol=protocol, remote_addr=receiving.get_extra_info("sockname"))
        dtls.transport = SimpleNamespace(_connection=SimpleNamespace(_nominated={1: pair}),
                                         closers=(receiving, protocol.transport))
        return dtls

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.sent.append(self._rx_srtp.unprotect(data))

    def close(self) -> None:
        for transport in self.transport.closers:
            transport.close()

    def _register_rtp_sender(self, sender: object, parameters: object) -> None:
        pass

    def _unregister_rtp_sender(self, sender: object) -> None:
        pass

    def _get_stats(self) -> dict[str, object]:
        return {}

    async def _send_rtp(self, data: bytes) -> None:
        self.sent.append(data)


class _FrameList(MediaStreamTrack):
    """A track whose frames are given: then the end of the stream."""

    kind = "video"

    def __init__(self, frames: list[EncodedFrame]) -> None:
        super().__init__()
        self.frames = list(frames)
        self.stopped = False

    async def recv(self) -> EncodedFrame:  # type: ignore[override]
        await asyncio.sleep(0)
        if not self.frames:
            raise MediaStreamError
        return self.frames.pop(0)

    def stop(self) -> None:
        self.stopped = True
        super().stop()


async def test_lean_sender_sends_aiortc_packets_and_answers_nacks() -> None:
    frames = [EncodedFrame([b"a" * 1000, b"b" * 1000, b"c" * 10], 0, 2010),
              EncodedFrame([b"d" * 500], 3000, 500),
              EncodedFrame([b"e" * 700, b"f" * 20], 6000, 720)]
    track = _FrameList(frames)
    dtls = await _RecordingDtls.open()
    sender = RTCRtpSender("video", dtls)  # type: ignore[arg-type]
    sender.replaceTrack(track)
    webrtc_sender.install(sender)
    extensions = [RTCRtpHeaderExtensionParameters(id=4, uri="urn:ietf:params:rtp-hdrext:sdes:mid"),
                  RTCRtpHeaderExtensionParameters(
                      id=9, uri="http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time")]
    await sender.send(RTCRtpSendParameters(
        codecs=[RTCRtpCodecParameters(mimeType="video/H264", clockRate=90000, payloadType=102),
                RTCRtpCodecParameters(mimeType="video/rtx", clockRate=90000, payloadType=103,
                                      parameters={"apt": 102})],
        headerExtensions=extensions, muxId="v0", rtcp=RTCRtcpParameters(cname="test", mux=True)))
    async with asyncio.timeout(5):
        while not track.stopped or len(dtls.sent) < 6:  # noqa: ASYNC110 - sent over UDP
            await asyncio.sleep(0.01)
    extension_map = HeaderExtensionsMap()
    extension_map.configure(RTCRtpSendParameters(headerExtensions=extensions))
    packets = [RtpPacket.parse(data, extension_map) for data in dtls.sent]

    assert [p.payload for p in packets] == [payload for f in frames for payload in f.payloads]
    assert [p.marker for p in packets] == [0, 0, 1, 1, 0, 1]  # the last packet of each frame
    first = packets[0]
    assert [(p.sequence_number - first.sequence_number) & 0xFFFF for p in packets] == list(range(6))
    assert [(p.timestamp - first.timestamp) & 0xFFFFFFFF for p in packets] == [0, 0, 0, 3000, 6000, 6000]
    assert {(p.payload_type, p.ssrc, p.extensions.mid) for p in packets} == {(102, sender._ssrc, "v0")}
    assert all(p.extensions.abs_send_time is not None for p in packets)
    stats = await sender.getStats()
    outbound = next(s for s in stats.values() if s.type == "outbound-rtp")
    assert (outbound.packetsSent, outbound.bytesSent) == (6, 3230)
    # the DTLS transport's own counters (its getStats) count the encrypted packets
    assert dtls._RTCDtlsTransport__tx_packets == 6
    assert dtls._RTCDtlsTransport__tx_bytes == sum(len(p) + 10 for p in dtls.sent)  # + SRTP tag

    # a NACK for the second packet is answered from the history, as RTX (RFC 4588) by aiortc
    dtls.sent.clear()
    await sender._retransmit(packets[1].sequence_number)
    (rtx,) = [RtpPacket.parse(data, extension_map) for data in dtls.sent]
    assert rtx.payload_type == 103 and rtx.ssrc == sender._rtx_ssrc
    assert rtx.payload == packets[1].sequence_number.to_bytes(2, "big") + b"b" * 1000
    await sender.stop()
    dtls.close()


def test_the_senders_ntp_clock_is_aiortcs() -> None:
    from aiortc import clock

    before = clock.current_ntp_time()
    ours = webrtc_sender.ntp_now()
    after = clock.current_ntp_time()
    assert before - (1 << 22) <= ours <= after + (1 << 22)  # within 1 ms of aiortc's


def test_a_frames_datagrams_are_cut_into_runs_the_kernel_can_segment() -> None:
    from transcode.udp_gso import segment_runs

    # fragments of one size, a shorter last one: one run
    assert segment_runs([1238] * 8 + [300]) == [(0, 9)]
    # a STAP-A first (parameter sets), then a keyframe's fragments, then a small slice
    assert segment_runs([60, 1238, 1238, 1238, 400, 900, 900]) == [(0, 1), (1, 5), (5, 7)]
    # a larger packet after a run starts a new one; 64 segments at most, 65,507 bytes at most
    assert segment_runs([500, 500, 800]) == [(0, 2), (2, 3)]
    assert segment_runs([100] * 130) == [(0, 64), (64, 128), (128, 130)]
    assert segment_runs([1238] * 60) == [(0, 52), (52, 60)]
    assert segment_runs([]) == []


class _RelayLikeTransport:
    """What aioice's TURN relay transport offers of a transport: ``sendto`` and
    ``get_extra_info`` (no socket)."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, tuple[str, int]]] = []

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def sendto(self, data: bytes, addr: tuple[str, int]) -> None:
        self.sent.append((data, addr))


async def test_a_frame_goes_out_segmented_on_a_socket_and_one_by_one_through_a_relay() -> None:
    from transcode.udp_gso import Sender

    loop = asyncio.get_running_loop()
    received: list[bytes] = []

    class Receiver(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: Any) -> None:
            received.append(data)

    receiving, _ = await loop.create_datagram_endpoint(Receiver, local_addr=("127.0.0.1", 0))
    sending, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol,
                                                     local_addr=("127.0.0.1", 0))
    frame = [b"a" * 1200, b"b" * 1200, b"c" * 1200, b"d" * 70, b"e" * 900]
    address = receiving.get_extra_info("sockname")
    sender = Sender()
    try:
        sender.send(sending, address, frame)  # type: ignore[arg-type]
        async with asyncio.timeout(5):
            while len(received) < len(frame):  # noqa: ASYNC110 - the datagrams are in flight
                await asyncio.sleep(0.01)
        assert received == frame and sender.segmenting
        relay = _RelayLikeTransport()
        sender.send(relay, ("192.0.2.1", 3478), frame)  # type: ignore[arg-type]
        assert relay.sent == [(datagram, ("192.0.2.1", 3478)) for datagram in frame]
        sending.close()
        await asyncio.sleep(0.05)  # closed: its descriptor is gone (and may be reused)
        sender.send(sending, address, frame)  # type: ignore[arg-type]
        await asyncio.sleep(0.05)
        assert len(received) == len(frame) and sender.segmenting
    finally:
        sender.close()
        receiving.close()
        sending.close()
