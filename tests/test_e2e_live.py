"""The live spine end to end: FFmpeg's own RTMP client (through PyAV) → our RTMP ingest → hub →
fMP4 HLS over HTTP → fetched and decoded with PyAV, against the real server as a process.

One server serves the whole module (each test publishes as a user of its own), so the cost is
the publishing time, not server start-ups. Frames carry their number in their pixels (see
tests/support/publish.py), so "every frame arrived, in order, once" is checked on what the
decoder returns, not on counts alone.
"""

from __future__ import annotations

import io
import itertools
import re
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from typing import Any

import av
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.publish import (
    AUDIO_LEAD,
    DecodedSegment,
    MediaPlaylist,
    RtmpPublisher,
    Variant,
    add_channel,
    decode_segment,
    http_get,
    parse_media_playlist,
    parse_multivariant,
)
from tests.support.server import ServerProcess, get_json
from tests.support.wait import wait_for

pytestmark = pytest.mark.e2e

FPS = 30
PLAYLIST_TYPE = "application/vnd.apple.mpegurl"
SEGMENT_TYPES = ("video/mp4", "video/iso.segment")
IMMUTABLE = "public, max-age=31536000, immutable"
#: RFC 6381 / ISO 14496-15 Annex E: hvc1.<profile>.<compat flags>.<tier><level>[.<constraints>]
HEVC_CODECS = r"(hvc1|hev1)\.[A-C]?\d+\.[0-9A-Fa-f]+\.[LH]\d+(\.[0-9A-Fa-f]{1,2})*"
CONTRACT_FIELDS = {"channel", "title", "viewers", "started_at", "hls", "whep", "thumbnail"}


@pytest.fixture(scope="module")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = ServerProcess(tmp_path_factory.mktemp("e2e-server"))
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


_users = iter(range(1_000_000))


@pytest.fixture
def user(live_server: ServerProcess, request: pytest.FixtureRequest) -> dict[str, Any]:
    """A fresh channel for each test (names are short and lower-case, as accounts want them)."""
    tag = re.sub(r"[^a-z0-9]", "", request.node.name.lower())[4:14]
    return add_channel(live_server, f"e2e{next(_users)}{tag}")


@pytest.fixture
def publishers() -> Iterator[list[RtmpPublisher]]:
    """Publishers started by a test are stopped whatever its outcome."""
    started: list[RtmpPublisher] = []
    yield started
    for pub in started:
        try:
            pub.stop(timeout=10)
        except TimeoutError:
            pass


# -- helpers ------------------------------------------------------------------------------------
def live_entry(server: ServerProcess, channel: str) -> dict[str, Any] | None:
    status, items = get_json(server.url + "/api/live")
    assert status == 200, items
    return next((item for item in items if item.get("channel") == channel), None)


def wait_live(server: ServerProcess, channel: str, pub: RtmpPublisher,
              timeout: float = 15) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        if pub.done.is_set() and pub.error is not None:
            raise AssertionError(f"the publisher failed before going live: {pub.error!r}\n"
                                 f"{server.log()[-3000:]}")
        return live_entry(server, channel)
    return wait_for(check, timeout, f"{channel} in /api/live")


def get_playlist(url: str) -> tuple[str, dict[str, str]]:
    status, headers, body = http_get(url)
    assert status == 200, f"GET {url} -> {status}: {body[:300]!r}"
    return body.decode(), headers


def get_media_playlist(url: str) -> MediaPlaylist:
    return parse_media_playlist(get_playlist(url)[0])


def variants_of(server: ServerProcess, channel: str) -> tuple[str, list[Variant]]:
    url = f"{server.url}/live/{channel}/index.m3u8"
    text, headers = get_playlist(url)
    assert headers.get("content-type", "").startswith(PLAYLIST_TYPE), headers
    variants = parse_multivariant(text)
    assert variants, f"no #EXT-X-STREAM-INF in the multivariant playlist:\n{text}"
    return url, variants


