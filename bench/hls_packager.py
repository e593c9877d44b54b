"""CPU cost of HLS passthrough packaging: N streams x S seconds of 2.5 Mb/s 30 fps video + AAC.

    .venv/bin/python bench/hls_packager.py [STREAMS] [SECONDS] [PART_SECONDS]

PART_SECONDS 0 packages whole segments only (no LL-HLS parts); the default is the [hls] default.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from livesrv.hub import Hub
from livesrv.media import Packet
from tests.support.media import make_clip
from transcode.hls import HlsService, HlsSettings

STREAMS = int(sys.argv[1]) if len(sys.argv) > 1 else 100
SECONDS = int(sys.argv[2]) if len(sys.argv) > 2 else 20
PART_SECONDS = float(sys.argv[3]) if len(sys.argv) > 3 else HlsSettings().part_seconds


def timeline(seconds: int) -> list[Packet]:
    vbytes = 2_400_000 // 8 // 30
    video = [Packet("video", round(i * 1000 / 30), round(i * 1000 / 30), i % 60 == 0,
                    os.urandom(16) * (vbytes // 16)) for i in range(seconds * 30)]
    audio = [Packet("audio", round(i * 1024000 / 44100), round(i * 1024000 / 44100), True, os.urandom(370))
             for i in range(int(seconds * 44100 / 1024))]
    return sorted(video + audio, key=lambda p: p.dts)


async def main() -> None:
    info = make_clip(seconds=1).info
    packets = timeline(SECONDS)
    hub = Hub()
    service = HlsService(hub, HlsSettings(part_seconds=PART_SECONDS))
    service.start()
    streams = [hub.start(f"ch{i}", info, source="rtmp") for i in range(STREAMS)]
    await asyncio.sleep(0)
    started = time.process_time()
    step = 40  # ~0.5 s of media per round, every stream
    for start in range(0, len(packets), step):
        chunk = packets[start:start + step]
        for stream in streams:
            for packet in chunk:
                stream.push(packet)
        await asyncio.sleep(0)
        await asyncio.sleep(0)
    for _ in range(5):
        await asyncio.sleep(0)
    cpu = time.process_time() - started
    states = [state for channel in service.channels() for state in channel.renditions.values()]
    held = sum(state.playlist.held_bytes for state in states)
    segments = sum(state.playlist.next_sequence for state in states)
    print(f"part_seconds={PART_SECONDS}: {STREAMS} streams x {SECONDS} s media "
          f"({len(packets)} packets each): "
          f"cpu {cpu:.2f} s -> {cpu / (STREAMS * SECONDS) * 100:.3f}% of a core per stream; "
          f"{STREAMS * SECONDS / cpu:.0f} stream-seconds per cpu-second; {segments} segments; "
          f"held {held / STREAMS / 1e6:.2f} MB per stream")
    await service.close()


asyncio.run(main())
