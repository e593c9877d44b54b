"""Gifts per second to ONE anchor through the ledger's own API (``gifts.ledger.Ledger.post``).

Each gift is one posting of two legs (viewer wallet → the anchor's earnings, viewer wallet →
platform) from one of ``--viewers`` wallets funded beforehand, all to the same anchor, and
every post is awaited: a post counts once its batch has committed.

Load: closed loop by default (``--concurrency`` tasks, each posting again as soon as answered),
or open loop with ``--rate`` (gifts started per second whatever the answers do, at most
``--concurrency`` in flight). ``--processes N`` runs N processes, each with its own Ledger on the
same database (the several-nodes case; rate and concurrency are split between them).

Reported: posts/s over the measured window, latency of ``post()`` (p50/p99/max), batch sizes
(``livesrv_ledger_batch_size``), the CPU used by the bench processes (event loop and SQLite
thread together) and by their ledgers' writer processes, and the machine's load average (the 2
cores are shared), then an audit of the books (the anchor's and platform's balances must equal
the sum of what was sent).

    .venv/bin/python bench/ledger_transfers.py                                   # SQLite, temp dir
    .venv/bin/python bench/ledger_transfers.py --database postgresql://postgres@127.0.0.1:5432/test
    .venv/bin/python bench/ledger_transfers.py --rate 3000        # open loop: latency at a given load
    .venv/bin/python bench/ledger_transfers.py --processes 2      # two Ledgers (nodes), one anchor
    .venv/bin/python bench/ledger_transfers.py --writer thread    # batches written in this process
"""

from __future__ import annotations

import argparse
import asyncio
import math
import multiprocessing as mp
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prometheus_client import REGISTRY

from gifts.ledger import MAX_BATCH, PLATFORM, WRITERS, Ledger, Leg, clearing, earnings, wallet
from livesrv import gc_policy
from livesrv.db import open_database
from tests.support.procfs import cpu_seconds

ANCHOR = 1


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values), max(1, math.ceil(q / 100 * len(sorted_values)))) - 1]


def batch_histogram() -> dict[float, float]:
    """Cumulative counts by upper bound of ``livesrv_ledger_batch_size`` (this process)."""
    buckets: dict[float, float] = {}
    for metric in REGISTRY.collect():
        if metric.name == "livesrv_ledger_batch_size":
            for sample in metric.samples:
                if sample.name.endswith("_bucket"):
                    buckets[float(sample.labels["le"])] = sample.value
    return buckets


def bucket_quantile(window: dict[float, float], q: float) -> float:
    """The upper bound of the bucket holding the q-th percentile batch."""
    bounds = sorted(window)
    for bound in bounds:
        if window[bound] >= q / 100 * window[bounds[-1]]:
            return bound
    return math.inf


def writer_cpu_seconds(ledger: Ledger) -> float:
    """CPU time the ledger's writer process has used (0 without one)."""
    return 0.0 if ledger.writer_pid is None else cpu_seconds(ledger.writer_pid)


def run_loop(coroutine: Any) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


async def fund(url: str, viewers: int) -> None:
    db = await open_database(url)
    ledger = await Ledger.open(db)
    try:
        await asyncio.gather(*(ledger.post([Leg(clearing("bench"), wallet(v), 10**9)], key=f"fund{v}",
                                           kind="recharge") for v in range(viewers)))
    finally:
        await ledger.close()
        await db.close()


