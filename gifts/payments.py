"""Recharge: coin orders, and the payment provider's signed webhook that confirms them.

The signature (Stripe's scheme) is sans-IO: ``sign``/``verify`` take the time as an argument.
Header ``Livesrv-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, f"{t}.{body}")>``;
several ``v1`` values may be given (secret rotation), one matching is enough.

Exactly once: a confirmed order is first marked ``paid`` (one UPDATE from ``pending``, in the
same transaction that remembers the webhook's signature), then credited with a ledger posting
keyed ``recharge:{order_id}`` and marked ``credited``. The ledger refuses to post a key twice,
so a retry, a second node or the start-up recovery (``recover``: orders paid but not yet marked
credited, e.g. after a crash between the two steps) can drive the credit again safely.

Replays: a signature already seen is refused (an attacker resending a captured request). A
provider retrying an event signs it again (a new ``t``), so its retries are accepted and find
the order already paid: 200, nothing credited twice.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from livesrv.db import Database, Row

from . import metrics
from .ledger import Ledger, Leg, clearing, wallet

SIGNATURE_HEADER = "Livesrv-Signature"
SUCCEEDED = "payment.succeeded"
FAILED = "payment.failed"
EVENT_TYPES = (SUCCEEDED, FAILED)
MAX_KEY_LENGTH = 128


# -- signatures (sans-IO) -------------------------------------------------------------------

class WebhookRejected(Exception):
    """A webhook refused before it changed anything; ``reason`` is a metric label, ``status``
    the HTTP status to answer with."""

    def __init__(self, reason: str, message: str, status: int = 401) -> None:
        super().__init__(message)
        self.reason = reason
        self.status = status


@dataclass(frozen=True)
class Signature:
    timestamp: int
    header: str  # the header as received: its identity for replay detection


def sign(secret: bytes, body: bytes, timestamp: int) -> str:
    """The signature header value for ``body`` sent at ``timestamp``."""
    digest = hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


_HEX64 = re.compile(r"[0-9a-f]{64}")


def verify(header: str | None, body: bytes, secret: bytes, *, now: float, tolerance: float) -> Signature:
    """The signature of a webhook request, checked; ``WebhookRejected`` when missing,
    malformed, forged (no v1 matches) or stale (``t`` further than ``tolerance`` from ``now``)."""
    if not secret:
        raise WebhookRejected("no_secret", "webhooks are not configured on this server")
    if not header:
        raise WebhookRejected("missing", f"{SIGNATURE_HEADER} header is missing")
    timestamp: int | None = None
    candidates: list[str] = []
    for part in header.split(","):
        name, sep, value = part.strip().partition("=")
        if not sep:
            raise WebhookRejected("malformed", f"{SIGNATURE_HEADER} header is malformed")
        if name == "t":
            if timestamp is not None or not value.isdigit() or len(value) > 12:
                raise WebhookRejected("malformed", f"{SIGNATURE_HEADER}: bad timestamp")
            timestamp = int(value)
        elif name == "v1":
            if not _HEX64.fullmatch(value):
                raise WebhookRejected("malformed", f"{SIGNATURE_HEADER}: v1 must be 64 hex digits")
            candidates.append(value)
        # other schemes (v0, ...) are ignored, as Stripe's clients do
    if timestamp is None or not candidates:
        raise WebhookRejected("malformed", f"{SIGNATURE_HEADER} needs t= and v1=")
    expected = sign(secret, body, timestamp).partition("v1=")[2]
    # compare against every candidate (no early exit) in constant time
    matched = False
    for candidate in candidates:
        matched |= hmac.compare_digest(candidate, expected)
    if not matched:
        raise WebhookRejected("forged", "signature does not match")
    if abs(now - timestamp) > tolerance:
        raise WebhookRejected("stale", "signature timestamp is outside the tolerance")
    return Signature(timestamp, header.strip())


@dataclass(frozen=True)
class WebhookEvent:
    id: str
    type: str
    order: int
    amount_cents: int | None
    currency: str | None


def parse_event(body: bytes) -> WebhookEvent:
    """The event in a (verified) webhook body; ``WebhookRejected`` (400) when malformed."""

    def bad(message: str) -> WebhookRejected:
        return WebhookRejected("malformed_body", message, status=400)

    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise bad("body is not valid JSON") from None
    if not isinstance(data, dict):
        raise bad("body must be a JSON object")
    event_id, kind, order = data.get("id"), data.get("type"), data.get("order")
    if not isinstance(event_id, str) or not 0 < len(event_id) <= 200:
        raise bad("id must be a non-empty string")
    if kind not in EVENT_TYPES:
        raise bad(f"type must be one of {', '.join(EVENT_TYPES)}")
    if not isinstance(order, int) or isinstance(order, bool) or order <= 0:
        raise bad("order must be a positive integer")
    amount = data.get("amount_cents")
    if amount is not None and (not isinstance(amount, int) or isinstance(amount, bool)):
        raise bad("amount_cents must be an integer")
    currency = data.get("currency")
    if currency is not None and not isinstance(currency, str):
        raise bad("currency must be a string")
    return WebhookEvent(event_id, kind, order, amount, currency)


def event_body(order_id: int, *, kind: str = SUCCEEDED, amount_cents: int | None = None,
               currency: str | None = None, event_id: str | None = None) -> bytes:
    """A webhook body as the provider sends it (the sandbox and tests build theirs here)."""
    event: dict[str, Any] = {"id": event_id or f"evt_{secrets.token_hex(12)}", "type": kind,
                             "order": order_id}
    if amount_cents is not None:
        event["amount_cents"] = amount_cents
    if currency is not None:
        event["currency"] = currency
    return json.dumps(event, separators=(",", ":")).encode()


# -- orders ---------------------------------------------------------------------------------

MIGRATIONS = [
    {
        "sqlite": """
            CREATE TABLE payment_orders (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                user_id INTEGER NOT NULL,
                idempotency_key TEXT NOT NULL,
                provider TEXT NOT NULL,
                package TEXT,
                coins INTEGER NOT NULL CHECK (coins > 0),
                price_cents INTEGER NOT NULL CHECK (price_cents >= 0),
                currency TEXT NOT NULL,
                status TEXT NOT NULL DEFAULT 'pending',
                credited INTEGER NOT NULL DEFAULT 0,
                created_at REAL NOT NULL,
                paid_at REAL,
                UNIQUE (user_id, idempotency_key)
            );
            CREATE INDEX payment_orders_uncredited ON payment_orders(id)
                WHERE status = 'paid' AND credited = 0;
            CREATE TABLE payment_webhook_signatures (
                signature TEXT PRIMARY KEY,
                event_id TEXT NOT NULL,
                received_at REAL NOT NULL
            );
            CREATE INDEX payment_webhook_signatures_age ON payment_webhook_signatures(received_at);
        """,
        "postgresql": """
            CREATE TABLE payment_orders (
                id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                user_id BIGINT NOT NULL,
                idempotency_key TEXT NOT NULL,
                provider TEXT NOT NULL,
                package TEXT,
                coins BIGINT NOT NULL CHECK (coins > 0),
                price_cents BIGINT NOT NULL CHECK (price_cents >= 0),
                currency TEXT NOT NULL,
                status TEXT NOT NULL DEFAULT 'pending',
                credited INTEGER NOT NULL DEFAULT 0,
                created_at DOUBLE PRECISION NOT NULL,
                paid_at DOUBLE PRECISION,
                UNIQUE (user_id, idempotency_key)
            );
            CREATE INDEX payment_orders_uncredited ON payment_orders(id)
                WHERE status = 'paid' AND credited = 0;
            CREATE TABLE payment_webhook_signatures (
                signature TEXT PRIMARY KEY,
                event_id TEXT NOT NULL,
                received_at DOUBLE PRECISION NOT NULL
            );
            CREATE INDEX payment_webhook_signatures_age ON payment_webhook_signatures(received_at);
        """,
    },
]

_ORDER_COLUMNS = ("id, user_id, idempotency_key, provider, package, coins, price_cents, currency, "
                  "status, credited, created_at, paid_at")


class OrderConflict(ValueError):
    """The idempotency key was used before for a different order."""


class UnknownOrder(LookupError):
    pass


@dataclass(frozen=True)
class Order:
    id: int
    user_id: int
    idempotency_key: str
    provider: str
    package: str | None
    coins: int
    price_cents: int
    currency: str
    status: str  # pending | paid | failed
    credited: bool
    created_at: float
    paid_at: float | None

    def public(self) -> dict[str, Any]:
        return {"order": self.id, "status": self.status, "coins": self.coins,
                "price_cents": self.price_cents, "currency": self.currency, "package": self.package}


def _order(row: Row) -> Order:
    return Order(int(row["id"]), int(row["user_id"]), row["idempotency_key"], row["provider"],
                 row["package"], int(row["coins"]), int(row["price_cents"]), row["currency"],
                 row["status"], bool(row["credited"]), float(row["created_at"]),
                 None if row["paid_at"] is None else float(row["paid_at"]))


class Payments:
    def __init__(self, db: Database, ledger: Ledger, *, secret: bytes, tolerance: float,
                 provider: str, clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self.ledger = ledger
        self.secret = secret
        self.tolerance = tolerance
        self.provider = provider
        self.clock = clock
        self._last_prune = 0.0

    async def migrate(self) -> None:
        await self.db.migrate("payments", MIGRATIONS)

    async def get(self, order_id: int) -> Order | None:
        row = await self.db.fetchone(f"SELECT {_ORDER_COLUMNS} FROM payment_orders WHERE id = ?", order_id)
        return None if row is None else _order(row)

    async def create_order(self, user_id: int, idempotency_key: str, *, coins: int, price_cents: int,
                           currency: str, package: str | None = None) -> tuple[Order, bool]:
        """The order for ``(user_id, idempotency_key)``, created if new (second item: True).
        ``OrderConflict`` when the key was used for a different order."""
        row = await self.db.fetchone(
            f"INSERT INTO payment_orders (user_id, idempotency_key, provider, package, coins,"
            f" price_cents, currency, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
            f" ON CONFLICT (user_id, idempotency_key) DO NOTHING RETURNING {_ORDER_COLUMNS}",
            user_id, idempotency_key, self.provider, package, coins, price_cents, currency, self.clock())
        if row is not None:
            return _order(row), True
        row = await self.db.fetchone(
            f"SELECT {_ORDER_COLUMNS} FROM payment_orders WHERE user_id = ? AND idempotency_key = ?",
            user_id, idempotency_key)
        assert row is not None  # the conflicting row exists: orders are never deleted
        order = _order(row)
        if (order.coins, order.price_cents, order.currency, order.package) != (
                coins, price_cents, currency, package):
            raise OrderConflict("idempotency_key was already used for a different recharge")
        return order, False

    async def handle_webhook(self, header: str | None, body: bytes) -> Order:
        """Verify, then apply a webhook. ``WebhookRejected`` (nothing changed) or
        ``UnknownOrder``; otherwise the order as it stands afterwards."""
        now = self.clock()
        try:
            signature = verify(header, body, self.secret, now=now, tolerance=self.tolerance)
            event = parse_event(body)
        except WebhookRejected as exc:
            metrics.WEBHOOKS_REJECTED.labels(exc.reason).inc()
            raise
        order = await self.get(event.order)
        if order is None:
            metrics.WEBHOOKS_REJECTED.labels("unknown_order").inc()
            raise UnknownOrder(f"no order {event.order}")
        if (event.amount_cents is not None and event.amount_cents != order.price_cents) or (
                event.currency is not None and event.currency.upper() != order.currency):
            metrics.WEBHOOKS_REJECTED.labels("amount_mismatch").inc()
            raise WebhookRejected("amount_mismatch", "amount or currency differs from the order's", 400)
        new_status = "paid" if event.type == SUCCEEDED else "failed"
        async with self.db.transaction() as tx:
            seen = await tx.execute(
                "INSERT INTO payment_webhook_signatures (signature, event_id, received_at)"
                " VALUES (?, ?, ?) ON CONFLICT (signature) DO NOTHING", signature.header, event.id, now)
            if seen == 0:
                metrics.WEBHOOKS_REJECTED.labels("replayed").inc()
                raise WebhookRejected("replayed", "this signature was already used")
            changed = await tx.execute(
                "UPDATE payment_orders SET status = ?, paid_at = ? WHERE id = ? AND status = 'pending'",
                new_status, now if new_status == "paid" else None, order.id)
        metrics.WEBHOOKS_ACCEPTED.inc()
        if changed:
            metrics.RECHARGES.labels(new_status).inc()
        await self._prune_signatures(now)
        order = await self.get(order.id)
        assert order is not None
        if order.status == "paid" and not order.credited:
            order = await self.credit(order)
        return order

    async def credit(self, order: Order) -> Order:
        """Post a paid order's coins to the user's wallet (idempotent: keyed by the order)."""
        posting = await self.ledger.post(
            [Leg(clearing(order.provider), wallet(order.user_id), order.coins)],
            key=f"recharge:{order.id}", kind="recharge",
            memo={"order": order.id, "price_cents": order.price_cents, "currency": order.currency})
        await self.db.execute("UPDATE payment_orders SET credited = 1 WHERE id = ?", order.id)
        if not posting.replayed:
            metrics.RECHARGED_COINS.inc(order.coins)
        return await self.get(order.id) or order

    async def recover(self) -> int:
        """Credit every order marked paid but not credited (a crash between the two steps);
        returns how many there were."""
        rows = await self.db.fetchall(
            f"SELECT {_ORDER_COLUMNS} FROM payment_orders WHERE status = 'paid' AND credited = 0"
            " ORDER BY id")
        for row in rows:
            await self.credit(_order(row))
        return len(rows)

    def signed_event(self, order: Order, *, kind: str = SUCCEEDED) -> tuple[bytes, str]:
        """A body and signature header for ``order`` as the provider would send them."""
        body = event_body(order.id, kind=kind, amount_cents=order.price_cents, currency=order.currency)
        return body, sign(self.secret, body, int(self.clock()))

    async def pay_in_sandbox(self, order: Order) -> Order:
        """The sandbox provider: confirm ``order`` at once through the real webhook path."""
        if order.status != "pending":
            return order if order.credited or order.status != "paid" else await self.credit(order)
        body, header = self.signed_event(order)
        return await self.handle_webhook(header, body)

    async def _prune_signatures(self, now: float) -> None:
        """Signatures older than twice the tolerance cannot be replayed (they are stale)."""
        if now - self._last_prune < self.tolerance:
            return
        self._last_prune = now
        await self.db.execute("DELETE FROM payment_webhook_signatures WHERE received_at < ?",
                              now - 2 * self.tolerance)
