"""The sans-IO RTMP core, fed bytes: buffer, AMF0, handshake, chunk stream, connection."""

from __future__ import annotations

import random
import struct
import tracemalloc

import pytest

from ingest.rtmp import amf0
from ingest.rtmp.buffer import ReceiveBuffer
from ingest.rtmp.chunks import (
    ABORT,
    ACKNOWLEDGEMENT,
    AUDIO,
    COMMAND_AMF0,
    SET_CHUNK_SIZE,
    USER_CONTROL,
    VIDEO,
    WINDOW_ACK_SIZE,
    ChunkReader,
    ChunkWriter,
    Message,
    PartialBudget,
    basic_header,
    set_chunk_size,
)
from ingest.rtmp.connection import ClientConnection, RtmpLimits, ServerConnection, State
from ingest.rtmp.errors import AmfError, LocalProtocolError, ProtocolTimeout, RemoteProtocolError
from ingest.rtmp.events import (
    NEED_DATA,
    AudioMessage,
    CommandResponse,
    ConnectRequest,
    CreateStream,
    DeleteStream,
    FCPublish,
    HandshakeComplete,
    Metadata,
    PlayRequest,
    PublishRequest,
    ReleaseStream,
    StatusMessage,
    UnknownCommand,
    VideoMessage,
)
from ingest.rtmp.handshake import (
    HANDSHAKE_SIZE,
    client_hello,
    find_digest,
    server_response,
    verify_server_response,
)

FIXED_RANDOM = bytes(range(256)) * 12  # 3072 bytes: deterministic S1/S2


# -- helpers ------------------------------------------------------------------------------------
def drain(conn: ServerConnection | ClientConnection) -> list[object]:
    events = []
    while True:
        event = conn.next_event()
        if event is NEED_DATA:
            return events
        events.append(event)


def pump(client: ClientConnection, server: ServerConnection) -> tuple[list[object], list[object]]:
    """Move bytes both ways until both sides are quiet; the events each side saw."""
    server_events: list[object] = []
    client_events: list[object] = []
    for _ in range(50):
        to_server = client.data_to_send()
        if to_server:
            server.receive_data(to_server)
        server_events += drain(server)
        to_client = server.data_to_send()
        if to_client:
            client.receive_data(to_client)
        client_events += drain(client)
        if not to_server and not to_client:
            break
    return server_events, client_events


