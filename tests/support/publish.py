"""A real RTMP publisher for end-to-end tests and benchmarks: FFmpeg's own RTMP client (through
PyAV's "flv" muxer) sending a generated test pattern, paced in real time in a background thread.

Every frame carries its frame number, and with ``stamp_time=True`` its capture wall-clock time,
as big black/white cells in stripes at the top of the picture. Cells are laid out relative to
the picture size and sampled at their centres, so the code survives lossy compression and
scaling (ladder rungs, a browser's video element); ``read_frame_number`` / ``read_stamp`` read
them back from a decoded frame, and return ``None`` for a frame that carries no valid code.

    pub = RtmpPublisher(server.rtmp_url(key), seconds=5).start()
    pub.started.wait(10)          # the first packet went out
    pub.wait(30)                  # all of it went out (or it failed: see pub.error)

Reading back what was published: ``parse_multivariant`` / ``parse_media_playlist`` (HLS),
``http_get``, and ``decode_segment(init, segment)`` (fMP4 decoded with PyAV, frame numbers and
stamps read from the pixels).
"""

from __future__ import annotations

import io
import logging
import math
import re
import threading
import time
import urllib.error
import urllib.request
from array import array
from dataclasses import dataclass, field
from datetime import datetime
from fractions import Fraction
from typing import Any

import av

log = logging.getLogger(__name__)

# -- the pixel code ---------------------------------------------------------------------------
#: cells per stripe across the full width; at 640 px a cell is 13 px wide, wide enough that its
#: centre keeps its level through H.264/HEVC at low bitrates and through 2x downscaling
CELLS = 48
#: stripe height as a fraction of the picture height (20 px at 360p)
STRIPE_FRACTION = 1 / 18
_MARKER = (1, 0, 1, 1)
_PAYLOAD_BITS = 32
_CHECK_BITS = 8
_BLACK, _WHITE = 16, 235
_THRESHOLD = (_BLACK + _WHITE) // 2
FRAME_STRIPE, TIME_STRIPE = 0, 1

AUDIO_RATE = 48000
AUDIO_FRAME_SAMPLES = 1024
#: audio is generated this far ahead of the video clock. The muxer interleaves by timestamp and
#: holds each video packet until it has audio at least as late (and AAC delays its output by
#: two frames), so audio running behind would add ~50 ms of publisher-side latency to every
#: video frame; real encoders capture audio ahead of time in the same way.
AUDIO_LEAD = 0.1
#: 375 Hz has exactly 128 samples per period at 48 kHz, so one AAC frame holds 8 whole periods
#: and a single precomputed frame repeats without a click
_TONE_HZ = 375


def _crc8(value: int) -> int:
    crc = 0
    for byte in value.to_bytes(4, "big"):
        crc ^= byte
        for _ in range(8):
            crc = ((crc << 1) ^ 0x07) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
    return crc


def _codeword(value: int) -> list[int]:
    """Marker, 32 payload bits (MSB first), CRC-8 of the payload; the rest of the cells are 0."""
    value &= 0xFFFFFFFF
    bits = list(_MARKER)
    bits += [(value >> (31 - i)) & 1 for i in range(_PAYLOAD_BITS)]
    crc = _crc8(value)
    bits += [(crc >> (7 - i)) & 1 for i in range(_CHECK_BITS)]
    return bits + [0] * (CELLS - len(bits))


def _cell_edges(width: int) -> list[int]:
    return [round(i * width / CELLS) for i in range(CELLS + 1)]


def _stripe_rows(height: int) -> int:
    return max(2, round(height * STRIPE_FRACTION))


def _luma_plane(frame: av.VideoFrame) -> tuple[memoryview, int, int, int]:
    """The 8-bit luma plane of any frame: (buffer, stride, width, height)."""
    if frame.format.name not in ("yuv420p", "yuvj420p", "yuv422p", "yuvj422p", "yuv444p", "yuvj444p",
                                 "nv12", "nv21", "gray"):
        frame = frame.reformat(format="gray")
    plane = frame.planes[0]
    return memoryview(plane).cast("B"), plane.line_size, frame.width, frame.height


