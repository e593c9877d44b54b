"""Chat on the watch page in Chromium over the real server process: a logged-in sender and an
anonymous viewer on a live channel. The sender's message reaches the viewer's list and flies as
danmaku; the danmaku switch hides it (and is remembered); hostile text stays text; the page
reconnects (resuming after the last id) when the server restarts, and a socket that keeps
failing leaves the page working and retrying.

Screenshots land in /tmp/livesrv-chat-*.png for a human to look at.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.server import ServerProcess, get_json, post_json

pytestmark = [pytest.mark.browser, pytest.mark.e2e]

PASSWORD = "correct horse battery"
HOSTILE = '<img src=x onerror="window.pwned=1"><script>window.pwned=2</script> & "quotes"'
CHAT_TEXTS = "() => Array.from(document.querySelectorAll('#room-feed .chat-text'), n => n.textContent)"
DANMAKU_TEXTS = "() => Array.from(document.querySelectorAll('.danmaku-item'), n => n.textContent)"


def _register(server: ServerProcess, name: str) -> dict[str, Any]:
    status, body = post_json(server.url + "/api/auth/register", {"username": name, "password": PASSWORD})
    assert status == 201, body
    status, me = get_json(server.url + "/api/me", token=body["token"])
    assert status == 200, me
    return {"username": name, "token": body["token"], "stream_key": me["stream_key"]}


def _page(context: Any, errors: list[str]) -> Any:
    page = context.new_page()
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    return page


def _wait_text(page: Any, text: str, timeout: float = 15000) -> None:
    page.wait_for_function(f"(t) => ({CHAT_TEXTS})().includes(t)", arg=text, timeout=timeout)


def _send(page: Any, text: str) -> None:
    box = page.locator("#room-input")
    box.fill(text)
    box.press("Enter")


@pytest.fixture
def contexts(browser: Any) -> Iterator[tuple[Any, Any]]:
    sender = browser.new_context(viewport={"width": 1280, "height": 760})
    viewer = browser.new_context(viewport={"width": 1280, "height": 760})
    yield sender, viewer
    sender.close()
    viewer.close()


def test_chat_and_danmaku_between_a_sender_and_a_guest(server: ServerProcess,
                                                         contexts: tuple[Any, Any]) -> None:
    from tests.support.publish import RtmpPublisher

    anchor = _register(server, "roomhost")
    _register(server, "talker")
    sender_ctx, viewer_ctx = contexts
    assert sender_ctx.request.post(server.url + "/api/auth/login",
                                   data={"username": "talker", "password": PASSWORD}).ok
    errors: list[str] = []

    publisher = RtmpPublisher(server.rtmp_url(anchor["stream_key"]), width=320, height=180,
                              fps=15, seconds=None)
    publisher.start()
    try:
        for _ in range(150):  # live before the pages open (a live channel's watch page)
            if get_json(f"{server.url}/api/live/roomhost")[0] == 200:
                break
            assert publisher.error is None, publisher.error
            time.sleep(0.2)
        else:
            raise AssertionError(f"roomhost never went live\n{server.log()}")

        viewer = _page(viewer_ctx, errors)
        viewer.goto(server.url + "/watch/roomhost")
        sender = _page(sender_ctx, errors)
        sender.goto(server.url + "/watch/roomhost")

        # a guest reads but cannot send: a "log in to chat" link back to this page instead
        login = viewer.locator("#room-login")
        login.wait_for(state="visible")
        assert login.get_attribute("href") == "/login?next=%2Fwatch%2Froomhost"
        assert viewer.locator("#room-input").is_disabled()

        # the logged-in sender's box opens once the socket is up; Enter sends
        sender.wait_for_function("() => !document.querySelector('#room-input').disabled", timeout=15000)
        assert sender.locator("#room-login").count() == 0
        _send(sender, "hello room")
        _wait_text(viewer, "hello room")
        _wait_text(sender, "hello room")
        assert sender.locator("#room-input").input_value() == ""
        assert viewer.locator("#room-feed .chat-item", has_text="hello room").locator(
            ".chat-user").inner_text().startswith("talker")
        viewer.wait_for_function(f"() => ({DANMAKU_TEXTS})().includes('hello room')", timeout=5000)
        flying = viewer.locator(".danmaku-item", has_text="hello room")
        assert flying.is_visible()
        # it flies over the video, right to left
        video = viewer.locator("#player").bounding_box()
        item = flying.bounding_box()
        assert video["y"] <= item["y"] <= video["y"] + video["height"]
        viewer.wait_for_function(
            "(x) => { const n = Array.from(document.querySelectorAll('.danmaku-item'))"
            ".find(n => n.textContent === 'hello room');"
            " return !n || n.getBoundingClientRect().x < x - 20; }", arg=item["x"], timeout=5000)
        viewer.screenshot(path="/tmp/livesrv-chat-viewer.png")

        # the viewer count is the room's: both pages are in it
        viewer.wait_for_function(
            "() => document.querySelector('#viewer-count').textContent === '2 viewers'", timeout=15000)
        assert viewer.locator("#viewer-count").is_visible()

        # the switch hides danmaku, says so, and is remembered across a reload
        toggle = viewer.locator("#danmaku-toggle")
        assert toggle.get_attribute("aria-pressed") == "true"
        toggle.click()
        assert toggle.get_attribute("aria-pressed") == "false"
        assert viewer.locator(".danmaku-layer").is_hidden()
        assert viewer.locator(".danmaku-item").count() == 0
        viewer.reload()
        assert viewer.locator("#danmaku-toggle").get_attribute("aria-pressed") == "false"
        assert viewer.locator(".danmaku-layer").is_hidden()
        _wait_text(viewer, "hello room")  # history replayed to the rejoining viewer

        # a hostile message is text in the list (and nowhere else); no danmaku while hidden
        _send(sender, HOSTILE)
        _wait_text(viewer, HOSTILE)
        assert viewer.locator("#room-feed img, #room-feed script").count() == 0
        assert viewer.locator(".danmaku-item").count() == 0
        assert viewer.evaluate("() => window.pwned") is None
        # ...and text in the sender's danmaku too
        sender.wait_for_function(f"(t) => ({DANMAKU_TEXTS})().includes(t)", arg=HOSTILE, timeout=5000)
        assert sender.locator(".danmaku-layer img, .danmaku-layer script").count() == 0
        assert sender.evaluate("() => window.pwned") is None

        # turned back on, new messages fly again
        viewer.locator("#danmaku-toggle").click()
        assert viewer.locator(".danmaku-layer").is_visible()
        _send(sender, "back on")
        viewer.wait_for_function(f"() => ({DANMAKU_TEXTS})().includes('back on')", timeout=15000)

        # the server restarts: both pages say so, reconnect by themselves and chat goes on
        server.stop()
        viewer.locator("#room-status").wait_for(state="visible", timeout=15000)
        assert "Reconnecting" in viewer.locator("#room-status").inner_text()
        server.start()
        sender.wait_for_function("() => !document.querySelector('#room-input').disabled", timeout=45000)
        viewer.locator("#room-status").wait_for(state="hidden", timeout=45000)
        _send(sender, "after restart")
        _wait_text(viewer, "after restart", timeout=20000)
        texts = viewer.evaluate(CHAT_TEXTS)
        assert len(texts) == len(set(texts)), texts  # a resume shows nothing twice
        viewer.screenshot(path="/tmp/livesrv-chat-after-restart.png")
    finally:
        publisher.stop()
    assert errors == []


def test_a_failing_room_socket_leaves_the_page_working_and_retrying(
        server: ServerProcess, contexts: tuple[Any, Any]) -> None:
    _register(server, "quiet")
    _, viewer_ctx = contexts
    attempts: list[str] = []

    def refuse(ws: Any) -> None:
        attempts.append(ws.url)
        ws.close(code=1011, reason="down")

    errors: list[str] = []
    page = _page(viewer_ctx, errors)
    page.route_web_socket(re.compile(r".*/ws/rooms/.*"), refuse)
    page.goto(server.url + "/watch/quiet")
    status = page.locator("#room-status")
    status.wait_for(state="visible", timeout=15000)
    assert "Reconnecting" in status.inner_text()
    # it retries by itself (the first retry comes about a second later)
    deadline = time.monotonic() + 15
    while len(attempts) < 2 and time.monotonic() < deadline:
        page.wait_for_timeout(200)
    assert len(attempts) >= 2, attempts
    assert all(a.endswith("/ws/rooms/quiet") for a in attempts)
    # the rest of the page is unharmed: offline overlay, the danmaku switch still works
    page.locator(".overlay-offline").wait_for(state="visible")
    page.locator("#danmaku-toggle").click()
    assert page.locator("#danmaku-toggle").get_attribute("aria-pressed") == "false"
    assert errors == []


def test_batches_history_gifts_errors_dom_cap_scrolling_and_resume(
        server: ServerProcess, contexts: tuple[Any, Any]) -> None:
    """The page's side of the room protocol, with the socket played by the test (Playwright's
    WebSocket routing) so that batches, gifts and refusals come exactly when wanted; the page,
    its modules and the server around them are the real ones."""
    import json

    _register(server, "busy")
    _, viewer_ctx = contexts
    sockets: list[Any] = []

    def chat(i: int) -> dict[str, Any]:
        return {"type": "chat", "id": f"{i:06d}", "user": f"user{i}", "text": f"message {i}", "ts": i}

    def accept(ws: Any) -> None:
        sockets.append(ws)
        if len(sockets) == 1:
            ws.send(json.dumps({"type": "history", "events": [chat(i) for i in range(1, 4)]}))

    errors: list[str] = []
    page = _page(viewer_ctx, errors)
    page.route_web_socket(re.compile(r".*/ws/rooms/.*"), accept)
    page.goto(server.url + "/watch/busy")
    _wait_text(page, "message 3")
    assert page.locator(".danmaku-item").count() == 0  # history is listed, not flown
    assert page.locator(".room-placeholder").count() == 0

    ws = sockets[0]
    events: list[dict[str, Any]] = [chat(i) for i in range(4, 254)]
    events.append({"type": "gift", "id": "g1", "user": "fan", "gift": "rose", "count": 3, "ts": 1})
    events.append({"type": "viewers", "count": 1234})
    ws.send(json.dumps({"type": "batch", "events": events}))
    _wait_text(page, "message 253")
    assert page.locator("#room-feed > li").count() == 200  # the DOM is capped
    gift = page.locator("#room-feed .chat-gift")
    assert gift.locator(".chat-user").inner_text() == "fan"
    assert gift.locator(".chat-text").inner_text() == "sent rose \u00d73"
    assert page.locator("#viewer-count").text_content() == "1.2K viewers"
    assert page.locator("#viewer-count").is_hidden()  # offline: watch.js shows no count
    at_bottom = ("() => { const f = document.querySelector('#room-feed');"
                 " return f.scrollHeight - f.scrollTop - f.clientHeight < 2; }")
    assert page.evaluate(at_bottom)  # followed the newest message
    assert 0 < page.locator(".danmaku-item").count() <= 40  # busy: capped on screen

    # scrolled up to read: new messages do not yank the list down
    page.evaluate("() => { document.querySelector('#room-feed').scrollTop = 0; }")
    ws.send(json.dumps(chat(254)))
    _wait_text(page, "message 254")
    assert page.evaluate("() => document.querySelector('#room-feed').scrollTop") == 0

    # a duplicate (an overlapping resume) is dropped; a refusal is shown, the room stays open
    ws.send(json.dumps(chat(254)))
    ws.send(json.dumps({"type": "error", "code": "slow_mode", "message": "slow down"}))
    page.locator("#room-status").wait_for(state="visible")
    assert "Slow mode" in page.locator("#room-status").inner_text()
    assert page.evaluate(f"() => ({CHAT_TEXTS})().filter(t => t === 'message 254').length") == 1
    ws.send("not json")  # garbage and unknown types must not break it either
    ws.send(json.dumps({"type": "something_new"}))

    # the server drops the socket: the page comes back resuming after the last chat id it saw
    ws.close(code=1001, reason="restart")
    deadline = time.monotonic() + 20
    while len(sockets) < 2 and time.monotonic() < deadline:
        page.wait_for_timeout(200)
    assert len(sockets) == 2
    assert sockets[1].url.endswith("/ws/rooms/busy?since=000254"), sockets[1].url
    assert errors == []
