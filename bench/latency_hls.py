"""Capture-to-segment-available latency of fMP4 HLS, measured end to end.

A real server process, FFmpeg's own RTMP client publishing a test pattern whose frames carry
their capture wall-clock time in their pixels (tests/support/publish.py, ``stamp_time=True``).
The media playlist is polled every ``--poll-ms`` over a kept-alive connection; when a segment
appears, a worker thread fetches and decodes it and reads the stamps back, so for every segment:

    first = (time it appeared in the playlist) - (capture time of its FIRST frame)
    last  = (time it appeared in the playlist) - (capture time of its LAST frame)
    pdt   = EXT-X-PROGRAM-DATE-TIME - (capture time of its first frame)   (ingest delay)

Target: first <= segment duration (#EXTINF) + 0.5 s. Publisher and server share one clock (one
machine), and the polling adds up to ``--poll-ms`` (jittered, 0.5-1.5x) to every figure: the
minimum is the closest to the true value.

    .venv/bin/python bench/latency_hls.py --seconds 60
"""

from __future__ import annotations

import argparse
import http.client
import random
import statistics
import sys
import tempfile
import threading
import time
import urllib.parse
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.publish import (  # noqa: E402  (the repository root is on the path only now)
    RtmpPublisher,
    Segment,
    add_channel,
    decode_segment,
    http_get,
    parse_media_playlist,
    parse_multivariant,
)
from tests.support.server import ServerProcess  # noqa: E402


@dataclass
class Measured:
    sequence: int
    extinf: float
    first: float  # appeared - capture of the first frame
    last: float  # appeared - capture of the last frame
    pdt: float | None  # PROGRAM-DATE-TIME - capture of the first frame
    frames: int


class PlaylistPoller:
    """GETs one URL over a kept-alive HTTP/1.1 connection (a poll costs no TCP handshake)."""

    def __init__(self, url: str) -> None:
        parts = urllib.parse.urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.path = parts.path + (f"?{parts.query}" if parts.query else "")
        self.conn = http.client.HTTPConnection(self.host, self.port, timeout=10)

    def get(self) -> tuple[int, str]:
        for attempt in (0, 1):
            try:
                self.conn.request("GET", self.path)
                response = self.conn.getresponse()
                return response.status, response.read().decode()
            except (http.client.HTTPException, OSError):
                self.conn.close()
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
                if attempt:
                    raise
        raise AssertionError("unreachable")


def measure_segment(media_url: str, segment: Segment, appeared: float,
                    inits: dict[str, bytes]) -> Measured | str:
    map_url = urllib.parse.urljoin(media_url, segment.map_uri or "")
    if map_url not in inits:
        status, _, body = http_get(map_url)
        if status != 200:
            return f"init {map_url}: HTTP {status}"
        inits[map_url] = body
    status, _, body = http_get(urllib.parse.urljoin(media_url, segment.uri))
    if status != 200:
        return f"segment {segment.uri}: HTTP {status}"
    content = decode_segment(inits[map_url], body)
    stamps = [s for s in content.stamps if s is not None]
    if not stamps or content.stamps[0] is None or content.stamps[-1] is None:
        return f"segment {segment.uri}: no readable time stamp in its first/last frame"
    pdt = None
    if segment.program_date_time is not None:
        pdt = segment.program_date_time.timestamp() - content.stamps[0]
    return Measured(segment.sequence, segment.duration, appeared - content.stamps[0],
                    appeared - content.stamps[-1], pdt, len(content.times))


def run(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="latency-hls-") as tmp:
        config = None
        if args.segment_seconds is not None:
            config = Path(tmp) / "bench.toml"
            config.write_text(f"[hls]\nsegment_seconds = {args.segment_seconds}\n")
        server = ServerProcess(Path(tmp) / "server", config=str(config) if config else None)
        server.start()
        publisher: RtmpPublisher | None = None
        try:
            user = add_channel(server, "latency")
            publisher = RtmpPublisher(server.rtmp_url(user["stream_key"]), codec=args.codec,
                                      width=args.width, height=args.height, fps=args.fps,
                                      gop_seconds=args.gop, bitrate=args.bitrate, stamp_time=True)
            publisher.start()
            if not publisher.started.wait(15):
                print(f"publisher did not start: {publisher.error!r}", file=sys.stderr)
                return 1
            master_url = f"{server.url}/live/latency/index.m3u8"
            deadline = time.monotonic() + 15
            while True:
                status, _, body = http_get(master_url)
                if status == 200:
                    break
                if time.monotonic() > deadline:
                    print(f"no multivariant playlist: HTTP {status}\n{server.log()}", file=sys.stderr)
                    return 1
                time.sleep(0.1)
            media_url = urllib.parse.urljoin(master_url, parse_multivariant(body.decode())[0].uri)
            return poll(args, media_url, publisher)
        finally:
            if publisher is not None:
                publisher.stop()
            server.stop()


