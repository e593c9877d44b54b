"""The ABR ladder on a real Hub: pre-encoded clips in, rung renditions out (decoded with PyAV),
packaged by the real HLS packager."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path

import av
import pytest
from prometheus_client import REGISTRY, generate_latest

from livesrv.config import ConfigError, load_settings
from livesrv.hub import Hub, Stream
from livesrv.media import Packet, StreamInfo
from tests.support.media import Clip, make_clip, parse_media, publish
from transcode.hls import HlsService, HlsSettings
from transcode.ladder import (
    Ladder,
    LadderService,
    LadderSettings,
    RungSpec,
    output_fps,
    plan_ladder,
    source_picture,
)

SMALL_LADDER = ({"name": "270p", "height": 270, "video_kbps": 500},
                {"name": "180p", "height": 180, "video_kbps": 250})
#: tests push clips faster than real time: a generous lag bound keeps every rung
RELAXED = {"max_lag_seconds": 120.0, "restore_lag_seconds": 1.0, "queue_seconds": 60.0}


@dataclass
class Capture:
    """Everything each rung of one publication delivered, kept from its first packet."""

    streams: dict[str, Stream] = field(default_factory=dict)
    packets: dict[str, list[Packet]] = field(default_factory=dict)
    starts: list[str] = field(default_factory=list)

    def watch(self, stream: Stream) -> None:
        stream.watch_renditions(self._on_rendition)

    def _on_rendition(self, child: Stream) -> None:
        self.starts.append(child.rendition)
        self.streams[child.rendition] = child
        sub = child.subscribe("test", maxsize=100_000)
        self.packets[child.rendition] = packets = []

        async def collect() -> None:
            async for packet in sub:
                packets.append(packet)

        asyncio.get_running_loop().create_task(collect())

    def video(self, rung: str) -> list[Packet]:
        return [p for p in self.packets[rung] if p.kind == "video"]

    def audio(self, rung: str) -> list[Packet]:
        return [p for p in self.packets[rung] if p.kind == "audio"]


@pytest.fixture
async def hub() -> AsyncIterator[Hub]:
    hub = Hub()
    yield hub
    hub.close()


async def start_ladder(hub: Hub, **overrides: object) -> LadderService:
    settings = LadderSettings(**{"rungs": SMALL_LADDER, **RELAXED, **overrides})  # type: ignore[arg-type]
    service = LadderService(hub, settings)
    service.start()
    return service


async def wait_for(condition: Callable[[], object], limit: float = 30.0) -> None:
    """Poll ``condition``: what it watches is changed by the ladder's worker thread."""
    async with asyncio.timeout(limit):
        while not condition():  # noqa: ASYNC110 - no event to wait on across the thread
            await asyncio.sleep(0.02)


async def wait_caught_up(ladder: Ladder, clip_last_dts: int) -> None:
    """The worker has decoded the whole clip and every rung's encoder has emitted what it will
    emit before its end-of-stream flush."""
    worker = ladder.worker
    assert worker is not None
    await wait_for(lambda: worker.position == clip_last_dts)
    frames = -1
    while frames != (frames := sum(r["frames"] for r in ladder.describe())):  # noqa: ASYNC110
        await asyncio.sleep(0.2)


def decode_video(info: StreamInfo, packets: list[Packet]) -> list[av.VideoFrame]:
    """Rung packets through PyAV's H.264 decoder, configured from the rung's own avcC."""
    assert info.video is not None
    decoder = av.CodecContext.create("h264", "r")
    decoder.extradata = info.video.extradata
    frames = []
    for packet in packets:
        av_packet = av.Packet(packet.data)
        av_packet.pts, av_packet.dts = packet.pts, packet.dts
        frames.extend(decoder.decode(av_packet))
    frames.extend(decoder.decode(None))
    return frames


def last_video_dts(clip: Clip) -> int:
    return clip.video_packets[-1].dts


