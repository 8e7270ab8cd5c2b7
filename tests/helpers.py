"""Small helpers shared by the integration and chaos tiers."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import TypeVar

from gridqueue.fleet import wait_for as _wait_for
from gridqueue.ledger import Ledger

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout_s: float = 30.0, interval_s: float = 0.05) -> T:
    """Poll until ``predicate()`` is truthy; fail the test with a clear message otherwise."""
    try:
        return _wait_for(predicate, timeout_s, interval_s)
    except TimeoutError as exc:
        raise AssertionError(str(exc)) from None


def watchdog_grace_ms(ledger: Ledger) -> int:
    """How long a newly elected watchdog waits before it judges anyone (as
    ``gridqueue.watchdog.Watchdog`` computes it, for the settings and workload classes the
    test's fleet shares): every node gets one period to beat again."""
    settings = ledger.settings
    beat_s = max(
        [w.liveness_interval_s for w in ledger.workloads.values()] + [settings.heartbeat_interval_s]
    )
    return int((settings.stale_after_s + beat_s) * 1000)


def wait_until_watchdog_judges(ledger: Ledger, timeout_s: float = 60.0) -> None:
    """Wait until a watchdog leads and its grace period as a new leader is over.

    Until then it judges no one, so a node killed or frozen during the grace has both its
    own silence and its attempts' silence judged in one tick, and which verdict an attempt
    gets is a race. A test that asserts the verdict of a fault injects it after this.
    """

    def elected_ms() -> int | None:
        events = ledger.events(count=1_000_000)
        elections = [int(e["ts"]) for e in events if e["type"] == "leader_elected"]
        return elections[-1] if elections else None

    since_ms = wait_for(elected_ms, timeout_s)
    # The leader's grace started before it wrote the lease (and the election event), on a
    # clock that runs as fast as the Redis server's: past this, its next tick judges.
    judging_ms = since_ms + watchdog_grace_ms(ledger)
    wait_for(lambda: ledger.time_ms() >= judging_ms, timeout_s, interval_s=0.02)


GIB = 2**30
# One simulated GPU as a worker's health snapshot reports it, and the fit of sim-llm on it.
SIM_GPU = {
    "index": 0,
    "uuid": "GPU-0",
    "name": "Simulated H100",
    "memory_total_bytes": 80 * GIB,
    "memory_used_bytes": 9 * GIB,
    "utilization_ratio": 0.5,
    "temperature_c": 61.0,
    "power_w": 300.0,
    "xid_counts": {"13": 2},
}
SIM_FIT = {"sim-llm": {"required_bytes": 8 * GIB, "largest_gpu_bytes": 80 * GIB}}


def register_sim_worker(ledger: Ledger, name: str) -> int:
    """Register a worker serving sim-llm on SIM_GPU and heartbeat it HEALTHY; its epoch."""
    epoch = ledger.register(
        name, ["sim-llm"], 100, "node", 2, "{}", "simulated", [SIM_GPU], SIM_FIT
    )
    health = json.dumps({"probe": "simulated", "gpus": [SIM_GPU], "reasons": []})
    ledger.heartbeat(name, epoch, health, "HEALTHY")
    return epoch


def hist_count(hist: Mapping[str, str | int], series: str) -> int:
    """Observations of one histogram series (``metric|labels``) in the ``{ns}:hist`` hash:
    the sum of its buckets (fields named by an upper bound in ms, or ``inf``)."""
    prefix = series + "|"
    buckets = {f[len(prefix) :]: int(v) for f, v in hist.items() if f.startswith(prefix)}
    return sum(n for bound, n in buckets.items() if bound.isdigit() or bound == "inf")
