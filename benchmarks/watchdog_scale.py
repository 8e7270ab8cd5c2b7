"""Watchdog tick cost against the number of jobs, workers and attempts in flight.

It fills a private Redis through the ledger (no worker processes: the tick only reads the
ledger's indexes), then times ``Watchdog.tick()`` when nothing is due. A tick runs range
queries over what is due, so its cost must stay flat as the ledger grows; the largest
ledger is compared with the smallest, measured in the same run.

    python benchmarks/watchdog_scale.py [--sizes 1000,10000,50000] [--json]

``--fleet`` measures the watchdog under a live fleet instead: ``--workers`` simulated
workers (10,000 by default) heartbeating every ``heartbeat_interval_s`` through the real
``heartbeat.lua`` (pipelines from ``--procs`` load processes, not one process per worker),
each with a GPU health snapshot, and ``--attempts`` attempts in flight (100,000), under
the default settings (stale_after_s 1 s, the connection signal on). It reports the idle
tick's p50/p99, the heartbeat rate the load reached, and the Redis server's CPU over the
window (``INFO cpu``), per heartbeat and in cores. ``--health-every-s`` sends the health
snapshot only that often (the rest of the beats carry none), to price it.

    python benchmarks/watchdog_scale.py --fleet [--workers 10000] [--attempts 100000]
        [--procs 3] [--window-s 20] [--health-every-s 0] [--json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gridqueue.embedded import EmbeddedRedis  # noqa: E402
from gridqueue.keys import attempt_id  # noqa: E402
from gridqueue.ledger import Ledger, connect_redis, dumps  # noqa: E402
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


GIB = 2**30
# One node's health document as the agent sends it: eight GPUs, about 1.7 kB of JSON.
GPU = {
    "index": 0, "uuid": "GPU-0", "name": "Simulated H100", "memory_total_bytes": 80 * GIB,
    "memory_used_bytes": 9 * GIB, "utilization_ratio": 0.5, "temperature_c": 61.0,
    "power_w": 300.0, "xid_counts": {"13": 2},
}  # fmt: skip
HEALTH = json.dumps(
    {"probe": "simulated", "note": "", "verdict": "HEALTHY", "reasons": [],
     "unresponsive": False, "error": None, "gpus": [GPU] * 8},
    separators=(",", ":"),
)  # fmt: skip


def fleet_fill(watchdog: Watchdog, workers: int, attempts: int) -> dict[str, int]:
    """Register the fleet and put ``attempts`` attempts in flight on it, in pipelines."""
    ledger = watchdog.ledger
    settings = ledger.settings
    slots = max(1, -(-attempts // workers))
    fit = json.dumps({"sim-llm": {"required_bytes": 1, "largest_gpu_bytes": 2}})
    names = [f"node-{i}" for i in range(workers)]
    epochs: dict[str, int] = {}
    for start in range(0, workers, 1000):
        pipe = ledger.client.pipeline(transaction=False)
        batch = names[start : start + 1000]
        for name in batch:
            ledger.queue_call(
                pipe, "register", name, "sim-llm", 1, "bench", slots, "{}", "simulated",
                "[]", fit, int(settings.stale_after_s * 1000),
            )  # fmt: skip
        for name, reply in zip(batch, pipe.execute(), strict=True):
            epochs[name] = int(reply[0])
    payload = dumps({"prompt": "x", "ms": 1})
    hour_ms = 3_600_000
    for start in range(0, attempts, 2000):
        pipe = ledger.client.pipeline(transaction=False)
        for i in range(start, min(attempts, start + 2000)):
            job_id, worker = f"job-{i}", names[i % workers]
            ledger.queue_call(
                pipe, "submit", job_id, "sim-llm", "batch", payload, hour_ms, "",
                settings.job_retention_s, hour_ms, "1", hour_ms, hour_ms,
            )  # fmt: skip
            ledger.queue_call(pipe, "claim", job_id, 1, worker, 1000 + i, f"tag-{i}", hour_ms)
        for reply in pipe.execute()[1::2]:
            assert reply[0] == "ok", reply
    return epochs


def heartbeat_load(
    url: str, epochs: dict[str, int], interval_s: float, health_every_s: float,
    stop_at: float, beats: Any,
) -> None:  # fmt: skip
    """One load process: every interval, one pipeline of heartbeats for its workers."""
    settings = Settings(redis_url=url)
    ledger = Ledger(connect_redis(url), settings)
    next_health = 0.0
    next_beat = time.monotonic()
    while time.monotonic() < stop_at:
        now = time.monotonic()
        health = ""
        if now >= next_health:
            health, next_health = HEALTH, now + health_every_s
        pipe = ledger.client.pipeline(transaction=False)
        for name, epoch in epochs.items():
            ledger.queue_call(pipe, "heartbeat", name, epoch, health, "HEALTHY", "", 0)
        replies = pipe.execute()
        with beats.get_lock():
            beats.value += sum(1 for r in replies if r[0] == "ok")
        next_beat += interval_s
        time.sleep(max(0.0, next_beat - time.monotonic()))


def _redis_cpu_s(client: Any) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def measure_fleet(
    url: str, workers: int, attempts: int, procs: int, window_s: float, health_every_s: float
) -> dict[str, Any]:
    settings = Settings(redis_url=url)
    watchdog = Watchdog(settings, owner="bench")
    watchdog.ledger.client.flushall()
    filled_at = time.monotonic()
    epochs = fleet_fill(watchdog, workers, attempts)
    fill_s = time.monotonic() - filled_at
    names = list(epochs)
    beats = multiprocessing.Value("q", 0)
    warmup_s = settings.stale_after_s + 1.0
    stop_at = time.monotonic() + warmup_s + window_s + 1.0
    shares = [{n: epochs[n] for n in names[i::procs]} for i in range(procs)]
    interval_s = settings.heartbeat_interval_s
    loaders = [
        multiprocessing.Process(
            target=heartbeat_load, args=(url, share, interval_s, health_every_s, stop_at, beats)
        )
        for share in shares
    ]
    for loader in loaders:
        loader.start()
    try:
        time.sleep(warmup_s)  # every worker has beaten since the fill
        watchdog.tick()  # take the lease
        watchdog._blind_until = 0.0  # judge from the first measured tick on
        client = watchdog.ledger.client
        cpu_before, beats_before, started = _redis_cpu_s(client), beats.value, time.monotonic()
        durations: list[float] = []
        dead = 0
        while time.monotonic() - started < window_s:
            tick_started = time.perf_counter()
            report = watchdog.tick()
            durations.append(time.perf_counter() - tick_started)
            dead += report.workers_declared_dead
            time.sleep(max(0.0, settings.watchdog_tick_s - durations[-1]))
        elapsed = time.monotonic() - started
        cpu_s = _redis_cpu_s(client) - cpu_before
        beat_count = beats.value - beats_before
    finally:
        for loader in loaders:
            loader.join(timeout=30)
            if loader.is_alive():
                loader.kill()
    durations.sort()
    rate = beat_count / elapsed
    return {
        "workers": workers,
        "attempts_in_flight": attempts,
        "fill_s": round(fill_s, 1),
        "heartbeat_rate_per_s": round(rate),
        "heartbeat_rate_wanted_per_s": round(workers / settings.heartbeat_interval_s),
        "health_every_s": health_every_s,
        "ticks": len(durations),
        "tick_p50_ms": round(durations[len(durations) // 2] * 1000, 3),
        "tick_p99_ms": round(durations[max(0, int(len(durations) * 0.99) - 1)] * 1000, 3),
        "workers_declared_dead": dead,
        "redis_cpu_cores": round(cpu_s / elapsed, 3),
        "redis_cpu_us_per_heartbeat": round(cpu_s / max(1, beat_count) * 1e6, 2),
        "redis_cpu_cores_at_wanted_rate": round(
            cpu_s / max(1, beat_count) * workers / settings.heartbeat_interval_s, 3
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1000,10000,50000")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--fleet", action="store_true", help="a heartbeating fleet instead")
    parser.add_argument("--workers", type=int, default=10_000)
    parser.add_argument("--attempts", type=int, default=100_000)
    parser.add_argument("--procs", type=int, default=3)
    parser.add_argument("--window-s", type=float, default=20.0)
    parser.add_argument("--health-every-s", type=float, default=0.0)
    args = parser.parse_args()
    if args.fleet:
        with EmbeddedRedis() as url:
            row = measure_fleet(
                url, args.workers, args.attempts, args.procs, args.window_s, args.health_every_s
            )
        print(
            f"{row['workers']} workers, {row['attempts_in_flight']} attempts in flight: "
            f"heartbeats {row['heartbeat_rate_per_s']}/s of {row['heartbeat_rate_wanted_per_s']}"
            f"/s wanted; idle tick p50 {row['tick_p50_ms']:.2f} ms, p99 {row['tick_p99_ms']:.2f}"
            f" ms over {row['ticks']} ticks; declared dead {row['workers_declared_dead']}"
        )
        print(
            f"Redis CPU {row['redis_cpu_cores']:.2f} cores, "
            f"{row['redis_cpu_us_per_heartbeat']:.1f} us per heartbeat (all of Redis's work "
            f"in the window over the beats), {row['redis_cpu_cores_at_wanted_rate']:.2f} "
            f"cores at the wanted rate"
        )
        if args.json:
            print(json.dumps(row, indent=2))
        return
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
