"""Thumbnails and a recording of a real RTMP publication (FFmpeg's own client) to the real server
process: the thumbnails are keyframes, the recording holds every frame that was sent."""

from __future__ import annotations

import io
import time
import urllib.request
from pathlib import Path

import av

from tests.support.publish import RtmpPublisher, add_channel, http_get, read_frame_number
from tests.support.server import ServerProcess, get_json, post_json

FPS = 30
GOP_SECONDS = 1.0
PASSWORD = "correct horse battery"


def fetch(url: str, token: str) -> bytes:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.headers["Content-Type"] == "video/mp4"
        return response.read()


def thumb_number(url: str) -> int | None:
    """The publisher's frame number drawn in the thumbnail, or None while there is none."""
    status, headers, body = http_get(url)
    if status != 200:
        return None
    assert headers["content-type"] == "image/jpeg"
    with av.open(io.BytesIO(body), format="mjpeg") as container:
        return read_frame_number(next(container.decode(video=0)))


def test_a_live_channel_gets_keyframe_thumbnails_and_a_whole_recording(tmp_path: Path) -> None:
    config = tmp_path / "livesrv.toml"
    config.write_text("[thumbs]\ninterval_seconds = 1.0\n")
    with ServerProcess(tmp_path / "server", config=str(config)) as server:
        user = add_channel(server, "anchor")
        status, login = post_json(f"{server.url}/api/auth/login",
                                  {"username": "anchor", "password": PASSWORD})
        assert status == 200
        token = login["token"]
        status, switch = post_json(f"{server.url}/api/me/recording", {"enabled": True},
                                   token=token, method="PUT")
        assert status == 200 and switch["enabled"] is True
        thumb_url = f"{server.url}/live/anchor/thumb.jpg"
        assert http_get(thumb_url)[0] == 404

        publisher = RtmpPublisher(server.rtmp_url(user["stream_key"]), fps=FPS, seconds=5,
                                  gop_seconds=GOP_SECONDS).start()
        numbers: list[int] = []
        deadline = time.monotonic() + 20
        while publisher.running and time.monotonic() < deadline:
            number = thumb_number(thumb_url)
            if number is not None and (not numbers or number != numbers[-1]):
                numbers.append(number)
            time.sleep(0.2)
        publisher.wait(20)
        assert publisher.error is None, publisher.error
        # refreshed while live, and only ever from keyframes
        assert len(numbers) >= 2, numbers
        assert numbers == sorted(numbers)
        assert all(n % round(FPS * GOP_SECONDS) == 0 for n in numbers), numbers

        deadline = time.monotonic() + 15
        while True:
            status, items = get_json(f"{server.url}/api/me/recordings", token=token)
            assert status == 200
            if items and not items[0]["active"]:
                break
            assert time.monotonic() < deadline, items
            time.sleep(0.2)
        [item] = items
        data = fetch(server.url + item["url"], token)
        assert len(data) == item["size"]
        drawn = []
        audio_seconds = 0.0
        with av.open(io.BytesIO(data), format="mp4") as container:
            for frame in container.decode(*container.streams):
                if isinstance(frame, av.VideoFrame):
                    drawn.append(read_frame_number(frame))
                else:
                    audio_seconds += frame.samples / frame.sample_rate
        # every frame sent, in order, from the first
        assert drawn == list(range(publisher.frames_sent)), drawn[:5]
        assert abs(audio_seconds - 5) < 0.3
        assert abs(item["duration"] - 5) < 0.2
        # another user sees none of it
        add_channel(server, "mallory")
        _, other = post_json(f"{server.url}/api/auth/login", {"username": "mallory", "password": PASSWORD})
        assert get_json(f"{server.url}/api/me/recordings", token=other["token"]) == (200, [])
        assert get_json(server.url + item["url"], token=other["token"])[0] == 403
