"""Room fan-out: one room, N WebSocket viewers, M chat messages/s in; delivery latency and cost.

The real server runs as its own process (``tests/support/server.py`` ``ServerProcess``), or
``--nodes`` of them on one Redis. The viewers are spread over ``--workers`` load-generator
processes (``multiprocessing``); a separate sender process holds ``--senders`` logged-in aiohttp
clients that send ``--rate`` messages/s in total, each text carrying its send time
(``t=<time.time()>``).

Viewers are raw asyncio Protocols (``bench/wsload.py``, uvloop when importable): the upgrade
handshake by hand (no extension offered, so no permessage-deflate), then an ordinary viewer only
counts the bytes it reads, without parsing a frame. It still reads everything, so the kernel
buffer is drained and the server sees a live reader. One viewer in ``--probe-every`` (a probe)
parses its frames, answers pings, and for every chat event (loose, or inside
``{"type":"batch","events":[...]}``; ``history`` frames are skipped) records ``now - t`` into a
histogram (0.1 ms bins), ``now`` being taken when the bytes were read, before any parsing.
Every viewer sends an unsolicited pong every ``--keepalive`` s, so the server's heartbeat has
no reason to ping (and then drop) viewers that do not parse.

Why the probes' latency stands for every viewer's:

- the server goes round a room's sockets in the order the viewers joined, a chunk at a time;
  the probes are spread evenly through that order (every K-th viewer of every worker, and the
  workers connect side by side), so they see the early, middle and late chunks of each round in
  proportion;
- a probe costs the server exactly what any viewer costs (same bytes out, same keepalives in);
  only the reading side differs, and that is the load generator's own cost;
- probes are spread over the workers and over the nodes like the others.

What this does NOT measure:

- the ordinary viewers' latency: their bytes are counted, not their events; a socket whose
  kernel buffer the server filled up would show up as dropped, not as late;
- the load generator's own delay: ``now`` is taken when the worker's event loop gets to the
  read, so a saturated worker still inflates latency (its CPU is reported; keep it well under
  one core per worker);
- browsers: no permessage-deflate is offered (the server does not negotiate it any more), no
  TLS, no JSON parsing or rendering by ordinary viewers;
- the network: everything is on loopback, sharing the machine's cores with the server (on
  loopback the kernel's receive-side TCP work is largely charged to the writer, the server);
- viewers that log in: viewers are anonymous; only the ``--senders`` are logged in (they are
  seated in the room too, as chatting users are, and get their own sampled-out messages back;
  they are not counted as viewers).

Two diagnostics come with the numbers: chat events per frame (about ``rate x batch interval``
after shedding when the room batches; 1.0 means a frame per event) and latency by send second
(a mean that keeps growing is a backlog in the server, not a slow tail).

Past ``[chat] sample_rate`` each node sheds chat events by sampling (counted by
``livesrv_chat_shed_total`` per node, per message): the events a probe should get are the
accepted messages minus its node's shed count, and that is what delivered events are compared
with. Server CPU is from /proc/PID/stat (utime+stime over the send window), RSS from
/proc/PID/status; worker CPU and bytes read are over the window from the first message sent to
the end of the drain.

    .venv/bin/python bench/rooms_fanout.py --viewers 1000 --rate 100 --seconds 10 --workers 2
    .venv/bin/python bench/rooms_fanout.py --viewers 10000 --rate 1000 --seconds 20 --workers 3
    .venv/bin/python bench/rooms_fanout.py ... --redis redis://127.0.0.1:6379/0 --nodes 2
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import multiprocessing as mp
import queue as queue_module
import re
import resource
import shutil
import statistics
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from wsload import HandshakeError, Probe, Viewer, keepalive_frame

from tests.support.procfs import cpu_seconds
from tests.support.server import ServerProcess

BIN = 1e-4  # histogram bin: 0.1 ms
NBINS = 600_000  # up to 60 s (a sparse dict); the last bin collects everything slower
T_RE = re.compile(rb"t=(\d+\.\d+)")
CHAT = b'"type":"chat"'
HISTORY = b'{"type":"history"'
CONNECT_TIMEOUT = 60.0  # per viewer: TCP connect, then the upgrade


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def run_loop(main: Any) -> None:
    """``asyncio.run`` on uvloop when it is there (it is a dependency of the server)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - plain asyncio still works, only slower
        asyncio.run(main)
    else:
        uvloop.run(main)


def proc_mem(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of PID in KiB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])
    return values.get("VmRSS", 0), values.get("VmHWM", 0)


