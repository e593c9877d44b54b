"""Recordings through the real app: the switch over the API, packets pushed into app[HUB], the
file read back over HTTP and decoded with PyAV."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from pathlib import Path

import av
import pytest
from aiohttp.test_utils import TestClient, TestServer

from livesrv.app import create_app
from livesrv.config import Settings
from livesrv.db import Database
from livesrv.http.media import RECORDINGS
from livesrv.keys import HUB
from tests.support.media import Clip, make_clip, publish, settle
from transcode.fmp4 import Fmp4Writer
from transcode.record import RecordingStore, fragmented_duration


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[TestClient]:
    settings = Settings(data_dir=tmp_path, http="127.0.0.1:0", rtmp="127.0.0.1:0")
    async with TestClient(TestServer(create_app(settings, rtmp=False))) as client:
        yield client


async def register(client: TestClient, name: str) -> dict[str, str]:
    response = await client.post("/api/auth/register",
                                 json={"username": name, "password": "correct horse battery"})
    assert response.status == 201, await response.text()
    client.session.cookie_jar.clear()  # who asks is said by the header alone
    return {"Authorization": f"Bearer {(await response.json())['token']}"}


async def recordings(client: TestClient, auth: dict[str, str]) -> list[dict]:
    response = await client.get("/api/me/recordings", headers=auth)
    assert response.status == 200
    return await response.json()


async def wait_until_written(client: TestClient, auth: dict[str, str], count: int) -> list[dict]:
    """The listing once ``count`` recordings exist and none is being written any more."""
    async with asyncio.timeout(10):
        while True:
            items = await recordings(client, auth)
            if len(items) == count and not any(item["active"] for item in items):
                return items
            await asyncio.sleep(0.05)


def decode(data: bytes) -> dict[str, list[int]]:
    """Every frame of a file, decoded from start to end: pts per kind, in decode order."""
    seen: dict[str, list[int]] = {"video": [], "audio": []}
    last_dts: dict[str, int] = {}
    with av.open(io.BytesIO(data), format="mp4") as container:
        for packet in container.demux(*container.streams):
            if packet.dts is None:
                continue  # the demuxer's end-of-stream marker
            kind = packet.stream.type
            assert packet.dts > last_dts.get(kind, -1), f"{kind} decode times must rise"
            last_dts[kind] = packet.dts
            for frame in packet.decode():
                seen[kind].append(frame.pts)
        for stream in container.streams:  # what a decoder still holds at the end
            seen[stream.type].extend(frame.pts for frame in stream.codec_context.decode(None))
    return seen


async def publish_clip(client: TestClient, channel: str, clip: Clip) -> None:
    hub = client.app[HUB]
    stream = hub.start(channel, clip.info, source="rtmp")
    await publish(stream, clip.packets)
    hub.stop(stream)
    await settle()


@pytest.mark.parametrize("codec", ["h264", "hevc"])
async def test_a_publication_is_recorded_whole(client: TestClient, codec: str) -> None:
    alice = await register(client, "alice")
    response = await client.get("/api/me/recording", headers=alice)
    assert (await response.json())["enabled"] is False
    response = await client.put("/api/me/recording", json={"enabled": True}, headers=alice)
    assert response.status == 200 and (await response.json())["enabled"] is True

    clip = make_clip(codec, seconds=4, gop_seconds=2, bframes=2 if codec == "h264" else 0)
    await publish_clip(client, "alice", clip)
    [item] = await wait_until_written(client, alice, 1)
    assert item["url"] == f"/recordings/alice/{item['name']}"
    assert item["duration"] == pytest.approx(4.0, abs=0.1)

    response = await client.get(item["url"], headers=alice)
    assert response.status == 200 and response.headers["Content-Type"] == "video/mp4"
    data = await response.read()
    assert len(data) == item["size"]
    frames = decode(data)
    assert len(frames["video"]) == len(clip.video_packets)
    assert len(frames["audio"]) == len(clip.audio_packets)
    for kind in ("video", "audio"):
        pts = sorted(frames[kind])
        assert len(set(pts)) == len(pts), f"{kind} timestamps repeat"
    assert frames["audio"] == sorted(frames["audio"])  # audio decodes in order

    # a second publication is a second file; the newest is listed first
    await publish_clip(client, "alice", clip)
    items = await wait_until_written(client, alice, 2)
    assert items[0]["started"] >= items[1]["started"] and items[0]["name"] != items[1]["name"]

    metrics = await (await client.get("/metrics")).text()
    assert "livesrv_recording_bytes_total" in metrics and "livesrv_recordings_active 0.0" in metrics


async def test_an_audio_only_publication_is_recorded(client: TestClient) -> None:
    gina = await register(client, "gina")
    await client.put("/api/me/recording", json={"enabled": True}, headers=gina)
    clip = make_clip(None, seconds=2)
    await publish_clip(client, "gina", clip)
    [item] = await wait_until_written(client, gina, 1)
    frames = decode(await (await client.get(item["url"], headers=gina)).read())
    assert frames["video"] == [] and len(frames["audio"]) == len(clip.audio_packets)
    assert item["duration"] == pytest.approx(2.0, abs=0.1)


async def test_recording_off_writes_nothing(client: TestClient, tmp_path: Path) -> None:
    bob = await register(client, "bob")
    await publish_clip(client, "bob", make_clip("h264", seconds=2))
    assert await recordings(client, bob) == []
    # switched on, then off again: still nothing
    await client.put("/api/me/recording", json={"enabled": True}, headers=bob)
    await client.put("/api/me/recording", json={"enabled": False}, headers=bob)
    await publish_clip(client, "bob", make_clip("h264", seconds=2))
    assert await recordings(client, bob) == []
    assert not await asyncio.to_thread(lambda: list(tmp_path.rglob("*.mp4")))


async def test_switching_on_while_live_records_from_the_cached_keyframe(client: TestClient) -> None:
    carol = await register(client, "carol")
    clip = make_clip("h264", seconds=6, gop_seconds=2)
    hub = client.app[HUB]
    stream = hub.start("carol", clip.info, source="rtmp")
    keyframes = clip.keyframe_dts
    await publish(stream, [p for p in clip.packets if p.dts < keyframes[1] + 500])
    response = await client.put("/api/me/recording", json={"enabled": True}, headers=carol)
    assert (await response.json())["recording"] is not None
    await publish(stream, [p for p in clip.packets if p.dts >= keyframes[1] + 500])
    hub.stop(stream)
    [item] = await wait_until_written(client, carol, 1)
    frames = decode(await (await client.get(item["url"], headers=carol)).read())
    # from the second keyframe on, rebased to start at 0
    assert len(frames["video"]) == len([p for p in clip.video_packets if p.dts >= keyframes[1]])
    assert min(frames["video"]) == 0


async def test_only_the_owner_reads_recordings(client: TestClient) -> None:
    alice = await register(client, "alice")
    mallory = await register(client, "mallory")
    await client.put("/api/me/recording", json={"enabled": True}, headers=alice)
    await publish_clip(client, "alice", make_clip("h264", seconds=2))
    [item] = await wait_until_written(client, alice, 1)

    assert (await client.get(item["url"])).status == 401
    response = await client.get(item["url"], headers=mallory)
    assert response.status == 403 and "error" in await response.json()
    assert await recordings(client, mallory) == []
    assert (await client.delete(item["url"], headers=mallory)).status == 403

    for path in ("/recordings/alice/..%2F..%2Flivesrv.db", "/recordings/alice/%2e%2e",
                 "/recordings/alice/../../livesrv.db", "/recordings/..%2Falice/" + item["name"],
                 "/recordings/alice/livesrv.db", "/recordings/alice/20260101T000000Z.mp4"):
        response = await client.get(path, headers=alice)
        assert response.status in (400, 403, 404), path

    # the owner may delete it
    assert (await client.delete(item["url"], headers=alice)).status == 204
    assert await recordings(client, alice) == []


async def test_bad_requests_get_clear_errors(client: TestClient) -> None:
    dave = await register(client, "dave")
    assert (await client.get("/api/me/recording")).status == 401
    for body in ({"enabled": "yes"}, {}, {"enabled": 1}):
        response = await client.put("/api/me/recording", json=body, headers=dave)
        assert response.status == 400 and "enabled" in (await response.json())["error"]
    response = await client.put("/api/me/recording", data=b"not json", headers=dave)
    assert response.status == 400


def test_a_torn_file_still_reads_up_to_its_last_whole_fragment(tmp_path: Path) -> None:
    """What a crash mid-write leaves: a playable file up to the last complete fragment."""
    clip = make_clip("h264", seconds=4, gop_seconds=1)
    writer = Fmp4Writer(clip.info)
    chunks = [writer.init_segment()]
    for packet in clip.packets:
        if packet.kind == "video" and packet.keyframe and packet.dts:
            chunks.append(writer.flush(packet.dts))  # one fragment per second
        writer.add(packet)
    chunks.append(writer.flush(None))
    path = tmp_path / "torn.mp4"
    whole = b"".join(chunks)
    path.write_bytes(whole)
    assert fragmented_duration(path) == pytest.approx(4.0, abs=0.05)
    path.write_bytes(whole[:len(whole) - len(chunks[-1]) // 2])  # the last fragment half written
    assert fragmented_duration(path) == pytest.approx(3.0, abs=0.05)
    # a player gets every frame of the whole fragments, then an error at the torn one
    video = 0
    with av.open(str(path)) as container:
        try:
            for packet in container.demux(video=0):
                video += len(packet.decode())
        except av.error.InvalidDataError:
            pass
    assert video >= 90


async def test_the_switch_is_stored_in_both_dialects(db: Database) -> None:
    store = RecordingStore(db)
    await store.migrate()
    await store.migrate()  # applied once
    assert await store.is_enabled("erin") is False
    await store.set_enabled("erin", True)
    assert await store.is_enabled("erin") is True
    await store.set_enabled("erin", False)
    assert await store.is_enabled("erin") is False


async def test_a_reconnect_and_a_switch_off_each_close_a_file(client: TestClient) -> None:
    frank = await register(client, "frank")
    await client.put("/api/me/recording", json={"enabled": True}, headers=frank)
    clip = make_clip("h264", seconds=4, gop_seconds=2)
    hub = client.app[HUB]
    first = hub.start("frank", clip.info, source="rtmp")
    await publish(first, clip.packets)
    # the encoder reconnects: the new publication replaces the old one, a file each
    second = hub.start("frank", clip.info, source="rtmp")
    await publish(second, clip.packets[:len(clip.packets) // 2])
    async with asyncio.timeout(5):  # the recorder of the new publication has caught up
        while True:
            recording = (await (await client.get("/api/me/recording", headers=frank)).json())["recording"]
            if recording is not None and recording["duration"] > 1.5:
                break
            await asyncio.sleep(0.02)
    response = await client.put("/api/me/recording", json={"enabled": False}, headers=frank)
    assert (await response.json())["recording"] is None
    await publish(second, clip.packets[len(clip.packets) // 2:])  # not recorded any more
    hub.stop(second)
    older, newer = reversed(await wait_until_written(client, frank, 2))
    assert older["duration"] == pytest.approx(4.0, abs=0.1)
    assert 0 < newer["duration"] < 3.0
    for item in (older, newer):
        frames = decode(await (await client.get(item["url"], headers=frank)).read())
        assert frames["video"] and frames["audio"]


async def test_a_file_still_being_written_cannot_be_deleted(client: TestClient) -> None:
    """Not only the live publication's file: a replaced publication's recorder, or a stopping
    one, is still writing its last fragment and syncing, unseen by ``recorder()``."""
    henry = await register(client, "henry")
    await client.put("/api/me/recording", json={"enabled": True}, headers=henry)
    service = client.app[RECORDINGS]
    hub = client.app[HUB]
    clip = make_clip("h264", seconds=4, gop_seconds=2)
    first = hub.start("henry", clip.info, source="rtmp")
    await publish(first, clip.packets)
    async with asyncio.timeout(5):  # the recorder has written its first fragments
        while True:
            recorder = service.recorder("henry")
            if recorder is not None and recorder.bytes_written > 0:
                break
            await asyncio.sleep(0.02)
    url = f"/recordings/henry/{recorder.path.name}"
    # live: refused
    assert (await client.delete(url, headers=henry)).status == 409
    assert service.is_writing(recorder.path)

    # the publisher reconnects: its old publication's recorder still finishes its file, while
    # recorder() already looks past it (its stream ended; the new one is not recorded yet)
    second = hub.start("henry", clip.info, source="rtmp")
    assert service.recorder("henry") is None
    assert service.is_writing(recorder.path)

    # and a recorder being stopped (switch off) is writing until its file is complete
    async with asyncio.timeout(5):  # the new publication's recorder has begun
        while True:
            current = service.recorder("henry")
            if current is not None:
                break
            await asyncio.sleep(0.02)
    current.stop()
    assert service.recorder("henry") is None and service.is_writing(current.path)

    hub.stop(second)
    # the second publication got no media: its file is removed, the first one stays
    [item] = await wait_until_written(client, henry, 1)
    assert item["url"] == url and item["duration"] == pytest.approx(4.0, abs=0.1)
    assert not service.is_writing(recorder.path) and not service.is_writing(current.path)
    assert (await client.delete(url, headers=henry)).status == 204  # done writing: it may go
    assert await recordings(client, henry) == []
