"""The sans-IO parts of WHIP ingest: the offer check, the frames -> publication assembler, and
the VP8 -> H.264 transcoder, on real SDP (made by aiortc) and real encoded frames (PyAV)."""

from __future__ import annotations

import asyncio
import threading
from fractions import Fraction

import av
import pytest
from aiortc import RTCPeerConnection, RTCRtpSender, VideoStreamTrack
from aiortc.mediastreams import AudioStreamTrack

from ingest.whip_media import (
    AUDIO_TIME_BASE,
    OPUS_TRACK,
    VIDEO_TIME_BASE,
    PublicationAssembler,
    Start,
    vp8_is_keyframe,
)
from ingest.whip_sdp import check_offer, h264_is_baseline
from ingest.whip_vp8 import Vp8Transcoder
from livesrv.annexb import avcc_record_to_annexb, avcc_to_annexb
from livesrv.codecs import avcc_parameter_sets, parse_h264_sps
from livesrv.media import Packet
from livesrv.webrtc_offers import OfferError
from tests.support.publish import _PatternSource, read_frame_number


async def aiortc_offer(video: str | None = "H264", audio: bool = True) -> str:
    pc = RTCPeerConnection()
    try:
        if video:
            transceiver = pc.addTransceiver(VideoStreamTrack(), direction="sendonly")
            codecs = RTCRtpSender.getCapabilities("video").codecs
            transceiver.setCodecPreferences([c for c in codecs if c.mimeType == f"video/{video}"])
        if audio:
            pc.addTransceiver(AudioStreamTrack(), direction="sendonly")
        await pc.setLocalDescription(await pc.createOffer())
        return pc.localDescription.sdp
    finally:
        await pc.close()


# -- the offer check ----------------------------------------------------------------------------
async def test_offers_aiortc_makes_are_accepted() -> None:
    summary = check_offer(await aiortc_offer("H264"))
    assert (summary.video, summary.audio) == ("h264", True)
    summary = check_offer(await aiortc_offer("VP8"))
    assert (summary.video, summary.audio) == ("vp8", True)
    summary = check_offer(await aiortc_offer(None))
    assert (summary.video, summary.audio) == (None, True)
    summary = check_offer(await aiortc_offer("H264", audio=False))
    assert (summary.video, summary.audio) == ("h264", False)


async def test_h264_is_preferred_over_vp8_when_both_are_offered() -> None:
    pc = RTCPeerConnection()
    pc.addTransceiver(VideoStreamTrack(), direction="sendonly")  # VP8 first, then H.264
    await pc.setLocalDescription(await pc.createOffer())
    offer = pc.localDescription.sdp
    await pc.close()
    assert offer.index("VP8/90000") < offer.index("H264/90000")
    assert check_offer(offer).video == "h264"


@pytest.mark.parametrize(("fmtp", "ok"), [
    ({"packetization-mode": "1", "profile-level-id": "42e01f"}, True),
    ({"packetization-mode": "1", "profile-level-id": "42001f"}, True),
    ({"packetization-mode": "1"}, True),  # absent: Constrained Baseline
    ({"packetization-mode": "0", "profile-level-id": "42e01f"}, False),
    ({"packetization-mode": "1", "profile-level-id": "640c1f"}, False),  # Constrained High
    ({"packetization-mode": "1", "profile-level-id": "4d001f"}, False),  # Main
    ({"packetization-mode": "1", "profile-level-id": "zz"}, False),
])
def test_h264_profiles(fmtp: dict[str, str], ok: bool) -> None:
    assert h264_is_baseline(fmtp) is ok


