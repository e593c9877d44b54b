"""Prometheus metrics of the coin ledger (process-wide, like every other collector of the house)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

POSTINGS = Counter("livesrv_ledger_postings_total", "Postings recorded (replays excluded), by kind", ["kind"])
REPLAYS = Counter("livesrv_ledger_replays_total", "Posts answered from an earlier posting with the same key")
INSUFFICIENT_FUNDS = Counter("livesrv_ledger_insufficient_funds_total",
                             "Posts refused because a debited account could not cover them")
KEY_CONFLICTS = Counter("livesrv_ledger_key_conflicts_total", "Idempotency keys reused with other legs")
BATCH_RETRIES = Counter("livesrv_ledger_batch_retries_total",
                        "Batch transactions retried (deadlock, serialization, key raced by another node)")
BATCH_SIZE = Histogram("livesrv_ledger_batch_size", "Posts applied per batch transaction",
                       buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000))
WRITE_SECONDS = Histogram("livesrv_ledger_write_seconds", "Time from post() to its answer",
                          buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                                   1, 2.5, 5))
