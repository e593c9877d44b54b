"""Low-Latency HLS on a real Hub and packager: parts, the tags that announce them, and the
bytes behind them (decoded with PyAV, i.e. FFmpeg's own MP4 demuxer and decoders)."""

from __future__ import annotations

import re
import struct
from collections.abc import AsyncIterator

import pytest

from livesrv.config import ConfigError
from livesrv.hub import Hub
from tests.support.media import decoded_frames, make_clip, publish, settle, starts_with_keyframe
from transcode.hls import HlsService, HlsSettings
from transcode.playlist import MediaPlaylist, Part, Segment

ATTRIBUTE = re.compile(r'([A-Z0-9-]+)=("[^"]*"|[^",]*)')


def attributes(value: str) -> dict[str, str]:
    return {key: raw.strip('"') for key, raw in ATTRIBUTE.findall(value)}


def parse_ll(text: str) -> dict:
    """A media playlist with its LL-HLS tags: header attributes, and every segment (complete
    ones with ``uri``, the open one without) with its parts in order."""
    lines = text.splitlines()
    assert lines[0] == "#EXTM3U"
    header: dict = {"tags": [line.split(":", 1)[0] for line in lines if line.startswith("#")]}
    segments: list[dict] = []
    current: dict = {"parts": []}
    for line in lines[1:]:
        tag, _, value = line.partition(":")
        if tag == "#EXT-X-TARGETDURATION":
            header["target"] = int(value)
        elif tag == "#EXT-X-MEDIA-SEQUENCE":
            header["sequence"] = int(value)
        elif tag == "#EXT-X-SERVER-CONTROL":
            header["server_control"] = attributes(value)
        elif tag == "#EXT-X-PART-INF":
            header["part_inf"] = attributes(value)
        elif tag == "#EXT-X-PRELOAD-HINT":
            header["preload_hint"] = attributes(value)
        elif tag == "#EXT-X-RENDITION-REPORT":
            header.setdefault("reports", []).append(attributes(value))
        elif tag == "#EXT-X-MAP":
            current["map"] = attributes(value)["URI"]
        elif tag == "#EXT-X-PART":
            current["parts"].append(attributes(value))
        elif tag == "#EXTINF":
            current["duration"] = float(value.rstrip(","))
        elif line and not line.startswith("#"):
            current["uri"] = line
            segments.append(current)
            current = {"parts": [], "map": current.get("map")}
    if current["parts"]:
        segments.append(current)  # the open segment: parts so far, no EXTINF yet
    header["segments"] = segments
    header["ended"] = "#EXT-X-ENDLIST" in lines
    return header


def top_level_boxes(data: bytes) -> list[bytes]:
    kinds, offset = [], 0
    while offset < len(data):
        size, kind = struct.unpack_from(">I4s", data, offset)
        kinds.append(kind)
        offset += size
    assert offset == len(data)
    return kinds




@pytest.fixture
async def hls() -> AsyncIterator[tuple[Hub, HlsService]]:
    hub = Hub()
    service = HlsService(hub, HlsSettings(window=6, grace_segments=1, linger_seconds=0.3,
                                          part_seconds=0.5))
    service.start()
    yield hub, service
    await service.close()


def playlist_of(service: HlsService, channel: str) -> MediaPlaylist:
    found = service.channel(channel)
    assert found is not None
    return found.renditions["source"].playlist


def parts_of(playlist: MediaPlaylist, segment: Segment) -> list[bytes]:
    return [bytes(playlist.file(part.name)) for part in segment.parts]


