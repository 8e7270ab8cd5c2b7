"""Quarantine latency: inject a GPU fault into a worker under load, again and again.

For each injection it measures, on Redis server time, the time from the injection to the
worker's quarantine. It also checks the contract around it: the quarantined worker makes
no new claim, and over the whole run no job is lost or shown twice.

    python benchmarks/quarantine_latency.py [--injections 10] [--json]
"""

from __future__ import annotations

import argparse
import json
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
from gridqueue.faults import clear_faults, inject_fault  # noqa: E402
from gridqueue.fleet import LocalFleet, wait_for  # noqa: E402
from gridqueue.probes.simulated import Fault  # noqa: E402
from gridqueue.settings import Settings  # noqa: E402
from gridqueue.states import WorkerState  # noqa: E402

FAULTS = [Fault(xid=(79,)), Fault(ecc_dbe=True), Fault(gpu_lost=True), Fault(xid=(48,))]


def run(url: str, injections: int, log_dir: Path) -> dict[str, Any]:
    fleet = LocalFleet(url, log_dir)
    settings = Settings(redis_url=url)
    gq = GridQueue(settings=settings)
    try:
        names = ["gpu-0", "gpu-1", "gpu-2"]
        for name in names:
            fleet.start_worker(name, concurrency=2)
        fleet.start_watchdog()
        fleet.wait_alive(gq.ledger, names)
        jobs: list[str] = []
        latencies: list[int] = []
        windows: list[tuple[str, int, int]] = []  # (worker, quarantined, released)
        for i in range(injections):
            sick = names[i % len(names)]
            jobs += [gq.submit("sim-llm", {"prompt": f"{i}-{k}", "ms": 1500}).id for k in range(4)]
            time.sleep(0.5)
            injected_ms = gq.ledger.time_ms()
            inject_fault(settings, sick, 0, FAULTS[i % len(FAULTS)])
            record = wait_for(
                lambda sick=sick: (
                    (w := gq.ledger.worker(sick)) and w.state is WorkerState.QUARANTINED and w
                ),
                10,
                what="quarantine",
            )
            latency = record.quarantined_ms - injected_ms
            latencies.append(latency)
            # Load while it is quarantined: it must claim none of it.
            burst = [gq.submit("sim-llm", {"prompt": f"b{i}-{k}", "ms": 200}).id for k in range(4)]
            jobs += burst
            for job_id in burst:
                gq.job(job_id).result(timeout=60)
            print(f"injection {i + 1:>2}/{injections}: {sick} quarantined after {latency} ms")
            windows.append((sick, record.quarantined_ms, gq.ledger.time_ms()))
            clear_faults(settings, sick)
            gq.ledger.release(sick, "benchmark")
        for job_id in jobs:
            gq.job(job_id).result(timeout=120)
        result = audit(gq.ledger, jobs)
        claims = [e for e in gq.ledger.events(count=1_000_000) if e["type"] == "claimed"]
        claims_after = sum(
            1
            for worker, start_ms, end_ms in windows
            for e in claims
            if e["worker"] == worker and start_ms < int(e["ts"]) < end_ms
        )
        return {
            "injections": injections,
            "p50_ms": percentile(latencies, 50),
            "max_ms": max(latencies),
            "latencies_ms": latencies,
            "claims_while_quarantined": claims_after,
            **result.to_dict(),
        }
    finally:
        fleet.stop_all()
        gq.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--injections", type=int, default=10)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="gridqueue-bench-") as tmp, EmbeddedRedis() as url:
        report = run(url, args.injections, Path(tmp))
    if args.json:
        print(json.dumps(report, indent=2))
    print()
    print(
        f"fault injected -> quarantined, over {report['injections']} injections: "
        f"p50 {report['p50_ms']:.0f} ms, max {report['max_ms']:.0f} ms "
        f"(heartbeat 200 ms, probe every 200 ms, watchdog tick 100 ms)"
    )
    print(
        f"claims by a quarantined worker: {report['claims_while_quarantined']}; jobs "
        f"{report['submitted']}, lost {report['lost']}, duplicates {report['duplicates']}"
    )
    ok = (
        report["lost"] == 0 and report["duplicates"] == 0 and not report["claims_while_quarantined"]
    )
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
