"""RTMP ingest inside the real server process: keys come from the accounts store."""

from __future__ import annotations

import asyncio

import pytest

from ingest.rtmp.chunks import AUDIO, VIDEO
from ingest.rtmp.client import RtmpPublishError, open_publisher
from tests.support.server import ServerProcess, get_json

pytestmark = pytest.mark.e2e

AVCC = bytes.fromhex("0164000dffe100186764000dacd94141fa10000003001000000303c0f1429960010006"
                     "68ebe3cb22c0fdf8f800")
ASC = bytes((0x11, 0x90))  # AAC LC 48 kHz stereo


async def test_publish_with_a_users_key_goes_live(server: ServerProcess) -> None:
    user = await asyncio.to_thread(server.add_user, "carol")
    with pytest.raises(RtmpPublishError):
        async with asyncio.timeout(15):
            await open_publisher("127.0.0.1", server.rtmp_port, "not-" + user["stream_key"])

    async with asyncio.timeout(15):
        pub = await open_publisher("127.0.0.1", server.rtmp_port, user["stream_key"] + "?client=test")
    pub.send_metadata({"videocodecid": 7.0, "audiocodecid": 10.0, "width": 320.0, "height": 240.0,
                       "framerate": 30.0})
    pub.send_media(VIDEO, 0, bytes((0x17, 0, 0, 0, 0)) + AVCC)
    pub.send_media(AUDIO, 0, b"\xaf\x00" + ASC)
    for frame in range(10):
        ts = frame * 33
        pub.send_media(VIDEO, ts, bytes((0x17 if frame == 0 else 0x27, 1, 0, 0, 0)) + b"\0\0\0\2\x65\x88")
        pub.send_media(AUDIO, ts, b"\xaf\x01" + bytes(20))
    await pub.drain()

    async with asyncio.timeout(15):
        while True:
            status, live = await asyncio.to_thread(get_json, server.url + "/api/live")
            if status == 200 and any(item["channel"] == "carol" for item in live):
                break
            await asyncio.sleep(0.1)
    status, metrics = await asyncio.to_thread(_text, server.url + "/metrics")
    assert "livesrv_rtmp_connections 1.0" in metrics
    assert 'livesrv_rtmp_rejected_total{reason="bad_key"} 1.0' in metrics

    await pub.close()
    async with asyncio.timeout(15):
        while True:
            status, live = await asyncio.to_thread(get_json, server.url + "/api/live")
            if not any(item["channel"] == "carol" for item in live):
                break
            await asyncio.sleep(0.1)
    assert "publishing carol (h264 320x240 + aac 48000 Hz)" in server.log()
    assert "refused: wrong stream key" in server.log()


def _text(url: str) -> tuple[int, str]:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status, response.read().decode()
