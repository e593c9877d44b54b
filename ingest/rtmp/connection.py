"""The RTMP connection as a sans-IO protocol object (no sockets, no clocks).

``ServerConnection`` is what an ingest server holds per TCP connection::

    conn.receive_data(data, now)        # bytes from the socket (b"" = the peer closed)
    event = conn.next_event()           # an Event, or NEED_DATA
    conn.accept_publish(event)          # replies are methods
    sock.send(conn.data_to_send())      # whatever must go out
    conn.handle_timer(now)              # timeouts (raises ProtocolTimeout)

Bad input raises ``RemoteProtocolError`` from ``next_event()`` and leaves the connection in its
error state: every later ``next_event()`` raises it again. Misuse by our own code raises
``LocalProtocolError``. ``ClientConnection`` is the small publishing client used by the tests
and the load generator; it shares the chunk and AMF0 code with the server.
"""

from __future__ import annotations

import struct
from collections import deque
from dataclasses import dataclass
from enum import Enum
from typing import Any

from . import amf0
from .chunks import (
    ABORT,
    ACKNOWLEDGEMENT,
    AGGREGATE,
    AUDIO,
    COMMAND_AMF0,
    COMMAND_AMF3,
    DATA_AMF0,
    DATA_AMF3,
    SET_CHUNK_SIZE,
    SET_PEER_BANDWIDTH,
    SHARED_OBJECT_AMF0,
    SHARED_OBJECT_AMF3,
    USER_CONTROL,
    VIDEO,
    WINDOW_ACK_SIZE,
    ChunkReader,
    ChunkWriter,
    Message,
    PartialBudget,
    iter_aggregate,
    set_chunk_size,
)
from .errors import LocalProtocolError, ProtocolTimeout, RemoteProtocolError
from .events import (
    NEED_DATA,
    AudioMessage,
    CloseStream,
    CommandResponse,
    ConnectRequest,
    CreateStream,
    DataMessage,
    DeleteStream,
    Event,
    FCPublish,
    FCUnpublish,
    HandshakeComplete,
    Metadata,
    PlayRequest,
    PublishRequest,
    ReleaseStream,
    StatusMessage,
    UnknownCommand,
    VideoMessage,
)
from .handshake import HANDSHAKE_SIZE, client_c2, client_hello, server_response

# user control events
STREAM_BEGIN = 0
STREAM_EOF = 1
PING_REQUEST = 6
PING_RESPONSE = 7

COMMAND_CSID = 3
STATUS_CSID = 5
AUDIO_CSID = 4
VIDEO_CSID = 6
DATA_CSID = 5

#: Enhanced RTMP codecs the ingest passes through (see flv.py)
SUPPORTED_FOURCC = ("avc1", "hvc1", "av01", "vp09", "Opus", "mp4a")

_U32 = struct.Struct(">I")
_U16 = struct.Struct(">H")
_AMF_TYPES = frozenset({COMMAND_AMF0, COMMAND_AMF3, DATA_AMF0, DATA_AMF3})
_WRAP = 1 << 32
_HALF = 1 << 31


@dataclass(frozen=True, slots=True)
class RtmpLimits:
    """Bounds against broken or hostile peers. Every buffer a peer can grow is bounded."""

    handshake_timeout: float = 10.0  # seconds from accept to a complete handshake
    idle_timeout: float = 30.0  # seconds without a byte received
    max_message_size: int = 16 * 1024 * 1024  # one RTMP message (a 4K keyframe fits)
    #: one command or data message (AMF): decoding makes Python objects, so far less than media
    max_command_size: int = 256 * 1024
    max_partial_bytes: int = 24 * 1024 * 1024  # unfinished messages across chunk streams
    #: Until a publish is authorized a peer needs only commands (a few hundred bytes; AMF is
    #: bounded by max_command_size anyway): anyone who can open a socket gets no more.
    unauthorized_max_message_size: int = 256 * 1024
    unauthorized_max_partial_bytes: int = 256 * 1024
    #: unfinished messages across ALL connections of a server: each connection is bounded,
    #: max_connections of them are not (2000 x 24 MiB = 48 GiB). Past it, the connection
    #: that asks for more is closed and new ones are refused.
    max_partial_bytes_total: int = 512 * 1024 * 1024
    max_chunk_streams: int = 64  # distinct chunk stream ids in use
    max_message_streams: int = 8  # createStream calls per connection
    window_ack_size: int = 2_500_000  # what we ask the peer to acknowledge (it rarely matters)
    out_chunk_size: int = 4096  # chunk size of what we send
    #: how long to wait for onMetaData and sequence headers before going live with what is known
    start_timeout: float = 3.0
    #: media held while waiting for them
    max_pending_bytes: int = 8 * 1024 * 1024
    max_pending_packets: int = 2048
    #: connections the server accepts at once (each is bounded; together they must be too)
    max_connections: int = 2000


