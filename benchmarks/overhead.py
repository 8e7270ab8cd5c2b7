"""Overhead: jobs per second through gridqueue against bare Celery, in one run.

Both run the same no-op work on the same kind of private Redis, with the same number of
workers and pool slots. Bare Celery is configured as a careful user would (acks_late,
prefetch 1, JSON); gridqueue adds its ledger writes (submit, claim, progress, liveness,
complete), heartbeats and a watchdog.

    python benchmarks/overhead.py [--jobs 500] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gridqueue.client import GridQueue  # noqa: E402
from gridqueue.embedded import EmbeddedRedis  # noqa: E402
from gridqueue.fleet import LocalFleet  # noqa: E402
from gridqueue.settings import Settings  # noqa: E402

WORKERS = 2
CONCURRENCY = 2


def gridqueue_jobs_per_s(url: str, jobs: int, log_dir: Path) -> float:
    fleet = LocalFleet(url, log_dir)
    gq = GridQueue(settings=Settings(redis_url=url))
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
    os.environ["BARE_CELERY_BROKER"] = url
    from benchmarks.bare_celery import app

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
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="gridqueue-bench-") as tmp:
        with EmbeddedRedis() as url:
            bare = bare_celery_jobs_per_s(url, args.jobs, Path(tmp))
        with EmbeddedRedis() as url:
            ours = gridqueue_jobs_per_s(url, args.jobs, Path(tmp))
    report: dict[str, Any] = {
        "jobs": args.jobs,
        "workers": WORKERS,
        "slots_per_worker": CONCURRENCY,
        "bare_celery_jobs_per_s": round(bare, 1),
        "gridqueue_jobs_per_s": round(ours, 1),
        "ratio": round(ours / bare, 3),
    }
    if args.json:
        print(json.dumps(report, indent=2))
    print(
        f"{args.jobs} no-op jobs, {WORKERS} workers x {CONCURRENCY} slots: bare Celery "
        f"{bare:.0f} jobs/s, gridqueue {ours:.0f} jobs/s, ratio {ours / bare:.2f}"
    )


if __name__ == "__main__":
    main()
