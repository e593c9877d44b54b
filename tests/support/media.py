"""Pre-encoded media for tests and benchmarks, in exactly the form RTMP ingest hands the hub
(plus small helpers to push it into a hub Stream and to read the HLS playlists made of it).

``make_clip()`` renders a synthetic clip (FFmpeg's ``testsrc2`` and ``sine`` sources, so no
fixture files), encodes it with PyAV (libx264 / libx265 / libsvtav1, AAC or Opus) into an
in-memory MP4 and demuxes that again. MP4 stores samples the way the hub does (length-prefixed
NAL units, avcC/hvcC/av1C records and AudioSpecificConfig as extradata), so the packets are
byte-for-byte what an RTMP publisher of the same encode would deliver, with millisecond
timestamps (FLV's time base) shifted so the first decode time is 0 as an FLV muxer makes it.

Encoding costs CPU, so clips are cached per parameter set for the whole test session.
"""

from __future__ import annotations

import asyncio
import io
import re
from collections.abc import Iterable
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache

import av
from av.filter import Graph

from livesrv.hub import Stream
from livesrv.media import MILLISECONDS, Packet, StreamInfo, Track

VIDEO_ENCODERS = {"h264": "libx264", "hevc": "libx265", "av1": "libsvtav1"}
AUDIO_ENCODERS = {"aac": "aac", "opus": "libopus"}


@dataclass(frozen=True)
class Clip:
    info: StreamInfo
    packets: tuple[Packet, ...]

    @property
    def video_packets(self) -> list[Packet]:
        return [p for p in self.packets if p.kind == "video"]

    @property
    def audio_packets(self) -> list[Packet]:
        return [p for p in self.packets if p.kind == "audio"]

    @property
    def keyframe_dts(self) -> list[int]:
        return [p.dts for p in self.packets if p.kind == "video" and p.keyframe]

    def shifted(self, offset_ms: int) -> list[Packet]:
        """The packets moved ``offset_ms`` later (to play the clip again after itself)."""
        return [Packet(p.kind, p.dts + offset_ms, p.pts + offset_ms, p.keyframe, p.data)
                for p in self.packets]


def _pull_all(graph_args: tuple[str, str], sink_name: str, chain: list[tuple[str, str]]) -> list:
    graph = Graph()
    node = graph.add(*graph_args)
    for name, args in chain:
        nxt = graph.add(name, args)
        node.link_to(nxt)
        node = nxt
    sink = graph.add(sink_name)
    node.link_to(sink)
    graph.configure()
    frames = []
    while True:
        try:
            frames.append(sink.pull())
        except (av.BlockingIOError, av.EOFError):
            return frames


def _video_stream(container, codec: str, width: int, height: int, fps: int, gop: int, bframes: int):
    if codec not in VIDEO_ENCODERS:
        raise ValueError(f"no test encoder for video codec {codec!r}")
    stream = container.add_stream(VIDEO_ENCODERS[codec], rate=fps)
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    ctx = stream.codec_context
    if codec == "h264":
        ctx.options = {"preset": "ultrafast", "tune": "zerolatency" if bframes == 0 else "film",
                       "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0:bframes={bframes}"}
    elif codec == "hevc":
        ctx.options = {"preset": "ultrafast", "x265-params":
                       f"keyint={gop}:min-keyint={gop}:scenecut=0:bframes={bframes}:log-level=error"}
    else:
        ctx.options = {"preset": "12", "g": str(gop)}
    return stream


def _encode(codec: str | None, width: int, height: int, fps: int, seconds: float, gop_seconds: float,
            audio: str | None, bframes: int, sample_rate: int) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        vstream = astream = None
        if codec is not None:
            vstream = _video_stream(container, codec, width, height, fps,
                                    max(1, round(gop_seconds * fps)), bframes)
        if audio is not None:
            if audio not in AUDIO_ENCODERS:
                raise ValueError(f"no test encoder for audio codec {audio!r}")
            rate = 48000 if audio == "opus" else sample_rate
            astream = container.add_stream(AUDIO_ENCODERS[audio], rate=rate)
            astream.layout = "stereo"
        if vstream is not None:
            frames = _pull_all(("testsrc2", f"size={width}x{height}:rate={fps}:duration={seconds}"),
                               "buffersink", [])
            for frame in frames:
                frame.pict_type = av.video.frame.PictureType.NONE
                container.mux(vstream.encode(frame))
            container.mux(vstream.encode(None))
        if astream is not None:
            rate = astream.codec_context.sample_rate
            per_frame = astream.codec_context.frame_size or 960
            fmt = astream.codec_context.format.name
            frames = _pull_all(("sine", f"frequency=440:sample_rate={rate}:duration={seconds}"
                                        f":samples_per_frame={per_frame}"), "abuffersink",
                               [("aformat", f"sample_fmts={fmt}:channel_layouts=stereo")])
            for frame in frames:
                frame.pts = None
                container.mux(astream.encode(frame))
            container.mux(astream.encode(None))
    return buf.getvalue()


def _to_ms(value: int, time_base: Fraction) -> int:
    return round(value * time_base * 1000)