def source_playlist_url(server: ServerProcess, channel: str) -> str:
    url, variants = variants_of(server, channel)
    return urllib.parse.urljoin(url, variants[0].uri)


def fetch_file(url: str) -> bytes:
    status, headers, body = http_get(url)
    assert status == 200, f"GET {url} -> {status}: {body[:300]!r}"
    assert headers.get("content-type", "").split(";")[0] in SEGMENT_TYPES, (url, headers)
    assert headers.get("cache-control") == IMMUTABLE, (url, headers)
    assert headers.get("access-control-allow-origin") == "*", (url, headers)
    return body


def decode_playlist(playlist_url: str, playlist: MediaPlaylist) -> list[DecodedSegment]:
    inits: dict[str, bytes] = {}
    decoded = []
    for segment in playlist.segments:
        assert segment.map_uri, f"segment {segment.uri} has no EXT-X-MAP before it"
        map_url = urllib.parse.urljoin(playlist_url, segment.map_uri)
        if map_url not in inits:
            inits[map_url] = fetch_file(map_url)
        data = fetch_file(urllib.parse.urljoin(playlist_url, segment.uri))
        decoded.append(decode_segment(inits[map_url], data))
    return decoded


def hvcc_codec_fields(extradata: bytes) -> tuple[int, int]:
    """(general_profile_idc, general_level_idc) of an HEVCDecoderConfigurationRecord."""
    return extradata[1] & 0x1F, extradata[12]


def init_extradata(playlist_url: str, playlist: MediaPlaylist) -> bytes:
    init = fetch_file(urllib.parse.urljoin(playlist_url, playlist.segments[0].map_uri or ""))
    with av.open(io.BytesIO(init), "r", format="mp4") as container:
        return bytes(container.streams.video[0].codec_context.extradata or b"")


# -- the happy path: publish, watch, stop -----------------------------------------------------------
@pytest.mark.parametrize(("codec", "bframes"), [("h264", 0), ("hevc", 0), ("h264", 2)],
                         ids=["h264", "hevc", "h264-bframes"])
