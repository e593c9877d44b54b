"""The money storm: a real server process takes hundreds of concurrent recharges and gifts with
retried keys, is killed with SIGKILL in the middle and restarted on the same data; afterwards
the ledger, read straight from the store, accounts for every coin.

Every operation has its own idempotency key and is retried with that key until it gets a
definite answer (201/200/402), as a client that lost its connection would; some are sent twice
on purpose. The test keeps its own book of what each definite answer means and compares it with
the ledger: equal balances mean no key was charged twice and no confirmed coin was lost.
"""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gifts.catalog import load_catalog
from gifts.ledger import PLATFORM, Ledger, clearing, earnings, wallet
from gifts.service import split
from gifts.settings import DEFAULT_CATALOG
from livesrv.db import open_database
from tests.support.server import ServerProcess

pytestmark = pytest.mark.e2e

USERS = 24
ANCHORS = 4
TASKS = 200
OPS_PER_TASK = 8
KILL_AFTER = TASKS * OPS_PER_TASK * 2 // 5  # definite answers before the SIGKILL
SHARE = 30
GIVE_UP = 120.0  # seconds one operation may keep retrying: a guard against hanging
PRICES = {gift.id: gift.price for gift in load_catalog(DEFAULT_CATALOG).gifts.values()}
CHEAP = [gift for gift, price in PRICES.items() if price <= 50]


@dataclass
class Client:
    name: str
    id: int
    token: str


@dataclass
class Book:
    """What the server's definite answers say happened."""

    recharged: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    spent: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    earned: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    platform: int = 0
    answers: dict[str, int] = field(default_factory=dict)  # key -> status of its first answer
    definite: int = 0
    retries: int = 0
    replays: int = 0
    insufficient: int = 0


async def call(session: aiohttp.ClientSession, server: ServerProcess, path: str, body: dict[str, Any],
               token: str, book: Book) -> tuple[int, dict[str, Any]]:
    """POST until a definite answer; a dead or restarting server is retried with the same body."""
    deadline = asyncio.get_running_loop().time() + GIVE_UP
    while True:
        try:
            async with session.post(server.url + path, json=body,
                                    headers={"Authorization": f"Bearer {token}"}) as response:
                if response.status in (200, 201, 402):
                    return response.status, await response.json()
                text = await response.text()
                if response.status < 500:
                    raise AssertionError(f"{path} {body}: {response.status} {text}")
        except (TimeoutError, aiohttp.ClientError, ConnectionError):
            pass
        book.retries += 1
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{path} {body}: no definite answer in {GIVE_UP} s\n{server.log()}")
        await asyncio.sleep(random.uniform(0.05, 0.3))


async def recharge(session: aiohttp.ClientSession, server: ServerProcess, user: Client, coins: int,
                   key: str, book: Book) -> None:
    status, body = await call(session, server, "/api/wallet/recharge",
                              {"coins": coins, "idempotency_key": key}, user.token, book)
    assert status == 201 and body["status"] == "paid" and body["coins"] == coins, body
    if key not in book.answers:
        book.answers[key] = status
        book.recharged[user.id] += coins
    book.definite += 1


async def send_gift(session: aiohttp.ClientSession, server: ServerProcess, user: Client, anchor: Client,
                    gift: str, count: int, key: str, book: Book) -> None:
    status, body = await call(session, server, f"/api/rooms/{anchor.name}/gifts",
                              {"gift": gift, "count": count, "idempotency_key": key}, user.token, book)
    book.definite += 1
    first = book.answers.get(key)
    if status == 402:
        # a key once charged is never refused later: a retry answers the first result
        assert first != 200, f"{key} was charged, then refused"
        book.insufficient += 1
        book.answers.setdefault(key, 402)
        return
    assert status == 200 and body["balance"] >= 0, body
    if body["replayed"]:
        book.replays += 1
    if first == 200:
        return
    book.answers[key] = 200
    total = PRICES[gift] * count
    anchor_part, platform_part = split(total, SHARE)
    book.spent[user.id] += total
    book.earned[anchor.id] += anchor_part
    book.platform += platform_part


