"""The server's garbage-collector policy, applied in a process of its own (as ``livesrv serve``
does), since it changes the whole interpreter."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.support.server import REPO

PROBE = """
import gc, json
from prometheus_client import REGISTRY
from livesrv import gc_policy

before = len(gc.get_objects())
gc_policy.apply()
class Cycle:
    pass
for _ in range(100_000):  # garbage in cycles: only the collector frees it
    a, b = Cycle(), Cycle()
    a.other, b.other = b, a
gc.collect(0)
print(json.dumps({
    "thresholds": gc.get_threshold(),
    "frozen": gc.get_freeze_count(),
    "before": before,
    "young_pauses": REGISTRY.get_sample_value(
        "livesrv_gc_pause_seconds_count", {"generation": "0"}),
    "full_pauses": REGISTRY.get_sample_value(
        "livesrv_gc_pause_seconds_count", {"generation": "2"}),
}))
"""


def test_the_server_collects_young_rarely_freezes_start_up_and_times_every_pause() -> None:
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True,
                          text=True, timeout=60, check=True)
    seen = json.loads(done.stdout)
    assert seen["thresholds"] == [50_000, 5, 10]
    # what existed at start-up is out of every collection's way
    assert seen["frozen"] >= seen["before"] * 0.9
    # 200,000 objects made: a few automatic young collections (not hundreds), plus ours, timed
    assert 2 <= seen["young_pauses"] <= 10
    assert seen["full_pauses"] is not None, "every generation is exported from the start"