def test_publish_is_served_as_hls_and_stop_ends_it(live_server: ServerProcess, user: dict[str, Any],
                                                   publishers: list[RtmpPublisher], codec: str,
                                                   bframes: int) -> None:
    channel = user["username"]
    pub = RtmpPublisher(live_server.rtmp_url(user["stream_key"]), codec=codec, seconds=7, fps=FPS,
                        gop_seconds=1.0, bframes=bframes)
    publishers.append(pub.start())

    # /api/live lists the channel with the contract's fields
    entry = wait_live(live_server, channel, pub)
    assert entry.keys() >= CONTRACT_FIELDS, entry
    assert entry["hls"] == f"{live_server.url}/live/{channel}/index.m3u8"
    assert entry["whep"].endswith(f"/whep/{channel}")
    assert entry["thumbnail"].endswith(f"/live/{channel}/thumb.jpg")
    assert isinstance(entry["viewers"], int)

    # the multivariant playlist: CODECS, RESOLUTION, BANDWIDTH, headers
    time.sleep(3)  # the first segment exists after ~2 s
    master_url, variants = variants_of(live_server, channel)
    _, headers = get_playlist(master_url)
    assert headers.get("cache-control") == "no-cache", headers
    assert headers.get("access-control-allow-origin") == "*", headers
    source = variants[0]
    video_codec = next((c for c in source.codecs if not c.startswith("mp4a")), None)
    assert "mp4a.40.2" in source.codecs, source.attributes
    if codec == "h264":
        assert video_codec and re.fullmatch(r"avc1\.[0-9A-Fa-f]{6}", video_codec), source.attributes
    else:
        assert video_codec and re.fullmatch(HEVC_CODECS, video_codec), source.attributes
    assert source.resolution == (640, 360), source.attributes
    assert source.bandwidth > 0, source.attributes
    if "FRAME-RATE" in source.attributes:
        assert abs(float(source.attributes["FRAME-RATE"]) - FPS) < 0.5, source.attributes

    # the media playlist while live
    media_url = urllib.parse.urljoin(master_url, source.uri)
    text, headers = get_playlist(media_url)
    assert headers.get("content-type", "").startswith(PLAYLIST_TYPE), headers
    assert headers.get("cache-control") == "no-cache", headers
    live = parse_media_playlist(text)
    assert not live.ended, text
    assert live.segments, text
    assert live.version is not None and live.version >= 6, text  # EXT-X-MAP in a media playlist
    assert live.target_duration is not None, text
    assert all(s.program_date_time is not None for s in live.segments), text

    # CODECS agree with the decoder configuration actually in the init segment
    extradata = init_extradata(media_url, live)
    if codec == "h264":
        assert video_codec.split(".")[1].lower() == extradata[1:4].hex(), (video_codec, extradata[:4])
    else:
        profile, level = hvcc_codec_fields(extradata)
        fields = video_codec.split(".")
        assert int(fields[1].lstrip("ABC")) == profile and fields[3][1:] == str(level), video_codec

    # the publisher stops: ENDLIST appears shortly after, the channel leaves /api/live
    pub.wait(timeout=30)
    assert pub.error is None, repr(pub.error)
    final = wait_for(lambda: (p := get_media_playlist(media_url)).ended and p, 10,
                     "#EXT-X-ENDLIST after the publisher stopped")
    wait_for(lambda: live_entry(live_server, channel) is None, 10, f"{channel} to leave /api/live")

    # every segment: fetched with the right headers, decodes, starts at a keyframe
    decoded = decode_playlist(media_url, final)
    assert final.target_duration is not None
    for segment, content in zip(final.segments, decoded, strict=True):
        assert content.video_codec == codec
        assert content.audio_codec == "aac"
        assert content.times, f"segment {segment.uri} holds no video"
        assert content.starts_with_keyframe, f"segment {segment.uri} does not start with a keyframe"
        assert round(segment.duration) <= final.target_duration, (segment, final.target_duration)

    # every published frame arrived once and in order (the window holds all 7 s)
    numbers = [n for content in decoded for n in content.numbers]
    assert None not in numbers, "a decoded frame carries no readable frame number"
    assert numbers == list(range(pub.frames_sent)), (
        f"frames {numbers[:3]}..{numbers[-3:]} ({len(numbers)}) != 0..{pub.frames_sent - 1}")

    # timestamps increase across segments; each segment lasts what its #EXTINF says
    times = [t for content in decoded for t in content.times]
    assert all(b > a for a, b in itertools.pairwise(times)), "timestamps go backwards"
    starts = [content.times[0] for content in decoded]
    for index, (segment, content) in enumerate(zip(final.segments, decoded, strict=True)):
        last = index + 1 == len(decoded)
        actual = len(content.times) / FPS if last else starts[index + 1] - starts[index]
        assert abs(actual - segment.duration) <= 1.5 / FPS, (
            f"segment {segment.uri}: EXTINF {segment.duration} but its video lasts {actual:.3f} s")
        # the audio keeps up with the video in every segment (the publisher's audio runs
        # AUDIO_LEAD ahead, so the last segment ends with that much more audio than video)
        extra = AUDIO_LEAD if last else 0.0
        assert abs(content.audio_seconds - actual - extra) < 0.1, (
            segment.uri, content.audio_seconds, actual)

    # PROGRAM-DATE-TIME: the wall clock of each segment, in order, within the publish. (It is
    # when the segment's first packet arrived, so its spacing follows the publisher, not the
    # media clock: on a loaded machine an encoder falls behind, then catches up.)
    dates = [s.program_date_time.timestamp() for s in final.segments if s.program_date_time]
    assert len(dates) == len(final.segments), "a segment lacks EXT-X-PROGRAM-DATE-TIME"
    assert dates == sorted(dates), dates
    assert pub.capture_times[0] - 1 < dates[0] and dates[-1] < time.time(), (dates, pub.capture_times[0])


