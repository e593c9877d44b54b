"""The coin ledger on a real SQLite file and a real PostgreSQL schema (``database_url``/``db``
fixtures run each test on both): balances, statements, leaderboards, idempotency, refused
overdrafts, and the books under hundreds of concurrent posters, one or two Ledger instances."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from gifts.ledger import (
    PLATFORM,
    InsufficientFunds,
    InvalidRequest,
    KeyConflict,
    Ledger,
    LedgerError,
    Leg,
    Posting,
    clearing,
    earnings,
    wallet,
)
from gifts.ledger_core import Request, legs_signature, plan_batch, validate
from livesrv.db import Database, DatabaseError, open_database

SANDBOX = clearing("sandbox")


def recharge(user: int, coins: int) -> list[Leg]:
    return [Leg(SANDBOX, wallet(user), coins)]


def gift(viewer: int, anchor: int, coins: int, platform_share: int = 20) -> list[Leg]:
    platform_part = coins * platform_share // 100
    legs = [Leg(wallet(viewer), earnings(anchor), coins - platform_part)]
    if platform_part:
        legs.append(Leg(wallet(viewer), PLATFORM, platform_part))
    return legs


@pytest.fixture
async def ledger(db: Database) -> AsyncIterator[Ledger]:
    opened = await Ledger.open(db)
    yield opened
    await opened.close()


def batches_so_far() -> float:
    return REGISTRY.get_sample_value("livesrv_ledger_batch_size_count") or 0.0


async def assert_books_clean(ledger: Ledger, db: Database) -> None:
    audit = await ledger.audit()
    assert audit.balanced and audit.cached_match, audit
    assert audit.negative == [] and audit.total == 0, audit
    assert audit.ok
    duplicated = await db.fetchall("SELECT key FROM ledger_postings GROUP BY key HAVING COUNT(*) > 1")
    assert duplicated == []


async def test_balances_statement_leaderboard_and_audit(ledger: Ledger, db: Database) -> None:
    await ledger.post(recharge(1, 500), key="r1", kind="recharge", memo={"order": 1})
    await ledger.post(recharge(2, 300), key="r2", kind="recharge")
    first = await ledger.post(gift(1, 9, 100), key="g1", kind="gift", memo={"gift": "rose"})
    second = await ledger.post(gift(2, 9, 50), key="g2", kind="gift")
    await ledger.post(gift(1, 9, 10), key="g3", kind="gift")

    assert first.replayed is False and first.kind == "gift" and first.memo == {"gift": "rose"}
    assert first.legs == (Leg(wallet(1), earnings(9), 80), Leg(wallet(1), PLATFORM, 20))
    assert await ledger.balance(wallet(1)) == 390
    assert await ledger.balance(wallet(2)) == 250
    assert await ledger.balance(earnings(9)) == 80 + 40 + 8
    assert await ledger.balance(PLATFORM) == 20 + 10 + 2
    assert await ledger.balance(SANDBOX) == -800  # clearing mirrors money received
    assert await ledger.balance(wallet(77)) == 0  # never seen

    lines = await ledger.statement(wallet(1))  # one line per posting, the anchor as counterparty
    assert [(e.posting_id, e.amount, e.counterparty, e.kind) for e in lines] == [
        (lines[0].posting_id, -10, earnings(9), "gift"), (first.id, -100, earnings(9), "gift"),
        (lines[-1].posting_id, 500, SANDBOX, "recharge")]
    assert lines[-1].memo == {"order": 1} and lines[1].memo == {"gift": "rose"}
    assert lines[1].created_at == first.created_at
    assert all(e.account == wallet(1) for e in lines)
    assert [(e.amount, e.counterparty) for e in await ledger.statement(PLATFORM)] == [
        (2, wallet(1)), (10, wallet(2)), (20, wallet(1))]

    assert await ledger.top_senders(earnings(9)) == [(wallet(1), 88), (wallet(2), 40)]
    assert await ledger.top_senders(earnings(9), limit=1) == [(wallet(1), 88)]
    assert await ledger.top_senders(earnings(9), since=first.created_at) == [(wallet(1), 88), (wallet(2), 40)]
    assert await ledger.top_senders(earnings(9), since=second.created_at) == [(wallet(2), 40), (wallet(1), 8)]
    assert await ledger.top_senders(earnings(9), since=first.created_at + 3600) == []
    assert await ledger.top_senders(earnings(10)) == []

    audit = await ledger.audit()
    assert audit.postings == 5
    await assert_books_clean(ledger, db)


async def test_statement_pages_by_posting_cursor(ledger: Ledger) -> None:
    await ledger.post(recharge(1, 1000), key="r", kind="recharge")
    for i in range(7):
        await ledger.post(gift(1, 2, 10 + i), key=f"g{i}", kind="gift")
    pages: list[list[int]] = []
    before = None
    while True:
        page = await ledger.statement(wallet(1), before=before, limit=3)
        if not page:
            break
        pages.append([e.posting_id for e in page])
        before = page[-1].posting_id
    everything = [posting_id for page in pages for posting_id in page]
    assert [len(page) for page in pages] == [3, 3, 2]
    assert everything == sorted(set(everything), reverse=True) and len(everything) == 8
    assert [e.posting_id for e in await ledger.statement(wallet(1), limit=100)] == everything


async def test_same_key_replays_the_first_posting(ledger: Ledger, db: Database) -> None:
    await ledger.post(recharge(1, 100), key="r", kind="recharge")
    first = await ledger.post(gift(1, 2, 30), key="g", kind="gift", memo={"n": 1})
    again = await ledger.post(gift(1, 2, 30), key="g", kind="gift", memo={"n": 2})
    assert again.replayed and not first.replayed
    assert (again.id, again.legs, again.memo, again.created_at) == (first.id, first.legs, {"n": 1},
                                                                     first.created_at)
    assert await ledger.balance(wallet(1)) == 70
    await assert_books_clean(ledger, db)


async def test_same_key_concurrently_moves_coins_once(ledger: Ledger, db: Database) -> None:
    await ledger.post(recharge(1, 1000), key="r", kind="recharge")
    posts = await asyncio.gather(*(ledger.post(gift(1, 2, 10), key="once", kind="gift") for _ in range(50)))
    assert sum(not p.replayed for p in posts) == 1
    assert {p.id for p in posts} == {posts[0].id}
    assert await ledger.balance(wallet(1)) == 990
    assert await db.fetchval("SELECT COUNT(*) FROM ledger_postings WHERE key = ?", "once") == 1
    await assert_books_clean(ledger, db)


async def test_same_key_with_other_legs_is_a_conflict(ledger: Ledger, db: Database) -> None:
    await ledger.post(recharge(1, 100), key="r", kind="recharge")
    await ledger.post(gift(1, 2, 10), key="k", kind="gift")
    with pytest.raises(KeyConflict):
        await ledger.post(gift(1, 2, 11), key="k", kind="gift")
    with pytest.raises(KeyConflict):
        await ledger.post(gift(1, 3, 10), key="k", kind="gift")
    # the same within one batch: the first one wins, the other conflicts
    results = await asyncio.gather(ledger.post(gift(1, 2, 5), key="k2", kind="gift"),
                                   ledger.post(gift(1, 2, 6), key="k2", kind="gift"),
                                   return_exceptions=True)
    assert isinstance(results[0], Posting) and isinstance(results[1], KeyConflict)
    assert await ledger.balance(wallet(1)) == 85
    await assert_books_clean(ledger, db)


async def test_insufficient_funds_moves_nothing(ledger: Ledger, db: Database) -> None:
    await ledger.post(recharge(1, 50), key="r", kind="recharge")
    with pytest.raises(InsufficientFunds) as refused:
        await ledger.post(gift(1, 2, 60), key="g", kind="gift")
    assert (refused.value.account, refused.value.balance, refused.value.needed) == (wallet(1), 50, 60)
    assert isinstance(refused.value, LedgerError)
    assert await ledger.balance(wallet(1)) == 50
    assert await ledger.balance(earnings(2)) == 0
    assert await db.fetchval("SELECT COUNT(*) FROM ledger_postings WHERE key = ?", "g") == 0
    # a refused key is not burnt: once the wallet covers it, the same key goes through
    await ledger.post(recharge(1, 50), key="r2", kind="recharge")
    assert not (await ledger.post(gift(1, 2, 60), key="g", kind="gift")).replayed
    # earnings are spendable too, and guarded the same way
    with pytest.raises(InsufficientFunds):
        await ledger.post([Leg(earnings(2), wallet(2), 1000)], key="w", kind="withdraw")
    await assert_books_clean(ledger, db)


async def test_an_overdraft_fails_alone_within_a_batch(ledger: Ledger, db: Database) -> None:
    await ledger.post(recharge(1, 100), key="r1", kind="recharge")
    await ledger.post(recharge(2, 1000), key="r2", kind="recharge")
    batches_before = batches_so_far()
    posts = [ledger.post(gift(1, 9, 10), key=f"a{i}", kind="gift") for i in range(15)]
    posts += [ledger.post(gift(2, 9, 10), key=f"b{i}", kind="gift") for i in range(15)]
    results = await asyncio.gather(*posts, return_exceptions=True)
    assert batches_so_far() - batches_before < len(posts)  # they went through in shared batches
    refused = [r for r in results if isinstance(r, InsufficientFunds)]
    assert len(refused) == 5 and all(r.account == wallet(1) for r in refused)
    assert sum(isinstance(r, Posting) for r in results) == 25
    assert all(isinstance(r, Posting) for r in results[15:])
    assert await ledger.balance(wallet(1)) == 0
    assert await ledger.balance(wallet(2)) == 850
    assert await ledger.balance(earnings(9)) == 25 * 8
    await assert_books_clean(ledger, db)


async def test_each_posting_answers_the_balances_right_after_it(ledger: Ledger, db: Database) -> None:
    first = await ledger.post(recharge(1, 100), key="r", kind="recharge")
    assert first.balances == {wallet(1): 100, SANDBOX: -100}
    batches_before = batches_so_far()
    posts = await asyncio.gather(*(ledger.post(gift(1, 9, 10), key=f"g{i}", kind="gift")
                                   for i in range(6)))
    assert batches_so_far() - batches_before < len(posts)  # they went through in shared batches
    # in queue order, each gift sees the wallet as the ones before it left it
    assert [p.balances[wallet(1)] for p in posts] == [90, 80, 70, 60, 50, 40]
    assert [(p.balances[earnings(9)], p.balances[PLATFORM]) for p in posts] == [
        (8 * n, 2 * n) for n in range(1, 7)]
    replay = await ledger.post(gift(1, 9, 10), key="g0", kind="gift")
    assert replay.replayed and replay.balances == {}  # nothing moved: no balances to tell
    assert await ledger.balance(wallet(1)) == 40
    await assert_books_clean(ledger, db)


@pytest.mark.parametrize("legs, key, kind, memo", [
    ([], "k", "gift", None),
    ([Leg(wallet(1), wallet(1), 5)], "k", "gift", None),
    ([Leg(wallet(1), wallet(2), 0)], "k", "gift", None),
    ([Leg(wallet(1), wallet(2), -5)], "k", "gift", None),
    ([Leg(wallet(1), wallet(2), 2.5)], "k", "gift", None),
    ([Leg(wallet(1), wallet(2), True)], "k", "gift", None),
    ([Leg(wallet(1), "no such account!", 5)], "k", "gift", None),
    ([Leg(wallet(1), ["a", "list"], 5)], "k", "gift", None),  # type: ignore[arg-type]
    ([Leg(wallet(1), wallet(2), 5)], "", "gift", None),
    ([Leg(wallet(1), wallet(2), 5)], "k" * 201, "gift", None),
    ([Leg(wallet(1), wallet(2), 5)], "k", "", None),
    ([Leg(wallet(1), wallet(2), 5)], "k\x00", "gift", None),
    ([Leg(wallet(1), wallet(2), 5)], "k", "gift", {"x": object()}),
    ([Leg(wallet(1), wallet(2), 5)], "k", "gift", ["not", "a", "dict"]),
    ([Leg(wallet(1), wallet(2), 5), Leg(wallet(2), wallet(1), 5)], "k", "gift", None),
    ([(wallet(1), wallet(2), 5)], "k", "gift", None),
])
async def test_malformed_posts_are_refused(ledger: Ledger, db: Database, legs: Any, key: Any, kind: Any,
                                           memo: Any) -> None:
    with pytest.raises(InvalidRequest):
        await ledger.post(legs, key=key, kind=kind, memo=memo)
    with pytest.raises(InvalidRequest):
        await ledger.statement(wallet(1), limit=0)
    with pytest.raises(InvalidRequest):
        await ledger.balance("bad account")
    assert await db.fetchval("SELECT COUNT(*) FROM ledger_postings") == 0


async def test_entries_and_postings_are_append_only(ledger: Ledger, db: Database) -> None:
    await ledger.post(recharge(1, 100), key="r", kind="recharge")
    for statement in ("UPDATE ledger_entries SET amount = 1", "DELETE FROM ledger_entries",
                      "UPDATE ledger_postings SET kind = 'x'", "DELETE FROM ledger_postings"):
        with pytest.raises(DatabaseError):
            await db.execute(statement)
    with pytest.raises(DatabaseError):  # the cache refuses a negative wallet, whoever writes it
        await db.execute("UPDATE ledger_balances SET balance = -1 WHERE account = ?", wallet(1))
    await assert_books_clean(ledger, db)


POISON_TRIGGER = {
    "sqlite": ["CREATE TRIGGER poison BEFORE INSERT ON ledger_postings WHEN NEW.key = 'poison'"
               " BEGIN SELECT RAISE(ABORT, 'poisoned'); END"],
    "postgresql": [
        "CREATE FUNCTION poison() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN IF NEW.key = 'poison'"
        " THEN RAISE EXCEPTION 'poisoned'; END IF; RETURN NEW; END $$",
        "CREATE TRIGGER poison BEFORE INSERT ON ledger_postings FOR EACH ROW EXECUTE FUNCTION poison()"],
}


async def test_a_posting_the_store_refuses_fails_alone(ledger: Ledger, db: Database) -> None:
    await ledger.post(recharge(1, 1000), key="r", kind="recharge")
    for statement in POISON_TRIGGER[db.dialect]:  # the database itself refuses one key
        await db.execute(statement)
    results = await asyncio.gather(*(ledger.post(gift(1, 2, 10), key=key, kind="gift")
                                     for key in ["a", "b", "poison", "c", "d"]), return_exceptions=True)
    assert isinstance(results[2], DatabaseError) and "poisoned" in str(results[2])
    assert all(isinstance(r, Posting) for r in results[:2] + results[3:])
    assert await ledger.balance(wallet(1)) == 960
    await assert_books_clean(ledger, db)


async def test_audit_sees_a_tampered_cache(ledger: Ledger, db: Database) -> None:
    await ledger.post(recharge(1, 100), key="r", kind="recharge")
    await db.execute("UPDATE ledger_balances SET balance = 90 WHERE account = ?", wallet(1))
    audit = await ledger.audit()
    assert not audit.cached_match and audit.mismatched == [wallet(1)] and audit.total == -10
    assert not audit.ok


class Books:
    """What the posters were told, to compare with the ledger afterwards."""

    def __init__(self) -> None:
        self.answers: dict[str, Posting] = {}  # key -> the posting its callers were answered
        self.confirmed_recharges: dict[str, int] = {}

    def record(self, posting: Posting) -> None:
        seen = self.answers.setdefault(posting.key, posting)
        assert seen.id == posting.id, "one key, two postings"
        if posting.kind == "recharge":
            self.confirmed_recharges[posting.key] = posting.legs[0].amount


async def random_poster(ledger: Ledger, books: Books, task: int, rounds: int) -> None:
    rng = random.Random(task)
    for i in range(rounds):
        viewer = rng.randrange(40)
        if rng.random() < 0.35:
            legs, key, kind = recharge(viewer, rng.randrange(1, 300)), f"r-{task}-{i}", "recharge"
        else:
            legs, key, kind = gift(viewer, rng.randrange(3), rng.randrange(1, 120)), f"g-{task}-{i}", "gift"
        # a client that retries: sometimes twice in a row, sometimes twice at once
        tries = rng.choice([1, 1, 2, 3])
        if rng.random() < 0.3:
            results = await asyncio.gather(*(ledger.post(legs, key=key, kind=kind) for _ in range(tries)),
                                           return_exceptions=True)
        else:
            results = []
            for _ in range(tries):
                try:
                    results.append(await ledger.post(legs, key=key, kind=kind))
                except InsufficientFunds as exc:
                    results.append(exc)
        for result in results:
            if isinstance(result, Posting):
                books.record(result)
            else:
                assert isinstance(result, InsufficientFunds), result
        if sum(isinstance(r, Posting) and not r.replayed for r in results) > 1:
            raise AssertionError(f"key {key} moved coins twice")


async def assert_books_match(ledger: Ledger, db: Database, books: Books) -> None:
    await assert_books_clean(ledger, db)
    rows = await db.fetchall("SELECT account, balance FROM ledger_balances")
    balances = {row[0]: int(row[1]) for row in rows}
    held = sum(v for account, v in balances.items() if not account.startswith("clearing:"))
    assert held == sum(books.confirmed_recharges.values()) == -balances[SANDBOX]
    assert all(v >= 0 for account, v in balances.items() if account != SANDBOX)
    stored = {row[0]: int(row[1]) for row in await db.fetchall("SELECT key, id FROM ledger_postings")}
    assert stored == {key: posting.id for key, posting in books.answers.items()}


@pytest.mark.parametrize("writer", ["process", "thread"])
async def test_hundreds_of_concurrent_posters_keep_the_books(db: Database, writer: str) -> None:
    ledger = await Ledger.open(db, writer=writer)
    try:
        assert ledger.writer == writer
        books = Books()
        await asyncio.gather(*(random_poster(ledger, books, task, rounds=8) for task in range(300)))
        assert len(books.answers) > 300
        assert any(p.kind == "gift" for p in books.answers.values())
        await assert_books_match(ledger, db, books)
    finally:
        await ledger.close()


async def test_sqlite_statement_path_keeps_the_books(tmp_path: Path) -> None:
    """The generic path (statement by statement through ``db``; what in-memory SQLite uses)."""
    for url in (f"sqlite:///{tmp_path / 'plain.db'}", "sqlite://:memory:"):
        db = await open_database(url)
        ledger = await Ledger.open(db, writer="statements")
        try:
            books = Books()
            await asyncio.gather(*(random_poster(ledger, books, task, rounds=6) for task in range(200)))
            await assert_books_match(ledger, db, books)
        finally:
            await ledger.close()
            await db.close()


async def test_two_ledgers_on_one_database(database_url: str) -> None:
    """Two nodes (two Database pools, two writers) posting to the same anchor, sharing keys."""
    dbs = [await open_database(database_url) for _ in range(2)]
    ledgers = [await Ledger.open(db) for db in dbs]
    try:
        books = Books()
        for viewer in range(40):
            books.record(await ledgers[viewer % 2].post(recharge(viewer, 200), key=f"seed{viewer}",
                                                         kind="recharge"))

        async def both_nodes_post(i: int) -> None:
            viewer = i % 40
            legs = gift(viewer, 7, 1 + i % 13)
            results = await asyncio.gather(*(node.post(legs, key=f"hot{i}", kind="gift") for node in ledgers),
                                           return_exceptions=True)
            answered = [r for r in results if isinstance(r, Posting)]
            assert all(isinstance(r, (Posting, InsufficientFunds)) for r in results), results
            assert sum(not r.replayed for r in answered) <= 1
            for posting in answered:
                books.record(posting)

        async def same_key_other_legs_on_each_node(i: int) -> None:
            results = await asyncio.gather(
                ledgers[0].post(gift(i % 40, 7, 3, 0), key=f"split{i}", kind="gift"),
                ledgers[1].post(gift((i + 1) % 40, 8, 3, 0), key=f"split{i}", kind="gift"),
                return_exceptions=True)
            answered = [r for r in results if isinstance(r, Posting)]
            assert len(answered) <= 1 and all(isinstance(r, (Posting, KeyConflict, InsufficientFunds))
                                              for r in results), results
            for posting in answered:
                books.record(posting)

        await asyncio.gather(*(both_nodes_post(i) for i in range(600)),
                             *(same_key_other_legs_on_each_node(i) for i in range(100)),
                             *(random_poster(node, books, 1000 + n, rounds=10)
                               for n, node in enumerate(ledgers * 20)))
        assert await ledgers[0].balance(earnings(7)) > 0
        await assert_books_match(ledgers[1], dbs[1], books)
    finally:
        for node in ledgers:
            await node.close()
        for db in dbs:
            await db.close()


async def test_close_applies_what_was_queued(db: Database) -> None:
    ledger = await Ledger.open(db)
    await ledger.post(recharge(1, 100), key="r", kind="recharge")
    posts = [asyncio.ensure_future(ledger.post(gift(1, 2, 1), key=f"g{i}", kind="gift")) for i in range(20)]
    await asyncio.sleep(0)  # every post is queued
    await ledger.close()
    assert all(isinstance(p.result(), Posting) for p in posts)
    with pytest.raises(LedgerError):
        await ledger.post(gift(1, 2, 1), key="late", kind="gift")
    reopened = await Ledger.open(db)  # migrations already applied: opens as is
    try:
        assert await reopened.balance(wallet(1)) == 80
        await assert_books_clean(reopened, db)
    finally:
        await reopened.close()


def test_a_batch_is_decided_in_queue_order() -> None:
    """The in-memory funds check of one batch (sans-IO): a gift queued after the recharge that
    covers it goes through, one queued before it does not; followers of a key wait for it."""
    def request(legs: list[Leg], key: str) -> Request:
        checked, memo, memo_json, lines = validate(legs, key, "t", None)
        return Request(key, "t", checked, memo, legs_signature(checked), memo_json, lines)

    early_gift = request(gift(1, 9, 50), "early")
    top_up = request(recharge(1, 100), "top-up")
    late_gift = request(gift(1, 9, 80), "late")
    late_again = request(gift(1, 9, 80), "late")
    too_much = request(gift(1, 9, 31), "too-much")
    plan = plan_batch([early_gift, top_up, late_gift, late_again, too_much], {}, {wallet(1): 10})
    assert plan.accepted == [top_up, late_gift]
    assert isinstance(plan.answers[id(early_gift)], InsufficientFunds)
    assert plan.followers == {id(late_again): late_gift}
    refused = plan.answers[id(too_much)]
    assert isinstance(refused, InsufficientFunds) and (refused.balance, refused.needed) == (30, 31)
    assert plan.deltas == {SANDBOX: -100, wallet(1): 100 - 80, earnings(9): 64, PLATFORM: 16}


def test_the_stored_legs_signature_never_changes() -> None:
    """Postings store this text and replays compare against it: a new format would turn the replay
    of an older key into a KeyConflict. Legs in any order give the same text."""
    legs = [Leg(wallet(7), PLATFORM, 5), Leg(wallet(7), earnings(3), 20), Leg(SANDBOX, wallet(7), 100)]
    expected = ('[["clearing:sandbox","wallet:7",100],["wallet:7","earnings:3",20],'
                '["wallet:7","platform",5]]')
    assert legs_signature(legs) == expected
    assert legs_signature(tuple(reversed(legs))) == expected
