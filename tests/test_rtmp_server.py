"""The RTMP server with real clients: FFmpeg's own RTMP client (through PyAV) and raw sockets.

FFmpeg publishes from a child process: PyAV keeps the GIL while FFmpeg blocks on the network,
so a publisher thread in the process that runs the server's event loop would deadlock it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import struct
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from ingest.rtmp import server as rtmp_server
from ingest.rtmp.chunks import AUDIO, VIDEO, ChunkWriter
from ingest.rtmp.client import RtmpPublishError, open_publisher
from ingest.rtmp.connection import ClientConnection, RtmpLimits
from ingest.rtmp.handshake import HANDSHAKE_SIZE
from ingest.rtmp.server import PROTOCOL_ERRORS, REJECTED, RtmpServer
from livesrv.hub import Hub, Stream
from livesrv.media import Packet

KEYS = {"alice-key": "alice", "bob-key": "bob"}

PUBLISHER = r"""
import sys, time, fractions, av
url, codec, seconds, realtime = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4] == "1"
width, height = 640, 360
out = av.open(url, "w", format="flv")
video = out.add_stream(codec, rate=30)
video.width, video.height, video.pix_fmt = width, height, "yuv420p"
if codec == "libx264":
    video.options = {"preset": "ultrafast", "g": "30", "bf": "2"}
else:
    video.options = {"preset": "ultrafast", "x265-params": "keyint=30:log-level=error"}