# -- one track only ------------------------------------------------------------------------------------
def test_video_only_and_audio_only_publishes(live_server: ServerProcess,
                                             publishers: list[RtmpPublisher]) -> None:
    """Cameras without a microphone and radio-style audio streams: both at once."""
    video_user = add_channel(live_server, f"e2e{next(_users)}videoonly")
    audio_user = add_channel(live_server, f"e2e{next(_users)}audioonly")
    video_pub = RtmpPublisher(live_server.rtmp_url(video_user["stream_key"]), seconds=6, audio=False,
                              width=1280, height=720, bitrate=2_000_000)
    audio_pub = RtmpPublisher(live_server.rtmp_url(audio_user["stream_key"]), seconds=6, video=False)
    publishers.extend([video_pub.start(), audio_pub.start()])
    wait_live(live_server, video_user["username"], video_pub)
    wait_live(live_server, audio_user["username"], audio_pub)
    time.sleep(3)
    urls = {}
    for user, expected in ((video_user, "avc1."), (audio_user, "mp4a.40.2")):
        master_url, variants = variants_of(live_server, user["username"])
        assert len(variants[0].codecs) == 1 and variants[0].codecs[0].startswith(expected), (
            variants[0].attributes)
        urls[user["username"]] = urllib.parse.urljoin(master_url, variants[0].uri)
        if expected == "avc1.":
            assert variants[0].resolution == (1280, 720), variants[0].attributes

    for pub in (video_pub, audio_pub):
        pub.wait(timeout=30)
        assert pub.error is None, repr(pub.error)

    video_url = urls[video_user["username"]]
    final = wait_for(lambda: (p := get_media_playlist(video_url)).ended and p, 10, "ENDLIST (video only)")
    decoded = decode_playlist(video_url, final)
    assert all(c.audio_codec is None and c.video_codec == "h264" for c in decoded)
    numbers = [n for content in decoded for n in content.numbers]
    assert numbers == list(range(video_pub.frames_sent)), (numbers[:3], numbers[-3:], len(numbers))

    audio_url = urls[audio_user["username"]]
    final = wait_for(lambda: (p := get_media_playlist(audio_url)).ended and p, 10, "ENDLIST (audio only)")
    decoded = decode_playlist(audio_url, final)
    assert all(c.video_codec is None and c.audio_codec == "aac" for c in decoded)
    published = audio_pub.audio_frames_sent * 1024 / 48000
    received = sum(c.audio_seconds for c in decoded)
    assert abs(received - published) < 0.1, (received, published)
    for segment, content in zip(final.segments, decoded, strict=True):
        assert abs(content.audio_seconds - segment.duration) < 0.05, (segment, content.audio_seconds)


# -- a wrong key ------------------------------------------------------------------------------------
def test_wrong_key_is_refused(live_server: ServerProcess, user: dict[str, Any],
                              publishers: list[RtmpPublisher]) -> None:
    channel = user["username"]
    pub = RtmpPublisher(live_server.rtmp_url(user["stream_key"] + "x"), seconds=4, io_timeout=10)
    publishers.append(pub.start())
    pub.wait(timeout=20)  # refused: it must end (with an error), not hang nor publish 4 s
    assert pub.error is not None, "the publisher with a wrong key was not refused"
    # FFmpeg's RTMP client turns an onStatus error (NetStream.Publish.BadName) into EPERM; a
    # connection merely dropped or reset would be another error
    assert isinstance(pub.error, PermissionError), f"not refused by onStatus: {pub.error!r}"
    assert pub.frames_sent == 0
    assert live_entry(live_server, channel) is None
    assert all(item["channel"] != channel for item in get_json(live_server.url + "/api/live")[1])
    status, _, _ = http_get(f"{live_server.url}/live/{channel}/index.m3u8")
    assert status == 404


