"""The watchdog's requeue of a rack: how long it takes to end and republish many attempts.

It puts ``--attempts`` running attempts on ``--workers`` workers in a private Redis, lets
the watchdog take its lease, quarantines every worker at once (an evacuation: all their
attempts lost in one step, as when a rack goes down), then ticks until the lost hash is
empty, and reports the time, the ticks and what they did. No heartbeat load runs (see
``watchdog_scale.py --fleet --rack`` for that): this is the watchdog's own cost.

``--workload realtime`` (the default) retries at once, so every successor is published in
the same ticks; ``batch`` retries after its backoff, so only the verdicts are timed.

    python benchmarks/rack_requeue.py [--workers 100] [--attempts 1000]
        [--workload realtime|batch] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gridqueue.embedded import EmbeddedRedis  # noqa: E402
from gridqueue.ledger import dumps  # noqa: E402
from gridqueue.logs import configure_logging  # noqa: E402
from gridqueue.settings import Settings  # noqa: E402
from gridqueue.watchdog import Watchdog  # noqa: E402


def run(workers: int, attempts: int, workload: str) -> dict[str, Any]:
    with EmbeddedRedis() as url:
        watchdog = Watchdog(Settings(redis_url=url, stale_after_s=3600), owner="bench")
        ledger = watchdog.ledger
        fit = {"sim-llm": {"required_bytes": 1, "largest_gpu_bytes": 2}}
        slots = -(-attempts // workers)
        names = [f"node-{i}" for i in range(workers)]
        for name in names:
            ledger.register(name, ["sim-llm"], 1, "bench", slots, "{}", model_fit=fit)
        payload = dumps({"prompt": "x"})
        for i in range(attempts):
            ledger.submit(f"job-{i}", "sim-llm", workload, payload, 3_600_000, None)
            assert ledger.claim(f"job-{i}", 1, names[i % workers], 1000 + i, "").status == "ok"
        watchdog.tick()  # the lease
        for name in names:
            ledger.quarantine(name, "operator", "rack down")
        started = time.perf_counter()
        ticks, requeued, dispatched, durations = 0, 0, 0, []
        while ledger.lost_attempts() and ticks < 1000:
            report = watchdog.tick()
            ticks += 1
            requeued += report.attempts_requeued
            dispatched += report.dispatched
            durations.append(report.duration_s)
        elapsed = time.perf_counter() - started
        return {
            "workers": workers,
            "attempts": attempts,
            "workload": workload,
            "seconds": round(elapsed, 3),
            "ticks": ticks,
            "longest_tick_ms": round(max(durations) * 1000, 1),
            "requeued": requeued,
            "published": dispatched,
            "per_attempt_ms": round(elapsed * 1000 / attempts, 3),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=100)
    parser.add_argument("--attempts", type=int, default=1000)
    parser.add_argument("--workload", choices=("realtime", "batch"), default="realtime")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    configure_logging("WARNING")  # one line per lost attempt would time the terminal
    report = run(args.workers, args.attempts, args.workload)
    if args.json:
        print(json.dumps(report, indent=2))
    print(
        f"{report['attempts']} attempts lost at once on {report['workers']} workers "
        f"({report['workload']}): ended in {report['seconds']} s over {report['ticks']} "
        f"ticks (longest {report['longest_tick_ms']} ms), {report['requeued']} requeued, "
        f"{report['published']} published; {report['per_attempt_ms']} ms per attempt"
    )


if __name__ == "__main__":
    main()