def _read_code(frame: av.VideoFrame, stripe: int) -> int | None:
    buf, stride, width, height = _luma_plane(frame)
    rows = _stripe_rows(height)
    y = stripe * rows + rows // 2
    if y + 1 >= height:
        return None
    edges = _cell_edges(width)
    bits = []
    for i in range(CELLS - 4):  # the last cells are padding
        x = (edges[i] + edges[i + 1]) // 2
        total = 0
        for row in (y - 1, y, y + 1):
            start = row * stride + x - 1
            total += sum(buf[start:start + 3])
        bits.append(1 if total > _THRESHOLD * 9 else 0)
    if tuple(bits[:4]) != _MARKER:
        return None
    value = 0
    for bit in bits[4:4 + _PAYLOAD_BITS]:
        value = (value << 1) | bit
    crc = 0
    for bit in bits[4 + _PAYLOAD_BITS:4 + _PAYLOAD_BITS + _CHECK_BITS]:
        crc = (crc << 1) | bit
    return value if crc == _crc8(value) else None


def read_frame_number(frame: av.VideoFrame) -> int | None:
    """The publisher's frame number drawn into ``frame``, or None when it carries none."""
    return _read_code(frame, FRAME_STRIPE)


def read_stamp(frame: av.VideoFrame, now: float | None = None) -> float | None:
    """The capture wall-clock time (``time.time()`` seconds) stamped into ``frame`` by a publisher
    with ``stamp_time=True``, or None when it carries none.

    The pixels hold the time in milliseconds modulo 2**32 (49 days); the full time is the one
    nearest to ``now`` (default: the current time), which is right for any live frame.
    ``frame`` is the picture as published at any scale and pixel format (a decoded frame, a
    rendition, or a screenshot cropped to the video element: no letterbox bars around it).
    """
    value = _read_code(frame, TIME_STRIPE)
    if value is None:
        return None
    now_ms = int((time.time() if now is None else now) * 1000)
    wrap = 1 << 32
    candidate = now_ms - ((now_ms - value) % wrap)  # the latest time <= now with these low bits
    if now_ms - candidate > wrap // 2:
        candidate += wrap
    return candidate / 1000