audio = out.add_stream("aac", rate=48000)
audio.layout = "stereo"
start = time.monotonic()
samples = 0
for i in range(int(seconds * 30)):
    frame = av.VideoFrame(width, height, "yuv420p")
    for plane in frame.planes:
        row = bytes((n + i * 4) & 0xFF for n in range(plane.line_size))
        plane.update(row * (plane.buffer_size // plane.line_size))
    frame.pts = i
    frame.time_base = fractions.Fraction(1, 30)
    out.mux(video.encode(frame))
    while samples < (i + 1) * 48000 // 30:
        chunk = av.AudioFrame(format="fltp", layout="stereo", samples=1024)
        for plane in chunk.planes:
            plane.update(bytes(plane.buffer_size))
        chunk.sample_rate = 48000
        chunk.pts = samples
        samples += 1024
        out.mux(audio.encode(chunk))
    if realtime:
        time.sleep(max(0.0, start + i / 30 - time.monotonic()))
out.mux(video.encode())
out.mux(audio.encode())
out.close()
"""


async def run_ffmpeg(url: str, codec: str = "libx264", seconds: float = 2.0,
                     realtime: bool = False) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-c", PUBLISHER, url, codec, str(seconds), "1" if realtime else "0",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)


@dataclass
class Recorder:
    """What the hub saw: every publication and the packets each consumer got."""

    started: list[Stream] = field(default_factory=list)
    ended: list[Stream] = field(default_factory=list)
    packets: dict[int, list[Packet]] = field(default_factory=dict)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def on_start(self, stream: Stream) -> None:
        self.started.append(stream)
        got = self.packets.setdefault(id(stream), [])
        sub = stream.subscribe("test", maxsize=100_000)

        async def consume() -> None:
            async for packet in sub:
                got.append(packet)

        self.tasks.append(asyncio.get_running_loop().create_task(consume()))


@dataclass
class Rig:
    hub: Hub
    server: RtmpServer
    recorder: Recorder

    def url(self, key: str) -> str:
        return f"rtmp://127.0.0.1:{self.server.port}/live/{key}"


@pytest.fixture
async def rig(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Rig]:
    monkeypatch.setattr(rtmp_server, "TICK_SECONDS", 0.1)
    hub = Hub()
    recorder = Recorder()
    hub.add_listener(on_start=recorder.on_start, on_end=recorder.ended.append)

    async def authorize(app: str, key: str) -> str | None:
        await asyncio.sleep(0)  # a real store answers later, not at once
        return KEYS.get(key) if app == "live" else None

    limits = RtmpLimits(handshake_timeout=2.0, idle_timeout=3.0, max_message_size=1_000_000,
                        max_partial_bytes=2_000_000, start_timeout=0.5)
    server = RtmpServer(hub, authorize, host="127.0.0.1", port=0, limits=limits)
    await server.start()
    assert server.serving and server.port
    yield Rig(hub, server, recorder)
    await server.close()
    assert not server.serving
    for task in recorder.tasks:
        task.cancel()


async def wait_until(predicate: object, seconds: float = 15.0) -> None:
    async with asyncio.timeout(seconds):
        for _ in itertools.count():
            if predicate():  # type: ignore[operator]
                return
            await asyncio.sleep(0.02)


def check_packets(packets: list[Packet]) -> None:
    for kind in ("video", "audio"):
        dts = [p.dts for p in packets if p.kind == kind]
        assert dts, f"no {kind} packets"
        assert dts == sorted(dts), f"{kind} dts not monotonic"
    video = [p for p in packets if p.kind == "video"]
    assert video[0].keyframe
    keyframes = [i for i, p in enumerate(video) if p.keyframe]
    assert len(keyframes) >= 2 and all(b - a <= 30 for a, b in itertools.pairwise(keyframes))  # GOP 30
    assert all(p.pts >= p.dts for p in video)
    assert all(p.keyframe for p in packets if p.kind == "audio")


@pytest.mark.parametrize("codec, name", [("libx264", "h264"), ("libx265", "hevc")])
async def test_ffmpeg_publishes(rig: Rig, codec: str, name: str) -> None:
    proc = await run_ffmpeg(rig.url("alice-key?app=obs"), codec, seconds=2.0)
    assert await asyncio.wait_for(proc.wait(), 60) == 0
    await wait_until(lambda: rig.recorder.ended)
    (stream,) = rig.recorder.started
    assert stream.channel == "alice" and stream.source == "rtmp"
    video, audio = stream.info.video, stream.info.audio
    assert video is not None and video.codec == name
    assert video.extradata is not None and video.extradata[0] == 1  # avcC / hvcC
    assert (video.width, video.height) == (640, 360)
    assert audio is not None and (audio.codec, audio.sample_rate, audio.channels) == ("aac", 48000, 2)
    assert audio.extradata is not None and len(audio.extradata) >= 2  # the AudioSpecificConfig
    packets = rig.recorder.packets[id(stream)]
    assert len([p for p in packets if p.kind == "video"]) == 60
    check_packets(packets)
    assert rig.hub.get("alice") is None  # unpublished when FFmpeg closed


async def test_wrong_key_publishes_nothing(rig: Rig) -> None:
    before = REJECTED.labels("bad_key")._value.get()
    proc = await run_ffmpeg(rig.url("not-a-key"), seconds=1.0)
    assert await asyncio.wait_for(proc.wait(), 60) != 0  # FFmpeg saw the refusal
    assert rig.recorder.started == []
    assert REJECTED.labels("bad_key")._value.get() == before + 1
    with pytest.raises(RtmpPublishError) as refused:
        async with asyncio.timeout(10):
            await open_publisher("127.0.0.1", rig.server.port, "not-a-key")
    assert refused.value.status == "NetStream.Publish.Denied"
    with pytest.raises(RtmpPublishError):  # right key, wrong app
        async with asyncio.timeout(10):
            await open_publisher("127.0.0.1", rig.server.port, "alice-key", app="vod")
    assert rig.recorder.started == []


async def test_second_publisher_takes_over(rig: Rig) -> None:
    first = await run_ffmpeg(rig.url("alice-key"), seconds=30.0, realtime=True)
    try:
        await wait_until(lambda: rig.hub.get("alice") is not None)
        second = await run_ffmpeg(rig.url("alice-key"), seconds=2.0, realtime=True)
        # the first connection is closed by the server: FFmpeg fails long before its 30 s
        assert await asyncio.wait_for(first.wait(), 15) != 0
        assert await asyncio.wait_for(second.wait(), 30) == 0
    finally:
        with contextlib.suppress(ProcessLookupError):
            first.kill()
    await wait_until(lambda: len(rig.recorder.ended) == 2)
    old, new = rig.recorder.started
    assert old.end_reason == "replaced"
    assert new.channel == "alice" and new.end_reason in ("unpublished", "disconnected")
    check_packets(rig.recorder.packets[id(new)])


# -- our own client: precise control of what is sent ----------------------------------------------
AVCC_A = bytes.fromhex("0164000dffe100186764000dacd94141fa10000003001000000303c0f1429960010006"
                       "68ebe3cb22c0fdf8f800")
AVCC_B = AVCC_A[:-1] + b"\x01"


def avc(frame_type: int, packet_type: int, body: bytes) -> bytes:
    return bytes(((frame_type << 4) | 7, packet_type, 0, 0, 0)) + body


async def test_new_sequence_header_starts_a_new_publication(rig: Rig) -> None:
    async with asyncio.timeout(10):
        pub = await open_publisher("127.0.0.1", rig.server.port, "bob-key")
    pub.send_metadata({"videocodecid": 7.0, "width": 320.0, "height": 240.0})
    pub.send_media(VIDEO, 0, avc(1, 0, AVCC_A))
    pub.send_media(VIDEO, 0, avc(1, 1, b"\x00\x00\x00\x01\x65"))
    pub.send_media(VIDEO, 33, avc(1, 0, AVCC_A))  # the same again: nothing changes
    pub.send_media(VIDEO, 33, avc(2, 1, b"\x00\x00\x00\x01\x41"))
    await wait_until(lambda: len(rig.recorder.packets.get(id(rig.hub.get("bob")), [])) == 2)
    pub.send_media(VIDEO, 66, avc(1, 0, AVCC_B))  # new parameters
    pub.send_media(VIDEO, 66, avc(1, 1, b"\x00\x00\x00\x01\x65"))
    await wait_until(lambda: len(rig.recorder.started) == 2)
    first, second = rig.recorder.started
    assert first.end_reason == "new codec parameters" and first.ended
    assert second.info.video is not None and second.info.video.extradata == AVCC_B
    assert second.info.audio is None  # no audio announced, none waited for
    await pub.close()
    await wait_until(lambda: second.ended)


async def test_start_without_metadata_waits_then_goes_live(rig: Rig) -> None:
    async with asyncio.timeout(10):
        pub = await open_publisher("127.0.0.1", rig.server.port, "bob-key", chunk_size=128)
    pub.send_media(VIDEO, 0, avc(1, 0, AVCC_A))
    for ts in range(0, 300, 33):
        pub.send_media(VIDEO, ts, avc(1 if ts == 0 else 2, 1, b"\x00\x00\x00\x01\x65"))
    # no onMetaData and no audio: it starts after the (short, in this rig) start timeout
    await wait_until(lambda: rig.hub.get("bob") is not None)
    stream = rig.hub.get("bob")
    assert stream is not None and stream.info.audio is None
    await wait_until(lambda: len(rig.recorder.packets[id(stream)]) == 10)  # held packets kept
    pub.conn.call("FCUnpublish", "bob-key")
    pub.conn.call("deleteStream", float(pub.stream_id))
    pub.send_media(AUDIO, 400, b"\xaf\x01x")  # flush the calls
    await wait_until(lambda: stream.ended)
    assert stream.end_reason == "unpublished"
    await pub.close()


async def test_media_sent_while_authorization_runs_is_kept_in_order() -> None:
    hub = Hub()
    recorder = Recorder()
    hub.add_listener(on_start=recorder.on_start, on_end=recorder.ended.append)

    async def slow_authorize(app: str, key: str) -> str | None:
        await asyncio.sleep(0.3)  # a slow store: the client does not wait for it
        return KEYS.get(key)

    server = RtmpServer(hub, slow_authorize, host="127.0.0.1", port=0)
    await server.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        conn = ClientConnection()
        events: list[object] = []

        async def until(predicate: object) -> None:
            async with asyncio.timeout(10):
                while not predicate():  # type: ignore[operator]
                    writer.write(conn.data_to_send())
                    chunk = await reader.read(65536)
                    assert chunk, "server closed"
                    conn.receive_data(chunk)
                    events.extend(conn.next_events())

        await until(lambda: events)
        conn.connect("live", "rtmp://x/live")
        conn.create_stream()
        await until(lambda: sum(type(e).__name__ == "CommandResponse" for e in events) == 2)
        # everything at once, without waiting for NetStream.Publish.Start
        conn.publish(1, "bob-key")
        conn.send_metadata(1, {"videocodecid": 7.0})
        conn.send_media(VIDEO, 1, 0, avc(1, 0, AVCC_A))
        for n in range(50):
            conn.send_media(VIDEO, 1, n * 33, avc(1 if n % 10 == 0 else 2, 1, bytes((0, 0, 0, 1, n))))
        writer.write(conn.data_to_send())
        await wait_until(lambda: recorder.started and len(recorder.packets[id(recorder.started[0])]) == 50)
        packets = recorder.packets[id(recorder.started[0])]
        assert [p.data[-1] for p in packets] == list(range(50))
        writer.close()
    finally:
        await server.close()


def test_publish_and_takeover_on_uvloop() -> None:
    """``livesrv serve`` runs on uvloop, whose transports differ from asyncio's: the same
    session code must work there (publish, take over, refuse)."""
    import uvloop

    async def scenario() -> None:
        hub = Hub()
        recorder = Recorder()
        hub.add_listener(on_start=recorder.on_start, on_end=recorder.ended.append)

        async def authorize(app: str, key: str) -> str | None:
            return KEYS.get(key)

        server = RtmpServer(hub, authorize, host="127.0.0.1", port=0)
        await server.start()
        try:
            async with asyncio.timeout(10):
                first = await open_publisher("127.0.0.1", server.port, "bob-key")
                first.send_media(VIDEO, 0, avc(1, 0, AVCC_A))
                await wait_until(lambda: hub.get("bob") is not None)
                second = await open_publisher("127.0.0.1", server.port, "bob-key")
                second.send_media(VIDEO, 0, avc(1, 0, AVCC_A))
                await first.closed.wait()  # the server closed the replaced connection
                await wait_until(lambda: len(recorder.started) == 2)
                with pytest.raises(RtmpPublishError):
                    await open_publisher("127.0.0.1", server.port, "wrong")
            assert recorder.started[0].end_reason == "replaced"
            await second.close()
            await wait_until(lambda: recorder.started[1].ended)
        finally:
            await server.close()

    uvloop.run(scenario())


async def test_play_is_refused_politely(rig: Rig) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", rig.server.port)
    conn = ClientConnection()
    events: list[object] = []

    async def until(predicate: object) -> None:
        async with asyncio.timeout(10):
            while not predicate():  # type: ignore[operator]
                data = conn.data_to_send()
                if data:
                    writer.write(data)
                chunk = await reader.read(65536)
                assert chunk, "server closed"
                conn.receive_data(chunk)
                events.extend(conn.next_events())

    await until(lambda: events)
    conn.connect("live", "rtmp://x/live")
    conn.create_stream()
    await until(lambda: sum(type(e).__name__ == "CommandResponse" for e in events) == 2)
    conn.call("play", "alice", stream_id=1)
    await until(lambda: any(type(e).__name__ == "StatusMessage" for e in events))
    status = next(e for e in events if type(e).__name__ == "StatusMessage")
    assert (status.level, status.code) == ("error", "NetStream.Play.Failed")  # type: ignore[attr-defined]
    writer.close()


# -- hostile peers --------------------------------------------------------------------------------
async def closed_by_server(port: int, payload: bytes, *, handshake: bool = False) -> bool:
    """Send ``payload`` (after a handshake when asked); True once the server hangs up."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        if handshake:
            writer.write(b"\x03" + bytes(HANDSHAKE_SIZE))
            await reader.readexactly(1 + 2 * HANDSHAKE_SIZE)
            writer.write(bytes(HANDSHAKE_SIZE))
        writer.write(payload)
        async with asyncio.timeout(10):
            while await reader.read(65536):
                pass
        return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    finally:
        writer.close()


async def test_connections_past_the_limit_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    async def authorize(app: str, key: str) -> str | None:
        return None

    server = RtmpServer(Hub(), authorize, host="127.0.0.1", port=0, limits=RtmpLimits(max_connections=2))
    await server.start()
    try:
        before = REJECTED.labels("too_many_connections")._value.get()
        kept = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(2)]
        await wait_until(lambda: len(server.sessions) == 2)
        assert await closed_by_server(server.port, b"")
        assert REJECTED.labels("too_many_connections")._value.get() == before + 1
        for _, writer in kept:
            writer.close()
    finally:
        await server.close()


def chunk_header(csid: int, length: int, type_id: int) -> bytes:
    """A type-0 chunk header (csid < 64) at timestamp 0 on message stream 1."""
    return bytes((csid,)) + b"\0\0\0" + length.to_bytes(3, "big") + bytes((type_id,)) + b"\1\0\0\0"


async def test_hostile_peers_are_closed_and_the_server_carries_on(rig: Rig,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "livesrv.rtmp")
    port = rig.server.port
    errors_before = PROTOCOL_ERRORS._value.get()
    big_chunks = ChunkWriter().control(1, struct.pack(">I", 100_000))
    cases = {
        "unsupported RTMP version 71": (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", False),
        "handshake not completed": (b"\x03" + bytes(100), False),
        "nothing received": (b"", True),
        "exceeds the limit": (chunk_header(3, 0x7FFFFF, VIDEO), True),
        # messages of 200 bytes, each left after its first chunk of 128
        "more than 64 chunk streams": (b"".join(chunk_header(csid, 200, VIDEO) + b"x" * 128
                                                for csid in range(2, 64))
                                       + b"".join(bytes((0, n)) + chunk_header(3, 200, VIDEO)[1:] + b"x" * 128
                                                  for n in range(10)), True),
        # 27 messages of 200 kB left after their first chunk of 100 kB: 2.7 MB > the 2 MB limit
        "unfinished messages": (big_chunks + b"".join(chunk_header(csid, 200_000, VIDEO) + b"x" * 100_000
                                                      for csid in range(3, 30)), True),
        "truncated AMF0": (chunk_header(3, 7, 20) + b"\x02\x00\x09conn", True),
    }
    results = await asyncio.gather(*(closed_by_server(port, data, handshake=handshake)
                                     for data, handshake in cases.values()))
    assert all(results)
    await wait_until(lambda: not rig.server.sessions)
    assert PROTOCOL_ERRORS._value.get() == errors_before + len(cases)
    lines = [r.getMessage() for r in caplog.records if "closed:" in r.getMessage()]
    assert len(lines) == len(cases)  # one line per hostile peer
    for reason in cases:
        assert any(reason in line for line in lines), (reason, lines)
    # still serving real publishers
    async with asyncio.timeout(10):
        pub = await open_publisher("127.0.0.1", port, "alice-key")
    await pub.close()


# -- what must never escape a session --------------------------------------------------------------
def no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    bad = [r for r in caplog.records if r.exc_info or r.name == "asyncio"]
    assert not bad, [r.getMessage() for r in bad]


@pytest.mark.parametrize("value", [float("inf"), float("nan"), 1e300, -5.0])
async def test_absurd_metadata_numbers_leave_the_session_working(
        rig: Rig, caplog: pytest.LogCaptureFixture, value: float) -> None:
    caplog.set_level(logging.DEBUG)
    async with asyncio.timeout(10):
        pub = await open_publisher("127.0.0.1", rig.server.port, "bob-key")
    pub.send_metadata({"videocodecid": 7.0, "width": value, "height": value, "framerate": value,
                       "fps": value, "videodatarate": value, "audiodatarate": value})
    pub.send_media(VIDEO, 0, avc(1, 0, AVCC_A))
    pub.send_media(VIDEO, 0, avc(1, 1, b"\x00\x00\x00\x01\x65"))
    await wait_until(lambda: len(rig.recorder.packets.get(id(rig.hub.get("bob")), [])) == 1)
    stream = rig.hub.get("bob")
    assert stream is not None and stream.info.video is not None
    video = stream.info.video
    assert (video.width, video.height, video.bitrate) == (320, 240, None)  # size from the SPS
    assert video.fps is None or 0 < video.fps <= 240
    pub.send_media(VIDEO, 33, avc(2, 1, b"\x00\x00\x00\x01\x41"))  # still publishing
    await wait_until(lambda: len(rig.recorder.packets[id(stream)]) == 2)
    await pub.close()
    await wait_until(lambda: stream.ended)
    no_tracebacks(caplog)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def _fail_on_metadata(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug on our side reached by a peer's input (the real one, Infinity in onMetaData, is
    fixed: this stands for the next one)."""
    def broken(self: object, values: dict[str, object]) -> None:
        raise RuntimeError("bug on metadata")

    monkeypatch.setattr(rtmp_server.FlvAdapter, "set_metadata", broken)


def internal_error_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno >= logging.WARNING and "internal error" in r.getMessage()]


async def test_an_internal_error_closes_that_connection_with_one_line(
        rig: Rig, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    caplog.set_level(logging.DEBUG)
    _fail_on_metadata(monkeypatch)
    errors_before = rtmp_server.INTERNAL_ERRORS._value.get()
    async with asyncio.timeout(10):
        pub = await open_publisher("127.0.0.1", rig.server.port, "bob-key")
        pub.send_media(VIDEO, 0, avc(1, 0, AVCC_A))
        pub.send_metadata({"videocodecid": 7.0})
        await pub.closed.wait()  # the server closed it
    await wait_until(lambda: not rig.server.sessions)
    (line,) = internal_error_lines(caplog)
    assert line.startswith("rtmp 127.0.0.1:") and "RuntimeError: bug on metadata" in line
    assert "test_rtmp_server.py:" in line  # where it failed
    assert rtmp_server.INTERNAL_ERRORS._value.get() == errors_before + 1
    no_tracebacks(caplog)
    assert rig.hub.get("bob") is None
    await pub.close()


async def test_an_internal_error_while_authorization_runs_closes_that_connection(
        rig: Rig, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """Events parked during the authorization are handled in its task: an error there must not
    become "Task exception was never retrieved" with reading left paused."""
    caplog.set_level(logging.DEBUG)
    _fail_on_metadata(monkeypatch)
    reader, writer = await asyncio.open_connection("127.0.0.1", rig.server.port)
    conn = ClientConnection()
    responses = 0
    async with asyncio.timeout(10):
        while responses < 2:
            writer.write(conn.data_to_send())
            chunk = await reader.read(65536)
            assert chunk
            conn.receive_data(chunk)
            events = conn.next_events()
            if any(type(e).__name__ == "HandshakeComplete" for e in events):
                conn.connect("live", "rtmp://x/live")
                conn.create_stream()
            responses += sum(type(e).__name__ == "CommandResponse" for e in events)
        conn.publish(1, "bob-key")  # the metadata follows at once, before the answer
        conn.send_metadata(1, {"videocodecid": 7.0})
        writer.write(conn.data_to_send())
        while await reader.read(65536):  # until the server closes
            pass
    writer.close()
    await wait_until(lambda: not rig.server.sessions)
    assert len(internal_error_lines(caplog)) == 1
    no_tracebacks(caplog)


async def test_new_connections_are_refused_while_the_memory_budget_is_spent() -> None:
    async def authorize(app: str, key: str) -> str | None:
        return KEYS.get(key)

    server = RtmpServer(Hub(), authorize, host="127.0.0.1", port=0,
                        limits=RtmpLimits(max_partial_bytes_total=250_000))
    await server.start()
    try:
        before = REJECTED.labels("memory_budget")._value.get()
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"\x03" + bytes(HANDSHAKE_SIZE))
        await reader.readexactly(1 + 2 * HANDSHAKE_SIZE)
        writer.write(bytes(HANDSHAKE_SIZE) + chunk_header(6, 250_000, VIDEO) + b"x" * 128)
        await wait_until(lambda: server.partial_budget.spent)
        assert await closed_by_server(server.port, b"")
        assert REJECTED.labels("memory_budget")._value.get() == before + 1
        writer.close()  # what it held is given back: others get in again
        await wait_until(lambda: server.partial_budget.used == 0)
        async with asyncio.timeout(10):
            pub = await open_publisher("127.0.0.1", server.port, "alice-key")
        await pub.close()
    finally:
        await server.close()
