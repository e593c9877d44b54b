"""Prometheus metrics of the coin ledger (process-wide, like every other collector of the house)."""

from __future__ import annotations

import itertools
import math
from bisect import bisect_left
from collections.abc import Iterable, Sequence

from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import CollectorRegistry
from prometheus_client.utils import floatToGoString


class BatchHistogram:
    """A histogram fed a batch of values at a time, exported like prometheus_client's Histogram.

    ``Histogram.observe()`` takes two locks per value, ~1 µs. The ledger observes every post
    on the event loop, thousands a batch, and there that was ~5 % of the throughput of
    ``bench/ledger_transfers.py``. Here a batch is counted into a plain list in one pass.
    Observed on the event loop only; a scrape from another thread may see a batch half
    counted, never lose a count.
    """

    def __init__(self, name: str, documentation: str, buckets: Sequence[float],
                 registry: CollectorRegistry = REGISTRY) -> None:
        self._name = name
        self._documentation = documentation
        self._bounds = tuple(float(bound) for bound in buckets)
        self._labels = tuple(floatToGoString(bound) for bound in (*self._bounds, math.inf))
        self._counts = [0] * (len(self._bounds) + 1)  # the last one is +Inf
        self._sum = 0.0
        registry.register(self)

    def observe_many(self, values: Iterable[float]) -> None:
        counts, bounds = self._counts, self._bounds
        total = 0.0
        for value in values:
            counts[bisect_left(bounds, value)] += 1  # the first bucket with value <= bound
            total += value
        self._sum += total

    def collect(self) -> list[HistogramMetricFamily]:
        family = HistogramMetricFamily(self._name, self._documentation)
        family.add_metric([], list(zip(self._labels, itertools.accumulate(list(self._counts)), strict=True)),
                          self._sum)
        return [family]

    def describe(self) -> list[HistogramMetricFamily]:
        return [HistogramMetricFamily(self._name, self._documentation)]


POSTINGS = Counter("livesrv_ledger_postings_total", "Postings recorded (replays excluded), by kind", ["kind"])
REPLAYS = Counter("livesrv_ledger_replays_total", "Posts answered from an earlier posting with the same key")
INSUFFICIENT_FUNDS = Counter("livesrv_ledger_insufficient_funds_total",
                             "Posts refused because a debited account could not cover them")
KEY_CONFLICTS = Counter("livesrv_ledger_key_conflicts_total", "Idempotency keys reused with other legs")
BATCH_RETRIES = Counter("livesrv_ledger_batch_retries_total",
                        "Batch transactions retried (deadlock, serialization, key raced by another node)")
WRITER_STARTS = Counter("livesrv_ledger_writer_starts_total",
                        "Writer processes started (more than one: a writer stopped and was replaced)")
BATCH_SIZE = Histogram("livesrv_ledger_batch_size", "Posts applied per batch transaction",
                       buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000))
WRITE_SECONDS = BatchHistogram("livesrv_ledger_write_seconds", "Time from post() to its answer",
                               buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                                        0.5, 1, 2.5, 5))
