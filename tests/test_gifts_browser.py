"""Coins and gifts on the watch page in Chromium over the real server process (embedded
defaults: SQLite and the sandbox payment provider, which confirms a recharge at once).

A viewer recharges through the dialog and sends gifts; the anchor's page (another browser
context) shows the banner and the leaderboard lists the viewer; a gift the coins do not cover
says so and opens the recharge dialog; a guest is asked to log in. A lost response is retried
with the same idempotency key and credits or charges once. The animations' rules (combos merged,
a bounded queue, the big animation, reduced motion, history not animated) are checked with the
room socket played by the test, and a server without the wallet API leaves the page working.

Screenshots land in /tmp/livesrv-gifts-*.png for a human to look at.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.server import ServerProcess, get_json, post_json

pytestmark = [pytest.mark.browser, pytest.mark.e2e]

PASSWORD = "correct horse battery"
GIFT_TEXTS = "() => Array.from(document.querySelectorAll('#room-feed .chat-gift'), n => n.textContent)"
BANNERS = ("() => Array.from(document.querySelectorAll('.gift-banner'), n => ({"
           " user: n.querySelector('.gift-banner-user').textContent,"
           " what: n.querySelector('.gift-banner-what').textContent,"
           " combo: n.querySelector('.gift-banner-combo').textContent }))")


def _register(server: ServerProcess, name: str) -> dict[str, Any]:
    status, body = post_json(server.url + "/api/auth/register", {"username": name, "password": PASSWORD})
    assert status == 201, body
    return {"username": name, "token": body["token"]}


def _login(context: Any, server: ServerProcess, name: str) -> None:
    response = context.request.post(server.url + "/api/auth/login",
                                    data={"username": name, "password": PASSWORD})
    assert response.ok, response.text()


def _page(context: Any, errors: list[str]) -> Any:
    page = context.new_page()
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    return page


def _balance(server: ServerProcess, token: str) -> int:
    status, wallet = get_json(server.url + "/api/wallet", token=token)
    assert status == 200, wallet
    return wallet["balance"]


def _top_coins(server: ServerProcess, channel: str, above: int = 0) -> int:
    """The first all-time gifter's coins once they exceed `above` (the server keeps a
    leaderboard in memory for about a second, so a just-sent gift may take that long)."""
    deadline = time.monotonic() + 20
    while True:
        status, board = get_json(f"{server.url}/api/rooms/{channel}/leaderboard?scope=all")
        assert status == 200, board
        entries = board["entries"]
        if entries and entries[0]["coins"] > above:
            assert entries[0]["user"] == "fan", entries
            return entries[0]["coins"]
        assert time.monotonic() < deadline, f"the leaderboard never passed {above}: {board}"
        time.sleep(0.2)


def _animation(page: Any, css_class: str) -> str:
    """The CSS animation an element of `css_class` gets in the gift layer (a probe, so the
    answer does not depend on how long a real banner has been on screen)."""
    return page.evaluate(
        "(c) => { const n = document.createElement('div'); n.className = c;"
        " document.querySelector('.gift-layer').append(n);"
        " const name = getComputedStyle(n).animationName; n.remove(); return name; }", css_class)


def _wait_socket(page: Any) -> None:
    """A logged-in page's chat box opens once its room socket is up (events from then on reach it)."""
    page.wait_for_function("() => !document.querySelector('#room-input').disabled", timeout=20000)


def _lose_first_response(page: Any, pattern: str, bodies: list[dict[str, Any]]) -> None:
    """The first request to `pattern` reaches the server but its answer is lost on the way back
    (as on a flaky phone network); later ones pass. Every request body is recorded."""
    def handle(route: Any) -> None:
        bodies.append(json.loads(route.request.post_data or "null"))
        if len(bodies) == 1:
            route.fetch()  # the server does the work...
            route.abort("connectionreset")  # ...and the page never hears about it
        else:
            route.continue_()

    page.route(pattern, handle)


@pytest.fixture
def contexts(browser: Any) -> Iterator[tuple[Any, Any, Any]]:
    made = [browser.new_context(viewport={"width": 1280, "height": 800}) for _ in range(3)]
    yield tuple(made)
    for context in made:
        context.close()