class State(Enum):
    HANDSHAKE = "handshake"
    OPEN = "open"
    CLOSED = "closed"
    ERROR = "error"


class _Peer:
    """What both ends share: handshake buffering, chunks, control messages, acks, AMF."""

    def __init__(self, limits: RtmpLimits, now: float, budget: PartialBudget | None = None) -> None:
        self.limits = limits
        self.state = State.HANDSHAKE
        self.reader = ChunkReader(max_message_size=limits.max_message_size,
                                  max_partial_bytes=limits.max_partial_bytes,
                                  max_chunk_streams=limits.max_chunk_streams, budget=budget)
        self.writer = ChunkWriter()
        self._handshake_buf = bytearray()
        self._out: list[bytes] = []
        self._events: deque[Event] = deque()
        self._error: RemoteProtocolError | None = None
        self.bytes_received = 0
        self._acked = 0
        self._peer_window = 0  # the peer asked for an Acknowledgement every this many bytes
        self._window_sent = 0
        self.started_at = now
        self.last_received = now
        self.peer_closed = False
        # timestamp unwrapping per message type: the 32-bit ms clock wraps after ~49.7 days
        self._ts_last = {AUDIO: -1, VIDEO: -1}
        self._ts_epoch = {AUDIO: 0, VIDEO: 0}

    # -- bytes in ----------------------------------------------------------------------------
    def receive_data(self, data: bytes, now: float | None = None) -> None:
        if now is not None:
            self.last_received = now
        if not data:
            self.peer_closed = True
            return
        if self.state is State.HANDSHAKE:
            self._handshake_buf += data
        elif self.state is State.OPEN:
            self.reader.feed(data)
        else:
            return
        self.bytes_received += len(data)
        window = self._peer_window
        if window and self.bytes_received - self._acked >= window and self.state is State.OPEN:
            self._acked = self.bytes_received
            ack = _U32.pack(self.bytes_received & 0xFFFFFFFF)
            self._out.append(self.writer.control(ACKNOWLEDGEMENT, ack))

    def next_event(self) -> Event:
        """The next event, ``NEED_DATA``, or a raised ``RemoteProtocolError``."""
        if self._events:
            return self._events.popleft()
        self._fill()
        if self._events:
            return self._events.popleft()
        return NEED_DATA

    def next_events(self) -> list[Event]:
        """Every event available now, in one batch (cheaper on the media path)."""
        self._fill()
        events = list(self._events)
        self._events.clear()
        return events

    def _fill(self) -> None:
        if self._error is not None:
            raise self._error
        if self.state is State.HANDSHAKE:
            self._guard(self._advance_handshake)
        if self.state is State.OPEN:
            self._guard(self._read_messages)

    def _guard(self, step: Any) -> None:
        try:
            step()
        except RemoteProtocolError as exc:
            self._fail(exc)
            raise
        except (struct.error, ValueError, IndexError, KeyError, TypeError, OverflowError) as exc:
            # A parser tripping over malformed input is still the peer's fault: report it as
            # a protocol error, never as a crash.
            error = RemoteProtocolError(f"malformed input ({exc})")
            self._fail(error)
            raise error from exc

    def _fail(self, error: RemoteProtocolError) -> None:
        self.state = State.ERROR
        self._error = error
        self.reader.release()  # nothing more is read: stop counting against the budget

    def _read_messages(self) -> None:
        for message in self.reader.read_messages():
            self._handle_message(message)

    def _advance_handshake(self) -> None:
        raise NotImplementedError

    # -- timers ------------------------------------------------------------------------------
    def get_timer(self) -> float | None:
        """When ``handle_timer`` next has something to check."""
        if self.state is State.HANDSHAKE:
            return self.started_at + self.limits.handshake_timeout
        if self.state is State.OPEN:
            return self.last_received + self.limits.idle_timeout
        return None

    def handle_timer(self, now: float) -> None:
        if self.state is State.HANDSHAKE and now - self.started_at >= self.limits.handshake_timeout:
            self._fail(ProtocolTimeout("handshake not completed in time"))
            raise self._error  # type: ignore[misc]
        if self.state is State.OPEN and now - self.last_received >= self.limits.idle_timeout:
            self._fail(ProtocolTimeout(f"nothing received for {self.limits.idle_timeout:.0f} s"))
            raise self._error  # type: ignore[misc]

    # -- bytes out ---------------------------------------------------------------------------
    def data_to_send(self) -> bytes:
        if not self._out:
            return b""
        data = b"".join(self._out)
        self._out.clear()
        return data

    def close(self) -> None:
        self.state = State.CLOSED
        self.reader.release()  # what it held no longer counts against the server's budget

    # -- messages ----------------------------------------------------------------------------
    def _handle_message(self, message: Message) -> None:
        type_id = message.type_id
        if type_id in (AUDIO, VIDEO):
            self._media(type_id, message.stream_id, message.timestamp, message.payload)
            return
        if type_id in _AMF_TYPES and len(message.payload) > self.limits.max_command_size:
            raise RemoteProtocolError(f"command or data message of {len(message.payload)} bytes exceeds "
                                      f"the limit of {self.limits.max_command_size}")
        if type_id == COMMAND_AMF0:
            self._command(message.stream_id, amf0.decode(message.payload))
        elif type_id == COMMAND_AMF3:
            # AMF3 commands start with a format byte (0) and are AMF0 inside in practice.
            self._command(message.stream_id, amf0.decode(message.payload[1:]))
        elif type_id == DATA_AMF0:
            self._data(message.stream_id, amf0.decode(message.payload))
        elif type_id == DATA_AMF3:
            self._data(message.stream_id, amf0.decode(message.payload[1:]))
        elif type_id == USER_CONTROL:
            self._user_control(message.payload)
        elif type_id == WINDOW_ACK_SIZE:
            if len(message.payload) < 4:
                raise RemoteProtocolError("Window Acknowledgement Size shorter than 4 bytes")
            self._peer_window = _U32.unpack_from(message.payload)[0]
        elif type_id == SET_PEER_BANDWIDTH:
            if len(message.payload) < 4:
                raise RemoteProtocolError("Set Peer Bandwidth shorter than 4 bytes")
            size = _U32.unpack_from(message.payload)[0]
            if size != self._window_sent:
                self._send_window_ack_size(size)
        elif type_id == AGGREGATE:
            for sub_type, timestamp, payload in iter_aggregate(message.payload, message.timestamp):
                if sub_type in (AUDIO, VIDEO):
                    self._media(sub_type, message.stream_id, timestamp, payload)
        elif type_id in (SET_CHUNK_SIZE, ABORT, ACKNOWLEDGEMENT, SHARED_OBJECT_AMF0, SHARED_OBJECT_AMF3):
            pass  # chunk size and abort were applied by the reader; the rest needs nothing
        else:
            raise RemoteProtocolError(f"unknown message type {type_id}")

    def _media(self, type_id: int, stream_id: int, timestamp: int, payload: bytes) -> None:
        last = self._ts_last[type_id]
        if last >= 0 and timestamp < last and last - timestamp > _HALF:
            self._ts_epoch[type_id] += _WRAP
        self._ts_last[type_id] = timestamp
        ts = timestamp + self._ts_epoch[type_id]
        if type_id == VIDEO:
            self._events.append(VideoMessage(stream_id, ts, payload))
        else:
            self._events.append(AudioMessage(stream_id, ts, payload))

    def _user_control(self, payload: bytes) -> None:
        if len(payload) < 2:
            raise RemoteProtocolError("User Control message shorter than 2 bytes")
        event = _U16.unpack_from(payload)[0]
        if event == PING_REQUEST and len(payload) >= 6:
            self._out.append(self.writer.control(USER_CONTROL, _U16.pack(PING_RESPONSE) + payload[2:6]))

    def _data(self, stream_id: int, values: list[Any]) -> None:
        if values and values[0] == "@setDataFrame":
            values = values[1:]
        if not values or not isinstance(values[0], str):
            return  # nothing a server acts on
        name = values[0]
        if name == "onMetaData":
            meta = next((v for v in values[1:] if isinstance(v, dict)), {})
            self._events.append(Metadata(stream_id, dict(meta)))
        else:
            self._events.append(DataMessage(stream_id, name, tuple(values[1:])))

    def _command(self, stream_id: int, values: list[Any]) -> None:
        raise NotImplementedError

    # -- sending helpers ---------------------------------------------------------------------
    def _send_window_ack_size(self, size: int) -> None:
        self._window_sent = size
        self._out.append(self.writer.control(WINDOW_ACK_SIZE, _U32.pack(size)))

    def _send_chunk_size(self, size: int) -> None:
        self._out.append(self.writer.control(SET_CHUNK_SIZE, set_chunk_size(size)))

    def _send_command(self, stream_id: int, *values: Any, csid: int = COMMAND_CSID) -> None:
        self._require_open()
        self._out.append(self.writer.write(csid, COMMAND_AMF0, stream_id, 0, amf0.encode(*values)))

    def _require_open(self) -> None:
        if self.state is not State.OPEN:
            raise LocalProtocolError(f"cannot send in state {self.state.value}")


