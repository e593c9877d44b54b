"""Coins and gifts over HTTP: the catalog, the wallet, recharge and its payment webhook, sending
gifts to a room, records and leaderboards.

The logic is in ``gifts``; this module adapts requests to it, opens the ledger for the app's
lifetime and maps ledger accounts (``wallet:42``) to usernames for display.
"""

from __future__ import annotations

import functools
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from chat.room import topic
from gifts import metrics
from gifts.catalog import Catalog, load_catalog
from gifts.ledger import (
    PLATFORM,
    InsufficientFunds,
    InvalidRequest,
    KeyConflict,
    Ledger,
    LedgerError,
    earnings,
    wallet,
)
from gifts.payments import SIGNATURE_HEADER, OrderConflict, Payments, UnknownOrder, WebhookRejected
from gifts.service import MAX_KEY_LENGTH, GiftError, GiftService
from gifts.settings import GiftSettings

from ..db import DatabaseError
from ..keys import BUS, DB, HUB, SETTINGS
from .auth import ACCOUNTS, json_error, read_json, require_user
from .ops import add_readiness

log = logging.getLogger(__name__)

CHANNEL = "{channel:[A-Za-z0-9_-]{1,32}}"
MAX_PAGE = 100
CHANNEL_TTL = 30.0  # seconds a channel name → anchor id lookup is kept (users are never renamed)
NAMES_MAX = 100_000


@dataclass
class Wallet:
    """Everything the wallet routes share, one per app."""

    settings: GiftSettings
    catalog: Catalog
    sandbox: bool
    ledger: Ledger
    payments: Payments
    gifts: GiftService
    names: dict[int, str]
    channels: dict[str, tuple[float, int]]


WALLET = web.AppKey("wallet", Wallet)
routes = web.RouteTableDef()
Handler = Callable[[web.Request], Awaitable[web.Response]]


def store_errors(handler: Handler) -> Handler:
    """A store or ledger that cannot answer now (unreachable, shutting down) is a 503 with a
    JSON error, not a 500: the client may retry with the same idempotency key."""

    @functools.wraps(handler)
    async def wrapped(request: web.Request) -> web.Response:
        try:
            return await handler(request)
        except InvalidRequest as exc:
            raise json_error(400, str(exc)) from None
        except (DatabaseError, LedgerError) as exc:
            log.warning("%s %s: %s", request.method, request.path, exc)
            raise json_error(503, "the wallet is unavailable, retry with the same idempotency_key") from None

    return wrapped


def _embedded(app: web.Application) -> bool:
    settings = app[SETTINGS]
    return settings.database is None and settings.redis is None


async def _wallet_lifetime(app: web.Application) -> AsyncIterator[None]:
    settings: GiftSettings = app[_GIFT_SETTINGS]
    catalog: Catalog = app[_CATALOG]
    sandbox = settings.sandbox_on(_embedded(app))
    db = app[DB]
    ledger = await Ledger.open(db, **app[SETTINGS].tables.get("ledger", {}))
    secret = settings.webhook_secret.encode()
    if not secret and sandbox:
        secret = secrets.token_bytes(32)  # only this process signs and verifies sandbox events
    elif not secret:
        log.warning("[gifts] webhook_secret is not set: payment webhooks will be refused")
    payments = Payments(db, ledger, secret=secret, tolerance=settings.webhook_tolerance_seconds,
                        provider=settings.provider_name(_embedded(app)))
    await payments.migrate()
    recovered = await payments.recover()
    if recovered:
        log.warning("credited %d paid recharge order(s) left uncredited by a crash", recovered)

    async def publish(channel: str, event: dict[str, Any]) -> None:
        await app[BUS].publish(topic(channel), event)

    app[WALLET] = Wallet(settings, catalog, sandbox, ledger, payments,
                         GiftService(ledger, catalog, settings, publish), {}, {})
    log.info("wallet ready (%d gifts, %d packages, sandbox %s)", len(catalog.gifts),
             len(catalog.packages), "on" if sandbox else "off")
    yield
    await ledger.close()


# -- helpers --------------------------------------------------------------------------------

async def _username(app: web.Application, user_id: int) -> str:
    state = app[WALLET]
    name = state.names.get(user_id)
    if name is None:
        user = await app[ACCOUNTS].get_by_id(user_id)
        name = user.username if user else f"user{user_id}"
        if len(state.names) >= NAMES_MAX:
            state.names.clear()
        state.names[user_id] = name
    return name


async def _display(app: web.Application, account: str) -> str:
    """A ledger account as shown to people: a username, "platform" or the payment provider."""
    kind, _, ident = account.partition(":")
    if kind in ("wallet", "earnings") and ident.isdigit():
        return await _username(app, int(ident))
    return ident if kind == "clearing" else account


