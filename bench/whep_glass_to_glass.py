"""Glass-to-glass latency over WHEP in Chromium: capture wall clock -> frame shown by the watch
page playing over WebRTC (goal: <= 400 ms on loopback).

The same method as bench/glass_to_glass.py (the HLS one), whose sampler this reuses: a real
server process, FFmpeg's own RTMP client publishing a test pattern stamped with its capture
time, and Debian's Chromium on ``/watch/CHANNEL`` (WebRTC first); ``requestVideoFrameCallback``
draws each sampled frame to a canvas and the stamp is read from its pixels, so

    latency = expectedDisplayTime (as wall clock) - capture time read from the displayed pixels

The publisher runs x264 with ``tune=zerolatency`` (no B-frames: the source goes to WebRTC as it
is) and a 1 s GOP. The page is checked to really play over WebRTC (``livesrvPlayer.engine``).

    .venv/bin/python bench/whep_glass_to_glass.py --seconds 30
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import glass_to_glass as g2g  # noqa: E402  (path set just above)

from tests.support.publish import RtmpPublisher  # noqa: E402
from tests.support.server import ServerProcess  # noqa: E402

GOAL_SECONDS = 0.4


def measure(browser: Any, server: ServerProcess, channel: str, args: argparse.Namespace) -> g2g.Result:
    url = f"{server.url}/watch/{channel}"
    result = g2g.Result("webrtc", url)
    context = browser.new_context(viewport={"width": 1280, "height": 760})
    try:
        page = context.new_page()
        page.goto(url)
        page.wait_for_function(
            "() => { const p = window.livesrvPlayer; return p && p.state === 'playing' &&"
            " !p.video.paused && p.video.currentTime > 1; }", timeout=60000)
        engine = page.evaluate("() => window.livesrvPlayer.engine")
        if engine != "webrtc":
            raise RuntimeError(f"the page plays over {engine}, not WebRTC: "
                               f"{page.evaluate('() => window.livesrvPlayer.whepFailure')}")
        page.wait_for_timeout(args.settle * 1000)
        page.evaluate(g2g.SAMPLER_JS, {"intervalMs": 1000 / args.rate, "bandFraction": g2g.BAND_FRACTION})
        for _ in range(int(args.seconds)):
            page.wait_for_timeout(1000)
            g2g.take(page, result)
        page.evaluate("() => { window.g2g.stop = true; }")
        result.player = page.evaluate("""async () => {
            const p = window.livesrvPlayer, v = p.video;
            const stats = await p.whep.pc.getStats();
            let inbound = null;
            stats.forEach((s) => { if (s.type === 'inbound-rtp' && s.kind === 'video') inbound = s; });
            return { engine: p.engine, framesSeen: window.g2g.frames, stalls: window.g2g.stalls,
                     dropped: v.getVideoPlaybackQuality().droppedVideoFrames,
                     packetsLost: inbound && inbound.packetsLost,
                     jitterBufferDelayMs: inbound && inbound.jitterBufferEmittedCount
                         ? 1000 * inbound.jitterBufferDelay / inbound.jitterBufferEmittedCount : null,
                     framesDecoded: inbound && inbound.framesDecoded,
                     codec: inbound && inbound.codecId };
        }""")
    finally:
        context.close()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=30, help="sampling time")
    parser.add_argument("--settle", type=float, default=3.0, help="seconds of play before sampling")
    parser.add_argument("--rate", type=float, default=5.0, help="samples per second")
    parser.add_argument("--fps", type=int, default=30)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--bitrate", type=int, default=2_500_000)
    parser.add_argument("--json", type=Path, help="also write the raw figures here")
    args = parser.parse_args()

    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "livesrv.toml"
        config.write_text("[ladder]\nenabled = false\n")  # the CPU stays with publisher and browser
        server = ServerProcess(Path(tmp) / "server", config=str(config)).start()
        try:
            user = server.add_user("g2g")
            channel = user["username"]
            publisher = RtmpPublisher(server.rtmp_url(user["stream_key"]), width=args.width,
                                      height=args.height, fps=args.fps, bitrate=args.bitrate,
                                      stamp_time=True, gop_seconds=1.0).start()
            try:
                g2g.wait_live(server, channel, publisher)
                with sync_playwright() as p:
                    browser = p.chromium.launch(executable_path=g2g.CHROMIUM_LAUNCHER, args=g2g.CHROMIUM_ARGS)
                    try:
                        result = measure(browser, server, channel, args)
                    finally:
                        browser.close()
            finally:
                publisher.stop()
        finally:
            server.stop()

    ok = bool(result.latencies) and statistics.median(result.latencies) <= GOAL_SECONDS
    print(f"== webrtc: {result.url} ({args.width}x{args.height}@{args.fps}, {args.bitrate} b/s)")
    print(f"glass-to-glass (s): {g2g.summary(result.latencies)}   goal <= {GOAL_SECONDS} s: "
          f"{'met' if ok else 'MISSED'} (median)")
    print(f"sampling: callback after presentation (ms): {g2g.summary(result.callback_delays)}")
    print(f"sampling: drawImage+getImageData (ms): {g2g.summary(result.readbacks)}")
    print(f"unreadable samples: {result.unreadable}")
    print(f"player: {json.dumps(result.player)}")
    if args.json:
        args.json.write_text(json.dumps({"latencies": result.latencies, "player": result.player}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
