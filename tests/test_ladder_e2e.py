"""The ladder end to end: FFmpeg's own RTMP client publishes to the real server (a process) with a
small custom ladder; every rung is served as HLS, decodes at its size with the publisher's frames
in it, and is cut at the same timestamps as the source."""

from __future__ import annotations

import io
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import av
import pytest

from tests.support.publish import (
    RtmpPublisher,
    add_channel,
    http_get,
    parse_media_playlist,
    parse_multivariant,
    read_frame_number,
)
from tests.support.server import ServerProcess

pytestmark = pytest.mark.e2e

CONFIG = """
[hls]
segment_seconds = 1.0
window = 30

[ladder]
[[ladder.rungs]]
name = "270p"
height = 270
video_kbps = 500

[[ladder.rungs]]
name = "180p"
height = 180
video_kbps = 250
"""


@pytest.fixture
def ladder_server(tmp_path: Path) -> Iterator[ServerProcess]:
    config = tmp_path / "livesrv.toml"
    config.write_text(CONFIG)
    proc = ServerProcess(tmp_path / "server", config=str(config))
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


def wait_for(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while (value := predicate()) is None or value is False:
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.2)
    return value


def get(url: str) -> bytes:
    status, _, body = http_get(url)
    assert status == 200, f"GET {url} -> {status}: {body[:200]!r}"
    return body


def test_published_stream_gets_aligned_rungs_over_hls(ladder_server: ServerProcess) -> None:
    user = add_channel(ladder_server, "ladderfan")
    channel = user["username"]
    pub = RtmpPublisher(ladder_server.rtmp_url(user["stream_key"]), width=640, height=360, fps=30,
                        seconds=6, gop_seconds=1.0).start()
    try:
        master_url = f"{ladder_server.url}/live/{channel}/index.m3u8"

        def three_variants() -> list | None:
            status, _, body = http_get(master_url)
            variants = parse_multivariant(body.decode()) if status == 200 else []
            return variants if len(variants) == 3 else None

        variants = wait_for(three_variants, 20, "the source and two rungs in the multivariant playlist")
        assert sorted(v.resolution for v in variants) == [(320, 180), (480, 270), (640, 360)]
        metrics = get(ladder_server.url + "/metrics").decode()
        assert f'livesrv_ladder_rungs_active{{channel="{channel}"}} 2.0' in metrics
        assert f'livesrv_ladder_encode_fps{{channel="{channel}",rung="270p"}}' in metrics
        pub.wait(30)
        assert pub.error is None, repr(pub.error)
    finally:
        pub.stop()

    durations: dict[str, list[float]] = {}
    for variant in variants:
        url = urllib.parse.urljoin(master_url, variant.uri)
        playlist = wait_for(lambda u=url: (p := parse_media_playlist(get(u).decode())).ended and p, 15,
                            f"ENDLIST on {variant.uri}")
        durations[variant.uri] = [s.duration for s in playlist.segments]
        init = get(urllib.parse.urljoin(url, playlist.segments[0].map_uri or ""))
        numbers: list[int] = []
        for segment in playlist.segments:
            data = get(urllib.parse.urljoin(url, segment.uri))
            with av.open(io.BytesIO(init + data), format="mp4") as container:
                frames = list(container.decode(video=0))
            assert frames and frames[0].key_frame, f"{segment.uri} starts with a keyframe"
            assert {(f.width, f.height) for f in frames} == {variant.resolution}
            numbers += [n for f in frames if (n := read_frame_number(f)) is not None]
        # the publisher's own frames, in order, none twice
        assert len(numbers) > 100 and numbers == sorted(set(numbers)), variant.uri
    source, *rungs = sorted(durations.values(), key=len, reverse=True)
    for rung in rungs:
        # cut where the source was cut (the last segment of a rung may end a few frames early)
        assert len(rung) >= 4
        assert rung[:-1] == pytest.approx(source[:len(rung) - 1], abs=0.002)
