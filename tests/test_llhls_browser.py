"""hls.js in ``lowLatencyMode`` (Chromium) plays the same playlists as Low-Latency HLS: it
follows the parts with blocking reloads and sits at PART-HOLD-BACK behind the live edge.

(tests/test_hls_browser.py plays them with the settings a standard player would use.)
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from livesrv.config import Settings
from tests.support.browser import HLS_JS, AppThread
from tests.support.media import make_clip
from tests.test_hls_browser import publish_in_real_time

pytestmark = [pytest.mark.browser]

LL_PLAYER = """
async (url) => {
  window.errors = [];
  window.partsLoaded = 0;
  window.blockingReloads = 0;
  const video = document.createElement('video');
  video.muted = true;
  document.body.appendChild(video);
  const hls = new Hls({ lowLatencyMode: true });
  window.hls = hls;
  hls.on(Hls.Events.ERROR, (_, data) => { if (data.fatal) window.errors.push(data.details); });
  hls.on(Hls.Events.FRAG_LOADED, (_, data) => { if (data.part) window.partsLoaded++; });
  hls.on(Hls.Events.LEVEL_LOADING, (_, data) => {
    if (/[?&]_HLS_msn=\\d+&_HLS_part=\\d+/.test(data.url)) window.blockingReloads++;
  });
  hls.loadSource(url);
  hls.attachMedia(video);
  hls.on(Hls.Events.MANIFEST_PARSED, () => video.play());
  window.video = video;
}
"""


def test_hls_js_low_latency_mode_follows_parts(browser: Any, tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, http="127.0.0.1:0",
                        tables={"hls": {"segment_seconds": 2.0, "part_seconds": 0.5}})
    # one continuous clip (not a short one looped: each loop leaves a hole in the audio, and
    # hls.js re-fetches the parts before such a hole while it waits for the next part)
    clip = make_clip(width=320, height=180, seconds=10, gop_seconds=1)
    with AppThread(settings) as server:
        publishing = asyncio.run_coroutine_threadsafe(
            publish_in_real_time(server.hub, "lena", clip, loops=1, stop=True), server.loop)
        page = browser.new_page()
        try:
            page.set_content("<!doctype html><title>player</title><body></body>")
            page.add_script_tag(path=str(HLS_JS))
            page.evaluate(LL_PLAYER, f"http://127.0.0.1:{server.port}/live/lena/index.m3u8")
            page.wait_for_function("window.video.currentTime > 4 || window.errors.length", timeout=25000)
            assert page.evaluate("window.errors") == []
            state = page.evaluate("""(() => {
                const d = hls.levels[hls.currentLevel].details;
                return { partTarget: d.partTarget, canBlock: d.canBlockReload,
                         partHoldBack: d.partHoldBack, holdBack: d.holdBack,
                         target: d.targetduration, targetLatency: hls.targetLatency,
                         latency: hls.latency, parts: window.partsLoaded,
                         blocking: window.blockingReloads, played: window.video.currentTime,
                         behindWallClock: (Date.now() - hls.playingDate.getTime()) / 1000 };
            })()""")
            print("hls.js low-latency state:", state)
            assert state["partTarget"] == 0.5 and state["canBlock"] is True
            assert state["target"] == 2 and state["holdBack"] == 6
            # hls.js aims at PART-HOLD-BACK (not HOLD-BACK) in low-latency mode, plus a second
            # per stall it had (at most one target duration), e.g. while it started up...
            assert state["partHoldBack"] == 1.5
            assert 1.5 <= state["targetLatency"] <= 1.5 + state["target"]
            # ...and gets there by loading parts (each once: about two a second of play),
            # announced through blocking reloads
            assert 0 < state["parts"] <= 3 * state["played"] + 8 and state["blocking"] > 0
            # it plays closer to the live edge than a standard player's hold-back, and the
            # program date-time of what it plays agrees with the wall clock
            assert state["latency"] < state["holdBack"]
            assert 0 < state["behindWallClock"] < state["holdBack"]
            publishing.result(30)
        finally:
            page.close()
