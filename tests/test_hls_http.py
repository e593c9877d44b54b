"""HLS over HTTP through the real app factory: packets pushed into app[HUB], a player's requests."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urljoin

import av
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from livesrv.app import create_app
from livesrv.config import ConfigError, Settings
from livesrv.http import hls as hls_http
from livesrv.keys import HUB, SETTINGS
from tests.support.media import make_clip, parse_media, publish, settle

PLAYLIST = "application/vnd.apple.mpegurl"
IMMUTABLE = "public, max-age=31536000, immutable"


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[TestClient]:
    settings = Settings(data_dir=tmp_path, http="127.0.0.1:0", rtmp="127.0.0.1:0",
                        tables={"hls": {"window": 3, "grace_segments": 1, "linger_seconds": 0.5,
                                        "first_segment_wait_seconds": 2.0}})
    app = create_app(settings, rtmp=False)
    async with TestClient(TestServer(app)) as client:
        yield client


async def get_ok(client: TestClient, path: str, content_type: str) -> bytes:
    response = await client.get(path)
    assert response.status == 200, await response.text()
    assert response.headers["Content-Type"] == content_type
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    expected_cache = "no-cache" if content_type == PLAYLIST else IMMUTABLE
    assert response.headers["Cache-Control"] == expected_cache
    return await response.read()


async def assert_not_found(client: TestClient, path: str) -> None:
    response = await client.get(path)
    assert response.status == 404, path
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    assert "error" in await response.json()


async def test_a_player_fetches_and_decodes_everything(client: TestClient) -> None:
    await assert_not_found(client, "/live/nobody/index.m3u8")
    await assert_not_found(client, "/live/nobody/source/index.m3u8")
    clip = make_clip(seconds=6)
    hub = client.app[HUB]
    stream = hub.start("alice", clip.info, source="rtmp")

    # a player that arrives with the stream: its media playlist request waits for a segment
    master = (await get_ok(client, "/live/alice/index.m3u8", PLAYLIST)).decode()
    media_uri = urljoin("/live/alice/index.m3u8", master.splitlines()[-1])
    assert media_uri == "/live/alice/source/index.m3u8"
    waiting = asyncio.create_task(client.get(media_uri))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    await publish(stream, clip.packets)
    response = await waiting
    assert response.status == 200

    hub.stop(stream)
    await settle()
    media = parse_media((await get_ok(client, media_uri, PLAYLIST)).decode())
    assert media["ended"] and len(media["segments"]) == 3
    init = await get_ok(client, urljoin(media_uri, media["segments"][0]["map"]), "video/mp4")
    segments = [await get_ok(client, urljoin(media_uri, s["uri"]), "video/mp4") for s in media["segments"]]
    frames = {"video": 0, "audio": 0}
    with av.open(io.BytesIO(init + b"".join(segments)), format="mp4") as container:
        for frame in container.decode(*container.streams):
            frames["video" if isinstance(frame, av.VideoFrame) else "audio"] += 1
    assert frames == {"video": len(clip.video_packets), "audio": len(clip.audio_packets)}
    master = (await get_ok(client, "/live/alice/index.m3u8", PLAYLIST)).decode()
    assert 'CODECS="avc1.' in master and "RESOLUTION=320x180" in master

    # the ended channel lingers, then 404s, its files too
    await asyncio.sleep(0.7)
    await assert_not_found(client, "/live/alice/index.m3u8")
    await assert_not_found(client, media_uri)
    await assert_not_found(client, urljoin(media_uri, media["segments"][0]["uri"]))


async def test_old_segments_404_and_bad_names(client: TestClient) -> None:
    clip = make_clip(seconds=4, gop_seconds=1, audio=False)
    hub = client.app[HUB]
    stream = hub.start("bob", clip.info, source="rtmp")
    for loop in range(3):  # 12 s: five 2 s segments cut
        await publish(stream, clip.shifted(loop * 4000))
    media_uri = "/live/bob/source/index.m3u8"
    media = parse_media((await get_ok(client, media_uri, PLAYLIST)).decode())
    assert media["sequence"] == 2 and len(media["segments"]) == 3
    pub = media["segments"][0]["uri"].rsplit("-", 1)[0]
    await get_ok(client, f"/live/bob/source/{pub}-1.m4s", "video/mp4")  # the grace segment
    await assert_not_found(client, f"/live/bob/source/{pub}-0.m4s")
    await assert_not_found(client, "/live/bob/source/nope.m4s")
    await assert_not_found(client, "/live/bob/720p/index.m3u8")
    await assert_not_found(client, f"/live/bob/720p/{pub}-2.m4s")
    assert (await client.get("/live/bob/source/..%2F..%2Fetc.m4s")).status == 404
    metrics = await (await client.get("/metrics")).text()
    assert 'livesrv_hls_segments_total{rendition="source"}' in metrics
    assert "livesrv_hls_held_bytes" in metrics


async def test_media_playlist_gives_up_waiting(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, tables={"hls": {"first_segment_wait_seconds": 0.1}})
    async with TestClient(TestServer(create_app(settings, rtmp=False))) as client:
        client.app[HUB].start("carol", make_clip(seconds=2).info, source="rtmp")
        response = await client.get("/live/carol/source/index.m3u8")
        assert response.status == 503 and response.headers["Retry-After"] == "1"


def test_bad_hls_settings_fail_when_the_app_is_built(tmp_path: Path) -> None:
    # (on a bare app: a create_app that fails half-way would leave ops' collector registered)
    app = web.Application()
    app[SETTINGS] = Settings(data_dir=tmp_path, tables={"hls": {"window": 0}})
    with pytest.raises(ConfigError, match="hls"):
        hls_http.setup(app)
