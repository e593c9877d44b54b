"""Coins and gifts through the real app factory, on SQLite and PostgreSQL: recharge (sandbox and
signed webhooks), gifts, the room event, leaderboards and records."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import WSMsgType
from aiohttp.client_ws import ClientWebSocketResponse
from aiohttp.test_utils import TestClient, TestServer

from gifts.ledger import PLATFORM, Ledger, clearing, earnings, wallet
from gifts.payments import FAILED, SIGNATURE_HEADER, event_body, sign
from livesrv.app import create_app
from livesrv.config import load_settings
from livesrv.http.wallet import WALLET
from livesrv.keys import HUB
from livesrv.media import StreamInfo, Track

WAIT = 10  # a guard against hanging, not a speed assertion
SECRET = "whsec_test_secret"


async def make_client(tmp_path: Path, database_url: str, **gifts: Any) -> TestClient:
    settings = load_settings(env={}, data_dir=str(tmp_path), http="127.0.0.1:8080",
                             rtmp="127.0.0.1:1935", node_id="n1", database=database_url)
    settings = dataclasses.replace(settings, tables={"gifts": {"webhook_secret": SECRET, **gifts}})
    client = TestClient(TestServer(create_app(settings, rtmp=False)))
    await client.start_server()
    return client


@pytest.fixture
async def client(tmp_path: Path, database_url: str) -> AsyncIterator[TestClient]:
    client = await make_client(tmp_path, database_url, sandbox=True)
    yield client
    await client.close()


@pytest.fixture
async def provider_client(tmp_path: Path, database_url: str) -> AsyncIterator[TestClient]:
    """Recharges wait for the provider's webhook (no sandbox)."""
    client = await make_client(tmp_path, database_url, sandbox=False, provider="acme")
    yield client
    await client.close()


class User:
    def __init__(self, client: TestClient, name: str, token: str, user_id: int) -> None:
        self.client, self.name, self.token, self.id = client, name, token, user_id

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    async def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        response = await self.client.request(method, path, json=body, headers=self.auth)
        return response.status, await response.json()

    async def recharge(self, coins: int, key: str) -> dict[str, Any]:
        status, body = await self.call("POST", "/api/wallet/recharge",
                                       {"coins": coins, "idempotency_key": key})
        assert status == 201, body
        return body

    async def gift(self, channel: str, gift: str, count: int, key: str) -> tuple[int, Any]:
        return await self.call("POST", f"/api/rooms/{channel}/gifts",
                               {"gift": gift, "count": count, "idempotency_key": key})


async def register(client: TestClient, name: str) -> User:
    response = await client.post("/api/auth/register", json={"username": name, "password": f"pw-{name}-1234"})
    assert response.status == 201, await response.text()
    body = await response.json()
    client.session.cookie_jar.clear()  # each request says who it is with its bearer token
    return User(client, name, body["token"], body["user"]["id"])


def ledger(client: TestClient) -> Ledger:
    return client.server.app[WALLET].ledger


async def balance(user: User) -> int:
    status, body = await user.call("GET", "/api/wallet")
    assert status == 200
    return body["balance"]


async def test_catalog_and_packages(client: TestClient) -> None:
    gifts = await (await client.get("/api/gifts")).json()
    assert gifts[0] == {"id": "rose", "name": "Rose", "price": 1, "animation": "float"}
    assert len(gifts) >= 8 and all(set(g) == {"id", "name", "price", "animation"} for g in gifts)
    packages = await (await client.get("/api/wallet/packages")).json()
    assert packages and set(packages[0]) == {"id", "coins", "price_cents", "currency"}
    for path in ("/api/wallet", "/api/wallet/transactions"):
        response = await client.get(path)
        assert response.status == 401 and "error" in await response.json()


