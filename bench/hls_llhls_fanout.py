"""LL-HLS blocking-reload fan-out: N players hold ``?_HLS_msn=M&_HLS_part=P`` on one playlist; how
long from the part being produced until every one of them has its playlist, and what it costs.

The real app (``create_app``) serves on a free port; the players are one aiohttp client session
in the same process (so the figures include the client's own work: an upper bound for the
server's). Each round: N requests are held, the packets that complete the next part are pushed,
and the round ends when all N responses are read.

    .venv/bin/python bench/hls_llhls_fanout.py [PLAYERS] [ROUNDS]
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from livesrv.app import create_app
from livesrv.config import Settings
from livesrv.http.hls import HELD, HLS
from livesrv.keys import HUB
from tests.support.media import make_clip

PLAYERS = int(sys.argv[1]) if len(sys.argv) > 1 else 500
ROUNDS = int(sys.argv[2]) if len(sys.argv) > 2 else 8


async def main() -> None:
    settings = Settings(data_dir=Path(tempfile.mkdtemp()), http="127.0.0.1:0", rtmp="127.0.0.1:0",
                        tables={"hls": {"max_blocking_requests": PLAYERS + 10}})
    app = create_app(settings, rtmp=False)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    clip = make_clip(seconds=12, gop_seconds=2)
    stream = app[HUB].start("bench", clip.info, source="rtmp")
    packets = list(clip.packets)
    position = 0
    while True:  # ~2.5 s of media: the first segment exists
        stream.push(packets[position])
        position += 1
        if packets[position].dts > 2500:
            break
    await asyncio.sleep(0.05)
    playlist = app[HLS].channel("bench").renditions["source"].playlist
    url = f"http://127.0.0.1:{port}/live/bench/source/index.m3u8"
    connector = aiohttp.TCPConnector(limit=0)
    delays, cpus = [], []
    async with aiohttp.ClientSession(connector=connector) as session:

        async def fetch(query: str) -> int:
            async with session.get(f"{url}?{query}") as response:
                await response.read()
                return response.status

        # open the connections once (a player keeps its connection alive)
        await asyncio.gather(*(fetch("") for _ in range(PLAYERS)))
        for _ in range(ROUNDS):
            msn, part = playlist.last_part
            query = f"_HLS_msn={msn}&_HLS_part={part + 1}"
            held = asyncio.gather(*(fetch(query) for _ in range(PLAYERS)))
            while app[HELD].count < PLAYERS:  # noqa: ASYNC110 - a bench polling the server's count
                await asyncio.sleep(0.01)
            cpu, started = time.process_time(), time.perf_counter()
            while not playlist.has_reached(msn, part + 1):
                stream.push(packets[position])
                position += 1
                await asyncio.sleep(0)  # the packager's turn
            statuses = await held
            delays.append(time.perf_counter() - started)
            cpus.append(time.process_time() - cpu)
            assert statuses == [200] * PLAYERS, set(statuses)
    await runner.cleanup()
    print(f"{PLAYERS} held reloads per part, {ROUNDS} parts: all answered in median "
          f"{statistics.median(delays) * 1000:.1f} ms (max {max(delays) * 1000:.1f} ms) after the part; "
          f"CPU {statistics.median(cpus) / PLAYERS * 1e6:.0f} us per answered request "
          f"(server + client in one process)")


asyncio.run(main())