async def test_bad_offers_say_what_is_wrong() -> None:
    offer = await aiortc_offer("H264")

    def reason(text: str) -> str:
        with pytest.raises(OfferError) as info:
            check_offer(text)
        assert info.value.status == 400
        return info.value.reason

    assert "v=0" in reason("")
    assert "v=0" in reason("not sdp at all")
    assert "malformed" in reason("v=0\r\nthis is not a line\r\n")
    assert "malformed m=" in reason("v=0\r\nm=video\r\n")
    assert "no audio or video" in reason("v=0\r\no=- 0 0 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n")
    assert "recvonly" in reason(offer.replace("a=sendonly", "a=recvonly"))
    assert "ICE credentials" in reason(offer.replace("a=ice-pwd:", "a=x-ice-pwd:"))
    assert "fingerprint" in reason(offer.replace("a=fingerprint:", "a=x-fingerprint:"))
    high_only = offer.replace("profile-level-id=42001f", "profile-level-id=640c1f").replace(
        "profile-level-id=42e01f", "profile-level-id=64001f")
    message = reason(high_only)
    assert "no supported video codec" in message and "640c1f" in message and "VP8" in message
    assert "Opus" in reason(offer.replace("opus/48000/2", "G722/8000"))
    two_videos = offer + offer[offer.index("m=video"):offer.index("m=audio")]
    assert "at most one video" in reason(two_videos)
    data = offer + "m=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\n"
    assert "data channels" in reason(data)


# -- the assembler ------------------------------------------------------------------------------
def h264_frames(count: int, width: int = 320, height: int = 180, gop: int = 10) -> list[tuple[bytes, bool]]:
    """Annex-B access units as a WebRTC H.264 sender makes them (Constrained Baseline, SPS/PPS
    in front of each IDR), with their frame numbers drawn in the pixels."""
    encoder = av.CodecContext.create("libx264", "w")
    encoder.width, encoder.height, encoder.pix_fmt = width, height, "yuv420p"
    encoder.time_base = Fraction(1, 30)
    encoder.options = {"preset": "ultrafast", "tune": "zerolatency", "profile": "baseline",
                       "x264-params": f"keyint={gop}:scenecut=0:repeat-headers=1"}
    source = _PatternSource(width, height)
    out: list[tuple[bytes, bool]] = []
    for n in range(count):
        frame = source.frame(n, None)
        frame.pts = n
        out += [(bytes(p), bool(p.is_keyframe)) for p in encoder.encode(frame)]
    out += [(bytes(p), bool(p.is_keyframe)) for p in encoder.encode(None)]
    return out


def test_video_starts_at_the_first_keyframe_with_its_parameter_sets() -> None:
    frames = h264_frames(25, gop=10)
    assembler = PublicationAssembler(video=True, audio=True, created=0.0)
    # audio before the video's first keyframe: nothing is live yet, it is dropped
    assert assembler.audio_opus(b"\xfc\x01", 0, arrival=0.0) == []
    # a stream that joins mid-GOP: the first frames are not decodable, so nothing starts
    actions = []
    for index, (data, _) in enumerate(frames[3:10]):
        actions += assembler.video_h264(data, (index + 3) * 3000, arrival=0.1 + index / 30)
    assert actions == [] and not assembler.live
    actions = assembler.video_h264(frames[10][0], 10 * 3000, arrival=0.5)
    start, packet = actions
    assert isinstance(start, Start) and start.restart is None
    video = start.info.video
    assert video is not None and video.codec == "h264" and video.time_base == VIDEO_TIME_BASE
    assert (video.width, video.height) == (320, 180)
    assert start.info.audio == OPUS_TRACK and OPUS_TRACK.time_base == AUDIO_TIME_BASE
    assert isinstance(packet, Packet) and packet.keyframe and packet.kind == "video"
    # timestamps count from the track's first frame, offset by its arrival after the session's
    # first frame (audio at 0.0 s, video 0.1 s later: 9000 ticks at 90 kHz)
    assert packet.dts == packet.pts == 9000 + (10 - 3) * 3000
    # the payload is AVCC without parameter sets, and decodes with the avcC record
    sps, _ = avcc_parameter_sets(video.extradata or b"")
    assert parse_h264_sps(sps[0]).width == 320
    decoder = av.CodecContext.create("h264", "r")
    pictures = decoder.decode(av.Packet(avcc_record_to_annexb(video.extradata or b"")
                                        + avcc_to_annexb(packet.data)))
    assert [read_frame_number(p) for p in pictures] == [10]

    later = assembler.video_h264(frames[11][0], 11 * 3000, arrival=0.6)
    assert [(p.kind, p.keyframe, p.dts) for p in later] == [("video", False, 9000 + 8 * 3000)]
    # the same parameter sets at the next keyframe: no restart
    assert all(isinstance(a, Packet) for a in assembler.video_h264(frames[20][0], 20 * 3000, 1.0))
    audio = assembler.audio_opus(b"\xfc\x02", 960, arrival=1.0)
    assert [(p.kind, p.dts) for p in audio] == [("audio", 960)]
    # a late duplicate is dropped: timestamps only go forward
    assert assembler.audio_opus(b"\xfc\x02", 960, arrival=1.0) == []


