"""Chromium goes live from the go-live page: its fake camera and microphone are published over
WHIP to the real server (a process), the channel shows up in /api/live, and HLS serves it.

Chromium is launched here rather than through the shared ``browser`` fixture because it needs
two more flags: a fake capture device, and no permission prompt for it.
"""

from __future__ import annotations

import http.client
import urllib.parse
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.browser import CHROMIUM_ARGS, CHROMIUM_LAUNCHER, require_browser
from tests.support.publish import add_channel, http_get, parse_media_playlist, parse_multivariant
from tests.support.server import ServerProcess, get_json
from tests.support.wait import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

FAKE_MEDIA = ["--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"]
PASSWORD = "correct horse battery"


@pytest.fixture(scope="module")
def camera_browser() -> Iterator[Any]:
    require_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM_LAUNCHER, args=[*CHROMIUM_ARGS, *FAKE_MEDIA])
        try:
            yield browser
        finally:
            browser.close()


def live_entry(server: ServerProcess, channel: str) -> dict[str, Any] | None:
    status, items = get_json(server.url + "/api/live")
    assert status == 200, items
    return next((item for item in items if item.get("channel") == channel), None)


def test_go_live_page_publishes_camera_and_microphone(server: ServerProcess, camera_browser: Any) -> None:
    user = add_channel(server, "camanchor", PASSWORD)
    channel = user["username"]
    context = camera_browser.new_context(viewport={"width": 1280, "height": 800})
    try:
        login = context.request.post(server.url + "/api/auth/login",
                                     data={"username": channel, "password": PASSWORD})
        assert login.ok, login.text()
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))

        # the studio links to the go-live page
        page.goto(server.url + "/studio")
        page.locator("#golive-link").click()
        page.wait_for_url("**/golive")
        status = page.locator("#golive-status")
        assert status.get_attribute("data-state") == "idle"

        page.locator("#golive-start").click()
        live_badge = page.locator('#golive-status[data-state="live"]')
        try:
            live_badge.wait_for(timeout=60_000)
        except Exception:
            raise AssertionError(f"the page did not go live: {status.get_attribute('data-state')} "
                                 f"{page.locator('#golive-message').text_content()!r}\n"
                                 f"{server.log()[-3000:]}") from None
        entry = live_entry(server, channel)
        assert entry is not None and entry["source"] == "whip", entry
        assert entry["video"] and entry["video"]["codec"] == "h264", entry
        assert entry["audio"] == {"codec": "opus"}, entry
        assert page.locator("#golive-stop").is_enabled()

        # HLS packages it: the source playlist gets a segment
        master = f"{server.url}/live/{channel}/index.m3u8"
        code, _, body = http_get(master)
        assert code == 200, body
        media_url = urllib.parse.urljoin(master, parse_multivariant(body.decode())[0].uri)

        def has_segment() -> bool:
            code, _, body = http_get(media_url)
            return code == 200 and bool(parse_media_playlist(body.decode()).segments)
        wait_for(has_segment, 40, "an HLS segment of the browser's stream")

        # End stream: the publication ends, the playlist gets ENDLIST
        page.locator("#golive-stop").click()
        wait_for(lambda: live_entry(server, channel) is None, 20, f"{channel} to leave /api/live")
        wait_for(lambda: parse_media_playlist(http_get(media_url)[2].decode()).ended, 20,
                 "#EXT-X-ENDLIST after End stream")
        assert status.get_attribute("data-state") == "ended"
        assert not errors, errors
    finally:
        context.close()


def test_go_live_page_needs_a_login(server: ServerProcess) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=10)
    try:
        connection.request("GET", "/golive")
        response = connection.getresponse()
        assert response.status == 302
        assert response.getheader("Location") == "/login?next=/golive"
    finally:
        connection.close()
