"""Ladder throughput: our ladder (transcode/ladder.py's worker: decode once, scale + libx264 per
rung) against FFmpeg's own CLI encoding the same ladder from the same input with the same
settings, side by side in one run. Target: ours / FFmpeg >= 0.95 (frames of source per second).

    .venv/bin/python bench/ladder_throughput.py [--height 1080] [--seconds 8] [--rounds 2]

Needs the ``ffmpeg`` command (Debian: ``apt-get install -y ffmpeg``); it is not a dependency
of the server. The input is rendered once (testsrc2, H.264, keyframe every 2 s, no audio: AAC
is passed through by the ladder and costs nothing). Both sides use the same rungs (the default
ladder of config/ladder.toml below the source's size), preset, profile, bitrates, VBV, bicubic
scaling, no B-frames, keyframes only at the source's, and their default thread counts.
Rounds alternate between the two so background load hits both alike; the best round counts.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import av

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from livesrv.media import MILLISECONDS, Packet, StreamInfo, Track
from transcode.ladder import Inbox, LadderSettings, LadderWorker, RungPlan, plan_ladder


def render_input(path: Path, width: int, height: int, fps: int, seconds: float) -> None:
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i",
                    f"testsrc2=size={width}x{height}:rate={fps}:duration={seconds}",
                    "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-g", str(2 * fps),
                    "-bf", "0", "-b:v", "6M", str(path)], check=True)


def demux(path: Path) -> tuple[StreamInfo, list[Packet]]:
    """The input as the hub would hold it (MP4 stores AVCC + avcC, as RTMP does)."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        ctx = stream.codec_context
        track = Track("video", "h264", MILLISECONDS, bytes(ctx.extradata), width=ctx.width,
                      height=ctx.height, fps=float(stream.average_rate))
        tb = stream.time_base
        packets = [Packet("video", round(p.dts * tb * 1000), round(p.pts * tb * 1000), bool(p.is_keyframe),
                          bytes(p)) for p in container.demux(stream) if p.dts is not None and p.size]
    return StreamInfo(track, None), packets


def run_ours(info: StreamInfo, packets: list[Packet], plans: list[RungPlan],
             settings: LadderSettings) -> tuple[float, float, dict[str, int]]:
    """(wall seconds, CPU seconds of this process, frames per rung)."""
    frames: dict[str, int] = {p.name: 0 for p in plans}
    done = threading.Event()

    def deliver(events: list) -> None:
        for event in events:
            if event[0] == "video":
                frames[event[1]] += 1
            elif event[0] == "end":
                done.set()

    inbox = Inbox(max_ticks=10**12)  # the whole input is queued at once: no catch-up skipping
    worker = LadderWorker("bench", info, plans, settings, inbox, deliver)
    cpu = time.process_time()
    start = time.perf_counter()
    worker.start()
    inbox.put(packets)
    inbox.close()
    done.wait()
    worker.join()
    return time.perf_counter() - start, time.process_time() - cpu, frames


def filter_graph(plans: list[RungPlan], scaler: str, cascade: bool) -> str:
    """The ladder's scaling as an FFmpeg filter graph: each rung scaled from the source
    (``split``), or, as our ladder does with ``cascade``, each from the next larger rung."""
    if not cascade:
        labels = "".join(f"[s{i}]" for i in range(len(plans)))
        return f"[0:v]split={len(plans)}{labels};" + ";".join(
            f"[s{i}]scale={p.width}:{p.height}:flags={scaler}[o{i}]" for i, p in enumerate(plans))
    parts = []
    source = "[0:v]"
    for i, plan in enumerate(plans):
        scale = f"{source}scale={plan.width}:{plan.height}:flags={scaler}"
        if i + 1 < len(plans):
            parts.append(f"{scale},split=2[o{i}][c{i}]")
            source = f"[c{i}]"
        else:
            parts.append(f"{scale}[o{i}]")
    return ";".join(parts)


def ffmpeg_command(path: Path, plans: list[RungPlan], settings: LadderSettings) -> list[str]:
    graph = filter_graph(plans, settings.scaler, settings.cascade)
    command = ["ffmpeg", "-v", "error", "-nostdin", "-i", str(path), "-filter_complex", graph]
    for i, plan in enumerate(plans):
        command += ["-map", f"[o{i}]", "-c:v", "libx264", "-preset", plan.preset, "-profile:v", plan.profile,
                    "-b:v", str(plan.bitrate), "-maxrate", str(plan.bitrate * 3 // 2),
                    "-bufsize", str(plan.bitrate * 2), "-pix_fmt", "yuv420p",
                    "-x264-params", "keyint=infinite:scenecut=0:bframes=0",
                    "-force_key_frames", "source", "-an", "-f", "null", "-"]
        if settings.tune:
            command[-6:-6] = ["-tune", settings.tune]
    return command


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_ffmpeg(command: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the ffmpeg process)."""
    cpu = _children_cpu()
    start = time.perf_counter()
    subprocess.run(command, check=True)
    return time.perf_counter() - start, _children_cpu() - cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--height", type=int, default=1080, choices=(720, 1080))
    parser.add_argument("--fps", type=int, default=30)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--no-cascade", action="store_true",
                        help="scale every rung from the source, on both sides")
    args = parser.parse_args()
    if shutil.which("ffmpeg") is None:
        print("ffmpeg (the CLI) is missing: apt-get install -y ffmpeg", file=sys.stderr)
        return 2
    width = args.height * 16 // 9
    settings = LadderSettings(cascade=not args.no_cascade)
    plans = plan_ladder(settings, width, args.height, float(args.fps))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "input.mp4"
        render_input(path, width, args.height, args.fps, args.seconds)
        info, packets = demux(path)
        source_frames = len(packets)
        command = ffmpeg_command(path, plans, settings)
        ours: list[float] = []
        theirs: list[float] = []
        our_cpu: list[float] = []
        their_cpu: list[float] = []
        for _ in range(args.rounds):
            wall, cpu = run_ffmpeg(command)
            theirs.append(wall)
            their_cpu.append(cpu)
            seconds, cpu, frames = run_ours(info, packets, plans, settings)
            our_cpu.append(cpu)
            missing = {name: n for name, n in frames.items() if n != source_frames}
            if missing:
                print(f"warning: rung frame counts differ from the source's {source_frames}: {missing}")
            ours.append(seconds)
    our_fps = source_frames / min(ours)
    their_fps = source_frames / min(theirs)
    ladder = ", ".join(f"{p.name} {p.width}x{p.height} {p.bitrate // 1000}k" for p in plans)
    print(f"input   {width}x{args.height}@{args.fps} H.264, {source_frames} frames; ladder: {ladder}; "
          f"preset {settings.preset}, profile {settings.profile}, "
          f"{'cascaded' if settings.cascade else 'split'} {settings.scaler} scaling")
    for name, fps, walls, cpus in (("ffmpeg ", their_fps, theirs, their_cpu),
                                   ("livesrv", our_fps, ours, our_cpu)):
        rounds = ", ".join(f"{source_frames / s:.1f}" for s in walls)
        cpu_ms = min(cpus) / source_frames * 1000
        print(f"{name} {fps:7.1f} fps  (rounds: {rounds}); CPU {cpu_ms:.1f} ms/frame")
    print(f"ratio   {our_fps / their_fps:.3f}  (target >= 0.95); CPU per frame, FFmpeg / ours: "
          f"{min(their_cpu) / min(our_cpu):.3f}")
    print("ffmpeg command: " + " ".join(f"'{c}'" if (";" in c or "[" in c) else c for c in command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