async def test_sandbox_recharge_is_paid_at_once_and_idempotent(client: TestClient) -> None:
    bob = await register(client, "bob")
    assert await bob.call("GET", "/api/wallet") == (200, {"balance": 0, "earnings": 0})
    first = await bob.recharge(100, "r1")
    assert (first["status"], first["coins"], first["balance"]) == ("paid", 100, 100)
    again = await bob.recharge(100, "r1")  # a retried request: the same order, nothing more
    assert (again["order"], again["balance"]) == (first["order"], 100)
    status, package = await bob.call("POST", "/api/wallet/recharge",
                                     {"package": "p60", "idempotency_key": "r2"})
    assert status == 201 and (package["coins"], package["price_cents"], package["balance"]) == (60, 99, 160)
    status, body = await bob.call("POST", "/api/wallet/recharge", {"coins": 5, "idempotency_key": "r1"})
    assert status == 409 and "error" in body
    for bad in ({"coins": 5}, {"idempotency_key": "x"}, {"coins": 0, "idempotency_key": "x"},
                {"coins": "5", "idempotency_key": "x"},
                {"coins": 5, "package": "p60", "idempotency_key": "x"},
                {"coins": 10**9, "idempotency_key": "x"}, {"coins": 5, "idempotency_key": ""}):
        status, body = await bob.call("POST", "/api/wallet/recharge", bad)
        assert status == 400 and "error" in body, bad
    status, body = await bob.call("POST", "/api/wallet/recharge", {"package": "nope", "idempotency_key": "x"})
    assert status == 404
    response = await client.post("/api/wallet/recharge", data=b"{not json", headers=bob.auth)
    assert response.status == 400
    anonymous = await client.post("/api/wallet/recharge", json={"coins": 5, "idempotency_key": "a"})
    assert anonymous.status == 401
    assert await balance(bob) == 160
    assert await ledger(client).balance(clearing("sandbox")) == -160


async def post_webhook(client: TestClient, body: bytes, header: str | None) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    if header is not None:
        headers[SIGNATURE_HEADER] = header
    response = await client.post("/api/payments/webhook", data=body, headers=headers)
    return response.status, await response.json()


async def test_webhook_confirms_once_and_refuses_bad_deliveries(provider_client: TestClient) -> None:
    client = provider_client
    carol = await register(client, "carol")
    order = await carol.recharge(300, "r1")
    assert (order["status"], order["balance"]) == ("pending", 0)
    body = event_body(order["order"], amount_cents=300, currency="USD")
    now = int(time.time())
    # bad deliveries first: none of them changes anything
    assert (await post_webhook(client, body, None))[0] == 401
    assert (await post_webhook(client, body, "t=1,v1=nothex"))[0] == 401
    assert (await post_webhook(client, body, sign(b"forged", body, now)))[0] == 401
    assert (await post_webhook(client, body, sign(SECRET.encode(), body, now - 3600)))[0] == 401
    assert (await post_webhook(client, b"{oops", sign(SECRET.encode(), b"{oops", now)))[0] == 400
    unknown = event_body(order["order"] + 999)
    assert (await post_webhook(client, unknown, sign(SECRET.encode(), unknown, now)))[0] == 404
    assert await balance(carol) == 0
    # the real one
    header = sign(SECRET.encode(), body, now)
    assert await post_webhook(client, body, header) == (200, {"order": order["order"], "status": "paid"})
    assert await balance(carol) == 300
    # replayed as is: refused; retried by the provider (signed anew): accepted, nothing more
    status, refused = await post_webhook(client, body, header)
    assert status == 401 and refused["reason"] == "replayed"
    for delay in (1, 2):
        assert (await post_webhook(client, body, sign(SECRET.encode(), body, now + delay)))[0] == 200
    failed = event_body(order["order"], kind=FAILED)
    assert (await post_webhook(client, failed, sign(SECRET.encode(), failed, now + 3)))[1]["status"] == "paid"
    assert await balance(carol) == 300
    again = await carol.recharge(300, "r1")
    assert (again["status"], again["balance"]) == ("paid", 300)
    assert await ledger(client).balance(clearing("acme")) == -300
    assert (await ledger(client).audit()).balanced


async def test_gifts_move_coins_and_the_platform_share(client: TestClient) -> None:
    alice = await register(client, "alice")  # the anchor
    bob = await register(client, "bob")
    await bob.recharge(100, "r1")
    status, body = await bob.gift("alice", "lollipop", 3, "g1")  # 30 coins: 21 to alice, 9 to platform
    assert status == 200, body
    assert body == {"balance": 70, "gift": "lollipop", "count": 3, "id": body["id"], "combo": 3,
                    "replayed": False}
    assert await ledger(client).balance(earnings(alice.id)) == 21
    assert await ledger(client).balance(PLATFORM) == 9
    assert (await alice.call("GET", "/api/wallet"))[1] == {"balance": 0, "earnings": 21}
    # the same key again: the first result, nothing moves
    status, replay = await bob.gift("alice", "lollipop", 3, "g1")
    assert status == 200 and replay["id"] == body["id"] and replay["balance"] == 70 and replay["replayed"]
    status, conflict = await bob.gift("alice", "rose", 1, "g1")
    assert status == 409 and "error" in conflict
    # not enough coins: 402 with what is there and what it takes
    status, short = await bob.gift("ALICE", "rocket", 1, "g2")
    assert status == 402 and short["balance"] == 70 and short["needed"] >= 5000 and "error" in short
    assert await balance(bob) == 70
    # bad requests
    assert (await bob.gift("nobody", "rose", 1, "g3"))[0] == 404
    assert (await bob.gift("alice", "unicorn", 1, "g3"))[0] == 404
    for count in (0, 1000, "2", 1.5, None):
        assert (await bob.gift("alice", "rose", count, "g3"))[0] == 400, count  # type: ignore[arg-type]
    assert (await bob.gift("alice", "rose", 1, ""))[0] == 400
    assert (await bob.gift("bob", "rose", 1, "g3"))[0] == 400  # yourself
    response = await client.post("/api/rooms/alice/gifts",
                                 json={"gift": "rose", "count": 1, "idempotency_key": "x"})
    assert response.status == 401
    response = await client.post("/api/rooms/alice/gifts", data=b"[1]", headers=bob.auth)
    assert response.status == 400
    assert await balance(bob) == 70
    audit = await ledger(client).audit()
    assert audit.balanced and audit.cached_match and not audit.negative


