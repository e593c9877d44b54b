"""LL-HLS over HTTP through the real app factory: blocking playlist reloads, blocking
preload-hint GETs, their errors and bounds, with packets pushed into app[HUB] as a publisher
would (paced at their timestamps where the timing matters)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from livesrv.app import create_app
from livesrv.config import Settings
from livesrv.http.hls import HLS
from livesrv.hub import Stream
from livesrv.keys import HUB
from livesrv.media import Packet
from tests.support.media import make_clip, publish, settle
from tests.test_llhls import parse_ll
from transcode.playlist import MediaPlaylist

IMMUTABLE = "public, max-age=31536000, immutable"
URI = "/live/{}/source/index.m3u8"


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[TestClient]:
    # 1 s segments of two 0.5 s parts; a held request gives up after one target duration (1 s)
    settings = Settings(data_dir=tmp_path, http="127.0.0.1:0", rtmp="127.0.0.1:0",
                        tables={"hls": {"segment_seconds": 1.0, "part_seconds": 0.5, "window": 4,
                                        "linger_seconds": 0.5, "blocking_timeout_targets": 1.0,
                                        "max_blocking_requests": 3}})
    async with TestClient(TestServer(create_app(settings, rtmp=False))) as client:
        yield client


def playlist_of(client: TestClient, channel: str) -> MediaPlaylist:
    found = client.app[HLS].channel(channel)
    assert found is not None
    return found.renditions["source"].playlist


async def push_paced(stream: Stream, packets: Sequence[Packet]) -> None:
    """Each packet at its timestamp's wall time after the first one, as an encoder sends."""
    loop = asyncio.get_running_loop()
    start, first = loop.time(), packets[0].dts
    for packet in packets:
        delay = start + (packet.dts - first) / 1000 - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        stream.push(packet)


async def metric(client: TestClient, name: str) -> float:
    text = await (await client.get("/metrics")).text()
    found = re.search(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE)
    assert found is not None, name
    return float(found.group(1))


async def test_blocking_reload_returns_when_the_part_exists(client: TestClient) -> None:
    clip = make_clip(seconds=4, gop_seconds=1)
    stream = client.app[HUB].start("alice", clip.info, source="rtmp")
    packets = list(clip.packets)
    await publish(stream, packets[:100])  # ~1.3 s: a segment and a part or so
    playlist = playlist_of(client, "alice")
    msn, part = playlist.last_part
    wanted = (msn, part + 1)  # the next part (or the next segment's first: "or later")
    request = asyncio.create_task(client.get(f"{URI.format('alice')}?_HLS_msn={wanted[0]}"
                                             f"&_HLS_part={wanted[1]}"))
    await asyncio.sleep(0.05)
    assert not request.done()
    assert await metric(client, "livesrv_llhls_blocking_requests") == 1
    rest = packets[100:]
    for index, packet in enumerate(rest):
        # still held right up to the packet that completes the part...
        assert not request.done(), f"answered before the part existed ({index} packets on)"
        await push_paced(stream, [packet])
        await settle()
        if playlist.has_reached(*wanted):
            break
    else:
        pytest.fail("the part never came")
    # ...and answered right after it
    response = await asyncio.wait_for(request, 1)
    assert response.status == 200
    assert response.headers["Cache-Control"].startswith("public, max-age=")
    media = parse_ll(await response.text())
    positions = [(media["sequence"] + i, j) for i, s in enumerate(media["segments"])
                 for j, _ in enumerate(s["parts"])]
    assert max(positions) >= wanted
    assert await metric(client, "livesrv_llhls_blocking_requests") == 0
    assert await metric(client, "livesrv_llhls_parts_total") >= len(positions)
    # a reload for what already exists is answered at once, as is a plain one (no-cache)
    response = await asyncio.wait_for(client.get(f"{URI.format('alice')}?_HLS_msn={msn}"), 1)
    assert response.status == 200
    plain = await client.get(URI.format("alice"))
    assert plain.headers["Cache-Control"] == "no-cache"
    assert "#EXT-X-PRELOAD-HINT:TYPE=PART" in await plain.text()


async def test_bad_and_far_future_reloads_are_answered_at_once(client: TestClient) -> None:
    clip = make_clip(seconds=4, gop_seconds=1)
    stream = client.app[HUB].start("bob", clip.info, source="rtmp")
    await publish(stream, clip.packets[:130])
    playlist = playlist_of(client, "bob")
    last = playlist.last_part[0]  # the open segment (it has parts): the playlist's last
    uri = URI.format("bob")
    for query in (f"_HLS_msn={last + 3}", f"_HLS_msn={last + 3}&_HLS_part=0", "_HLS_part=1",
                  "_HLS_msn=-1", "_HLS_msn=x", f"_HLS_msn={last}&_HLS_part=1.5", "_HLS_msn=" + "9" * 30):
        response = await asyncio.wait_for(client.get(f"{uri}?{query}"), 0.5)
        assert response.status == 400, query
        assert response.headers["Cache-Control"] == "no-store"
        assert response.headers["Access-Control-Allow-Origin"] == "*"
        assert "error" in await response.json()
    assert await metric(client, "livesrv_llhls_blocking_requests") == 0


async def test_a_held_reload_times_out_with_503(client: TestClient) -> None:
    clip = make_clip(seconds=4, gop_seconds=1)
    stream = client.app[HUB].start("carol", clip.info, source="rtmp")
    await publish(stream, clip.packets[:130])
    playlist = playlist_of(client, "carol")
    # two segments past the last is allowed (held), but the publisher has gone quiet
    response = await client.get(f"{URI.format('carol')}?_HLS_msn={playlist.last_part[0] + 2}")
    assert response.status == 503
    assert response.headers["Retry-After"] == "1" and response.headers["Cache-Control"] == "no-store"
    assert await metric(client, "livesrv_llhls_blocking_requests") == 0


