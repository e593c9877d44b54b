"""RTMP ingest at scale: N concurrent 720p30 ~2.5 Mb/s publishers into ONE server process
pinned to ONE core; reports streams sustained, server CPU, RSS per stream and HLS timeliness.

    .venv/bin/python bench/rtmp_passthrough.py --streams 100 --seconds 60

How it stays cheap on the load side: a short clip is encoded ONCE (libx264 720p30, 2 s GOP,
~2.5 Mb/s, + AAC) and cached; its FLV tags are cut into RTMP chunks ONCE with delta-timestamp
headers (type 1), so the very same bytes replay on every loop and every connection; worker
processes (on the other cores) replay them paced in real time, one write per video frame.

The server is the real one (``python -m livesrv serve``, tests/support/server.py), started with
its CPU affinity set to one core (children inherit it; every thread is re-pinned during the
run). Users are created through the public HTTP API.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import itertools
import json
import math
import multiprocessing as mp
import os
import random
import re
import struct
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ingest.rtmp.chunks import AUDIO, DATA_AMF0, VIDEO, ChunkWriter  # noqa: E402
from ingest.rtmp.client import open_publisher  # noqa: E402
from ingest.rtmp.connection import AUDIO_CSID, DATA_CSID, VIDEO_CSID  # noqa: E402
from tests.support.media import flv_tags  # noqa: E402
from tests.support.procfs import cpu_seconds  # noqa: E402

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "livesrv-bench"
CHUNK_SIZE = 4096
FPS = 30
PASSWORD = "bench password 123"


# -- the clip -----------------------------------------------------------------------------------
def encode_clip(seconds: int, kbps: int, width: int = 1280, height: int = 720) -> bytes:
    """An FLV file made by FFmpeg: libx264 (2 s GOP, VBV-capped at ``kbps``) + AAC 48 kHz."""
    import av

    path = CACHE / f"clip-{width}x{height}-{seconds}s-{kbps}k.flv"
    if path.exists():
        return path.read_bytes()
    rng = random.Random(1)
    buf = io.BytesIO()
    with av.open(buf, "w", format="flv") as out:
        video = out.add_stream("libx264", rate=FPS)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        video.bit_rate = kbps * 1000
        video.options = {"preset": "veryfast", "g": str(2 * FPS), "keyint_min": str(2 * FPS),
                         "sc_threshold": "0", "maxrate": f"{kbps}k", "bufsize": f"{kbps}k",
                         "nal-hrd": "cbr"}
        audio = out.add_stream("aac", rate=48000)
        audio.layout = "stereo"
        audio.bit_rate = 128_000
        noise_rows = [rng.randbytes(width) for _ in range(64)]
        samples = 0
        for i in range(seconds * FPS):
            frame = av.VideoFrame(width, height, "yuv420p")
            for index, plane in enumerate(frame.planes):
                rows = plane.buffer_size // plane.line_size
                # noise that moves: the encoder has to spend its whole budget, as on a real camera
                plane.update(b"".join(noise_rows[(r + i * (index + 1)) % 64][:plane.line_size]
                                      for r in range(rows)))
            frame.pts = i
            frame.time_base = Fraction(1, FPS)
            out.mux(video.encode(frame))
            while samples < (i + 1) * 48000 // FPS:
                chunk = av.AudioFrame(format="fltp", layout="stereo", samples=1024)
                tone = struct.pack("<1024f", *(0.2 * math.sin((samples + n) * 0.05) + rng.uniform(-.05, .05)
                                               for n in range(1024)))
                for plane in chunk.planes:
                    plane.update(tone)
                chunk.sample_rate = 48000
                chunk.pts = samples
                samples += 1024
                out.mux(audio.encode(chunk))
        out.mux(video.encode())
        out.mux(audio.encode())
    CACHE.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return buf.getvalue()



@dataclass
class Prechunked:
    """The clip as RTMP bytes: a prologue (metadata + sequence headers, type-0 headers) and the
    media bins of the first loop and of every later loop (their delta headers are equal)."""

    prologue: bytes
    first_loop: list[tuple[int, bytes]]  # (ms from loop start, bytes) one bin per video frame
    next_loops: list[tuple[int, bytes]]
    period_ms: int
    bytes_per_second: float
    keyframe_interval_ms: int
    payload_per_second: float  # what the hub counts: media payloads without FLV/RTMP headers


def prechunk(flv: bytes, stream_id: int = 1) -> Prechunked:
    tags = flv_tags(flv)
    frames = sum(1 for kind, _, body in tags if kind == 9 and body[1] == 1)
    period = round(frames * 1000 / FPS)
    meta = next(body for kind, _, body in tags if kind == 18)
    vseq = next(body for kind, _, body in tags if kind == 9 and body[1] == 0)
    aseq = next(body for kind, _, body in tags if kind == 8 and body[1] == 0)
    media = [(kind, ts, body) for kind, ts, body in tags
             if (kind == 9 and body[1] == 1) or (kind == 8 and body[1] == 1)]
    media = [m for m in media if m[1] < period]
    writer = ChunkWriter(CHUNK_SIZE)
    prologue = b"".join([
        writer.write(DATA_CSID, DATA_AMF0, stream_id, 0, meta, fmt=0),
        writer.write(VIDEO_CSID, VIDEO, stream_id, 0, vseq, fmt=0),
        writer.write(AUDIO_CSID, AUDIO, stream_id, 0, aseq, fmt=0),
    ])

    def one_loop(offset: int) -> list[tuple[int, bytes]]:
        bins: dict[int, list[bytes]] = {}
        for kind, ts, body in media:
            csid, type_id = (VIDEO_CSID, VIDEO) if kind == 9 else (AUDIO_CSID, AUDIO)
            data = writer.write(csid, type_id, stream_id, ts + offset, body, fmt=1)
            slot = int(ts * FPS // 1000) * 1000 // FPS  # one bin per video frame interval
            bins.setdefault(slot, []).append(data)
        return [(slot, b"".join(parts)) for slot, parts in sorted(bins.items())]

    first = one_loop(0)
    following = one_loop(period)
    keyframes = [ts for kind, ts, body in media if kind == 9 and body[0] >> 4 == 1]
    gop = keyframes[1] - keyframes[0] if len(keyframes) > 1 else period
    total = sum(len(b) for _, b in following)
    payload = sum(len(body) - (5 if kind == 9 else 2) for kind, _, body in media)
    return Prechunked(prologue, first, following, period, total * 1000 / period, gop, payload * 1000 / period)


# -- the load: worker processes -------------------------------------------------------------------
async def _replay(host: str, port: int, key: str, clip: Prechunked, start_at: float, seconds: float,
                  result: dict[str, Any]) -> None:
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(30):
            pub = await open_publisher(host, port, key, chunk_size=CHUNK_SIZE)
    except Exception as exc:
        result["error"] = f"publish failed: {exc!r}"
        return
    if pub.stream_id != 1:
        result["error"] = f"unexpected stream id {pub.stream_id}"
        return
    transport = pub.writer.transport
    pub.write_raw(clip.prologue)
    sent = len(clip.prologue)
    worst_lag = 0.0
    worst_buffer = 0
    behind = 0
    end = start_at + seconds
    iteration = 0
    try:
        while True:
            bins = clip.first_loop if iteration == 0 else clip.next_loops
            base = start_at + iteration * clip.period_ms / 1000
            for slot, data in bins:
                due = base + slot / 1000
                if due >= end:
                    raise StopAsyncIteration
                delay = due - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                else:
                    worst_lag = max(worst_lag, -delay)
                if pub.closed.is_set():
                    result["error"] = "the server closed the connection"
                    return
                pub.write_raw(data)
                sent += len(data)
                buffered = transport.get_write_buffer_size()
                worst_buffer = max(worst_buffer, buffered)
                if buffered > clip.bytes_per_second:  # more than a second of media not taken
                    behind += 1
                    await pub.drain()
            iteration += 1
    except StopAsyncIteration:
        pass
    except OSError as exc:
        result["error"] = f"write failed: {exc!r}"
    finally:
        result.update(sent=sent, worst_lag=worst_lag, worst_buffer=worst_buffer, behind=behind)
        transport.abort()  # no need to flush what is left: the run is over


async def _worker_main(host: str, port: int, keys: list[str], clip: Prechunked, start_at: float,
                       seconds: float, spread: float) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = [{"key": key} for key in keys]
    offset = time.time() - asyncio.get_running_loop().time()
    tasks = []
    for index, key in enumerate(keys):
        # stagger the starts so keyframes (bursts) do not all land at once, as in real life
        begin = start_at - offset + spread * random.random()
        tasks.append(_bounded(_replay(host, port, key, clip, begin, seconds, results[index]),
                              seconds + spread + 60, results[index]))
    await asyncio.gather(*tasks)
    return results


async def _bounded(replay: Any, limit: float, result: dict[str, Any]) -> None:
    """A stream that cannot finish in time (a starved server stops reading) is a failure, not a hang."""
    try:
        async with asyncio.timeout(limit):
            await replay
    except TimeoutError:
        result.setdefault("error", "did not finish in time")


def worker(host: str, port: int, keys: list[str], clip: Prechunked, start_at: float, seconds: float,
           spread: float, cores: set[int], out: Any) -> None:
    if cores:
        os.sched_setaffinity(0, cores)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    out.put(asyncio.run(_worker_main(host, port, keys, clip, start_at, seconds, spread)))


# -- the server side: measuring -------------------------------------------------------------------
def pin_all_threads(pid: int, cores: set[int]) -> None:
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), cores)
        except OSError:
            pass


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def http(url: str, body: Any = None, token: str | None = None, timeout: float = 10) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


def make_user(base: str, name: str) -> str:
    status, body = http(base + "/api/auth/register", {"username": name, "password": PASSWORD})
    if status != 201:
        raise RuntimeError(f"register {name}: {status} {body[:200]!r}")
    token = json.loads(body)["token"]
    status, body = http(base + "/api/me", token=token)
    return json.loads(body)["stream_key"]


@dataclass
class SegmentWatch:
    """Polls one channel's media playlist; notes when each segment first appears."""

    channel: str
    media_url: str | None = None
    seen: dict[str, float] = field(default_factory=dict)
    durations: dict[str, float] = field(default_factory=dict)
    errors: int = 0
    #: the longest a playlist request took once segments flowed (a stalled event loop shows here)
    slowest: float = 0.0

    def poll(self, base: str, now: float) -> None:
        if self.media_url is None:
            status, body = http(f"{base}/live/{self.channel}/index.m3u8", timeout=5)
            if status != 200:
                return
            lines = body.decode().splitlines()
            uri = next((line for line in lines if line and not line.startswith("#")), None)
            if uri is None:
                return
            self.media_url = f"{base}/live/{self.channel}/{uri}"
        asked = time.monotonic()
        status, body = http(self.media_url, timeout=5)
        if self.seen:  # the first request waits by design for a new stream's first segment
            self.slowest = max(self.slowest, time.monotonic() - asked)
        if status != 200:
            self.errors += 1
            return
        duration = 0.0
        for line in body.decode().splitlines():
            if line.startswith("#EXTINF:"):
                duration = float(re.split("[:,]", line)[1])
            elif line and not line.startswith("#") and line not in self.seen:
                self.seen[line] = now
                self.durations[line] = duration

    def report(self, window: tuple[float, float], tolerance: float) -> tuple[int, int, float]:
        """(segments seen in the window, of which late, the largest gap between arrivals)."""
        times = sorted(t for t in self.seen.values() if window[0] <= t <= window[1])
        names = sorted((t, n) for n, t in self.seen.items() if window[0] <= t <= window[1])
        late = 0
        worst = 0.0
        for (prev_t, _), (t, name) in itertools.pairwise(names):
            gap = t - prev_t
            worst = max(worst, gap)
            if gap > self.durations.get(name, 2.0) + tolerance:
                late += 1
        return len(times), late, worst


