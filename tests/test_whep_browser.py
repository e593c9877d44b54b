"""Chromium (Playwright) plays the watch page over WebRTC (WHEP), not HLS, from a real RTMP
publish to the real server; with ``?hls=1`` the same page plays HLS."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.publish import RtmpPublisher, add_channel
from tests.support.server import REPO, ServerProcess
from tests.test_whep import HOLD_SCRIPT, _live, _server, wait_for

pytestmark = [pytest.mark.browser, pytest.mark.e2e]

CONFIG = """
[ladder]
enabled = false
"""


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, str]]:
    server = _server(tmp_path_factory.mktemp("whep-browser"), CONFIG).start()
    user = add_channel(server, "webrtcanchor")
    pub = RtmpPublisher(server.rtmp_url(user["stream_key"]), width=640, height=360, fps=30).start()
    try:
        assert pub.started.wait(20), pub.error
        wait_for(lambda: _live(server, user["username"]), 20, "the channel to be live")
        yield server, user["username"]
    finally:
        pub.stop()
        server.stop()


def _watch(browser: Any, url: str) -> tuple[dict[str, Any], list[str]]:
    page = browser.new_page()
    requests: list[str] = []
    page.on("request", lambda request: requests.append(request.url))
    try:
        page.goto(url)
        page.wait_for_function("() => window.livesrvPlayer && window.livesrvPlayer.state === 'playing'",
                               timeout=30000)
        start = page.evaluate("() => document.querySelector('#video').currentTime")
        page.wait_for_function(f"() => document.querySelector('#video').currentTime > {start} + 1.5",
                               timeout=30000)
        state = page.evaluate("""(() => {
          const p = window.livesrvPlayer, v = document.querySelector('#video');
          return { engine: p.engine, failure: p.whepFailure, width: v.videoWidth,
                   height: v.videoHeight, webrtc: v.srcObject !== null,
                   connection: p.whep ? p.whep.pc.connectionState : null };
        })()""")
        return state, requests
    finally:
        page.close()


def test_watch_page_plays_over_webrtc(browser: Any, published: tuple[ServerProcess, str]) -> None:
    server, channel = published
    state, requests = _watch(browser, f"{server.url}/watch/{channel}")
    assert state["engine"] == "webrtc" and state["failure"] is None, state
    assert state["webrtc"] and state["connection"] == "connected", state
    assert (state["width"], state["height"]) == (640, 360)
    assert any(f"/whep/{channel}" in url for url in requests)
    assert not [url for url in requests if ".m3u8" in url or ".m4s" in url], "HLS was used"


def test_hls_query_forces_hls(browser: Any, published: tuple[ServerProcess, str]) -> None:
    server, channel = published
    state, requests = _watch(browser, f"{server.url}/watch/{channel}?hls=1")
    assert state["engine"] in ("hls.js", "native") and not state["webrtc"], state
    assert not [url for url in requests if "/whep/" in url]


def test_falls_back_to_hls_when_whep_is_refused(browser: Any, tmp_path: Path) -> None:
    """max_sessions = 1 and one session held (by an aiortc viewer in a process of its own):
    the page's WHEP POST gets 503, and the page plays HLS by itself."""
    server = _server(tmp_path, CONFIG + "\n[webrtc]\nmax_sessions = 1\n").start()
    try:
        user = add_channel(server, "fallback")
        with RtmpPublisher(server.rtmp_url(user["stream_key"]), width=640, height=360, fps=30):
            wait_for(lambda: _live(server, user["username"]), 20, "the channel to be live")
            holder = subprocess.Popen([sys.executable, "-c", HOLD_SCRIPT, server.url, user["username"]],
                                      cwd=REPO, stdout=subprocess.PIPE)
            try:
                line = holder.stdout.readline() if holder.stdout else b""
                assert json.loads(line)["status"] == 201
                state, requests = _watch(browser, f"{server.url}/watch/{user['username']}")
            finally:
                holder.kill()
                holder.wait()
        assert state["engine"] in ("hls.js", "native"), state
        assert "WebRTC viewers" in (state["failure"] or ""), state
        assert any(".m3u8" in url for url in requests)
    finally:
        server.stop()