def _number(value: Any, default: float = 0.0) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else default


def _string(value: Any) -> str:
    return value if isinstance(value, str) else ""


class ServerConnection(_Peer):
    """The server end of one RTMP connection (an encoder publishing to us)."""

    def __init__(self, limits: RtmpLimits | None = None, *, now: float = 0.0,
                 handshake_random: bytes | None = None, budget: PartialBudget | None = None) -> None:
        super().__init__(limits or RtmpLimits(), now, budget)
        limits = self.limits
        # A peer nobody has authorized yet gets the small limits; accept_publish lifts them.
        self.reader.max_message_size = min(limits.max_message_size, limits.unauthorized_max_message_size)
        self.reader.max_partial_bytes = min(limits.max_partial_bytes,
                                            limits.unauthorized_max_partial_bytes)
        self.authorized = False
        self._handshake_random = handshake_random
        self._s1: bytes | None = None
        self._digest = False
        self._next_stream_id = 1
        self.streams: set[int] = set()
        self.app = ""
        self.tc_url = ""

    def _advance_handshake(self) -> None:
        buf = self._handshake_buf
        if self._s1 is None:
            if len(buf) < 1:
                return
            if buf[0] != 3:
                raise RemoteProtocolError(f"unsupported RTMP version {buf[0]} in C0 (not RTMP?)")
            if len(buf) < 1 + HANDSHAKE_SIZE:
                return
            c1 = bytes(buf[1:1 + HANDSHAKE_SIZE])
            response, digest = server_response(buf[0], c1, random=self._handshake_random)
            self._s1 = response[1:1 + HANDSHAKE_SIZE]
            self._digest = digest
            self._out.append(response)
            del buf[:1 + HANDSHAKE_SIZE]
        if len(buf) < HANDSHAKE_SIZE:
            return
        # C2 echoes S1; clients differ in what exactly they put there, so it is not checked.
        rest = bytes(buf[HANDSHAKE_SIZE:])
        self._handshake_buf = bytearray()
        self.state = State.OPEN
        self._events.append(HandshakeComplete(self._digest))
        if rest:
            self.reader.feed(rest)

    def _command(self, stream_id: int, values: list[Any]) -> None:
        if not values or not isinstance(values[0], str):
            raise RemoteProtocolError("command message without a command name")
        name = values[0]
        tid = _number(values[1] if len(values) > 1 else 0)
        args = values[2:]
        arg1 = args[1] if len(args) > 1 else None
        events = self._events
        if name == "connect":
            props = args[0] if args and isinstance(args[0], dict) else {}
            self.app = _string(props.get("app"))
            self.tc_url = _string(props.get("tcUrl"))
            events.append(ConnectRequest(tid, stream_id, self.app, self.tc_url, dict(props)))
        elif name == "releaseStream":
            events.append(ReleaseStream(tid, stream_id, _string(arg1)))
        elif name == "FCPublish":
            events.append(FCPublish(tid, stream_id, _string(arg1)))
        elif name == "FCUnpublish":
            events.append(FCUnpublish(tid, stream_id, _string(arg1)))
        elif name == "createStream":
            events.append(CreateStream(tid, stream_id))
        elif name == "publish":
            events.append(PublishRequest(tid, stream_id, _string(arg1),
                                         _string(args[2] if len(args) > 2 else "live") or "live"))
        elif name == "play":
            events.append(PlayRequest(tid, stream_id, _string(arg1)))
        elif name == "deleteStream":
            events.append(DeleteStream(tid, stream_id, int(_number(arg1))))
        elif name == "closeStream":
            events.append(CloseStream(tid, stream_id))
        else:
            if tid:
                self.reply_error(tid, {"level": "error", "code": "NetConnection.Call.Failed",
                                       "description": f"unknown command {name[:64]}"})
            events.append(UnknownCommand(tid, stream_id, name, tuple(args)))

    # -- replies -----------------------------------------------------------------------------
    def reply_result(self, transaction_id: float, *values: Any) -> None:
        self._send_command(0, "_result", transaction_id, *values)

    def reply_error(self, transaction_id: float, *values: Any) -> None:
        self._send_command(0, "_error", transaction_id, None, *values)

    def accept_connect(self, request: ConnectRequest) -> None:
        """Window ack size, peer bandwidth, our chunk size, then NetConnection.Connect.Success."""
        self._require_open()
        self._send_window_ack_size(self.limits.window_ack_size)
        self._out.append(self.writer.control(SET_PEER_BANDWIDTH,
                                             _U32.pack(self.limits.window_ack_size) + b"\x02"))
        self._send_chunk_size(self.limits.out_chunk_size)
        encoding = _number(request.properties.get("objectEncoding"), 0.0)
        properties: dict[str, Any] = {"fmsVer": "FMS/3,5,7,7009", "capabilities": 31.0, "mode": 1.0}
        offered = request.properties.get("fourCcList")
        if isinstance(offered, list):
            # Enhanced RTMP: answer with the codecs we take of those the client offered.
            wanted = set(SUPPORTED_FOURCC) if "*" in offered else {c for c in offered if isinstance(c, str)}
            properties["fourCcList"] = [c for c in SUPPORTED_FOURCC if c in wanted]
        self.reply_result(request.transaction_id, properties,
                          {"level": "status", "code": "NetConnection.Connect.Success",
                           "description": "Connection succeeded.", "objectEncoding": encoding})

    def reject_connect(self, request: ConnectRequest, description: str) -> None:
        self.reply_error(request.transaction_id,
                         {"level": "error", "code": "NetConnection.Connect.Rejected",
                          "description": description})

    def accept_create_stream(self, request: CreateStream) -> int | None:
        """A new message stream id (None, answered with _error, past the limit)."""
        if len(self.streams) >= self.limits.max_message_streams:
            self.reply_error(request.transaction_id,
                             {"level": "error", "code": "NetConnection.Call.Failed",
                              "description": "too many streams"})
            return None
        stream_id = self._next_stream_id
        self._next_stream_id += 1
        self.streams.add(stream_id)
        self.reply_result(request.transaction_id, None, float(stream_id))
        return stream_id

    def accept_release_stream(self, request: ReleaseStream) -> None:
        if request.transaction_id:
            self.reply_result(request.transaction_id, None)

    def accept_fcpublish(self, request: FCPublish) -> None:
        self._send_command(0, "onFCPublish", 0, None,
                           {"level": "status", "code": "NetStream.Publish.Start",
                            "description": request.name})
        if request.transaction_id:
            self.reply_result(request.transaction_id, None)

    def accept_fcunpublish(self, request: FCUnpublish) -> None:
        self._send_command(0, "onFCUnpublish", 0, None,
                           {"level": "status", "code": "NetStream.Unpublish.Success",
                            "description": request.name})
        if request.transaction_id:
            self.reply_result(request.transaction_id, None)

    def send_status(self, stream_id: int, level: str, code: str, description: str) -> None:
        self._send_command(stream_id, "onStatus", 0, None,
                           {"level": level, "code": code, "description": description},
                           csid=STATUS_CSID)

    def accept_publish(self, request: PublishRequest, name: str | None = None) -> None:
        """Accept an (authorized) publish: the peer now gets the media limits."""
        self._require_open()
        self.authorized = True
        self.reader.max_message_size = self.limits.max_message_size
        self.reader.max_partial_bytes = self.limits.max_partial_bytes
        self._out.append(self.writer.control(USER_CONTROL,
                                             _U16.pack(STREAM_BEGIN) + _U32.pack(request.stream_id)))
        self.send_status(request.stream_id, "status", "NetStream.Publish.Start",
                         f"{name or 'stream'} is now published.")

    def reject_publish(self, request: PublishRequest, code: str = "NetStream.Publish.BadName",
                       description: str = "publish refused") -> None:
        self.send_status(request.stream_id, "error", code, description)

    def refuse_play(self, request: PlayRequest) -> None:
        self.send_status(request.stream_id, "error", "NetStream.Play.Failed",
                         "this server does not play over RTMP; watch over HLS or WebRTC")

    def send_unpublished(self, stream_id: int) -> None:
        self.send_status(stream_id, "status", "NetStream.Unpublish.Success", "unpublished")


