"""Thumbnails through the real app: packets pushed into app[HUB], thumb.jpg fetched over HTTP."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TypeVar

import av
import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import REGISTRY

from livesrv.app import create_app
from livesrv.config import ConfigError, Settings
from livesrv.hub import Hub
from livesrv.keys import HUB
from livesrv.media import Packet
from tests.support.media import Clip, make_clip, publish, settle
from transcode.decoders import DECODERS
from transcode.thumbs import ThumbnailService, ThumbSettings, scaled_size

INTERVAL = 0.3
T = TypeVar("T")


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[TestClient]:
    settings = Settings(data_dir=tmp_path, http="127.0.0.1:0", rtmp="127.0.0.1:0",
                        tables={"thumbs": {"interval_seconds": INTERVAL, "width": 160}})
    async with TestClient(TestServer(create_app(settings, rtmp=False))) as client:
        yield client


def decode_jpeg(data: bytes) -> av.VideoFrame:
    assert data[:3] == b"\xff\xd8\xff", "not a JPEG"
    with av.open(io.BytesIO(data), format="mjpeg") as container:
        return next(container.decode(video=0))


def luma(frame: av.VideoFrame, width: int, height: int) -> bytes:
    return bytes(frame.reformat(width=width, height=height, format="gray").planes[0])


def keyframe_pictures(clip: Clip, width: int, height: int) -> dict[int, bytes]:
    """Each keyframe of the clip decoded on its own, as a small gray picture, by pts."""
    pictures = {}
    for packet in clip.video_packets:
        if not packet.keyframe:
            continue
        decoder = av.CodecContext.create(DECODERS[clip.info.video.codec], "r")
        decoder.extradata = clip.info.video.extradata
        frames = decoder.decode(av.Packet(packet.data)) + decoder.decode(None)
        pictures[packet.pts] = luma(frames[-1], width, height)
    return pictures


def closest_keyframe(thumb: av.VideoFrame, pictures: dict[int, bytes], width: int,
                     height: int) -> int:
    mine = luma(thumb, width, height)
    return min(pictures, key=lambda pts: sum(abs(a - b) for a, b in zip(mine, pictures[pts],
                                                                          strict=True)))


async def until(predicate: Callable[[], T | None], seconds: float = 5.0) -> T:
    """``predicate()``'s value once it has one (polled: the service has no event to wait on)."""
    async with asyncio.timeout(seconds):
        while True:
            value = predicate()
            if value is not None:
                return value
            await asyncio.sleep(0.02)


async def wait_for_thumb(client: TestClient, channel: str, *, not_etag: str | None = None
                         ) -> ClientResponse:
    """The thumbnail response once there is one (different from ``not_etag`` if given)."""
    async with asyncio.timeout(10):
        while True:
            response = await client.get(f"/live/{channel}/thumb.jpg")
            if response.status == 200 and response.headers["ETag"] != not_etag:
                return response
            await response.release()
            await asyncio.sleep(0.05)


@pytest.mark.parametrize("codec", ["h264", "hevc", "av1"])
async def test_thumbnail_follows_later_keyframes(client: TestClient, codec: str) -> None:
    clip = make_clip(codec, width=320, height=180, seconds=6, gop_seconds=2)
    response = await client.get("/live/alice/thumb.jpg")
    assert response.status == 404 and "error" in await response.json()

    stream = client.app[HUB].start("alice", clip.info, source="rtmp")
    keyframes = clip.keyframe_dts
    first_gop = [p for p in clip.packets if p.dts < keyframes[1]]
    await publish(stream, first_gop)
    first = await wait_for_thumb(client, "alice")
    assert first.headers["Content-Type"] == "image/jpeg"
    assert first.headers["Cache-Control"] in ("no-cache", "public, max-age=0")
    image = decode_jpeg(await first.read())
    assert (image.width, image.height) == (160, 90)  # [thumbs] width, 16:9 kept
    pictures = keyframe_pictures(clip, 80, 45)
    assert closest_keyframe(image, pictures, 80, 45) == keyframes[0]

    # unchanged: a revalidation is answered 304 without a body
    etag = first.headers["ETag"]
    again = await client.get("/live/alice/thumb.jpg", headers={"If-None-Match": etag})
    assert again.status == 304 and again.headers["ETag"] == etag

    # the rest of the clip: after the interval the thumbnail comes from a later keyframe
    await publish(stream, [p for p in clip.packets if p.dts >= keyframes[1]])
    later = await wait_for_thumb(client, "alice", not_etag=etag)
    later_image = decode_jpeg(await later.read())
    assert closest_keyframe(later_image, pictures, 80, 45) > keyframes[0]

    metrics = await (await client.get("/metrics")).text()
    assert "livesrv_thumbnails_total" in metrics
    assert "livesrv_thumbnail_decode_seconds_count" in metrics

    client.app[HUB].stop(stream)
    await settle()
    response = await client.get("/live/alice/thumb.jpg")
    assert response.status == 404
    assert (await response.json())["error"] == "channel is not live"


async def test_a_broken_keyframe_is_no_crash_and_the_next_one_works() -> None:
    clip = make_clip("h264", seconds=4, gop_seconds=2)
    hub = Hub()
    service = ThumbnailService(hub, ThumbSettings(interval_seconds=0.1, width=160))
    service.start()
    try:
        stream = hub.start("bob", clip.info, source="rtmp")
        stream.push(Packet("video", 0, 0, True, b"\x00\x00\x00\x05garbage"))
        await asyncio.sleep(0.3)
        assert service.get("bob") is None
        await publish(stream, clip.shifted(100))
        thumb = await until(lambda: service.get("bob"))
        assert decode_jpeg(thumb.jpeg).width == 160
    finally:
        await service.close()


async def test_an_odd_portrait_source_keeps_its_aspect() -> None:
    clip = make_clip("h264", width=180, height=320, seconds=2, audio=False)
    hub = Hub()
    service = ThumbnailService(hub, ThumbSettings(interval_seconds=1, width=640))
    service.start()
    try:
        stream = hub.start("carol", clip.info, source="rtmp")
        await publish(stream, clip.packets)
        image = decode_jpeg((await until(lambda: service.get("carol"))).jpeg)
        assert (image.width, image.height) == (180, 320)  # never upscaled
    finally:
        await service.close()
    assert scaled_size(1920, 1080, 640) == (640, 360)
    assert scaled_size(1280, 536, 640) == (640, 268)


def test_bad_settings_are_refused(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, tables={"thumbs": {"interval_seconds": 0}})
    with pytest.raises(ConfigError, match="interval_seconds"):
        create_app(settings, rtmp=False)


async def test_a_busy_worker_skips_a_thumbnail_instead_of_queueing_it() -> None:
    clip = make_clip("h264", seconds=2, audio=False)
    hub = Hub()
    service = ThumbnailService(hub, ThumbSettings(interval_seconds=60, workers=1))
    service.start()
    skipped = REGISTRY.get_sample_value("livesrv_thumbnails_skipped_total") or 0
    try:
        first = hub.start("ann", clip.info, source="rtmp")
        second = hub.start("ben", clip.info, source="rtmp")
        # both keyframes arrive together: one decode runs, the other is skipped
        first.push(clip.packets[0])
        second.push(clip.packets[0])
        await until(lambda: service.get("ann") or service.get("ben"))
        await asyncio.sleep(0.2)
        assert (service.get("ann") is None) != (service.get("ben") is None)
        assert REGISTRY.get_sample_value("livesrv_thumbnails_skipped_total") == skipped + 1
    finally:
        await service.close()
