"""WHEP fan-out: how many WebRTC viewers of one ~2.5 Mb/s stream one server core sustains.

A real server process (ladder off), FFmpeg's own RTMP client publishing 1280x720@30 at
``--bitrate``, and N aiortc viewers in ``--clients`` helper processes. The viewers do not
decode (that would measure the viewers): their receivers count RTP packets and lost sequence
numbers only. For each N in ``--viewers`` the server's CPU time (utime+stime from /proc) is
taken over ``--seconds`` of steady state, with the viewers' packets and losses over the same
window, so

    CPU per viewer = (server CPU at N - server CPU at 0) / N  (core-seconds per second)
    viewers one core sustains ~= (1 - server CPU at 0) / CPU per viewer

The last figure is an extrapolation from the measured points when the machine (2 shared cores:
server, publisher and viewers on it) cannot host enough viewers to saturate a server core.
"Without loss" is checked at each measured N (lost packets / expected).

    .venv/bin/python bench/whep_fanout.py --viewers 0,10,25,50 --seconds 15
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.publish import RtmpPublisher  # noqa: E402  (path set just above)
from tests.support.server import ServerProcess, get_json  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


# -- the helper process: N counting viewers --------------------------------------------------------
class Counter:
    def __init__(self) -> None:
        self.packets = 0
        self.bytes = 0
        self.lost = 0
        self.last_seq: dict[int, int] = {}


async def viewer_process(url: str, channel: str, count: int) -> None:
    import aiohttp
    from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
    from aiortc.rtcrtpreceiver import RTCRtpReceiver

    from transcode.webrtc import h264_capability

    h264_capability("high")
    h264_capability("main")
    counter = Counter()

    async def count_packet(self: Any, packet: Any, arrival_time_ms: int) -> None:
        counter.packets += 1
        counter.bytes += len(packet.payload)
        last = counter.last_seq.get(packet.ssrc)
        if last is not None:
            gap = (packet.sequence_number - last) & 0xFFFF
            if 1 < gap < 0x8000:
                counter.lost += gap - 1
            if gap < 0x8000:
                counter.last_seq[packet.ssrc] = packet.sequence_number
        else:
            counter.last_seq[packet.ssrc] = packet.sequence_number

    RTCRtpReceiver._handle_rtp_packet = count_packet  # type: ignore[method-assign]

    pcs = []
    async with aiohttp.ClientSession() as http:
        for _ in range(count):
            pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
            pc.addTransceiver("video", direction="recvonly")
            pc.addTransceiver("audio", direction="recvonly")
            await pc.setLocalDescription(await pc.createOffer())
            async with http.post(f"{url}/whep/{channel}", data=pc.localDescription.sdp.encode(),
                                 headers={"Content-Type": "application/sdp"}) as response:
                body = await response.text()
                if response.status != 201:
                    raise RuntimeError(f"WHEP POST -> {response.status}: {body}")
            await pc.setRemoteDescription(RTCSessionDescription(sdp=body, type="answer"))
            pcs.append(pc)
        while sum(pc.connectionState == "connected" for pc in pcs) < count:  # noqa: ASYNC110
            await asyncio.sleep(0.1)
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line or line.strip() == "quit":
            break
        print(json.dumps({"packets": counter.packets, "bytes": counter.bytes, "lost": counter.lost}),
              flush=True)
    await asyncio.gather(*(pc.close() for pc in pcs))


# -- the driver ---------------------------------------------------------------------------------------
def cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of the process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / TICKS, int(fields[12]) / TICKS


class Helper:
    def __init__(self, url: str, channel: str, count: int) -> None:
        self.proc = subprocess.Popen([sys.executable, __file__, "--viewer-process", url, channel, str(count)],
                                     cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def wait_ready(self) -> None:
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if line.strip() != "ready":
            raise RuntimeError(f"viewer helper failed to start: {line!r}")

    def report(self) -> dict[str, int]:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write("report\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        if self.proc.poll() is None and self.proc.stdin:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
                self.proc.wait(20)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()


def sum_reports(helpers: list[Helper]) -> dict[str, int]:
    total = {"packets": 0, "bytes": 0, "lost": 0}
    for helper in helpers:
        for key, value in helper.report().items():
            total[key] += value
    return total


def measure(server: ServerProcess, channel: str, viewers: int, clients: int,
            seconds: float) -> dict[str, Any]:
    assert server.proc is not None
    helpers: list[Helper] = []
    try:
        per = [viewers // clients + (1 if i < viewers % clients else 0) for i in range(clients)]
        helpers = [Helper(server.url, channel, n) for n in per if n]
        for helper in helpers:
            helper.wait_ready()
        time.sleep(3)  # past the start-up burst (each viewer's cached GOP)
        before = sum_reports(helpers)
        cpu0, t0 = cpu_seconds(server.proc.pid), time.monotonic()
        time.sleep(seconds)
        cpu1, t1 = cpu_seconds(server.proc.pid), time.monotonic()
        after = sum_reports(helpers)
    finally:
        for helper in helpers:
            helper.close()
    packets = after["packets"] - before["packets"]
    lost = after["lost"] - before["lost"]
    elapsed = t1 - t0
    return {"viewers": viewers, "server_cpu": (sum(cpu1) - sum(cpu0)) / elapsed,
            "server_user": (cpu1[0] - cpu0[0]) / elapsed, "server_system": (cpu1[1] - cpu0[1]) / elapsed,
            "mbps_per_viewer": (after["bytes"] - before["bytes"]) * 8 / (t1 - t0) / max(viewers, 1) / 1e6,
            "packets": packets, "lost": lost,
            "loss": lost / (packets + lost) if packets + lost else 0.0}


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--viewer-process":
        asyncio.run(viewer_process(sys.argv[2], sys.argv[3], int(sys.argv[4])))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--viewers", default="0,10,25,50", help="viewer counts to measure")
    parser.add_argument("--clients", type=int, default=2, help="viewer helper processes")
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--bitrate", type=int, default=2_500_000)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    counts = [int(v) for v in args.viewers.split(",")]

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "livesrv.toml"
        config.write_text("[ladder]\nenabled = false\n\n[webrtc]\nmax_sessions = 2000\n")
        server = ServerProcess(Path(tmp) / "server", config=str(config)).start()
        try:
            user = server.add_user("fanout")
            channel = user["username"]
            publisher = RtmpPublisher(server.rtmp_url(user["stream_key"]), width=1280, height=720,
                                      fps=30, bitrate=args.bitrate, gop_seconds=1.0).start()
            try:
                deadline = time.monotonic() + 30
                while get_json(f"{server.url}/api/live/{channel}")[0] != 200:
                    if time.monotonic() > deadline or publisher.error:
                        raise RuntimeError(f"never live: {publisher.error}\n{server.log()}")
                    time.sleep(0.2)
                time.sleep(3)
                ingest = get_json(f"{server.url}/api/live/{channel}")[1]
                print(f"stream: 1280x720@30, ingest {ingest.get('bitrate', '?')} b/s "
                      f"(asked {args.bitrate})", flush=True)
                for count in counts:
                    result = measure(server, channel, count, args.clients, args.seconds)
                    results.append(result)
                    print(json.dumps(result), flush=True)
            finally:
                publisher.stop()
        finally:
            server.stop()

    base = next((r["server_cpu"] for r in results if r["viewers"] == 0), 0.0)
    loaded = [r for r in results if r["viewers"] > 0]
    if loaded:
        top = max(loaded, key=lambda r: r["viewers"])
        per_viewer = (top["server_cpu"] - base) / top["viewers"]
        print(f"\nserver CPU with no viewer: {base:.3f} core")
        for r in loaded:
            print(f"{r['viewers']:4d} viewers: server {r['server_cpu']:.3f} core "
                  f"(user {r['server_user']:.3f}, kernel {r['server_system']:.3f}), "
                  f"{(r['server_cpu'] - base) / r['viewers'] * 1000:.1f} ms CPU/s per viewer, "
                  f"{r['mbps_per_viewer']:.2f} Mb/s per viewer, loss {r['loss']:.4%}")
        print(f"=> ~{(1 - base) / per_viewer:.0f} viewers per core at {per_viewer * 1000:.1f} ms/s per "
              f"viewer (from {top['viewers']} viewers; target >= 200)")
    if args.json:
        args.json.write_text(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
