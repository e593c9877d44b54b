"""The HLS packager on a real Hub: clip packets pushed by a publisher, playlists and segments out."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest

from livesrv.config import ConfigError, Settings
from livesrv.hub import Hub
from livesrv.media import Track
from tests.support.media import decoded_frames, make_clip, parse_media, publish, settle, starts_with_keyframe
from transcode.hls import HlsService, HlsSettings
from transcode.playlist import MediaPlaylist


@pytest.fixture
async def hls() -> AsyncIterator[tuple[Hub, HlsService]]:
    hub = Hub()
    service = HlsService(hub, HlsSettings(window=4, grace_segments=1, linger_seconds=0.3))
    service.start()
    yield hub, service
    await service.close()


def playlist_of(service: HlsService, channel: str, rendition: str = "source") -> MediaPlaylist:
    found = service.channel(channel)
    assert found is not None, f"{channel} has no HLS channel"
    return found.renditions[rendition].playlist




async def test_segments_cut_at_keyframes_and_decode(hls: tuple[Hub, HlsService]) -> None:
    hub, service = hls
    clip = make_clip(seconds=9, gop_seconds=1.5)  # keyframes every 1.5 s: segments of 3 s
    stream = hub.start("alice", clip.info, source="rtmp")
    await publish(stream, clip.packets)
    playlist = playlist_of(service, "alice")
    media = parse_media(playlist.render().decode())
    assert media["version"] == "7" and media["independent"] and not media["ended"]
    # the last GOP is still open: a segment is cut only when the next keyframe arrives
    assert [s["duration"] for s in media["segments"]] == [3.0, 3.0]
    assert media["target"] == 3
    hub.stop(stream)
    await settle()
    media = parse_media(playlist.render().decode())
    assert media["ended"]
    assert [round(s["duration"], 2) for s in media["segments"]] == [3.0, 3.0, 3.0]
    init = playlist.file(media["segments"][0]["map"])
    datas = [playlist.file(s["uri"]) for s in media["segments"]]
    assert all(starts_with_keyframe(init, d) for d in datas)
    assert decoded_frames(init, *datas) == {"video": len(clip.video_packets),
                                            "audio": len(clip.audio_packets)}
    # wall clock of each segment's first packet: now-ish, in order
    stamps = [time.mktime(time.strptime(s["pdt"][:19], "%Y-%m-%dT%H:%M:%S")) for s in media["segments"]]
    assert stamps == sorted(stamps) and abs(stamps[0] - time.mktime(time.gmtime())) < 60


async def test_window_slides_and_old_segments_are_freed(hls: tuple[Hub, HlsService]) -> None:
    hub, service = hls
    clip = make_clip(seconds=4, gop_seconds=1, audio=False)
    stream = hub.start("bob", clip.info, source="rtmp")
    for loop in range(5):  # 20 s of video in 2 s segments
        await publish(stream, clip.shifted(loop * 4000))
    playlist = playlist_of(service, "bob")
    media = parse_media(playlist.render().decode())
    assert len(media["segments"]) == 4  # the window
    assert media["sequence"] == 9 - 4  # nine segments cut, the tenth still open
    assert playlist.file(media["segments"][0]["uri"].rsplit("-", 1)[0] + "-4.m4s")  # grace
    assert playlist.file(media["segments"][0]["uri"].rsplit("-", 1)[0] + "-3.m4s") is None
    assert playlist.held_bytes < 1_200_000  # window + grace + the open segment's LL-HLS parts
    hub.stop(stream)
    await settle()
    assert parse_media(playlist.render().decode())["ended"]
    await asyncio.sleep(0.5)  # linger
    assert service.channel("bob") is None
    assert playlist.held_bytes == 0


async def test_reconnect_continues_with_a_discontinuity(hls: tuple[Hub, HlsService]) -> None:
    hub, service = hls
    clip = make_clip(seconds=4, gop_seconds=2)
    first = hub.start("carol", clip.info, source="rtmp")
    await publish(first, clip.packets)
    # the encoder reconnects: a new publication replaces the old one (timestamps restart)
    second = hub.start("carol", clip.info, source="rtmp")
    assert first.ended
    await publish(second, clip.packets)
    hub.stop(second)
    await settle()
    playlist = playlist_of(service, "carol")
    media = parse_media(playlist.render().decode())
    segments = media["segments"]
    assert [s["uri"].rsplit("-", 1)[1] for s in segments] == ["0.m4s", "1.m4s", "2.m4s", "3.m4s"]
    assert [bool(s.get("discontinuity")) for s in segments] == [False, False, True, False]
    assert segments[0]["map"] != segments[2]["map"]
    assert len({s["uri"] for s in segments}) == 4
    assert media["ended"] and media["discontinuity_sequence"] == 0
    for part in (segments[:2], segments[2:]):
        init = playlist.file(part[0]["map"])
        frames = decoded_frames(init, *[playlist.file(s["uri"]) for s in part])
        assert frames["video"] == len(clip.video_packets)
    # once discontinuities leave the window, the discontinuity sequence counts them
    third = hub.start("carol", clip.info, source="rtmp")
    for loop in range(3):
        await publish(third, clip.shifted(loop * 4000))
    media = parse_media(playlist.render().decode())
    # segments 4-8 are the third publication (4 starts it); 5-8 are listed
    assert not media["ended"] and media["sequence"] == 5
    assert media["discontinuity_sequence"] == 2
    assert not any(s.get("discontinuity") for s in media["segments"])


async def test_multivariant_lists_codecs_resolution_and_bandwidth(hls: tuple[Hub, HlsService]) -> None:
    hub, service = hls
    clip = make_clip(width=320, height=180, seconds=6)
    stream = hub.start("dave", clip.info, source="rtmp")
    await settle()
    before = service.channel("dave").multivariant().decode()
    assert "BANDWIDTH=2500000" in before  # an estimate before anything was measured
    await publish(stream, clip.packets)
    text = service.channel("dave").multivariant().decode()
    lines = text.splitlines()
    assert lines[:3] == ["#EXTM3U", "#EXT-X-VERSION:7", "#EXT-X-INDEPENDENT-SEGMENTS"]
    avcc = clip.info.video.extradata
    assert f'CODECS="avc1.{avcc[1:4].hex()},mp4a.40.2"' in lines[3]
    assert "RESOLUTION=320x180" in lines[3] and "FRAME-RATE=30.000" in lines[3]
    playlist = playlist_of(service, "dave")
    rates = [len(s.data) * 8 / s.duration for s in playlist.listed]
    bandwidth = int(re.search(r"[:,]BANDWIDTH=(\d+)", lines[3]).group(1))
    average = int(re.search(r"AVERAGE-BANDWIDTH=(\d+)", lines[3]).group(1))
    assert bandwidth == pytest.approx(max(rates), abs=1)
    assert min(rates) - 1 <= average <= bandwidth
    assert lines[4] == "source/index.m3u8"


async def test_hevc_is_packaged_with_its_codec_string(hls: tuple[Hub, HlsService]) -> None:
    hub, service = hls
    clip = make_clip(codec="hevc", seconds=4)
    stream = hub.start("hevcy", clip.info, source="rtmp")
    await publish(stream, clip.packets)
    hub.stop(stream)
    await settle()
    master = service.channel("hevcy").multivariant().decode()
    assert 'CODECS="hvc1.1.6.L' in master and ',mp4a.40.2"' in master
    playlist = playlist_of(service, "hevcy")
    media = parse_media(playlist.render().decode())
    init = playlist.file(media["segments"][0]["map"])
    frames = decoded_frames(init, *[playlist.file(s["uri"]) for s in media["segments"]])
    assert frames == {"video": len(clip.video_packets), "audio": len(clip.audio_packets)}


async def test_renditions_are_packaged_and_listed_after_the_source(hls: tuple[Hub, HlsService]) -> None:
    hub, service = hls
    source = make_clip(width=320, height=180, seconds=4)
    low = make_clip(width=160, height=90, seconds=4)
    stream = hub.start("erin", source.info, source="rtmp")
    rung = stream.add_rendition("90p", low.info)
    for a, b in zip(source.packets, low.packets):
        stream.push(a)
        rung.push(b)
        await asyncio.sleep(0)
    await settle()
    lines = service.channel("erin").multivariant().decode().splitlines()
    uris = [line for line in lines if line and not line.startswith("#")]
    assert uris == ["source/index.m3u8", "90p/index.m3u8"]
    assert "RESOLUTION=160x90" in lines[5]
    playlist = playlist_of(service, "erin", "90p")
    media = parse_media(playlist.render().decode())
    assert len(media["segments"]) == 1
    init = playlist.file(media["segments"][0]["map"])
    frames = decoded_frames(init, *[playlist.file(media["segments"][0]["uri"])])
    assert frames["video"] == 60
    # the ladder restarts the rung: it stays listed and its playlist goes on after a discontinuity
    rung = stream.add_rendition("90p", low.info)
    offset = low.packets[-1].dts + 34
    for a, b in zip(source.shifted(offset), low.shifted(offset)):
        stream.push(a)
        rung.push(b)
        await asyncio.sleep(0)
    await settle()
    assert "90p/index.m3u8" in service.channel("erin").multivariant().decode()
    media = parse_media(playlist.render().decode())
    assert not media["ended"] and [bool(s.get("discontinuity")) for s in media["segments"]] == [
        False, False, True]
    # the ladder sheds the rung: it leaves the multivariant playlist, its playlist ends
    stream.remove_rendition("90p")
    await settle()
    assert "90p" not in service.channel("erin").multivariant().decode()
    assert parse_media(playlist.render().decode())["ended"]
    await asyncio.sleep(0.5)  # after the linger its files are gone, the source's are not
    assert "90p" not in service.channel("erin").renditions and playlist.held_bytes == 0
    assert playlist_of(service, "erin").held_bytes > 0


async def test_audio_only_is_cut_by_time(hls: tuple[Hub, HlsService]) -> None:
    hub, service = hls
    clip = make_clip(codec=None, seconds=7)
    stream = hub.start("frank", clip.info, source="rtmp")
    await publish(stream, clip.packets)
    hub.stop(stream)
    await settle()
    playlist = playlist_of(service, "frank")
    media = parse_media(playlist.render().decode())
    durations = [s["duration"] for s in media["segments"]]
    # (cut at the LL-HLS part boundary nearest 2 s: four parts of 21 AAC frames)
    assert len(durations) == 4 and all(1.9 <= d < 2.05 for d in durations[:3])
    assert 'CODECS="mp4a.40.2"' in service.channel("frank").multivariant().decode()
    assert "RESOLUTION" not in service.channel("frank").multivariant().decode()
    init = playlist.file(media["segments"][0]["map"])
    frames = decoded_frames(init, *[playlist.file(s["uri"]) for s in media["segments"]])
    assert frames["audio"] == len(clip.audio_packets)


async def test_unsupported_codecs(hls: tuple[Hub, HlsService]) -> None:
    hub, service = hls
    clip = make_clip(seconds=2)
    # VP8 video (a WHIP publisher, say): HLS carries the audio only
    info = replace(clip.info, video=Track("video", "vp8"))
    stream = hub.start("gina", info, source="whip")
    await publish(stream, [p for p in clip.packets if p.kind == "audio"])
    assert 'CODECS="mp4a.40.2"' in service.channel("gina").multivariant().decode()
    # nothing packageable at all: the channel has no multivariant playlist
    hub.start("hank", replace(info, audio=None), source="whip")
    await settle()
    assert service.channel("hank").multivariant() is None


async def test_media_playlist_waits_for_the_first_segment(hls: tuple[Hub, HlsService]) -> None:
    hub, service = hls
    clip = make_clip(seconds=4)
    stream = hub.start("ivy", clip.info, source="rtmp")
    await settle()
    playlist = playlist_of(service, "ivy")
    waiter = asyncio.create_task(playlist.wait_for_segment())
    await settle()
    assert not waiter.done()
    await publish(stream, clip.packets)
    await asyncio.wait_for(waiter, 1)
    assert playlist.has_segments


async def test_a_packager_that_falls_behind_does_not_stretch_a_segment() -> None:
    hub = Hub()
    service = HlsService(hub, HlsSettings(queue_packets=64))
    service.start()
    try:
        clip = make_clip(seconds=8, audio=False)
        stream = hub.start("jack", clip.info, source="rtmp")
        packets = list(clip.packets)
        await publish(stream, packets[:70])  # up to 2.3 s, in time
        for packet in packets[70:200]:  # then 4.3 s at once: the hub drops to a keyframe
            stream.push(packet)
        await publish(stream, packets[200:])
        hub.stop(stream)
        await settle()
        playlist = playlist_of(service, "jack")
        media = parse_media(playlist.render().decode())
        assert all(s["duration"] < 2.1 for s in media["segments"]), media["segments"]
        stamps = [s["pdt"] for s in media["segments"]]
        assert stamps == sorted(stamps)
        init = playlist.file(media["segments"][0]["map"])
        frames = decoded_frames(init, *[playlist.file(s["uri"]) for s in media["segments"]])
        assert 0 < frames["video"] < len(packets)
    finally:
        await service.close()


def test_settings_are_validated() -> None:
    settings = Settings(tables={"hls": {"segment_seconds": 1.0, "window": 8}})
    hls = settings.section("hls", HlsSettings)
    assert (hls.segment_seconds, hls.window) == (1.0, 8)
    with pytest.raises(ConfigError, match="window"):
        HlsSettings(window=1)
    with pytest.raises(ConfigError, match="unknown"):
        Settings(tables={"hls": {"segment_secs": 1}}).section("hls", HlsSettings)
