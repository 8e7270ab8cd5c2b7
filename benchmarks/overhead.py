"""Overhead: jobs per second through gridqueue against bare Celery, in one run.

Both run the same no-op work on the same kind of private Redis, with the same number of
workers and pool slots. Bare Celery is configured as a careful user would (acks_late,
prefetch 1, JSON, no events: Celery's default); gridqueue adds its ledger writes (submit,
claim, progress, liveness, complete), heartbeats and a watchdog.

gridqueue runs twice, with Celery's task events and event heartbeats on (the default,
what Flower and ``celery events`` need) and off (``GRIDQUEUE_CELERY_EVENTS=false``), so
the report shows what events cost. With ``--rounds N`` each kind runs N times, on and off
taking turns, and the median of each is reported.

    python benchmarks/overhead.py [--jobs 500] [--events both|on|off] [--rounds 1] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis
from celery import Celery

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gridqueue.client import GridQueue  # noqa: E402
from gridqueue.embedded import EmbeddedRedis  # noqa: E402
from gridqueue.fleet import LocalFleet  # noqa: E402
from gridqueue.settings import Settings  # noqa: E402

WORKERS = 2
CONCURRENCY = 2


def gridqueue_jobs_per_s(
    url: str, jobs: int, log_dir: Path, events: bool = True, broker: str | None = None
) -> float:
    env = {"GRIDQUEUE_CELERY_EVENTS": str(events).lower()}
    fleet = LocalFleet(url, log_dir, env={**env, "GRIDQUEUE_BROKER_URL": broker or ""})
    gq = GridQueue(settings=Settings(redis_url=url, celery_events=events, broker_url=broker))
    try:
        names = [f"w{i}" for i in range(WORKERS)]
        for name in names:
            fleet.start_worker(name, concurrency=CONCURRENCY)
        fleet.start_watchdog()
        fleet.wait_alive(gq.ledger, names)
        gq.submit("sim-llm", {"prompt": "warm", "ms": 0}).result(timeout=30)
        started = time.perf_counter()
        handles = [gq.submit("sim-llm", {"prompt": f"{i}", "ms": 0}) for i in range(jobs)]
        for job in handles:
            job.result(timeout=300)
        return jobs / (time.perf_counter() - started)
    finally:
        fleet.stop_all()
        gq.close()


def bare_celery_jobs_per_s(url: str, jobs: int, log_dir: Path) -> float:
    env = {**os.environ, "BARE_CELERY_BROKER": url, "PYTHONPATH": str(ROOT)}
    # The producer: configured as benchmarks/bare_celery.py is, on this round's Redis.
    app = Celery("bare", broker=url, set_as_current=False)
    app.conf.update(task_serializer="json", accept_content=["json"], task_ignore_result=True)

    client = redis.Redis.from_url(url)
    procs = []
    for i in range(WORKERS):
        log = open(log_dir / f"bare-{i}.log", "ab")  # noqa: SIM115 (lives with the process)
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "celery",
                    "-A",
                    "benchmarks.bare_celery",
                    "worker",
                    "-n",
                    f"bare-{i}@%h",
                    "-c",
                    str(CONCURRENCY),
                    "--without-gossip",
                    "--without-mingle",
                    "--without-heartbeat",
                    "--loglevel",
                    "WARNING",
                ],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=ROOT,
            )
        )
    try:
        app.send_task("bare.noop", args=["warm"])
        give_up = time.monotonic() + 60
        while not client.get("warm"):
            if time.monotonic() > give_up:
                raise RuntimeError("bare Celery workers did not start")
            time.sleep(0.05)
        started = time.perf_counter()
        for _ in range(jobs):
            app.send_task("bare.noop", args=["done"])
        while int(client.get("done") or 0) < jobs:
            time.sleep(0.005)
        return jobs / (time.perf_counter() - started)
    finally:
        app.close()
        client.close()
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument(
        "--events",
        choices=["both", "on", "off"],
        default="both",
        help="run gridqueue with Celery events on, off, or both (default)",
    )
    parser.add_argument("--rounds", type=int, default=1, help="runs of each kind; median")
    parser.add_argument(
        "--broker", help="gridqueue's broker URL (amqp://...); default the ledger's Redis"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    kinds = {"both": [True, False], "on": [True], "off": [False]}[args.events]
    runs: dict[str, list[float]] = {"bare": [], "on": [], "off": []}
    with tempfile.TemporaryDirectory(prefix="gridqueue-bench-") as tmp:
        for round_ in range(args.rounds):
            with EmbeddedRedis() as url:
                runs["bare"].append(bare_celery_jobs_per_s(url, args.jobs, Path(tmp)))
            # On and off take turns going first: neither always runs on a warmer machine.
            for events in kinds if round_ % 2 == 0 else kinds[::-1]:
                with EmbeddedRedis() as url:
                    rate = gridqueue_jobs_per_s(
                        url, args.jobs, Path(tmp) / str(round_), events, args.broker
                    )
                runs["on" if events else "off"].append(rate)
    bare = statistics.median(runs["bare"])
    report: dict[str, Any] = {
        "jobs": args.jobs,
        "rounds": args.rounds,
        "workers": WORKERS,
        "slots_per_worker": CONCURRENCY,
        "bare_celery_jobs_per_s": round(bare, 1),
    }
    lines = [f"{args.jobs} no-op jobs, {WORKERS} workers x {CONCURRENCY} slots"]
    lines.append(f"bare Celery {bare:.0f} jobs/s")
    for kind in ("on", "off"):
        if runs[kind]:
            rate = statistics.median(runs[kind])
            report[f"gridqueue_events_{kind}_jobs_per_s"] = round(rate, 1)
            report[f"ratio_events_{kind}"] = round(rate / bare, 3)
            lines.append(f"gridqueue, events {kind}: {rate:.0f} jobs/s, ratio {rate / bare:.2f}")
    default = runs["on"] or runs["off"]  # gridqueue as configured by default: events on
    report["gridqueue_jobs_per_s"] = round(statistics.median(default), 1)
    report["ratio"] = round(statistics.median(default) / bare, 3)
    if runs["on"] and runs["off"]:
        on, off = statistics.median(runs["on"]), statistics.median(runs["off"])
        report["events_cost"] = round(1 - on / off, 3)  # share of throughput events take
        lines.append(f"events cost {100 * (1 - on / off):.1f}% of gridqueue's throughput")
    report["runs_jobs_per_s"] = {k: [round(r, 1) for r in v] for k, v in runs.items() if v}
    if args.json:
        print(json.dumps(report, indent=2))
    print("; ".join(lines))


if __name__ == "__main__":
    main()