async def events_of(ws: ClientWebSocketResponse, kind: str, until_id: str) -> list[dict[str, Any]]:
    """The ``kind`` events the socket receives until the one with id ``until_id``."""
    seen: list[dict[str, Any]] = []
    while True:
        msg = await asyncio.wait_for(ws.receive(), WAIT)
        assert msg.type == WSMsgType.TEXT, msg
        frame = json.loads(msg.data)
        for event in frame["events"] if frame["type"] == "batch" else [frame]:
            if event["type"] == kind:
                seen.append(event)
                if event["id"] == until_id:
                    return seen


async def test_the_room_receives_each_gift_once_with_combos(client: TestClient) -> None:
    await register(client, "alice")
    bob = await register(client, "bob")
    await bob.recharge(1000, "r1")
    ws = await client.ws_connect("/ws/rooms/alice")
    try:
        _, first = await bob.gift("alice", "rose", 1, "g1")
        assert (await bob.gift("alice", "rose", 1, "g1"))[1]["replayed"]  # publishes nothing
        _, second = await bob.gift("alice", "rose", 2, "g2")
        _, heart = await bob.gift("alice", "heart", 1, "g3")
        assert (first["combo"], second["combo"], heart["combo"]) == (1, 3, 1)
        events = await events_of(ws, "gift", heart["id"])
        assert [e["id"] for e in events] == [first["id"], second["id"], heart["id"]]
        rose = events[1]
        assert {k: rose[k] for k in ("user", "gift", "count", "name", "price", "combo")} == {
            "user": "bob", "gift": "rose", "count": 2, "name": "Rose", "price": 1, "combo": 3}
        assert isinstance(rose["ts"], float)
    finally:
        await ws.close()


async def test_leaderboards(client: TestClient) -> None:
    alice = await register(client, "alice")
    fans = [await register(client, name) for name in ("bob", "carol", "dave")]
    for fan in fans:
        await fan.recharge(10_000, "r")
    await fans[0].gift("alice", "crown", 1, "a")  # 100, before the live
    response = await client.get("/api/rooms/alice/leaderboard?scope=live")
    assert await response.json() == {"scope": "live", "entries": []}  # offline: no current live
    stream = client.server.app[HUB].start("alice", StreamInfo(Track("video", "h264"), None), source="test")
    await asyncio.sleep(0.01)  # a clock tick past started_at
    try:
        await fans[1].gift("alice", "star", 1, "b")  # 50
        await fans[2].gift("alice", "heart", 2, "c")  # 10
        await fans[0].gift("alice", "rose", 1, "d")  # 1
        # coins are what the anchor earned from each (the platform's 30 % rounded down left out);
        # leaderboards are cached for about a second: wait for the new ones
        expected_live = [{"user": "carol", "coins": 35}, {"user": "dave", "coins": 7},
                         {"user": "bob", "coins": 1}]
        expected_all = [{"user": "bob", "coins": 71}, {"user": "carol", "coins": 35},
                        {"user": "dave", "coins": 7}]
        for scope, expected in (("live", expected_live), ("all", expected_all)):
            deadline = time.monotonic() + WAIT
            while True:
                body = await (await client.get(f"/api/rooms/alice/leaderboard?scope={scope}")).json()
                if body["entries"] == expected or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.2)
            assert body == {"scope": scope, "entries": expected}
    finally:
        client.server.app[HUB].stop(stream)
    assert (await client.get("/api/rooms/alice/leaderboard?scope=week")).status == 400
    assert (await client.get("/api/rooms/nobody/leaderboard?scope=all")).status == 404
    assert alice.id > 0


