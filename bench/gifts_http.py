"""Gifts per second to ONE anchor through ``POST /api/rooms/CHANNEL/gifts`` (issue 5).

The real server runs as its own process (``tests/support/server.py`` ``ServerProcess``) on
SQLite (embedded default) or PostgreSQL (``--database``), with the sandbox payment provider.
``--users`` viewers are registered over HTTP and each recharged with plenty of coins; then
``--workers`` load-generator processes (``multiprocessing``) each hold ``--connections``
keep-alive HTTP/1.1 connections and send gifts closed-loop (a connection sends its next gift
when the previous answer arrived) for ``--seconds``, after ``--warmup`` seconds not counted.
Every request is a new gift with its own idempotency key, from one of the viewers, to the same
anchor: the hot-row case the ledger's batched writer is built for.

The load generator is a raw asyncio client (request bytes prepared once, only the key changes;
uvloop when importable) so that its own CPU, on the same cores as the server, stays small.
Latency is from just before the request is written to when its whole answer was read, so a
saturated load generator inflates it (its CPU is reported).

Afterwards the store is opened directly and checked: the anchor's earnings plus the platform's
share equal the coins of every gift answered 200, and the ledger's audit is clean.

    .venv/bin/python bench/gifts_http.py --seconds 10
    .venv/bin/python bench/gifts_http.py --database postgresql://postgres@127.0.0.1:5432/test
    .venv/bin/python bench/gifts_http.py --writer thread    # the ledger writes in the server's process

On PostgreSQL each run works in a schema of its own (``gifts_bench_PID``, replacing any
``schema=`` in the URL), dropped afterwards: the users and books of one run never meet the next.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.procfs import children, cpu_seconds  # noqa: E402
from tests.support.server import ServerProcess, post_json  # noqa: E402

GIFT = "rose"  # 1 coin: all of it goes to the anchor (the platform's share rounds down to 0)
GIFT_BIG = "lollipop"  # 10 coins: 7 to the anchor, 3 to the platform


async def _connection(host: str, port: int, channel: str, token: str, name: str, gift: str,
                      start: float, stop: float, latencies: list[float], counts: dict[str, int]) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    head = (f"POST /api/rooms/{channel}/gifts HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n")
    seq = 0
    try:
        while True:
            now = time.time()
            if now >= stop:
                return
            seq += 1
            body = json.dumps({"gift": gift, "count": 1, "idempotency_key": f"{name}-{seq}"}).encode()
            request = f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body
            sent = time.perf_counter()
            writer.write(request)
            header = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in header.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            answer = await reader.readexactly(length)
            elapsed = time.perf_counter() - sent
            status = header[9:12].decode()
            if now >= start:
                latencies.append(elapsed)
                counts[status] = counts.get(status, 0) + 1
            if status == "200":
                counts["coins"] = counts.get("coins", 0) + (1 if gift == GIFT else 10)
                counts["all_ok"] = counts.get("all_ok", 0) + 1
            elif status != "200" and counts.get("errors_shown", 0) < 3:
                counts["errors_shown"] = counts.get("errors_shown", 0) + 1
                print(f"  {status}: {answer[:200]!r}", file=sys.stderr)
    finally:
        writer.close()


def worker(index: int, host: str, port: int, channel: str, tokens: list[tuple[str, str]],
           connections: int, gift: str, start: float, stop: float, out: Any) -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    latencies: list[float] = []
    counts: dict[str, int] = {}
    cpu0 = time.process_time()

    async def main() -> None:
        await asyncio.gather(*(
            _connection(host, port, channel, tokens[(index * connections + c) % len(tokens)][1],
                        f"w{index}c{c}", gift, start, stop, latencies, counts)
            for c in range(connections)))

    asyncio.run(main())
    out.put({"latencies": latencies, "counts": counts, "cpu": time.process_time() - cpu0})


def register(server: ServerProcess, name: str) -> tuple[int, str]:
    status, body = post_json(server.url + "/api/auth/register",
                             {"username": name, "password": f"pw-{name}-bench-1"})
    assert status == 201, body
    return body["user"]["id"], body["token"]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(q * len(values)))]


def own_schema(url: str) -> tuple[str, str]:
    """``url`` with a schema of this run's own, and that schema's name."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k != "schema"]
    schema = f"gifts_bench_{os.getpid()}"
    return parts._replace(query=urlencode([*query, ("schema", schema)])).geturl(), schema