async def load(url: str, args: argparse.Namespace, worker: int) -> dict[str, Any]:
    """One process's share of the load; what it measured."""
    if args.gc == "server":
        gc_policy.apply()  # the collector settings of `livesrv serve`, where the ledger runs
    db = await open_database(url)
    ledger = await Ledger.open(db, max_batch=args.max_batch, writer=args.writer)
    concurrency = max(1, args.concurrency // args.processes)
    rate = args.rate / args.processes
    sent = [0]
    latencies: list[float] = []
    measuring = [False]
    stop = [False]
    # the load generator's own work is kept small: gifts made up front, walked through
    rng = random.Random(worker)
    gifts = []
    for _ in range(4096):
        viewer, coins = rng.randrange(args.viewers), rng.randrange(5, 100)
        gifts.append((coins, (Leg(wallet(viewer), earnings(ANCHOR), coins - coins // 5),
                              Leg(wallet(viewer), PLATFORM, coins // 5))))

    async def one_gift(key: str, n: int) -> None:
        coins, legs = gifts[n % len(gifts)]
        started = time.perf_counter()
        await ledger.post(legs, key=key, kind="gift")
        if measuring[0]:
            latencies.append(time.perf_counter() - started)
        sent[0] += coins

    async def sender(task: int) -> None:
        i = 0
        while not stop[0]:
            await one_gift(f"gift-{worker}-{task}-{i}", task * 7919 + i)
            i += 1

    async def pacer() -> None:
        """Open loop: past ``concurrency`` in flight the pacer falls behind, which shows."""
        in_flight: set[asyncio.Task[None]] = set()
        n, begun = 0, time.perf_counter()
        while not stop[0]:
            due = int((time.perf_counter() - begun) * rate)
            while n < due and len(in_flight) < concurrency:
                task = asyncio.create_task(one_gift(f"open-{worker}-{n}", n))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
                n += 1
            await asyncio.sleep(0.001)
        await asyncio.gather(*in_flight)

    try:
        tasks = [asyncio.create_task(pacer())] if rate else [
            asyncio.create_task(sender(t)) for t in range(concurrency)]
        await asyncio.sleep(args.warmup)
        histogram_before = batch_histogram()
        measuring[0] = True
        cpu_before = os.times()
        writer_before = writer_cpu_seconds(ledger)
        started = time.perf_counter()
        await asyncio.sleep(args.seconds)
        measuring[0] = False
        elapsed = time.perf_counter() - started
        cpu_after = os.times()
        writer_cpu = writer_cpu_seconds(ledger) - writer_before
        histogram_after = batch_histogram()
        stop[0] = True
        await asyncio.gather(*tasks)
    finally:
        await ledger.close()
        await db.close()
    return {
        "latencies": latencies, "elapsed": elapsed, "sent": sent[0],
        "cpu": cpu_after.user - cpu_before.user + cpu_after.system - cpu_before.system,
        "writer_cpu": writer_cpu,
        "batches": {bound: count - histogram_before.get(bound, 0)
                    for bound, count in histogram_after.items()},
    }


def load_process(url: str, args: argparse.Namespace, worker: int, results: Any) -> None:
    results.put(run_loop(load(url, args, worker)))


async def audit(url: str) -> tuple[Any, int]:
    db = await open_database(url)
    ledger = await Ledger.open(db)
    try:
        return await ledger.audit(), await ledger.balance(earnings(ANCHOR)) + await ledger.balance(PLATFORM)
    finally:
        await ledger.close()
        await db.close()


async def drop_schema(url: str, schema: str) -> None:
    db = await open_database(url)
    try:
        await db.execute(f'DROP SCHEMA "{schema}" CASCADE')
    finally:
        await db.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database", help="postgresql://… (a private schema is made and dropped);"
                        " default: SQLite in a temp dir")
    parser.add_argument("--concurrency", type=int, default=2000,
                        help="concurrent sending tasks (with --rate: the most posts in flight)")
    parser.add_argument("--rate", type=float, default=0,
                        help="open loop: gifts started per second (default: closed loop)")
    parser.add_argument("--processes", type=int, default=1, help="processes, each with its own Ledger")
    parser.add_argument("--viewers", type=int, default=10_000, help="distinct sending wallets")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured window")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--max-batch", type=int, default=MAX_BATCH,
                        help="the most posts a batch takes (default: the Ledger's)")
    parser.add_argument("--writer", choices=WRITERS, default="process",
                        help="where batches are written (gifts.ledger.Ledger's writer setting)")
    parser.add_argument("--gc", choices=("server", "default"), default="server",
                        help="the server's garbage-collector settings (livesrv/gc_policy.py) or "
                        "CPython's defaults")
    args = parser.parse_args()

    scratch = schema = None
    url = args.database
    if url is None:
        scratch = tempfile.mkdtemp(prefix="ledger-bench-")
        url = f"sqlite:///{scratch}/ledger.db"
    elif url.startswith("postgres"):
        schema = f"bench_ledger_{os.getpid()}"
        url = f"{url}{'&' if '?' in url else '?'}schema={schema}"
    try:
        run_loop(fund(url, args.viewers))
        if args.processes == 1:
            results = [run_loop(load(url, args, 0))]
        else:
            context = mp.get_context("spawn")
            queue = context.Queue()
            workers = [context.Process(target=load_process, args=(url, args, n, queue))
                       for n in range(args.processes)]
            for worker in workers:
                worker.start()
            results = [queue.get() for _ in workers]
            for worker in workers:
                worker.join()
        books, anchor_and_platform = run_loop(audit(url))

        latencies = sorted(x for r in results for x in r["latencies"])
        posts_per_second = sum(len(r["latencies"]) / r["elapsed"] for r in results)
        cpu = sum(r["cpu"] / r["elapsed"] for r in results)
        writer_cpu = sum(r["writer_cpu"] / r["elapsed"] for r in results)
        window = {bound: sum(r["batches"].get(bound, 0) for r in results) for bound in results[0]["batches"]}
        batches = max(window[math.inf], 1)
        sent = sum(r["sent"] for r in results)
        load_kind = (f"open loop at {args.rate:,.0f}/s (at most {args.concurrency} in flight)" if args.rate
                     else f"closed loop, {args.concurrency} tasks")
        print(f"database            {'postgresql, schema ' + schema if schema else 'sqlite, temp file'}")
        print(f"load                {load_kind}, {args.processes} process(es), {args.viewers} wallets,"
              f" 1 anchor, max_batch {args.max_batch}, writer {args.writer}")
        print(f"posts/s             {posts_per_second:,.0f}  ({len(latencies)} posts in {args.seconds:.0f} s"
              " measured)")
        print(f"post() latency      p50 {percentile(latencies, 50) * 1e3:.1f} ms, "
              f"p99 {percentile(latencies, 99) * 1e3:.1f} ms, max {latencies[-1] * 1e3:.1f} ms")
        print(f"batches             {batches:.0f}, mean {len(latencies) / batches:.0f} posts, "
              f"p50 <= {bucket_quantile(window, 50):.0f}, p99 <= {bucket_quantile(window, 99):.0f}")
        print(f"bench CPU           {cpu * 100:.0f} % of one core in the bench's process(es) (event loop,"
              f" SQLite thread), {writer_cpu * 100:.0f} % in writer process(es):"
              f" {posts_per_second / max(cpu + writer_cpu, 1e-9):,.0f} posts per CPU-second")
        print(f"load average        {os.getloadavg()[0]:.2f} (other processes share the machine)")
        print(f"audit               ok={books.ok} postings={books.postings} "
              f"anchor+platform={anchor_and_platform} sent={sent}")
        if not books.ok or anchor_and_platform != sent:
            raise SystemExit("the books do not add up")
    finally:
        if schema:
            run_loop(drop_schema(url, schema))
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
