"""Stall detection: freeze the child running an attempt (SIGSTOP), again and again.

For each stall it measures, on Redis server time, the time from the child stopping to the
job's next attempt RUNNING, with the realtime class defaults (liveness_timeout_s = 2).
Target: liveness_timeout_s + 1 s.

    python benchmarks/stall_detection.py [--stalls 10] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gridqueue.audit import audit, percentile  # noqa: E402
from gridqueue.client import GridQueue  # noqa: E402
from gridqueue.embedded import EmbeddedRedis  # noqa: E402
from gridqueue.fleet import LocalFleet, wait_for  # noqa: E402
from gridqueue.settings import Settings  # noqa: E402
from gridqueue.states import JobState  # noqa: E402


def run(url: str, stalls: int, log_dir: Path) -> dict[str, Any]:
    fleet = LocalFleet(url, log_dir)
    gq = GridQueue(settings=Settings(redis_url=url))
    workload = gq.ledger.workloads["realtime"]
    try:
        names = ["gpu-0", "gpu-1", "gpu-2"]
        for name in names:
            fleet.start_worker(name, concurrency=2)
        fleet.start_watchdog()
        fleet.wait_alive(gq.ledger, names)
        time.sleep(2.5)  # past the watchdog's start-up grace
        jobs: list[str] = []
        latencies: list[int] = []
        quarantines = 0
        for i in range(stalls):
            job = gq.submit("sim-llm", {"prompt": f"stall {i}", "ms": 3000})
            jobs.append(job.id)
            record = wait_for(
                lambda job=job: (r := gq.get(job.id)).state is JobState.RUNNING and r,
                30,
                what="run",
            )
            pid = record.attempts[0].pid
            time.sleep(0.3)
            stopped_ms = gq.ledger.time_ms()
            os.kill(pid, signal.SIGSTOP)
            job.result(timeout=60)
            attempts = gq.get(job.id).attempts
            assert attempts[0].outcome == "stalled", attempts[0]
            latency = (attempts[1].started_ms or 0) - stopped_ms
            latencies.append(latency)
            print(f"stall {i + 1:>2}/{stalls}: running again after {latency} ms", flush=True)
            # Repeated stalls on one node quarantine it (by design); here an operator
            # releases it at once, so the fleet keeps its capacity for the next round.
            for name in names:
                record = gq.ledger.worker(name)
                if record and record.quarantined_by == "watchdog":
                    quarantines += 1
                    gq.ledger.release(name, "benchmark")
        result = audit(gq.ledger, jobs)
        return {
            "stalls": stalls,
            "liveness_timeout_s": workload.liveness_timeout_s,
            "p50_ms": percentile(latencies, 50),
            "max_ms": max(latencies),
            "latencies_ms": latencies,
            "nodes_quarantined_for_repeated_stalls": quarantines,
            **result.to_dict(),
        }
    finally:
        fleet.stop_all()
        gq.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stalls", type=int, default=10)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="gridqueue-bench-") as tmp, EmbeddedRedis() as url:
        report = run(url, args.stalls, Path(tmp))
    if args.json:
        print(json.dumps(report, indent=2))
    target_ms = report["liveness_timeout_s"] * 1000 + 1000
    print()
    print(
        f"child SIGSTOP -> next attempt RUNNING, over {report['stalls']} stalls: "
        f"p50 {report['p50_ms']:.0f} ms, max {report['max_ms']:.0f} ms "
        f"(target: liveness_timeout_s + 1 s = {target_ms:.0f} ms)"
    )
    print(
        f"jobs {report['submitted']}, lost {report['lost']}, duplicates {report['duplicates']}; "
        f"nodes quarantined for repeated stalls (then released): "
        f"{report['nodes_quarantined_for_repeated_stalls']}"
    )
    sys.exit(0 if report["lost"] == 0 and report["duplicates"] == 0 else 1)


if __name__ == "__main__":
    main()
