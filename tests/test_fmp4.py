"""The fMP4 writer against FFmpeg's own MP4 demuxer and decoders (through PyAV).

Each clip is encoded for real (tests/support/media.py), packaged by ``Fmp4Writer`` and read
back: every frame must decode, and the demuxed samples must be the bytes and timestamps that
went in.
"""

from __future__ import annotations

import io
import struct
from dataclasses import replace
from itertools import pairwise

import av
import pytest

from livesrv.codecs import (
    CodecConfigError,
    av1_codec_string,
    build_asc,
    codec_string,
    hevc_codec_string,
    opus_samples,
    parse_asc,
    picture_info,
)
from livesrv.media import Packet, StreamInfo, Track
from tests.support.media import Clip, make_clip
from transcode.fmp4 import Fmp4Writer, UnsupportedCodec


def package(clip: Clip, *, cut_every: int | None = None, packets: list[Packet] | None = None
            ) -> tuple[bytes, list[bytes]]:
    """Init segment and fragments: cut at every keyframe, or after every ``cut_every`` packets."""
    writer = Fmp4Writer(clip.info)
    fragments = []
    for index, packet in enumerate(packets if packets is not None else clip.packets):
        if index and (packet.kind == "video" and packet.keyframe if cut_every is None
                      else index % cut_every == 0):
            fragments.append(writer.flush(packet.dts))
        writer.add(packet)
    fragments.append(writer.flush())
    return writer.init_segment(), [f for f in fragments if f]


def demux(data: bytes) -> dict[str, list[tuple[int, int, bytes, bool, float]]]:
    """Samples per stream type: (dts, pts, payload, keyframe, time_base)."""
    out: dict[str, list] = {"video": [], "audio": []}
    with av.open(io.BytesIO(data), format="mp4") as container:
        for packet in container.demux():
            if packet.size == 0:
                continue
            out[packet.stream.type].append((packet.dts, packet.pts, bytes(packet), packet.is_keyframe,
                                            packet.time_base))
    return out


def decode(data: bytes) -> dict[str, list[av.frame.Frame]]:
    frames: dict[str, list] = {"video": [], "audio": []}
    with av.open(io.BytesIO(data), format="mp4") as container:
        for stream in container.streams:
            stream.thread_type = "NONE"
        for frame in container.decode(*container.streams):
            frames["video" if isinstance(frame, av.VideoFrame) else "audio"].append(frame)
    return frames


def boxes(data: bytes, path: list[bytes]) -> list[bytes]:
    """Payloads of the boxes at ``path`` (e.g. [b"moov", b"trak", b"tkhd"])."""
    found = []
    pos = 0
    while pos + 8 <= len(data):
        size, kind = struct.unpack_from(">I4s", data, pos)
        payload = data[pos + 8:pos + size]
        if kind == path[0]:
            found += [payload] if len(path) == 1 else boxes(payload, path[1:])
        pos += size
    return found