def metric_totals(url: str, *names: str) -> tuple[float, ...]:
    """The sum of each metric's samples on a node, from one scrape (NaN if the node does not
    answer)."""
    try:
        with urllib.request.urlopen(url + "/metrics", timeout=60) as response:
            text = response.read().decode()
    except OSError:  # an overloaded server may not answer: the count is then unknown
        return tuple(float("nan") for _ in names)
    totals = dict.fromkeys(names, 0.0)
    for line in text.splitlines():
        for name in names:
            if line.startswith(name + " ") or line.startswith(name + "{"):
                totals[name] += float(line.split()[-1])
    return tuple(totals.values())


def metric_total(url: str, name: str) -> float:
    """The sum of a metric's samples on a node (NaN if the node does not answer)."""
    return metric_totals(url, name)[0]


def shed_total(url: str) -> float:
    return metric_total(url, "livesrv_chat_shed_total")


def bus_lag(url: str) -> tuple[float, float, float]:
    """(messages received from other nodes, their summed lag, those later than 100 ms) so far."""
    count, total, on_time = metric_totals(url, "livesrv_bus_lag_seconds_count",
                                          "livesrv_bus_lag_seconds_sum",
                                          'livesrv_bus_lag_seconds_bucket{le="0.1"}')
    return count, total, count - on_time


def flush_totals(url: str) -> tuple[float, float]:
    """(flushes, seconds spent writing them) of a node's rooms so far."""
    count, seconds = metric_totals(url, "livesrv_chat_flush_seconds_count",
                                   "livesrv_chat_flush_seconds_sum")
    return count, seconds


# ---------------------------------------------------------------- viewers (worker processes)

class Tally:
    """A worker's probes: one latency histogram, and the chat events each probe got."""

    def __init__(self) -> None:
        self.hist: dict[int, int] = {}
        self.timed = 0
        self.frames = 0
        self.max = 0.0
        #: send second (epoch) -> [events, latency sum, latency max]: does a backlog build up?
        self.by_second: dict[int, list[float]] = {}

    def on_text(self, events: list[int]) -> Callable[[bytes, float], None]:
        """The callback of one probe; it counts that probe's chat events in ``events[0]``."""
        hist, by_second = self.hist, self.by_second

        def frame(payload: bytes, now: float) -> None:
            self.frames += 1
            if payload.startswith(HISTORY):
                return
            n = payload.count(CHAT)
            if not n:
                return
            events[0] += n
            for stamp in T_RE.findall(payload):
                sent = float(stamp)
                latency = now - sent
                if latency > self.max:
                    self.max = latency
                index = min(max(int(latency / BIN), 0), NBINS)
                hist[index] = hist.get(index, 0) + 1
                self.timed += 1
                row = by_second.get(int(sent))
                if row is None:
                    by_second[int(sent)] = [1, latency, latency]
                else:
                    row[0] += 1
                    row[1] += latency
                    if latency > row[2]:
                        row[2] = latency

        return frame


async def keep_alive(viewers: list[Viewer], interval: float) -> None:
    """Each viewer sends an unsolicited pong about every ``interval`` s, spread over time."""
    step = 0.25
    cursor = 0
    while True:
        await asyncio.sleep(step)
        count = len(viewers)  # grows while the viewers connect
        for _ in range(min(count, math.ceil(count * step / interval))):
            if cursor >= count:
                cursor = 0
            viewers[cursor].send(keepalive_frame())
            cursor += 1


