"""The watch page's player in Chromium follows Low-Latency HLS by default and plain HLS with
``?ll=0``: one real server process, one real RTMP publish (FFmpeg's client via PyAV), both pages.

A behaviour check, not a latency measurement (that is bench/glass_to_glass.py): in LL mode hls.js
sees the parts (PART-TARGET), loads parts with blocking playlist reloads and aims at
PART-HOLD-BACK; with ``?ll=0`` it loads whole segments only and aims at 3 target durations.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.browser import CHROMIUM_ARGS, CHROMIUM_LAUNCHER
from tests.support.server import ServerProcess, get_json

playwright_sync = pytest.importorskip("playwright.sync_api")

pytestmark = [pytest.mark.browser, pytest.mark.e2e]


PLAYER_STATE = """() => {
  const p = window.livesrvPlayer, hls = p.hls;
  const level = hls && hls.currentLevel >= 0 ? hls.levels[hls.currentLevel] : null;
  const d = level && level.details;
  return { state: p.state, engine: p.engine, lowLatency: p.lowLatency, stats: { ...p.stats },
           fatalErrors: p.fatalErrors, time: p.video.currentTime, paused: p.video.paused,
           hlsLowLatencyMode: hls && hls.config.lowLatencyMode,
           partTarget: d ? d.partTarget : null, partHoldBack: d ? d.partHoldBack : null,
           canBlockReload: d ? d.canBlockReload : null, targetDuration: d ? d.targetduration : null,
           targetLatency: hls ? hls.targetLatency : null };
}"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with playwright_sync.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM_LAUNCHER, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def _wait_live(server: ServerProcess, channel: str, publisher: Any, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if publisher.error is not None:
            raise AssertionError(f"publisher failed: {publisher.error!r}\n{server.log()}")
        if get_json(f"{server.url}/api/live/{channel}")[0] == 200:
            return
        time.sleep(0.2)
    raise AssertionError(f"{channel} never went live\n{server.log()}")


def _play(context: Any, url: str) -> tuple[Any, dict[str, Any]]:
    """Opens ``url`` and waits until the video has played a second and keeps advancing."""
    page = context.new_page()
    page.goto(url)
    page.wait_for_function(
        "() => { const p = window.livesrvPlayer; return p && p.state === 'playing' &&"
        " !p.video.paused && p.video.currentTime > 1; }", timeout=30000)
    first = page.evaluate("() => window.livesrvPlayer.video.currentTime")
    page.wait_for_function(f"() => window.livesrvPlayer.video.currentTime > {first} + 1",
                           timeout=10000)
    return page, page.evaluate(PLAYER_STATE)


def test_watch_page_follows_ll_hls_parts_and_plain_hls_with_ll_0(
        server: ServerProcess, browser: Any) -> None:
    from tests.support.publish import RtmpPublisher

    user = server.add_user("lowlat")
    context = browser.new_context(viewport={"width": 1280, "height": 760})
    page_errors: list[str] = []
    context.on("weberror", lambda error: page_errors.append(str(error.error)))
    publisher = RtmpPublisher(server.rtmp_url(user["stream_key"]), width=640, height=360, fps=30,
                              gop_seconds=1.0, seconds=None)
    publisher.start()
    try:
        _wait_live(server, "lowlat", publisher)

        # HLS (?hls=1: the page plays WebRTC first otherwise): Low-Latency HLS by default,
        # the server's parts, fetched as they are announced
        ll_page, ll = _play(context, f"{server.url}/watch/lowlat?hls=1")
        assert ll["engine"] == "hls.js" and ll["fatalErrors"] == []
        assert ll["lowLatency"] is True and ll["hlsLowLatencyMode"] is True
        assert ll["partTarget"] and ll["partTarget"] > 0 and ll["canBlockReload"] is True
        assert ll["stats"]["parts"] > 0 and ll["stats"]["blockingReloads"] > 0
        # it aims at PART-HOLD-BACK (plus at most a target duration after stalls), not at
        # 3 target durations as a user-set liveSyncDurationCount would make it
        assert ll["partHoldBack"] <= ll["targetLatency"] <= ll["partHoldBack"] + ll["targetDuration"]
        ll_page.close()

        # ?ll=0: whole segments only, 3 target durations behind the edge
        plain_page, plain = _play(context, f"{server.url}/watch/lowlat?ll=0")
        assert plain["engine"] == "hls.js" and plain["fatalErrors"] == []
        assert plain["lowLatency"] is False and plain["hlsLowLatencyMode"] is False
        assert plain["stats"]["parts"] == 0 and plain["stats"]["segments"] > 0
        assert plain["targetLatency"] == 3 * plain["targetDuration"]
        plain_page.close()
        assert page_errors == []
        assert publisher.error is None, publisher.error
    finally:
        publisher.stop()
        context.close()