def metric_values(text: str, name: str) -> dict[str, float]:
    values = {}
    for line in text.splitlines():
        if line.startswith((name + "{", name + "_total{")):
            labels, value = line.rsplit(" ", 1)
            match = re.search(r'channel="([^"]*)"', labels)
            if match:
                values[match.group(1)] = float(value)
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=60.0, help="publishing time per stream")
    parser.add_argument("--kbps", type=int, default=2500, help="video bitrate of the clip")
    parser.add_argument("--clip-seconds", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2, help="load-generator processes")
    parser.add_argument("--sample", type=int, default=10, help="channels whose HLS segments are watched")
    parser.add_argument("--server-core", type=int, default=0)
    parser.add_argument("--config", help="a TOML config for the server (default: the ABR ladder off)")
    parser.add_argument("--ladder", action="store_true",
                        help="keep the transcoding ladder on (not passthrough: needs far more CPU)")
    args = parser.parse_args()
    if args.seconds < 20:
        parser.error("--seconds must be at least 20 (2 s of staggered starts + 10 s of warm-up come first)")

    from tests.support.server import ServerProcess

    all_cores = os.sched_getaffinity(0)
    server_cores = {args.server_core}
    load_cores = (all_cores - server_cores) or all_cores

    t = time.monotonic()
    clip = prechunk(encode_clip(args.clip_seconds, args.kbps))
    print(f"clip: {args.clip_seconds} s, {clip.bytes_per_second * 8 / 1e6:.2f} Mb/s on the wire, "
          f"GOP {clip.keyframe_interval_ms} ms, {len(clip.next_loops)} writes per loop "
          f"(ready in {time.monotonic() - t:.1f} s)")

    data_dir = Path(tempfile.mkdtemp(prefix="rtmp-bench-"))
    config = args.config
    if config is None and not args.ladder:
        # passthrough: what the publisher sent is packaged as is (HLS, recording, thumbnails)
        config = str(data_dir / "bench.toml")
        Path(config).write_text("[ladder]\nenabled = false\n")
    server = ServerProcess(data_dir, config=config)
    server.start()
    os.sched_setaffinity(0, load_cores)
    pid = server.proc.pid  # type: ignore[union-attr]
    try:
        t = time.monotonic()
        names = [f"bench{i:04d}" for i in range(args.streams)]
        with ThreadPoolExecutor(4) as pool:  # password hashing: still on every core here
            keys = list(pool.map(lambda n: make_user(server.url, n), names))
        print(f"{len(keys)} users in {time.monotonic() - t:.1f} s")
        # from now on the server has one core; threads it starts later inherit the pinning
        pin_all_threads(pid, server_cores)

        idle_rss = rss_bytes(pid)
        ctx = mp.get_context("spawn")
        out = ctx.Queue()
        start_at = time.time() + 3.0
        spread = min(2.0, clip.keyframe_interval_ms / 1000)
        procs = []
        for w in range(args.workers):
            part = keys[w::args.workers]
            if part:
                proc = ctx.Process(target=worker, args=("127.0.0.1", server.rtmp_port, part, clip, start_at,
                                                        args.seconds, spread, load_cores, out))
                proc.start()
                procs.append(proc)

        watches = [SegmentWatch(name) for name in names[:: max(1, args.streams // args.sample)][:args.sample]]
        warmup = 10.0
        samples: list[tuple[float, float, int]] = []
        end_at = start_at + spread + args.seconds
        # steady state: every stream has started (spread) and warmed up, none has stopped yet
        window = (start_at + spread + warmup, start_at + args.seconds - 1)
        ingested: list[tuple[float, dict[str, float]]] = []  # (time, bytes per channel) at both ends
        while time.time() < end_at:
            now = time.time()
            if len(ingested) < 2 and now > window[len(ingested)]:
                body = http(server.url + "/metrics")[1].decode()
                ingested.append((time.time(), metric_values(body, "livesrv_stream_ingest_bytes")))
            pin_all_threads(pid, server_cores)
            samples.append((now, cpu_seconds(pid), rss_bytes(pid)))
            if now > start_at:
                for watch in watches:
                    watch.poll(server.url, time.time())
            time.sleep(max(0.0, 0.5 - (time.time() - now)))
        results = []
        for _ in procs:
            try:
                results += out.get(timeout=120)
            except Exception:  # a worker that died: its streams count as failed
                pass
        results += [{"key": "?", "error": "worker lost"}] * (args.streams - len(results))
        for proc in procs:
            proc.join(30)
    finally:
        log = server.log()
        server.stop()

    steady = [s for s in samples if window[0] <= s[0] <= window[1]]
    cpu = float("nan")
    if len(steady) > 1:
        cpu = (steady[-1][1] - steady[0][1]) / (steady[-1][0] - steady[0][0]) * 100
    peak_rss = max(s[2] for s in samples)
    failed = [r for r in results if "error" in r]
    behind = [r for r in results if r.get("behind")]
    wire_bps = clip.bytes_per_second * 8
    # server side: what the hub took in over the steady window, per channel, against what was offered
    rates: dict[str, float] = {}
    if len(ingested) == 2:
        (t0, first), (t1, last) = ingested
        rates = {ch: (last[ch] - first.get(ch, 0.0)) / (t1 - t0) for ch in last}
    kept_up = [r for r in rates.values() if r >= 0.95 * clip.payload_per_second]
    seg_total = seg_late = 0
    worst_gap = 0.0
    hls_seen = 0
    for watch in watches:
        count, late, gap = watch.report(window, tolerance=1.0)
        seg_total += count
        seg_late += late
        worst_gap = max(worst_gap, gap)
        hls_seen += 1 if count else 0
    worst_lag = max((r.get("worst_lag", 0.0) for r in results), default=0.0)
    rows = [
        ("streams requested", f"{args.streams}"),
        ("streams sustained (hub ingest >= 95% of offered)", f"{len(kept_up)} of {len(rates)} live"),
        ("publishers failed / backed up > 1 s", f"{len(failed)} / {len(behind)}"),
        ("offered load", f"{args.streams * wire_bps / 1e6:.0f} Mb/s ({wire_bps / 1e6:.2f} Mb/s per stream)"),
        ("server CPU (1 core), steady state", f"{cpu:.0f} %"),
        ("server CPU per stream", f"{cpu / max(1, args.streams):.2f} % of a core"),
        ("server RSS idle / peak", f"{idle_rss / 1e6:.0f} MB / {peak_rss / 1e6:.0f} MB"),
        ("RSS per stream", f"{(peak_rss - idle_rss) / max(1, args.streams) / 1e6:.2f} MB"),
        ("load generator worst lag", f"{worst_lag * 1e3:.0f} ms"),
        ("HLS: sampled channels with segments", f"{hls_seen} of {len(watches)}"),
        ("HLS: segments in steady state", f"{seg_total} ({seg_late} late, > duration + 1 s after the last)"),
        ("HLS: largest gap between segments", f"{worst_gap:.2f} s"),
        ("HLS: slowest playlist response", f"{max((w.slowest for w in watches), default=0) * 1e3:.0f} ms"),
    ]
    width = max(len(k) for k, _ in rows)
    mode = "with the ABR ladder" if args.ladder else "passthrough (ladder off)"
    print(f"\nRTMP {mode}: {args.streams} x 720p30 for {args.seconds:.0f} s, server pinned to core "
          f"{args.server_core}, load average {os.getloadavg()[0]:.1f} at the end")
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")
    if rates:
        print(f"  hub ingest per stream min / median    {min(rates.values()) * 8 / 1e6:.2f} / "
              f"{sorted(rates.values())[len(rates) // 2] * 8 / 1e6:.2f} Mb/s "
              f"(offered {clip.payload_per_second * 8 / 1e6:.2f} Mb/s of payload)")
    for r in failed[:5]:
        print(f"  failure {r['key'][:6]}…: {r['error']}")
    if failed or behind or len(kept_up) < args.streams or os.environ.get("BENCH_LOG"):
        print("\nserver log tail:\n" + log[-3000:])


if __name__ == "__main__":
    main()
