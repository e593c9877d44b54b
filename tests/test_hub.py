"""The hub: one publisher, many consumers, each with its own bounded queue."""

from __future__ import annotations

import asyncio

from livesrv.hub import Hub
from livesrv.media import Packet, StreamInfo, Track

INFO = StreamInfo(video=Track("video", "h264", extradata=b"\x01avcC"),
                  audio=Track("audio", "aac", extradata=b"\x12\x10"))


def gop(start: int, frames: int, *, audio_every: int = 0) -> list[Packet]:
    """One GOP of video (keyframe first) at 30 fps, with an audio packet every ``audio_every``."""
    packets = []
    for i in range(frames):
        ts = (start + i) * 33
        packets.append(Packet("video", ts, ts, i == 0, b"v%d" % (start + i)))
        if audio_every and i % audio_every == 0:
            packets.append(Packet("audio", ts, ts, True, b"a%d" % (start + i)))
    return packets


async def test_every_consumer_gets_every_packet_in_order() -> None:
    hub = Hub()
    stream = hub.start("alice", INFO, source="rtmp")
    subs = [stream.subscribe(f"c{i}") for i in range(3)]
    sent = gop(0, 30, audio_every=2)
    for packet in sent:
        stream.push(packet)
    for sub in subs:
        assert sub.drain() == sent
    assert stream.consumers == 3 and stream.packets_in == len(sent)


async def test_a_late_joiner_starts_at_the_cached_keyframe() -> None:
    hub = Hub()
    stream = hub.start("alice", INFO, source="rtmp")
    for packet in gop(0, 30) + gop(30, 10, audio_every=3):
        stream.push(packet)
    late = stream.subscribe("late")
    queued = late.drain()
    assert queued[0].keyframe and queued[0].data == b"v30"  # the last GOP, from its keyframe
    assert queued == gop(30, 10, audio_every=3)


async def test_a_gop_longer_than_the_queue_starts_the_joiner_at_the_next_keyframe() -> None:
    # its tail would begin mid-GOP: undecodable, so nothing of it is queued
    hub = Hub()
    stream = hub.start("alice", INFO, source="rtmp")
    for packet in gop(0, 300, audio_every=1):  # 600 packets in one GOP
        stream.push(packet)
    small = stream.subscribe("small", maxsize=100)
    assert len(small) == 0
    stream.push(Packet("video", 10_000, 10_000, False, b"mid-gop"))
    stream.push(Packet("audio", 10_000, 10_000, True, b"audio-before-keyframe"))
    assert len(small) == 0
    for packet in gop(400, 5, audio_every=1):
        stream.push(packet)
    assert small.drain() == gop(400, 5, audio_every=1)


async def test_a_joiner_before_the_first_keyframe_waits_for_it() -> None:
    hub = Hub()
    stream = hub.start("alice", INFO, source="rtmp")
    early = stream.subscribe("early")
    stream.push(Packet("video", 0, 0, False, b"leading non-keyframe"))
    for packet in gop(1, 3):
        stream.push(packet)
    assert [p.data for p in early.drain()] == [b"v1", b"v2", b"v3"]


async def test_a_slow_consumer_skips_to_the_next_keyframe_and_never_slows_the_others() -> None:
    hub = Hub()
    stream = hub.start("alice", INFO, source="rtmp")
    slow = stream.subscribe("slow", maxsize=40)  # room for one 30-packet GOP, not two
    fast = stream.subscribe("fast", maxsize=10_000)
    sent = gop(0, 30) + gop(30, 30) + gop(60, 30)
    for packet in sent:
        stream.push(packet)
    assert fast.drain() == sent  # unaffected
    # overflowing at v40 dropped what it held and everything up to the next keyframe, v60
    assert slow.drain() == gop(60, 30)
    assert slow.dropped == 60


async def test_get_waits_for_packets_and_returns_none_when_the_stream_ends() -> None:
    hub = Hub()
    stream = hub.start("alice", INFO, source="rtmp")
    sub = stream.subscribe("reader")
    received: list[Packet] = []

    async def read() -> None:
        async for packet in sub:
            received.append(packet)

    reader = asyncio.create_task(read())
    await asyncio.sleep(0)
    for packet in gop(0, 3):
        stream.push(packet)
    await asyncio.sleep(0)
    hub.stop(stream)
    await asyncio.wait_for(reader, 2)
    assert received == gop(0, 3)
    assert hub.get("alice") is None and stream.ended


async def test_a_new_publish_replaces_the_running_one_and_tells_its_publisher() -> None:
    hub = Hub()
    ended: list[str] = []
    hub.add_listener(on_end=lambda s: ended.append(s.end_reason))
    replaced: list[bool] = []
    first = hub.start("alice", INFO, source="rtmp", on_replaced=lambda: replaced.append(True))
    second = hub.start("alice", INFO, source="rtmp")
    assert first.ended and first.end_reason == "replaced" and replaced == [True]
    assert hub.get("alice") is second and ended == ["replaced"]
    hub.stop(first)  # the old publisher's late stop must not end the new publication
    assert hub.get("alice") is second and not second.ended


async def test_renditions_end_with_their_source_and_listeners_hear_of_them() -> None:
    hub = Hub()
    stream = hub.start("alice", INFO, source="rtmp")
    seen: list[str] = []
    stream.watch_renditions(lambda child: seen.append(child.rendition))
    rung = stream.add_rendition("360p", StreamInfo(video=Track("video", "h264"), audio=None))
    assert seen == ["360p"] and stream.renditions == {"360p": rung}
    hub.close()
    assert stream.ended and rung.ended and hub.streams() == []


async def test_shutting_the_app_down_ends_every_stream_even_without_rtmp(tmp_path) -> None:
    from aiohttp.test_utils import TestClient, TestServer

    from livesrv.app import create_app
    from livesrv.config import load_settings
    from livesrv.keys import HUB

    app = create_app(load_settings(env={}, data_dir=str(tmp_path)), rtmp=False)
    async with TestClient(TestServer(app)):
        stream = app[HUB].start("alice", INFO, source="whip")
        assert not stream.ended
    assert stream.ended and stream.end_reason == "shutdown"