async def _viewers_main(wid: int, targets: list[tuple[str, int, str]], count: int,
                        options: dict[str, Any], ready: Any, go: Any, stop: Any,
                        results: Any) -> None:
    loop = asyncio.get_running_loop()
    every = options["probe_every"]
    # probe or not, and the node, for each of this worker's viewers in join order: probes are
    # every K-th viewer; probes and the others each go round robin over the nodes
    plan: list[tuple[bool, int]] = []
    counters = [0, 0]
    for index in range(count):
        probe = every > 0 and index % every == every // 2
        plan.append((probe, counters[probe] % len(targets)))
        counters[probe] += 1

    tally = Tally()
    viewers: list[Viewer] = []
    probes: list[tuple[int, list[int], Probe]] = []  # (node, [events], probe)
    failures: dict[str, int] = {}
    indexes = iter(range(count))

    async def connect_some() -> None:
        for index in indexes:
            probe, node = plan[index]
            host, port, path = targets[node]
            events = [0]

            def factory(probe: bool = probe, path: str = path, events: list[int] = events,
                        host_header: str = f"{host}:{port}") -> Viewer:
                if probe:
                    return Probe(host_header, path, tally.on_text(events))
                return Viewer(host_header, path)

            transport: asyncio.BaseTransport | None = None
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT):
                    transport, viewer = await loop.create_connection(factory, host, port)
                    await viewer.opened
            except (OSError, TimeoutError, HandshakeError) as exc:
                reason = type(exc).__name__
                failures[reason] = failures.get(reason, 0) + 1
                if transport is not None:
                    transport.abort()
                continue
            viewers.append(viewer)
            if isinstance(viewer, Probe):
                probes.append((node, events, viewer))

    keeper = (asyncio.create_task(keep_alive(viewers, options["keepalive"]))
              if options["keepalive"] > 0 else None)
    await asyncio.gather(*(connect_some() for _ in range(options["concurrency"])))
    ready.put((wid, len(viewers), failures, len(probes)))

    await loop.run_in_executor(None, go.wait)
    cpu0, bytes0 = time.process_time(), sum(v.received for v in viewers)
    await loop.run_in_executor(None, stop.wait)
    cpu = time.process_time() - cpu0
    received = sum(v.received for v in viewers) - bytes0
    # sockets the server ended during the run (too slow, heartbeat, ...), before we close ours
    dropped = sum(v.lost for v in viewers)
    probe_closes = sum(p.server_closed for _, _, p in probes)
    frame_errors = [p.error for _, _, p in probes if p.error]
    if keeper is not None:
        keeper.cancel()
    for viewer in viewers:
        if viewer.transport is not None:
            viewer.transport.abort()
    results.put({"wid": wid, "connected": len(viewers), "dropped": dropped,
                 "probe_closes": probe_closes, "frame_errors": frame_errors[:5],
                 "probe_events": [(node, events[0]) for node, events, _ in probes],
                 "timed": tally.timed, "frames": tally.frames, "max": tally.max, "cpu": cpu,
                 "received": received, "hist": tally.hist, "by_second": tally.by_second})


def viewers_worker(wid: int, targets: list[tuple[str, int, str]], count: int,
                   options: dict[str, Any], ready: Any, go: Any, stop: Any,
                   results: Any) -> None:
    raise_fd_limit()
    run_loop(_viewers_main(wid, targets, count, options, ready, go, stop, results))


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
        run_loop(main())
    finally:
        results.put(counts)


# ---------------------------------------------------------------- driver

def percentile(hist: dict[int, int], total: int, q: float) -> float:
    if total == 0:
        return float("nan")
    target = q * total
    running = 0
    for index in sorted(hist):
        running += hist[index]
        if running >= target:
            return (index + 0.5) * BIN
    return NBINS * BIN


