"""Where one Redis ends: Redis CPU per job, and the jobs/s one ledger could carry.

A private Redis, a fleet of real workers (no-op ``sim-llm`` jobs) and a watchdog. First the
fleet idles for ``--idle-s`` seconds: the Redis CPU it costs with no job (heartbeats,
presence, the watchdog's ticks) is the baseline, measured in the same run. Then ``--jobs``
no-op jobs are submitted and awaited. Redis runs commands on one thread, so the Redis CPU
per job, less the idle baseline over the same time, gives the jobs/s at which one Redis
core is saturated: the ledger's ceiling, whatever the number of workers. The jobs/s of this
run itself is bounded by the workers and the machine, not by Redis (its Redis busy share
says by how far).

It also prints where the Redis time of the jobs went: the commands with the most
``usec`` in ``INFO commandstats``, per job. A script's ``usec`` includes the commands it
calls, which are also counted under their own names, so the list does not add up; the
CPU not inside any command is Redis's own network and event-loop work.

    python benchmarks/ledger_ceiling.py [--jobs 2000] [--workers 2] [--slots 2]
        [--events on|off] [--json]
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Any

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gridqueue.client import GridQueue  # noqa: E402
from gridqueue.embedded import EmbeddedRedis  # noqa: E402
from gridqueue.fleet import LocalFleet  # noqa: E402
from gridqueue.settings import Settings  # noqa: E402


def redis_cpu_s(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def command_usec(client: redis.Redis) -> dict[str, tuple[int, int]]:
    """command -> (calls, usec) from INFO commandstats."""
    stats = client.info("commandstats")
    return {
        name.removeprefix("cmdstat_"): (int(v["calls"]), int(v["usec"]))
        for name, v in stats.items()
        if isinstance(v, dict)
    }


def exit_on_signal(signum: int, frame: FrameType | None) -> None:
    """SIGTERM/SIGINT: leave through the ``finally`` blocks (no process outlives the run)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise SystemExit(128 + signum)


def measure(
    jobs: int, workers: int, slots: int, idle_s: float, events: bool, log_dir: Path
) -> dict[str, Any]:
    with EmbeddedRedis() as url:
        fleet = LocalFleet(url, log_dir, env={"GRIDQUEUE_CELERY_EVENTS": str(events).lower()})
        gq = GridQueue(settings=Settings(redis_url=url, celery_events=events))
        probe = redis.Redis.from_url(url)
        try:
            names = [f"w{i}" for i in range(workers)]
            for name in names:
                fleet.start_worker(name, concurrency=slots)
            fleet.start_watchdog()
            fleet.wait_alive(gq.ledger, names)
            gq.submit("sim-llm", {"prompt": "warm", "ms": 0}).result(timeout=60)

            cpu0, wall0 = redis_cpu_s(probe), time.perf_counter()
            time.sleep(idle_s)
            idle_cpu_per_s = (redis_cpu_s(probe) - cpu0) / (time.perf_counter() - wall0)

            commands0 = command_usec(probe)
            cpu1, wall1 = redis_cpu_s(probe), time.perf_counter()
            handles = [gq.submit("sim-llm", {"prompt": f"{i}", "ms": 0}) for i in range(jobs)]
            for job in handles:
                job.result(timeout=600)
            wall_s = time.perf_counter() - wall1
            cpu_s = redis_cpu_s(probe) - cpu1
            commands1 = command_usec(probe)
        finally:
            probe.close()
            fleet.stop_all()
            gq.close()
    per_job_us = max(cpu_s - idle_cpu_per_s * wall_s, 0.0) / jobs * 1e6
    spent = {
        name: (calls - commands0.get(name, (0, 0))[0], usec - commands0.get(name, (0, 0))[1])
        for name, (calls, usec) in commands1.items()
    }
    top = sorted(spent.items(), key=lambda item: -item[1][1])[:8]
    return {
        "jobs": jobs,
        "celery_events": events,
        "workers": workers,
        "slots_per_worker": slots,
        "jobs_per_s": round(jobs / wall_s, 1),
        "redis_busy_share": round(cpu_s / wall_s, 3),
        "idle_fleet_redis_cpu_cores": round(idle_cpu_per_s, 4),
        "redis_cpu_us_per_job": round(per_job_us, 1),
        "ceiling_jobs_per_s_one_core": round(1e6 / per_job_us) if per_job_us else None,
        "scripts_us_per_job": round(
            sum(spent.get(name, (0, 0))[1] for name in ("evalsha", "eval", "fcall", "fcall_ro"))
            / jobs,
            1,
        ),
        "top_commands_per_job": {
            name: {"calls": round(calls / jobs, 2), "us": round(usec / jobs, 1)}
            for name, (calls, usec) in top
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--slots", type=int, default=2, help="pool slots per worker")
    parser.add_argument("--idle-s", type=float, default=5.0, help="idle baseline window")
    parser.add_argument("--events", choices=["on", "off"], default="on", help="Celery events")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.jobs < 1 or args.workers < 1 or args.slots < 1 or args.idle_s <= 0:
        parser.error("--jobs, --workers and --slots take 1 or more; --idle-s more than 0")
    signal.signal(signal.SIGTERM, exit_on_signal)
    signal.signal(signal.SIGINT, exit_on_signal)
    with tempfile.TemporaryDirectory(prefix="gridqueue-ceiling-") as tmp:
        report = measure(
            args.jobs, args.workers, args.slots, args.idle_s, args.events == "on", Path(tmp)
        )
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(
        f"{report['jobs']} no-op jobs, events {args.events}, {report['workers']} workers x "
        f"{report['slots_per_worker']} slots: {report['jobs_per_s']} jobs/s, Redis busy "
        f"{100 * report['redis_busy_share']:.0f}% of one core; idle fleet "
        f"{report['idle_fleet_redis_cpu_cores']} cores; {report['redis_cpu_us_per_job']} µs "
        f"of Redis CPU per job -> one Redis core saturates at about "
        f"{report['ceiling_jobs_per_s_one_core']} jobs/s"
    )
    print(
        f"inside the ledger's scripts: {report['scripts_us_per_job']} µs per job; "
        "the largest commands (a script's calls counted in it and on their own):"
    )
    for name, cost in report["top_commands_per_job"].items():
        print(f"  {name:24} {cost['calls']:>6} calls  {cost['us']:>7} µs per job")


if __name__ == "__main__":
    main()
