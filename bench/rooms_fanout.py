"""Room fan-out: one room, N WebSocket viewers, M chat messages/s in; delivery latency and cost.

The real server runs as its own process (``tests/support/server.py`` ``ServerProcess``); the
viewers are spread over W load-generator processes (``multiprocessing``), each holding thousands
of aiohttp WebSocket clients; a separate sender process holds a few logged-in senders that send
``--rate`` messages/s in total, each text carrying its send time (``t=<time.time()>``).

Every viewer counts every chat event it receives (loose ones and those inside
``{"type":"batch","events":[...]}`` frames; ``history`` frames are skipped), and computes
``now - t`` for each into a histogram (0.1 ms bins). Note the receive time is taken when the
viewer's event loop reads the frame, so a saturated load generator inflates the latency: its CPU
is reported too. Past ``[chat] sample_rate`` the server sheds chat events by sampling (counted by
``livesrv_chat_shed_total``); expected deliveries are reported both before and after shedding.

Server CPU is from /proc/PID/stat (utime+stime over the send window), RSS from /proc/PID/status.

    .venv/bin/python bench/rooms_fanout.py --viewers 1000 --rate 100 --seconds 20 --workers 2
    .venv/bin/python bench/rooms_fanout.py --viewers 10000 --rate 1000 --seconds 20 --workers 4
    .venv/bin/python bench/rooms_fanout.py ... --redis redis://127.0.0.1:6379/0 --nodes 2
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import re
import resource
import shutil
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.server import ServerProcess

BIN = 1e-4  # histogram bin: 0.1 ms
NBINS = 100_000  # up to 10 s; the last bin collects everything slower
T_RE = re.compile(r"t=(\d+\.\d+)")
CHAT = '"type":"chat"'
CLK_TCK = os.sysconf("SC_CLK_TCK")
#: viewers offer permessage-deflate as browsers do (``--no-deflate``: plain frames)
DEFLATE = os.environ.get("ROOMS_FANOUT_DEFLATE", "1") == "1"


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def proc_cpu(pid: int) -> float:
    """utime + stime of PID, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_mem(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of PID in KiB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])
    return values.get("VmRSS", 0), values.get("VmHWM", 0)


def shed_total(url: str) -> float:
    try:
        with urllib.request.urlopen(url + "/metrics", timeout=60) as response:
            text = response.read().decode()
    except OSError:  # an overloaded server may not answer: the shed count is then unknown
        return float("nan")
    total = 0.0
    for line in text.splitlines():
        if line.startswith("livesrv_chat_shed_total"):
            total += float(line.split()[-1])
    return total


# ---------------------------------------------------------------- viewers (worker processes)

class Tally:
    def __init__(self) -> None:
        self.hist = [0] * (NBINS + 1)
        self.events = 0
        self.timed = 0
        self.frames = 0
        self.max = 0.0

    def frame(self, data: str) -> None:
        self.frames += 1
        if data.startswith('{"type":"history"'):
            return
        n = data.count(CHAT)
        if not n:
            return
        self.events += n
        now = time.time()
        hist = self.hist
        for stamp in T_RE.findall(data):
            latency = now - float(stamp)
            if latency > self.max:
                self.max = latency
            index = int(latency / BIN)
            hist[index if 0 <= index < NBINS else (NBINS if index > 0 else 0)] += 1
            self.timed += 1


async def _viewer(session: aiohttp.ClientSession, url: str, tally: Tally, sem: asyncio.Semaphore,
                  connected: list[int], failed: list[int], closed: list[int],
                  done: asyncio.Event, count: int) -> None:
    try:
        async with sem:
            ws = await session.ws_connect(url, heartbeat=None, autoping=True, max_msg_size=0,
                                          compress=15 if DEFLATE else 0)
        connected[0] += 1
    except Exception:
        failed[0] += 1
        return
    finally:
        if connected[0] + failed[0] >= count:
            done.set()
    try:
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                tally.frame(msg.data)
            elif msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                break
    except Exception:
        pass
    finally:
        closed[0] += 1


async def _viewers_main(wid: int, urls: list[str], count: int, ready: Any, stop: Any,
                        results: Any) -> None:
    tally = Tally()
    connected, failed, closed = [0], [0], [0]
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=None, connect=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        sem = asyncio.Semaphore(100)
        done = asyncio.Event()
        tasks = [asyncio.create_task(_viewer(session, urls[i % len(urls)], tally, sem,
                                             connected, failed, closed, done, count))
                 for i in range(count)]
        await done.wait()
        ready.put((wid, connected[0], failed[0]))
        cpu0 = time.process_time()
        await asyncio.get_running_loop().run_in_executor(None, stop.wait)
        cpu = time.process_time() - cpu0
        dropped = closed[0]  # sockets the server closed during the run (too slow etc.)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    results.put({"wid": wid, "connected": connected[0], "failed": failed[0], "dropped": dropped,
                 "events": tally.events, "timed": tally.timed, "frames": tally.frames,
                 "max": tally.max, "cpu": cpu, "hist": tally.hist})


