"""The ledger's vocabulary and its decisions, without I/O.

A batch of posting requests plus what the store says (postings already recorded under the
same keys, the balances of every account the batch touches, read under lock) goes in; what to
record and what to answer each caller comes out. ``gifts.ledger`` does the I/O around it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

PLATFORM = "platform"
CLEARING_PREFIX = "clearing:"
MAX_AMOUNT = 10**15  # far above any real purchase, far below a 64-bit overflow of any sum
MAX_LEGS = 16
MAX_KEY = 200
MAX_KIND = 64
MAX_MEMO_BYTES = 4096
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")  # NUL cannot even be stored in PostgreSQL text
_JSON = json.JSONEncoder(separators=(",", ":"), allow_nan=False)  # one encoder, not one per call
ACCOUNT_RE = re.compile(r"[a-z][a-z_]{0,31}(?::[A-Za-z0-9_.-]{1,100})?")


def wallet(user_id: int) -> str:
    """A viewer's coins."""
    return f"wallet:{int(user_id)}"


def earnings(user_id: int) -> str:
    """An anchor's earned coins."""
    return f"earnings:{int(user_id)}"


def clearing(provider: str) -> str:
    """A payment provider's clearing account: it mirrors money received, so it goes negative."""
    return f"{CLEARING_PREFIX}{provider}"


def may_go_negative(account: str) -> bool:
    return account.startswith(CLEARING_PREFIX)


class LedgerError(Exception):
    """The ledger refuses a request."""


class InvalidRequest(LedgerError, ValueError):
    """Malformed legs, key, kind, memo or paging arguments."""


class InsufficientFunds(LedgerError):
    """A debited wallet/earnings account would go below 0 (HTTP 402)."""

    def __init__(self, account: str, balance: int, needed: int) -> None:
        super().__init__(f"{account} holds {balance}, needs {needed}")
        self.account = account
        self.balance = balance
        self.needed = needed


class KeyConflict(LedgerError):
    """The idempotency key was already used for other legs."""


@dataclass(frozen=True)
class Leg:
    """One movement: ``amount`` > 0 leaves ``debit`` and enters ``credit``."""

    debit: str
    credit: str
    amount: int


@dataclass(frozen=True)
class Posting:
    """One atomic, balanced group of legs."""

    id: int
    key: str
    kind: str
    legs: tuple[Leg, ...]
    memo: dict[str, Any]
    created_at: float
    replayed: bool  # the key had already been posted: nothing moved this time
    #: the balance of each account the legs touch right after this posting (in the order the
    #: batch applied its posts); empty for a replay, whose moves happened earlier
    balances: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Entry:
    """One line of an account's statement, one per posting that changed the account;
    ``amount`` is signed (+ credit, - debit)."""

    posting_id: int
    account: str
    amount: int
    counterparty: str
    kind: str
    memo: dict[str, Any]
    created_at: float


@dataclass(frozen=True)
class Audit:
    postings: int
    balanced: bool  # every posting's entries sum to zero (and every posting has entries)
    cached_match: bool  # the cached balances equal the sums of the entries
    negative: list[str]  # non-clearing accounts below zero
    total: int  # sum of all balances: 0 in double entry
    unbalanced: list[int] = field(default_factory=list)  # a few offending posting ids
    mismatched: list[str] = field(default_factory=list)  # a few accounts whose cache is wrong

    @property
    def ok(self) -> bool:
        return self.balanced and self.cached_match and not self.negative and self.total == 0


# -- requests -------------------------------------------------------------------------------

def legs_signature(legs: Iterable[Leg]) -> str:
    """The legs as stored (a JSON list), order-insensitive, to tell a replay from a reuse.

    Written by hand: it runs for every post, and validated account names need no escaping.
    """
    # lists, not generators: a third cheaper for the usual two legs (the text is stored: never
    # change what this returns, or replays of older keys would read as conflicts)
    items = [(leg.debit, leg.credit, leg.amount) for leg in legs]
    items.sort()
    return "[" + ",".join([f'["{debit}","{credit}",{amount}]' for debit, credit, amount in items]) + "]"