# -- an encoder reconnecting -------------------------------------------------------------------------
def test_second_publisher_takes_over(live_server: ServerProcess, user: dict[str, Any],
                                     publishers: list[RtmpPublisher]) -> None:
    channel = user["username"]
    url = live_server.rtmp_url(user["stream_key"])
    first = RtmpPublisher(url, seconds=30)
    publishers.append(first.start())
    wait_live(live_server, channel, first)
    time.sleep(3)
    media_url = source_playlist_url(live_server, channel)
    before = get_media_playlist(media_url)
    assert before.segments and not before.ended
    last_before = before.segments[-1].sequence

    second = RtmpPublisher(url, seconds=30, first_frame=100_000)  # tells its frames apart
    publishers.append(second.start())
    assert second.started.wait(15), f"the second publisher never sent: {second.error!r}"

    # the server closes the first publisher's connection
    assert first.done.wait(15), "the first publisher's connection was not closed by the server"
    # a closed connection (EPIPE/ECONNRESET/EOF), not the publisher's own I/O timeout
    assert isinstance(first.error, (ConnectionError, EOFError)), repr(first.error)
    assert second.error is None and not second.done.is_set(), repr(second.error)

    # the channel stays live, fed by the second; the same playlist continues past a discontinuity
    assert live_entry(live_server, channel) is not None

    def second_segment() -> tuple[MediaPlaylist, int] | None:
        playlist = get_media_playlist(media_url)
        assert not playlist.ended, "the playlist ended although the channel was taken over"
        for index, segment in enumerate(playlist.segments):
            if segment.sequence > last_before + 1 and index > 0:
                content = decode_playlist(media_url, MediaPlaylist(segments=[segment]))[0]
                if content.numbers and all(n is not None and n >= 100_000 for n in content.numbers):
                    return playlist, index
        return None

    playlist, index = wait_for(second_segment, 15, "a segment from the second publisher", 0.5)
    # the media sequence went on (a player keeps its place): same numbers, same segments
    assert playlist.media_sequence >= before.media_sequence
    earlier = {s.sequence: s.uri for s in before.segments}
    for segment in playlist.segments:
        if segment.sequence in earlier:
            assert segment.uri == earlier[segment.sequence], "a media sequence number was reused"
    assert any(s.discontinuity for s in playlist.segments[:index + 1] if s.sequence > last_before), (
        "no EXT-X-DISCONTINUITY where the second publication starts")
    assert live_entry(live_server, channel) is not None
    assert second.error is None, repr(second.error)


def test_reconnect_after_a_disconnect_continues_the_playlist(
        live_server: ServerProcess, user: dict[str, Any], publishers: list[RtmpPublisher]) -> None:
    """An encoder whose connection dropped comes back within the linger period: players that
    kept polling the ended playlist see it continue, past a discontinuity, with a new init."""
    channel = user["username"]
    url = live_server.rtmp_url(user["stream_key"])
    first = RtmpPublisher(url, seconds=4)
    publishers.append(first.start())
    wait_live(live_server, channel, first)
    time.sleep(2.5)
    media_url = source_playlist_url(live_server, channel)
    first.wait(timeout=20)
    ended = wait_for(lambda: (p := get_media_playlist(media_url)).ended and p, 10, "ENDLIST")
    last_before = ended.segments[-1]

    second = RtmpPublisher(url, seconds=6, first_frame=100_000)
    publishers.append(second.start())
    wait_live(live_server, channel, second)

    def continued() -> MediaPlaylist | None:
        playlist = get_media_playlist(media_url)
        newer = [s for s in playlist.segments if s.sequence > last_before.sequence]
        return playlist if newer and not playlist.ended else None

    playlist = wait_for(continued, 15, "the ended playlist to continue", 0.25)
    newer = [s for s in playlist.segments if s.sequence > last_before.sequence]
    assert newer[0].sequence == last_before.sequence + 1, "the media sequence did not continue"
    assert newer[0].discontinuity, "no EXT-X-DISCONTINUITY where the new publication starts"
    assert newer[0].map_uri != last_before.map_uri, "the new publication reuses the old init URI"
    content = decode_playlist(media_url, MediaPlaylist(segments=[newer[0]]))[0]
    assert content.numbers and content.numbers[0] == 100_000, content.numbers[:3]
    old = [s for s in playlist.segments if s.sequence <= last_before.sequence]
    assert all(s.uri in {e.uri for e in ended.segments} for s in old)