def viewers_worker(wid: int, urls: list[str], count: int, ready: Any, stop: Any,
                   results: Any) -> None:
    raise_fd_limit()
    asyncio.run(_viewers_main(wid, urls, count, ready, stop, results))


# ---------------------------------------------------------------- senders (one process)

async def _sender(url: str, rate: float, seconds: float, index: int, counts: dict[str, int]) -> None:
    """Send at ``rate`` for ``seconds``; a socket the server closes is reopened (and counted)."""
    interval = 1.0 / rate
    start = time.monotonic() + index * interval / 4  # stagger the senders
    n = 0
    async with aiohttp.ClientSession() as session:
        while start + n * interval - start < seconds:
            try:
                async with session.ws_connect(url, max_msg_size=0) as ws:
                    async def drain(ws: aiohttp.ClientWebSocketResponse = ws) -> None:
                        async for msg in ws:
                            if msg.type == aiohttp.WSMsgType.TEXT and '"type":"error"' in msg.data:
                                counts["errors"] += 1
                                key = "error:" + str(json.loads(msg.data).get("code", "?"))
                                counts[key] = counts.get(key, 0) + 1
                    reader = asyncio.create_task(drain())
                    try:
                        while start + n * interval - start < seconds:
                            delay = start + n * interval - time.monotonic()
                            if delay > 0:
                                await asyncio.sleep(delay)
                            text = f"t={time.time():.6f} s={index} n={n}"
                            await ws.send_str(json.dumps({"type": "chat", "text": text}))
                            counts["sent"] += 1
                            n += 1
                        await asyncio.sleep(1.0)  # let error replies arrive
                    finally:
                        reader.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await reader
            except (aiohttp.ClientError, OSError):
                counts["reconnects"] += 1
                n += 1  # the message that failed is skipped
                await asyncio.sleep(0.05)


def senders_worker(urls: list[str], rate: float, seconds: float, results: Any) -> None:
    raise_fd_limit()
    counts = {"sent": 0, "errors": 0, "reconnects": 0}

    async def main() -> None:
        per = rate / len(urls)
        await asyncio.gather(*(_sender(u, per, seconds, i, counts) for i, u in enumerate(urls)))

    try:
        asyncio.run(main())
    finally:
        results.put(counts)


# ---------------------------------------------------------------- driver