def test_recharge_send_gifts_banner_leaderboard_402_and_guest(
        server: ServerProcess, contexts: tuple[Any, Any, Any]) -> None:
    anchor = _register(server, "giftee")
    fan = _register(server, "fan")
    fan_ctx, anchor_ctx, guest_ctx = contexts
    _login(fan_ctx, server, "fan")
    _login(anchor_ctx, server, "giftee")
    errors: list[str] = []

    # the anchor watches their own room: earnings instead of a send button
    anchor_page = _page(anchor_ctx, errors)
    anchor_page.goto(server.url + "/watch/giftee")
    anchor_page.locator("#gift-bar").wait_for(state="visible", timeout=20000)
    anchor_page.locator("#coin-earnings").wait_for(state="visible")
    assert anchor_page.locator("#gift-send-row").is_hidden() and anchor_page.locator("#gift-list").is_hidden()
    _wait_socket(anchor_page)

    viewer = _page(fan_ctx, errors)
    viewer.goto(server.url + "/watch/giftee")
    viewer.locator("#gift-bar").wait_for(state="visible", timeout=20000)
    viewer.locator("#coin-balance").wait_for(state="visible")
    assert viewer.locator("#coin-amount").inner_text() == "0"
    assert viewer.locator("#gift-login").is_hidden()
    names = viewer.locator(".gift-item .gift-name").all_inner_texts()
    assert "Rose" in names and "Heart" in names and "Rocket" in names, names

    # recharge through the dialog; the first answer is lost and the page retries with the SAME
    # key, so the package is credited once
    recharges: list[dict[str, Any]] = []
    _lose_first_response(viewer, "**/api/wallet/recharge", recharges)
    viewer.locator("#recharge-open").click()
    dialog = viewer.locator("#recharge-dialog")
    dialog.wait_for(state="visible")
    package = viewer.locator(".package", has_text="300 coins")
    package.wait_for(state="visible")
    package.click()
    viewer.locator("#recharge-pay").click()
    dialog.wait_for(state="hidden", timeout=20000)
    viewer.wait_for_function("() => document.querySelector('#coin-amount').textContent === '300'",
                             timeout=20000)
    assert len(recharges) == 2, recharges
    assert recharges[0] == recharges[1] and recharges[0]["idempotency_key"], recharges
    assert _balance(server, fan["token"]) == 300

    # a second recharge is a new order (a fresh key), through the keyboard this time
    viewer.unroute("**/api/wallet/recharge")
    viewer.locator("#recharge-open").focus()
    viewer.keyboard.press("Enter")
    dialog.wait_for(state="visible")
    viewer.locator(".package input").first.focus()  # 60 coins, the first package
    viewer.keyboard.press("Space")
    viewer.locator("#recharge-pay").focus()
    viewer.keyboard.press("Enter")
    dialog.wait_for(state="hidden", timeout=20000)
    viewer.wait_for_function("() => document.querySelector('#coin-amount').textContent === '360'",
                             timeout=20000)

    # send 10 hearts (5 coins each); the first answer is lost, the retry reuses the key
    sends: list[dict[str, Any]] = []
    _lose_first_response(viewer, "**/api/rooms/giftee/gifts", sends)
    viewer.locator(".gift-item", has_text="Heart").click()
    assert viewer.locator(".gift-item", has_text="Heart").get_attribute("aria-pressed") == "true"
    viewer.locator("#gift-count").select_option("10")
    viewer.locator("#gift-send").click()
    viewer.wait_for_function("() => document.querySelector('#coin-amount').textContent === '310'",
                             timeout=20000)
    assert "Sent Heart" in viewer.locator("#gift-status").inner_text()
    assert len(sends) == 2 and sends[0] == sends[1], sends
    assert sends[0]["gift"] == "heart" and sends[0]["count"] == 10
    assert _balance(server, fan["token"]) == 310

    # the anchor's page: the banner slides in over the video, and the gift is in the chat list
    # (one check in the page: a banner is on screen for seconds, not forever)
    anchor_page.wait_for_function(
        "() => Array.from(document.querySelectorAll('.gift-banner')).some(n => {"
        " const video = document.querySelector('#player').getBoundingClientRect();"
        " const box = n.getBoundingClientRect();"
        " return n.querySelector('.gift-banner-user').textContent === 'fan'"
        " && n.querySelector('.gift-banner-what').textContent === 'sent Heart'"
        " && n.querySelector('.gift-banner-combo').textContent === 'x10'"
        " && box.top >= video.top && box.bottom <= video.bottom; })", timeout=20000)
    anchor_page.screenshot(path="/tmp/livesrv-gifts-anchor.png")
    anchor_page.wait_for_function(f"() => ({GIFT_TEXTS})().some(t => t.includes('Heart'))", timeout=20000)
    status, wallet = get_json(server.url + "/api/wallet", token=anchor["token"])
    assert status == 200 and wallet["earnings"] > 0, wallet
    # the anchor's earnings follow the gifts on their page
    anchor_page.wait_for_function(
        "(e) => document.querySelector('#coin-earnings').textContent"
        ".startsWith(`Earned ${e.toLocaleString()} `)",
        arg=wallet["earnings"], timeout=20000)

    # the leaderboard tab (offline channel: all time first); keyboard moves between the tabs
    tab = anchor_page.locator("#tab-top")
    assert tab.is_visible()
    anchor_page.locator("#tab-chat").focus()
    anchor_page.keyboard.press("ArrowRight")
    assert tab.get_attribute("aria-selected") == "true"
    assert anchor_page.locator("#room-chat").is_hidden()
    board = anchor_page.locator("#leaderboard .rank-item")
    board.first.wait_for(state="visible", timeout=20000)
    assert board.first.locator(".rank-user").inner_text() == "fan"
    assert anchor_page.locator("[data-scope=all]").get_attribute("aria-pressed") == "true"
    # a new gift refreshes the shown list by itself
    before = _top_coins(server, "giftee")
    viewer.unroute("**/api/rooms/giftee/gifts")
    viewer.locator(".gift-item", has_text="Rose").click()
    viewer.locator("#gift-count").select_option("1")
    viewer.locator("#gift-send").click()
    viewer.wait_for_function("() => document.querySelector('#coin-amount').textContent === '309'",
                             timeout=20000)
    coins = _top_coins(server, "giftee", above=before)
    anchor_page.wait_for_function(
        "(c) => { const n = document.querySelector('#leaderboard .rank-coins');"
        " return n && n.getAttribute('title').startsWith(c.toLocaleString() + ' '); }",
        arg=coins, timeout=20000)
    anchor_page.screenshot(path="/tmp/livesrv-gifts-leaderboard.png")
    # this live: the channel is offline, nobody has gifted during a live
    anchor_page.locator("[data-scope=live]").click()
    anchor_page.locator("#leaderboard-empty").wait_for(state="visible", timeout=20000)
    assert anchor_page.locator("#leaderboard .rank-item").count() == 0
    anchor_page.locator("#tab-chat").click()
    assert anchor_page.locator("#room-feed").is_visible()

    # more than the coins cover: the page says so and opens the recharge dialog; nothing is spent
    viewer.locator(".gift-item", has_text="Rocket").click()
    viewer.locator("#gift-send").click()
    status_line = viewer.locator("#gift-status")
    viewer.wait_for_function(
        "() => document.querySelector('#gift-status').textContent.includes('Not enough coins')",
        timeout=20000)
    assert "is-error" in (status_line.get_attribute("class") or "")
    assert "It costs 5,000 coins" in status_line.inner_text()  # the server's "needed"
    dialog.wait_for(state="visible")
    viewer.screenshot(path="/tmp/livesrv-gifts-402.png")
    viewer.keyboard.press("Escape")
    dialog.wait_for(state="hidden")
    assert _balance(server, fan["token"]) == 309
    assert viewer.locator("#coin-amount").inner_text() == "309"

    # a guest sees the gifts and the leaderboard, and a login link instead of a wallet
    guest = _page(guest_ctx, errors)
    guest.goto(server.url + "/watch/giftee")
    login = guest.locator("#gift-login")
    login.wait_for(state="visible", timeout=20000)
    assert login.get_attribute("href") == "/login?next=%2Fwatch%2Fgiftee"
    assert guest.locator("#gift-send").is_disabled()
    assert guest.locator("#coin-balance").is_hidden() and guest.locator("#recharge-open").is_hidden()
    assert guest.locator(".gift-item").count() == len(names)
    guest.locator("#tab-top").click()
    guest.locator("#leaderboard .rank-item").first.wait_for(state="visible", timeout=20000)
    assert guest.locator("#leaderboard .rank-user").first.inner_text() == "fan"
    assert errors == []