@lru_cache(maxsize=32)
def make_clip(codec: str | None = "h264", width: int = 320, height: int = 180, fps: int = 30,
              seconds: float = 6.0, gop_seconds: float = 2.0, audio: bool | str = True,
              bframes: int = 0, sample_rate: int = 44100, with_dimensions: bool = True) -> Clip:
    """A clip as the hub would receive it. ``codec=None`` makes it audio-only; ``audio`` is
    True (AAC), False, or a codec name. ``with_dimensions=False`` leaves width/height/fps out of
    the video Track (as an RTMP publisher without onMetaData would)."""
    audio_codec = ("aac" if audio is True else audio) or None
    data = _encode(codec, width, height, fps, seconds, gop_seconds, audio_codec, bframes, sample_rate)
    packets: list[Packet] = []
    video = audio_track = None
    with av.open(io.BytesIO(data)) as container:
        streams = {}
        for stream in container.streams:
            ctx = stream.codec_context
            if stream.type == "video":
                video = Track("video", codec, MILLISECONDS, bytes(ctx.extradata or b""),
                              width=width if with_dimensions else None,
                              height=height if with_dimensions else None,
                              fps=float(fps) if with_dimensions else None)
                streams[stream.index] = ("video", stream.time_base)
            elif stream.type == "audio":
                audio_track = Track("audio", audio_codec, MILLISECONDS,
                                    bytes(ctx.extradata) if ctx.extradata else None,
                                    sample_rate=ctx.sample_rate, channels=ctx.channels)
                streams[stream.index] = ("audio", stream.time_base)
        for pkt in container.demux():
            if pkt.dts is None or pkt.size == 0:
                continue
            kind, tb = streams[pkt.stream.index]
            pts = pkt.pts if pkt.pts is not None else pkt.dts
            packets.append(Packet(kind, _to_ms(pkt.dts, tb), _to_ms(pts, tb), bool(pkt.is_keyframe),
                                  bytes(pkt)))
    # An FLV muxer shifts the timeline so no decode time is negative (B-frames start below 0).
    shift = -min(p.dts for p in packets) if packets and min(p.dts for p in packets) < 0 else 0
    packets.sort(key=lambda p: (p.dts, p.kind != "video"))
    if shift:
        packets = [Packet(p.kind, p.dts + shift, p.pts + shift, p.keyframe, p.data) for p in packets]
    return Clip(StreamInfo(video, audio_track), tuple(packets))


# -- driving a hub stream and reading what HLS made of it ------------------------------------
async def publish(stream: Stream, packets: Iterable[Packet]) -> None:
    """Push like a publisher would, letting the packager run between bursts."""
    for index, packet in enumerate(packets):
        stream.push(packet)
        if index % 16 == 15:
            await asyncio.sleep(0)
    await settle()


async def settle() -> None:
    """Let the consumers of a stream (packagers) work through what was pushed."""
    for _ in range(10):
        await asyncio.sleep(0)


def parse_media(text: str) -> dict:
    """A media playlist's header values and its segments (uri, duration, pdt, map, discontinuity)."""
    lines = text.splitlines()
    if not lines or lines[0] != "#EXTM3U":
        raise ValueError(f"not a playlist: {text[:40]!r}")
    tags = {line.split(":", 1)[0]: line.split(":", 1)[1] for line in lines if ":" in line}
    segments = []
    pending: dict = {}
    for line in lines:
        if line.startswith("#EXT-X-DISCONTINUITY") and ":" not in line:
            pending["discontinuity"] = True
        elif line.startswith("#EXT-X-MAP:"):
            pending["map"] = re.search(r'URI="([^"]+)"', line).group(1)
        elif line.startswith("#EXT-X-PROGRAM-DATE-TIME:"):
            pending["pdt"] = line.split(":", 1)[1]
        elif line.startswith("#EXTINF:"):
            pending["duration"] = float(line[8:].rstrip(","))
        elif line and not line.startswith("#"):
            segments.append({**pending, "uri": line})
            pending = {k: v for k, v in pending.items() if k == "map"}
    return {"version": tags["#EXT-X-VERSION"], "target": int(tags["#EXT-X-TARGETDURATION"]),
            "sequence": int(tags["#EXT-X-MEDIA-SEQUENCE"]),
            "discontinuity_sequence": int(tags["#EXT-X-DISCONTINUITY-SEQUENCE"]),
            "independent": "#EXT-X-INDEPENDENT-SEGMENTS" in lines,
            "ended": "#EXT-X-ENDLIST" in lines, "segments": segments}




def decoded_frames(init: bytes, *fragments: bytes) -> dict[str, int]:
    """Video and audio frames FFmpeg decodes from an init segment and the fragments after it."""
    counts = {"video": 0, "audio": 0}
    with av.open(io.BytesIO(init + b"".join(fragments)), format="mp4") as container:
        for frame in container.decode(*container.streams):
            counts["video" if isinstance(frame, av.VideoFrame) else "audio"] += 1
    return counts


def starts_with_keyframe(init: bytes, fragment: bytes) -> bool:
    """Whether a fragment's first video sample is a keyframe, as FFmpeg's demuxer reads it."""
    with av.open(io.BytesIO(init + fragment), format="mp4") as container:
        for packet in container.demux(video=0):
            return bool(packet.is_keyframe)
    return False


def flv_tags(data: bytes) -> list[tuple[int, int, bytes]]:
    """(type, timestamp, body) of every tag of an FLV file (as FFmpeg's flv muxer writes it)."""
    assert data[:3] == b"FLV"
    pos = int.from_bytes(data[5:9], "big") + 4
    tags = []
    while pos + 11 <= len(data):
        kind = data[pos]
        size = int.from_bytes(data[pos + 1:pos + 4], "big")
        ts = int.from_bytes(data[pos + 4:pos + 7], "big") | (data[pos + 7] << 24)
        tags.append((kind, ts, data[pos + 11:pos + 11 + size]))
        pos += 11 + size + 4
    return tags
