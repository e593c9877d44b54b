"""FLV tag bodies → Tracks and Packets, with tags written by FFmpeg's own flv muxer (PyAV)."""

from __future__ import annotations

import io
from fractions import Fraction

import av
import pytest

from ingest.rtmp.flv import FlvAdapter, metadata_codec
from livesrv.codecs import (
    CodecConfigError,
    avcc_parameter_sets,
    hvcc_nal_units,
    parse_asc,
    parse_h264_sps,
    parse_hevc_sps,
)
from livesrv.media import Packet, Track
from tests.support.media import flv_tags


def encode_flv(codec: str, width: int, height: int, frames: int = 12, audio: bool = True,
               options: dict[str, str] | None = None) -> bytes:
    """A short FLV file made by FFmpeg: ``frames`` frames of video (+ AAC)."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="flv") as out:
        video = out.add_stream(codec, rate=30)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        video.options = options or {}
        sound = None
        if audio:
            sound = out.add_stream("aac", rate=44100)
            sound.layout = "mono"
        samples = 0
        for i in range(frames):
            frame = av.VideoFrame(width, height, "yuv420p")
            for plane in frame.planes:
                # a moving gradient: cheap to make, and gives the encoder motion to code
                row = bytes((n + i * 3) & 0xFF for n in range(plane.line_size))
                plane.update(row * (plane.buffer_size // plane.line_size))
            frame.pts = i
            frame.time_base = Fraction(1, 30)
            out.mux(video.encode(frame))
            while sound is not None and samples < (i + 1) * 44100 // 30:
                chunk = av.AudioFrame(format="fltp", layout="mono", samples=1024)
                chunk.planes[0].update(bytes(chunk.planes[0].buffer_size))
                chunk.sample_rate = 44100
                chunk.pts = samples
                samples += 1024
                out.mux(sound.encode(chunk))
        out.mux(video.encode())
        if sound is not None:
            out.mux(sound.encode())
    return buf.getvalue()


def adapt(data: bytes) -> tuple[FlvAdapter, list[Track], list[Packet]]:
    adapter = FlvAdapter()
    tracks: list[Track] = []
    packets: list[Packet] = []
    from ingest.rtmp import amf0

    for kind, ts, body in flv_tags(data):
        if kind == 18:
            values = amf0.decode(body)
            adapter.set_metadata(values[1])
            continue
        out = adapter.video(ts, body) if kind == 9 else adapter.audio(ts, body)
        if isinstance(out, Track):
            tracks.append(out)
        elif isinstance(out, Packet):
            packets.append(out)
    return adapter, tracks, packets


def assert_length_prefixed(data: bytes) -> None:
    pos = 0
    while pos < len(data):
        pos += 4 + int.from_bytes(data[pos:pos + 4], "big")
    assert pos == len(data), "not AVCC/HVCC length-prefixed NAL units"


@pytest.mark.parametrize("width, height", [(1920, 1080), (1280, 720), (176, 144)])
def test_h264_from_ffmpeg(width: int, height: int) -> None:
    adapter, _, packets = adapt(encode_flv("libx264", width, height,
                                                options={"preset": "ultrafast", "g": "6", "bf": "2"}))
    video = adapter.video_track
    assert video is not None and video.codec == "h264"
    assert video.extradata is not None and video.extradata[0] == 1  # avcC as received
    sps = avcc_parameter_sets(video.extradata)[0]
    picture = parse_h264_sps(sps[0])
    assert (picture.width, picture.height) == (width, height)  # from the SPS itself
    assert (video.width, video.height) == (width, height)
    audio = adapter.audio_track
    assert audio is not None and (audio.codec, audio.sample_rate, audio.channels) == ("aac", 44100, 1)
    asc = parse_asc(audio.extradata or b"")
    assert (asc.sample_rate, asc.channels) == (44100, 1)
    vids = [p for p in packets if p.kind == "video"]
    assert len(vids) == 12
    assert [p.keyframe for p in vids][:7] == [True, False, False, False, False, False, True]
    assert all(p.pts >= p.dts for p in vids)
    assert any(p.pts > p.dts for p in vids)  # B-frames: the composition time was applied
    assert [p.dts for p in vids] == sorted(p.dts for p in vids)
    for packet in vids:
        assert_length_prefixed(packet.data)
    assert all(p.keyframe and p.kind == "audio" for p in packets if p.kind == "audio")
    assert adapter.ready()


def test_hevc_from_ffmpeg_uses_enhanced_rtmp() -> None:
    data = encode_flv("libx265", 1920, 1080, frames=4, audio=False,
                      options={"preset": "ultrafast", "x265-params": "log-level=error"})
    first_video = next(body for kind, _, body in flv_tags(data) if kind == 9)
    assert first_video[0] & 0x80 and first_video[1:5] == b"hvc1"  # IsExHeader + FourCC
    adapter, _, packets = adapt(data)
    video = adapter.video_track
    assert video is not None and video.codec == "hevc"
    assert video.extradata is not None and video.extradata[0] == 1  # hvcC as received
    sps = hvcc_nal_units(video.extradata, 33)
    picture = parse_hevc_sps(sps[0])
    assert (picture.width, picture.height) == (1920, 1080)
    assert (video.width, video.height) == (1920, 1080)
    assert len(packets) == 4 and packets[0].keyframe
    for packet in packets:
        assert_length_prefixed(packet.data)


def test_av1_from_ffmpeg_passes_through() -> None:
    data = encode_flv("libsvtav1", 320, 240, frames=3, audio=False, options={"preset": "12"})
    adapter, _, packets = adapt(data)
    video = adapter.video_track
    assert video is not None and video.codec == "av1"
    assert video.extradata is not None and video.extradata[0] == 0x81  # av1C marker + version
    assert (video.width, video.height) == (320, 240)  # from onMetaData
    assert packets and packets[0].keyframe


def _avc(frame_type: int, packet_type: int, cts: int, body: bytes) -> bytes:
    return bytes(((frame_type << 4) | 7, packet_type)) + (cts & 0xFFFFFF).to_bytes(3, "big") + body


AVCC_320x240 = bytes.fromhex(
    "0164000dffe100186764000dacd94141fa10000003001000000303c0f1429960010006"
    "68ebe3cb22c0fdf8f800")


def test_negative_composition_time_and_repeated_sequence_header() -> None:
    adapter = FlvAdapter()
    track = adapter.video(0, _avc(1, 0, 0, AVCC_320x240))
    assert isinstance(track, Track) and (track.width, track.height) == (320, 240)
    assert adapter.video(0, _avc(1, 0, 0, AVCC_320x240)) is None  # the same again: no change
    packet = adapter.video(100, _avc(2, 1, -33, b"\x00\x00\x00\x01\x41"))
    assert packet == Packet("video", 100, 67, False, b"\x00\x00\x00\x01\x41")
    changed = adapter.video(200, _avc(1, 0, 0, AVCC_320x240[:-1] + b"\x01"))
    assert isinstance(changed, Track) and changed.extradata != AVCC_320x240


def test_media_before_its_sequence_header_is_skipped() -> None:
    adapter = FlvAdapter()
    assert adapter.video(0, _avc(1, 1, 0, b"\x00\x00\x00\x01\x65")) is None
    assert adapter.audio(0, b"\xaf\x01\x21\x00") is None
    assert adapter.video(0, b"\x17") is None  # too short: skipped, not an error
    assert adapter.video(0, b"\x52\x00") is None  # command frame


def test_enhanced_coded_frames_and_coded_frames_x() -> None:
    adapter = FlvAdapter()
    hvcc = bytes(23)
    track = adapter.video(0, bytes((0x80 | (1 << 4) | 0,)) + b"hvc1" + b"\x01" + hvcc[1:])
    assert isinstance(track, Track) and track.codec == "hevc"
    coded = adapter.video(40, bytes((0x80 | (1 << 4) | 1,)) + b"hvc1" + (20).to_bytes(3, "big") + b"NALS")
    assert coded == Packet("video", 40, 60, True, b"NALS")
    coded_x = adapter.video(80, bytes((0x80 | (2 << 4) | 3,)) + b"hvc1" + b"NALX")
    assert coded_x == Packet("video", 80, 80, False, b"NALX")
    assert adapter.video(90, bytes((0x80 | (1 << 4) | 2,)) + b"hvc1") is None  # SequenceEnd
    assert adapter.video(90, bytes((0x80 | (1 << 4) | 0,)) + b"xyz1" + b"\x01") is None  # unknown FourCC


def test_metadata_decides_what_ready_waits_for() -> None:
    adapter = FlvAdapter()
    adapter.set_metadata({"videocodecid": 7.0, "width": 320.0, "height": 240.0})
    assert not adapter.ready()
    adapter.video(0, _avc(1, 0, 0, AVCC_320x240))
    assert adapter.ready()  # no audio announced
    assert metadata_codec({"videocodecid": float(int.from_bytes(b"hvc1", "big"))}, "video") == "hevc"
    assert metadata_codec({"audiocodecid": 10.0}, "audio") == "aac"


@pytest.mark.parametrize("asc, expected", [
    (bytes((0x12, 0x10)), (44100, 2)),
    (bytes((0x11, 0x88)), (48000, 1)),
    (bytes((0x13, 0x90)), (22050, 2)),
    (b"\x12", None),  # truncated
])
def test_audio_specific_config(asc: bytes, expected: tuple[int, int] | None) -> None:
    if expected is None:
        with pytest.raises(CodecConfigError):
            parse_asc(asc)
        return
    parsed = parse_asc(asc)
    assert (parsed.sample_rate, parsed.channels) == expected


@pytest.mark.parametrize("garbage", [b"", b"\x67", b"\x67\xff\xff\xff\xff", bytes(40)])
def test_sps_parsers_raise_only_their_own_error(garbage: bytes) -> None:
    for parse in (parse_h264_sps, parse_hevc_sps):
        try:
            parse(garbage)
        except CodecConfigError:
            pass


# -- numbers from the peer that are no numbers to use ------------------------------------------
ABSURD = [float("inf"), float("-inf"), float("nan"), 1e300, -5.0, 0.0]


@pytest.mark.parametrize("value", ABSURD)
def test_absurd_metadata_numbers_are_ignored(value: float) -> None:
    adapter = FlvAdapter()
    adapter.set_metadata({"videocodecid": value, "audiocodecid": value, "width": value,
                          "height": value, "framerate": value, "fps": value,
                          "videodatarate": value, "audiodatarate": value})
    # a config record whose SPS does not parse: the size could only come from the metadata
    video = adapter.video(0, _avc(1, 0, 0, b"\x01\x64\x00\x0d\xff\xe0\x00"))
    assert isinstance(video, Track)
    assert (video.width, video.height, video.fps, video.bitrate) == (None, None, None, None)
    audio = adapter.audio(0, b"\xaf\x00\x12\x10")
    assert isinstance(audio, Track) and audio.bitrate is None
    assert metadata_codec(adapter.metadata or {}, "video") is None
    assert metadata_codec(adapter.metadata or {}, "audio") is None


def test_sane_metadata_numbers_are_still_used() -> None:
    adapter = FlvAdapter()
    adapter.set_metadata({"width": 16384.0, "height": 720.0, "framerate": 240.0,
                          "videodatarate": 2500.0, "audiodatarate": 128.0})
    video = adapter.video(0, _avc(1, 0, 0, b"\x01\x64\x00\x0d\xff\xe0\x00"))
    assert isinstance(video, Track)
    assert (video.width, video.height, video.fps, video.bitrate) == (16384, 720, 240.0, 2_500_000)


def _h264_sps(units: int, scale: int) -> bytes:
    """A Baseline 640x480 SPS with VUI timing ``num_units_in_tick``/``time_scale``."""
    bits: list[int] = []

    def u(value: int, n: int) -> None:
        bits.extend((value >> (n - 1 - i)) & 1 for i in range(n))

    def ue(value: int) -> None:
        code = value + 1
        u(0, code.bit_length() - 1)
        u(code, code.bit_length())

    u(66, 8)  # profile_idc: Baseline
    u(0, 8)
    u(30, 8)  # constraint flags, level 3.0
    ue(0)  # seq_parameter_set_id
    ue(0)  # log2_max_frame_num_minus4
    ue(2)  # pic_order_cnt_type 2: nothing more
    ue(1)  # max_num_ref_frames
    u(0, 1)
    ue(39)  # 40 macroblocks: 640
    ue(29)  # 30 map units: 480
    u(1, 1)  # frame_mbs_only_flag
    u(1, 1)  # direct_8x8_inference_flag
    u(0, 1)  # no cropping
    u(1, 1)  # vui_parameters_present_flag
    u(0, 4)  # no aspect ratio, overscan, video signal, chroma location info
    u(1, 1)  # timing_info_present_flag
    u(units, 32)
    u(scale, 32)
    u(1, 1)  # fixed_frame_rate_flag
    u(1, 1)  # rbsp stop bit
    bits.extend([0] * (-len(bits) % 8))
    rbsp = bytes(int("".join(map(str, bits[i:i + 8])), 2) for i in range(0, len(bits), 8))
    nal = bytearray(b"\x67")
    zeros = 0
    for byte in rbsp:  # emulation prevention, as an encoder writes it
        if zeros >= 2 and byte <= 3:
            nal.append(3)
            zeros = 0
        nal.append(byte)
        zeros = zeros + 1 if byte == 0 else 0
    return bytes(nal)


@pytest.mark.parametrize("units, scale, fps", [
    (1, 60, 30.0),  # a real 30 fps stream
    (1, 0xFFFFFFFF, None),  # ~2.1e9 fps
    (1, 482, None),  # 241 fps: past any camera
    (1, 480, 240.0),  # the highest believed
    (1, 0, None),  # time_scale 0: 0 fps
])
def test_sps_frame_rate_is_only_believed_when_plausible(units: int, scale: int, fps: float | None) -> None:
    picture = parse_h264_sps(_h264_sps(units, scale))
    assert (picture.width, picture.height) == (640, 480)
    assert picture.fps == fps
