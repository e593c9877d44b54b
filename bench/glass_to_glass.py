"""Glass-to-glass latency in Chromium: capture wall clock -> frame shown by the watch page's hls.js.

A real server process (tests/support/server.py), FFmpeg's own RTMP client publishing in real time
a test pattern whose frames carry their capture wall-clock time in their pixels
(tests/support/publish.py, ``stamp_time=True``), and Debian's Chromium (Playwright) on
``/watch/CHANNEL`` (LL-HLS: hls.js ``lowLatencyMode``) and ``/watch/CHANNEL?ll=0`` (plain HLS).

How a sample is taken (in the page, so no screenshot round trip sits between display and reading):
``video.requestVideoFrameCallback`` fires for each frame the compositor is about to show, with
the frame's ``expectedDisplayTime``; the callback draws that very frame into a canvas, converts
the two code stripes at the top to luma and queues them; Python collects the queue every
``--collect-ms`` and reads the stamp with ``read_stamp``. So

    latency = expectedDisplayTime (as wall clock) - capture time read from the displayed pixels

The sampling's own delay is kept out of the figure by construction (the clock reading is the
frame's display time from the compositor, not the time we got around to reading it) and is
measured and reported: ``callback`` = how late the callback ran after the frame was presented,
``readback`` = drawImage + getImageData. Browser times are turned into wall clock with
``Date.now() - performance.now()`` taken at each sample (no drift from timeOrigin).
Publisher, server and browser share one machine and its clock.

Cross-check (``--screenshots N`` after sampling): clipped screenshots of the picture inside the
<video> box (overlays hidden), read the same way; the frame was on screen between the request
and the PNG, so the latency lies between the two readings (their distance, ~70-100 ms, is the
screenshot path's own delay: why it is only the cross-check). The canvas figure falls inside.

Before the first viewer the stream is live ``--warmup`` s (a full playlist window), and each
viewer plays ``--settle`` s before sampling (hls.js catches up to its target by playing faster).

    .venv/bin/python bench/glass_to_glass.py --mode both --seconds 40
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import io
import json
import math
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import av

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.browser import CHROMIUM_LAUNCHER  # noqa: E402
from tests.support.publish import RtmpPublisher, read_stamp  # noqa: E402  (path set just above)
from tests.support.server import ServerProcess, get_json  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 # a background/occluded page would throttle timers and frame callbacks
                 "--disable-background-timer-throttling", "--disable-renderer-backgrounding",
                 "--disable-backgrounding-occluded-windows"]
GOALS = {"ll": 2.5, "plain": 8.0}
#: fraction of the picture height read back: the frame-number and time stripes (2 x 1/18) and a margin
BAND_FRACTION = 0.125

SAMPLER_JS = """
({intervalMs, bandFraction}) => {
  const video = window.livesrvPlayer.video;
  const canvas = document.createElement('canvas');
  const ctx = canvas.getContext('2d', { willReadFrequently: true });
  const state = { samples: [], frames: 0, stalls: 0, stop: false };
  window.g2g = state;
  // each stall ("waiting": the buffer ran dry) adds its length to the latency for good unless
  // the player catches up (hls.js speeds up only in low-latency mode)
  video.addEventListener('waiting', () => { state.stalls += 1; });
  let last = -Infinity;
  const toBase64 = (bytes) => {
    let text = '';
    for (let i = 0; i < bytes.length; i += 0x8000) {
      text += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
    }
    return btoa(text);
  };
  const onFrame = (now, meta) => {
    if (state.stop) return;
    video.requestVideoFrameCallback(onFrame);
    state.frames += 1;
    if (now - last < intervalMs) return;
    last = now;
    const width = meta.width, height = meta.height;
    const band = Math.min(height, Math.ceil(height * bandFraction));
    if (canvas.width !== width || canvas.height !== band) {
      canvas.width = width;
      canvas.height = band;
    }
    const before = performance.now();
    ctx.drawImage(video, 0, 0, width, height);  // the canvas keeps the top `band` rows
    const rgba = ctx.getImageData(0, 0, width, band).data;
    const after = performance.now();
    const luma = new Uint8Array(width * band);
    for (let i = 0, j = 0; j < luma.length; i += 4, j += 1) {
      luma[j] = (77 * rgba[i] + 150 * rgba[i + 1] + 29 * rgba[i + 2]) >> 8;
    }
    const wall = Date.now() - performance.now();  // add to a performance.now() time: wall ms
    state.samples.push({
      displayed: wall + meta.expectedDisplayTime,
      presented: wall + meta.presentationTime,
      callback: wall + now,
      readback: after - before,
      mediaTime: meta.mediaTime, width, height, band,
      latencyHls: window.livesrvPlayer.latency,
      rate: video.playbackRate,
      luma: toBase64(luma),
    });
  };
  video.requestVideoFrameCallback(onFrame);
}
"""

#: the picture inside the <video> box (page coordinates): object-fit letterboxes it
VIDEO_CONTENT_BOX_JS = """() => {
  const video = window.livesrvPlayer.video, r = video.getBoundingClientRect();
  const scale = Math.min(r.width / video.videoWidth, r.height / video.videoHeight);
  const width = video.videoWidth * scale, height = video.videoHeight * scale;
  return { x: r.left + window.scrollX + (r.width - width) / 2,
           y: r.top + window.scrollY + (r.height - height) / 2, width, height };
}"""

TAKE_SAMPLES_JS = "() => { const s = window.g2g.samples; window.g2g.samples = []; return s; }"


@dataclass
class Result:
    mode: str
    url: str
    latencies: list[float] = field(default_factory=list)  # seconds
    sampled_at: list[float] = field(default_factory=list)  # wall clock of each latency sample
    callback_delays: list[float] = field(default_factory=list)  # ms
    readbacks: list[float] = field(default_factory=list)  # ms
    unreadable: int = 0
    hls_latencies: list[float] = field(default_factory=list)  # hls.js's own estimate, s
    #: cross-check by clipped screenshots: (latency at the request, latency at the answer), s
    screenshots: list[tuple[float, float]] = field(default_factory=list)
    screenshots_unreadable: int = 0
    player: dict[str, Any] = field(default_factory=dict)


def stamp_of(sample: dict[str, Any]) -> float | None:
    """The capture time drawn into the sampled band (None: no valid code, e.g. a torn frame)."""
    width, height, band = sample["width"], sample["height"], sample["band"]
    luma = base64.b64decode(sample["luma"])
    frame = av.VideoFrame(width, height, "gray")
    plane = frame.planes[0]
    stride = plane.line_size
    pad = bytes(stride - width)
    rows = [luma[y * width:(y + 1) * width] + pad for y in range(band)]
    # rows below the band stay black: read_stamp only looks at the top stripes, but it lays
    # them out relative to the full picture height
    plane.update(b"".join(rows) + bytes(stride * (height - band)))
    return read_stamp(frame, now=sample["displayed"] / 1000)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def summary(values: list[float]) -> str:
    if not values:
        return "no samples"
    return (f"min {min(values):.3f}  median {statistics.median(values):.3f}  "
            f"p95 {percentile(values, 0.95):.3f}  max {max(values):.3f}  (n={len(values)})")


def trajectory(result: Result, window: float = 5.0) -> str:
    """How latency moved while sampling: does the player still converge, or has it settled?"""
    if not result.sampled_at:
        return "-"
    start = result.sampled_at[0]
    buckets: dict[int, list[float]] = {}
    for at, latency in zip(result.sampled_at, result.latencies):
        buckets.setdefault(int((at - start) // window), []).append(latency)
    return " ".join(f"{statistics.median(values):.2f}" for _, values in sorted(buckets.items()))


def write_config(path: Path, segment_seconds: float, part_seconds: float | None) -> None:
    """The server's TOML: only keys transcode/hls.py's HlsSettings knows (the part key is new)."""
    from transcode.hls import HlsSettings

    known = {f.name for f in dataclasses.fields(HlsSettings)}
    lines = ["[hls]", f"segment_seconds = {segment_seconds}"]
    if part_seconds is not None:
        if "part_seconds" in known:
            lines.append(f"part_seconds = {part_seconds}")
        else:
            print("note: this server has no [hls] part_seconds (no LL-HLS parts yet); ignored")
    path.write_text("\n".join(lines) + "\n")


def wait_live(server: ServerProcess, channel: str, publisher: RtmpPublisher, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if publisher.error is not None:
            raise RuntimeError(f"publisher failed: {publisher.error!r}\n{server.log()}")
        if get_json(f"{server.url}/api/live/{channel}")[0] == 200:
            return
        time.sleep(0.2)
    raise RuntimeError(f"{channel} never went live\n{server.log()}")


def measure(browser: Any, server: ServerProcess, channel: str, mode: str, args: argparse.Namespace) -> Result:
    url = f"{server.url}/watch/{channel}" + ("?ll=0" if mode == "plain" else "")
    result = Result(mode, url)
    context = browser.new_context(viewport={"width": 1280, "height": 760})
    try:
        page = context.new_page()
        console: list[str] = []
        page.on("console", lambda message: console.append(f"{message.type}: {message.text}"))
        page.goto(url)
        try:
            page.wait_for_function(
                "() => { const p = window.livesrvPlayer; return p && p.state === 'playing' &&"
                " !p.video.paused && p.video.currentTime > 1; }", timeout=60000)
        except Exception:
            state = page.evaluate("() => { const p = window.livesrvPlayer; return p && {state: p.state,"
                                  " time: p.video.currentTime, paused: p.video.paused, stats: p.stats,"
                                  " errors: p.fatalErrors, ready: p.video.readyState}; }")
            raise RuntimeError(f"{mode}: the watch page never played: {state}\n"
                               + "\n".join(console[-30:]) + "\n" + server.log()[-3000:]) from None
        # let hls.js reach its target latency (it catches up at <= 1.1x speed)
        page.wait_for_timeout(args.settle * 1000)
        page.evaluate(SAMPLER_JS, {"intervalMs": 1000 / args.rate, "bandFraction": BAND_FRACTION})
        deadline = time.monotonic() + args.seconds
        while time.monotonic() < deadline:
            page.wait_for_timeout(args.collect_ms)
            take(page, result)
        take(page, result)
        page.evaluate("() => { window.g2g.stop = true; }")
        screenshots(page, result, args.screenshots)
        result.player = page.evaluate("""() => {
            const p = window.livesrvPlayer, hls = p.hls;
            const level = hls && hls.levels[hls.currentLevel];
            const d = level && level.details;
            return { state: p.state, stats: p.stats, lowLatency: p.lowLatency,
                     fatalErrors: p.fatalErrors, reloads: p.reloads,
                     framesSeen: window.g2g.frames, stallsWhileSampling: window.g2g.stalls,
                     targetLatency: hls && hls.targetLatency,
                     partTarget: d && d.partTarget, partHoldBack: d && d.partHoldBack,
                     holdBack: d && d.holdBack, targetDuration: d && d.targetduration,
                     dropped: p.video.getVideoPlaybackQuality().droppedVideoFrames };
        }""")
    finally:
        context.close()
    return result


def take(page: Any, result: Result) -> None:
    for sample in page.evaluate(TAKE_SAMPLES_JS):
        stamp = stamp_of(sample)
        if stamp is None:
            result.unreadable += 1
            continue
        result.latencies.append(sample["displayed"] / 1000 - stamp)
        result.sampled_at.append(sample["displayed"] / 1000)
        result.callback_delays.append(sample["callback"] - sample["presented"])
        result.readbacks.append(sample["readback"])
        if sample["latencyHls"] is not None:
            result.hls_latencies.append(sample["latencyHls"])


def screenshots(page: Any, result: Result, count: int) -> None:
    """What the compositor really shows, through the DevTools screenshot path: the frame was on
    screen somewhere between asking and getting the PNG, so the latency lies between the two
    readings; their distance is this method's own (large) sampling delay."""
    # the player's overlays ("Tap to unmute", controls) sit over the picture's top stripes
    # (through the CSSOM: the page's CSP refuses a <style> tag)
    page.evaluate("() => { for (const el of document.querySelectorAll('#player > :not(video)'))"
                  " el.style.setProperty('visibility', 'hidden', 'important'); }")
    box = page.evaluate(VIDEO_CONTENT_BOX_JS)
    # whole pixels inside the picture: a letterbox edge would shift the code's cells
    clip = {"x": math.ceil(box["x"]), "y": math.ceil(box["y"]),
            "width": math.floor(box["width"]) - 1, "height": math.floor(box["height"]) - 1}
    for _ in range(count):
        asked = time.time()
        png = page.screenshot(clip=clip, animations="allow", caret="initial")
        answered = time.time()
        with av.open(io.BytesIO(png), format="png_pipe") as container:
            frame = next(container.decode(video=0))
        stamp = read_stamp(frame, now=answered)
        if stamp is None:
            result.screenshots_unreadable += 1
        else:
            result.screenshots.append((asked - stamp, answered - stamp))
        page.wait_for_timeout(150)