# -- settings and planning ----------------------------------------------------------------------
def test_default_ladder_comes_from_config_file() -> None:
    settings = load_settings(env={}).section("ladder", LadderSettings)
    assert settings.enabled
    assert [(r.name, r.height) for r in settings.rungs] == [("720p", 720), ("480p", 480), ("360p", 360)]
    assert settings.max_fps == 30 and settings.preset in ("veryfast", "faster")


def test_server_config_overrides_ladder(tmp_path: Path) -> None:
    config = tmp_path / "livesrv.toml"
    config.write_text('[ladder]\nenabled = false\npreset = "faster"\n'
                      '[[ladder.rungs]]\nname = "240p"\nheight = 240\nvideo_kbps = 400\nprofile = "main"\n')
    settings = load_settings(config, env={}).section("ladder", LadderSettings)
    assert not settings.enabled and settings.preset == "faster"
    assert settings.rungs == (RungSpec("240p", 240, 400, profile="main"),)
    assert settings.max_fps == 30  # untouched keys keep the file's defaults


@pytest.mark.parametrize("table, message", [
    ({"preset": "warp"}, "preset"),
    ({"rungs": [{"name": "a/b", "height": 240, "video_kbps": 400}]}, "name"),
    ({"rungs": [{"name": "x", "height": 241, "video_kbps": 400}]}, "height"),
    ({"rungs": [{"name": "x", "height": 240}]}, "missing"),
    ({"rungs": [{"name": "x", "height": 240, "video_kbps": 400, "crf": 3}]}, "unknown"),
    ({"rungs": [{"name": "x", "height": 240, "video_kbps": 400}] * 2}, "unique"),
    ({"restore_lag_seconds": 5.0, "max_lag_seconds": 2.0}, "restore_lag"),
])
def test_bad_ladder_settings_are_clear_errors(table: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        LadderSettings(**table)


def test_1080p60_source_gets_three_rungs_at_30fps() -> None:
    plans = plan_ladder(LadderSettings(), 1920, 1080, 60.0)
    assert [(p.name, p.width, p.height, p.fps) for p in plans] == [
        ("720p", 1280, 720, 30.0), ("480p", 854, 480, 30.0), ("360p", 640, 360, 30.0)]
    assert output_fps(50, 30) == 25 and output_fps(29.97, 30) == 29.97 and output_fps(None, 30) is None


@pytest.mark.parametrize("fps", [1e9, 3e8, float("inf"), float("-inf"), float("nan"), 0.0, -1.0, 241.0])
def test_a_frame_rate_no_source_has_is_unknown_and_plans_at_once(fps: float) -> None:
    """The rate comes from the publisher (onMetaData, SPS VUI) and the plan is made on the event
    loop: a huge one must not be divided down a step at a time, nor Infinity forever."""
    assert output_fps(fps, 30) is None
    plans = plan_ladder(LadderSettings(), 1920, 1080, fps)
    assert [(p.name, p.fps, p.max_fps) for p in plans] == [
        ("720p", None, 30.0), ("480p", None, 30.0), ("360p", None, 30.0)]
    assert all(p.pixel_rate == p.width * p.height * 30.0 for p in plans)


def test_the_divisor_is_the_smallest_that_fits_under_max_fps() -> None:
    assert [output_fps(fps, 30) for fps in (240, 120, 60, 59.94, 30.3, 30.4, 24, 1)] == [
        30.0, 30.0, 30.0, 29.97, 30.3, 15.2, 24, 1]
    assert output_fps(239.0, 30) == pytest.approx(239.0 / 8)


def test_an_absurd_announced_rate_falls_back_to_the_sps() -> None:
    clip = make_clip("h264", 640, 360, 30, seconds=1)
    assert clip.info.video is not None
    sps_fps = source_picture(replace(clip.info.video, fps=None))
    assert sps_fps == (640, 360, 30.0)  # x264 writes the rate into the SPS's VUI
    for fps in (1e9, float("inf"), float("nan"), -1.0):
        assert source_picture(replace(clip.info.video, fps=fps)) == sps_fps


def test_no_rung_at_or_above_the_source() -> None:
    assert plan_ladder(LadderSettings(), 640, 360, 30.0) == []
    custom = LadderSettings(rungs=({"name": "360p", "height": 360, "video_kbps": 800},
                                   {"name": "240p", "height": 240, "video_kbps": 400}))
    assert [(p.name, p.width, p.height) for p in plan_ladder(custom, 640, 360, 30.0)] == [("240p", 426, 240)]


async def test_source_at_smallest_rung_starts_no_worker(hub: Hub) -> None:
    service = await start_ladder(hub, rungs=({"name": "360p", "height": 360, "video_kbps": 800},))
    clip = make_clip("h264", 640, 360, 30, seconds=1)
    stream = hub.start("small", clip.info, source="rtmp")
    assert service.ladders() == [] and stream.consumers == 0
    await service.close()


# -- the ladder itself --------------------------------------------------------------------------
async def test_rungs_decode_at_their_size_with_aligned_keyframes_and_source_audio(hub: Hub) -> None:
    hls = HlsService(hub, HlsSettings(segment_seconds=1.0, window=20, linger_seconds=5))
    service = await start_ladder(hub)  # wired first, as app.py does: HLS learns of rungs later
    hls.start()
    clip = make_clip("h264", 640, 360, 30, seconds=5, gop_seconds=1)
    stream = hub.start("alice", clip.info, source="rtmp")
    capture = Capture()
    capture.watch(stream)
    await publish(stream, clip.packets)
    ladder = service.ladder("alice")
    assert ladder is not None
    await wait_caught_up(ladder, last_video_dts(clip))

    assert sorted(capture.streams) == ["180p", "270p"]
    source_keys = clip.keyframe_dts
    key_sets = {}
    for rung, (width, height) in {"270p": (480, 270), "180p": (320, 180)}.items():
        info = capture.streams[rung].info
        assert info.video is not None and (info.video.width, info.video.height) == (width, height)
        video = capture.video(rung)
        assert all(p.dts == p.pts for p in video), "no B-frames: decode order is presentation order"
        frames = decode_video(info, video)
        assert len(frames) == len(video) >= 100
        assert {(f.width, f.height) for f in frames} == {(width, height)}
        # an IDR on each source keyframe, at the source's timestamp, and nowhere else
        key_sets[rung] = [p.dts for p in video if p.keyframe]
        assert key_sets[rung] == [k for k in source_keys if k <= video[-1].dts]
        # AAC passed through: the very packets the publisher sent
        assert info.audio is clip.info.audio
        sent = {p.dts: p.data for p in clip.audio_packets}
        audio = capture.audio(rung)
        assert audio and all(sent[p.dts] == p.data for p in audio)
    assert key_sets["270p"] == key_sets["180p"]

    # the packager cut every rung where it cut the source
    channel = hls.channel("alice")
    assert channel is not None and set(channel.listed) == {"source", "270p", "180p"}

    def segment_durations() -> dict[str, list[float]]:
        return {name: [s["duration"] for s in parse_media(state.playlist.render().decode())["segments"]]
                for name, state in channel.renditions.items()}

    # the packager reads each rung through its own queue: under load it may still be behind the
    # encoders when they are caught up, so wait for what it will have, not for a fixed moment
    await wait_for(lambda: min(len(d) for d in segment_durations().values()) >= 3)
    durations = segment_durations()
    complete = min(len(d) for d in durations.values())
    assert durations["270p"][:complete] == durations["180p"][:complete] == durations["source"][:complete]
    multivariant = channel.multivariant()
    assert multivariant is not None and b"RESOLUTION=480x270" in multivariant

    hub.stop(stream)
    await hls.close()
    await service.close()


async def test_1080p60_source_gets_720p_480p_360p_at_30fps(hub: Hub) -> None:
    service = await start_ladder(hub, rungs=LadderSettings().rungs, preset="ultrafast")
    clip = make_clip("h264", 1920, 1080, 60, seconds=1.0, gop_seconds=0.5, audio=False)
    stream = hub.start("big", clip.info, source="rtmp")
    capture = Capture()
    capture.watch(stream)
    await publish(stream, clip.packets)
    ladder = service.ladder("big")
    assert ladder is not None
    await wait_caught_up(ladder, last_video_dts(clip))
    hub.stop(stream)
    await service.close()

    assert sorted(capture.streams) == ["360p", "480p", "720p"]
    for rung, size in {"720p": (1280, 720), "480p": (854, 480), "360p": (640, 360)}.items():
        video = capture.video(rung)
        frames = decode_video(capture.streams[rung].info, video)
        assert {(f.width, f.height) for f in frames} == {size}
        gaps = [b.dts - a.dts for a, b in itertools.pairwise(video)]
        assert gaps and min(gaps) >= 33, f"{rung} must not exceed 30 fps: {gaps}"
        assert capture.streams[rung].info.video.fps == 30.0  # type: ignore[union-attr]
        assert [p.dts for p in video if p.keyframe] == [k for k in clip.keyframe_dts if k <= video[-1].dts]


async def test_opus_audio_is_encoded_to_aac_once(hub: Hub) -> None:
    service = await start_ladder(hub)
    clip = make_clip("h264", 640, 360, 30, seconds=3, gop_seconds=1, audio="opus")
    stream = hub.start("whip", clip.info, source="whip")
    capture = Capture()
    capture.watch(stream)
    await publish(stream, clip.packets)
    ladder = service.ladder("whip")
    assert ladder is not None
    await wait_caught_up(ladder, last_video_dts(clip))
    infos = [capture.streams[r].info.audio for r in ("270p", "180p")]
    assert infos[0] is infos[1] and infos[0] is not None and infos[0].codec == "aac"
    audio = capture.audio("270p")
    assert capture.audio("180p") == audio and len(audio) > 50  # the same packets: encoded once
    decoder = av.CodecContext.create("aac", "r")
    decoder.extradata = infos[0].extradata
    samples = sum(f.samples for p in audio for f in decoder.decode(av.Packet(p.data)))
    assert samples >= len(audio) * 1024 - 2048
    hub.stop(stream)
    await service.close()


async def test_stream_end_stops_the_worker(hub: Hub) -> None:
    service = await start_ladder(hub)
    clip = make_clip("h264", 640, 360, 30, seconds=2, gop_seconds=1)
    stream = hub.start("bob", clip.info, source="rtmp")
    await publish(stream, clip.packets)
    ladder = service.ladder("bob")
    assert ladder is not None and ladder.worker is not None and ladder.worker.is_alive()
    hub.stop(stream)
    await asyncio.wait_for(ladder.finished.wait(), 30)
    await asyncio.to_thread(ladder.worker.join, 10)
    assert not ladder.worker.is_alive()
    await wait_for(lambda: service.ladders() == [], limit=5)
    await service.close()


async def test_shutdown_stops_workers_of_live_streams(hub: Hub) -> None:
    service = await start_ladder(hub)
    clip = make_clip("h264", 640, 360, 30, seconds=2, gop_seconds=1)
    stream = hub.start("carol", clip.info, source="rtmp")
    await publish(stream, clip.packets)
    ladder = service.ladder("carol")
    assert ladder is not None and ladder.worker is not None
    await service.close()
    assert not ladder.worker.is_alive() and not stream.ended


async def test_undecodable_source_does_not_crash_the_ladder(hub: Hub) -> None:
    service = await start_ladder(hub)
    clip = make_clip("h264", 640, 360, 30, seconds=2, gop_seconds=1)
    stream = hub.start("junk", clip.info, source="rtmp")
    garbage = [Packet("video", p.dts, p.pts, p.keyframe, b"\x00\x00\x00\x05junk!" * 3)
               if p.kind == "video" and not p.keyframe and i % 3 == 0 else p
               for i, p in enumerate(clip.packets)]
    capture = Capture()
    capture.watch(stream)
    await publish(stream, garbage)
    ladder = service.ladder("junk")
    assert ladder is not None
    await wait_caught_up(ladder, last_video_dts(clip))
    assert ladder.worker is not None and ladder.worker.is_alive()
    assert capture.video("270p"), "the ladder goes on after bad packets"
    hub.stop(stream)
    await service.close()


def feeders(channel: str) -> list[asyncio.Task]:
    return [t for t in asyncio.all_tasks() if t.get_name() == f"ladder feed {channel}" and not t.done()]


async def test_a_failed_worker_lets_go_of_the_stream(hub: Hub) -> None:
    """A worker that cannot decode the source ends; its feeder and subscription go with it
    instead of draining every packet into a closed inbox until the stream ends."""
    service = await start_ladder(hub)
    clip = make_clip("h264", 640, 360, 30, seconds=2, gop_seconds=1)
    assert clip.info.video is not None
    # a codec FFmpeg has no decoder for: the worker fails as it opens its decoder
    info = replace(clip.info, video=replace(clip.info.video, codec="nonesuch"))
    stream = hub.start("broken", info, source="rtmp")
    ladder = service.ladder("broken")
    assert ladder is not None and ladder.worker is not None
    await asyncio.wait_for(ladder.finished.wait(), 30)
    await asyncio.to_thread(ladder.worker.join, 10)
    assert not ladder.worker.is_alive()
    await wait_for(lambda: not feeders("broken") and stream.consumers == 0, limit=5)
    assert service.ladders() == []
    await publish(stream, clip.packets)  # the live stream goes on without a ladder reading it
    assert stream.consumers == 0 and not feeders("broken") and not stream.ended
    await asyncio.wait_for(service.close(), 10)


async def test_a_ladder_that_cannot_start_leaves_nothing_behind(hub: Hub) -> None:
    service = await start_ladder(hub)
    clip = make_clip("h264", 640, 360, 30, seconds=1)
    assert clip.info.audio is not None
    # a track description the worker cannot be built from (its audio clock is not a number)
    info = replace(clip.info, audio=replace(clip.info.audio, time_base=float("nan")))
    with pytest.raises(ValueError):
        Fraction(info.audio.time_base)  # type: ignore[union-attr]
    stream = hub.start("nostart", info, source="rtmp")
    assert service.ladders() == [] and service.ladder("nostart") is None
    assert stream.consumers == 0 and not feeders("nostart")
    await asyncio.wait_for(service.close(), 10)


# -- falling behind -----------------------------------------------------------------------------
def metric(name: str, **labels: str) -> float | None:
    value = REGISTRY.get_sample_value(name, labels)
    return value


async def test_overload_drops_the_most_expensive_rung_and_restores_it(hub: Hub) -> None:
    service = await start_ladder(hub, max_lag_seconds=1.0, restore_lag_seconds=0.5,
                                 restore_after_seconds=0.5, settle_seconds=0.0, restore_load=1.0)
    REGISTRY.register(service.collector)
    try:
        dropped_before = metric("livesrv_ladder_rungs_dropped_total", rung="270p") or 0
        restored_before = metric("livesrv_ladder_rungs_restored_total", rung="270p") or 0
        clip = make_clip("h264", 640, 360, 30, seconds=4, gop_seconds=1)
        stream = hub.start("busy", clip.info, source="rtmp")
        capture = Capture()
        capture.watch(stream)
        # a burst of 4 s of media at once: the encoder is seconds behind the source
        for packet in clip.packets:
            stream.push(packet)
        await wait_for(lambda: (metric("livesrv_ladder_rungs_dropped_total", rung="270p") or 0)
                       > dropped_before)
        assert (metric("livesrv_ladder_rungs_dropped_total", rung="180p") or 0) == 0, \
            "the most expensive rung goes first"
        text = generate_latest(REGISTRY).decode()
        assert 'livesrv_ladder_rungs_active{channel="busy"} 1.0' in text
        await wait_for(lambda: "180p" in stream.renditions, limit=10)
        assert "270p" not in stream.renditions

        # then the source goes on in real time: the ladder keeps up and takes the rung back
        async def realtime() -> None:
            offset = clip.packets[-1].dts + 33
            while True:
                start = asyncio.get_running_loop().time()
                for packet in clip.shifted(offset):
                    delay = start + (packet.dts - offset) / 1000 - asyncio.get_running_loop().time()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    stream.push(packet)
                offset += clip.packets[-1].dts + 33

        feeder = asyncio.get_running_loop().create_task(realtime())
        try:
            await wait_for(lambda: "270p" in stream.renditions, limit=30)
            assert (metric("livesrv_ladder_rungs_restored_total", rung="270p") or 0) > restored_before
            await wait_for(lambda: 'livesrv_ladder_rungs_active{channel="busy"} 2.0'
                           in generate_latest(REGISTRY).decode(), limit=10)
            # the restored rung starts on a source keyframe, so it stays aligned
            restarted = capture.streams["270p"]
            await wait_for(lambda: any(p.kind == "video" for p in capture.packets["270p"]), limit=10)
            first = next(p for p in capture.packets["270p"] if p.kind == "video")
            assert first.keyframe and restarted.info.video is not None
            text = generate_latest(REGISTRY).decode()
            assert 'livesrv_ladder_encode_fps{channel="busy",rung="270p"}' in text
            assert 'livesrv_ladder_lag_seconds{channel="busy",rung="180p"}' in text
        finally:
            feeder.cancel()
        hub.stop(stream)
    finally:
        REGISTRY.unregister(service.collector)
        await service.close()


async def test_a_rung_with_its_own_frame_rate_cap_keeps_keyframes_aligned(hub: Hub) -> None:
    service = await start_ladder(hub, rungs=(SMALL_LADDER[0], {**SMALL_LADDER[1], "max_fps": 15.0}))
    clip = make_clip("h264", 640, 360, 30, seconds=3, gop_seconds=1, audio=False)
    stream = hub.start("slow", clip.info, source="rtmp")
    capture = Capture()
    capture.watch(stream)
    await publish(stream, clip.packets)
    ladder = service.ladder("slow")
    assert ladder is not None
    await wait_caught_up(ladder, last_video_dts(clip))
    hub.stop(stream)
    await service.close()
    fast, slow = capture.video("270p"), capture.video("180p")
    assert capture.streams["180p"].info.video.fps == 15.0  # type: ignore[union-attr]
    assert min(b.dts - a.dts for a, b in itertools.pairwise(slow)) >= 66
    assert len(slow) <= len(fast) // 2 + 2
    fast_keys = [p.dts for p in fast if p.keyframe and p.dts <= slow[-1].dts]
    assert [p.dts for p in slow if p.keyframe] == fast_keys
    frames = decode_video(capture.streams["180p"].info, slow)
    assert {(f.width, f.height) for f in frames} == {(320, 180)}


async def test_hevc_source_gets_h264_rungs(hub: Hub) -> None:
    service = await start_ladder(hub, rungs=(SMALL_LADDER[1],))
    clip = make_clip("hevc", 640, 360, 30, seconds=2, gop_seconds=1)
    stream = hub.start("hevc", clip.info, source="rtmp")
    capture = Capture()
    capture.watch(stream)
    await publish(stream, clip.packets)
    ladder = service.ladder("hevc")
    assert ladder is not None
    await wait_caught_up(ladder, last_video_dts(clip))
    hub.stop(stream)
    await service.close()
    info = capture.streams["180p"].info
    assert info.video is not None and info.video.codec == "h264" and info.audio is clip.info.audio
    video = capture.video("180p")
    assert {(f.width, f.height) for f in decode_video(info, video)} == {(320, 180)}
    assert [p.dts for p in video if p.keyframe] == [k for k in clip.keyframe_dts if k <= video[-1].dts]
