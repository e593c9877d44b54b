"""What the server and the ledger's writer process say to each other, without I/O.

Both directions are frames: a 4-byte big-endian length, then one msgpack message.

- server → writer: a list of requests, in the order they were posted, each
  ``[key, kind, legs signature, memo JSON, statement lines]``.
- writer → server: one message per batch, ``[retries, created_at, answers]``, answering the
  oldest unanswered requests in order (the writer applies requests strictly first come, first
  served). An answer is one of
  ``[ACCEPTED, posting id, balances after]``,
  ``[REPLAYED, posting id, kind, legs signature, memo JSON, created_at]``,
  ``[FOLLOWER, index in the batch of the earlier request with the same key]``,
  ``[REFUSED, error kind, message, *arguments]``.
- writer → server, once, before anything else: ``[READY]``.

A replay or a follower's answer is rebuilt by the server from its own request and the answer
it follows, so the hot path carries only ids and balances.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from typing import Any

import msgpack

from livesrv.db import DatabaseError, IntegrityError

from .ledger_core import (
    InsufficientFunds,
    InvalidRequest,
    KeyConflict,
    LedgerError,
    Plan,
    Posting,
    Request,
    follower_answer,
    legs_from_signature,
    legs_signature,
)

ACCEPTED, REPLAYED, FOLLOWER, REFUSED = 0, 1, 2, 3
READY = "ready"
#: far above any real batch (2,000 requests of a few hundred bytes); a length beyond it means
#: the stream is corrupt, not that a message is big
MAX_FRAME = 64 * 1024 * 1024

_LENGTH = struct.Struct(">I")
_pack = msgpack.Packer(use_bin_type=True).pack


class WireError(Exception):
    """The byte stream is not a sequence of frames."""


def frame(message: Any) -> bytes:
    payload = _pack(message)
    return _LENGTH.pack(len(payload)) + payload


class FrameReader:
    """Bytes in, in whatever pieces the pipe delivers; whole messages out."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Any]:
        self._buffer += data
        messages = []
        start, end = 0, len(self._buffer)
        view = memoryview(self._buffer)
        try:
            while end - start >= 4:
                (length,) = _LENGTH.unpack_from(view, start)
                if length > MAX_FRAME:
                    raise WireError(f"a frame of {length} bytes")
                if end - start - 4 < length:
                    break
                try:
                    messages.append(msgpack.unpackb(view[start + 4:start + 4 + length]))
                except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
                    raise WireError(f"an undecodable frame: {exc}") from exc
                start += 4 + length
        finally:
            view.release()
        del self._buffer[:start]
        return messages


# -- server → writer ----------------------------------------------------------------------------

def encode_requests(requests: Sequence[Request]) -> bytes:
    return frame([[r.key, r.kind, r.signature, r.memo_json, r.lines] for r in requests])


def decode_requests(message: list[Any]) -> list[Request]:
    """The writer's copy of each request: what ``plan_batch`` and the SQL need (no legs or memo
    objects: the server builds the caller's Posting from its own request)."""
    return [Request(key, kind, (), {}, signature, memo_json, lines)
            for key, kind, signature, memo_json, lines in message]


# -- writer → server ----------------------------------------------------------------------------

def encode_answers(batch: Sequence[Request], outcome: tuple[Plan, dict[str, int], float] | BaseException,
                   retries: int) -> bytes:
    """One batch's answers, in the batch's order."""
    if isinstance(outcome, BaseException):
        refused = refusal(outcome)
        return frame([retries, 0.0, [refused] * len(batch)])
    plan, ids, now = outcome
    index = {id(request): n for n, request in enumerate(batch)}
    answers: list[list[Any]] = []
    for request in batch:
        key = id(request)
        after = plan.balances_after.get(key)
        if after is not None:
            answers.append([ACCEPTED, ids[request.key], after])
            continue
        leader = plan.followers.get(key)
        if leader is not None:
            answers.append([FOLLOWER, index[id(leader)]])
            continue
        answer = plan.answers[key]
        if isinstance(answer, Posting):
            answers.append([REPLAYED, answer.id, answer.kind, legs_signature(answer.legs),
                            json.dumps(answer.memo, separators=(",", ":")), answer.created_at])
        else:
            answers.append(refusal(answer))
    return frame([retries, now, answers])


def decode_answers(batch: Sequence[Request], message: list[Any]) -> tuple[int, list[Posting | Exception]]:
    """(retries, the answer to each of the batch's requests): the server's own requests (the
    oldest unanswered ones, as many as the message answers) give each Posting its legs and memo."""
    retries, now, answers = message
    if len(answers) != len(batch):
        raise WireError(f"{len(answers)} answers for {len(batch)} requests")
    decoded: list[Posting | Exception] = []
    for request, answer in zip(batch, answers, strict=True):
        tag = answer[0]
        if tag == ACCEPTED:
            decoded.append(Posting(answer[1], request.key, request.kind, request.legs, request.memo, now,
                                   replayed=False, balances=answer[2]))
        elif tag == REPLAYED:
            decoded.append(Posting(answer[1], request.key, answer[2], legs_from_signature(answer[3]),
                                   json.loads(answer[4]), answer[5], replayed=True))
        elif tag == FOLLOWER:
            leader = answer[1]
            decoded.append(follower_answer(request, batch[leader], decoded[leader]))  # type: ignore[arg-type]
        else:
            decoded.append(refused_error(answer))
    return retries, decoded


def refusal(exc: BaseException) -> list[Any]:
    if isinstance(exc, InsufficientFunds):
        return [REFUSED, "funds", str(exc), exc.account, exc.balance, exc.needed]
    for kind, cls in _REFUSALS:
        if isinstance(exc, cls):
            return [REFUSED, kind, str(exc)]
    return [REFUSED, "ledger", f"{type(exc).__name__}: {exc}"]


# most specific first: the server raises the same class the caller would get in one process
_REFUSALS: tuple[tuple[str, type[BaseException]], ...] = (
    ("conflict", KeyConflict), ("invalid", InvalidRequest), ("ledger", LedgerError),
    ("integrity", IntegrityError), ("database", DatabaseError))
_RAISED: dict[str, type[Exception]] = {kind: cls for kind, cls in _REFUSALS}  # type: ignore[misc]


def refused_error(answer: Sequence[Any]) -> Exception:
    kind, message = answer[1], answer[2]
    if kind == "funds":
        return InsufficientFunds(answer[3], answer[4], answer[5])
    return _RAISED.get(kind, LedgerError)(message)