def check_roundtrip(clip: Clip, init: bytes, fragments: list[bytes]) -> None:
    data = init + b"".join(fragments)
    samples = demux(data)
    frames = decode(data)
    video_in, audio_in = clip.video_packets, clip.audio_packets
    # every packet is a sample, byte for byte, and every sample decodes
    assert [s[2] for s in samples["video"]] == [p.data for p in video_in]
    assert [s[2] for s in samples["audio"]] == [p.data for p in audio_in]
    assert len(frames["video"]) == len(video_in)
    if clip.info.audio is not None and clip.info.audio.codec == "aac":
        assert len(frames["audio"]) == len(audio_in)
    # video timestamps survive exactly (ms -> 90 kHz), keyframes are sync samples
    if video_in:
        assert [(s[0] // 90, s[1] // 90) for s in samples["video"]] == [(p.dts, p.pts) for p in video_in]
        assert [s[3] for s in samples["video"]] == [p.keyframe for p in video_in]
        pts = [f.pts for f in frames["video"]]
        assert pts == sorted(pts) and len(set(pts)) == len(pts)
    # audio: each access unit lasts its frame length exactly, and stays within a frame of the
    # packet timestamps
    if audio_in:
        track = clip.info.audio
        rate = 48000 if track.codec == "opus" else track.sample_rate
        steps = {b[0] - a[0] for a, b in pairwise(samples["audio"])}
        expected = {opus_samples(p.data) for p in audio_in} if track.codec == "opus" else {1024}
        assert steps == expected
        for sample, packet in zip(samples["audio"], audio_in):
            assert abs(sample[0] / rate * 1000 - packet.dts) <= 1024 / rate * 1000


@pytest.mark.parametrize("codec", ["h264", "hevc"])
def test_video_and_aac_roundtrip(codec: str) -> None:
    clip = make_clip(codec=codec)
    init, fragments = package(clip)
    assert len(fragments) == 3  # one per 2 s GOP
    check_roundtrip(clip, init, fragments)
    with av.open(io.BytesIO(init + fragments[0])) as container:
        video = container.streams.video[0]
        assert (video.codec_context.width, video.codec_context.height) == (320, 180)
        assert container.streams.audio[0].codec_context.sample_rate == 44100


def test_video_only_and_audio_only() -> None:
    video_only = make_clip(audio=False)
    check_roundtrip(video_only, *package(video_only))
    audio_only = make_clip(codec=None)
    init, fragments = package(audio_only, cut_every=80)
    assert len(fragments) == 4
    check_roundtrip(audio_only, init, fragments)
    assert boxes(init, [b"moov", b"trak", b"mdia", b"hdlr"])[0][8:12] == b"soun"


def test_opus_roundtrip() -> None:
    clip = make_clip(audio="opus")
    init, fragments = package(clip)
    check_roundtrip(clip, init, fragments)
    assert len(decode(init + b"".join(fragments))["audio"]) == len(clip.audio_packets)
    dops = boxes(init, [b"moov", b"trak", b"mdia", b"minf", b"stbl", b"stsd"])
    assert b"dOps" in dops[1] and b"Opus" in dops[1]


def test_bframes_keep_composition_offsets() -> None:
    clip = make_clip(bframes=2)
    assert any(p.pts != p.dts for p in clip.video_packets)
    init, fragments = package(clip)
    check_roundtrip(clip, init, fragments)
    frames = decode(init + b"".join(fragments))["video"]
    assert [round(f.pts * f.time_base * 1000) for f in frames] == sorted(p.pts for p in clip.video_packets)


def test_fragments_at_any_packet_boundary_decode() -> None:
    """LL-HLS parts cut mid-GOP: the fragments together still decode every frame."""
    clip = make_clip()
    init, fragments = package(clip, cut_every=7)
    assert len(fragments) > 50
    check_roundtrip(clip, init, fragments)


def test_fragment_layout() -> None:
    clip = make_clip()
    writer = Fmp4Writer(clip.info)
    for packet in clip.packets[:10]:
        writer.add(packet)
    fragment = writer.flush(clip.packets[10].dts)
    assert writer.sequence_number == 1 and writer.flush() == b""
    assert boxes(fragment, [b"moof", b"mfhd"])[0][4:] == struct.pack(">I", 1)
    tfdts = boxes(fragment, [b"moof", b"traf", b"tfdt"])
    assert [t[0] for t in tfdts] == [1, 1]  # 64-bit decode times
    for tfhd in boxes(fragment, [b"moof", b"traf", b"tfhd"]):
        assert int.from_bytes(tfhd[1:4], "big") & 0x020000  # default-base-is-moof
    trun = boxes(fragment, [b"moof", b"traf", b"trun"])[0]
    assert trun[0] == 1  # signed composition offsets
    ftyp = boxes(writer.init_segment(), [b"ftyp"])[0]
    assert ftyp[:4] == b"iso6" and b"cmfc" in ftyp


def test_dimensions_from_sps_when_the_track_has_none() -> None:
    for codec in ("h264", "hevc"):
        clip = make_clip(codec=codec, width=426, height=240, seconds=1, audio=False, with_dimensions=False)
        assert clip.info.video.width is None
        picture = picture_info(clip.info.video)
        assert (picture.width, picture.height) == (426, 240)
        tkhd = boxes(Fmp4Writer(clip.info).init_segment(), [b"moov", b"trak", b"tkhd"])[0]
        assert struct.unpack(">II", tkhd[-8:]) == (426 << 16, 240 << 16)
    assert picture_info(make_clip(with_dimensions=False, audio=False).info.video).fps == 30.0


def test_codec_strings() -> None:
    clip = make_clip()
    avcc = clip.info.video.extradata
    assert codec_string(clip.info.video) == f"avc1.{avcc[1:4].hex()}"
    assert codec_string(clip.info.audio) == "mp4a.40.2"
    # ISO 14496-15 E.3's own example: Main profile, level 3.1, constraint byte 0xB0
    hvcc = bytes([1, 0x01, 0x60, 0, 0, 0, 0xB0, 0, 0, 0, 0, 0, 93]) + bytes(10)
    assert hevc_codec_string(hvcc) == "hvc1.1.6.L93.B0"
    assert hevc_codec_string(bytes([1, 0x22, 0x20, 0, 0, 0, 0x90, 0, 0, 0, 0, 0, 120])) == "hvc1.2.4.H120.90"
    assert codec_string(make_clip(codec="hevc").info.video).startswith("hvc1.1.6.L")
    assert av1_codec_string(bytes([0x81, 0x08, 0x0C, 0x00])) == "av01.0.08M.08"
    assert av1_codec_string(bytes([0x81, 0x2D, 0xC0, 0x00])) == "av01.1.13H.10"
    assert parse_asc(bytes([0x2B, 0x92, 0x08, 0x00])).object_type == 5  # HE-AAC, explicit
    assert codec_string(Track("audio", "aac", extradata=bytes([0x2B, 0x92, 0x08, 0x00]))) == "mp4a.40.5"
    assert codec_string(Track("audio", "opus")) == "opus"
    asc = parse_asc(build_asc(48000, 2))
    assert (asc.object_type, asc.sample_rate, asc.channels, asc.frame_length) == (2, 48000, 2, 1024)
    assert parse_asc(build_asc(37800, 1)).sample_rate == 37800
    assert opus_samples(bytes([0xFC])) == 960 and opus_samples(bytes([0x1B, 0x03])) == 8640


def test_bad_configuration_is_a_clear_error() -> None:
    with pytest.raises(UnsupportedCodec, match="vp8"):
        Fmp4Writer(StreamInfo(Track("video", "vp8"), None))
    with pytest.raises(CodecConfigError):
        parse_asc(b"\x12")
    with pytest.raises(CodecConfigError):
        hevc_codec_string(b"\x01\x02")
    # a broken record degrades to no parsed size and a default codec string, never a crash
    broken = Track("video", "h264", extradata=b"\x01\x64\x00\x1f\xff\xe1\x00\x40\x67")
    assert picture_info(broken) is None
    assert codec_string(broken) == "avc1.64001f"
    assert codec_string(Track("video", "h264", extradata=b"\x01")) == "avc1.64001f"
    # an unsupported track is left out; the rest is still packaged
    clip = make_clip()
    writer = Fmp4Writer(replace(clip.info, video=Track("video", "vp8")))
    assert writer.kinds == ("audio",) and "vp8" in writer.skipped["video"]


def test_audio_clock_smooths_jitter_and_follows_gaps() -> None:
    clip = make_clip(codec=None, seconds=3)
    audio = list(clip.audio_packets)
    # ms timestamps jitter by a millisecond either way; a 500 ms hole in the middle
    jittered = [replace(p, dts=p.dts + (i % 3) - 1, pts=p.pts + (i % 3) - 1) for i, p in enumerate(audio)]
    holed = jittered[:50] + [replace(p, dts=p.dts + 500, pts=p.pts + 500) for p in jittered[60:]]
    writer = Fmp4Writer(clip.info)
    for packet in holed:
        writer.add(packet)
    data = writer.init_segment() + writer.flush()
    samples = demux(data)["audio"]
    assert len(samples) == len(holed)
    steps = [b[0] - a[0] for a, b in pairwise(samples)]
    assert steps[:49] == [1024] * 49 and set(steps[50:]) == {1024}
    assert abs(samples[50][0] / 44100 * 1000 - holed[50].dts) < 1024 / 44.1


def test_audio_clock_follows_timestamps_that_run_slow() -> None:
    """An encoder whose audio timestamps advance 5% slower than its samples: the clock steps
    back at fragment starts, so audio never drifts from video by more than a fragment."""
    clip = make_clip(codec=None, seconds=3)
    slow = [replace(p, dts=int(p.dts * 0.95), pts=int(p.pts * 0.95)) for p in clip.audio_packets]
    writer = Fmp4Writer(clip.info)
    fragments = []
    for index, packet in enumerate(slow):
        if index and index % 20 == 0:
            fragments.append(writer.flush())
        writer.add(packet)
    fragments.append(writer.flush())
    samples = demux(writer.init_segment() + b"".join(fragments))["audio"]
    assert len(samples) == len(slow)
    frame_ms = 1024 / 44.1
    for index in range(0, len(slow), 20):  # each fragment starts within a frame of its timestamp
        assert abs(samples[index][0] / 44.1 - slow[index].dts) <= frame_ms
    assert max(abs(s[0] / 44.1 - p.dts) for s, p in zip(samples, slow)) < 3 * frame_ms


def test_other_time_bases() -> None:
    """WHIP-style tracks: video in 1/90000, audio counted in samples (1/sample_rate)."""
    from fractions import Fraction

    clip = make_clip(seconds=2)
    rate = clip.info.audio.sample_rate
    info = StreamInfo(replace(clip.info.video, time_base=Fraction(1, 90000)),
                      replace(clip.info.audio, time_base=Fraction(1, rate)))
    audio_index = iter(range(len(clip.audio_packets)))
    packets = []
    for p in clip.packets:
        if p.kind == "video":
            packets.append(replace(p, dts=p.dts * 90, pts=p.pts * 90))
        else:
            samples = next(audio_index) * 1024
            packets.append(replace(p, dts=samples, pts=samples))
    writer = Fmp4Writer(info)
    for packet in packets:
        writer.add(packet)
    data = writer.init_segment() + writer.flush()
    samples = demux(data)
    assert [s[0] for s in samples["video"]] == [p.dts for p in packets if p.kind == "video"]
    assert [s[0] for s in samples["audio"]] == [p.dts for p in packets if p.kind == "audio"]
    assert len(decode(data)["video"]) == len(clip.video_packets)
