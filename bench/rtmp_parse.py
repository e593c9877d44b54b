"""CPU cost of the sans-IO RTMP ingest path alone: bytes → ServerConnection → FlvAdapter →
hub Stream.push (one consumer draining), for the 720p30 clip of rtmp_passthrough.py.

    .venv/bin/python bench/rtmp_parse.py [--seconds 600] [--read 65536] [--profile]

Prints CPU per stream-second and the streams one core could ingest at that rate.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rtmp_passthrough import encode_clip, prechunk

from ingest.rtmp.connection import ClientConnection, ServerConnection
from ingest.rtmp.events import AudioMessage, ConnectRequest, CreateStream, PublishRequest, VideoMessage
from ingest.rtmp.flv import FlvAdapter
from livesrv.hub import Hub
from livesrv.media import Packet


def session_bytes(seconds: float) -> tuple[bytes, bytes]:
    """(setup bytes through publish, then ``seconds`` of media), as a client would send them."""
    clip = prechunk(encode_clip(4, 2500))
    client = ClientConnection()
    server = ServerConnection()
    setup = bytearray()

    def pump() -> None:
        for _ in range(10):
            data = client.data_to_send()
            setup.extend(data)
            if data:
                server.receive_data(data)
            for event in server.next_events():
                if isinstance(event, ConnectRequest):
                    server.accept_connect(event)
                elif isinstance(event, CreateStream):
                    server.accept_create_stream(event)
                elif isinstance(event, PublishRequest):
                    server.accept_publish(event)
            back = server.data_to_send()
            if back:
                client.receive_data(back)
            client.next_events()

    pump()
    client.set_chunk_size(4096)
    client.connect("live", "rtmp://h/live")
    pump()
    client.create_stream()
    pump()
    client.publish(1, "key")
    pump()
    loops = max(1, round(seconds * 1000 / clip.period_ms))
    media = bytearray(clip.prologue)
    media += b"".join(data for _, data in clip.first_loop)
    later = b"".join(data for _, data in clip.next_loops)
    for _ in range(loops - 1):
        media += later
    return bytes(setup), bytes(media)


def ingest(setup: bytes, media: bytes, read_size: int) -> int:
    hub = Hub()
    conn = ServerConnection()
    adapter = FlvAdapter()
    packets = 0
    last_dts = {"video": -1, "audio": -1}

    def handle(events: list) -> None:
        nonlocal stream, packets
        for event in events:
            kind = type(event)
            if kind is VideoMessage or kind is AudioMessage:
                out = adapter.video(event.timestamp, event.payload) if kind is VideoMessage else \
                    adapter.audio(event.timestamp, event.payload)
                if type(out) is Packet:
                    stream.push(out)
                    packets += 1
                    for packet in sub.drain():  # the looped clip must still be one timeline
                        if packet.dts < last_dts[packet.kind]:
                            raise AssertionError(f"{packet.kind} dts went back: {packet.dts}")
                        last_dts[packet.kind] = packet.dts
            elif isinstance(event, ConnectRequest):
                conn.accept_connect(event)
            elif isinstance(event, CreateStream):
                conn.accept_create_stream(event)
            elif isinstance(event, PublishRequest):
                conn.accept_publish(event)

    stream = hub.start("bench", adapter.stream_info(), source="rtmp")
    sub = stream.subscribe("drain")
    conn.receive_data(setup)
    handle(conn.next_events())
    conn.data_to_send()
    view = memoryview(media)
    for offset in range(0, len(media), read_size):
        conn.receive_data(bytes(view[offset:offset + read_size]))
        handle(conn.next_events())
    return packets


async def amain(args: argparse.Namespace) -> None:
    setup, media = session_bytes(args.seconds)
    profiler = cProfile.Profile() if args.profile else None
    start = time.process_time()
    if profiler:
        profiler.enable()
    packets = ingest(setup, media, args.read)
    if profiler:
        profiler.disable()
    cpu = time.process_time() - start
    per_second = cpu / args.seconds
    rate = len(media) * 8 / args.seconds / 1e6
    print(f"{args.seconds:.0f} s of 720p30 ({rate:.2f} Mb/s, {packets} packets) "
          f"in {cpu:.2f} s CPU, reads of {args.read} bytes: {per_second * 1e6:.0f} us per stream-second, "
          f"{per_second * 100:.2f} % of a core per stream -> ~{1 / per_second:.0f} streams per core "
          f"(ingest alone)")
    if profiler:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(12)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--read", type=int, default=65536, help="bytes per socket read")
    parser.add_argument("--profile", action="store_true")
    asyncio.run(amain(parser.parse_args()))


if __name__ == "__main__":
    main()
