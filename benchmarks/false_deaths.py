"""No false deaths: a healthy fleet under CPU saturation, its subscriptions dropped.

The connection signal (a worker's presence subscription gone, plus a late heartbeat)
declares a dead process in well under a second; it must never declare a live one. This
drill runs a healthy fleet for ``--seconds`` (60 by default) with every core of the machine
saturated by unrelated busy loops, jobs flowing all the while, and every ``--kill-every-s``
drops one worker's presence subscription with ``CLIENT KILL`` (the worker keeps
heartbeating and subscribes again). It samples each worker's heartbeat age on Redis time
every 20 ms and reports:

- deaths declared (``worker_dead`` events): the figure that must be 0;
- the largest heartbeat age seen against ``stale_after_s``, and how often a worker was late
  by more than one interval (the connection signal's precondition) with its subscription
  down at the same moment;
- the subscription drops and how long each worker took to subscribe again;
- jobs completed, and the audit (lost, duplicates).

    python benchmarks/false_deaths.py [--seconds 60] [--hogs N] [--kill-every-s 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.failover_latency import _wait_until_watchdog_judges  # noqa: E402
from gridqueue.audit import audit, percentile  # noqa: E402
from gridqueue.client import GridQueue  # noqa: E402
from gridqueue.embedded import EmbeddedRedis  # noqa: E402
from gridqueue.fleet import LocalFleet, wait_for  # noqa: E402
from gridqueue.presence import client_name  # noqa: E402
from gridqueue.settings import Settings  # noqa: E402
from gridqueue.states import TERMINAL_STATES, WorkerState  # noqa: E402

WORKERS = 4
CONCURRENCY = 2
JOB_MS = 300
IN_FLIGHT = 8


def _subscribers(gq: GridQueue, name: str) -> int:
    return int(gq.ledger.client.pubsub_numsub(gq.ledger.keys.presence(name))[0][1])


def run(seconds: float, hogs: int, kill_every_s: float, log_dir: Path) -> dict[str, Any]:
    with EmbeddedRedis() as url:
        fleet = LocalFleet(url, log_dir)
        gq = GridQueue(settings=Settings(redis_url=url))
        busy: list[subprocess.Popen[bytes]] = []
        try:
            names = [f"gpu-{i}" for i in range(WORKERS)]
            for name in names:
                fleet.start_worker(name, concurrency=CONCURRENCY)
            fleet.start_watchdog()
            fleet.wait_alive(gq.ledger, names)
            _wait_until_watchdog_judges(gq)
            epochs = {n: gq.ledger.worker(n).epoch for n in names}  # type: ignore[union-attr]
            settings = gq.ledger.settings
            interval_ms = settings.heartbeat_interval_s * 1000
            stale_ms = settings.stale_after_s * 1000

            busy = [
                subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(hogs)
            ]
            stop = threading.Event()
            samples = {"max_age_ms": 0.0, "late": 0, "late_and_unsubscribed": 0, "n": 0}

            def sample() -> None:
                client = gq.ledger.client
                while not stop.is_set():
                    now = gq.ledger.time_ms()
                    scores = dict(client.zrange(gq.ledger.keys.workers, 0, -1, withscores=True))
                    for name in names:
                        age = now - float(scores.get(name, now))
                        samples["max_age_ms"] = max(samples["max_age_ms"], age)
                        if age > interval_ms:
                            samples["late"] += 1
                            if _subscribers(gq, name) == 0:
                                samples["late_and_unsubscribed"] += 1
                    samples["n"] += 1
                    time.sleep(0.02)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            jobs: list[str] = []
            pending: list[Any] = []
            back_ms: list[float] = []
            drops = 0
            started = time.monotonic()
            next_kill = started + kill_every_s
            client = gq.ledger.client
            while time.monotonic() - started < seconds:
                pending = [j for j in pending if j.status() not in TERMINAL_STATES]
                while len(pending) < IN_FLIGHT:
                    job = gq.submit("sim-llm", {"prompt": f"busy-{len(jobs)}", "ms": JOB_MS})
                    jobs.append(job.id)
                    pending.append(job)
                if time.monotonic() >= next_kill:
                    victim = random.choice(names)
                    targets = [
                        c for c in client.client_list() if c.get("name") == client_name(victim)
                    ]
                    if targets:
                        client.client_kill_filter(_id=targets[0]["id"])
                        dropped_at = time.monotonic()
                        drops += 1
                        wait_for(lambda v=victim: _subscribers(gq, v) == 1 or None, 30)
                        back_ms.append((time.monotonic() - dropped_at) * 1000)
                    next_kill += kill_every_s
                time.sleep(0.02)
            stop.set()
            sampler.join(timeout=5)
            for hog in busy:
                hog.kill()
            for job_id in jobs:
                gq.job(job_id).result(timeout=120)
            deaths = [e for e in gq.ledger.events(count=1_000_000) if e["type"] == "worker_dead"]
            alive_same_epoch = sum(
                1
                for n in names
                if (r := gq.ledger.worker(n)) is not None
                and r.state is WorkerState.ALIVE
                and r.epoch == epochs[n]
            )
            result = audit(gq.ledger, jobs)
            return {
                "seconds": seconds,
                "hogs": hogs,
                "cpus": os.cpu_count(),
                "workers": WORKERS,
                "deaths_declared": len(deaths),
                "workers_alive_same_incarnation": alive_same_epoch,
                "heartbeat_interval_ms": interval_ms,
                "stale_after_ms": stale_ms,
                "max_heartbeat_age_ms": round(samples["max_age_ms"]),
                "samples": samples["n"] * WORKERS,
                "samples_late": samples["late"],
                "samples_late_and_unsubscribed": samples["late_and_unsubscribed"],
                "subscriptions_dropped": drops,
                "resubscribed_p50_ms": round(percentile(back_ms, 50), 1) if back_ms else None,
                "resubscribed_max_ms": round(max(back_ms), 1) if back_ms else None,
                "jobs": len(jobs),
                **result.to_dict(),
            }
        finally:
            for hog in busy:
                hog.kill()
                hog.wait(timeout=10)
            fleet.stop_all()
            gq.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--hogs", type=int, default=os.cpu_count() or 2, help="busy loops")
    parser.add_argument("--kill-every-s", type=float, default=2.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="gridqueue-bench-") as tmp:
        report = run(args.seconds, args.hogs, args.kill_every_s, Path(tmp))
    if args.json:
        print(json.dumps(report, indent=2))
    print(
        f"{report['workers']} workers, {report['seconds']:.0f} s with {report['hogs']} busy "
        f"loops on {report['cpus']} CPUs, a subscription dropped every {args.kill_every_s} s"
    )
    print(
        f"  deaths declared: {report['deaths_declared']} "
        f"(workers still ALIVE in their first incarnation: "
        f"{report['workers_alive_same_incarnation']}/{report['workers']})"
    )
    print(
        f"  heartbeat age: max {report['max_heartbeat_age_ms']} ms against stale_after "
        f"{report['stale_after_ms']:.0f} ms; late (> one interval) in "
        f"{report['samples_late']} of {report['samples']} samples, "
        f"{report['samples_late_and_unsubscribed']} of them with the subscription down"
    )
    print(
        f"  subscriptions dropped: {report['subscriptions_dropped']}, back after "
        f"p50 {report['resubscribed_p50_ms']} ms, max {report['resubscribed_max_ms']} ms"
    )
    print(
        f"  jobs {report['jobs']}, lost {report['lost']}, duplicate visible results "
        f"{report['duplicates']}"
    )
    ok = report["deaths_declared"] == 0 and report["lost"] == 0 and report["duplicates"] == 0
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