class ClientConnection(_Peer):
    """A publishing client (tests, the load generator). Drive it like the server end."""

    def __init__(self, limits: RtmpLimits | None = None, *, now: float = 0.0, digest: bool = True) -> None:
        super().__init__(limits or RtmpLimits(), now)
        self._c1 = client_hello(digest=digest)
        self._out.append(self._c1)
        self._transaction = 0.0
        self.s1: bytes = b""
        self.s2: bytes = b""

    def _advance_handshake(self) -> None:
        buf = self._handshake_buf
        if len(buf) < 1 + 2 * HANDSHAKE_SIZE:
            return
        if buf[0] != 3:
            raise RemoteProtocolError(f"server answered RTMP version {buf[0]}")
        self.s1 = bytes(buf[1:1 + HANDSHAKE_SIZE])
        self.s2 = bytes(buf[1 + HANDSHAKE_SIZE:1 + 2 * HANDSHAKE_SIZE])
        rest = bytes(buf[1 + 2 * HANDSHAKE_SIZE:])
        self._handshake_buf = bytearray()
        self._out.append(client_c2(self.s1))
        self.state = State.OPEN
        self._events.append(HandshakeComplete(True))
        if rest:
            self.reader.feed(rest)

    @property
    def c1(self) -> bytes:
        return self._c1[1:]

    def _next_transaction(self) -> float:
        self._transaction += 1
        return self._transaction

    def _command(self, stream_id: int, values: list[Any]) -> None:
        if not values or not isinstance(values[0], str):
            raise RemoteProtocolError("command message without a command name")
        name = values[0]
        tid = _number(values[1] if len(values) > 1 else 0)
        args = tuple(values[2:])
        if name in ("_result", "_error"):
            self._events.append(CommandResponse(name, tid, args))
        elif name in ("onStatus", "onFCPublish", "onFCUnpublish"):
            info = next((a for a in args if isinstance(a, dict)), {})
            self._events.append(StatusMessage(name, stream_id, _string(info.get("level")),
                                              _string(info.get("code")), _string(info.get("description"))))
        else:
            self._events.append(UnknownCommand(tid, stream_id, name, args))

    # -- requests ----------------------------------------------------------------------------
    def set_chunk_size(self, size: int) -> None:
        self._require_open()
        self._send_chunk_size(size)

    def connect(self, app: str, tc_url: str, **properties: Any) -> float:
        tid = self._next_transaction()
        self._send_command(0, "connect", tid, {"app": app, "type": "nonprivate", "flashVer": "FMLE/3.0",
                                               "tcUrl": tc_url, **properties})
        return tid

    def call(self, name: str, *args: Any, stream_id: int = 0) -> float:
        tid = self._next_transaction()
        self._send_command(stream_id, name, tid, None, *args)
        return tid

    def create_stream(self) -> float:
        return self.call("createStream")

    def publish(self, stream_id: int, name: str, publish_type: str = "live") -> float:
        return self.call("publish", name, publish_type, stream_id=stream_id)

    def send_metadata(self, stream_id: int, values: dict[str, Any]) -> None:
        self._require_open()
        payload = amf0.encode("@setDataFrame", "onMetaData", amf0.EcmaArray(values))
        self._out.append(self.writer.write(DATA_CSID, DATA_AMF0, stream_id, 0, payload))

    def send_media(self, type_id: int, stream_id: int, timestamp: int, payload: bytes) -> None:
        self._require_open()
        csid = VIDEO_CSID if type_id == VIDEO else AUDIO_CSID
        self._out.append(self.writer.write(csid, type_id, stream_id, timestamp, payload))

    def send_raw(self, data: bytes) -> None:
        """Bytes made elsewhere (pre-chunked media of the load generator)."""
        self._out.append(data)
