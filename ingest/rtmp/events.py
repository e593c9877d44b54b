"""What the RTMP connection reports: frozen dataclasses, one per thing that happened."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class _NeedData:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


#: ``next_event()`` returns this when more bytes are needed before another event.
NEED_DATA: Any = _NeedData()


@dataclass(frozen=True, slots=True)
class Event:
    pass


@dataclass(frozen=True, slots=True)
class HandshakeComplete(Event):
    digest: bool  # the client used the digest ("complex") handshake


@dataclass(frozen=True, slots=True)
class Command(Event):
    """Base of the commands a client sends; ``transaction_id`` is what replies refer to."""

    transaction_id: float
    stream_id: int


@dataclass(frozen=True, slots=True)
class ConnectRequest(Command):
    app: str
    tc_url: str
    properties: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ReleaseStream(Command):
    name: str


@dataclass(frozen=True, slots=True)
class FCPublish(Command):
    name: str


@dataclass(frozen=True, slots=True)
class FCUnpublish(Command):
    name: str


@dataclass(frozen=True, slots=True)
class CreateStream(Command):
    pass


@dataclass(frozen=True, slots=True)
class PublishRequest(Command):
    name: str  # the stream key, possibly with a "?query"
    publish_type: str  # "live", "record", "append"


@dataclass(frozen=True, slots=True)
class PlayRequest(Command):
    name: str


@dataclass(frozen=True, slots=True)
class DeleteStream(Command):
    deleted_stream_id: int


@dataclass(frozen=True, slots=True)
class CloseStream(Command):
    pass


@dataclass(frozen=True, slots=True)
class UnknownCommand(Command):
    """A command we do not implement; the connection has already answered it with _error."""

    name: str
    arguments: tuple[Any, ...] = ()


@dataclass(frozen=True, slots=True)
class CommandResponse(Event):
    """A reply to one of our commands (client side): _result or _error."""

    name: str
    transaction_id: float
    arguments: tuple[Any, ...] = ()


@dataclass(frozen=True, slots=True)
class StatusMessage(Event):
    """onStatus / onFCPublish notifications (client side)."""

    name: str
    stream_id: int
    level: str
    code: str
    description: str


@dataclass(frozen=True, slots=True)
class Metadata(Event):
    """``@setDataFrame``/``onMetaData``: what the encoder says about its stream."""

    stream_id: int
    values: dict[str, Any]


@dataclass(frozen=True, slots=True)
class DataMessage(Event):
    """Any other data message (onCuePoint, onTextData, ...)."""

    stream_id: int
    name: str
    arguments: tuple[Any, ...] = ()


@dataclass(frozen=True, slots=True)
class MediaMessage(Event):
    """An FLV audio or video tag body. ``timestamp`` is in ms, unwrapped past 32 bits."""

    stream_id: int
    timestamp: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class AudioMessage(MediaMessage):
    pass


@dataclass(frozen=True, slots=True)
class VideoMessage(MediaMessage):
    pass
