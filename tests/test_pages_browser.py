"""The browser app in Chromium over the real server process: home, sign up / log in, the studio
(stream key, RTMP URL, rotation), escaping of hostile titles, and the watch page playing a real
RTMP publish (FFmpeg's client via PyAV) through the HLS packager, from offline to live and back.

Chromium is Debian's (/usr/bin/chromium), never Playwright's download. Screenshots of each page
land in /tmp/livesrv-*.png for a human to look at.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.server import ServerProcess, get_json, post_json

pytestmark = [pytest.mark.browser, pytest.mark.e2e]

PASSWORD = "correct horse battery"
HOSTILE_TITLE = '<script>window.pwned=1</script><img src=x onerror="window.pwned=2"> & "friends"'


@pytest.fixture
def context(browser: Any) -> Iterator[Any]:
    ctx = browser.new_context(viewport={"width": 1280, "height": 760})
    yield ctx
    ctx.close()


def _register(server: ServerProcess, name: str) -> dict[str, Any]:
    """A user through the public API: its token and stream key."""
    status, body = post_json(server.url + "/api/auth/register", {"username": name, "password": PASSWORD})
    assert status == 201, body
    token = body["token"]
    status, me = get_json(server.url + "/api/me", token=token)
    assert status == 200, me
    return {"username": name, "token": token, "stream_key": me["stream_key"]}


def _wait_live(server: ServerProcess, channel: str, publisher: Any, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if publisher.error is not None:
            raise AssertionError(f"publisher failed: {publisher.error!r}\n{server.log()}")
        status, body = get_json(f"{server.url}/api/live/{channel}")
        if status == 200:
            return body
        time.sleep(0.2)
    raise AssertionError(f"{channel} never appeared in /api/live\n{server.log()}")


def _wait_playing(page: Any, timeout_ms: float = 30000, errors_before: int = 0) -> float:
    """Until the video has played over 2 s and keeps advancing, with no fatal hls.js error
    after the first ``errors_before``; returns the time reached."""
    page.wait_for_function(
        "() => { const p = window.livesrvPlayer; return p && p.state === 'playing' &&"
        " p.video.currentTime > 2 && !p.video.paused; }", timeout=timeout_ms)
    first = page.evaluate("() => window.livesrvPlayer.video.currentTime")
    page.wait_for_function(f"() => window.livesrvPlayer.video.currentTime > {first} + 1",
                           timeout=10000)
    errors = page.evaluate("() => window.livesrvPlayer.fatalErrors")
    assert errors[errors_before:] == [], errors
    return page.evaluate("() => window.livesrvPlayer.video.currentTime")


def test_sign_up_studio_rotate_log_in_and_escaping(server: ServerProcess, context: Any) -> None:
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=server.url)
    page = context.new_page()
    page_errors: list[str] = []
    page.on("pageerror", lambda exc: page_errors.append(str(exc)))

    page.goto(server.url + "/")
    empty = page.locator("#empty-state")
    empty.wait_for(state="visible")
    assert "Nobody is live" in empty.inner_text()
    assert page.locator("#channel-grid .card").count() == 0
    page.screenshot(path="/tmp/livesrv-home-empty.png")

    # sign up from the header: lands in the studio
    page.locator(".site-header").get_by_role("link", name="Sign up").click()
    page.wait_for_url("**/login?mode=register*")
    form = page.locator("#form-register")
    form.get_by_label("Username").fill("anchor_ui")
    form.get_by_label("Password").fill(PASSWORD)
    form.get_by_role("button", name="Sign up").click()
    page.wait_for_url(server.url + "/studio")

    me = context.request.get(server.url + "/api/me").json()  # the browser's own session cookie
    key_input = page.locator("#stream-key")
    page.wait_for_function("() => document.querySelector('#stream-key').value !== ''")
    assert key_input.input_value() == me["stream_key"]
    assert key_input.get_attribute("type") == "password"  # hidden until asked for
    assert page.locator("#rtmp-url").input_value() == me["rtmp_url"]
    assert me["rtmp_url"] == f"rtmp://127.0.0.1:{server.rtmp_port}/live"
    page.get_by_role("button", name="Show").click()
    assert key_input.get_attribute("type") == "text"
    page.locator('[data-copy="stream-key"]').click()
    page.wait_for_function("() => document.querySelector('#studio-message').textContent.includes('copied')")
    assert page.evaluate("() => navigator.clipboard.readText()") == me["stream_key"]
    page.screenshot(path="/tmp/livesrv-studio.png", full_page=True)

    # rotate: confirm, and the page shows the key the server now accepts
    page.once("dialog", lambda dialog: dialog.accept())
    page.get_by_role("button", name="Rotate stream key").click()
    page.wait_for_function(f"() => document.querySelector('#stream-key').value !== {me['stream_key']!r}")
    rotated = context.request.get(server.url + "/api/me").json()["stream_key"]
    assert rotated != me["stream_key"] and key_input.input_value() == rotated

    # a hostile title saved through the studio is only ever text
    page.get_by_label("Title").fill(HOSTILE_TITLE)
    page.get_by_role("button", name="Save").click()
    page.wait_for_function("() => document.querySelector('#studio-message').textContent === 'Saved.'")
    page.goto(server.url + "/watch/anchor_ui")
    title = page.locator("#stream-title")
    assert title.inner_text() == HOSTILE_TITLE
    assert title.locator("img, script").count() == 0
    assert page.evaluate("() => window.pwned") is None
    assert page.locator(".overlay-offline").is_visible()  # not live: says so and waits
    assert "is offline" in page.locator(".overlay-offline").inner_text()

    # log out, then log in again through the login page (a wrong password first)
    page.get_by_role("button", name="Log out").click()
    page.wait_for_url(server.url + "/")
    page.locator(".site-header").get_by_role("link", name="Log in").click()
    login = page.locator("#form-login")
    login.get_by_label("Username").fill("anchor_ui")
    login.get_by_label("Password").fill("not the password")
    login.get_by_role("button", name="Log in").click()
    error = login.locator(".form-error")
    error.wait_for(state="visible")
    assert "wrong username or password" in error.inner_text()
    login.get_by_label("Password").fill(PASSWORD)
    login.get_by_role("button", name="Log in").click()
    page.wait_for_url(server.url + "/")
    assert page.locator(".user-chip-name").inner_text().strip() == "anchor_ui"
    assert page_errors == []


def test_watch_page_plays_live_video_and_follows_the_anchor_going_on_and_off(
        server: ServerProcess, context: Any) -> None:
    from tests.support.publish import RtmpPublisher

    user = _register(server, "caster")
    status, _ = post_json(server.url + "/api/me", {"title": HOSTILE_TITLE}, token=user["token"],
                          method="PATCH")
    assert status == 200
    page = context.new_page()
    page_errors: list[str] = []
    page.on("pageerror", lambda exc: page_errors.append(str(exc)))

    # opened while offline: it waits, then starts by itself once the anchor goes live
    page.goto(server.url + "/watch/caster")
    page.locator(".overlay-offline").wait_for(state="visible")
    supported = page.evaluate(
        "() => MediaSource.isTypeSupported('video/mp4; codecs=\"avc1.42E01E,mp4a.40.2\"')")
    assert supported, "this Chromium cannot play H.264/AAC in MSE"

    publisher = RtmpPublisher(server.rtmp_url(user["stream_key"]), codec="h264", width=640,
                              height=360, fps=30, seconds=None)
    publisher.start()
    try:
        _wait_live(server, "caster", publisher)
        _wait_playing(page, timeout_ms=45000)
        # WebRTC first (the source has no B-frames); HLS is the fallback, tested in test_whep_browser
        assert page.evaluate("() => window.livesrvPlayer.engine") == "webrtc"
        assert page.locator("#live-badge").is_visible()
        assert page.locator("#stream-title").inner_text() == HOSTILE_TITLE
        assert page.locator("#unmute").is_visible()  # muted autoplay, one tap from sound
        page.locator("#unmute").click()
        assert page.evaluate("() => window.livesrvPlayer.video.muted") is False
        page.screenshot(path="/tmp/livesrv-watch.png")

        # wide: video and side panel side by side
        video_box = page.locator("#player").bounding_box()
        panel_box = page.locator("#room-panel").bounding_box()
        assert panel_box["x"] >= video_box["x"] + video_box["width"] - 1

        # the home page lists it, with the title as text
        home = context.new_page()
        home.goto(server.url + "/")
        card = home.locator('#channel-grid .card[data-channel="caster"]')
        card.wait_for(state="visible")
        assert card.locator(".card-title").inner_text() == HOSTILE_TITLE
        assert card.locator(".badge-live").inner_text() == "LIVE"
        assert home.evaluate("() => window.pwned") is None
        # no thumbnail yet (or ever, if it 404s): the initial, never a broken image
        home.wait_for_timeout(300)
        placeholder_or_image = home.evaluate(
            "() => { const c = document.querySelector('.card[data-channel=\"caster\"]');"
            " const img = c.querySelector('.thumb-img');"
            " return img.classList.contains('is-loaded') ? img.naturalWidth > 0"
            " : c.querySelector('.thumb-placeholder').textContent; }")
        assert placeholder_or_image in ("C", True)
        home.screenshot(path="/tmp/livesrv-home-live.png")
        home.close()

        # narrow (a phone): the room panel goes below the video
        phone = context.browser.new_context(viewport={"width": 390, "height": 844},
                                            is_mobile=True, has_touch=True)
        try:
            mobile = phone.new_page()
            mobile.goto(server.url + "/watch/caster")
            mobile.wait_for_function("() => window.livesrvPlayer.state === 'playing'", timeout=30000)
            video_box = mobile.locator("#player").bounding_box()
            panel_box = mobile.locator("#room-panel").bounding_box()
            assert panel_box["y"] >= video_box["y"] + video_box["height"] - 1
            assert video_box["width"] == pytest.approx(390, abs=1)
            mobile.screenshot(path="/tmp/livesrv-watch-phone.png")
        finally:
            phone.close()

        # the anchor's studio shows them live, with a preview
        login = context.request.post(server.url + "/api/auth/login",
                                     data={"username": "caster", "password": PASSWORD})
        assert login.ok
        studio = context.new_page()
        studio.goto(server.url + "/studio")
        studio.wait_for_function("() => document.querySelector('#studio-status').textContent"
                                 ".startsWith('Live')", timeout=10000)
        _wait_playing(studio)
        studio.screenshot(path="/tmp/livesrv-studio-live.png", full_page=True)
        studio.close()

        # the anchor stops: the page says offline; they come back: it plays again by itself
        publisher.stop()
        page.locator(".overlay-offline").wait_for(state="visible", timeout=30000)
        # (the playlist's 404 on the way out is a fatal error by design: it says "gone")
        errors_before = page.evaluate("() => window.livesrvPlayer.fatalErrors.length")
        publisher = RtmpPublisher(server.rtmp_url(user["stream_key"]), codec="h264", width=640,
                                  height=360, fps=30, seconds=None)
        publisher.start()
        _wait_live(server, "caster", publisher)
        _wait_playing(page, timeout_ms=45000, errors_before=errors_before)
        # the WebRTC session ended with the first publication, which is no reason to give it
        # up: the new publication plays over WebRTC again
        assert page.evaluate("() => window.livesrvPlayer.engine") == "webrtc"
        assert publisher.error is None
    finally:
        publisher.stop()
    assert page_errors == []