def test_new_parameter_sets_restart_the_publication() -> None:
    small, large = h264_frames(2), h264_frames(2, width=640, height=360)
    assembler = PublicationAssembler(video=True, audio=False, created=0.0)
    first = assembler.video_h264(small[0][0], 0, 0.0)
    assert isinstance(first[0], Start) and first[0].info.audio is None
    actions = assembler.video_h264(large[0][0], 3000, 0.1)
    restart = actions[0]
    assert isinstance(restart, Start) and restart.restart == "new video parameters"
    assert restart.info.video is not None and restart.info.video.width == 640
    assert isinstance(actions[1], Packet) and actions[1].dts == 3000


def test_audio_only_offer_starts_at_its_first_packet() -> None:
    assembler = PublicationAssembler(video=False, audio=True, created=0.0)
    start, packet = assembler.audio_opus(b"\xfc\x01", 123, arrival=0.0)
    assert isinstance(start, Start) and start.info.video is None and start.info.audio == OPUS_TRACK
    assert isinstance(packet, Packet) and packet.dts == 0
    assert not assembler.keyframe_due(100.0)


def test_video_that_never_starts_goes_live_audio_only_then_restarts_with_video() -> None:
    assembler = PublicationAssembler(video=True, audio=True, start_timeout=5.0, created=0.0)
    assert assembler.audio_opus(b"\xfc\x01", 0, 0.5) == []
    assert assembler.tick(4.9) == []
    (start,) = assembler.tick(5.0)
    assert isinstance(start, Start) and start.info.video is None
    assert [p.kind for p in assembler.audio_opus(b"\xfc\x01", 960, 5.1)] == ["audio"]
    actions = assembler.video_h264(h264_frames(1)[0][0], 0, 6.0)
    assert isinstance(actions[0], Start) and actions[0].restart == "video arrived"
    assert actions[0].info.video is not None and actions[0].info.audio == OPUS_TRACK


def test_keyframes_are_asked_for_until_the_first_then_every_interval() -> None:
    assembler = PublicationAssembler(video=True, audio=False, keyframe_interval=2.0, created=0.0)
    assert assembler.keyframe_due(0.0)
    assembler.keyframe_requested(0.0)
    assert not assembler.keyframe_due(0.3)
    assert assembler.keyframe_due(0.6)  # retried while no keyframe came
    assembler.keyframe_requested(0.6)
    assembler.video_h264(h264_frames(1)[0][0], 0, 0.7)
    assert not assembler.keyframe_due(2.0)
    assert assembler.keyframe_due(2.7)
    assembler.keyframe_requested(2.7)
    assert not assembler.keyframe_due(4.0)
    assert assembler.keyframe_due(4.7)