def _gift(i: int, user: str, gift: str, name: str, price: int, count: int, combo: int) -> dict[str, Any]:
    return {"type": "gift", "id": f"g{i}", "user": user, "gift": gift, "count": count, "ts": i,
            "name": name, "price": price, "combo": combo}


@pytest.mark.parametrize("motion", ["no-preference", "reduce"])
def test_banners_merge_combos_queue_bursts_and_respect_reduced_motion(
        server: ServerProcess, browser: Any, motion: str) -> None:
    """The page's side of `gift` events, with the room socket played by the test (Playwright's
    WebSocket routing) so that combos and bursts come exactly when wanted."""
    _register(server, "stage")
    context = browser.new_context(viewport={"width": 1280, "height": 800}, reduced_motion=motion)
    sockets: list[Any] = []
    errors: list[str] = []
    try:
        page = _page(context, errors)
        page.route_web_socket(re.compile(r".*/ws/rooms/.*"), lambda ws: sockets.append(ws))
        page.goto(server.url + "/watch/stage")
        page.wait_for_function("() => window.livesrvGifts && window.livesrvGifts.available === true",
                               timeout=20000)
        deadline = time.monotonic() + 20
        while not sockets and time.monotonic() < deadline:
            page.wait_for_timeout(100)
        ws = sockets[0]
        listed = 0

        def wait_listed(n: int) -> None:
            page.wait_for_function(f"(n) => ({GIFT_TEXTS})().length === n", arg=n, timeout=20000)

        # history is listed, never animated
        ws.send(json.dumps({"type": "history", "events": [_gift(0, "old", "rose", "Rose", 1, 1, 1)]}))
        listed += 1
        wait_listed(listed)
        assert page.locator(".gift-banner").count() == 0

        # user strings are text, never markup
        ws.send(json.dumps(_gift(1, '<img src=x onerror="window.pwned=1">', "rose", "<b>Rose</b>", 1, 1, 1)))
        listed += 1
        page.wait_for_function(f"() => ({BANNERS})().some(b => b.user.startsWith('<img'))", timeout=20000)
        assert page.locator(".gift-layer img, .gift-layer b").count() == 0
        assert page.evaluate("() => window.pwned") is None

        # a combo: one banner whose number grows
        for step in range(1, 4):
            ws.send(json.dumps(_gift(1 + step, "ann", "rose", "Rose", 1, 1, step)))
            listed += 1
        page.wait_for_function(f"() => ({BANNERS})().some(b => b.user === 'ann' && b.combo === 'x3')",
                               timeout=20000)
        assert [b["user"] for b in page.evaluate(BANNERS)].count("ann") == 1
        reduce = motion == "reduce"
        assert _animation(page, "gift-banner") == ("none" if reduce else "gift-in")
        assert _animation(page, "gift-banner is-leaving") == ("none" if reduce else "gift-out")

        # a burst from many users: at most two banners on screen, a bounded queue for the rest
        burst = [_gift(10 + i, f"user{i}", "heart", "Heart", 5, 1, 1) for i in range(40)]
        ws.send(json.dumps({"type": "batch", "events": burst}))
        listed += len(burst)
        wait_listed(listed)
        assert page.locator(".gift-banner").count() <= 2
        queued = page.evaluate("() => window.livesrvGifts.show.queue.length")
        assert 0 < queued <= 24, queued  # the chat list has every one of them

        # an expensive gift gets the big animation at once (only other big ones go before it)
        ws.send(json.dumps(_gift(99, "whale", "rocket", "Rocket", 5000, 1, 1)))
        page.wait_for_function("() => Array.from(document.querySelectorAll('.gift-big .gift-big-text'))"
                               ".some(n => n.textContent === 'whale sent Rocket')", timeout=20000)
        assert _animation(page, "gift-big") == ("none" if reduce else "gift-big")
        page.screenshot(path=f"/tmp/livesrv-gifts-burst-{motion}.png")

        # the queue moves on by itself, still never more than two banners
        page.wait_for_function("(q) => window.livesrvGifts.show.queue.length < q", arg=queued, timeout=30000)
        assert page.locator(".gift-banner").count() <= 2
    finally:
        context.close()
    assert errors == []


def test_a_server_without_the_wallet_api_leaves_the_page_working(
        server: ServerProcess, browser: Any) -> None:
    """The gift catalog answering 404 (a server built without the wallet area, played here by
    routing that one URL): no gift bar, no leaderboard tab, no page errors, chat unharmed."""
    _register(server, "plain")
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    errors: list[str] = []
    catalog_asked: list[str] = []

    def missing(route: Any) -> None:
        catalog_asked.append(route.request.url)
        route.fulfill(status=404, content_type="application/json", body='{"error": "not found"}')

    try:
        page = _page(context, errors)
        page.route("**/api/gifts", missing)
        page.goto(server.url + "/watch/plain")
        page.wait_for_function("() => window.livesrvGifts && window.livesrvGifts.available === false",
                               timeout=20000)
        assert catalog_asked, catalog_asked
        assert page.locator("#gift-bar").is_hidden()
        assert page.locator("#tab-top").is_hidden()
        assert page.locator("#tab-chat").get_attribute("aria-selected") == "true"
        assert page.locator("#room-feed").is_visible()
        page.locator("#danmaku-toggle").click()
        assert page.locator("#danmaku-toggle").get_attribute("aria-pressed") == "false"
    finally:
        context.close()
    assert errors == []