async def test_held_requests_are_capped(client: TestClient) -> None:
    clip = make_clip(seconds=4, gop_seconds=1)
    stream = client.app[HUB].start("dave", clip.info, source="rtmp")
    packets = list(clip.packets)
    await publish(stream, packets[:70])
    playlist = playlist_of(client, "dave")
    msn, part = playlist.last_part
    held = [asyncio.create_task(client.get(f"{URI.format('dave')}?_HLS_msn={msn}&_HLS_part={part + 1}"))
            for _ in range(3)]
    await asyncio.sleep(0.05)
    assert not any(task.done() for task in held)
    # the server holds three at most (max_blocking_requests): the fourth is refused at once
    over = await asyncio.wait_for(client.get(f"{URI.format('dave')}?_HLS_msn={msn + 1}"), 0.5)
    assert over.status == 503 and "too many" in (await over.json())["error"]
    await push_paced(stream, packets[70:130])
    responses = await asyncio.wait_for(asyncio.gather(*held), 1)
    assert [r.status for r in responses] == [200, 200, 200]
    # one wake-up, one rendering: every held request got the same playlist
    assert len({await r.read() for r in responses}) == 1


async def test_preload_hint_get_is_held_until_the_part_exists(client: TestClient) -> None:
    clip = make_clip(seconds=4, gop_seconds=1)
    stream = client.app[HUB].start("erin", clip.info, source="rtmp")
    packets = list(clip.packets)
    await publish(stream, packets[:130])  # ~1.7 s: one segment (closed with the next one's first part)
    playlist = playlist_of(client, "erin")
    media = parse_ll(await (await client.get(URI.format("erin"))).text())
    hint = media["preload_hint"]["URI"]
    base = "/live/erin/source/"
    request = asyncio.create_task(client.get(base + hint))
    # the part after the hinted one is not known yet: 404 at once, not held
    number = int(hint.rsplit(".p", 1)[1].removesuffix(".m4s"))
    beyond = hint.replace(f".p{number}.", f".p{number + 1}.")
    assert (await asyncio.wait_for(client.get(base + beyond), 0.5)).status == 404
    await asyncio.sleep(0.05)
    assert not request.done()
    for packet in packets[130:]:
        assert not request.done()
        await push_paced(stream, [packet])
        await settle()
        if playlist.file(hint) is not None:
            break
    response = await asyncio.wait_for(request, 1)
    assert response.status == 200
    assert response.headers["Cache-Control"] == IMMUTABLE
    assert response.headers["Content-Type"] == "video/mp4"
    body = await response.read()
    assert body == bytes(playlist.file(hint)) and body[4:8] == b"moof"
    # once its segment is complete, the segment URL serves exactly its parts' bytes
    await publish(stream, packets[len(packets) // 2:])
    media = parse_ll(await (await client.get(URI.format("erin"))).text())
    for segment in (s for s in media["segments"] if "uri" in s and s["parts"]):
        whole = await (await client.get(base + segment["uri"])).read()
        parts = [await (await client.get(base + p["URI"])).read() for p in segment["parts"]]
        assert b"".join(parts) == whole


async def test_ending_answers_every_held_request(client: TestClient) -> None:
    clip = make_clip(seconds=4, gop_seconds=1)
    hub = client.app[HUB]
    stream = hub.start("frank", clip.info, source="rtmp")
    await publish(stream, clip.packets[:80])
    playlist = playlist_of(client, "frank")
    hint = playlist.preload_hint
    msn = playlist.next_sequence + 1
    reload = asyncio.create_task(client.get(f"{URI.format('frank')}?_HLS_msn={msn}"))
    part = asyncio.create_task(client.get(f"/live/frank/source/{hint}"))
    await asyncio.sleep(0.05)
    assert not reload.done() and not part.done()
    hub.stop(stream)  # the last part is cut: the hinted one exists after all
    reload_response, part_response = await asyncio.wait_for(asyncio.gather(reload, part), 1)
    assert reload_response.status == 200 and "#EXT-X-ENDLIST" in await reload_response.text()
    assert part_response.status == 200
    # ended: nothing is hinted, and a request for a part after the last one is not held
    assert playlist.preload_hint is None
    number = int(hint.rsplit(".p", 1)[1].removesuffix(".m4s"))
    after = hint.replace(f".p{number}.", f".p{number + 1}.")
    assert (await asyncio.wait_for(client.get(f"/live/frank/source/{after}"), 0.5)).status == 404


async def test_rendition_reports_name_the_other_renditions(client: TestClient) -> None:
    source, low = make_clip(seconds=4, gop_seconds=1), make_clip(width=160, height=90, seconds=4,
                                                                  gop_seconds=1)
    stream = client.app[HUB].start("gina", source.info, source="rtmp")
    rung = stream.add_rendition("90p", low.info)
    for a, b in zip(source.packets[:200], low.packets[:200], strict=True):
        stream.push(a)
        rung.push(b)
        await asyncio.sleep(0)
    await settle()
    media = parse_ll(await (await client.get(URI.format("gina"))).text())
    low_playlist = client.app[HLS].channel("gina").renditions["90p"].playlist
    [report] = media["reports"]
    assert report["URI"] == "../90p/index.m3u8"
    assert (int(report["LAST-MSN"]), int(report["LAST-PART"])) == low_playlist.last_part
    other = parse_ll(await (await client.get("/live/gina/90p/index.m3u8")).text())
    assert [r["URI"] for r in other["reports"]] == ["../source/index.m3u8"]
