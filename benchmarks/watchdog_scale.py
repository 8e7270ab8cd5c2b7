"""Watchdog tick cost against the number of jobs, workers and attempts in flight.

It fills a private Redis through the ledger (no worker processes: the tick only reads the
ledger's indexes), then times ``Watchdog.tick()`` when nothing is due. A tick runs range
queries over what is due, so its cost must stay flat as the ledger grows; the largest
ledger is compared with the smallest, measured in the same run.

    python benchmarks/watchdog_scale.py [--sizes 1000,10000,50000] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gridqueue.embedded import EmbeddedRedis  # noqa: E402
from gridqueue.keys import attempt_id  # noqa: E402
from gridqueue.ledger import dumps  # noqa: E402
from gridqueue.settings import Settings  # noqa: E402
from gridqueue.watchdog import Watchdog  # noqa: E402

TICKS = 200


def fill(watchdog: Watchdog, jobs: int, workers: int) -> None:
    ledger = watchdog.ledger
    names = [f"node-{i}" for i in range(workers)]
    fit = {"sim-llm": {"required_bytes": 1, "largest_gpu_bytes": 2}}
    for name in names:
        ledger.register(name, ["sim-llm"], 1, "bench", 4, "{}", model_fit=fit)
    payload = dumps({"prompt": "x", "ms": 1})
    for i in range(jobs):
        job_id = f"job-{i}"
        ledger.submit(job_id, "sim-llm", "batch", payload, 3_600_000, None)
        if i % 2 == 0:  # half of them running, spread over the workers
            ledger.claim(job_id, 1, names[i % workers], 1000 + i, f"tag-{i}")
            ledger.beat(job_id, 1, names[i % workers], 3_600_000)
            ledger.progress(job_id, 1, names[i % workers], "", 3_600_000)
        # the rest stay queued with their dispatch promise far in the future
        ledger.client.zadd(ledger.keys.dispatch, {attempt_id(job_id, 1): 9e15})


def measure(url: str, jobs: int, workers: int) -> dict[str, Any]:
    # Nothing may fall due while we measure: an hour of staleness and dispatch grace.
    settings = Settings(redis_url=url, stale_after_s=3600, dispatch_grace_s=3600)
    watchdog = Watchdog(settings, owner="bench")
    watchdog.ledger.client.flushall()
    fill(watchdog, jobs, workers)
    watchdog.tick()  # take the lease
    watchdog._blind_until = 0.0  # judge from the first measured tick on
    durations = []
    for _ in range(TICKS):
        started = time.perf_counter()
        report = watchdog.tick()
        durations.append(time.perf_counter() - started)
        assert report.leader and report.dispatched == 0
    return {
        "jobs": jobs,
        "running": (jobs + 1) // 2,
        "workers": workers,
        "tick_median_ms": round(statistics.median(durations) * 1000, 3),
        "tick_p99_ms": round(sorted(durations)[int(TICKS * 0.99) - 1] * 1000, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1000,10000,50000")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = []
    with EmbeddedRedis() as url:
        for jobs in sizes:
            workers = max(10, jobs // 100)
            rows.append(measure(url, jobs, workers))
            print(
                f"{rows[-1]['jobs']:>7} jobs ({rows[-1]['running']} running) on "
                f"{workers:>4} workers: tick median {rows[-1]['tick_median_ms']:.2f} ms, "
                f"p99 {rows[-1]['tick_p99_ms']:.2f} ms",
                flush=True,
            )
    ratio = rows[-1]["tick_median_ms"] / rows[0]["tick_median_ms"]
    print(f"largest / smallest ledger: {ratio:.2f}x tick cost for {sizes[-1] / sizes[0]:.0f}x jobs")
    if args.json:
        print(json.dumps({"rows": rows, "ratio": ratio}, indent=2))


if __name__ == "__main__":
    main()