async def _anchor_id(app: web.Application, channel: str) -> int:
    """The user id of the channel's anchor; 404 for no such channel."""
    state = app[WALLET]
    now = time.monotonic()
    cached = state.channels.get(channel)
    if cached is not None and cached[0] > now:
        return cached[1]
    user = await app[ACCOUNTS].get(channel)
    if user is None:
        raise json_error(404, f"no channel {channel!r}")
    if len(state.channels) >= NAMES_MAX:
        state.channels.clear()
    state.channels[channel] = (now + CHANNEL_TTL, user.id)
    state.names[user.id] = user.username
    return user.id


def _key(body: dict[str, Any]) -> str:
    key = body.get("idempotency_key")
    if not isinstance(key, str) or not 0 < len(key) <= MAX_KEY_LENGTH:
        raise json_error(400, f"idempotency_key must be a string of 1..{MAX_KEY_LENGTH} characters")
    return key


def _int_query(request: web.Request, name: str, default: int | None, low: int, high: int) -> int | None:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    if not raw.isdigit() or not low <= int(raw) <= high:
        raise json_error(400, f"{name} must be an integer {low}..{high}")
    return int(raw)


# -- catalog and wallet ---------------------------------------------------------------------

@routes.get("/api/gifts")
@store_errors
async def list_gifts(request: web.Request) -> web.Response:
    return web.json_response([g.public() for g in request.app[_CATALOG].gifts.values()])


@routes.get("/api/wallet/packages")
@store_errors
async def list_packages(request: web.Request) -> web.Response:
    return web.json_response([p.public() for p in request.app[_CATALOG].packages.values()])


@routes.get("/api/wallet")
@store_errors
async def get_wallet(request: web.Request) -> web.Response:
    user = await require_user(request)
    ledger = request.app[WALLET].ledger
    return web.json_response({"balance": await ledger.balance(wallet(user.id)),
                              "earnings": await ledger.balance(earnings(user.id))},
                             headers={"Cache-Control": "no-store"})


@routes.post("/api/wallet/recharge")
@store_errors
async def recharge(request: web.Request) -> web.Response:
    user = await require_user(request)
    body = await read_json(request)
    state = request.app[WALLET]
    key = _key(body)
    coins, package_id = body.get("coins"), body.get("package")
    if (coins is None) == (package_id is None):
        raise json_error(400, "give either coins or package")
    package = None
    if package_id is not None:
        package = state.catalog.packages.get(package_id) if isinstance(package_id, str) else None
        if package is None:
            raise json_error(404, f"unknown package {package_id!r}")
        coins, price_cents, currency = package.coins, package.price_cents, package.currency
    else:
        limit = state.settings.max_recharge_coins
        if not isinstance(coins, int) or isinstance(coins, bool) or not 1 <= coins <= limit:
            raise json_error(400, f"coins must be an integer 1..{limit}")
        price_cents, currency = coins * state.settings.coin_price_cents, state.settings.currency
    try:
        order, created = await state.payments.create_order(
            user.id, key, coins=coins, price_cents=price_cents, currency=currency,
            package=package.id if package else None)
    except OrderConflict as exc:
        raise json_error(409, str(exc)) from None
    if created:
        metrics.RECHARGES.labels("created").inc()
    if state.sandbox:
        order = await state.payments.pay_in_sandbox(order)
    elif order.status == "paid" and not order.credited:
        order = await state.payments.credit(order)
    balance = await state.ledger.balance(wallet(user.id))
    return web.json_response({**order.public(), "balance": balance}, status=201)


@routes.post("/api/payments/webhook")
@store_errors
async def payment_webhook(request: web.Request) -> web.Response:
    raw = await request.content.read(64 * 1024 + 1)
    if len(raw) > 64 * 1024:
        raise json_error(413, "body larger than 65536 bytes")
    try:
        order = await request.app[WALLET].payments.handle_webhook(
            request.headers.get(SIGNATURE_HEADER), raw)
    except WebhookRejected as exc:
        raise json_error(exc.status, str(exc), reason=exc.reason) from None
    except UnknownOrder as exc:
        raise json_error(404, str(exc)) from None
    return web.json_response({"order": order.id, "status": order.status})


