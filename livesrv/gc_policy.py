"""The server process's garbage-collector settings, and a metric of its pauses.

A node with many viewers holds many long-lived objects (~70 per WebSocket: aiohttp's request,
response, reader, writer, timers...; 730k at 10,000 sockets), and CPython's collector stops
the whole process while it scans a generation. A full collection of 730k objects took 0.4-0.8 s
on the benchmark machine: every room on the node froze for that long.

With CPython's default thresholds (700, 10, 10) an object that lives longer than ~7,000
allocations is promoted to the oldest generation, and in a busy room that is a fraction of a
second: chat events on their way out, per-message objects and the like are promoted and then
die there, so the old generation keeps "growing" and a full collection came every ~30 s of
10k viewers at 1,000 messages/s (`bench/rooms_fanout.py`), each a 400+ ms stall in delivery.

A young generation of 50,000 objects lets those die young: an object must now outlive ~250,000
allocations (many seconds of traffic) to be promoted, a young collection costs ~10 ms, and the
old generation grows with real long-lived state (connections) only, so a full collection comes
when that has grown by a quarter (CPython's own rule), not on a timer of traffic. Objects made
while starting (modules, config, the app) are frozen out of every collection.

Measured with `bench/rooms_fanout.py` (docs/BENCHMARKS.md, room fan-out): at 10,000 viewers and
1,000 messages/s, no full collection in the steady state where there was one every ~30 s.
"""

from __future__ import annotations

import gc
import time
from typing import Any

from prometheus_client import Histogram

#: (young, middle, old): objects allocated net before a young collection; young collections
#: before a middle one; middle ones before an old one is considered
THRESHOLDS = (50_000, 5, 10)

PAUSES = Histogram("livesrv_gc_pause_seconds",
                   "Time the process stood still in a garbage collection, by generation",
                   ["generation"],
                   buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5))

_started: list[float] = [0.0]


def _observe(phase: str, info: dict[str, Any]) -> None:
    if phase == "start":
        _started[0] = time.perf_counter()
    else:
        PAUSES.labels(str(info["generation"])).observe(time.perf_counter() - _started[0])


def apply() -> None:
    """Set the server's thresholds, freeze what exists now, and time every collection.

    Call once start-up is done, the app built and listening (what exists then lives as long as
    the process): ``livesrv.cli`` calls it right after the HTTP site has started."""
    gc.collect()  # what start-up left as garbage is not frozen with the rest
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)
    for generation in ("0", "1", "2"):  # exported from the start, at zero
        PAUSES.labels(generation)
    if _observe not in gc.callbacks:
        gc.callbacks.append(_observe)