class _PatternSource:
    """Builds yuv420p frames cheaply: a moving diagonal ramp plus the code stripes, all from
    precomputed bytes (slicing and joining, no per-pixel Python)."""

    def __init__(self, width: int, height: int) -> None:
        self.width, self.height = width, height
        template = av.VideoFrame(width, height, "yuv420p")
        self.strides = [plane.line_size for plane in template.planes]
        self.luma_stride = self.strides[0]
        pad = bytes(self.luma_stride - width)
        # one row of the ramp at offset k is ramp[k:k+width]; values wrap every 256 pixels
        self._ramp = bytes(i % 256 // 2 + 64 for i in range(width + 256))
        self._pad = pad
        self.stripe_rows = _stripe_rows(height)
        self._edges = _cell_edges(width)
        chroma_h = (height + 1) // 2
        self._chroma = [bytes([128]) * (template.planes[i].line_size * chroma_h) for i in (1, 2)]

    def _stripe(self, value: int) -> bytes:
        cells = _codeword(value)
        edges = self._edges
        row = b"".join(bytes([_WHITE if bit else _BLACK]) * (edges[i + 1] - edges[i])
                       for i, bit in enumerate(cells))
        return (row + self._pad) * self.stripe_rows

    def frame(self, number: int, stamp_ms: int | None) -> av.VideoFrame:
        width, ramp, pad = self.width, self._ramp, self._pad
        parts = [self._stripe(number)]
        top = self.stripe_rows
        if stamp_ms is not None:
            parts.append(self._stripe(stamp_ms))
            top += self.stripe_rows
        shift = number * 4
        parts += [ramp[k:k + width] + pad
                  for k in ((y + shift) % 256 for y in range(top, self.height))]
        frame = av.VideoFrame(width, self.height, "yuv420p")
        frame.planes[0].update(b"".join(parts))
        frame.planes[1].update(self._chroma[0])
        frame.planes[2].update(self._chroma[1])
        return frame


def _tone_frame_bytes() -> bytes:
    samples = array("f", (0.2 * math.sin(2 * math.pi * _TONE_HZ * i / AUDIO_RATE)
                          for i in range(AUDIO_FRAME_SAMPLES)))
    return samples.tobytes()


class RtmpPublisher:
    """Publishes a generated test pattern over RTMP with FFmpeg's own client (PyAV, format "flv"),
    paced in real time in a background thread.

    ``error`` holds what ended the publish abnormally (refused, connection closed by the server,
    timeout); ``frames_sent`` counts video packets handed to the muxer; ``started`` is set once
    the first packet went out; ``done`` once the thread has finished, whatever the reason.
    """

    def __init__(self, url: str, *, codec: str = "h264", width: int = 640, height: int = 360,
                 fps: int = 30, seconds: float | None = None, audio: bool = True,
                 gop_seconds: float = 1.0, bframes: int = 0, bitrate: int = 1_000_000,
                 stamp_time: bool = False, realtime: bool = True, io_timeout: float = 10.0,
                 first_frame: int = 0, video: bool = True) -> None:
        if not (video or audio):
            raise ValueError("nothing to publish: neither video nor audio")
        if codec not in ("h264", "hevc"):
            raise ValueError(f"unsupported codec {codec!r} (h264 or hevc)")
        if width % 2 or height % 2 or width < 64 or height < 64:
            raise ValueError(f"bad picture size {width}x{height} (even, at least 64x64)")
        self.url = url
        self.codec = codec
        self.width, self.height, self.fps = width, height, fps
        self.seconds = seconds
        self.audio = audio
        self.video = video
        self.keyint = max(1, round(fps * gop_seconds))
        self.bframes = bframes
        self.bitrate = bitrate
        self.stamp_time = stamp_time
        self.realtime = realtime
        self.io_timeout = io_timeout
        #: the number drawn into the first frame: two publishers of one channel tell apart by it
        self.first_frame = first_frame
        self.error: BaseException | None = None
        self.frames_sent = 0
        self.audio_frames_sent = 0
        #: wall-clock capture time of each video frame, by frame number (for latency benches)
        self.capture_times: list[float] = []
        self.started = threading.Event()
        self.done = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- control ---------------------------------------------------------------------------
    def start(self) -> RtmpPublisher:
        if self._thread is not None:
            raise RuntimeError("already started")
        self._thread = threading.Thread(target=self._run, name=f"rtmp-publisher {self.url}",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10) -> None:
        """Stop sending and close the container (FFmpeg sends FCUnpublish/deleteStream)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise TimeoutError(f"publisher to {self.url} did not stop within {timeout} s")

    def wait(self, timeout: float | None = None) -> None:
        """Until `seconds` are sent (or the publish failed or was stopped: check ``error``)."""
        if not self.done.wait(timeout):
            raise TimeoutError(f"publisher to {self.url} still running after {timeout} s")

    @property
    def running(self) -> bool:
        return self._thread is not None and not self.done.is_set()

    def __enter__(self) -> RtmpPublisher:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the thread ------------------------------------------------------------------------
    def _open(self) -> tuple[Any, Any, Any]:
        # the interrupt-callback timeout makes a silent or refusing server an error, not a hang
        container = av.open(self.url, "w", format="flv", timeout=(self.io_timeout, self.io_timeout),
                            container_options={"flvflags": "no_duration_filesize",
                                               "flush_packets": "1"})
        try:
            video = self._add_video(container) if self.video else None
            audio = None
            if self.audio:
                audio = container.add_stream("aac", rate=AUDIO_RATE, layout="stereo")
                audio.bit_rate = 128_000
        except BaseException:
            container.close()
            raise
        return container, video, audio

    def _add_video(self, container: Any) -> Any:
        keyint = self.keyint
        if self.codec == "h264":
            stream = container.add_stream("libx264", rate=self.fps)
            params = f"keyint={keyint}:min-keyint={keyint}:scenecut=0:bframes={self.bframes}"
            options = {"preset": "ultrafast", "x264-params": params}
            if self.bframes == 0:
                options["tune"] = "zerolatency"
            # one thread is plenty at test sizes and leaves the cores to the server under test
            stream.thread_count = 1
        else:
            stream = container.add_stream("libx265", rate=self.fps)
            params = (f"keyint={keyint}:min-keyint={keyint}:scenecut=0:bframes={self.bframes}"
                      ":log-level=error:pools=1:frame-threads=1")
            options = {"preset": "ultrafast", "x265-params": params}
            if self.bframes == 0:
                options["tune"] = "zerolatency"
        stream.width, stream.height = self.width, self.height
        stream.pix_fmt = "yuv420p"
        stream.bit_rate = self.bitrate
        stream.gop_size = keyint
        stream.codec_context.time_base = Fraction(1, self.fps)
        stream.options = options
        return stream

    def _run(self) -> None:
        container = None
        try:
            container, video, audio = self._open()
            self._publish(container, video, audio)
            self._flush(container, video, audio)
            container.close()
            container = None
        except BaseException as exc:  # the thread's outcome is reported through `error`
            self.error = exc
            log.info("publisher to %s failed: %r", self.url, exc)
        finally:
            if container is not None:
                try:
                    container.close()
                except Exception:
                    pass
            self.done.set()

    def _mux(self, container: Any, packets: list[Any], kind: str) -> None:
        if not packets:
            return
        container.mux(packets)
        if kind == "video":
            self.frames_sent += len(packets)
        else:
            self.audio_frames_sent += len(packets)
        if not self.started.is_set():
            self.started.set()

    def _publish(self, container: Any, video: Any, audio: Any) -> None:
        source = _PatternSource(self.width, self.height)
        tone = _tone_frame_bytes()
        fps = self.fps
        audio_step = AUDIO_FRAME_SAMPLES / AUDIO_RATE
        begin = time.monotonic()
        v_index = a_index = 0
        while not self._stop.is_set():
            t_video = v_index / fps if video is not None else math.inf
            t_audio = a_index * audio_step - AUDIO_LEAD if audio is not None else math.inf
            t_next = min(t_video, t_audio)
            if self.seconds is not None and t_next >= self.seconds:
                return
            if self.realtime:
                delay = begin + t_next - time.monotonic()
                if delay > 0 and self._stop.wait(delay):
                    return
            if t_video <= t_audio:
                now = time.time()
                stamp = int(now * 1000) & 0xFFFFFFFF if self.stamp_time else None
                frame = source.frame(self.first_frame + v_index, stamp)
                frame.pts = v_index
                frame.time_base = Fraction(1, fps)
                self.capture_times.append(now)
                self._mux(container, video.encode(frame), "video")
                v_index += 1
            else:
                frame = av.AudioFrame(format="fltp", layout="stereo", samples=AUDIO_FRAME_SAMPLES)
                frame.planes[0].update(tone)
                frame.planes[1].update(tone)
                frame.sample_rate = AUDIO_RATE
                frame.pts = a_index * AUDIO_FRAME_SAMPLES
                frame.time_base = Fraction(1, AUDIO_RATE)
                self._mux(container, audio.encode(frame), "audio")
                a_index += 1

    def _flush(self, container: Any, video: Any, audio: Any) -> None:
        if video is not None:
            self._mux(container, video.encode(None), "video")
        if audio is not None:
            self._mux(container, audio.encode(None), "audio")


# -- reading back what was published: HLS playlists ---------------------------------------------
@dataclass
class Variant:
    """One ``#EXT-X-STREAM-INF`` entry of a multivariant playlist."""

    uri: str
    attributes: dict[str, str]

    @property
    def bandwidth(self) -> int:
        return int(self.attributes["BANDWIDTH"])

    @property
    def codecs(self) -> list[str]:
        return [c.strip() for c in self.attributes.get("CODECS", "").split(",") if c.strip()]

    @property
    def resolution(self) -> tuple[int, int] | None:
        value = self.attributes.get("RESOLUTION")
        if value is None:
            return None
        width, _, height = value.partition("x")
        return int(width), int(height)


@dataclass
class Segment:
    uri: str
    duration: float
    sequence: int
    map_uri: str | None
    discontinuity: bool = False
    program_date_time: datetime | None = None


@dataclass
class MediaPlaylist:
    version: int | None = None
    target_duration: int | None = None
    media_sequence: int = 0
    discontinuity_sequence: int = 0
    independent_segments: bool = False
    ended: bool = False
    segments: list[Segment] = field(default_factory=list)


_ATTRIBUTE = re.compile(r'([A-Z0-9-]+)=("[^"]*"|[^",]*)')


def parse_attributes(text: str) -> dict[str, str]:
    """An HLS attribute list (``A=1,B="x,y"``) as a dict, quotes removed."""
    return {key: value.strip('"') for key, value in _ATTRIBUTE.findall(text)}


def _lines(text: str) -> list[str]:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines or lines[0] != "#EXTM3U":
        raise ValueError("not an HLS playlist: the first line is not #EXTM3U")
    return lines


def parse_multivariant(text: str) -> list[Variant]:
    lines = _lines(text)
    variants = []
    for index, line in enumerate(lines):
        if line.startswith("#EXT-X-STREAM-INF:"):
            if index + 1 >= len(lines) or lines[index + 1].startswith("#"):
                raise ValueError("#EXT-X-STREAM-INF without a URI line after it")
            variants.append(Variant(lines[index + 1], parse_attributes(line.partition(":")[2])))
    return variants


def parse_media_playlist(text: str) -> MediaPlaylist:
    playlist = MediaPlaylist()
    map_uri: str | None = None
    duration: float | None = None
    discontinuity = False
    pdt: datetime | None = None
    sequence: int | None = None
    for line in _lines(text)[1:]:
        tag, _, value = line.partition(":")
        if tag == "#EXT-X-VERSION":
            playlist.version = int(value)
        elif tag == "#EXT-X-TARGETDURATION":
            playlist.target_duration = int(value)
        elif tag == "#EXT-X-MEDIA-SEQUENCE":
            playlist.media_sequence = int(value)
        elif tag == "#EXT-X-DISCONTINUITY-SEQUENCE":
            playlist.discontinuity_sequence = int(value)
        elif tag == "#EXT-X-INDEPENDENT-SEGMENTS":
            playlist.independent_segments = True
        elif tag == "#EXT-X-ENDLIST":
            playlist.ended = True
        elif tag == "#EXT-X-MAP":
            map_uri = parse_attributes(value)["URI"]
        elif tag == "#EXT-X-DISCONTINUITY":
            discontinuity = True
        elif tag == "#EXT-X-PROGRAM-DATE-TIME":
            pdt = datetime.fromisoformat(value.replace("Z", "+00:00"))
        elif tag == "#EXTINF":
            duration = float(value.partition(",")[0])
        elif not line.startswith("#"):
            if duration is None:
                raise ValueError(f"segment {line} has no #EXTINF")
            if sequence is None:
                sequence = playlist.media_sequence
            playlist.segments.append(Segment(line, duration, sequence, map_uri, discontinuity, pdt))
            sequence += 1
            duration, discontinuity, pdt = None, False, None
    return playlist


def http_get(url: str, timeout: float = 10) -> tuple[int, dict[str, str], bytes]:
    """(status, headers with lower-case names, body); HTTP errors are returned, not raised."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


@dataclass
class DecodedSegment:
    """What a segment held, decoded: video frame times (s), frame numbers drawn by the
    publisher, stamps (if any), whether the first frame is a keyframe, audio duration (s)."""

    video_codec: str | None
    times: list[float]
    numbers: list[int | None]
    stamps: list[float | None]
    starts_with_keyframe: bool
    audio_codec: str | None
    audio_seconds: float
    audio_start: float | None


def decode_segment(init: bytes, segment: bytes) -> DecodedSegment:
    """Decode ``init + segment`` (fMP4) with PyAV: every frame must decode."""
    with av.open(io.BytesIO(init + segment), "r", format="mp4") as container:
        video_stream = container.streams.video[0] if container.streams.video else None
        audio_stream = container.streams.audio[0] if container.streams.audio else None
        times: list[float] = []
        numbers: list[int | None] = []
        stamps: list[float | None] = []
        first_key = False
        audio_seconds = 0.0
        audio_start: float | None = None
        streams = [s for s in (video_stream, audio_stream) if s is not None]
        for packet in container.demux(streams):
            for frame in packet.decode():
                if isinstance(frame, av.VideoFrame):
                    if not times:
                        first_key = bool(frame.key_frame)
                    times.append(float(frame.time) if frame.time is not None else math.nan)
                    numbers.append(read_frame_number(frame))
                    stamps.append(read_stamp(frame))
                else:
                    if audio_start is None and frame.time is not None:
                        audio_start = float(frame.time)
                    audio_seconds += frame.samples / frame.sample_rate
        return DecodedSegment(
            video_stream.codec_context.name if video_stream is not None else None,
            times, numbers, stamps, first_key,
            audio_stream.codec_context.name if audio_stream is not None else None,
            audio_seconds, audio_start)


def add_channel(server: Any, name: str, password: str = "correct horse battery") -> dict[str, Any]:
    """A new user (channel) on ``server``: {"username", "stream_key", "token"}."""
    return server.add_user(name, password)
