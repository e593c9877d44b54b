"""A recording plays in Chromium's own <video> element, as a plain file (no hls.js), to its end."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from livesrv.config import Settings
from livesrv.http.auth import ACCOUNTS, SESSION_COOKIE
from livesrv.http.media import RECORDINGS
from livesrv.keys import HUB
from tests.support.browser import AppThread
from tests.support.media import make_clip, publish, settle

pytestmark = [pytest.mark.browser]



async def record_a_clip(app: web.Application) -> tuple[str, str]:
    """(session token, recording URL) of a user whose 4 s publication was recorded."""
    accounts = app[ACCOUNTS]
    user, _ = await accounts.create_user("hana", "correct horse battery")
    token = await accounts.create_session(user)
    service = app[RECORDINGS]
    await service.set_enabled("hana", True)
    clip = make_clip("h264", width=320, height=180, seconds=4, gop_seconds=2)
    stream = app[HUB].start("hana", clip.info, source="rtmp")
    await publish(stream, clip.packets)
    app[HUB].stop(stream)
    async with asyncio.timeout(10):
        while service.recorder("hana") is not None or not service.list_files("hana"):
            await settle()
            await asyncio.sleep(0.05)
    return token, f"/recordings/hana/{service.list_files('hana')[0].name}"


def test_a_recording_plays_in_the_browser_from_start_to_end(browser: Any, tmp_path: Path) -> None:
    with AppThread(Settings(data_dir=tmp_path, http="127.0.0.1:0")) as server:
        token, path = server.call(record_a_clip(server.app))
        base = f"http://127.0.0.1:{server.port}"
        context = browser.new_context()
        context.add_cookies([{"name": SESSION_COOKIE, "value": token, "url": base}])
        page = context.new_page()
        try:
            page.goto(base + "/healthz")  # same origin: the session cookie goes with the file
            page.evaluate("""(src) => {
                window.errors = [];
                const video = document.createElement('video');
                video.muted = true;
                video.onerror = () => window.errors.push(video.error && video.error.message);
                video.src = src;
                document.body.appendChild(video);
                window.video = video;
                video.playbackRate = 4;
                video.play().catch((e) => window.errors.push(String(e)));
            }""", path)
            page.wait_for_function("window.video.ended || window.errors.length", timeout=20000)
            assert page.evaluate("window.errors") == []
            assert page.evaluate("window.video.currentTime") == pytest.approx(4.0, abs=0.15)
            assert page.evaluate("[window.video.videoWidth, window.video.videoHeight]") == [320, 180]
        finally:
            context.close()
