"""The test publisher itself (tests/support/publish.py): what the end-to-end tests and latency
benchmarks rely on. Frames survive a real encoder with their number and capture time readable,
and a publish that cannot happen ends in ``error`` instead of hanging."""

from __future__ import annotations

import time
from pathlib import Path

import av
import pytest

from tests.support.publish import (
    RtmpPublisher,
    parse_media_playlist,
    parse_multivariant,
    read_frame_number,
    read_stamp,
)
from tests.support.server import free_port


@pytest.mark.parametrize("codec", ["h264", "hevc"])
def test_frames_carry_their_number_and_capture_time_through_the_encoder(tmp_path: Path,
                                                                         codec: str) -> None:
    path = tmp_path / "out.flv"  # the same muxer as over RTMP, into a file
    pub = RtmpPublisher(str(path), codec=codec, seconds=1.5, stamp_time=True, realtime=False,
                        bitrate=300_000, first_frame=1000)
    pub.start().wait(60)
    assert pub.error is None, repr(pub.error)
    assert pub.frames_sent == 45 and pub.audio_frames_sent > 60

    with av.open(str(path)) as container:
        assert container.streams.video[0].codec_context.name == codec
        assert container.streams.audio[0].codec_context.name == "aac"
        frames = list(container.decode(video=0))
    assert [read_frame_number(f) for f in frames] == list(range(1000, 1045))
    for frame, captured in zip(frames, pub.capture_times, strict=True):
        stamp = read_stamp(frame)
        assert stamp is not None and abs(stamp - captured) <= 0.001
        # scaled down (a ladder rung, a small video element) and as RGB (a screenshot)
        small = frame.reformat(width=320, height=180, format="rgb24")
        assert read_stamp(small) == stamp
        assert read_frame_number(small) == read_frame_number(frame)


def test_a_frame_without_a_code_reads_as_none() -> None:
    frame = av.VideoFrame(640, 360, "yuv420p")
    for plane in frame.planes:
        plane.update(bytes([128]) * plane.buffer_size)
    assert read_frame_number(frame) is None
    assert read_stamp(frame) is None


def test_unstamped_frames_have_a_number_but_no_time(tmp_path: Path) -> None:
    path = tmp_path / "out.flv"
    RtmpPublisher(str(path), seconds=0.2, realtime=False, audio=False).start().wait(30)
    with av.open(str(path)) as container:
        frame = next(container.decode(video=0))
    assert read_frame_number(frame) == 0
    assert read_stamp(frame) is None


def test_realtime_pacing_and_stop(tmp_path: Path) -> None:
    pub = RtmpPublisher(str(tmp_path / "out.flv"), seconds=None).start()
    assert pub.started.wait(10)
    time.sleep(1.0)
    pub.stop()
    assert pub.error is None and pub.done.is_set()
    assert 15 <= pub.frames_sent <= 60  # about 1 s at 30 fps, not as fast as possible


def test_nobody_listening_is_an_error_not_a_hang() -> None:
    pub = RtmpPublisher(f"rtmp://127.0.0.1:{free_port()}/live/key", seconds=5).start()
    pub.wait(15)
    assert isinstance(pub.error, ConnectionRefusedError)
    assert not pub.started.is_set()


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="codec"):
        RtmpPublisher("rtmp://127.0.0.1/live/x", codec="mpeg2")
    with pytest.raises(ValueError, match="size"):
        RtmpPublisher("rtmp://127.0.0.1/live/x", width=641)


def test_playlist_parsers() -> None:
    variants = parse_multivariant(
        '#EXTM3U\n#EXT-X-STREAM-INF:BANDWIDTH=1200000,CODECS="avc1.42c01e,mp4a.40.2",'
        'RESOLUTION=640x360,FRAME-RATE=30.000\nsource/index.m3u8\n')
    assert len(variants) == 1
    assert variants[0].uri == "source/index.m3u8"
    assert variants[0].codecs == ["avc1.42c01e", "mp4a.40.2"]
    assert variants[0].resolution == (640, 360) and variants[0].bandwidth == 1_200_000

    playlist = parse_media_playlist(
        "#EXTM3U\n#EXT-X-VERSION:7\n#EXT-X-TARGETDURATION:2\n#EXT-X-MEDIA-SEQUENCE:7\n"
        '#EXT-X-MAP:URI="init-1.mp4"\n#EXT-X-PROGRAM-DATE-TIME:2026-11-25T02:00:00.000Z\n'
        "#EXTINF:2.00000,\n7.m4s\n#EXT-X-DISCONTINUITY\n#EXT-X-MAP:URI=\"init-2.mp4\"\n"
        "#EXTINF:1.50000,\n8.m4s\n#EXT-X-ENDLIST\n")
    assert playlist.ended and playlist.target_duration == 2 and playlist.version == 7
    first, second = playlist.segments
    assert (first.sequence, first.map_uri, first.duration, first.discontinuity) == (
        7, "init-1.mp4", 2.0, False)
    assert first.program_date_time is not None and first.program_date_time.timestamp() == 1795572000.0
    assert (second.sequence, second.map_uri, second.duration, second.discontinuity) == (
        8, "init-2.mp4", 1.5, True)
    with pytest.raises(ValueError):
        parse_media_playlist("not a playlist")
