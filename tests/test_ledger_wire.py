"""What the server and the ledger's writer process say to each other (``gifts.ledger_wire``),
fed as bytes: frames survive any split, a corrupt stream is refused, and every kind of answer
comes back to the caller exactly as the in-process ledger would have answered it."""

from __future__ import annotations

import msgpack
import pytest

from gifts.ledger import _answers
from gifts.ledger_core import (
    PLATFORM,
    InsufficientFunds,
    KeyConflict,
    LedgerError,
    Leg,
    Posting,
    Request,
    StoredPosting,
    clearing,
    earnings,
    legs_signature,
    plan_batch,
    validate,
    wallet,
)
from gifts.ledger_wire import (
    MAX_FRAME,
    READY,
    FrameReader,
    WireError,
    decode_answers,
    decode_requests,
    encode_answers,
    encode_requests,
    frame,
)
from livesrv.db import DatabaseError, IntegrityError


def request(legs: list[Leg], key: str, kind: str = "gift", memo: dict | None = None) -> Request:
    checked, checked_memo, memo_json, lines = validate(legs, key, kind, memo)
    return Request(key, kind, checked, checked_memo, legs_signature(checked), memo_json, lines)


def gift(viewer: int, coins: int) -> list[Leg]:
    return [Leg(wallet(viewer), earnings(9), coins - coins // 5), Leg(wallet(viewer), PLATFORM, coins // 5)]


def through_the_writer(batch: list[Request]) -> list[Request]:
    """The batch as the writer process sees it: encoded by the server, decoded there."""
    (message,) = FrameReader().feed(encode_requests(batch))
    return decode_requests(message)


def test_frames_survive_any_split() -> None:
    messages = [[READY], [0, 1.5, [[0, 7, {"wallet:1": 3}]]], ["x" * 70_000], []]
    stream = b"".join(frame(message) for message in messages)
    one_byte_at_a_time = FrameReader()
    got = [m for i in range(len(stream)) for m in one_byte_at_a_time.feed(stream[i:i + 1])]
    assert got == messages
    assert FrameReader().feed(stream) == messages
    reader = FrameReader()
    assert reader.feed(stream[:5]) == [] and reader.feed(stream[5:]) == messages


@pytest.mark.parametrize("stream", [
    (MAX_FRAME + 1).to_bytes(4, "big") + b"x",  # a length no frame has
    (3).to_bytes(4, "big") + b"\xc1\xc1\xc1",  # 0xc1 is never used by msgpack
    (2).to_bytes(4, "big") + msgpack.packb(1) + msgpack.packb(2),  # two values in one frame
])
def test_a_corrupt_stream_is_refused(stream: bytes) -> None:
    with pytest.raises(WireError):
        FrameReader().feed(stream)


def test_requests_keep_what_the_writer_needs() -> None:
    sent = [request(gift(1, 10), "g1", memo={"gift": "rose"}),
            request([Leg(clearing("s"), wallet(2), 5)], "r", kind="recharge")]
    for mine, theirs in zip(sent, through_the_writer(sent), strict=True):
        assert (theirs.key, theirs.kind, theirs.signature, theirs.memo_json) == (
            mine.key, mine.kind, mine.signature, mine.memo_json)
        assert [tuple(line) for line in theirs.lines] == mine.lines


def same(a: Posting | BaseException, b: Posting | BaseException) -> bool:
    if isinstance(a, Posting) or isinstance(b, Posting):
        return a == b
    return type(a) is type(b) and str(a) == str(b)


def test_every_kind_of_answer_comes_back_as_the_in_process_ledger_gives_it() -> None:
    batch = [
        request(gift(1, 50), "new", memo={"gift": "rose"}),  # accepted
        request(gift(1, 50), "new", memo={"gift": "rose"}),  # same key, same legs: follows "new"
        request(gift(2, 40), "new"),  # same key, other legs: a conflict with "new"
        request(gift(1, 10), "old"),  # recorded before, same legs: replayed from the store
        request(gift(3, 10), "old"),  # recorded before, other legs: a conflict
        request(gift(4, 1000), "broke"),  # more than wallet 4 holds
        request(gift(1, 30), "later"),  # accepted after "new": sees its balance
    ]
    stored = {"old": StoredPosting(41, "old", "gift", legs_signature(gift(1, 10)), '{"gift":"heart"}', 12.5)}
    balances = {wallet(1): 100, wallet(2): 100, wallet(4): 5, earnings(9): 0, PLATFORM: 0}
    ids = {"new": 42, "later": 43}
    in_process = _answers(batch, (plan_batch(batch, stored, balances), ids, 99.0))

    copies = through_the_writer(batch)
    outcome = (plan_batch(copies, stored, balances), ids, 99.0)
    (message,) = FrameReader().feed(encode_answers(copies, outcome, retries=2))
    retries, answers = decode_answers(batch, message)

    assert retries == 2
    assert [same(a, b) for a, b in zip(answers, in_process, strict=True)] == [True] * len(batch)
    new, follower, conflict, replay, old_conflict, broke, later = answers
    assert isinstance(new, Posting) and not new.replayed and new.id == 42 and new.memo == {"gift": "rose"}
    assert new.balances == {wallet(1): 50, earnings(9): 40, PLATFORM: 10}
    assert isinstance(follower, Posting) and follower.replayed and follower.id == 42
    assert isinstance(conflict, KeyConflict) and isinstance(old_conflict, KeyConflict)
    assert isinstance(replay, Posting) and replay.replayed and (replay.id, replay.created_at) == (41, 12.5)
    assert replay.memo == {"gift": "heart"} and set(replay.legs) == set(gift(1, 10))
    assert isinstance(broke, InsufficientFunds) and (broke.account, broke.balance, broke.needed) == (
        wallet(4), 5, 1000)
    assert isinstance(later, Posting) and later.balances[wallet(1)] == 20 and later.created_at == 99.0


@pytest.mark.parametrize("error", [DatabaseError("poisoned"), IntegrityError("UNIQUE failed"),
                                   LedgerError("gave up"), RuntimeError("surprise")])
def test_a_batch_that_failed_as_a_whole_fails_each_caller_alike(error: Exception) -> None:
    batch = [request(gift(1, 10), "a"), request(gift(2, 10), "b")]
    (message,) = FrameReader().feed(encode_answers(through_the_writer(batch), error, retries=0))
    _, answers = decode_answers(batch, message)
    expected = LedgerError if isinstance(error, RuntimeError) else type(error)
    assert [type(answer) for answer in answers] == [expected, expected]
    assert all(str(error) in str(answer) for answer in answers)


def test_answers_for_other_requests_are_refused() -> None:
    batch = [request(gift(1, 10), "a")]
    (message,) = FrameReader().feed(encode_answers(through_the_writer(batch), LedgerError("x"), retries=0))
    with pytest.raises(WireError):
        decode_answers(batch * 2, message)