async def test_transactions_page_through_every_record(client: TestClient) -> None:
    alice = await register(client, "alice")
    bob = await register(client, "bob")
    await bob.recharge(500, "r1")
    for i in range(7):
        assert (await bob.gift("alice", "heart", 1 + i, f"g{i}"))[0] == 200
    await bob.recharge(20, "r2")
    await alice.recharge(5, "ra")
    await alice.gift("bob", "rose", 2, "back")

    async def all_pages(user: User, limit: int) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        cursor = None
        while True:
            query = f"?limit={limit}" + (f"&before={cursor}" if cursor else "")
            status, page = await user.call("GET", "/api/wallet/transactions" + query)
            assert status == 200 and len(page["transactions"]) <= limit
            items += page["transactions"]
            cursor = page["next"]
            if cursor is None:
                return items

    bobs = await all_pages(bob, 3)
    assert [t["id"] for t in bobs] == sorted({t["id"] for t in bobs}, reverse=True)
    assert len(bobs) == 10  # 2 recharges, 7 gifts sent, 1 received, nothing twice
    assert sum(t["amount"] for t in bobs) == sum((await bob.call("GET", "/api/wallet"))[1].values())
    assert bobs == await all_pages(bob, 100)  # the same records whatever the page size
    sent = [t for t in bobs if t["kind"] == "gift" and t["amount"] < 0]
    assert len(sent) == 7 and all(t["counterparty"] == "alice" and t["gift"] == "heart" for t in sent)
    assert sent[0]["amount"] == -5 * 7 and sent[0]["count"] == 7 and sent[0]["channel"] == "alice"
    received = [t for t in bobs if t["amount"] > 0 and t["kind"] == "gift"]
    assert len(received) == 1 and received[0]["counterparty"] == "alice" and received[0]["amount"] == 2
    recharges = [t for t in bobs if t["kind"] == "recharge"]
    assert [t["amount"] for t in recharges] == [20, 500] and recharges[0]["counterparty"] == "sandbox"
    alices = await all_pages(alice, 2)
    assert len(alices) == 9 and sum(t["amount"] for t in alices) == sum(
        (await alice.call("GET", "/api/wallet"))[1].values())
    for bad in ("?limit=0", "?limit=101", "?limit=x", "?before=-1"):
        assert (await bob.call("GET", "/api/wallet/transactions" + bad))[0] == 400, bad
    assert await ledger(client).balance(wallet(bob.id)) == await balance(bob)


def metric(text: str, name: str) -> float:
    """The value of one sample in Prometheus text (0 when absent)."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_metrics_count_recharges_gifts_and_refused_webhooks(client: TestClient) -> None:
    names = ('livesrv_recharges_total{status="paid"}', "livesrv_gifts_total", "livesrv_gift_coins_total",
             'livesrv_payment_webhooks_rejected_total{reason="missing"}')
    before = await (await client.get("/metrics")).text()
    await register(client, "alice")
    bob = await register(client, "bob")
    await bob.recharge(100, "r1")
    assert (await bob.gift("alice", "heart", 2, "g1"))[0] == 200
    assert (await post_webhook(client, event_body(1), None))[0] == 401
    after = await (await client.get("/metrics")).text()
    assert [metric(after, n) - metric(before, n) for n in names] == [1, 2, 10, 1]


async def test_bad_gift_settings_stop_the_app_with_the_reason(tmp_path: Path) -> None:
    from livesrv.config import ConfigError

    for table, reason in (({"platform_share": 120}, "platform_share"), ({"combo": 3}, "combo"),
                          ({"catalog": str(tmp_path / "none.toml")}, "none")):
        settings = dataclasses.replace(load_settings(env={}, data_dir=str(tmp_path)), tables={"gifts": table})
        with pytest.raises(ConfigError, match=reason):
            create_app(settings, rtmp=False)


async def test_without_a_secret_or_sandbox_webhooks_are_refused(tmp_path: Path, database_url: str) -> None:
    client = await make_client(tmp_path, database_url, sandbox=False, webhook_secret="")
    try:
        dave = await register(client, "dave")
        order = await dave.recharge(10, "r")
        body = event_body(order["order"])
        status, refused = await post_webhook(client, body, sign(b"", body, int(time.time())))
        assert status == 401 and refused["reason"] == "no_secret"
        assert await balance(dave) == 0
    finally:
        await client.close()