def collect(queue: Any, procs: list[mp.process.BaseProcess], timeout: float) -> Any:
    """The next item of ``queue``; fails early if a worker died instead of waiting it out."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return queue.get(timeout=1.0)
        except queue_module.Empty:
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(f"a load-generator process died (exit codes {dead})") from None
            if time.monotonic() > deadline:
                raise


def target_of(ws_url: str) -> tuple[str, int, str]:
    parts = urllib.parse.urlsplit(ws_url)
    assert parts.hostname is not None and parts.port is not None
    return parts.hostname, parts.port, parts.path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--viewers", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=100.0, help="chat messages/s in, total")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--workers", type=int, default=2, help="viewer processes")
    parser.add_argument("--senders", type=int, default=4)
    parser.add_argument("--probe-every", type=int, default=20,
                        help="every K-th viewer parses its frames and measures latency")
    parser.add_argument("--keepalive", type=float, default=20.0,
                        help="seconds between a viewer's unsolicited pongs (0: none)")
    parser.add_argument("--concurrency", type=int, default=50,
                        help="connections each worker opens at a time")
    parser.add_argument("--drain", type=float, default=3.0, help="seconds to wait after sending")
    parser.add_argument("--sample-rate", type=float, default=None,
                        help="override [chat] sample_rate (default: the server's)")
    parser.add_argument("--chat", action="append", default=[], metavar="KEY=VALUE",
                        help="another [chat] setting for the servers (TOML value), repeatable")
    parser.add_argument("--keep", action="store_true", help="keep the data dirs and server logs")
    parser.add_argument("--redis", default=None, help="redis URL (two-node mode)")
    parser.add_argument("--nodes", type=int, default=1)
    args = parser.parse_args()
    if args.nodes > 1 and not args.redis:
        parser.error("--nodes > 1 needs --redis")
    if args.probe_every < 1:
        parser.error("--probe-every must be >= 1")

    fds = raise_fd_limit()  # inherited by the servers and the workers
    if fds < args.viewers / args.nodes + 1000:
        print(f"warning: fd limit {fds} is too low for {args.viewers} viewers on {args.nodes} "
              "node(s): connections will fail", file=sys.stderr)
    tmp = Path(tempfile.mkdtemp(prefix="rooms_fanout_"))
    # senders are not rate limited per user (the bench measures fan-out, not moderation)
    chat = ["[chat]", f"rate = {max(args.rate, 1.0) * 2:.1f}", f"burst = {int(args.rate) + 100}"]
    if args.sample_rate is not None:
        chat.append(f"sample_rate = {args.sample_rate}")
    chat += [setting.replace("=", " = ", 1) for setting in args.chat]
    config = tmp / "bench.toml"
    config.write_text("\n".join(chat) + "\n")
    database = f"sqlite://{tmp / 'shared.db'}" if args.nodes > 1 else None

    servers = [ServerProcess(tmp / f"node{i}", redis=args.redis, config=str(config),
                             database=database, node_id=f"bench-node-{i}" if args.redis else None)
               for i in range(args.nodes)]
    ctx = mp.get_context("forkserver")
    procs: list[mp.process.BaseProcess] = []
    stop = ctx.Event()
    try:
        for server in servers:
            server.start()
        channel = "benchroom"
        servers[0].add_user(channel)
        tokens = [servers[0].add_user(f"sender{i}")["token"] for i in range(args.senders)]
        ws_urls = [s.url.replace("http://", "ws://") + f"/ws/rooms/{channel}" for s in servers]
        targets = [target_of(u) for u in ws_urls]
        pids = [s.proc.pid for s in servers if s.proc is not None]

        ready, results, sres = ctx.Queue(), ctx.Queue(), ctx.Queue()
        go = ctx.Event()
        options = {"probe_every": args.probe_every, "keepalive": args.keepalive,
                   "concurrency": args.concurrency}
        per = [args.viewers // args.workers + (1 if i < args.viewers % args.workers else 0)
               for i in range(args.workers)]
        t0 = time.monotonic()
        for wid, count in enumerate(per):
            p = ctx.Process(target=viewers_worker,
                            args=(wid, targets, count, options, ready, go, stop, results))
            p.start()
            procs.append(p)
        connected = nprobes = 0
        failures: dict[str, int] = {}
        for _ in per:
            _, c, f, n = collect(ready, procs, timeout=900)
            connected += c
            nprobes += n
            for reason, k in f.items():
                failures[reason] = failures.get(reason, 0) + k
        connect_s = time.monotonic() - t0
        print(f"viewers: {connected} connected, {sum(failures.values())} failed"
              f"{' ' + str(failures) if failures else ''} in {connect_s:.1f} s; "
              f"{nprobes} probes (every {args.probe_every}th); "
              f"fd limit {fds}; nodes {args.nodes}, workers {args.workers}", flush=True)
        time.sleep(1.0)

        sender_urls = [ws_urls[i % len(ws_urls)] + f"?token={tok}" for i, tok in enumerate(tokens)]
        shed0 = [shed_total(s.url) for s in servers]
        flush0 = [flush_totals(s.url) for s in servers]
        lag0 = [bus_lag(s.url) for s in servers]
        cpu0 = [cpu_seconds(pid) for pid in pids]
        w0 = time.monotonic()
        go.set()
        sp = ctx.Process(target=senders_worker, args=(sender_urls, args.rate, args.seconds, sres))
        sp.start()
        procs.append(sp)
        counts = sres.get(timeout=args.seconds + 120)
        sp.join()
        wall = time.monotonic() - w0
        cpu1 = [cpu_seconds(pid) for pid in pids]
        mems = [proc_mem(pid) for pid in pids]
        time.sleep(args.drain)
        window = time.monotonic() - w0
        stop.set()
        shed = [shed_total(s.url) - before for s, before in zip(servers, shed0, strict=True)]
        flushes = [(n1 - n0, t1 - t0) for (n0, t0), (n1, t1)
                   in zip(flush0, (flush_totals(s.url) for s in servers), strict=True)]
        lags = [tuple(b - a for a, b in zip(before, bus_lag(s.url), strict=True))
                for s, before in zip(servers, lag0, strict=True)]

        hist: dict[int, int] = {}
        timed = frames = dropped = probe_closes = received = 0
        worst = 0.0
        wcpu: list[float] = []
        probe_events: list[tuple[int, int]] = []
        frame_errors: list[str] = []
        by_second: dict[int, list[float]] = {}
        for _ in per:
            r = collect(results, procs, timeout=120)
            timed += r["timed"]
            frames += r["frames"]
            dropped += r["dropped"]
            probe_closes += r["probe_closes"]
            received += r["received"]
            frame_errors += r["frame_errors"]
            worst = max(worst, r["max"])
            wcpu.append(r["cpu"])
            probe_events += r["probe_events"]
            for index, n in r["hist"].items():
                hist[index] = hist.get(index, 0) + n
            for second, (n, total, top) in r["by_second"].items():
                row = by_second.setdefault(second, [0, 0.0, 0.0])
                row[0] += n
                row[1] += total
                row[2] = max(row[2], top)
        for p in procs:
            p.join(timeout=30)

        sent = counts["sent"]
        accepted = sent - counts["errors"]
        print(f"sent {sent} over {args.seconds:.0f} s ({sent / args.seconds:.0f}/s; send window "
              f"{wall:.1f} s), sender reconnects {counts['reconnects']}, errors {counts['errors']} "
              f"{ {k: v for k, v in counts.items() if k.startswith('error:')} }")
        p50, p99 = percentile(hist, timed, 0.50), percentile(hist, timed, 0.99)
        print("| viewers | rate/s | probes | p50 ms | p99 ms | max ms | timed events "
              "| dropped sockets (probes closed by server) |")
        print("|---|---|---|---|---|---|---|---|")
        print(f"| {connected} | {args.rate:.0f} | {nprobes} | {p50 * 1e3:.1f} | {p99 * 1e3:.1f} | "
              f"{worst * 1e3:.1f} | {timed} | {dropped} ({probe_closes}) |")
        print("| node | shed msgs | expected/probe (accepted - shed) | delivered/probe "
              "mean (min..max) | % |")
        print("|---|---|---|---|---|")
        for node in range(len(servers)):
            got = [n for i, n in probe_events if i == node]
            expected = accepted - shed[node]
            if got:
                mean = statistics.fmean(got)
                pct = f"{mean / expected * 100:.1f}" if expected > 0 else "-"
                print(f"| {node} | {shed[node]:.0f} | {expected:.0f} | {mean:.1f} "
                      f"({min(got)}..{max(got)}) | {pct} |")
            else:
                print(f"| {node} | {shed[node]:.0f} | {expected:.0f} | no probes | - |")
        if frame_errors:
            print(f"probe frame errors: {frame_errors}")
        print("| node | server CPU % (1 core = 100) | RSS MiB | peak RSS MiB | room frames/s "
              "| ms per frame to all sockets |")
        print("|---|---|---|---|---|---|")
        for i in range(len(pids)):
            count, seconds = flushes[i]
            per = f"{seconds / count * 1e3:.1f}" if count else "-"
            print(f"| {i} | {(cpu1[i] - cpu0[i]) / wall * 100:.0f} | {mems[i][0] / 1024:.0f} "
                  f"| {mems[i][1] / 1024:.0f} | {count / window:.1f} | {per} |")
        if args.nodes > 1:
            print("bus lag (messages from the other nodes), per node: " + ", ".join(
                f"{i}: {n:.0f} msgs, mean {total / n * 1e3:.1f} ms, {late:.0f} over 100 ms"
                if n else f"{i}: none" for i, (n, total, late) in enumerate(lags)))
        if by_second:  # at most ~20 columns: a growing mean means a backlog
            first = min(by_second)
            width = max(1, math.ceil((max(by_second) - first + 1) / 20))
            spans: dict[int, list[float]] = {}
            for second, (n, total, top) in by_second.items():
                span = spans.setdefault((second - first) // width * width, [0, 0.0, 0.0])
                span[0] += n
                span[1] += total
                span[2] = max(span[2], top)
            print(f"latency by send second (from the first; {width} s per column), mean/max ms: "
                  + ", ".join(f"{start}: {total / n * 1e3:.0f}/{top * 1e3:.0f}"
                              for start, (n, total, top) in sorted(spans.items())))
        per_viewer = received / max(connected, 1) / window
        print(f"load generator over {window:.1f} s (send + drain): CPU % per worker "
              f"{', '.join(f'{c / window * 100:.0f}' for c in wcpu)}; "
              f"{per_viewer:.0f} bytes/s read per viewer; "
              f"{frames / max(nprobes, 1) / window:.1f} frames/s per probe, "
              f"{timed / max(frames, 1):.1f} chat events per frame")
    finally:
        stop.set()  # workers still waiting let go of their sockets
        for p in procs:
            p.join(timeout=10)
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