def legs_from_signature(text: str) -> tuple[Leg, ...]:
    return tuple(Leg(debit, credit, amount) for debit, credit, amount in json.loads(text))


_checked_accounts: set[str] = set()  # names already matched (a hot path checks the same few)


def check_account(account: object) -> str:
    if isinstance(account, str) and account in _checked_accounts:
        return account
    if not isinstance(account, str) or not ACCOUNT_RE.fullmatch(account):
        raise InvalidRequest(f"bad account {account!r}")
    if len(_checked_accounts) > 100_000:
        _checked_accounts.clear()
    _checked_accounts.add(account)
    return account


def validate(legs: Sequence[Leg], key: object, kind: object,
             memo: object) -> tuple[tuple[Leg, ...], dict, str, list[tuple[str, int, str]]]:
    """The request's legs, memo, memo as JSON and statement lines, or InvalidRequest saying
    what is wrong."""
    if not isinstance(key, str) or not 0 < len(key) <= MAX_KEY or _CONTROL.search(key):
        raise InvalidRequest(f"the idempotency key must be 1..{MAX_KEY} printable characters")
    if not isinstance(kind, str) or not 0 < len(kind) <= MAX_KIND or _CONTROL.search(kind):
        raise InvalidRequest(f"the kind must be 1..{MAX_KIND} printable characters")
    # tuple and list first: isinstance() against the Sequence ABC is slow, and this runs per post
    is_sequence = type(legs) in (tuple, list) or (not isinstance(legs, Leg) and isinstance(legs, Sequence))
    if not is_sequence or not 0 < len(legs) <= MAX_LEGS:
        raise InvalidRequest(f"a posting has 1..{MAX_LEGS} legs")
    for leg in legs:
        if type(leg) is not Leg:
            raise InvalidRequest(f"not a Leg: {leg!r}")
        debit, credit, amount = leg.debit, leg.credit, leg.amount
        if type(debit) is not str or debit not in _checked_accounts:
            check_account(debit)
        if type(credit) is not str or credit not in _checked_accounts:
            check_account(credit)
        if debit == credit:
            raise InvalidRequest(f"a leg moves coins from {debit} to itself")
        if type(amount) is not int or not 0 < amount <= MAX_AMOUNT:
            raise InvalidRequest(f"a leg's amount must be an integer in 1..{MAX_AMOUNT}")
    lines = statement_lines(legs)
    if not lines:
        raise InvalidRequest("the legs cancel out: the posting would move nothing")
    if not memo:
        if memo is not None and not isinstance(memo, dict):
            raise InvalidRequest("the memo must be a JSON object")
        return tuple(legs), {}, "{}", lines
    if not isinstance(memo, dict):
        raise InvalidRequest("the memo must be a JSON object")
    try:
        memo_json = _JSON.encode(memo)
    except (TypeError, ValueError) as exc:
        raise InvalidRequest(f"the memo is not JSON: {exc}") from exc
    if len(memo_json) > MAX_MEMO_BYTES:
        raise InvalidRequest(f"the memo is over {MAX_MEMO_BYTES} bytes")
    return tuple(legs), memo, memo_json, lines


def statement_lines(legs: Iterable[Leg]) -> list[tuple[str, int, str]]:
    """A posting's entries: one per account it changes, ``(account, signed amount, counterparty)``.

    One line per account and posting (a gift debits the wallet once, for the anchor's and the
    platform's parts together) keeps statements one line per event and the hot insert path
    short; the counterparty is the other side of the account's largest leg (a gift's wallet
    line names the anchor). The lines of a posting sum to zero like its legs.
    """
    net: dict[str, int] = {}
    largest: dict[str, tuple[int, str]] = {}  # account -> (its largest leg's amount, other side)
    for leg in legs:  # unrolled for the debit and the credit: this runs for every post
        debit, credit, amount = leg.debit, leg.credit, leg.amount
        net[debit] = net.get(debit, 0) - amount
        net[credit] = net.get(credit, 0) + amount
        top = largest.get(debit)
        if top is None or amount > top[0]:
            largest[debit] = (amount, credit)
        top = largest.get(credit)
        if top is None or amount > top[0]:
            largest[credit] = (amount, debit)
    return [(account, delta, largest[account][1]) for account, delta in net.items() if delta]