async def test_parts_make_up_segments_and_decode(hls: tuple[Hub, HlsService]) -> None:
    hub, service = hls
    # keyframes every 1 s, segments of 2 s: every other part of a segment starts at a keyframe
    clip = make_clip(seconds=6, gop_seconds=1)
    stream = hub.start("alice", clip.info, source="rtmp")
    await publish(stream, clip.packets)
    hub.stop(stream)
    await settle()
    playlist = playlist_of(service, "alice")
    segments = playlist.listed
    assert [round(s.duration, 2) for s in segments] == [2.0, 2.0, 2.0]
    init = bytes(playlist.file(segments[0].init_name))
    keyframe_ms = set(clip.keyframe_dts)
    start_ms = 0
    every_part = []
    for segment in segments:
        parts = parts_of(playlist, segment)
        assert len(parts) == 4
        # a segment is its parts, byte for byte: one URL or the other serves the same media
        assert b"".join(parts) == segment.data
        assert sum(p.duration for p in segment.parts) == pytest.approx(segment.duration, abs=1e-6)
        for part, data in zip(segment.parts, parts, strict=True):
            assert top_level_boxes(data) == [b"moof", b"mdat"]  # each part is its own fragment
            assert part.duration == pytest.approx(0.5, abs=0.002)
            # INDEPENDENT=YES exactly on the parts that start with a keyframe
            assert part.independent == (start_ms in keyframe_ms)
            assert starts_with_keyframe(init, data) == part.independent
            if part.independent:  # a player may start at any independent part
                assert decoded_frames(init, data)["video"] == 15
            start_ms += round(part.duration * 1000)
        every_part += parts
    # init + every part decodes to every frame the publisher sent
    assert decoded_frames(init, *every_part) == {"video": len(clip.video_packets),
                                            "audio": len(clip.audio_packets)}


async def test_playlist_announces_parts_per_spec(hls: tuple[Hub, HlsService]) -> None:
    hub, service = hls
    clip = make_clip(seconds=6, gop_seconds=2)
    stream = hub.start("bob", clip.info, source="rtmp")
    # 4 loops: 24 s, 11 segments cut, the 12th open
    for loop in range(4):
        await publish(stream, clip.shifted(loop * 6000))
    playlist = playlist_of(service, "bob")
    media = parse_ll(playlist.render().decode())
    tags = media["tags"]
    assert tags[:2] == ["#EXTM3U", "#EXT-X-VERSION"]
    assert tags.count("#EXT-X-SERVER-CONTROL") == 1 and tags.count("#EXT-X-PART-INF") == 1
    # 2 s segments: the target is 2 (EXTINF rounded to the nearest integer), not ceil's 3
    assert media["target"] == 2
    control, part_target = media["server_control"], float(media["part_inf"]["PART-TARGET"])
    assert control["CAN-BLOCK-RELOAD"] == "YES"
    assert part_target == 0.5
    assert float(control["PART-HOLD-BACK"]) >= 3 * part_target
    assert float(control["HOLD-BACK"]) >= 3 * media["target"]
    complete = [s for s in media["segments"] if "uri" in s]
    open_segment = media["segments"][-1]
    assert len(complete) == 6 and "uri" not in open_segment and open_segment["parts"]
    assert all(round(s["duration"]) <= media["target"] for s in complete)
    # parts only for the segments near the end (the last 3 target durations), then all of them
    with_parts = [bool(s["parts"]) for s in complete]
    assert with_parts == [False, False, False, True, True, True]
    for segment in media["segments"]:
        durations = [float(p["DURATION"]) for p in segment["parts"]]
        assert all(d <= part_target * 1.02 for d in durations)
        if "uri" in segment and durations:
            assert sum(durations) == pytest.approx(segment["duration"], abs=1e-4)
            assert segment["parts"][0].get("INDEPENDENT") == "YES"  # GOP 2 s: only the first
            assert all("INDEPENDENT" not in p for p in segment["parts"][1:])
    # the hint names the part that comes next: once it exists it is the playlist's last part
    hint = media["preload_hint"]
    assert hint["TYPE"] == "PART"
    assert playlist.file(hint["URI"]) is None
    more = clip.shifted(4 * 6000)
    await publish(stream, more[:40])
    media = parse_ll(playlist.render().decode())
    names = [p["URI"] for s in media["segments"] for p in s["parts"]]
    assert hint["URI"] in names and playlist.file(hint["URI"]) is not None
    # the keyframe that ends a segment ends its last part (the one hinted before it); the
    # segment is closed (EXTINF) together with the next one's first part, which the hint then
    # named: a live playlist always ends with parts
    keyframe = next(i for i, p in enumerate(more) if i > 40 and p.kind == "video" and p.keyframe)
    await publish(stream, more[40:keyframe])
    hint = parse_ll(playlist.render().decode())["preload_hint"]["URI"]
    await publish(stream, more[keyframe:keyframe + 1])
    media = parse_ll(playlist.render().decode())
    assert "uri" not in media["segments"][-1] and media["segments"][-1]["parts"][-1]["URI"] == hint
    hint = media["preload_hint"]["URI"]
    await publish(stream, more[keyframe + 1:keyframe + 50])  # > 0.5 s: the part is complete
    media = parse_ll(playlist.render().decode())
    closed, opened = media["segments"][-2:]
    assert "uri" in closed and "uri" not in opened
    assert opened["parts"][0]["URI"] == hint and opened["parts"][0]["INDEPENDENT"] == "YES"
    # when the publisher stops, the playlist ends: no hint, and a plain list of segments
    hub.stop(stream)
    await settle()
    media = parse_ll(playlist.render().decode())
    assert media["ended"] and "preload_hint" not in media
    assert not any(s["parts"] for s in media["segments"])