def test_garbage_video_is_dropped_not_raised() -> None:
    assembler = PublicationAssembler(video=True, audio=False, created=0.0)
    assert assembler.video_h264(b"\x00\x00\x00\x01\x67\xff", 0, 0.0) == []  # a broken SPS alone
    assert assembler.video_h264(b"junk", 3000, 0.1) == []
    assert not assembler.live


# -- VP8 -> H.264 ---------------------------------------------------------------------------------
def vp8_frames(count: int, width: int = 320, height: int = 180) -> list[bytes]:
    encoder = av.CodecContext.create("libvpx", "w")
    encoder.width, encoder.height, encoder.pix_fmt = width, height, "yuv420p"
    encoder.time_base = Fraction(1, 30)
    encoder.options = {"deadline": "realtime", "cpu-used": "8", "lag-in-frames": "0"}
    source = _PatternSource(width, height)
    out = []
    for n in range(count):
        frame = source.frame(n, None)
        frame.pts = n
        out += [bytes(p) for p in encoder.encode(frame)]
    out += [bytes(p) for p in encoder.encode(None)]
    return out


def test_vp8_is_transcoded_to_h264_with_keyframes_every_interval() -> None:
    frames = vp8_frames(75)
    assert vp8_is_keyframe(frames[0]) and not vp8_is_keyframe(frames[1])
    outputs: list[tuple[bytes, int]] = []
    pause = threading.Event()  # never set: a sleep that is not time.sleep in a test

    def on_output(annexb: bytes, timestamp: int) -> None:
        outputs.append((annexb, timestamp))

    # a decoder cannot start mid-stream: frames before a keyframe are dropped
    transcoder = Vp8Transcoder(on_output, lambda: None, keyframe_seconds=1.0)
    for n, frame in enumerate(frames[1:10], start=1):
        transcoder.submit(frame, n * 3000)
    transcoder.close()
    transcoder.join(30)
    assert transcoder.dropped == 9 and outputs == []

    finished = threading.Event()
    transcoder = Vp8Transcoder(on_output, lambda: None, keyframe_seconds=1.0)
    for n, frame in enumerate(frames):
        transcoder.submit(frame, n * 3000)
        while transcoder._queue.qsize() > 30:  # stay within the queue, as real time would
            pause.wait(0.01)
    transcoder.submit(b"", 0)  # not a frame: ignored
    while transcoder._queue.qsize():
        pause.wait(0.01)
    # the worker may still be encoding the last frame: wait for all to come out
    for _ in range(3000):
        if len(outputs) >= len(frames):
            finished.set()
            break
        pause.wait(0.01)
    transcoder.close()
    transcoder.join(30)
    assert finished.is_set(), f"{len(outputs)} of {len(frames)} frames came out"
    assemble = PublicationAssembler(video=True, audio=False, created=0.0)
    packets = []
    for annexb, timestamp in outputs:
        packets += [a for a in assemble.video_h264(annexb, timestamp, 0.0) if isinstance(a, Packet)]
    assert assemble.info is not None and assemble.info.video is not None
    assert (assemble.info.video.width, assemble.info.video.height) == (320, 180)
    keyframes = [p.dts for p in packets if p.keyframe]
    assert keyframes[:3] == [0, 90000, 180000], keyframes  # every second of RTP time
    decoder = av.CodecContext.create("h264", "r")
    numbers = []
    record = assemble.info.video.extradata or b""
    for packet in packets:
        data = avcc_to_annexb(packet.data)
        if packet.keyframe:
            data = avcc_record_to_annexb(record) + data
        numbers += [read_frame_number(p) for p in decoder.decode(av.Packet(data))]
    numbers += [read_frame_number(p) for p in decoder.decode(None)]
    assert numbers == list(range(len(frames))), numbers


def test_transcoder_close_is_prompt() -> None:
    async def run() -> None:
        transcoder = Vp8Transcoder(lambda *_: None, lambda: None)
        transcoder.close()
        await asyncio.to_thread(transcoder.join, 10)
        assert not transcoder._thread.is_alive()
    asyncio.run(run())