async def storm(server: ServerProcess, users: list[Client], book: Book) -> int:
    """Run the load; SIGKILL and restart the server once KILL_AFTER answers came back."""
    anchors = users[:ANCHORS]
    kill_now = asyncio.Event()
    kills = 0

    async def killer() -> None:
        nonlocal kills
        await kill_now.wait()
        await asyncio.to_thread(server.kill)
        kills += 1
        await asyncio.sleep(0.5)  # clients meet a dead server for a while
        await asyncio.to_thread(server.start, 60.0)

    async def worker(index: int, session: aiohttp.ClientSession) -> None:
        rng = random.Random(index)
        user = users[index % len(users)]
        for op in range(OPS_PER_TASK):
            key = f"t{index}-op{op}"
            repeats = 2 if rng.random() < 0.25 else 1  # the same request sent again on purpose
            is_recharge = rng.random() < 0.35
            coins = rng.randint(1, 120)
            anchor = rng.choice([a for a in anchors if a.id != user.id])
            gift, count = rng.choice(CHEAP), rng.randint(1, 4)
            for _ in range(repeats):
                if is_recharge:
                    await recharge(session, server, user, coins, key, book)
                else:
                    await send_gift(session, server, user, anchor, gift, count, key, book)
                if book.definite >= KILL_AFTER:
                    kill_now.set()

    timeout = aiohttp.ClientTimeout(total=30)
    connector = aiohttp.TCPConnector(limit=TASKS)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        kill_task = asyncio.create_task(killer())
        await asyncio.gather(*(worker(i, session) for i in range(TASKS)))
        if not kill_now.is_set():
            kill_now.set()
        await kill_task
    return kills


async def register_users(server: ServerProcess) -> list[Client]:
    users = []
    async with aiohttp.ClientSession() as session:
        for i in range(USERS):
            name = f"fan{i:02d}"
            async with session.post(server.url + "/api/auth/register",
                                    json={"username": name, "password": f"pw-{name}-secret"}) as response:
                assert response.status == 201, await response.text()
                body = await response.json()
            users.append(Client(name, body["user"]["id"], body["token"]))
    return users


async def check_ledger(database_url: str, users: list[Client], book: Book) -> None:
    db = await open_database(database_url)
    ledger = await Ledger.open(db)
    try:
        audit = await ledger.audit()
        assert audit.balanced and audit.cached_match and audit.negative == [] and audit.total == 0, audit
        held = 0
        for user in users:
            expected = book.recharged[user.id] - book.spent[user.id]
            assert await ledger.balance(wallet(user.id)) == expected, user
            assert await ledger.balance(earnings(user.id)) == book.earned[user.id], user
            held += await ledger.balance(wallet(user.id)) + await ledger.balance(earnings(user.id))
        assert await ledger.balance(PLATFORM) == book.platform
        held += book.platform
        confirmed = sum(book.recharged.values())
        # the sum of all balances is the sum of confirmed recharges, which the clearing account mirrors
        assert held == confirmed == -await ledger.balance(clearing("sandbox"))
        paid = await db.fetchval("SELECT COALESCE(SUM(coins), 0) FROM payment_orders WHERE status = 'paid'")
        assert int(paid) == confirmed
        uncredited = "SELECT COUNT(*) FROM payment_orders WHERE status = 'paid' AND credited = 0"
        assert await db.fetchval(uncredited) == 0
    finally:
        await ledger.close()
        await db.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_money_survives_a_storm_and_a_sigkill(tmp_path: Path, backend: str,
                                                    request: pytest.FixtureRequest) -> None:
    database = request.getfixturevalue("postgres_url") if backend == "postgresql" else None
    config = tmp_path / "livesrv.toml"
    config.write_text(f"[gifts]\nsandbox = true\nplatform_share = {SHARE}\n")
    server = ServerProcess(tmp_path / "server", database=database, config=str(config))
    await asyncio.to_thread(server.start, 60.0)
    try:
        users = await register_users(server)
        book = Book()
        kills = await storm(server, users, book)
        assert kills == 1
        assert book.definite >= TASKS * OPS_PER_TASK and book.replays > 0 and book.insufficient > 0
        assert book.retries > 0  # some requests met the dead server and were retried
    finally:
        await asyncio.to_thread(server.stop)
    url = database or f"sqlite:///{(tmp_path / 'server' / 'livesrv.db').resolve()}"
    await check_ledger(url, users, book)
