"""WHEP end to end: FFmpeg's own RTMP client publishes to the real server (a process) and an
aiortc client plays the channel over WebRTC, decoding every frame it gets.

Frames carry their number in their pixels (tests/support/publish.py), so "the frames arrive in
order, at the published size" is checked on what the decoder returns. aiortc as a client only
announces H.264 constrained baseline; browsers announce main and high too, and so does this
client (``CLIENT_PROFILES``), as the server must pick the profile from the offer.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

from tests.support.publish import RtmpPublisher, add_channel, read_frame_number
from tests.support.server import REPO, ServerProcess
from tests.support.wait import wait_for
from transcode.webrtc import h264_capability

pytestmark = pytest.mark.e2e

CLIENT_PROFILES = ("main", "high")
CONFIG = """
[ladder]
enabled = false

[webrtc]
session_timeout = 3
"""
BFRAME_CONFIG = """
[ladder]
[[ladder.rungs]]
name = "180p"
height = 180
video_kbps = 300
"""


def offer_profiles() -> None:
    for profile in CLIENT_PROFILES:
        h264_capability(profile)


@dataclass
class Playback:
    status: int
    answer: str = ""
    location: str = ""
    error: dict[str, Any] | None = None
    numbers: list[int] = field(default_factory=list)
    sizes: set[tuple[int, int]] = field(default_factory=set)
    undecodable: int = 0
    picture_types: set[str] = field(default_factory=set)
    audio_frames: int = 0
    audio_rates: set[int] = field(default_factory=set)
    #: the client's peer connection, still open when ``play(delete=False)``
    pc: Any = None


def picture_type(frame: Any) -> str:
    """"I", "P", "B", ... (PyAV gives FFmpeg's AVPictureType, as an int or an enum)."""
    kind = frame.pict_type
    name = getattr(kind, "name", None)
    return name if isinstance(name, str) else {1: "I", 2: "P", 3: "B"}.get(int(kind), str(kind))


async def _offer(pc: RTCPeerConnection, *, audio: bool = True) -> str:
    pc.addTransceiver("video", direction="recvonly")
    if audio:
        pc.addTransceiver("audio", direction="recvonly")
    await pc.setLocalDescription(await pc.createOffer())  # gathers every candidate first
    return pc.localDescription.sdp


async def post_offer(url: str, sdp: str, content_type: str = "application/sdp") -> tuple[int, str, str]:
    async with aiohttp.ClientSession() as http, \
            http.post(url, data=sdp.encode(), headers={"Content-Type": content_type}) as response:
        return response.status, await response.text(), response.headers.get("Location", "")


async def play(base: str, channel: str, *, frames: int = 60, seconds: float = 60,
               delete: bool = True) -> Playback:
    """Play ``channel`` over WHEP until ``frames`` video frames decoded (and some audio).

    With ``delete=False`` the session is left open: the caller closes ``result.pc``."""
    offer_profiles()
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    tracks: list[Any] = []
    pc.on("track", tracks.append)
    keep = False
    try:
        status, body, location = await post_offer(f"{base}/whep/{channel}", await _offer(pc))
        result = Playback(status)
        if status != 201:
            result.error = json.loads(body)
            return result
        result.answer, result.location = body, location
        await pc.setRemoteDescription(RTCSessionDescription(sdp=body, type="answer"))

        async def video(track: Any) -> None:
            while len(result.numbers) < frames:
                frame = await track.recv()
                number = read_frame_number(frame)
                result.sizes.add((frame.width, frame.height))
                result.picture_types.add(picture_type(frame))
                if number is None:
                    result.undecodable += 1
                else:
                    result.numbers.append(number)

        async def audio(track: Any) -> None:
            try:
                while True:
                    frame = await track.recv()
                    result.audio_frames += 1
                    result.audio_rates.add(frame.sample_rate)
            except MediaStreamError:
                pass

        async with asyncio.timeout(seconds):
            while len(tracks) < 2:  # noqa: ASYNC110 - aiortc's track events, polled
                await asyncio.sleep(0.05)
            by_kind = {t.kind: t for t in tracks}
            listener = asyncio.create_task(audio(by_kind["audio"]))
            await video(by_kind["video"])
            while result.audio_frames < 25:  # noqa: ASYNC110 - half a second of 20 ms frames
                await asyncio.sleep(0.05)
            listener.cancel()
        if delete:
            async with aiohttp.ClientSession() as http, http.delete(base + location) as response:
                assert response.status == 200, await response.text()
        else:
            result.pc, keep = pc, True
        return result
    finally:
        if not keep:
            await pc.close()


def metric(server: ServerProcess, name: str) -> float:
    import urllib.request

    with urllib.request.urlopen(server.url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    total = 0.0
    for line in text.splitlines():
        key, _, value = line.rpartition(" ")
        if key == name or key.startswith(name + "{") or ("{" in name and key.startswith(name)):
            total += float(value)
    return total


def _server(tmp_path: Path, config: str) -> ServerProcess:
    path = tmp_path / "livesrv.toml"
    path.write_text(config)
    return ServerProcess(tmp_path / "server", config=str(path))


@pytest.fixture(scope="module")
def whep_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = _server(tmp_path_factory.mktemp("whep"), CONFIG).start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def live_channel(whep_server: ServerProcess) -> Iterator[str]:
    """A channel published for the whole module (no end set: stopped afterwards)."""
    user = add_channel(whep_server, "whepanchor")
    pub = RtmpPublisher(whep_server.rtmp_url(user["stream_key"]), width=640, height=360, fps=30).start()
    try:
        assert pub.started.wait(20), pub.error
        wait_for(lambda: _live(whep_server, user["username"]), 20, "the channel to be live")
        yield user["username"]
    finally:
        pub.stop()


def _live(server: ServerProcess, channel: str) -> bool:
    from tests.support.server import get_json

    status, _ = get_json(f"{server.url}/api/live/{channel}")
    return status == 200


def test_rtmp_publish_plays_over_whep_with_opus(whep_server: ServerProcess, live_channel: str) -> None:
    result = asyncio.run(play(whep_server.url, live_channel, frames=90))
    assert result.status == 201, result.error
    assert result.location.startswith(f"/whep/{live_channel}/")
    assert "H264" in result.answer and "packetization-mode=1" in result.answer
    assert "opus/48000/2" in result.answer
    assert result.sizes == {(640, 360)}
    numbers = result.numbers
    assert len(numbers) == 90 and result.undecodable == 0
    assert all(b > a for a, b in itertools.pairwise(numbers)), numbers
    # frames arrive in order without gaps on loopback (a gap would be a lost or skipped frame)
    assert numbers[-1] - numbers[0] == len(numbers) - 1, numbers
    assert result.audio_frames >= 25 and result.audio_rates == {48000}


def test_delete_ends_the_session(whep_server: ServerProcess, live_channel: str) -> None:
    async def scenario() -> tuple[int, int, float, float]:
        result = await play(whep_server.url, live_channel, frames=10, delete=False)
        assert result.status == 201, result.error
        during = metric(whep_server, "livesrv_webrtc_sessions")
        async with aiohttp.ClientSession() as http:
            async with http.delete(whep_server.url + result.location) as response:
                first = response.status
            async with http.delete(whep_server.url + result.location) as response:
                second = response.status
        return first, second, during, metric(whep_server, "livesrv_webrtc_sessions")

    first, second, during, after = asyncio.run(scenario())
    assert (first, second) == (200, 404)
    assert during >= 1 and after == during - 1
    assert metric(whep_server, "livesrv_webrtc_bytes_out_total") > 0
    assert metric(whep_server, "livesrv_webrtc_session_setup_seconds_count") >= 1


def test_session_that_never_connects_is_reaped(whep_server: ServerProcess, live_channel: str) -> None:
    async def post_and_walk_away() -> str:
        offer_profiles()
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        sdp = await _offer(pc)
        await pc.close()  # never sets the answer: no ICE checks will ever come
        status, body, location = await post_offer(f"{whep_server.url}/whep/{live_channel}", sdp)
        assert status == 201, body
        return location

    location = asyncio.run(post_and_walk_away())
    # session_timeout is 3 s here; ICE may also declare the checks failed first
    wait_for(lambda: asyncio.run(_delete(whep_server.url + location)) == 404, 60,
             "the unconnected session to be reaped")


async def _delete(url: str) -> int:
    async with aiohttp.ClientSession() as http, http.delete(url) as response:
        return response.status


HOLD_SCRIPT = """
import asyncio, sys
from tests.test_whep import hold
asyncio.run(hold(sys.argv[1], sys.argv[2]))
"""


async def hold(base: str, channel: str) -> None:
    """Connect, say so on stdout, then hold the session until killed (for the reaping test)."""
    result = await play(base, channel, frames=5, delete=False)
    print(json.dumps({"status": result.status, "location": result.location}), flush=True)
    await asyncio.sleep(3600)


def test_vanished_peer_is_reaped(whep_server: ServerProcess, live_channel: str) -> None:
    """A viewer killed outright (no DELETE, no DTLS close): ICE consent checks go unanswered
    and the server ends the session (aioice gives up after ~30 s)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD_SCRIPT, whep_server.url, live_channel],
                            cwd=REPO, stdout=subprocess.PIPE, env={**os.environ})
    try:
        line = proc.stdout.readline() if proc.stdout else b""
        held = json.loads(line)
        assert held["status"] == 201
    except Exception:
        proc.kill()
        raise
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    wait_for(lambda: asyncio.run(_delete(whep_server.url + held["location"])) == 404, 90,
             "the vanished viewer's session to be reaped")


def test_sessions_end_with_the_stream(whep_server: ServerProcess) -> None:
    user = add_channel(whep_server, "shortlived")
    channel = user["username"]
    pub = RtmpPublisher(whep_server.rtmp_url(user["stream_key"]), width=320, height=180, fps=30).start()
    try:
        assert pub.started.wait(20), pub.error
        wait_for(lambda: _live(whep_server, channel), 20, "the channel to be live")
    except BaseException:
        pub.stop()
        raise

    async def scenario() -> bool:
        result = await play(whep_server.url, channel, frames=5, delete=False)
        try:
            assert result.status == 201, result.error
            await asyncio.to_thread(pub.stop)
            # the publisher stopped: the server closes the session, not the viewer
            async with asyncio.timeout(30):
                while await _delete(whep_server.url + result.location) != 404:  # noqa: ASYNC110
                    await asyncio.sleep(0.2)
            return True
        finally:
            if result.pc is not None:
                await result.pc.close()

    try:
        assert asyncio.run(scenario())
    finally:
        pub.stop()


@pytest.mark.parametrize(("body", "content_type", "status", "reason"), [
    ("hello", "application/sdp", 400, "malformed"),
    ("", "application/sdp", 400, "empty"),
    ("v=0\r\n", "application/sdp", 400, "no media"),
    ("v=0", "text/plain", 415, "application/sdp"),
])
def test_bad_offers_get_4xx_with_reason(whep_server: ServerProcess, live_channel: str, body: str,
                                        content_type: str, status: int, reason: str) -> None:
    got, text, _ = asyncio.run(post_offer(f"{whep_server.url}/whep/{live_channel}", body, content_type))
    assert got == status and reason in json.loads(text)["error"], text


def test_offer_without_h264_is_refused(whep_server: ServerProcess, live_channel: str) -> None:
    async def vp8_only() -> tuple[int, str]:
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        transceiver = pc.addTransceiver("video", direction="recvonly")
        from aiortc import RTCRtpReceiver

        vp8 = [c for c in RTCRtpReceiver.getCapabilities("video").codecs if c.mimeType == "video/VP8"]
        transceiver.setCodecPreferences(vp8)
        await pc.setLocalDescription(await pc.createOffer())
        status, body, _ = await post_offer(f"{whep_server.url}/whep/{live_channel}", pc.localDescription.sdp)
        await pc.close()
        return status, body

    status, body = asyncio.run(vp8_only())
    assert status == 415 and "no H.264" in json.loads(body)["error"], body


def test_channel_not_live_is_404(whep_server: ServerProcess) -> None:
    async def scenario() -> tuple[int, str]:
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        status, body, _ = await post_offer(f"{whep_server.url}/whep/nobody", await _offer(pc))
        await pc.close()
        return status, body

    status, body = asyncio.run(scenario())
    assert status == 404 and json.loads(body)["error"] == "channel is not live"


def test_patch_and_options(whep_server: ServerProcess) -> None:
    async def scenario() -> tuple[int, int, str]:
        async with aiohttp.ClientSession() as http:
            async with http.patch(f"{whep_server.url}/whep/x/y", data=b"a=candidate") as response:
                patch = response.status
            async with http.options(f"{whep_server.url}/whep/x") as response:
                return patch, response.status, response.headers.get("Access-Control-Allow-Methods", "")

    patch, options, methods = asyncio.run(scenario())
    assert patch == 405 and options == 204 and "POST" in methods


@pytest.mark.parametrize(("codec", "bframes", "why"), [
    ("h264", 2, "B-frames"),
    ("hevc", 0, "HEVC"),
])
def test_source_browsers_cannot_take_gets_the_h264_rung(tmp_path: Path, codec: str, bframes: int,
                                                        why: str) -> None:
    with _server(tmp_path, BFRAME_CONFIG) as server:
        user = add_channel(server, f"rung{codec}")
        channel = user["username"]
        pub = RtmpPublisher(server.rtmp_url(user["stream_key"]), codec=codec, width=640, height=360,
                            fps=30, bframes=bframes).start()
        try:
            assert pub.started.wait(20), pub.error
            wait_for(lambda: _live(server, channel), 20, "the channel to be live")

            def rung_answer() -> Playback | None:
                result = asyncio.run(play(server.url, channel, frames=30))
                if result.status == 409:
                    assert why in (result.error or {}).get("error", ""), result.error
                    return None  # the ladder's rung is not up yet
                return result

            result = wait_for(rung_answer, 60, "a WHEP answer with the ladder's rung")
            assert result.status == 201, result.error
            assert result.sizes == {(320, 180)}, result.sizes
            assert "B" not in result.picture_types and "I" in result.picture_types, result.picture_types
            assert len(result.numbers) == 30 and result.undecodable == 0
            assert all(b > a for a, b in itertools.pairwise(result.numbers))
        finally:
            pub.stop()