async def check_store(database_url: str, anchor_id: int, coins: int,
                      drop_schema: str | None = None) -> dict[str, Any]:
    from gifts.ledger import PLATFORM, Ledger, earnings
    from livesrv.db import open_database

    db = await open_database(database_url)
    ledger = await Ledger.open(db)
    try:
        audit = await ledger.audit()
        earned = await ledger.balance(earnings(anchor_id))
        platform_coins = await ledger.balance(PLATFORM)
        if drop_schema:
            await db.execute(f'DROP SCHEMA "{drop_schema}" CASCADE')
        return {"audit_balanced": audit.balanced, "cached_match": audit.cached_match,
                "negative": audit.negative, "postings": audit.postings,
                "anchor_plus_platform": earned + platform_coins, "coins_answered_200": coins}
    finally:
        await ledger.close()
        await db.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database", help="postgresql://… (default: SQLite in a temporary data dir)")
    parser.add_argument("--users", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--connections", type=int, default=16, help="per worker")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--gift", default=GIFT, choices=[GIFT, GIFT_BIG])
    parser.add_argument("--writer", choices=("process", "thread"), default="process",
                        help="the server's [ledger] writer setting")
    args = parser.parse_args()
    schema = None
    if args.database:
        args.database, schema = own_schema(args.database)

    with tempfile.TemporaryDirectory(prefix="gifts-bench-") as tmp:
        config = Path(tmp) / "livesrv.toml"
        config.write_text(f'[gifts]\nsandbox = true\n[ledger]\nwriter = "{args.writer}"\n')
        server = ServerProcess(Path(tmp) / "server", database=args.database, config=str(config),
                               extra_args=["--log-level", "WARNING"])
        server.start(60)
        try:
            anchor_id, _ = register(server, "hotanchor")
            tokens = []
            for i in range(args.users):
                user_id, token = register(server, f"viewer{i:04d}")
                status, body = post_json(server.url + "/api/wallet/recharge",
                                         {"coins": 1_000_000, "idempotency_key": "bench"}, token=token)
                assert status == 201 and body["status"] == "paid", body
                tokens.append((str(user_id), token))
            assert server.proc is not None
            pid = server.proc.pid
            begin = time.time() + 1.0  # time for the workers to start and connect
            start, stop = begin + args.warmup, begin + args.warmup + args.seconds
            out: Any = mp.Queue()
            procs = [mp.Process(target=worker, args=(i, "127.0.0.1", server.http_port, "hotanchor", tokens,
                                                     args.connections, args.gift, start, stop, out))
                     for i in range(args.workers)]
            for proc in procs:
                proc.start()
            time.sleep(max(0.0, start - time.time()))
            helpers = children(pid)  # the ledger's writer
            cpu0 = cpu_seconds(pid)
            helpers0 = sum(cpu_seconds(child) for child in helpers)
            time.sleep(max(0.0, stop - time.time()))
            server_cpu = cpu_seconds(pid) - cpu0
            helpers_cpu = sum(cpu_seconds(child) for child in helpers) - helpers0
            results = [out.get(timeout=120) for _ in procs]
            for proc in procs:
                proc.join()
            with urllib.request.urlopen(server.url + "/metrics") as response:
                metrics_text = response.read().decode()
        finally:
            server.stop()
        latencies = sorted(x for r in results for x in r["latencies"])
        counts: dict[str, int] = {}
        for r in results:
            for key, value in r["counts"].items():
                counts[key] = counts.get(key, 0) + value
        database_url = args.database or f"sqlite:///{(Path(tmp) / 'server' / 'livesrv.db').resolve()}"
        store = asyncio.run(check_store(database_url, anchor_id, counts.get("coins", 0), schema))
    batches = [line for line in metrics_text.splitlines()
               if line.startswith(("livesrv_ledger_batch_size", "livesrv_ledger_write_seconds",
                                   "livesrv_http_request_seconds"))
               and ("_sum" in line or "_count" in line) and ("gifts" in line or "ledger" in line)]
    ok = counts.get("200", 0)
    report = {
        "machine": f"{platform.node()} {os.cpu_count()} cores, {platform.processor() or platform.machine()}",
        "database": "postgresql" if args.database else "sqlite",
        "users": args.users, "connections": args.workers * args.connections, "seconds": args.seconds,
        "gifts_per_second": round(ok / args.seconds, 1),
        "status_counts": {k: v for k, v in counts.items() if k.isdigit()},
        "latency_ms": {"p50": round(percentile(latencies, 0.50) * 1000, 2),
                       "p90": round(percentile(latencies, 0.90) * 1000, 2),
                       "p99": round(percentile(latencies, 0.99) * 1000, 2),
                       "max": round(latencies[-1] * 1000, 2) if latencies else None},
        "writer": args.writer,
        "server_cpu_percent": round(100 * server_cpu / args.seconds, 1),
        "ledger_writer_cpu_percent": round(100 * helpers_cpu / args.seconds, 1),
        "load_generator_cpu_percent": round(
            100 * sum(r["cpu"] for r in results) / (args.seconds + args.warmup + 1), 1),
        "server_metrics": batches,
        "store_check": store,
        "store_consistent": store["audit_balanced"] and store["cached_match"] and not store["negative"]
        and store["anchor_plus_platform"] == store["coins_answered_200"],
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