def poll(args: argparse.Namespace, media_url: str, publisher: RtmpPublisher) -> int:
    poller = PlaylistPoller(media_url)
    inits: dict[str, bytes] = {}
    seen: set[int] = set()
    pending: list[Future[Measured | str]] = []
    first_poll = True
    interval = args.poll_ms / 1000
    end = time.monotonic() + args.seconds
    polls = 0
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode") as workers:
        next_poll = time.monotonic()
        while time.monotonic() < end and not publisher.done.is_set():
            status, text = poller.get()
            appeared = time.time()
            polls += 1
            if status == 200:
                playlist = parse_media_playlist(text)
                for segment in playlist.segments:
                    if segment.sequence in seen:
                        continue
                    seen.add(segment.sequence)
                    if first_poll:
                        continue  # there before we looked: when it appeared is unknown
                    pending.append(workers.submit(measure_segment, media_url, segment, appeared, inits))
                first_poll = False
            # jittered: a fixed period would lock onto the publisher's (segments every 2 s are
            # exactly 40 polls of 50 ms) and measure the same phase offset over and over
            next_poll += interval * random.uniform(0.5, 1.5)
            delay = next_poll - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            else:
                next_poll = time.monotonic()
        results = [future.result() for future in pending]
    if publisher.error is not None:
        print(f"publisher failed: {publisher.error!r}", file=sys.stderr)
    measured = [r for r in results if isinstance(r, Measured)]
    for problem in (r for r in results if isinstance(r, str)):
        print("!", problem, file=sys.stderr)
    report(args, measured, polls)
    if not measured:
        return 1
    late = [m for m in measured if m.first > m.extinf + 0.5]
    return 1 if late else 0


def report(args: argparse.Namespace, measured: list[Measured], polls: int) -> None:
    print(f"HLS capture-to-playlist latency: {args.codec} {args.width}x{args.height}@{args.fps} "
          f"{args.bitrate // 1000} kb/s, GOP {args.gop} s, segment target "
          f"{args.segment_seconds or 'server default'}, {args.seconds} s, poll every {args.poll_ms} ms "
          f"({polls} polls)")
    if args.verbose:
        print(f"{'seq':>5} {'EXTINF':>7} {'frames':>6} {'first':>7} {'last':>7} {'pdt':>7}")
        for m in measured:
            pdt = f"{m.pdt:7.3f}" if m.pdt is not None else "      -"
            print(f"{m.sequence:>5} {m.extinf:7.3f} {m.frames:>6} {m.first:7.3f} {m.last:7.3f} {pdt}")
    if not measured:
        print("no segment measured")
        return
    rows = [("segment duration (EXTINF)", [m.extinf for m in measured]),
            ("appeared - first frame captured", [m.first for m in measured]),
            ("appeared - last frame captured", [m.last for m in measured]),
            ("appeared - first frame - EXTINF", [m.first - m.extinf for m in measured])]
    pdts = [m.pdt for m in measured if m.pdt is not None]
    if pdts:
        rows.append(("PROGRAM-DATE-TIME - first captured", pdts))
    print(f"{'seconds, over ' + str(len(measured)) + ' segments':<36} {'min':>7} {'median':>7} {'max':>7}")
    for name, values in rows:
        print(f"{name:<36} {min(values):7.3f} {statistics.median(values):7.3f} {max(values):7.3f}")
    late = [m for m in measured if m.first > m.extinf + 0.5]
    verdict = "PASS" if not late else f"FAIL ({len(late)} segments late)"
    print(f"target: appeared - first frame <= EXTINF + 0.5 s for every segment: {verdict}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60, help="how long to measure")
    parser.add_argument("--codec", choices=("h264", "hevc"), default="h264")
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=360)
    parser.add_argument("--fps", type=int, default=30)
    parser.add_argument("--bitrate", type=int, default=1_000_000)
    parser.add_argument("--gop", type=float, default=1.0, help="keyframe interval, seconds")
    parser.add_argument("--segment-seconds", type=float, default=None,
                        help="[hls] segment_seconds for the server (default: its own default)")
    parser.add_argument("--poll-ms", type=float, default=50)
    parser.add_argument("-v", "--verbose", action="store_true", help="one line per segment")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    threading.current_thread().name = "bench"
    sys.exit(main())