@dataclass(eq=False)
class Request:
    """One ``post()`` waiting for the writer."""

    key: str
    kind: str
    legs: tuple[Leg, ...]
    memo: dict[str, Any]
    signature: str
    memo_json: str
    lines: list[tuple[str, int, str]]  # statement_lines(legs): the net change of each account


@dataclass(frozen=True)
class StoredPosting:
    """A posting row as read back from the store."""

    id: int
    key: str
    kind: str
    signature: str
    memo_json: str
    created_at: float

    def posting(self, *, replayed: bool) -> Posting:
        return Posting(self.id, self.key, self.kind, legs_from_signature(self.signature),
                       json.loads(self.memo_json), self.created_at, replayed)


# -- one batch ------------------------------------------------------------------------------

@dataclass
class Plan:
    """What a batch records and answers.

    ``accepted`` are recorded (in order); ``answers`` holds the answer of every request that is
    not (an exception, or a replayed Posting); ``followers`` maps a request to the earlier
    request of the same batch with the same key, whose outcome decides its answer.
    """

    accepted: list[Request] = field(default_factory=list)
    #: the balances of an accepted request's accounts right after it, by id(request)
    balances_after: dict[int, dict[str, int]] = field(default_factory=dict)
    answers: dict[int, Posting | LedgerError] = field(default_factory=dict)  # by id(request)
    followers: dict[int, Request] = field(default_factory=dict)
    deltas: dict[str, int] = field(default_factory=dict)  # net change per account, zero omitted


def plan_batch(batch: Sequence[Request], existing: Mapping[str, StoredPosting],
               balances: Mapping[str, int]) -> Plan:
    """Decide each request against balances read under lock in the same transaction.

    The funds check runs in memory, in queue order, against a working copy of the balances, so
    a request that cannot be covered fails alone and the rest of the batch still commits in
    one transaction (no savepoints, no second round trip).
    """
    plan = Plan()
    working = dict(balances)
    first_of_key: dict[str, Request] = {}
    for request in batch:
        stored = existing.get(request.key)
        if stored is not None:
            plan.answers[id(request)] = (stored.posting(replayed=True)
                                         if stored.signature == request.signature else
                                         KeyConflict(f"key {request.key!r} was posted with other legs"))
            continue
        earlier = first_of_key.get(request.key)
        if earlier is not None:
            plan.followers[id(request)] = earlier
            continue
        first_of_key[request.key] = request
        shortfall: tuple[str, int, int] | None = None
        for account, delta, _ in request.lines:
            if delta < 0:
                held = working.get(account, 0)
                if held + delta < 0 and not may_go_negative(account) and (
                        shortfall is None or account < shortfall[0]):  # report the same one every time
                    shortfall = (account, held, -delta)
        if shortfall is not None:
            plan.answers[id(request)] = InsufficientFunds(*shortfall)
            continue
        after = {}
        for account, delta, _ in request.lines:
            after[account] = working[account] = working.get(account, 0) + delta
        plan.accepted.append(request)
        plan.balances_after[id(request)] = after
    for account, value in working.items():
        delta = value - balances.get(account, 0)
        if delta:
            plan.deltas[account] = delta
    return plan


def follower_answer(follower: Request, leader: Request, leader_answer: Posting | BaseException) -> (
        Posting | BaseException):
    """The answer to a request whose key an earlier request of the same batch carried."""
    if follower.signature != leader.signature:
        return KeyConflict(f"key {follower.key!r} was posted with other legs")
    if isinstance(leader_answer, Posting):
        return Posting(leader_answer.id, leader_answer.key, leader_answer.kind, leader_answer.legs,
                       leader_answer.memo, leader_answer.created_at, replayed=True)
    return leader_answer

