"""A real player: hls.js in Chromium plays what the packager makes, across an encoder reconnect.

The app (``create_app``, no RTMP) runs in a thread of its own with packets pushed into its hub
in real time; the page is ``about:blank`` so every HLS request is cross-origin (CORS for real).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from livesrv.config import Settings
from livesrv.hub import Hub
from tests.support.browser import HLS_JS, AppThread
from tests.support.media import Clip, make_clip

pytestmark = [pytest.mark.browser]



async def publish_in_real_time(hub: Hub, channel: str, clip: Clip, loops: int, *, stop: bool) -> None:
    """One publication: the clip ``loops`` times, each packet at its timestamp's wall time; with
    ``stop=False`` it stays live (silent), as an encoder whose connection dropped unnoticed."""
    stream = hub.start(channel, clip.info, source="rtmp")
    loop = asyncio.get_running_loop()
    start = loop.time()
    length = clip.packets[-1].dts + 34
    for round_ in range(loops):
        for packet in clip.shifted(round_ * length):
            delay = start + packet.dts / 1000 - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            stream.push(packet)
    if stop:
        hub.stop(stream)


PLAYER = """
async ([url, lowLatencyMode]) => {
  window.errors = [];
  window.discontinuities = 0;
  const video = document.createElement('video');
  video.muted = true;
  document.body.appendChild(video);
  const hls = new Hls({ liveSyncDurationCount: 2, lowLatencyMode });
  window.hls = hls;
  hls.on(Hls.Events.ERROR, (_, data) => { if (data.fatal) window.errors.push(data.details); });
  hls.on(Hls.Events.FRAG_CHANGED, (_, data) => { window.lastPdt = data.frag.programDateTime; });
  hls.loadSource(url);
  hls.attachMedia(video);
  hls.on(Hls.Events.MANIFEST_PARSED, () => video.play());
  window.video = video;
}
"""


@pytest.mark.parametrize("low_latency", [False, True], ids=["standard", "low-latency"])
def test_hls_js_plays_live_and_through_a_reconnect(browser: Any, tmp_path: Path, low_latency: bool) -> None:
    # the same playlists, played as a player without LL-HLS support does (whole segments) and
    # with hls.js following the parts (its default)
    settings = Settings(data_dir=tmp_path, http="127.0.0.1:0",
                        tables={"hls": {"segment_seconds": 1.0, "linger_seconds": 10}})
    clip = make_clip(width=320, height=180, seconds=2, gop_seconds=1)
    with AppThread(settings) as server:
        first = asyncio.run_coroutine_threadsafe(
            publish_in_real_time(server.hub, "anna", clip, loops=3, stop=False), server.loop)
        page = browser.new_page()
        try:
            page.set_content("<!doctype html><title>player</title><body></body>")
            page.add_script_tag(path=str(HLS_JS))
            page.evaluate(PLAYER, [f"http://127.0.0.1:{server.port}/live/anna/index.m3u8", low_latency])
            page.wait_for_function("window.video.currentTime > 1.5 || window.errors.length", timeout=20000)
            assert page.evaluate("window.errors") == []
            level = page.evaluate("(() => { const l = hls.levels[0];"
                                  " return [l.width, l.height, l.videoCodec, l.audioCodec]; })()")
            assert level[:2] == [320, 180]
            assert level[2].startswith("avc1.") and level[3] == "mp4a.40.2"
            assert page.evaluate("typeof window.lastPdt") == "number"
            first.result(20)
            # the encoder reconnects (a new publication replaces the old one, its timestamps
            # start from 0 again): playback goes on across the discontinuity
            played = page.evaluate("window.video.currentTime")
            second = asyncio.run_coroutine_threadsafe(
                publish_in_real_time(server.hub, "anna", clip, loops=3, stop=True), server.loop)
            page.wait_for_function(f"window.video.currentTime > {played + 3} || window.errors.length",
                                   timeout=20000)
            assert page.evaluate("window.errors") == []
            second.result(20)
            # the publisher stopped: ENDLIST, and the player plays to the end of what it has
            page.wait_for_function("window.video.ended || window.errors.length", timeout=20000)
            assert page.evaluate("window.errors") == []
        finally:
            page.close()