def report(result: Result) -> None:
    goal = GOALS[result.mode]
    ok = bool(result.latencies) and statistics.median(result.latencies) <= goal
    print(f"\n== {result.mode}: {result.url}")
    print(f"glass-to-glass (s): {summary(result.latencies)}   goal <= {goal} s: "
          f"{'met' if ok else 'MISSED'} (median)")
    print(f"trajectory (median per 5 s of sampling): {trajectory(result)}")
    print(f"hls.js's own latency estimate (s): {summary(result.hls_latencies)}")
    print(f"sampling: callback after presentation (ms): {summary(result.callback_delays)}")
    print(f"sampling: drawImage+getImageData (ms): {summary(result.readbacks)}")
    print(f"unreadable samples: {result.unreadable}")
    if result.screenshots:
        low = [a for a, _ in result.screenshots]
        high = [b for _, b in result.screenshots]
        print(f"cross-check, clipped screenshots: latency at request (s): {summary(low)}")
        print(f"cross-check, clipped screenshots: latency at answer  (s): {summary(high)}")
        print(f"cross-check, screenshot round trip (ms): "
              f"{summary([(b - a) * 1000 for a, b in result.screenshots])}")
    if result.screenshots_unreadable:
        print(f"cross-check: unreadable screenshots: {result.screenshots_unreadable}")
    print(f"player: {json.dumps(result.player)}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=40, help="sampling time per mode")
    parser.add_argument("--mode", choices=("ll", "plain", "both"), default="both")
    parser.add_argument("--segment-seconds", type=float, default=2.0)
    parser.add_argument("--part-seconds", type=float, default=None,
                        help="[hls] part_seconds (default: the server's own)")
    parser.add_argument("--gop-seconds", type=float, default=1.0, help="publisher keyframe interval")
    parser.add_argument("--fps", type=int, default=30)
    parser.add_argument("--warmup", type=float, default=12.0,
                        help="seconds live before the first viewer joins (a full playlist window: "
                             "on a younger stream hls.js starts at the playlist's first segment, "
                             "closer to the edge than it aims, and plain HLS then stalls)")
    parser.add_argument("--settle", type=float, default=10.0, help="seconds of play before sampling")
    parser.add_argument("--rate", type=float, default=5.0, help="samples per second")
    parser.add_argument("--screenshots", type=int, default=10,
                        help="clipped screenshots per mode after sampling, as a cross-check")
    parser.add_argument("--collect-ms", type=int, default=1000)
    parser.add_argument("--json", type=Path, help="also write the raw figures here")
    args = parser.parse_args()

    from playwright.sync_api import sync_playwright

    modes = ["ll", "plain"] if args.mode == "both" else [args.mode]
    results = []
    with tempfile.TemporaryDirectory(prefix="g2g-") as tmp:
        config = Path(tmp) / "livesrv.toml"
        write_config(config, args.segment_seconds, args.part_seconds)
        server = ServerProcess(Path(tmp) / "server", config=str(config))
        server.start()
        publisher = None
        try:
            user = server.add_user("glass")
            publisher = RtmpPublisher(server.rtmp_url(user["stream_key"]), width=640, height=360,
                                      fps=args.fps, gop_seconds=args.gop_seconds, stamp_time=True)
            publisher.start()
            wait_live(server, "glass", publisher)
            time.sleep(args.warmup)
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM_LAUNCHER, args=CHROMIUM_ARGS)
                try:
                    for mode in modes:
                        results.append(measure(browser, server, "glass", mode, args))
                        report(results[-1])
                finally:
                    browser.close()
            if publisher.error is not None:
                raise RuntimeError(f"publisher failed: {publisher.error!r}")
        finally:
            if publisher is not None:
                publisher.stop()
            server.stop()
    print(f"\nsettings: segment {args.segment_seconds} s, part {args.part_seconds or 'server default'}, "
          f"GOP {args.gop_seconds} s, {args.fps} fps 640x360, live {args.warmup} s before the first "
          f"viewer, {args.rate}/s samples for {args.seconds} s after {args.settle} s of play")
    if args.json:
        args.json.write_text(json.dumps([dataclasses.asdict(r) for r in results], indent=1))
    return 0 if all(r.latencies and statistics.median(r.latencies) <= GOALS[r.mode] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
