"""The ledger's batch-fed histogram exports exactly what prometheus_client's Histogram would."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from gifts.ledger_metrics import BatchHistogram

BUCKETS = (0.0005, 0.001, 0.01, 0.1, 1, 5)
VALUES = [0.0001, 0.0005, 0.0007, 0.001, 0.02, 0.1, 0.10001, 1, 4.9, 5, 7.5, 120.0]


def samples(registry: CollectorRegistry) -> list[str]:
    """The bucket, count and sum lines (``_created`` is prometheus_client's own extra)."""
    return [line for line in generate_latest(registry).decode().splitlines()
            if not line.startswith("#") and "_created" not in line]


def test_batch_histogram_matches_prometheus_histogram() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    batched = BatchHistogram("latency_seconds", "Latency", BUCKETS, registry=ours)
    reference = Histogram("latency_seconds", "Latency", buckets=BUCKETS, registry=theirs)
    batched.observe_many(VALUES[:5])
    batched.observe_many([])
    batched.observe_many(iter(VALUES[5:]))  # any iterable
    for value in VALUES:
        reference.observe(value)
    assert samples(ours) == samples(theirs)
    assert 'latency_seconds_bucket{le="+Inf"} 12.0' in samples(ours)
    assert 'latency_seconds_bucket{le="0.0005"} 2.0' in samples(ours)  # a bound is inclusive
