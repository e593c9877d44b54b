"""One video frame's datagrams on loopback: one ``sendto`` each, or one segmented ``sendmsg``.

What ``transcode/udp_gso.py`` saves per frame and viewer, receiving included (the receiver
drains its socket after every frame, as a viewer would). A frame here is 8 packets of 1,238
bytes (an H.264 fragment, RTP header and SRTP tag) and a shorter last one.

    .venv/bin/python bench/udp_gso_loopback.py [--frames 3000]
"""

from __future__ import annotations

import argparse
import socket
import struct
import time

from transcode.udp_gso import UDP_SEGMENT, segment_runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=3000)
    args = parser.parse_args()
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    receiver.setblocking(False)
    receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 24)
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender.setblocking(False)
    address = receiver.getsockname()
    frame = [bytes([i]) * 1238 for i in range(8)] + [b"z" * 300]
    assert segment_runs([len(p) for p in frame]) == [(0, len(frame))]
    option = [(socket.SOL_UDP, UDP_SEGMENT, struct.pack("=H", len(frame[0])))]

    def drain() -> int:
        count = 0
        while True:
            try:
                receiver.recv(65536)
            except BlockingIOError:
                return count
            count += 1

    sender.sendmsg(frame, option, 0, address)
    time.sleep(0.01)
    print(f"one segmented send arrived as {drain()} datagrams (sent {len(frame)})")
    started = time.perf_counter()
    for _ in range(args.frames):
        for packet in frame:
            sender.sendto(packet, address)
        drain()
    one_each = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(args.frames):
        sender.sendmsg(frame, option, 0, address)
        drain()
    segmented = time.perf_counter() - started
    print(f"per frame of {len(frame)} datagrams: {one_each / args.frames * 1e6:.1f} µs as one sendto "
          f"each, {segmented / args.frames * 1e6:.1f} µs as one segmented send (receiving included)")


if __name__ == "__main__":
    main()