# -- operators ----------------------------------------------------------------------------------------
def scrape(server: ServerProcess) -> dict[str, list[tuple[dict[str, str], float]]]:
    status, _, body = http_get(server.url + "/metrics")
    assert status == 200
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def test_metrics_show_the_live_stream(live_server: ServerProcess, user: dict[str, Any],
                                      publishers: list[RtmpPublisher]) -> None:
    channel = user["username"]
    segments_before = sum(v for _, v in scrape(live_server).get("livesrv_hls_segments_total", []))
    pub = RtmpPublisher(live_server.rtmp_url(user["stream_key"]), seconds=8, bitrate=1_000_000)
    publishers.append(pub.start())
    wait_live(live_server, channel, pub)
    source_playlist_url(live_server, channel)  # at least one HTTP request to an HLS route
    time.sleep(4)
    samples = scrape(live_server)

    live = samples.get("livesrv_live_streams", [])
    assert sum(v for labels, v in live if labels.get("source") == "rtmp") >= 1, live

    def for_channel(name: str) -> float:
        values = [v for labels, v in samples.get(name, []) if labels.get("channel") == channel]
        assert values, f"{name} has no sample for {channel}"
        return values[0]

    assert for_channel("livesrv_stream_ingest_bytes_total") > 100_000
    bitrate = for_channel("livesrv_stream_ingest_bitrate_bits")
    assert 100_000 < bitrate < 10_000_000, bitrate  # ~1 Mb/s video + 128 kb/s audio
    segments = samples.get("livesrv_hls_segments_total", [])
    assert sum(v for _, v in segments) >= segments_before + 1, f"livesrv_hls_segments_total: {segments}"
    requests = samples.get("livesrv_http_requests_total", [])
    assert any(labels.get("route", "").startswith("/live/") and v >= 1 for labels, v in requests), requests


# -- hostile input over a real socket ------------------------------------------------------------------
def rtmp_handshake(sock: socket.socket) -> None:
    """A plain handshake (C1 without a digest), as a minimal client does."""
    sock.sendall(b"\x03" + bytes(4) + bytes(4) + bytes(range(256)) * 5 + bytes(1528 - 1280))
    received = b""
    while len(received) < 1 + 1536 * 2:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError("the server closed the connection during a valid handshake")
        received += chunk
    sock.sendall(received[1:1537])  # C2 echoes S1


def chunk(csid: int, type_id: int, payload: bytes, *, length: int | None = None) -> bytes:
    """One fmt-0 chunk on message stream 0 (the payload must fit in one chunk)."""
    if csid < 64:
        basic = bytes([csid])
    elif csid < 320:
        basic = bytes([0, csid - 64])
    else:
        basic = bytes([1]) + (csid - 64).to_bytes(2, "little")
    size = len(payload) if length is None else length
    return basic + bytes(3) + size.to_bytes(3, "big") + bytes([type_id]) + bytes(4) + payload


def closed_by_server(sock: socket.socket, timeout: float) -> bool:
    """Read (and discard) until the server closes the connection; False if it does not."""
    sock.settimeout(0.5)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if not sock.recv(65536):
                return True
        except TimeoutError:
            continue
        except (ConnectionResetError, BrokenPipeError):
            return True
    return False


HOSTILE: dict[str, tuple[Callable[[socket.socket], None], float]] = {}


def hostile(timeout: float) -> Callable[[Callable[[socket.socket], None]], Callable[[socket.socket], None]]:
    def register(attack: Callable[[socket.socket], None]) -> Callable[[socket.socket], None]:
        HOSTILE[attack.__name__] = (attack, timeout)
        return attack
    return register


@hostile(timeout=5)
def garbage_instead_of_a_handshake(sock: socket.socket) -> None:
    sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(range(256)) * 16)


@hostile(timeout=20)  # the handshake timeout is ~10 s
def truncated_handshake(sock: socket.socket) -> None:
    sock.sendall(b"\x03" + bytes(700))  # C0 and half of C1, then silence


