"""Recharge without HTTP: the webhook signature (sans-IO) and orders on a real store + ledger."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest

from gifts.ledger import Ledger, clearing, wallet
from gifts.payments import (
    FAILED,
    OrderConflict,
    Payments,
    UnknownOrder,
    WebhookRejected,
    event_body,
    parse_event,
    sign,
    verify,
)
from livesrv.db import Database

SECRET = b"whsec_test"
NOW = 1_700_000_000


def rejected(header: str | None, body: bytes, *, now: float = NOW, secret: bytes = SECRET) -> str:
    with pytest.raises(WebhookRejected) as info:
        verify(header, body, secret, now=now, tolerance=300)
    return info.value.reason


def test_a_good_signature_verifies() -> None:
    body = event_body(7, event_id="evt_1")
    header = sign(SECRET, body, NOW)
    assert header.startswith(f"t={NOW},v1=") and len(header.partition("v1=")[2]) == 64
    assert verify(header, body, SECRET, now=NOW + 299, tolerance=300).timestamp == NOW
    # several v1 values (a rotated secret) and unknown schemes: one match is enough
    other = sign(b"old secret", body, NOW).partition(",")[2]
    assert verify(f"t={NOW},{other},v0=abc,{header.partition(',')[2]}", body, SECRET, now=NOW,
                  tolerance=300).timestamp == NOW


def test_forged_signatures_are_refused() -> None:
    body = event_body(7, event_id="evt_1")
    header = sign(SECRET, body, NOW)
    assert rejected(header, body.replace(b"7", b"8")) == "forged"  # body changed
    assert rejected(header.replace(f"t={NOW}", f"t={NOW + 1}"), body) == "forged"  # time changed
    assert rejected(sign(b"wrong", body, NOW), body) == "forged"
    digest = header.partition("v1=")[2]
    flipped = digest[:-1] + ("0" if digest[-1] != "0" else "1")
    assert rejected(f"t={NOW},v1={flipped}", body) == "forged"


def test_stale_and_future_signatures_are_refused() -> None:
    body = event_body(7)
    assert rejected(sign(SECRET, body, NOW - 301), body) == "stale"
    assert rejected(sign(SECRET, body, NOW + 301), body) == "stale"


@pytest.mark.parametrize("header", [
    "", "garbage", "t=,v1=00", f"t={NOW}", "v1=" + "0" * 64, f"t=abc,v1={'0' * 64}",
    f"t={NOW},v1=xyz", f"t={NOW},v1={'A' * 64}", f"t={NOW},t={NOW},v1={'0' * 64}", f"t=-5,v1={'0' * 64}",
])
def test_malformed_signatures_are_refused(header: str) -> None:
    assert rejected(header, b"{}") in ("malformed", "missing")


def test_missing_signature_or_secret() -> None:
    assert rejected(None, b"{}") == "missing"
    body = event_body(7)
    assert rejected(sign(b"", body, NOW), body, secret=b"") == "no_secret"


@pytest.mark.parametrize("body", [
    b"not json", b"[]", b'{"type":"payment.succeeded","order":1}',
    b'{"id":"e","type":"refund","order":1}', b'{"id":"e","type":"payment.succeeded","order":"1"}',
    b'{"id":"e","type":"payment.succeeded","order":0}', b'{"id":"e","type":"payment.succeeded","order":true}',
    b'{"id":"e","type":"payment.succeeded","order":1,"amount_cents":"5"}', b"\xff\xfe",
])
def test_malformed_bodies_are_refused(body: bytes) -> None:
    with pytest.raises(WebhookRejected) as info:
        parse_event(body)
    assert info.value.status == 400


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def store(db: Database) -> AsyncIterator[tuple[Payments, Ledger, Clock]]:
    ledger = await Ledger.open(db)
    clock = Clock(NOW)
    payments = Payments(db, ledger, secret=SECRET, tolerance=300, provider="psp", clock=clock)
    await payments.migrate()
    await payments.migrate()  # idempotent
    yield payments, ledger, clock
    await ledger.close()


async def test_orders_are_idempotent_by_user_and_key(store: tuple[Payments, Ledger, Clock]) -> None:
    payments, _, _ = store
    first, created = await payments.create_order(1, "k1", coins=100, price_cents=100, currency="USD")
    assert created and first.status == "pending" and first.provider == "psp"
    again, created = await payments.create_order(1, "k1", coins=100, price_cents=100, currency="USD")
    assert not created and again == first
    other, created = await payments.create_order(2, "k1", coins=100, price_cents=100, currency="USD")
    assert created and other.id != first.id
    with pytest.raises(OrderConflict):
        await payments.create_order(1, "k1", coins=5, price_cents=5, currency="USD")


async def test_webhook_credits_exactly_once(store: tuple[Payments, Ledger, Clock]) -> None:
    payments, ledger, clock = store
    order, _ = await payments.create_order(1, "k1", coins=300, price_cents=499, currency="USD")
    body, header = payments.signed_event(order)
    paid = await payments.handle_webhook(header, body)
    assert (paid.status, paid.credited) == ("paid", True)
    assert await ledger.balance(wallet(1)) == 300
    assert await ledger.balance(clearing("psp")) == -300
    # the same request again is a replay: refused, nothing moves
    with pytest.raises(WebhookRejected) as info:
        await payments.handle_webhook(header, body)
    assert info.value.reason == "replayed"
    # the provider's retry (signed again, later) is accepted and credits nothing more
    clock.now += 60
    retry_body, retry_header = payments.signed_event(order)
    assert (await payments.handle_webhook(retry_header, retry_body)).status == "paid"
    # a late "failed" event does not undo a payment
    clock.now += 1
    failed_body, failed_header = payments.signed_event(order, kind=FAILED)
    assert (await payments.handle_webhook(failed_header, failed_body)).status == "paid"
    assert await ledger.balance(wallet(1)) == 300
    assert (await ledger.audit()).balanced


async def test_bad_webhooks_change_nothing(store: tuple[Payments, Ledger, Clock]) -> None:
    payments, ledger, clock = store
    order, _ = await payments.create_order(1, "k1", coins=50, price_cents=50, currency="USD")
    body = event_body(order.id, amount_cents=50, currency="USD")
    cheap = event_body(order.id, amount_cents=1)
    cases = [
        (sign(b"forged", body, NOW), body, "forged"),
        (sign(SECRET, body, NOW - 1000), body, "stale"),
        ("t=1,v1=zz", body, "malformed"),
        (None, body, "missing"),
        (sign(SECRET, b"{", NOW), b"{", "malformed_body"),
        (sign(SECRET, cheap, NOW), cheap, "amount_mismatch"),
    ]
    for header, raw, reason in cases:
        with pytest.raises(WebhookRejected) as info:
            await payments.handle_webhook(header, raw)
        assert info.value.reason == reason
    unknown = event_body(order.id + 1000)
    with pytest.raises(UnknownOrder):
        await payments.handle_webhook(sign(SECRET, unknown, NOW), unknown)
    assert (await payments.get(order.id)).status == "pending"  # type: ignore[union-attr]
    assert await ledger.balance(wallet(1)) == 0
    failed_body = event_body(order.id, kind=FAILED)
    assert (await payments.handle_webhook(sign(SECRET, failed_body, NOW), failed_body)).status == "failed"
    # a failed order cannot be paid afterwards
    clock.now += 1
    ok_body, ok_header = payments.signed_event(order)
    assert (await payments.handle_webhook(ok_header, ok_body)).status == "failed"
    assert await ledger.balance(wallet(1)) == 0


async def test_recover_credits_orders_paid_but_not_credited(store: tuple[Payments, Ledger, Clock]) -> None:
    payments, ledger, _ = store
    order, _ = await payments.create_order(3, "k", coins=70, price_cents=70, currency="USD")
    # what a crash between "mark paid" and "credit" leaves behind
    await payments.db.execute("UPDATE payment_orders SET status = 'paid' WHERE id = ?", order.id)
    assert await payments.recover() == 1
    assert await payments.recover() == 0
    assert await ledger.balance(wallet(3)) == 70
    # a crash after the credit but before marking it: crediting again moves nothing
    await payments.db.execute("UPDATE payment_orders SET credited = 0 WHERE id = ?", order.id)
    assert await payments.recover() == 1
    assert await ledger.balance(wallet(3)) == 70


async def test_sandbox_pays_through_the_webhook_path(store: tuple[Payments, Ledger, Clock]) -> None:
    payments, ledger, _ = store
    order, _ = await payments.create_order(4, "k", coins=60, price_cents=99, currency="USD")
    paid = await payments.pay_in_sandbox(order)
    assert paid.status == "paid" and paid.credited
    assert await payments.pay_in_sandbox(paid) == paid
    assert await ledger.balance(wallet(4)) == 60
    rows = await payments.db.fetchall("SELECT event_id FROM payment_webhook_signatures")
    assert len(rows) == 1 and json.dumps(rows[0]["event_id"]).startswith('"evt_')