@routes.get("/api/wallet/transactions")
@store_errors
async def transactions(request: web.Request) -> web.Response:
    """The user's records, newest first: wallet and earnings merged, one item per posting."""
    user = await require_user(request)
    app = request.app
    ledger = app[WALLET].ledger
    limit = _int_query(request, "limit", 20, 1, MAX_PAGE) or 20
    before = _int_query(request, "before", None, 1, 2**62)
    # a posting gives an account at most 2 entries (a gift's anchor and platform legs), so this
    # many entries per account always hold more than `limit` whole postings when there are
    fetch = 2 * limit + 2
    groups: dict[int, list[Any]] = {}
    cutoff = 0  # postings at or below this id may be cut short by a full fetch: left for later
    for account in (wallet(user.id), earnings(user.id)):
        entries = await ledger.statement(account, before=before, limit=fetch)
        for entry in entries:
            groups.setdefault(entry.posting_id, []).append(entry)
        if len(entries) == fetch:
            cutoff = max(cutoff, min(e.posting_id for e in entries))
    ids = sorted((pid for pid in groups if pid > cutoff), reverse=True)
    page, more = ids[:limit], len(ids) > limit or cutoff > 0
    items = []
    for posting_id in page:
        entries = groups[posting_id]
        first = entries[0]
        # of a gift's two legs the anchor is the counterparty that matters, not the platform
        counterparty = next((e.counterparty for e in entries if e.counterparty != PLATFORM),
                            first.counterparty)
        memo = first.memo or {}
        items.append({"id": posting_id, "kind": first.kind, "amount": sum(e.amount for e in entries),
                      "counterparty": await _display(app, counterparty), "gift": memo.get("gift"),
                      "channel": memo.get("channel"), "count": memo.get("count"),
                      "ts": first.created_at})
    return web.json_response({"transactions": items, "next": page[-1] if page and more else None},
                             headers={"Cache-Control": "no-store"})


# -- rooms ----------------------------------------------------------------------------------

@routes.post(f"/api/rooms/{CHANNEL}/gifts")
@store_errors
async def send_gift(request: web.Request) -> web.Response:
    user = await require_user(request)
    body = await read_json(request)
    app = request.app
    channel = request.match_info["channel"].lower()
    anchor_id = await _anchor_id(app, channel)
    try:
        result = await app[WALLET].gifts.send(
            viewer_id=user.id, viewer_name=user.username, anchor_id=anchor_id, channel=channel,
            gift_id=body.get("gift"), count=body.get("count", 1),
            idempotency_key=body.get("idempotency_key"))
    except GiftError as exc:
        metrics.GIFTS_REFUSED.labels("not_found" if exc.status == 404 else "bad_request").inc()
        raise json_error(exc.status, str(exc)) from None
    except InsufficientFunds as exc:
        metrics.GIFTS_REFUSED.labels("insufficient_funds").inc()
        raise json_error(402, "not enough coins", balance=exc.balance, needed=exc.needed) from None
    except KeyConflict:
        metrics.GIFTS_REFUSED.labels("key_conflict").inc()
        raise json_error(409, "idempotency_key was already used for a different gift") from None
    except InvalidRequest as exc:
        metrics.GIFTS_REFUSED.labels("invalid").inc()
        raise json_error(400, str(exc)) from None
    return web.json_response({"balance": result.balance, "gift": result.gift.id, "count": result.count,
                              "id": result.id, "combo": result.combo, "replayed": result.replayed})


@routes.get(f"/api/rooms/{CHANNEL}/leaderboard")
@store_errors
async def leaderboard(request: web.Request) -> web.Response:
    app = request.app
    channel = request.match_info["channel"].lower()
    scope = request.query.get("scope", "live")
    if scope not in ("live", "all"):
        raise json_error(400, "scope must be live or all")
    limit = _int_query(request, "limit", 10, 1, 100) or 10
    anchor_id = await _anchor_id(app, channel)
    entries: list[dict[str, Any]] = []
    since: float | None = None
    if scope == "live":
        stream = app[HUB].get(channel)
        since = stream.started_at if stream is not None else None
    if scope == "all" or since is not None:  # offline: no current live, an empty board
        board = await app[WALLET].gifts.top_senders(anchor_id, since=since, limit=limit)
        entries = [{"user": await _display(app, account), "coins": coins} for account, coins in board]
    return web.json_response({"scope": scope, "entries": entries}, headers={"Cache-Control": "no-cache"})


_GIFT_SETTINGS = web.AppKey("gift_settings", GiftSettings)
_CATALOG = web.AppKey("gift_catalog", Catalog)


def setup(app: web.Application) -> None:
    # read now: a bad [gifts] table or catalog stops the server at start, with the reason
    settings = app[SETTINGS].section("gifts", GiftSettings)
    app[_GIFT_SETTINGS] = settings
    app[_CATALOG] = load_catalog(settings.catalog_path)
    app.add_routes(routes)
    app.cleanup_ctx.append(_wallet_lifetime)
    # ready once the wallet is up and its ledger can write (a writer process runs)
    add_readiness(app, "wallet", lambda: WALLET in app and app[WALLET].ledger.writing)