async def test_audio_only_parts_are_all_independent(hls: tuple[Hub, HlsService]) -> None:
    hub, service = hls
    clip = make_clip(codec=None, seconds=5)
    stream = hub.start("carol", clip.info, source="rtmp")
    await publish(stream, clip.packets)
    hub.stop(stream)
    await settle()
    playlist = playlist_of(service, "carol")
    parts: list[Part] = [p for s in playlist.listed for p in s.parts]
    assert parts and all(p.independent for p in parts)
    assert all(p.duration <= 0.51 for p in parts)
    init = bytes(playlist.file(playlist.listed[0].init_name))
    fragments = (bytes(playlist.file(p.name)) for p in parts)
    assert decoded_frames(init, *fragments)["audio"] == len(clip.audio_packets)


async def test_parts_and_memory_are_freed_with_their_segment() -> None:
    hub = Hub()
    service = HlsService(hub, HlsSettings(window=2, grace_segments=0, linger_seconds=0.1))
    service.start()
    try:
        clip = make_clip(seconds=4, gop_seconds=2, audio=False)
        stream = hub.start("dave", clip.info, source="rtmp")
        await publish(stream, clip.packets)
        playlist = playlist_of(service, "dave")
        first = playlist.listed[0]
        first_parts = [p.name for p in first.parts]
        assert all(playlist.file(name) is not None for name in first_parts)
        for loop in range(1, 3):
            await publish(stream, clip.shifted(loop * 4000))
        assert first.sequence < playlist.listed[0].sequence
        assert all(playlist.file(name) is None for name in first_parts)
        # a complete segment is held as its parts: held once, not twice
        segment_bytes = sum(s.size for s in playlist.listed)
        open_bytes = sum(p.size for p in playlist.open_parts)
        init_bytes = len(playlist.file(playlist.listed[0].init_name))
        assert playlist.held_bytes == segment_bytes + open_bytes + init_bytes
    finally:
        await service.close()
    assert playlist.held_bytes == 0


def test_part_settings_are_validated() -> None:
    assert HlsSettings(part_seconds=0).low_latency is False
    assert HlsSettings(segment_seconds=1.0, part_seconds=0.333).low_latency
    with pytest.raises(ConfigError, match="part_seconds"):
        HlsSettings(segment_seconds=2.0, part_seconds=1.5)
    with pytest.raises(ConfigError, match="part_seconds"):
        HlsSettings(part_seconds=0.01)
    with pytest.raises(ConfigError, match="max_blocking_requests"):
        HlsSettings(max_blocking_requests=-1)