def percentile(hist: list[int], total: int, q: float) -> float:
    if total == 0:
        return float("nan")
    target = q * total
    running = 0
    for index, n in enumerate(hist):
        running += n
        if running >= target:
            return (index + 0.5) * BIN
    return NBINS * BIN


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--viewers", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=100.0, help="chat messages/s in, total")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--workers", type=int, default=2, help="viewer processes")
    parser.add_argument("--senders", type=int, default=4)
    parser.add_argument("--drain", type=float, default=3.0, help="seconds to wait after sending")
    parser.add_argument("--sample-rate", type=float, default=None,
                        help="override [chat] sample_rate (default: the server's, 500/s)")
    parser.add_argument("--keep", action="store_true", help="keep the data dirs and server logs")
    parser.add_argument("--no-deflate", action="store_true",
                        help="viewers do not offer permessage-deflate (browsers do)")
    parser.add_argument("--redis", default=None, help="redis URL (two-node mode)")
    parser.add_argument("--nodes", type=int, default=1)
    args = parser.parse_args()
    if args.nodes > 1 and not args.redis:
        parser.error("--nodes > 1 needs --redis")

    fds = raise_fd_limit()
    os.environ["ROOMS_FANOUT_DEFLATE"] = "0" if args.no_deflate else "1"  # inherited by workers
    tmp = Path(tempfile.mkdtemp(prefix="rooms_fanout_"))
    # senders are not rate limited per user (the bench measures fan-out, not moderation)
    chat = ["[chat]", f"rate = {max(args.rate, 1.0) * 2:.1f}", f"burst = {int(args.rate) + 100}"]
    if args.sample_rate is not None:
        chat.append(f"sample_rate = {args.sample_rate}")
    config = tmp / "bench.toml"
    config.write_text("\n".join(chat) + "\n")
    database = f"sqlite://{tmp / 'shared.db'}" if args.nodes > 1 else None

    servers = [ServerProcess(tmp / f"node{i}", redis=args.redis, config=str(config),
                             database=database, node_id=f"bench-node-{i}" if args.redis else None)
               for i in range(args.nodes)]
    ctx = mp.get_context("forkserver")
    procs: list[mp.process.BaseProcess] = []
    try:
        for server in servers:
            server.start()
        channel = "benchroom"
        servers[0].add_user(channel)
        tokens = [servers[0].add_user(f"sender{i}")["token"] for i in range(args.senders)]
        ws_urls = [s.url.replace("http://", "ws://") + f"/ws/rooms/{channel}" for s in servers]
        pids = [s.proc.pid for s in servers if s.proc is not None]

        ready, results, sres = ctx.Queue(), ctx.Queue(), ctx.Queue()
        stop = ctx.Event()
        per = [args.viewers // args.workers + (1 if i < args.viewers % args.workers else 0)
               for i in range(args.workers)]
        t0 = time.monotonic()
        for wid, count in enumerate(per):
            # worker wid's viewers are spread over the nodes, round robin
            p = ctx.Process(target=viewers_worker, args=(wid, ws_urls, count, ready, stop, results))
            p.start()
            procs.append(p)
        connected = failed = 0
        for _ in per:
            _, c, f = ready.get(timeout=600)
            connected += c
            failed += f
        connect_s = time.monotonic() - t0
        print(f"viewers: {connected} connected, {failed} failed in {connect_s:.1f} s "
              f"(fd limit {fds}); nodes {args.nodes}, workers {args.workers}, "
              f"deflate {'off' if args.no_deflate else 'on'}", flush=True)
        time.sleep(1.0)

        sender_urls = [ws_urls[i % len(ws_urls)] + f"?token={tok}" for i, tok in enumerate(tokens)]
        shed0 = sum(shed_total(s.url) for s in servers)
        cpu0 = [proc_cpu(pid) for pid in pids]
        w0 = time.monotonic()
        sp = ctx.Process(target=senders_worker, args=(sender_urls, args.rate, args.seconds, sres))
        sp.start()
        procs.append(sp)
        counts = sres.get(timeout=args.seconds + 120)
        sp.join()
        wall = time.monotonic() - w0
        cpu1 = [proc_cpu(pid) for pid in pids]
        mems = [proc_mem(pid) for pid in pids]
        time.sleep(args.drain)
        shed = sum(shed_total(s.url) for s in servers) - shed0
        stop.set()

        hist = [0] * (NBINS + 1)
        events = timed = frames = dropped = 0
        worst = 0.0
        wcpu = []
        for _ in per:
            r = results.get(timeout=120)
            events += r["events"]
            timed += r["timed"]
            frames += r["frames"]
            dropped += r["dropped"]
            worst = max(worst, r["max"])
            wcpu.append(r["cpu"])
            for i, n in enumerate(r["hist"]):
                if n:
                    hist[i] += n
        for p in procs:
            p.join(timeout=30)

        sent = counts["sent"]
        accepted = sent - counts["errors"]
        # shed counts per node: each node samples its own delivery of every message
        expected = accepted * connected
        after_shed = expected - shed * (connected / max(len(servers), 1))
        p50, p99 = percentile(hist, timed, 0.50), percentile(hist, timed, 0.99)
        print(f"sent {sent} over {args.seconds:.0f} s ({sent / args.seconds:.0f}/s; window {wall:.1f} s), "
              f"sender reconnects {counts['reconnects']}, errors {counts['errors']} "
              f"{ {k: v for k, v in counts.items() if k.startswith('error:')} }")
        print("| viewers | rate/s | p50 ms | p99 ms | max ms | delivered | expected | after shed "
              "| shed msgs | dropped sockets |")
        print(f"| {connected} | {args.rate:.0f} | {p50 * 1e3:.1f} | {p99 * 1e3:.1f} | "
              f"{worst * 1e3:.1f} | {events} | {expected} | {after_shed:.0f} "
              f"({events / after_shed * 100 if after_shed else 0:.1f}%) | {shed:.0f} | {dropped} |")
        print("| node | server CPU % (1 core = 100) | RSS MiB | peak RSS MiB |")
        for i in range(len(pids)):
            print(f"| {i} | {(cpu1[i] - cpu0[i]) / wall * 100:.0f} | {mems[i][0] / 1024:.0f} "
                  f"| {mems[i][1] / 1024:.0f} |")
        print(f"load generator: {frames} frames; viewer-process CPU per worker over the run "
              f"(s): {', '.join(f'{c:.1f}' for c in wcpu)}")
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(5)
        for server in servers:
            server.stop()
        if args.keep:
            print(f"data dirs and server logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