class SnoopingClient(ClientConnection):
    """A client that also keeps every message the server sent (acks and pings included)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Message] = []

    def _handle_message(self, message: Message) -> None:
        self.seen.append(message)
        super()._handle_message(message)


def publishing_pair() -> tuple[SnoopingClient, ServerConnection]:
    """A client and server that went through connect, createStream and publish."""
    client = SnoopingClient()
    server = ServerConnection(handshake_random=FIXED_RANDOM)
    pump(client, server)
    client.connect("live", "rtmp://localhost/live")
    events, _ = pump(client, server)
    server.accept_connect(events[0])
    pump(client, server)
    client.create_stream()
    events, _ = pump(client, server)
    server.accept_create_stream(events[0])
    pump(client, server)
    client.publish(1, "key")
    events, _ = pump(client, server)
    server.accept_publish(events[0])
    pump(client, server)
    return client, server


def reader_messages(data: bytes, **kwargs: int) -> list[tuple[int, int, int, int, bytes]]:
    """The messages in ``data`` (Set Chunk Size messages applied and left out). Chunk sizes
    below the production minimum are allowed here: tiny chunks put every header case (and
    continuation chunk) into a few bytes."""
    kwargs.setdefault("min_chunk_size", 1)
    reader = ChunkReader(**kwargs)
    reader.feed(data)
    return [(m.csid, m.type_id, m.stream_id, m.timestamp, m.payload) for m in reader.read_messages()
            if m.type_id != SET_CHUNK_SIZE]


def small_chunks(size: int) -> tuple[ChunkWriter, bytes]:
    """A writer using ``size`` and the Set Chunk Size message that tells the reader."""
    writer = ChunkWriter()
    return writer, writer.control(SET_CHUNK_SIZE, set_chunk_size(size))


def raw_chunk(fmt: int, csid: int, *, ts: int = 0, length: int = 0, type_id: int = 0, sid: int = 0,
              ext: int | None = None, data: bytes = b"") -> bytes:
    out = basic_header(fmt, csid)
    field = 0xFFFFFF if ext is not None else ts
    if fmt == 0:
        out += field.to_bytes(3, "big") + length.to_bytes(3, "big") + bytes((type_id,))
        out += sid.to_bytes(4, "little")
    elif fmt == 1:
        out += field.to_bytes(3, "big") + length.to_bytes(3, "big") + bytes((type_id,))
    elif fmt == 2:
        out += field.to_bytes(3, "big")
    if ext is not None:
        out += ext.to_bytes(4, "big")
    return out + data


# -- receive buffer -------------------------------------------------------------------------------
def test_buffer_consume_commit_rollback() -> None:
    buf = ReceiveBuffer()
    buf.feed(b"abcdef")
    assert bytes(buf.consume(2) or b"") == b"ab"
    buf.commit()
    assert bytes(buf.consume(3) or b"") == b"cde"
    assert buf.consume(5) is None  # not enough: nothing consumed
    buf.rollback()
    assert len(buf) == 4
    buf.feed(b"gh")
    assert bytes(buf.consume(6) or b"") == b"cdefgh"
    buf.commit()
    assert len(buf) == 0 and buf.committed_len == 0


# -- AMF0 -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [
    0.0, -1.5, 1e300, True, False, "", "héllo", "x" * 70000, None, amf0.UNDEFINED,
    {"a": 1.0, "b": {"c": [1.0, "two", None]}}, amf0.EcmaArray({"width": 1280.0, "stereo": True}),
    [], [1.0, [2.0, [3.0]]], amf0.AmfDate(1700000000000.0, 0),
])
def test_amf0_round_trip(value: object) -> None:
    encoded = amf0.encode(value)
    decoded = amf0.decode(encoded)
    assert decoded == [value]
    assert type(decoded[0]) is type(value)


def test_amf0_refuses_to_encode_what_cannot_decode() -> None:
    with pytest.raises(ValueError):
        amf0.encode({"": 1.0})  # an empty key is the object-end marker
    with pytest.raises(TypeError):
        amf0.encode(object())


def test_amf0_long_string_marker() -> None:
    assert amf0.encode("x" * 70000)[0] == amf0.LONG_STRING
    assert amf0.encode("x" * 10)[0] == amf0.STRING


def test_amf0_command_sequence() -> None:
    values = ["connect", 1.0, {"app": "live", "tcUrl": "rtmp://h/live"}, None]
    assert amf0.decode(amf0.encode(*values)) == values


@pytest.mark.parametrize("data", [
    b"\x00\x01\x02",  # truncated number
    b"\x02\x00\x05ab",  # truncated string
    b"\x0c\xff\xff\xff\xff",  # long string of 4 GiB
    b"\x0a\xff\xff\xff\xff\x00",  # strict array claiming 4 billion items
    b"\x03\x00\x01a\x00",  # object truncated inside a value
    b"\x03\x00\x01a",  # object truncated before the value
    b"\x09",  # object end outside an object
    b"\x0d",  # unsupported marker
    b"\x11\x00",  # AMF3 switch inside AMF0
    b"\x03\x00\x00\x05",  # empty key without the end marker
    b"\x0a\x00\x00\x00\x01" * 40 + b"\x05",  # nested too deep
])
def test_amf0_malformed_is_an_amf_error(data: bytes) -> None:
    with pytest.raises(AmfError):
        amf0.decode(data)


def test_amf0_ecma_array_without_end_marker_is_accepted() -> None:
    data = b"\x08\x00\x00\x00\x01" + b"\x00\x01a" + amf0.encode(1.0)
    assert amf0.decode(data) == [{"a": 1.0}]


# -- handshake ------------------------------------------------------------------------------------
def test_digest_handshake_gets_a_digest_answer() -> None:
    hello = client_hello(digest=True)
    response, digest = server_response(hello[0], hello[1:])
    assert digest
    s1 = response[1:1 + HANDSHAKE_SIZE]
    s2 = response[1 + HANDSHAKE_SIZE:]
    assert response[0] == 3 and len(s1) == len(s2) == HANDSHAKE_SIZE
    assert verify_server_response(hello[1:], s1, s2)


def test_plain_handshake_gets_an_echo() -> None:
    hello = client_hello(digest=False)
    response, digest = server_response(hello[0], hello[1:])
    assert not digest
    assert response[1 + HANDSHAKE_SIZE + 8:] == hello[1 + 8:]
    assert find_digest(hello[1:], b"Genuine Adobe Flash Player 001") is None


def test_flash_schema_1_digest_is_recognised() -> None:
    from ingest.rtmp.handshake import CLIENT_KEY_SHORT, CLIENT_VERSION, imprint_digest

    c1 = bytearray(random.Random(1).randbytes(HANDSHAKE_SIZE))
    c1[4:8] = CLIENT_VERSION
    imprint_digest(c1, 1, CLIENT_KEY_SHORT)
    response, digest = server_response(3, bytes(c1))
    assert digest
    assert verify_server_response(bytes(c1), response[1:1537], response[1537:])


def test_bad_version_in_c0_is_a_protocol_error() -> None:
    server = ServerConnection()
    server.receive_data(b"\x06" + bytes(HANDSHAKE_SIZE))
    with pytest.raises(RemoteProtocolError):
        server.next_event()
    assert server.state is State.ERROR
    with pytest.raises(RemoteProtocolError):  # and it stays in its error state
        server.next_event()


def test_http_request_on_the_rtmp_port_is_a_protocol_error() -> None:
    server = ServerConnection()
    server.receive_data(b"GET / HTTP/1.1\r\n\r\n")
    with pytest.raises(RemoteProtocolError):
        server.next_event()


def test_handshake_timeout() -> None:
    server = ServerConnection(RtmpLimits(handshake_timeout=10), now=100.0)
    server.receive_data(b"\x03" + bytes(100), now=101.0)
    assert server.next_event() is NEED_DATA
    server.handle_timer(105.0)
    with pytest.raises(ProtocolTimeout):
        server.handle_timer(110.0)
    with pytest.raises(ProtocolTimeout):
        server.next_event()


# -- chunk stream ---------------------------------------------------------------------------------
@pytest.mark.parametrize("csid", [2, 3, 63, 64, 65, 319, 320, 321, 1000, 65599])
def test_basic_header_sizes_round_trip(csid: int) -> None:
    header = basic_header(0, csid)
    assert len(header) == (1 if csid < 64 else 2 if csid < 320 else 3)
    data = ChunkWriter().write(csid, AUDIO, 1, 42, b"payload")
    assert reader_messages(data) == [(csid, AUDIO, 1, 42, b"payload")]


@pytest.mark.parametrize("csid", [0, 1, 65600])
def test_writer_refuses_impossible_chunk_stream_ids(csid: int) -> None:
    with pytest.raises(LocalProtocolError):
        basic_header(0, csid)


def test_all_four_header_types() -> None:
    writer, prefix = small_chunks(4)
    data = prefix + b"".join([
        writer.write(4, VIDEO, 1, 1000, b"0123456789", fmt=0),  # absolute time
        writer.write(4, AUDIO, 1, 1010, b"abc", fmt=1),  # delta 10, new length and type
        writer.write(4, AUDIO, 1, 1030, b"def", fmt=2),  # delta 20, same length and type
        writer.write(4, AUDIO, 1, 1050, b"ghi", fmt=3),  # everything repeats, delta 20 too
    ])
    assert reader_messages(data) == [
        (4, VIDEO, 1, 1000, b"0123456789"),
        (4, AUDIO, 1, 1010, b"abc"),
        (4, AUDIO, 1, 1030, b"def"),
        (4, AUDIO, 1, 1050, b"ghi"),
    ]


def test_writer_compresses_headers_automatically() -> None:
    writer = ChunkWriter(chunk_size=4096)
    first = writer.write(6, VIDEO, 1, 0, b"x" * 100)
    second = writer.write(6, VIDEO, 1, 33, b"y" * 50)  # new length: type 1
    third = writer.write(6, VIDEO, 1, 70, b"z" * 50)  # same length and type, new delta: type 2
    fourth = writer.write(6, VIDEO, 1, 107, b"w" * 50)  # same delta too: type 3
    assert [chunk[0] >> 6 for chunk in (first, second, third, fourth)] == [0, 1, 2, 3]
    assert [m[3] for m in reader_messages(first + second + third + fourth)] == [0, 33, 70, 107]


def test_type3_after_type0_uses_the_type0_timestamp_as_delta() -> None:
    data = raw_chunk(0, 5, ts=40, length=2, type_id=AUDIO, sid=1, data=b"ab") + raw_chunk(3, 5, data=b"cd")
    assert reader_messages(data) == [(5, AUDIO, 1, 40, b"ab"), (5, AUDIO, 1, 80, b"cd")]


@pytest.mark.parametrize("chunk_size", [1, 3, 128, 4096])
def test_extended_timestamps_including_continuation_chunks(chunk_size: int) -> None:
    writer, prefix = small_chunks(chunk_size)
    payload = bytes(range(200))
    data = (prefix + writer.write(6, VIDEO, 1, 0x1234567, payload)
            + writer.write(6, VIDEO, 1, 0x2000000, payload))
    if chunk_size < 200:
        # continuation chunks repeat the extended timestamp, as FFmpeg and OBS write them
        assert data.count(b"\xc6\x01\x23\x45\x67") == -(-200 // chunk_size) - 1
    assert reader_messages(data) == [(6, VIDEO, 1, 0x1234567, payload), (6, VIDEO, 1, 0x2000000, payload)]


def test_extended_timestamp_missing_on_continuation_chunks_is_tolerated() -> None:
    ts = 0x1000000
    _, prefix = small_chunks(3)
    data = prefix + (raw_chunk(0, 6, length=6, type_id=VIDEO, sid=1, ext=ts, data=b"abc")
            + raw_chunk(3, 6, data=b"def")  # no repeated extended timestamp
            + raw_chunk(0, 4, ts=1, length=2, type_id=AUDIO, sid=1, data=b"au"))
    # (the reader looks at the four bytes after a continuation header to tell)
    assert reader_messages(data) == [(6, VIDEO, 1, ts, b"abcdef"), (4, AUDIO, 1, 1, b"au")]


def test_extended_timestamp_on_type3_new_message() -> None:
    data = (raw_chunk(0, 6, length=2, type_id=VIDEO, sid=1, ext=0x1000000, data=b"ab")
            + raw_chunk(3, 6, ext=0x1000000, data=b"cd"))
    assert reader_messages(data) == [(6, VIDEO, 1, 0x1000000, b"ab"), (6, VIDEO, 1, 0x2000000, b"cd")]


def test_interleaved_chunk_streams() -> None:
    data = b"".join([
        raw_chunk(0, 4, ts=10, length=6, type_id=AUDIO, sid=1, data=b"aaa"),
        raw_chunk(0, 6, ts=20, length=5, type_id=VIDEO, sid=1, data=b"vvv"),
        raw_chunk(3, 4, data=b"AAA"),
        raw_chunk(0, 300, ts=30, length=1, type_id=AUDIO, sid=1, data=b"x"),
        raw_chunk(3, 6, data=b"VV"),
    ])
    _, set_size = small_chunks(3)
    assert reader_messages(set_size + data) == [
        (4, AUDIO, 1, 10, b"aaaAAA"), (300, AUDIO, 1, 30, b"x"), (6, VIDEO, 1, 20, b"vvvVV")]


@pytest.mark.parametrize("sizes", [(1,), (7, 4096), (0x7FFFFFFF, 2), (50, 1, 100000)])
def test_chunk_size_changes_mid_stream(sizes: tuple[int, ...]) -> None:
    writer = ChunkWriter()
    data = bytearray()
    expected = []
    ts = 0
    for size in sizes:
        data += writer.control(SET_CHUNK_SIZE, set_chunk_size(size))
        for length in (1, 99, 300):
            ts += 10
            payload = bytes((length % 256,)) * length
            data += writer.write(6, VIDEO, 1, ts, payload)
            expected.append((6, VIDEO, 1, ts, payload))
    reader = ChunkReader(min_chunk_size=1)
    reader.feed(bytes(data))
    got = [(m.csid, m.type_id, m.stream_id, m.timestamp, m.payload) for m in reader.read_messages()
           if m.type_id != SET_CHUNK_SIZE]
    assert got == expected
    assert reader.chunk_size == sizes[-1]


def test_abort_drops_the_partial_message() -> None:
    abort = ChunkWriter().write(2, ABORT, 0, 0, struct.pack(">I", 6))
    data = (raw_chunk(0, 6, ts=0, length=200, type_id=VIDEO, sid=1, data=b"x" * 128) + abort
            + raw_chunk(0, 6, ts=5, length=3, type_id=VIDEO, sid=1, data=b"new"))
    reader = ChunkReader()
    reader.feed(data)
    messages = reader.read_messages()
    assert [(m.type_id, m.payload) for m in messages] == [(ABORT, struct.pack(">I", 6)), (VIDEO, b"new")]
    assert reader.partial_bytes == 0


def test_type3_on_an_unknown_chunk_stream_is_an_error() -> None:
    with pytest.raises(RemoteProtocolError):
        reader_messages(raw_chunk(3, 9, data=b"x"))


def test_message_larger_than_the_limit_is_refused() -> None:
    data = raw_chunk(0, 6, length=2_000_000, type_id=VIDEO, sid=1)
    with pytest.raises(RemoteProtocolError, match="exceeds the limit"):
        reader_messages(data, max_message_size=1_000_000)


def test_partial_messages_across_chunk_streams_are_bounded() -> None:
    _, prefix = small_chunks(100_000)
    data = prefix + b"".join(raw_chunk(0, csid, length=60_001, type_id=VIDEO, sid=1, data=b"x" * 60_000)
                             for csid in range(3, 40))
    with pytest.raises(RemoteProtocolError, match="unfinished"):
        reader_messages(data, max_partial_bytes=1_000_000)


def test_too_many_chunk_streams_is_refused() -> None:
    data = b"".join(raw_chunk(0, csid, length=1, type_id=AUDIO, sid=1, data=b"x") for csid in range(3, 100))
    with pytest.raises(RemoteProtocolError, match="chunk streams"):
        reader_messages(data, max_chunk_streams=64)


def test_huge_chunk_size_and_no_data_waits_with_the_message_counted() -> None:
    client, server = publishing_pair()
    client.set_chunk_size(0x7FFFFFFF)
    client.send_raw(raw_chunk(0, 6, length=10_000_000, type_id=VIDEO, sid=1, data=b"x" * 10))
    events, _ = pump(client, server)
    assert events == []
    assert server.next_event() is NEED_DATA
    # what the header announced is what is allocated: it counts against the limits at once
    assert server.reader.partial_bytes == 10_000_000
    with pytest.raises(ProtocolTimeout):
        server.handle_timer(server.last_received + server.limits.idle_timeout)


# -- the connection -------------------------------------------------------------------------------
def test_publish_conversation() -> None:
    client = ClientConnection()
    server = ServerConnection()
    server_events, _ = pump(client, server)
    assert server_events == [HandshakeComplete(digest=True)]
    assert verify_server_response(client.c1, client.s1, client.s2)

    tid = client.connect("live", "rtmp://localhost/live")
    (connect,), _ = pump(client, server)
    assert isinstance(connect, ConnectRequest) and connect.app == "live"
    server.accept_connect(connect)
    _, replies = pump(client, server)
    assert replies[-1].name == "_result" and replies[-1].transaction_id == tid
    assert replies[-1].arguments[1]["code"] == "NetConnection.Connect.Success"
    assert client.reader.chunk_size == server.limits.out_chunk_size  # our Set Chunk Size arrived

    client.call("releaseStream", "key")
    client.call("FCPublish", "key")
    client.create_stream()
    events, _ = pump(client, server)
    assert [type(e) for e in events] == [ReleaseStream, FCPublish, CreateStream]
    server.accept_release_stream(events[0])
    server.accept_fcpublish(events[1])
    stream_id = server.accept_create_stream(events[2])
    _, replies = pump(client, server)
    assert CommandResponse("_result", events[2].transaction_id, (None, float(stream_id))) in replies

    client.publish(stream_id, "key?token=1")
    (publish,), _ = pump(client, server)
    assert publish == PublishRequest(publish.transaction_id, stream_id, "key?token=1", "live")
    server.accept_publish(publish, "alice")
    _, replies = pump(client, server)
    assert replies == [StatusMessage("onStatus", stream_id, "status", "NetStream.Publish.Start",
                                     "alice is now published.")]

    client.send_metadata(stream_id, {"width": 1280.0, "height": 720.0})
    client.send_media(VIDEO, stream_id, 0, b"\x17\x00\x00\x00\x00config")
    client.send_media(AUDIO, stream_id, 21, b"\xaf\x01aac")
    client.call("deleteStream", float(stream_id))
    events, _ = pump(client, server)
    assert events == [
        Metadata(stream_id, {"width": 1280.0, "height": 720.0}),
        VideoMessage(stream_id, 0, b"\x17\x00\x00\x00\x00config"),
        AudioMessage(stream_id, 21, b"\xaf\x01aac"),
        DeleteStream(events[3].transaction_id, 0, stream_id),
    ]


def test_enhanced_rtmp_connect_gets_the_codecs_we_take() -> None:
    client = ClientConnection()
    server = ServerConnection()
    pump(client, server)
    client.connect("live", "rtmp://h/live", fourCcList=["hvc1", "av01", "xxxx"])
    (connect,), _ = pump(client, server)
    server.accept_connect(connect)
    _, replies = pump(client, server)
    assert replies[-1].arguments[0]["fourCcList"] == ["hvc1", "av01"]


def test_refusals_reach_the_client() -> None:
    client, server = publishing_pair()
    client.publish(1, "other")
    (publish,), _ = pump(client, server)
    server.reject_publish(publish, "NetStream.Publish.Denied", "wrong stream key")
    client.call("play", "something", stream_id=1)
    (play,), statuses = pump(client, server)
    assert isinstance(play, PlayRequest)
    server.refuse_play(play)
    _, more = pump(client, server)
    assert [(s.level, s.code) for s in statuses + more] == [
        ("error", "NetStream.Publish.Denied"), ("error", "NetStream.Play.Failed")]


def test_unknown_command_is_answered_with_error() -> None:
    client, server = publishing_pair()
    tid = client.call("getSecrets", "x")
    (event,), replies = pump(client, server)
    assert isinstance(event, UnknownCommand) and event.name == "getSecrets"
    assert replies[0].name == "_error" and replies[0].transaction_id == tid


def test_acknowledgement_sent_when_window_is_crossed() -> None:
    client, server = publishing_pair()
    client._out.append(client.writer.control(WINDOW_ACK_SIZE, struct.pack(">I", 5000)))
    pump(client, server)
    client.seen.clear()
    for ts in range(0, 400, 40):
        client.send_media(VIDEO, 1, ts, b"\x27\x01\x00\x00\x00" + bytes(1000))
        pump(client, server)
    acks = [struct.unpack(">I", m.payload)[0] for m in client.seen if m.type_id == ACKNOWLEDGEMENT]
    assert len(acks) == 2  # 10 kB sent, a window of 5 kB
    assert acks[0] >= 5000 and acks[1] - acks[0] >= 5000
    assert acks[-1] <= server.bytes_received


def test_ping_request_gets_a_response() -> None:
    client, server = publishing_pair()
    client.seen.clear()
    client._out.append(client.writer.control(USER_CONTROL, struct.pack(">HI", 6, 777)))
    pump(client, server)
    pongs = [m.payload for m in client.seen if m.type_id == USER_CONTROL]
    assert pongs == [struct.pack(">HI", 7, 777)]


def test_timestamps_unwrap_past_32_bits() -> None:
    client, server = publishing_pair()
    for ts in (0xFFFFFF00, 0xFFFFFFF0, 0x10, 0x20):
        client.send_media(AUDIO, 1, ts, b"\xaf\x01x")
    events, _ = pump(client, server)
    assert [e.timestamp for e in events] == [0xFFFFFF00, 0xFFFFFFF0, 0x1_0000_0010, 0x1_0000_0020]


def test_idle_timeout() -> None:
    client, server = publishing_pair()
    client.send_media(AUDIO, 1, 0, b"\xaf\x01x")
    server.receive_data(client.data_to_send(), now=50.0)
    server.handle_timer(50.0 + server.limits.idle_timeout - 1)
    with pytest.raises(ProtocolTimeout):
        server.handle_timer(50.0 + server.limits.idle_timeout)


@pytest.mark.parametrize("payload, type_id", [
    (b"\x02\x00\x07conn", COMMAND_AMF0),  # truncated AMF
    (amf0.encode(1.0, 2.0), COMMAND_AMF0),  # a command without a name
    (b"\x00\x01", 7),  # unknown message type
    (b"\x00\x01", 42),
    (b"\x00", USER_CONTROL),  # too short
    (b"\x00", WINDOW_ACK_SIZE),
])
def test_malformed_messages_are_protocol_errors(payload: bytes, type_id: int) -> None:
    client, server = publishing_pair()
    client.send_raw(client.writer.write(3, type_id, 0, 0, payload))
    server.receive_data(client.data_to_send())
    with pytest.raises(RemoteProtocolError):
        drain(server)
    assert server.state is State.ERROR
    with pytest.raises(RemoteProtocolError):
        server.next_event()


def test_big_command_messages_are_refused_before_decoding() -> None:
    client, server = publishing_pair()
    # a strict array of 300 000 nulls: 300 kB on the wire, millions of bytes of Python objects
    payload = amf0.encode("connect", 1.0) + b"\x0a" + struct.pack(">I", 300_000) + b"\x05" * 300_000
    client.send_raw(client.writer.write(3, COMMAND_AMF0, 0, 0, payload))
    server.receive_data(client.data_to_send())
    with pytest.raises(RemoteProtocolError, match="exceeds the limit"):
        drain(server)


def _recorded_session() -> tuple[bytes, bytes]:
    """Client bytes of a whole publish: (handshake part, everything after it)."""
    client = ClientConnection()
    server = ServerConnection(handshake_random=FIXED_RANDOM)
    sent = bytearray()

    def go() -> list[object]:
        events: list[object] = []
        for _ in range(20):
            data = client.data_to_send()
            sent.extend(data)
            if data:
                server.receive_data(data)
            events += drain(server)
            back = server.data_to_send()
            if back:
                client.receive_data(back)
            drain(client)
            if not data and not back:
                break
        return events

    go()
    handshake = bytes(sent)
    sent.clear()
    client.set_chunk_size(128)
    client.connect("live", "rtmp://h/live")
    server.accept_connect(go()[0])
    client.create_stream()
    server.accept_create_stream(go()[0])
    client.publish(1, "key")
    server.accept_publish(go()[0])
    client.send_metadata(1, {"width": 320.0, "duration": 0.0})
    client.send_media(VIDEO, 1, 0, b"\x17\x00\x00\x00\x00" + bytes(range(256)) + bytes(range(44)))
    client.send_media(AUDIO, 1, 0xFFFFFF, b"\xaf\x00\x11\x90")
    client.set_chunk_size(130)  # (the smallest a peer may set is 128)
    client.send_media(AUDIO, 1, 0x1000005, b"\xaf\x01" + bytes(30))
    client.send_media(VIDEO, 1, 0x1000009, b"\x27\x01\x00\x00\x21" + bytes(range(200)) * 2)
    client.call("FCUnpublish", "key")
    go()
    return handshake, bytes(sent)


def _events_for(chunks: list[bytes]) -> list[object]:
    server = ServerConnection(handshake_random=FIXED_RANDOM)
    events: list[object] = []
    for chunk in chunks:
        server.receive_data(chunk)
        events += drain(server)
        # the server must answer the commands to keep chunk stream state like a real one
        for event in events:
            if isinstance(event, ConnectRequest) and not getattr(server, "_ok", False):
                server.accept_connect(event)
                server._ok = True  # type: ignore[attr-defined]
    return events


def test_every_split_gives_the_same_events() -> None:
    handshake, session = _recorded_session()
    whole = _events_for([handshake + session])
    assert [type(e).__name__ for e in whole] == [
        "HandshakeComplete", "ConnectRequest", "CreateStream", "PublishRequest", "Metadata",
        "VideoMessage", "AudioMessage", "AudioMessage", "VideoMessage", "FCUnpublish"]
    assert whole[-3].timestamp == 0x1000005
    # one byte at a time
    data = handshake + session
    assert _events_for([data[i:i + 1] for i in range(len(data))]) == whole
    # split in two at every boundary
    for cut in range(len(data) + 1):
        assert _events_for([data[:cut], data[cut:]]) == whole, cut
    # with trailing garbage-free extra data: a second copy of a media message after the end
    trailing = ChunkWriter(130).write(6, VIDEO, 1, 0x1000100, b"\x27\x01\x00\x00\x00tail")
    assert _events_for([data + trailing])[:-1] == whole


def test_random_garbage_never_escapes_as_another_exception() -> None:
    handshake, session = _recorded_session()
    rng = random.Random(7)
    for _ in range(300):
        mutated = bytearray(session)
        for _ in range(rng.randint(1, 8)):
            mutated[rng.randrange(len(mutated))] = rng.randrange(256)
        if rng.random() < 0.3:
            mutated += rng.randbytes(rng.randint(1, 200))
        server = ServerConnection(RtmpLimits(max_message_size=100_000, max_partial_bytes=200_000))
        server.receive_data(handshake + bytes(mutated))
        try:
            events = drain(server)
            for event in events:
                if isinstance(event, ConnectRequest):
                    server.accept_connect(event)
        except RemoteProtocolError:
            assert server.state is State.ERROR


# -- what a peer can make us hold and spend ------------------------------------------------------
def after_handshake(**kwargs: object) -> ServerConnection:
    """A server connection past the (plain) handshake and nothing else: no connect, no key."""
    server = ServerConnection(**kwargs)  # type: ignore[arg-type]
    server.receive_data(b"\x03" + bytes(HANDSHAKE_SIZE))
    assert drain(server) == []
    server.receive_data(bytes(HANDSHAKE_SIZE))
    assert drain(server) == [HandshakeComplete(False)]
    return server


def test_tiny_chunk_size_is_refused_before_any_bytes_of_the_message() -> None:
    # the reviewer's case: chunk size 2, then a large message never finished
    server = after_handshake()
    writer = ChunkWriter()
    data = writer.control(SET_CHUNK_SIZE, set_chunk_size(2))
    data += writer.write(6, VIDEO, 1, 0, bytes(200_000))[:100_000]
    server.receive_data(data)
    with pytest.raises(RemoteProtocolError, match="below the minimum of 128"):
        drain(server)
    assert server.state is State.ERROR and server.reader.partial_bytes == 0
    for size in (128, 4096, 0x7FFFFFFF):  # what encoders use is fine
        ok = after_handshake()
        ok.receive_data(ChunkWriter().control(SET_CHUNK_SIZE, set_chunk_size(size)))
        drain(ok)
        assert ok.reader.chunk_size == size


def test_large_messages_before_publish_is_authorized_are_refused() -> None:
    big = after_handshake()
    big.receive_data(raw_chunk(0, 6, length=1_000_000, type_id=VIDEO, sid=1, data=b"x" * 128))
    with pytest.raises(RemoteProtocolError, match="exceeds the limit of 262144"):
        drain(big)
    # two messages each under the limit, together over the unauthorized partial bytes
    many = after_handshake()
    many.receive_data(raw_chunk(0, 6, length=200_000, type_id=VIDEO, sid=1, data=b"x" * 128)
                      + raw_chunk(0, 7, length=200_000, type_id=VIDEO, sid=1, data=b"x" * 128))
    with pytest.raises(RemoteProtocolError, match="unfinished"):
        drain(many)
    # a refused publish lifts nothing; an accepted one gives the media limits
    client = ClientConnection()
    server = ServerConnection()
    pump(client, server)
    client.connect("live", "rtmp://h/live")
    server.accept_connect(pump(client, server)[0][0])
    client.publish(1, "wrong")
    server.reject_publish(pump(client, server)[0][0])
    assert server.reader.max_message_size == 256 * 1024 and not server.authorized
    client.publish(1, "right")
    server.accept_publish(pump(client, server)[0][0])
    assert server.reader.max_message_size == server.limits.max_message_size and server.authorized


def test_big_keyframes_after_publish_are_fine() -> None:
    client, server = publishing_pair()
    client.set_chunk_size(4096)
    keyframe = b"\x17\x01\x00\x00\x00" + random.Random(1).randbytes(6 * 1024 * 1024)
    client.send_media(VIDEO, 1, 0, keyframe)
    client.send_media(VIDEO, 1, 33, keyframe[:1000])
    events, _ = pump(client, server)
    assert events == [VideoMessage(1, 0, keyframe), VideoMessage(1, 33, keyframe[:1000])]
    assert server.reader.partial_bytes == 0


def test_an_unfinished_message_costs_about_the_bytes_sent() -> None:
    client, server = publishing_pair()  # chunks of 128: the smallest a peer may use
    assert server.reader.chunk_size == 128
    size = 8 * 1024 * 1024
    chunked = client.writer.write(6, VIDEO, 1, 0, b"\x17\x01\x00\x00\x00" + bytes(size - 5))
    sent = chunked[:-1000]  # all but the end: the message stays unfinished
    reads = [sent[i:i + 65536] for i in range(0, len(sent), 65536)]  # as a socket reads
    del chunked
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for data in reads:
            server.receive_data(data)
            assert server.next_events() == []
        held, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert server.reader.partial_bytes == size
    # one buffer for the message, not an object per chunk (chunk size 2 once made it 21x)
    assert held - before <= 2 * len(sent)
    assert peak - before <= 2 * len(sent)


def test_unfinished_messages_are_bounded_across_connections() -> None:
    budget = PartialBudget(400_000)
    first, second = after_handshake(budget=budget), after_handshake(budget=budget)
    first.receive_data(raw_chunk(0, 6, length=200_000, type_id=VIDEO, sid=1, data=b"x" * 128))
    assert drain(first) == [] and budget.used == 200_000
    second.receive_data(raw_chunk(0, 6, length=250_000, type_id=VIDEO, sid=1, data=b"x" * 128))
    with pytest.raises(RemoteProtocolError, match="server-wide"):
        drain(second)
    assert budget.used == 200_000
    first.close()  # a closed (or failed) connection gives back what it held
    assert budget.used == 0
    third = after_handshake(budget=budget)
    third.receive_data(raw_chunk(0, 6, length=250_000, type_id=VIDEO, sid=1, data=b"x" * 128))
    assert drain(third) == [] and budget.used == 250_000
    third.receive_data(raw_chunk(0, 3, length=7, type_id=COMMAND_AMF0, data=b"\x02\x00\x09conn"))
    with pytest.raises(AmfError):  # a connection failing gives back what it held too
        drain(third)
    assert budget.used == 0 and not budget.spent