@hostile(timeout=5)
def zero_chunk_size(sock: socket.socket) -> None:
    rtmp_handshake(sock)
    sock.sendall(chunk(2, 1, (0).to_bytes(4, "big")))


@hostile(timeout=15)
def partial_messages_on_hundreds_of_chunk_streams(sock: socket.socket) -> None:
    """400 video messages of 16 MiB each left unfinished after 64 KiB: 25 MiB of partial
    messages across chunk streams, which a server must bound (not only each message)."""
    rtmp_handshake(sock)
    sock.sendall(chunk(2, 1, (65536).to_bytes(4, "big")))
    body = b"\x17\x01" + bytes(65534)
    try:
        for csid in range(3, 403):
            sock.sendall(chunk(csid, 9, body, length=0xFFFFFF))
    except OSError:
        pass  # closed while we were still sending: what we want


@hostile(timeout=15)
def absurd_command_message(sock: socket.socket) -> None:
    """A 16 MiB command whose bytes are not AMF0, sent in the largest chunks allowed."""
    rtmp_handshake(sock)
    sock.sendall(chunk(2, 1, (0x7FFFFFFF).to_bytes(4, "big")))
    sock.sendall(chunk(3, 20, b"", length=0xFFFFFF))
    junk = b"\xff" * 65536
    left = 0xFFFFFF  # exactly the message: what closes the connection is its content
    try:
        while left:
            sock.sendall(junk[:left])
            left -= min(left, len(junk))
    except OSError:
        pass  # closed while we were still sending: what we want


@hostile(timeout=5)
def unknown_message_type(sock: socket.socket) -> None:
    rtmp_handshake(sock)
    sock.sendall(chunk(3, 0x7F, b"\x00" * 64))
    sock.sendall(chunk(3, 20, b"\x02\x00\x07connect\x00\x3f\xf0" + b"\x00" * 6 + b"\x99\x99"))


def test_hostile_connections_are_closed_and_the_server_stays_up(
        live_server: ServerProcess, user: dict[str, Any], publishers: list[RtmpPublisher]) -> None:
    channel = user["username"]
    pub = RtmpPublisher(live_server.rtmp_url(user["stream_key"]), seconds=30)
    publishers.append(pub.start())
    outcomes: dict[str, str] = {}

    def attack(name: str) -> None:
        run, timeout = HOSTILE[name]
        try:
            with socket.create_connection(("127.0.0.1", live_server.rtmp_port), timeout=5) as sock:
                run(sock)
                outcomes[name] = "closed" if closed_by_server(sock, timeout) else "left open"
        except (ConnectionResetError, BrokenPipeError):
            outcomes[name] = "closed"
        except Exception as exc:  # reported below with the attack's name
            outcomes[name] = f"failed: {exc!r}"

    # all at once, while an honest publisher streams on the same listener
    threads = [threading.Thread(target=attack, args=(name,)) for name in HOSTILE]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)

    assert outcomes == dict.fromkeys(HOSTILE, "closed"), outcomes
    status, _, _ = http_get(live_server.url + "/healthz")
    assert status == 200
    assert live_server.proc is not None and live_server.proc.poll() is None
    wait_live(live_server, channel, pub)
    assert not pub.done.is_set(), f"the honest publisher was disturbed: {pub.error!r}"

    # and a new publisher still gets in after the attacks
    later = add_channel(live_server, f"{channel}b")
    second = RtmpPublisher(live_server.rtmp_url(later["stream_key"]), seconds=4)
    publishers.append(second.start())
    wait_live(live_server, later["username"], second)


# -- last: nothing above made the server trip -------------------------------------------------------
def test_server_log_has_no_tracebacks(live_server: ServerProcess) -> None:
    """Runs last in this module (pytest keeps file order): bad input and reconnects must end in
    clear one-line log messages, never in an exception escaping into the log."""
    log = live_server.log_path.read_text(errors="replace")
    assert "Traceback" not in log, log[max(0, log.index("Traceback") - 500):][:4000]
    assert live_server.proc is not None and live_server.proc.poll() is None
